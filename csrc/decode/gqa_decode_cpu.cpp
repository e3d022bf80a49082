// CPU kernel of kvcore::gqa_decode: one query token per sequence against a paged KV cache.
//
// One task per (sequence, part of its key range). A task walks its keys in chunks of kChunk
// tokens and reads each token's whole [Hkv, D] row, which is contiguous in the cache, so memory
// is read in address order: a task per (sequence, KV head) instead reads one head's D elements
// every Hkv * D, a new 4 KiB page per row at Hkv * D * size >= 4 KiB, and paid a TLB miss and
// a memory latency per row (measured 8-11 ms against 1.9 ms for plain torch on B1 Hq32 Hkv8
// D128 S2048 fp32, 2 cores). Each row is converted to fp32 once and used by every query head
// of its KV head; an online softmax per query head runs over the chunk's logits. Parts of one
// sequence (split so that short batches still use every thread) write a normalised partial
// output and its log-sum-exp, merged at the end in a fixed order (deterministic).
//
// Safety without validation: seq_len is clamped to [0, max_pages * page_size] and each page
// index to [0, num_pages), so bad index contents give wrong numbers, never an out-of-bounds read.
// `workspace` and `num_splits` only matter to the CUDA split-KV path and are ignored here.
//
// The kernels themselves are in decode/gqa_decode_cpu_kernels.h, compiled once per instruction
// set (baseline, AVX2, AVX-512: common/cpu_isa.h); the op below runs the copy that
// KVCORE_CPU_ISA picked.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace kvcore {
namespace {

constexpr int64_t kChunk = 32;           // keys per online-softmax step
constexpr int64_t kMinPartTokens = 256;  // a sequence is cut into parts no shorter than this

struct DecodeParams {
  int64_t batch, num_kv_heads, group, head_dim, num_pages, page_size, max_pages;
  int64_t q_stride_b, q_stride_h;    // q may be strided in dims 0/1 (elements)
  int64_t k_page_stride, v_page_stride;  // caches may be strided in dim 0 (elements)
  float scale, soft_cap;
  int64_t window_left;
};

}  // namespace
}  // namespace kvcore

#define KVCORE_CPU_KERNELS "decode/gqa_decode_cpu_kernels.h"
#include "common/cpu_isa_kernels.h"
#undef KVCORE_CPU_KERNELS

namespace kvcore {
namespace {

void gqa_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& block_table, const at::Tensor& seq_lens, double scale, int64_t window_left,
                    double logit_soft_cap, at::Tensor& out, const c10::optional<at::Tensor>& lse,
                    const c10::optional<at::Tensor>& workspace, int64_t num_splits,
                    const c10::optional<at::Tensor>& score, int64_t plan_total_keys, int64_t plan_max_keys) {
  (void)workspace;  // workspace, num_splits and the plan hint shape the CUDA grid only
  (void)num_splits;
  const PagedDecodeShape s = check_paged_decode(q, k_cache, v_cache, block_table, seq_lens, out, lse);
  check_decode_scalars(scale, window_left, logit_soft_cap, num_splits);
  check_plan_keys(plan_total_keys, plan_max_keys);
  if (score.has_value()) check_decode_score(*score, q, k_cache, v_cache, block_table, seq_lens, out, lse, s);
  if (s.batch == 0 || s.num_q_heads == 0) return;

  DecodeParams p{};
  p.batch = s.batch;
  p.num_kv_heads = s.num_kv_heads;
  p.group = s.group;
  p.head_dim = s.head_dim;
  p.num_pages = s.num_pages;
  p.page_size = s.page_size;
  p.max_pages = s.max_pages;
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_page_stride = k_cache.stride(0);
  p.v_page_stride = v_cache.stride(0);
  p.scale = static_cast<float>(scale);
  p.soft_cap = static_cast<float>(logit_soft_cap);
  p.window_left = window_left;

  float* lse_ptr = lse.has_value() ? lse->mutable_data_ptr<float>() : nullptr;
  // The score pass needs every head's lse even when the caller did not ask for it.
  std::vector<float> own_lse;
  if (score.has_value() && lse_ptr == nullptr) {
    own_lse.resize(s.batch * s.num_q_heads);
    lse_ptr = own_lse.data();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gqa_decode_cpu", [&] {
    const bool bf16_dot = cpu_bf16_dot();
    const auto decode = KVCORE_CPU_PICK(gqa_decode_tasks<scalar_t>);
    const auto scores = KVCORE_CPU_PICK(accumulate_scores<scalar_t>);
    decode(p, q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(), v_cache.const_data_ptr<scalar_t>(),
           block_table.const_data_ptr<int32_t>(), seq_lens.const_data_ptr<int32_t>(), bf16_dot,
           out.mutable_data_ptr<scalar_t>(), lse_ptr);
    if (score.has_value() && s.num_pages > 0)
      scores(p, q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(), block_table.const_data_ptr<int32_t>(),
             seq_lens.const_data_ptr<int32_t>(), bf16_dot, lse_ptr, score->mutable_data_ptr<float>(), score->size(2));
  });
}

}  // namespace
}  // namespace kvcore

TORCH_LIBRARY_IMPL(kvcore, CPU, m) { m.impl("gqa_decode", &kvcore::gqa_decode_cpu); }
