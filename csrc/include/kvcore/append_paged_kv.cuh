// Scatter new K/V tokens into the paged caches: one 16-byte chunk per thread, consecutive threads
// on consecutive bytes of a token's [Hkv, D] row, so both sides are coalesced.
#pragma once

#include <stdint.h>

namespace kvcore {

struct AppendPagedKvParams {
  const void* k;  // [T, Hkv, D], inner two dims dense
  const void* v;
  int64_t k_token_stride, v_token_stride;  // elements
  void* k_cache;  // [pages, page_size, Hkv, D], inner three dims dense
  void* v_cache;
  int64_t k_page_stride, v_page_stride;    // elements
  const int64_t* slot_mapping;             // [T]; -1 (or out of range) skips the token
  int64_t num_tokens, num_slots;
  int page_size;
  int row_chunks;                          // 16-byte chunks in one token row: Hkv * D * elem / 16
};

template <typename T>
__global__ void append_paged_kv_kernel(const AppendPagedKvParams p) {
  constexpr int PER_CHUNK = 16 / sizeof(T);
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t token = idx / p.row_chunks;
  if (token >= p.num_tokens) return;
  const int chunk = int(idx % p.row_chunks);
  const int64_t slot = p.slot_mapping[token];
  if (slot < 0 || slot >= p.num_slots) return;  // padding, or a bad slot the wrapper did not check
  const int64_t page = slot / p.page_size, row = slot % p.page_size;
  const int64_t row_elems = int64_t(p.row_chunks) * PER_CHUNK;
  const int64_t col = int64_t(chunk) * PER_CHUNK;
  const uint4 kx = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.k) + token * p.k_token_stride + col);
  const uint4 vx = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.v) + token * p.v_token_stride + col);
  *reinterpret_cast<uint4*>(static_cast<T*>(p.k_cache) + page * p.k_page_stride + row * row_elems + col) = kx;
  *reinterpret_cast<uint4*>(static_cast<T*>(p.v_cache) + page * p.v_page_stride + row * row_elems + col) = vx;
}

}  // namespace kvcore
