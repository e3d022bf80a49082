// CPU kernel of kvcore::compact_kv: in-place compaction of a paged KV cache after eviction.
//
// One task per (sequence b, KV head h). The task moves K and V of token kept[b, h, i] to
// position i, for i = 0, 1, ... in order. With strictly increasing kept positions,
// kept[b, h, i] >= i, so the read position of step i is never a position written by an earlier
// step (those are all < i): in-order copying in place is safe without a scratch buffer.
// Different heads touch disjoint [D] slices of the same token rows, so tasks never overlap.
// seq_lens[b] becomes kept_lens[b] once every task is done.
//
// Safety without validation: seq_len is clamped to [0, max_pages * page_size], kept_lens to
// [0, min(max_kept, seq_len)], every kept position to [0, seq_len) and every page id to
// [0, num_pages): unsorted or out-of-range contents give wrong data, never an out-of-bounds access.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/checks.h"

namespace kvcore {
namespace {

template <typename scalar_t>
void compact_tasks(const CompactShape& s, scalar_t* k_cache, scalar_t* v_cache, int64_t k_page_stride,
                   int64_t v_page_stride, const int32_t* block_table, int32_t* seq_lens, const int64_t* kept,
                   const int32_t* kept_lens) {
  const int64_t H = s.num_kv_heads, D = s.head_dim, row = H * D;
  const int64_t capacity = s.max_pages * s.page_size;
  auto new_len = [&](int64_t b, int64_t len) {
    return std::clamp<int64_t>(kept_lens[b], 0, std::min(s.max_kept, len));
  };
  at::parallel_for(0, s.batch * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const int64_t len = std::clamp<int64_t>(seq_lens[b], 0, capacity);
      const int64_t n = new_len(b, len);
      const int32_t* pages = block_table + b * s.max_pages;
      const int64_t* src_pos = kept + bh * s.max_kept;
      auto offset = [&](int64_t pos, int64_t page_stride) {
        const int64_t page = std::clamp<int64_t>(pages[pos / s.page_size], 0, s.num_pages - 1);
        return page * page_stride + (pos % s.page_size) * row + h * D;
      };
      for (int64_t i = 0; i < n; ++i) {
        const int64_t src = std::clamp<int64_t>(src_pos[i], 0, len - 1);
        if (src == i) continue;  // already in place (common: the kept prefix, e.g. sinks)
        // memmove: with bad (unsorted, duplicated) contents source and target may be the same row.
        std::memmove(k_cache + offset(i, k_page_stride), k_cache + offset(src, k_page_stride), D * sizeof(scalar_t));
        std::memmove(v_cache + offset(i, v_page_stride), v_cache + offset(src, v_page_stride), D * sizeof(scalar_t));
      }
    }
  });
  for (int64_t b = 0; b < s.batch; ++b)
    seq_lens[b] = static_cast<int32_t>(new_len(b, std::clamp<int64_t>(seq_lens[b], 0, capacity)));
}

void compact_kv_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& block_table, at::Tensor& seq_lens,
                    const at::Tensor& kept, const at::Tensor& kept_lens) {
  const CompactShape s = check_compact_kv(k_cache, v_cache, block_table, seq_lens, kept, kept_lens);
  if (s.batch == 0) return;
  if (s.num_pages == 0 || s.max_pages == 0 || s.num_kv_heads == 0 || s.head_dim == 0) {
    // Nothing can be moved; the lengths still follow the same clamped rule (0 with no pages).
    int32_t* lens = seq_lens.mutable_data_ptr<int32_t>();
    const int32_t* kl = kept_lens.const_data_ptr<int32_t>();
    const int64_t capacity = s.num_pages == 0 ? 0 : s.max_pages * s.page_size;
    for (int64_t b = 0; b < s.batch; ++b) {
      const int64_t len = std::clamp<int64_t>(lens[b], 0, capacity);
      lens[b] = static_cast<int32_t>(std::clamp<int64_t>(kl[b], 0, std::min(s.max_kept, len)));
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "compact_kv_cpu", [&] {
    compact_tasks<scalar_t>(s, k_cache.mutable_data_ptr<scalar_t>(), v_cache.mutable_data_ptr<scalar_t>(),
                            k_cache.stride(0), v_cache.stride(0), block_table.const_data_ptr<int32_t>(),
                            seq_lens.mutable_data_ptr<int32_t>(), kept.const_data_ptr<int64_t>(),
                            kept_lens.const_data_ptr<int32_t>());
  });
}

}  // namespace
}  // namespace kvcore

TORCH_LIBRARY_IMPL(kvcore, CPU, m) { m.impl("compact_kv", &kvcore::compact_kv_cpu); }
