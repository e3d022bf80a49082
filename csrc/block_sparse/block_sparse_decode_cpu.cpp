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
// num_splits > 0 forces the part count (capped at one part per kChunk keys of the longest list,
// which bounds the scratch memory); the merged result is the same attention either way, as on
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
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_attention.h"

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

template <typename scalar_t>
void block_sparse_decode_tasks(const BlockSparseParams& p, const scalar_t* q, const scalar_t* k_cache,
                               const scalar_t* v_cache, const int32_t* block_table, const int32_t* seq_lens,
                               const int32_t* sel_pages, const int32_t* sel_counts, scalar_t* out, float* lse) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t G = p.group, D = p.head_dim, H = p.num_kv_heads, Hq = H * G, PS = p.page_size;
  const int64_t row = H * D;  // elements per token slot in a page (dense)
  const int64_t capacity = p.num_pages > 0 ? p.max_pages * PS : 0;

  // Clamped lengths, the pages each sequence uses, and the virtual key range of each (b, h).
  std::vector<int64_t> len(p.batch), used_pages(p.batch), slots(p.batch * H);
  int64_t longest = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    len[b] = std::clamp<int64_t>(seq_lens[b], 0, capacity);
    used_pages[b] = (len[b] + PS - 1) / PS;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t count = len[b] > 0 ? std::clamp<int64_t>(sel_counts[b * H + h], 0, p.max_sel) : 0;
      slots[b * H + h] = count * PS;
      longest = std::max(longest, slots[b * H + h]);
    }
  }
  const int64_t pairs = p.batch * H;
  const int64_t threads = at::get_num_threads();
  int64_t parts;
  if (p.num_splits > 0) {
    parts = std::clamp<int64_t>(p.num_splits, 1, std::max<int64_t>(1, (longest + kChunk - 1) / kChunk));
  } else {
    parts = std::clamp<int64_t>((2 * threads + pairs - 1) / pairs, 1, std::max<int64_t>(1, longest / kMinPartTokens));
  }
  std::vector<float> part_out(pairs * parts * G * D), part_lse(pairs * parts * G);

  at::parallel_for(0, pairs * parts, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch, reused across the tasks of this range.
    std::vector<float> qf(G * D), acc(G * D), krow(D), vrow(D), logits(G * kChunk), m(G), l(G);
    const cpu::ChunkScratch scratch{krow.data(), vrow.data(), logits.data(), kChunk};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / parts, part = task % parts;
      const int64_t b = pair / H, h = pair % H;
      const int64_t span = (slots[pair] + parts - 1) / parts;
      const int64_t start = std::min(slots[pair], part * span), stop = std::min(slots[pair], start + span);
      const int32_t* pages = block_table + b * p.max_pages;
      const int32_t* chosen = sel_pages + pair * p.max_sel;

      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* qh = q + b * p.q_stride_b + (h * G + g) * p.q_stride_h;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(qh[d]);
        m[g] = kNegInf;
        l[g] = 0.0f;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);

      int64_t slot = start;
      while (slot < stop) {
        // Gather up to kChunk real keys: skip listed pages outside the sequence and the slots
        // past seq_len in its last page.
        int64_t k_off[kChunk], v_off[kChunk];
        int64_t n = 0;
        while (n < kChunk && slot < stop) {
          const int64_t logical = chosen[slot / PS];
          const int64_t offset = slot % PS;
          if (logical < 0 || logical >= used_pages[b]) {
            slot += PS - offset;  // the whole listed page is outside the sequence
            continue;
          }
          const int64_t pos = logical * PS + offset;
          if (pos >= len[b]) {
            slot += PS - offset;  // the rest of the (last) page is unfilled
            continue;
          }
          const int64_t page = std::clamp<int64_t>(pages[logical], 0, p.num_pages - 1);
          k_off[n] = page * p.k_page_stride + offset * row + h * D;
          v_off[n] = page * p.v_page_stride + offset * row + h * D;
          ++n;
          ++slot;
        }
        if (n == 0) continue;  // only possible when slot reached stop

        cpu::attend_chunk(n, k_cache, k_off, v_cache, v_off, D, G, G, D, qf.data(), p.scale, p.soft_cap, scratch,
                          m.data(), l.data(), acc.data());
      }

      // This part's normalised output and log-sum-exp (zeros and -inf when it saw no key). A NaN
      // l (a NaN logit) is not empty: it gives NaN out and NaN lse, which the merge passes on.
      float* po = part_out.data() + task * G * D;
      float* pl = part_lse.data() + task * G;
      for (int64_t g = 0; g < G; ++g) cpu::finish_part(acc.data() + g * D, m[g], l[g], D, po + g * D, pl + g);
    }
  });

  // Merge the parts of each (sequence, query head) in part order.
  at::parallel_for(0, p.batch * Hq, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(D);
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / Hq, hq = bq % Hq, h = hq / G, g = hq % G;
      const int64_t first = (b * H + h) * parts;  // task index of part 0
      cpu::merge_parts(
          parts, [&](int64_t j) { return part_lse[(first + j) * G + g]; },
          [&](int64_t j) { return part_out.data() + ((first + j) * G + g) * D; }, D, out + bq * D,
          lse != nullptr ? lse + bq : nullptr, scratch.data());
    }
  });
}

void block_sparse_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& sel_pages,
                             const at::Tensor& sel_counts, double scale, double logit_soft_cap, at::Tensor& out,
                             const c10::optional<at::Tensor>& lse, const c10::optional<at::Tensor>& workspace,
                             int64_t num_splits) {
  (void)workspace;
  const BlockSparseDecodeShape s =
      check_block_sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel_pages, sel_counts, out, lse);
  check_decode_scalars(scale, /*window_left=*/-1, logit_soft_cap, num_splits);
  if (s.paged.batch == 0 || s.paged.num_q_heads == 0 || s.paged.head_dim == 0) return;

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
    block_sparse_decode_tasks<scalar_t>(p, q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(),
                                        v_cache.const_data_ptr<scalar_t>(), block_table.const_data_ptr<int32_t>(),
                                        seq_lens.const_data_ptr<int32_t>(), sel_pages.const_data_ptr<int32_t>(),
                                        sel_counts.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(),
                                        lse_ptr);
  });
}

}  // namespace
}  // namespace kvcore

TORCH_LIBRARY_IMPL(kvcore, CPU, m) { m.impl("block_sparse_decode", &kvcore::block_sparse_decode_cpu); }
