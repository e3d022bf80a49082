// CUDA launchers of the retrieval ops (kernels in csrc/include/kvcore/retrieval.cuh):
// infllm_unit_scores and topk_rows. Shape checks shared with the CPU kernels
// (retrieval/retrieval_checks.h); no host sync, no allocation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_dispatch.h"
#include "common/pdl.h"
#include "kvcore/retrieval.cuh"
#include "retrieval/retrieval_checks.h"

namespace kvcore {
namespace {

constexpr int kScoreThreads = 256;
static_assert(kScoreThreads == 256, "the unit-score kernels are written for 256 threads (__launch_bounds__, chunks)");

void infllm_unit_scores_cuda(const at::Tensor& q, const at::Tensor& repr_keys, at::Tensor& out) {
  const UnitScoresShape s = check_unit_scores(q, repr_keys, out);
  TORCH_CHECK(repr_keys.is_cuda(), "infllm_unit_scores (CUDA): repr_keys must be a CUDA tensor");
  const int64_t d = s.head_dim;
  TORCH_CHECK(d >= 8 && d <= 256 && (d & (d - 1)) == 0,
              "infllm_unit_scores (CUDA): head_dim must be a power of two in [8, 256], got ", d);
  TORCH_CHECK(s.num_kv_heads * d <= 16384, "infllm_unit_scores (CUDA): num_kv_heads x head_dim must be <= 16384, got ",
              s.num_kv_heads * d);
  check_aligned16(repr_keys, "repr_keys");
  TORCH_CHECK(repr_keys.stride(0) % 8 == 0 || s.batch <= 1,
              "repr_keys' batch stride must be a multiple of 8 elements (16-byte rows), got ", repr_keys.stride(0));
  if (out.numel() == 0) return;
  TORCH_CHECK(s.batch <= 65535, "infllm_unit_scores (CUDA): batch must be <= 65535, got ", s.batch);
  // int32 in the kernel (q's head stride may be 0, so an expanded q can claim any group).
  TORCH_CHECK(s.group < (int64_t(1) << 31), "infllm_unit_scores (CUDA): num_q_heads / num_kv_heads must be < 2^31, got ",
              s.group);

  const c10::cuda::CUDAGuard guard(q.device());
  UnitScoresParams p{};
  p.q = q.data_ptr();
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.keys = repr_keys.data_ptr();
  p.k_sb = repr_keys.stride(0);
  p.out = out.data_ptr<float>();
  p.units = s.units;
  p.hkv = int(s.num_kv_heads);
  p.head_dim = int(d);
  p.group = int(s.group);
  p.vec_per_head = int(d / 8);
  const int nvec = p.hkv * p.vec_per_head;
  int lpu = 32;
  if (nvec < 32) {
    lpu = 1;
    while (lpu < nvec) lpu <<= 1;
  }
  p.lanes_per_unit = lpu;
  p.per_kv_head = s.per_kv_head ? 1 : 0;

  // Enough CTAs to fill the GPU a few times over across the batch; each covers a run of units
  // (a multiple of what its warps cover in one pass) so the q prologue is amortised.
  const int64_t per_pass = int64_t(kScoreThreads / 32) * (32 / lpu);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, int64_t(4) * sms / std::max<int64_t>(1, s.batch));
  int64_t ctas = std::min<int64_t>((s.units + per_pass - 1) / per_pass, want);
  ctas = std::max<int64_t>(ctas, 1);
  int64_t per_cta = (s.units + ctas - 1) / ctas;
  per_cta = (per_cta + per_pass - 1) / per_pass * per_pass;
  ctas = (s.units + per_cta - 1) / per_cta;
  p.units_per_cta = per_cta;
  const size_t smem = size_t(p.hkv) * size_t(d) * sizeof(float);
  const dim3 grid(unsigned(ctas), unsigned(s.batch));
  auto stream = at::cuda::getCurrentCUDAStream();
  // The flat kernel wants units of a power of two >= 32 vectors (whole units per chunk, a warp's
  // vectors in one unit); others (e.g. Hkv 3) take the general one.
  const bool flat = nvec >= 32 && nvec <= kScoreFlatChunk && (nvec & (nvec - 1)) == 0;
  dispatch_half_types(repr_keys.scalar_type(), "infllm_unit_scores", [&](auto tag) {
    using T = decltype(tag);
    auto go = [&](auto kernel) {
      if (smem > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kernel<<<grid, kScoreThreads, smem, stream>>>(p);
    };
    if (q.scalar_type() == at::kFloat)
      flat ? go(infllm_unit_scores_flat_kernel<T, float>) : go(infllm_unit_scores_kernel<T, float>);
    else
      flat ? go(infllm_unit_scores_flat_kernel<T, T>) : go(infllm_unit_scores_kernel<T, T>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void topk_rows_cuda(const at::Tensor& scores, at::Tensor& values, at::Tensor& indices) {
  const TopkRowsShape s = check_topk_rows(scores, values, indices);
  TORCH_CHECK(scores.is_cuda(), "topk_rows (CUDA): scores must be a CUDA tensor");
  if (s.rows == 0) return;
  TORCH_CHECK(s.rows < (int64_t(1) << 31), "topk_rows (CUDA): rows must be < 2^31, got ", s.rows);
  const c10::cuda::CUDAGuard guard(scores.device());
  TopkRowsParams p{scores.data_ptr<float>(), scores.stride(0), s.rows, s.cols, int(s.k), values.data_ptr<float>(),
                   indices.data_ptr()};
  auto stream = at::cuda::getCurrentCUDAStream();
  // Programmatic dependent launch (common/pdl.h): the CTAs start while the kernel ahead (the unit
  // scores, in the InfLLM step) drains, and wait for it before reading the scores.
  const PdlLaunchConfig launch(dim3(unsigned(s.rows)), dim3(kTopkThreads), 0, stream);
  if (indices.scalar_type() == at::kInt)
    C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.cfg, topk_rows_kernel<int32_t>, p));
  else
    C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.cfg, topk_rows_kernel<int64_t>, p));
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcore, CUDA, m) {
  m.impl("infllm_unit_scores", &infllm_unit_scores_cuda);
  m.impl("topk_rows", &topk_rows_cuda);
}

}  // namespace kvcore
