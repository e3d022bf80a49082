// CPU kernel of kvcore::append_paged_kv: scatter T new [Hkv, D] key/value rows into a paged cache.
//
// The op is a pure copy (k and the cache share one dtype, checked by check_append), so the
// kernel moves bytes: one implementation serves every dtype and no per-dtype code is compiled.
// Slots outside [0, num_pages * page_size) -- the -1 padding marker included -- are skipped, so
// even with validation off nothing outside the caches is ever written.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "common/checks.h"

namespace kvcore {
namespace {

void append_paged_kv_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                         const at::Tensor& slot_mapping) {
  const AppendShape s = check_append(k, v, k_cache, v_cache, slot_mapping);
  if (s.tokens == 0 || s.num_slots == 0) return;

  const int64_t elem = k.element_size();
  const int64_t page_size = k_cache.size(1);
  const int64_t row_elems = s.num_kv_heads * s.head_dim;  // one token's [Hkv, D] block, densely packed
  const size_t row_bytes = static_cast<size_t>(row_elems * elem);

  // Byte strides of the (possibly strided) outer dims: tokens of k/v and pages of the caches.
  const int64_t k_tok = k.stride(0) * elem, v_tok = v.stride(0) * elem;
  const int64_t kc_page = k_cache.stride(0) * elem, vc_page = v_cache.stride(0) * elem;
  const int64_t slot_bytes = row_elems * elem;  // rows within a page are dense (check_inner_dense(cache, 3))

  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  auto* kcp = static_cast<char*>(k_cache.data_ptr());
  auto* vcp = static_cast<char*>(v_cache.data_ptr());
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = s.num_slots;

  // A few tokens per task: each is a row_bytes copy (64 B .. tens of KB).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, 2 * slot_bytes));
  at::parallel_for(0, s.tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      if (slot < 0 || slot >= num_slots) continue;  // -1 (skip) or out of range: never write
      const int64_t page = slot / page_size, offset = slot % page_size;
      std::memcpy(kcp + page * kc_page + offset * slot_bytes, kp + t * k_tok, row_bytes);
      std::memcpy(vcp + page * vc_page + offset * slot_bytes, vp + t * v_tok, row_bytes);
    }
  });
}

}  // namespace
}  // namespace kvcore

TORCH_LIBRARY_IMPL(kvcore, CPU, m) { m.impl("append_paged_kv", &kvcore::append_paged_kv_cpu); }
