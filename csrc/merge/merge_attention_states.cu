// CUDA launcher of merge_attention_states; kernel in csrc/include/kvcore/merge_attention_states.cuh.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/cuda_dispatch.h"
#include "kvcore/merge_attention_states.cuh"

namespace kvcore {
namespace {

void merge_attention_states_cuda(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                                 const at::Tensor& lse_b, at::Tensor& out, at::Tensor& lse) {
  const MergeShape s = check_merge(out_a, lse_a, out_b, lse_b, out, lse);
  TORCH_CHECK(out_a.is_cuda(), "merge_attention_states (CUDA): out_a must be a CUDA tensor");
  TORCH_CHECK(s.head_dim % 8 == 0, "merge_attention_states (CUDA): head_dim must be a multiple of 8, got ", s.head_dim);
  TORCH_CHECK(s.head_dim / 8 < (int64_t(1) << 31), "merge_attention_states (CUDA): head_dim must be < 2^34, got ",
              s.head_dim);
  for (auto [t, n] : {std::pair{&out_a, "out_a"}, {&out_b, "out_b"}, {&out, "out"}}) check_aligned16(*t, n);
  const int64_t rows = s.rows * s.heads;
  if (rows == 0) return;

  const c10::cuda::CUDAGuard guard(out_a.device());
  MergeStatesParams p{out_a.data_ptr(), lse_a.data_ptr<float>(), out_b.data_ptr(), lse_b.data_ptr<float>(),
                      out.data_ptr(), lse.data_ptr<float>(), rows, int(s.head_dim / 8)};
  const int tx = std::min(p.chunks, 32);
  const int ty = std::max(1, 256 / tx);
  const int64_t blocks = (rows + ty - 1) / ty;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "merge_attention_states: too many rows");
  dispatch_half_types(out_a.scalar_type(), "merge_attention_states", [&](auto tag) {
    using T = decltype(tag);
    merge_attention_states_kernel<T><<<unsigned(blocks), dim3(tx, ty), 0, at::cuda::getCurrentCUDAStream()>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcore, CUDA, m) { m.impl("merge_attention_states", &merge_attention_states_cuda); }

}  // namespace kvcore
