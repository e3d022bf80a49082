// CUDA launcher of append_paged_kv; kernel in csrc/include/kvcore/append_paged_kv.cuh.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_dispatch.h"
#include "kvcore/append_paged_kv.cuh"

namespace kvcore {
namespace {

void append_paged_kv_cuda(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                          const at::Tensor& slot_mapping) {
  const AppendShape s = check_append(k, v, k_cache, v_cache, slot_mapping);
  TORCH_CHECK(k.is_cuda(), "append_paged_kv (CUDA): k must be a CUDA tensor");
  const int64_t row_bytes = s.num_kv_heads * s.head_dim * k.element_size();
  TORCH_CHECK(row_bytes % 16 == 0, "append_paged_kv (CUDA): num_kv_heads * head_dim * element size must be a multiple "
              "of 16 bytes, got ", row_bytes);
  TORCH_CHECK(k.stride(0) % 8 == 0 && v.stride(0) % 8 == 0 && k_cache.stride(0) % 8 == 0 && v_cache.stride(0) % 8 == 0,
              "append_paged_kv (CUDA): token and page strides must be multiples of 8 elements");
  for (auto [t, n] : {std::pair{&k, "k"}, {&v, "v"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}})
    check_aligned16(*t, n);
  if (s.tokens == 0 || row_bytes == 0) return;

  const c10::cuda::CUDAGuard guard(k.device());
  AppendPagedKvParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_token_stride = k.stride(0);
  p.v_token_stride = v.stride(0);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_page_stride = k_cache.stride(0);
  p.v_page_stride = v_cache.stride(0);
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.num_tokens = s.tokens;
  p.num_slots = s.num_slots;
  // int32 in the kernel: a page_size of 2^31 + 8 would become negative and a valid slot a page -1.
  TORCH_CHECK(k_cache.size(1) < (int64_t(1) << 31) && row_bytes / 16 < (int64_t(1) << 31),
              "append_paged_kv (CUDA): page_size and num_kv_heads * head_dim / 8 must be < 2^31, got ",
              k_cache.size(1), " and ", row_bytes / 16);
  p.page_size = int(k_cache.size(1));
  p.row_chunks = int(row_bytes / 16);
  const int threads = 256;
  const int64_t blocks = (s.tokens * p.row_chunks + threads - 1) / threads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "append_paged_kv: too many tokens in one call");
  dispatch_half_types(k.scalar_type(), "append_paged_kv", [&](auto tag) {
    using T = decltype(tag);
    append_paged_kv_kernel<T><<<unsigned(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcore, CUDA, m) { m.impl("append_paged_kv", &append_paged_kv_cuda); }

}  // namespace kvcore
