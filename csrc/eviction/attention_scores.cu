// CUDA launcher of kvcore::attention_scores: checks, the key split, the workspace and the four
// launches (pass 1 and the lse merge only without the caller's lse; pooling only when asked).
// The kernels are framework-free: csrc/include/kvcore/attention_scores.cuh.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "common/checks.h"
#include "common/env_switch.h"
#include "common/cuda_dispatch.h"
#include "common/cuda_occupancy.h"
#include "kvcore/attention_scores.cuh"

namespace kvcore {
namespace {

// A split shorter than this spends more on loading its rows than on its keys (one row block).
constexpr int64_t kMinSplitKeys = 256;
// Positions are int32 in the kernels and run a few tiles past a split while pages are prefetched.
constexpr int64_t kMaxPositions = (int64_t(1) << 31) - (int64_t(1) << 16);

// The pass kernels, chosen once per process from KVCORE_SCORES_VARIANT: unset or "transposed"
// (the default since session 8): attention_scores_pass2_t_kernel (keys on the mma's M dimension)
// and attention_scores_pass1_t_kernel; "untransposed": attention_scores_kernel for both passes
// (query rows on M; the default until session 8, kept as the A/B baseline and for its tests).
// Session 8 timed SnapKV's scores at S131072 (w64) one pass 0.251 vs 0.383 ms and two passes
// 0.498 vs 0.706 ms (bench/NOTES.md). Any other value is an error on every call, so a misspelt
// name cannot silently time the default.
enum class ScoresVariant { kTransposed, kUntransposed };

ScoresVariant scores_variant() {
  static const ScoresVariant variant = ScoresVariant(
      env_choice("KVCORE_SCORES_VARIANT", {"transposed", "untransposed"}, "attention_scores (CUDA)"));
  return variant;
}

template <typename T, int D>
void launch(AttentionScoresParams& p, bool have_lse, int64_t pairs, at::Tensor& workspace_holder,
            const at::Tensor& q, cudaStream_t stream) {
  using Cfg = ScoresConfig<D>;
  const bool transposed = scores_variant() == ScoresVariant::kTransposed;
  auto pass1 = transposed ? attention_scores_pass1_t_kernel<T, Cfg> : attention_scores_kernel<T, Cfg, false>;
  auto pass2 = !transposed                  ? attention_scores_kernel<T, Cfg, true>
               : p.reduction == kScoreMax ? attention_scores_pass2_t_kernel<T, Cfg, true>
                                          : attention_scores_pass2_t_kernel<T, Cfg, false>;
  const size_t smem = Cfg::SMEM_BYTES;
  const size_t smem2 = transposed ? Cfg::SMEM_BYTES_T : Cfg::SMEM_BYTES;
  const int per_sm = ctas_per_sm(reinterpret_cast<const void*>(pass2), Cfg::THREADS, smem2, "attention_scores");
  if (!have_lse) ctas_per_sm(reinterpret_cast<const void*>(pass1), Cfg::THREADS, smem, "attention_scores");
  const int64_t slots = int64_t(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  // Key split from shapes only (no look at seq_lens: no host sync, graph-capturable): about 8
  // waves of CTAs, so ragged lengths and the compute-heavy tiles leave a short tail.
  const int64_t kv_len = p.kv_len;
  int64_t splits = std::max<int64_t>(1, (8 * slots + pairs - 1) / pairs);
  // Many query rows (H2O at prefill: w = the prompt) make every key costly, so shorter splits pay.
  const int64_t min_split = p.rows > Cfg::ROWS ? Cfg::TK : kMinSplitKeys;
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, kv_len / min_split));
  int64_t split_tokens = std::max<int64_t>(1, (kv_len + splits - 1) / splits);
  split_tokens = (split_tokens + Cfg::TK - 1) / Cfg::TK * Cfg::TK;
  splits = std::max<int64_t>(1, (kv_len + split_tokens - 1) / split_tokens);
  // At most 65535 splits (the grid's y limit), and positions are int32 in the kernels, where the
  // last split's end (start + split_tokens) passes kv_len by up to a tile per split: splits x TK
  // stay within the headroom under 2^31, less 2^15 for the positions the kernels look ahead (the
  // capacity check leaves 2^16: at least 512 splits at TK 64; only grids of a few pairs over ~2^31
  // keys ask for more).
  const int64_t most_splits = std::min<int64_t>(
      65535, std::max<int64_t>(1, ((int64_t(1) << 31) - (int64_t(1) << 15) - kv_len) / Cfg::TK));
  if (splits > most_splits) {
    split_tokens = ((kv_len + most_splits - 1) / most_splits + Cfg::TK - 1) / Cfg::TK * Cfg::TK;
    splits = std::max<int64_t>(1, (kv_len + split_tokens - 1) / split_tokens);
  }
  p.splits = int(splits);
  p.split_tokens = int(split_tokens);

  // Workspace (fp32, caching allocator): split parts [B, Hkv, R, splits] and the merged lse
  // [B, w, Hq] without the caller's lse; pooling edges [B, Hkv, segments, 2 * kEdge].
  const int64_t part_n = have_lse ? 0 : pairs * p.rows * splits;
  const int64_t lse_n = have_lse ? 0 : int64_t(p.batch) * p.window * p.num_kv_heads * p.group;
  const int64_t edge_n = p.pool_kernel > 0 ? pairs * p.num_segs * 2 * kEdge : 0;
  auto round = [](int64_t n) { return (n + 63) / 64 * 64; };
  const int64_t total = round(part_n) + round(lse_n) + round(edge_n);
  if (total > 0) {
    workspace_holder = at::empty({total}, q.options().dtype(at::kFloat));
    float* base = workspace_holder.data_ptr<float>();
    if (!have_lse) {
      p.part = base;
      p.lse_out = base + round(part_n);
      p.lse = p.lse_out;
    }
    if (edge_n > 0) p.edges = base + round(part_n) + round(lse_n);
  }

  // KV heads vary fastest: CTAs of one (split, sequence) read interleaved rows of the same pages.
  const dim3 grid(p.num_kv_heads, unsigned(splits), p.batch);
  if (!have_lse) {
    pass1<<<grid, Cfg::THREADS, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t warps = pairs * p.rows;
    merge_lse_kernel<<<unsigned((warps * 32 + 255) / 256), 256, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  pass2<<<grid, Cfg::THREADS, smem2, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.pool_kernel > 0) {
    pool_scores_kernel<<<dim3(p.num_segs, p.num_kv_heads, p.batch), 256, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void attention_scores_cuda(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& block_table,
                           const at::Tensor& seq_lens, const c10::optional<at::Tensor>& lse, double scale,
                           c10::string_view reduction, c10::string_view pooling, int64_t pool_kernel, at::Tensor& out) {
  const AttentionScoresShape s = check_attention_scores(q_in, k_cache, block_table, seq_lens, lse, out);
  const AttentionScoresOptions opt =
      check_attention_scores_scalars(scale, std::string(reduction), std::string(pooling), pool_kernel);
  TORCH_CHECK(q_in.is_cuda(), "attention_scores (CUDA): q must be a CUDA tensor");
  TORCH_CHECK(s.head_dim == 64 || s.head_dim == 128 || s.head_dim == 256,
              "attention_scores (CUDA): head_dim must be 64, 128 or 256, got ", s.head_dim);
  TORCH_CHECK(s.batch <= 65535, "attention_scores (CUDA): batch must be <= 65535 (the grid's z dimension), got ",
              s.batch);
  TORCH_CHECK(s.num_kv_heads <= 65535, "attention_scores (CUDA): num_kv_heads must be <= 65535 (a grid dimension), got ",
              s.num_kv_heads);
  TORCH_CHECK(s.window * s.group <= (int64_t(1) << 24), "attention_scores (CUDA): q's window x group (",
              s.window * s.group, " rows per KV head) must be <= 2^24");
  TORCH_CHECK(s.max_pages * s.page_size < kMaxPositions, "attention_scores: block_table capacity (max_pages x "
              "page_size = ", s.max_pages * s.page_size, ") must be < 2^31 - 2^16");
  TORCH_CHECK(s.max_len < kMaxPositions, "attention_scores: out's key dimension (", s.max_len,
              ") must be < 2^31 - 2^16");
  TORCH_CHECK(s.num_pages < (int64_t(1) << 31), "attention_scores: k_cache has too many pages (", s.num_pages, ")");
  TORCH_CHECK(k_cache.stride(0) % 8 == 0,
              "attention_scores (CUDA): k_cache page stride must be a multiple of 8 elements (16-byte copies), got ",
              k_cache.stride(0));
  if (s.batch == 0 || s.num_kv_heads == 0 || s.max_len == 0) return;
  check_aligned16(k_cache, "k_cache");
  // The rows are read as 4-byte pairs of elements: a q view with odd strides or an address that
  // is 2 mod 4 is copied once (small next to the keys) rather than refused. A clone, not
  // contiguous(): a contiguous q at an odd element offset would come back as itself, misaligned.
  const bool q_ok = q_in.stride(0) % 2 == 0 && q_in.stride(1) % 2 == 0 && q_in.stride(2) % 2 == 0 &&
                    reinterpret_cast<uintptr_t>(q_in.data_ptr()) % 4 == 0;
  const at::Tensor q = q_ok ? q_in : q_in.clone(at::MemoryFormat::Contiguous);

  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AttentionScoresParams p{};
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_w = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.k_cache = k_cache.data_ptr();
  p.k_page_stride = k_cache.stride(0);
  p.block_table = block_table.data_ptr<int>();
  p.seq_lens = seq_lens.data_ptr<int>();
  p.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  p.out = out.data_ptr<float>();
  p.batch = int(s.batch);
  p.window = int(s.window);
  p.num_kv_heads = int(s.num_kv_heads);
  p.group = int(s.group);
  p.rows = int(s.window * s.group);
  p.num_pages = int(s.num_pages);
  p.page_size = int(s.page_size);
  p.page_shift = (s.page_size & (s.page_size - 1)) == 0 ? __builtin_ctzll(uint64_t(s.page_size)) : -1;
  p.max_pages = int(s.max_pages);
  // An empty cache gives every sequence length 0 (all scores 0, no key read), as on the CPU.
  p.kv_len = s.num_pages > 0 ? int(std::min(s.max_pages * s.page_size, s.max_len)) : 0;
  p.max_len = int(s.max_len);
  p.num_segs = int((s.max_len + kPoolSeg - 1) / kPoolSeg);
  p.scale_log2 = float(scale) * kLog2e;
  p.reduction = opt.reduction == ScoreReduction::kSum ? kScoreSum
                : opt.reduction == ScoreReduction::kMean ? kScoreMean
                                                         : kScoreMax;
  p.pool_kernel = opt.pooling == ScorePooling::kNone ? 0 : int(opt.pool_kernel);
  p.pool_max = opt.pooling == ScorePooling::kMax ? 1 : 0;

  const int64_t pairs = s.batch * s.num_kv_heads;
  at::Tensor workspace;  // kept alive until the launches are queued (the caching allocator orders reuse by stream)
  dispatch_half_types(q.scalar_type(), "attention_scores", [&](auto tag) {
    using T = decltype(tag);
    switch (s.head_dim) {
      case 64: return launch<T, 64>(p, lse.has_value(), pairs, workspace, q, stream);
      case 128: return launch<T, 128>(p, lse.has_value(), pairs, workspace, q, stream);
      default: return launch<T, 256>(p, lse.has_value(), pairs, workspace, q, stream);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcore, CUDA, m) { m.impl("attention_scores", &attention_scores_cuda); }

}  // namespace kvcore
