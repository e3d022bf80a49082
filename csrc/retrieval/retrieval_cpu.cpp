// CPU kernels of the retrieval ops: infllm_unit_scores (group-summed query dotted with every
// representative key, fp32) and topk_rows (k largest (score, column) keys per row, best first).
// They define the same results as the CUDA kernels in csrc/include/kvcore/retrieval.cuh: the
// top-k is bit-identical (one total order, kvcore/topk_key.h), the scores equal up to fp32
// summation order. The unit scores' loop is in retrieval/retrieval_cpu_kernels.h, compiled once
// per instruction set (baseline, AVX2, AVX-512: common/cpu_isa.h); the op runs the copy KVCORE_CPU_ISA picked.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/cpu_isa.h"
#include "retrieval/retrieval_checks.h"

#define KVCORE_CPU_KERNELS "retrieval/retrieval_cpu_kernels.h"
#include "common/cpu_isa_kernels.h"
#undef KVCORE_CPU_KERNELS

namespace kvcore {
namespace {

void infllm_unit_scores_cpu(const at::Tensor& q, const at::Tensor& repr_keys, at::Tensor& out) {
  const UnitScoresShape s = check_unit_scores(q, repr_keys, out);
  if (out.numel() == 0) return;
  float* o = out.mutable_data_ptr<float>();
  if (s.head_dim == 0) {  // empty dot products
    out.zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, repr_keys.scalar_type(), "infllm_unit_scores_cpu", [&] {
    const scalar_t* k = repr_keys.const_data_ptr<scalar_t>();
    if (q.scalar_type() == repr_keys.scalar_type()) {
      const auto unit_scores_rows = KVCORE_CPU_PICK(unit_scores_rows<scalar_t, scalar_t>);
      unit_scores_rows(q.const_data_ptr<scalar_t>(), q.stride(0), q.stride(1), k, repr_keys.stride(0), s, o);
    } else {
      const auto unit_scores_rows = KVCORE_CPU_PICK(unit_scores_rows<scalar_t, float>);
      unit_scores_rows(q.const_data_ptr<float>(), q.stride(0), q.stride(1), k, repr_keys.stride(0), s, o);
    }
  });
}

template <typename index_t>
void topk_rows_impl(const float* scores, int64_t row_stride, const TopkRowsShape& s, float* values, index_t* indices) {
  at::parallel_for(0, s.rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<uint64_t> keys(size_t(s.cols));
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = scores + r * row_stride;
      for (int64_t c = 0; c < s.cols; ++c) keys[size_t(c)] = topk_key(row[c], uint32_t(c));
      const int64_t kk = std::min(s.k, s.cols);
      std::partial_sort(keys.begin(), keys.begin() + kk, keys.end(), std::greater<uint64_t>());
      for (int64_t j = 0; j < s.k; ++j) {
        if (j < kk) {
          const uint32_t c = topk_key_column(keys[size_t(j)]);
          values[r * s.k + j] = row[c];
          indices[r * s.k + j] = static_cast<index_t>(c);
        } else {
          values[r * s.k + j] = -std::numeric_limits<float>::infinity();
          indices[r * s.k + j] = static_cast<index_t>(-1);
        }
      }
    }
  });
}

void topk_rows_cpu(const at::Tensor& scores, at::Tensor& values, at::Tensor& indices) {
  const TopkRowsShape s = check_topk_rows(scores, values, indices);
  if (s.rows == 0) return;
  const float* sc = scores.const_data_ptr<float>();
  if (indices.scalar_type() == at::kInt)
    topk_rows_impl<int32_t>(sc, scores.stride(0), s, values.mutable_data_ptr<float>(), indices.mutable_data_ptr<int32_t>());
  else
    topk_rows_impl<int64_t>(sc, scores.stride(0), s, values.mutable_data_ptr<float>(), indices.mutable_data_ptr<int64_t>());
}

}  // namespace
}  // namespace kvcore

TORCH_LIBRARY_IMPL(kvcore, CPU, m) {
  m.impl("infllm_unit_scores", &kvcore::infllm_unit_scores_cpu);
  m.impl("topk_rows", &kvcore::topk_rows_cpu);
}
