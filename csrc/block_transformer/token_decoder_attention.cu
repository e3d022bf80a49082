// CUDA launcher of token_decoder_attention: checks, work-item sizing, grid, dtype/head-dim
// dispatch. The kernel is framework-free: csrc/include/kvcore/token_decoder_attention.cuh.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "common/checks.h"
#include "common/cuda_dispatch.h"
#include "kvcore/token_decoder_attention.cuh"

namespace kvcore {
namespace {

// Raises the kernel's dynamic shared-memory limit to the device's opt-in maximum, once per
// (kernel, device); returns that maximum.
int allow_max_smem(const void* kernel) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> done;
  const int dev = at::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  auto it = done.find({kernel, dev});
  if (it != done.end()) return it->second;
  const int most = int(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most));
  return done[{kernel, dev}] = most;
}

template <typename T, int D>
void launch(TokenDecoderParams& p, const TokenDecoderShape& s, cudaStream_t stream) {
  using Cfg = TokenDecoderConfig<D>;
  auto kernel = token_decoder_attention_kernel<T, D>;
  const int max_smem = allow_max_smem(reinterpret_cast<const void*>(kernel));

  // Chunk of KV heads per work item: the largest divisor of Hkv whose inputs fit the prefetch
  // stage (so one item's loads are all in flight at once); at least one KV head.
  const int64_t head_bytes = (s.block_length * s.group + 2 * (s.prefix + s.block_length)) * D * 2;
  int hc = 1;
  for (int c = 1; c <= s.num_kv_heads; ++c)
    if (s.num_kv_heads % c == 0 && c * head_bytes <= Cfg::STAGE_BYTES) hc = c;
  const int keys = int(s.prefix + s.block_length);
  const int keys_pad = keys | 1;  // odd row stride: the softmax threads read one column of rows
  const int hcq = hc * int(s.group);
  const int valid_tiles = token_decoder_valid_tiles(int(s.block_length), int(s.prefix), Cfg::JT);
  const int64_t smem_bytes = token_decoder_smem_bytes(int(s.block_length), keys, keys_pad, hc, hcq, Cfg::DP, Cfg::CPR,
                                                      Cfg::STAGE_VECS, valid_tiles);
  TORCH_CHECK(smem_bytes <= max_smem, "token_decoder_attention (CUDA): one KV head of a block (block_length ",
              s.block_length, ", prefix ", s.prefix, ", group ", s.group, ", head_dim ", D, ") needs ", smem_bytes,
              " bytes of shared memory, more than this GPU's ", max_smem, "; use shorter blocks");

  const int64_t chunks = s.num_kv_heads / hc;
  const int64_t items = s.blocks * chunks;
  TORCH_CHECK(items < (int64_t(1) << 31), "token_decoder_attention (CUDA): too many blocks (", s.blocks, ")");
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Cfg::THREADS, size_t(smem_bytes)));
  TORCH_CHECK(per_sm > 0, "token_decoder_attention (CUDA): the kernel does not fit on this GPU (", smem_bytes,
              " bytes of shared memory per CTA)");
  // One wave of CTAs, each walking a contiguous range of items (consecutive blocks).
  const int64_t slots = int64_t(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_cta = (items + slots - 1) / slots;
  const int64_t grid = (items + per_cta - 1) / per_cta;

  p.num_items = int(items);
  p.items_per_cta = int(per_cta);
  p.keys = keys;
  p.keys_pad = keys_pad;
  p.chunk_kv_heads = hc;
  p.chunk_q_heads = hcq;
  p.chunks = make_fast_div(uint32_t(chunks));
  p.chunk_q = make_fast_div(uint32_t(hcq));
  p.chunk_kv = make_fast_div(uint32_t(hc));
  p.rows_div = make_fast_div(uint32_t(s.block_length));
  p.group = make_fast_div(uint32_t(s.group));
  p.valid_tiles = make_fast_div(uint32_t(valid_tiles));
  kernel<<<unsigned(grid), Cfg::THREADS, size_t(smem_bytes), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void token_decoder_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const c10::optional<at::Tensor>& block_lens, double scale, at::Tensor& out,
                                  const c10::optional<at::Tensor>& lse) {
  const TokenDecoderShape s = check_token_decoder(q, k, v, block_lens, out, lse);
  TORCH_CHECK(q.is_cuda(), "token_decoder_attention (CUDA): q must be a CUDA tensor");
  check_token_decoder_scale(scale);
  TORCH_CHECK(s.head_dim == 64 || s.head_dim == 128 || s.head_dim == 256,
              "token_decoder_attention (CUDA): head_dim must be 64, 128 or 256, got ", s.head_dim);
  TORCH_CHECK(q.stride(0) % 8 == 0 && k.stride(0) % 8 == 0 && v.stride(0) % 8 == 0,
              "token_decoder_attention (CUDA): q, k and v block strides (dim 0) must be multiples of 8 elements, got ",
              q.stride(0), ", ", k.stride(0), ", ", v.stride(0));
  check_aligned16(q, "q");
  check_aligned16(k, "k");
  check_aligned16(v, "v");
  check_aligned16(out, "out");
  if (s.blocks == 0 || s.block_length == 0 || s.num_q_heads == 0) return;
  TORCH_CHECK(s.num_q_heads * s.block_length * s.head_dim < (int64_t(1) << 31) &&
                  (s.prefix + s.block_length) * s.num_kv_heads * s.head_dim < (int64_t(1) << 31),
              "token_decoder_attention (CUDA): one block is too large");

  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  TokenDecoderParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.block_lens = block_lens.has_value() ? block_lens->data_ptr<int>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  p.q_stride_n = q.stride(0);
  p.k_stride_n = k.stride(0);
  p.v_stride_n = v.stride(0);
  p.rows = int(s.block_length);
  p.prefix = int(s.prefix);
  p.num_q_heads = int(s.num_q_heads);
  p.num_kv_heads = int(s.num_kv_heads);
  p.scale_log2 = float(scale) * kLog2e;

  dispatch_half_types(q.scalar_type(), "token_decoder_attention", [&](auto tag) {
    using T = decltype(tag);
    switch (s.head_dim) {
      case 64: return launch<T, 64>(p, s, stream);
      case 128: return launch<T, 128>(p, s, stream);
      default: return launch<T, 256>(p, s, stream);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcore, CUDA, m) { m.impl("token_decoder_attention", &token_decoder_attention_cuda); }

}  // namespace kvcore
