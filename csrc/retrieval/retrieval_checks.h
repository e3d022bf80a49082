// Host-side shape/dtype/device checks of the retrieval ops (infllm_unit_scores, topk_rows),
// shared by the CPU and CUDA launchers so both reject bad input with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "kvcore/topk_key.h"

namespace kvcore {

struct UnitScoresShape {
  int64_t batch, num_q_heads, num_kv_heads, head_dim, group, units;
  bool per_kv_head;
};

inline UnitScoresShape check_unit_scores(const at::Tensor& q, const at::Tensor& repr_keys, const at::Tensor& out) {
  check_rank(q, 3, "q", "[batch, num_q_heads, head_dim]");
  check_rank(repr_keys, 4, "repr_keys", "[batch, units, num_kv_heads, head_dim]");
  TORCH_CHECK(out.dim() == 2 || out.dim() == 3, "out must be 2-D [batch, units] (scores summed over KV heads) or ",
              "3-D [batch, num_kv_heads, units] (per KV head), got shape ", out.sizes());
  check_same_device(repr_keys, q, "repr_keys", "q");
  check_same_device(out, q, "out", "q");
  check_float_dtype(repr_keys, "repr_keys");
  TORCH_CHECK(q.scalar_type() == repr_keys.scalar_type() || q.scalar_type() == at::kFloat,
              "q must have repr_keys' dtype (", repr_keys.scalar_type(), ") or float32, got ", q.scalar_type());
  check_dtype(out, at::kFloat, "out");
  check_contiguous(out, "out");
  check_inner_dense(repr_keys, 3, "repr_keys");
  TORCH_CHECK(q.stride(2) == 1 || q.size(2) <= 1, "q's last dim must be contiguous, got strides ", q.strides());

  UnitScoresShape s{};
  s.batch = q.size(0);
  s.num_q_heads = q.size(1);
  s.head_dim = q.size(2);
  s.units = repr_keys.size(1);
  s.num_kv_heads = repr_keys.size(2);
  TORCH_CHECK(repr_keys.size(0) == s.batch, "repr_keys must have q's batch (", s.batch, "), got shape ",
              repr_keys.sizes());
  TORCH_CHECK(repr_keys.size(3) == s.head_dim, "repr_keys' head_dim must equal q's (", s.head_dim, "), got shape ",
              repr_keys.sizes());
  TORCH_CHECK(s.num_kv_heads > 0 && s.num_q_heads % s.num_kv_heads == 0, "q's num_q_heads (", s.num_q_heads,
              ") must be a positive multiple of repr_keys' num_kv_heads (", s.num_kv_heads, ")");
  s.group = s.num_q_heads / s.num_kv_heads;
  s.per_kv_head = out.dim() == 3;
  if (s.per_kv_head) {
    TORCH_CHECK(out.size(0) == s.batch && out.size(1) == s.num_kv_heads && out.size(2) == s.units,
                "out must be [batch, num_kv_heads, units] = [", s.batch, ", ", s.num_kv_heads, ", ", s.units,
                "], got shape ", out.sizes());
  } else {
    TORCH_CHECK(out.size(0) == s.batch && out.size(1) == s.units, "out must be [batch, units] = [", s.batch, ", ",
                s.units, "], got shape ", out.sizes());
  }
  check_writes_apart({named(out, "out")}, {named(q, "q"), named(repr_keys, "repr_keys")});
  return s;
}

struct TopkRowsShape {
  int64_t rows, cols, k;
};

inline TopkRowsShape check_topk_rows(const at::Tensor& scores, const at::Tensor& values, const at::Tensor& indices) {
  check_rank(scores, 2, "scores", "[rows, units]");
  check_rank(values, 2, "values", "[rows, k]");
  check_rank(indices, 2, "indices", "[rows, k]");
  check_same_device(values, scores, "values", "scores");
  check_same_device(indices, scores, "indices", "scores");
  check_dtype(scores, at::kFloat, "scores");
  check_dtype(values, at::kFloat, "values");
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
              "indices must have dtype int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK(scores.stride(1) == 1 || scores.size(1) <= 1, "scores' last dim must be contiguous, got strides ",
              scores.strides());
  check_contiguous(values, "values");
  check_contiguous(indices, "indices");
  TopkRowsShape s{scores.size(0), scores.size(1), values.size(1)};
  TORCH_CHECK(s.k >= 1 && s.k <= kTopkMaxK, "values' k = values.size(1) must be in [1, ", kTopkMaxK, "], got ", s.k);
  TORCH_CHECK(values.size(0) == s.rows, "values must be [rows, k] with scores' rows (", s.rows, "), got shape ",
              values.sizes());
  TORCH_CHECK(indices.size(0) == s.rows && indices.size(1) == s.k, "indices must be [rows, k] = [", s.rows, ", ", s.k,
              "] like values, got shape ", indices.sizes());
  TORCH_CHECK(s.cols < (int64_t(1) << 31), "scores must have fewer than 2^31 columns, got ", s.cols);
  check_writes_apart({named(values, "values"), named(indices, "indices")}, {named(scores, "scores")});
  return s;
}

}  // namespace kvcore
