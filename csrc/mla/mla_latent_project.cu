// CUDA launcher of kvcore::mla_latent_project: CUDA-only checks, the split choice, the workspace
// and the arrival counters, dtype / token-tile dispatch. Kernels: csrc/include/kvcore/mla_latent_project.cuh.
//
// T <= 64: one fused launch (split-K tensor-core product, in-kernel reduction, epilogue).
// T > 64 (prefill): kv = hidden @ w_dkv by cuBLAS into an fp32 buffer, then the epilogue kernel.
// (KVCORE_MLA_PROJECT_FUSED_MAX moves the boundary down for A/B timing; see fused_max_tokens.)
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#elif __has_include(<torch/version.h>)
#include <torch/version.h>
#endif

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <utility>

#include "common/checks.h"
#include "common/cuda_dispatch.h"
#include "common/cuda_occupancy.h"
#include "common/env_switch.h"
#include "kvcore/mla_latent_project.cuh"

// torch.mm(a, b, out_dtype=float32) for bf16/fp16 inputs (cuBLAS, fp32 output) exists since 2.8.
#if defined(TORCH_VERSION_MAJOR) && (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8))
#define KVCORE_MM_OUT_DTYPE 1
#else
#define KVCORE_MM_OUT_DTYPE 0
#endif

namespace kvcore {
namespace {

using Cfg = MlaProjectConfig;

// The fused kernel's arrival counters live in one persistent, zero-initialised buffer per device
// (the kernel leaves them zero), so an eager call needs neither a memset nor a host sync. Eager
// calls take one of kCounterSets sets in turn: only calls running at the same time on different
// streams need distinct sets, and they get them unless kCounterSets calls apart. A call captured
// in a CUDA graph gets counters of its own, zeroed by a memset node: a pool set would be the
// graph's on every replay while eager calls kept rotating onto it, and a replay running beside
// such a call on another stream would share its counters (a CTA elected last too early).
constexpr int kCounterSets = 64;
constexpr int kCounterStride = 64;  // counters per set: 1 + column tiles (<= 1 + MAX_WIDTH / 64)
static_assert(1 + Cfg::MAX_WIDTH / Cfg::NTILE <= kCounterStride, "a counter set must hold every column tile");

unsigned* counter_set(const at::Tensor& like, cudaStream_t stream, at::Tensor& fresh) {
  static std::mutex mu;
  static auto* pools = new std::map<int, at::Tensor>();  // never freed: no CUDA frees at process exit
  static std::atomic<unsigned> next{0};
  const int dev = like.get_device();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    fresh = at::empty({kCounterStride}, like.options().dtype(at::kInt));
    C10_CUDA_CHECK(cudaMemsetAsync(fresh.data_ptr(), 0, kCounterStride * sizeof(int), stream));
    return reinterpret_cast<unsigned*>(fresh.data_ptr());
  }
  std::lock_guard<std::mutex> lock(mu);
  auto it = pools->find(dev);
  if (it == pools->end()) {
    at::Tensor pool = at::zeros({kCounterSets * kCounterStride}, like.options().dtype(at::kInt));
    // Once per device and process: the zeros must have landed before a call on any stream uses them.
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    it = pools->emplace(dev, std::move(pool)).first;
  }
  const unsigned set = next.fetch_add(1, std::memory_order_relaxed) % kCounterSets;
  return reinterpret_cast<unsigned*>(it->second.data_ptr()) + int64_t(set) * kCounterStride;
}

// K splits: the CTAs (col_tiles x splits) should fill the GPU's CTA slots in one wave, each with
// an equal number of 64-row weight chunks. Minimises waves x chunks per CTA (the time of the
// busiest slot); among equals, the fewest splits (fewer partials to reduce).
std::pair<int, int> choose_splits(int64_t chunks, int64_t col_tiles, int64_t slots) {
  chunks = std::max<int64_t>(chunks, 1);
  int64_t best_splits = 1, best_cps = chunks, best_cost = INT64_MAX;
  const int64_t most = std::min<int64_t>(chunks, 4 * slots);
  for (int64_t s = 1; s <= most; ++s) {
    const int64_t cps = (chunks + s - 1) / s;
    const int64_t eff = (chunks + cps - 1) / cps;  // splits that actually get chunks
    const int64_t waves = (eff * col_tiles + slots - 1) / slots;
    const int64_t cost = waves * cps;
    if (cost < best_cost) {
      best_cost = cost;
      best_splits = eff;
      best_cps = cps;
    }
  }
  return {int(best_splits), int(best_cps)};
}

template <typename T, int MT>
void launch_fused(MlaProjectParams& p, const at::Tensor& hidden, cudaStream_t stream) {
  auto kernel = mla_project_kernel<T, MT>;
  constexpr int smem = Cfg::smem_bytes<MT>();
  const int per_sm = ctas_per_sm(reinterpret_cast<const void*>(kernel), Cfg::THREADS, smem, "mla_latent_project");
  const int64_t slots = int64_t(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t col_tiles = (p.width + Cfg::NTILE - 1) / Cfg::NTILE;
  const int64_t chunks = (int64_t(p.d_model) + Cfg::KC - 1) / Cfg::KC;
  const auto [splits, cps] = choose_splits(chunks, col_tiles, slots);
  p.chunks_per_split = cps;
  // One level when the grid's last CTA can sum every partial quickly (up to 128 KB of them: one
  // SM reads that from L2 in ~1 us with its loads 16 deep): that saves the tile level's arrival
  // (fence + atomic) and its round trips through L2. DeepSeek's T = 1 (28 splits x 576 columns,
  // 64.5 KB) is now one level; it was two at the 40 KB bound.
  p.single_level = int64_t(splits) * p.tokens * p.width * 4 <= 128 * 1024;

  const int64_t rows = int64_t(splits) * p.tokens * p.width;
  at::Tensor ws = at::empty({rows + int64_t(p.tokens) * p.width}, hidden.options().dtype(at::kFloat));
  p.partials = ws.data_ptr<float>();
  p.kv = p.partials + rows;  // rows is a multiple of 8 floats: 16-byte aligned
  at::Tensor fresh;
  p.counters = counter_set(hidden, stream, fresh);
  kernel<<<dim3(unsigned(col_tiles), unsigned(splits)), Cfg::THREADS, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_cublas_then_finish(MlaProjectParams& p, const at::Tensor& hidden, const at::Tensor& w_dkv,
                               cudaStream_t stream) {
#if KVCORE_MM_OUT_DTYPE
  at::Tensor kv = at::mm(hidden, w_dkv, at::kFloat);
#else
  at::Tensor kv = at::mm(hidden, w_dkv).to(at::kFloat);  // rounded to the dtype once, within tolerance
#endif
  TORCH_CHECK(kv.is_contiguous() && kv.scalar_type() == at::kFloat, "mla_latent_project: unexpected product layout");
  p.kv = kv.data_ptr<float>();
  const int64_t blocks = (int64_t(p.tokens) + Cfg::FIN_TOKENS - 1) / Cfg::FIN_TOKENS;
  const size_t smem = size_t(Cfg::FIN_TOKENS) * p.width * sizeof(float);  // <= 32 KiB: no opt-in needed
  mla_project_finish_kernel<T><<<unsigned(blocks), Cfg::THREADS, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The most tokens the fused kernel takes; more go to cuBLAS + the epilogue kernel.
// KVCORE_MLA_PROJECT_FUSED_MAX = 1 (the default since session 8) / 0 / 2 / 4 / 8 / 16 / 32 / 64,
// read once per process: an A/B switch for `python -m kvcore.bench --group mla`. Session 8 timed
// the cuBLAS path at every T with the fused kernel off: T1 16 us, T2-T32 17 us, T64 18 us, where
// the fused kernel took T1 16, T2 19, T4 23, T8 23, T16 27, T32 38, T64 60 us (its tile-level sums
// grow with T); torch's unfused sequence (matmul, rms_norm, rope, index_put_) took 41-50 us.
int fused_max_tokens() {
  static const int most[] = {1, 0, 2, 4, 8, 16, 32, 64};
  static const int choice = env_choice("KVCORE_MLA_PROJECT_FUSED_MAX", {"1", "0", "2", "4", "8", "16", "32", "64"},
                                       "mla_latent_project (CUDA)");
  return most[choice];
}

void mla_latent_project_cuda(const at::Tensor& hidden, const at::Tensor& w_dkv, const at::Tensor& norm_weight,
                             double eps, const at::Tensor& cos_sin, const at::Tensor& positions,
                             at::Tensor& latent_cache, const at::Tensor& slot_mapping, bool interleaved_rope,
                             const c10::optional<at::Tensor>& c_kv_out, const c10::optional<at::Tensor>& k_pe_out) {
  const MlaProjectShape s = check_mla_latent_project(hidden, w_dkv, norm_weight, eps, cos_sin, positions,
                                                     latent_cache, slot_mapping, c_kv_out, k_pe_out);
  const char* op = "mla_latent_project (CUDA)";
  TORCH_CHECK(hidden.is_cuda(), op, ": hidden must be a CUDA tensor");
  const int64_t width = s.rank + s.rope_dim;
  TORCH_CHECK(width % 8 == 0, op, ": kv_lora_rank + rope_dim (norm_weight's length + cos_sin's columns) must be a "
              "multiple of 8 (16-byte latent rows), got ", s.rank, " + ", s.rope_dim);
  TORCH_CHECK(width <= Cfg::MAX_WIDTH, op, ": kv_lora_rank + rope_dim must be <= ", Cfg::MAX_WIDTH, ", got ", width);
  TORCH_CHECK(latent_cache.stride(0) % 8 == 0, op, ": latent_cache's page stride must be a multiple of 8 elements, "
              "got ", latent_cache.stride(0));
  TORCH_CHECK(s.tokens < (int64_t(1) << 31) && s.d_model < (int64_t(1) << 31) && s.max_pos < (int64_t(1) << 31) &&
                  s.page_size < (int64_t(1) << 31),
              op, ": tokens, d_model, max_position and page_size must each be < 2^31");
  check_aligned16(w_dkv, "w_dkv");
  check_aligned16(latent_cache, "latent_cache");
  // Validated on the host without looking at the device: dtype (dispatch below), shapes, layout.
  dispatch_half_types(hidden.scalar_type(), op, [](auto) {});
  if (s.tokens == 0) return;

  const c10::cuda::CUDAGuard guard(hidden.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  MlaProjectParams p{};
  p.hidden = hidden.data_ptr();
  p.hidden_stride = hidden.stride(0);
  p.w = w_dkv.data_ptr();
  p.norm_weight = norm_weight.data_ptr();
  p.cos_sin = cos_sin.data_ptr<float>();
  p.positions = positions.data_ptr<int64_t>();
  p.slots = slot_mapping.data_ptr<int64_t>();
  p.cache = latent_cache.data_ptr();
  p.page_stride = latent_cache.stride(0);
  p.c_kv_out = c_kv_out.has_value() ? c_kv_out->data_ptr() : nullptr;
  p.k_pe_out = k_pe_out.has_value() ? k_pe_out->data_ptr() : nullptr;
  p.num_slots = s.num_pages * s.page_size;
  p.tokens = int(s.tokens);
  p.d_model = int(s.d_model);
  p.rank = int(s.rank);
  p.rope_dim = int(s.rope_dim);
  p.width = int(width);
  p.max_pos = int(s.max_pos);
  p.page_size = int(s.page_size);
  p.eps = float(eps);
  p.interleaved = interleaved_rope;
  const auto addr = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  p.hidden_vec = addr(p.hidden) % 16 == 0 && s.d_model % 8 == 0 && (s.tokens == 1 || p.hidden_stride % 8 == 0);
  p.c_kv_vec = s.rank % 8 == 0 && addr(p.c_kv_out) % 16 == 0;
  p.k_pe_vec = s.rank % 8 == 0 && addr(p.k_pe_out) % 16 == 0;

  dispatch_half_types(hidden.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const int fused_max = std::min(fused_max_tokens(), Cfg::MAX_TOKENS);
    if (s.tokens <= std::min(16, fused_max)) return launch_fused<T, 1>(p, hidden, stream);
    if (s.tokens <= std::min(32, fused_max)) return launch_fused<T, 2>(p, hidden, stream);
    if (s.tokens <= fused_max) return launch_fused<T, 4>(p, hidden, stream);
    launch_cublas_then_finish<T>(p, hidden, w_dkv, stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcore, CUDA, m) { m.impl("mla_latent_project", &mla_latent_project_cuda); }

}  // namespace kvcore
