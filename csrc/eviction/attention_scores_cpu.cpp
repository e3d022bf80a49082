// CPU kernel of kvcore::attention_scores: per-key eviction scores from a window of queries.
//
// Work is cut into tasks (sequence b, KV head h, part of the key range). Each task holds the
// G * w query rows of its KV group in fp32 and walks its keys in chunks of kChunk, so at most a
// [G * w, kChunk] block of logits exists at a time (never the [w, S] matrix).
//
//   pass 1 (only when the caller gives no lse): per task, an online max / sum of exp of every
//     row over the task's keys; the parts of one (b, h) are merged in part order into each
//     row's log-sum-exp (deterministic at a fixed thread count). Both steps are
//     cpu_attention.h's, so a NaN logit gives the row a NaN lse (tests/test_nan.py).
//   pass 2: per task, logits again, p = exp(logit - lse_row) where the key is visible to the
//     row (causal inside the window), reduced over the rows into out[b, h, key].
//   pooling: per (b, h), in place over the prefix keys, keeping the few original values the
//     sliding window still needs in a small ring (no copy of the row).
//
// Safety without validation: seq_len is clamped to [0, min(max_pages * page_size, S)] and page
// ids to [0, num_pages), so bad index contents give wrong numbers, never an out-of-bounds access.
//
// The kernels themselves are in eviction/attention_scores_cpu_kernels.h, compiled once per
// instruction set (baseline, AVX2, AVX-512: common/cpu_isa.h); the op below runs the copy that
// KVCORE_CPU_ISA picked.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace kvcore {
namespace {

constexpr int64_t kChunk = 32;           // keys per logits block
constexpr int64_t kMinPartTokens = 512;  // a (b, h) key range is cut into parts no shorter than this
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct ScoreParams {
  int64_t batch, window, num_kv_heads, group, head_dim, num_pages, page_size, max_pages, max_len;
  int64_t q_stride_b, q_stride_w, q_stride_h;
  int64_t k_page_stride;
  float scale;
  AttentionScoresOptions opt;
};

}  // namespace
}  // namespace kvcore

#define KVCORE_CPU_KERNELS "eviction/attention_scores_cpu_kernels.h"
#include "common/cpu_isa_kernels.h"
#undef KVCORE_CPU_KERNELS

namespace kvcore {
namespace {

void attention_scores_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& block_table,
                          const at::Tensor& seq_lens, const c10::optional<at::Tensor>& lse, double scale,
                          c10::string_view reduction, c10::string_view pooling, int64_t pool_kernel, at::Tensor& out) {
  const AttentionScoresShape s = check_attention_scores(q, k_cache, block_table, seq_lens, lse, out);
  const AttentionScoresOptions opt =
      check_attention_scores_scalars(scale, std::string(reduction), std::string(pooling), pool_kernel);
  if (s.batch == 0 || s.num_kv_heads == 0 || s.max_len == 0) return;
  // An empty cache (no pages) gives every sequence length 0 below: all scores 0, no key read.

  ScoreParams p{};
  p.batch = s.batch;
  p.window = s.window;
  p.num_kv_heads = s.num_kv_heads;
  p.group = s.group;
  p.head_dim = s.head_dim;
  p.num_pages = s.num_pages;
  p.page_size = s.page_size;
  p.max_pages = s.max_pages;
  p.max_len = s.max_len;
  p.q_stride_b = q.stride(0);
  p.q_stride_w = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.k_page_stride = k_cache.stride(0);
  p.scale = static_cast<float>(scale);
  p.opt = opt;
  const float* lse_ptr = lse.has_value() ? lse->const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_scores_cpu", [&] {
    const auto scores = KVCORE_CPU_PICK(attention_scores_tasks<scalar_t>);
    scores(p, q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(), block_table.const_data_ptr<int32_t>(),
           seq_lens.const_data_ptr<int32_t>(), lse_ptr, cpu_bf16_dot(), out.mutable_data_ptr<float>());
  });
}

}  // namespace
}  // namespace kvcore

TORCH_LIBRARY_IMPL(kvcore, CPU, m) { m.impl("attention_scores", &kvcore::attention_scores_cpu); }
