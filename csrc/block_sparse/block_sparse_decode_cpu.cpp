// CPU kernel of kvcore::block_sparse_decode: one query token per sequence against the pages that
// each (sequence, KV head) selects from its paged KV cache.
//
// A (sequence, KV head) pair has its own page list, so a task is (sequence, KV head, part of the
// list): unlike gqa_decode_cpu, tasks cannot share a token row across KV heads. The selected
// pages are walked as one "virtual" key range of sel_count * page_size slots (slot i is offset
// i % page_size of the (i / page_size)-th listed page); a part is an equal share of that range,
// so the work splits evenly however large the pages are, and slots at or past seq_len (the
// unfilled end of the last page) are skipped. Keys are processed in chunks of kChunk: the logits
// of every query head of the group, an online-softmax update per head, then P V. Each part
// writes a normalised partial output and its log-sum-exp; the parts of a (sequence, query head)
// are merged at the end in part order (deterministic for a given part count).
//
// num_splits > 0 forces the part count (capped at one part per kChunk keys of the longest list
// and at kMaxKvSplits, which bound the scratch memory); the merged result is the same attention either way, as on
// CUDA, up to rounding. 0 picks it from the thread count. `workspace` is CUDA scratch, unused here.
//
// Safety without validation: seq_len is clamped to [0, max_pages * page_size], sel_count to
// [0, max_sel], a listed page outside [0, ceil(seq_len / page_size)) contributes nothing, and each
// physical page from the block table is clamped to [0, num_pages). Bad index contents therefore
// give wrong numbers, never an out-of-bounds access. Duplicated pages are counted twice.
//
// NaN (as gqa_decode_cpu): a NaN in q or in a selected K row makes that (sequence, query head)'s
// out and lse NaN in every part it reaches and in the merge; a NaN V element only its element.
// Cache rows that a pair does not select (or that lie past seq_len) are never read.
//
// The kernels themselves are in block_sparse/block_sparse_decode_cpu_kernels.h, compiled once
// per instruction set (baseline, AVX2, AVX-512: common/cpu_isa.h); the op below runs the copy KVCORE_CPU_ISA picked.
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
#include "common/split_limits.h"

namespace kvcore {
namespace {

constexpr int64_t kChunk = 32;           // keys per online-softmax step
constexpr int64_t kMinPartTokens = 256;  // automatic parts cover at least this many key slots

struct BlockSparseParams {
  int64_t batch, num_kv_heads, group, head_dim, num_pages, page_size, max_pages, max_sel;
  int64_t q_stride_b, q_stride_h;        // q may be strided in dims 0/1 (elements)
  int64_t k_page_stride, v_page_stride;  // caches may be strided in dim 0 (elements)
  float scale, soft_cap;
  int64_t num_splits;
};

}  // namespace
}  // namespace kvcore

#define KVCORE_CPU_KERNELS "block_sparse/block_sparse_decode_cpu_kernels.h"
#include "common/cpu_isa_kernels.h"
#undef KVCORE_CPU_KERNELS

namespace kvcore {
namespace {

void block_sparse_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& sel_pages,
                             const at::Tensor& sel_counts, double scale, double logit_soft_cap, at::Tensor& out,
                             const c10::optional<at::Tensor>& lse, const c10::optional<at::Tensor>& workspace,
                             int64_t num_splits) {
  (void)workspace;
  const BlockSparseDecodeShape s =
      check_block_sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel_pages, sel_counts, out, lse);
  check_decode_scalars(scale, /*window_left=*/-1, logit_soft_cap, num_splits);
  if (s.paged.batch == 0 || s.paged.num_q_heads == 0) return;

  BlockSparseParams p{};
  p.batch = s.paged.batch;
  p.num_kv_heads = s.paged.num_kv_heads;
  p.group = s.paged.group;
  p.head_dim = s.paged.head_dim;
  p.num_pages = s.paged.num_pages;
  p.page_size = s.paged.page_size;
  p.max_pages = s.paged.max_pages;
  p.max_sel = s.max_sel;
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_page_stride = k_cache.stride(0);
  p.v_page_stride = v_cache.stride(0);
  p.scale = static_cast<float>(scale);
  p.soft_cap = static_cast<float>(logit_soft_cap);
  p.num_splits = num_splits;

  float* lse_ptr = lse.has_value() ? lse->mutable_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "block_sparse_decode_cpu", [&] {
    const auto decode = KVCORE_CPU_PICK(block_sparse_decode_tasks<scalar_t>);
    decode(p, q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(), v_cache.const_data_ptr<scalar_t>(),
           block_table.const_data_ptr<int32_t>(), seq_lens.const_data_ptr<int32_t>(),
           sel_pages.const_data_ptr<int32_t>(), sel_counts.const_data_ptr<int32_t>(),
           cpu_bf16_dot(), out.mutable_data_ptr<scalar_t>(), lse_ptr);
  });
}

}  // namespace
}  // namespace kvcore

TORCH_LIBRARY_IMPL(kvcore, CPU, m) { m.impl("block_sparse_decode", &kvcore::block_sparse_decode_cpu); }
