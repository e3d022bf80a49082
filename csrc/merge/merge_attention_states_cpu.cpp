// CPU kernel of kvcore::merge_attention_states: combine two partial attention results over
// disjoint key sets, row by row (a row is one (n, h) pair: D output values and one lse).
//
//   m = max(lse_a, lse_b); w_a = exp(lse_a - m); w_b = exp(lse_b - m)
//   out = (w_a * out_a + w_b * out_b) / (w_a + w_b); lse = m + log(w_a + w_b)
// Both parts empty (lse = -inf) gives out = 0, lse = -inf; a NaN lse on either side gives a NaN
// row (out and lse). out/lse may alias out_a/lse_a (or the
// b inputs): every element is read before the element at the same place is written.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/checks.h"

namespace kvcore {
namespace {

template <typename scalar_t>
void merge_rows(const scalar_t* out_a, const float* lse_a, const scalar_t* out_b, const float* lse_b, scalar_t* out,
                float* lse, int64_t rows, int64_t head_dim) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, head_dim));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float la = lse_a[r], lb = lse_b[r];
      const float m = std::max(la, lb);
      const int64_t base = r * head_dim;
      if (std::isnan(la) || std::isnan(lb)) {  // NaN in, NaN out (std::max and the weights would hide it)
        for (int64_t d = 0; d < head_dim; ++d) out[base + d] = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
        lse[r] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      if (m == kNegInf) {  // no keys on either side
        for (int64_t d = 0; d < head_dim; ++d) out[base + d] = static_cast<scalar_t>(0.0f);
        lse[r] = kNegInf;
        continue;
      }
      const float wa = std::exp(la - m), wb = std::exp(lb - m);  // exp(-inf) = 0 for an empty side
      const float sum = wa + wb;
      const float ca = wa / sum, cb = wb / sum;
      for (int64_t d = 0; d < head_dim; ++d) {
        const float a = static_cast<float>(out_a[base + d]);
        const float b = static_cast<float>(out_b[base + d]);
        // An empty side's out may hold anything (even NaN); leave it out instead of multiplying by 0.
        float acc = 0.0f;
        if (wa > 0.0f) acc += ca * a;
        if (wb > 0.0f) acc += cb * b;
        out[base + d] = static_cast<scalar_t>(acc);
      }
      lse[r] = m + std::log(sum);
    }
  });
}

void merge_attention_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                                const at::Tensor& lse_b, at::Tensor& out, at::Tensor& lse) {
  const MergeShape s = check_merge(out_a, lse_a, out_b, lse_b, out, lse);
  const int64_t rows = s.rows * s.heads;
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_a.scalar_type(), "merge_attention_states_cpu", [&] {
    merge_rows<scalar_t>(out_a.const_data_ptr<scalar_t>(), lse_a.const_data_ptr<float>(),
                         out_b.const_data_ptr<scalar_t>(), lse_b.const_data_ptr<float>(),
                         out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<float>(), rows, s.head_dim);
  });
}

}  // namespace
}  // namespace kvcore

TORCH_LIBRARY_IMPL(kvcore, CPU, m) { m.impl("merge_attention_states", &kvcore::merge_attention_states_cpu); }
