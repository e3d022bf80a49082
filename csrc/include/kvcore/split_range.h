// How a split-KV decode cuts one (sequence, head) pair's keys into its splits. Shared by the
// launchers (host: the split plan) and the kernels (device: each CTA's range), and compiled
// without CUDA by tests/cpp/split_range_check.cpp. Framework-free, no CUDA headers.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define KVCORE_HOST_DEVICE __host__ __device__
#else
#define KVCORE_HOST_DEVICE
#endif

namespace kvcore {

// Keys per split when `kv_len` keys (the most a pair can have: from shapes only, so the choice
// is fixed under graph capture) are cut into `splits`: ceil(kv_len / splits) rounded up to whole
// tiles, at least one tile. The launchers' p.split_tokens.
KVCORE_HOST_DEVICE constexpr int64_t split_tokens_for(int64_t kv_len, int64_t splits, int64_t tile) {
  const int64_t per = (kv_len + splits - 1) / splits;
  const int64_t rounded = (per + tile - 1) / tile * tile;
  return rounded > tile ? rounded : tile;
}

// The automatic split count once split_tokens is known: as few splits as cover kv_len (at least
// one), so none of them is empty at full length.
KVCORE_HOST_DEVICE constexpr int64_t splits_to_cover(int64_t kv_len, int64_t split_tokens) {
  const int64_t n = (kv_len + split_tokens - 1) / split_tokens;
  return n > 1 ? n : 1;
}

// Keys each split of a pair takes when its attended range holds `keys` keys (seq_len, or the
// window's part of it): its range is [first + split * chunk, min(first + keys, that + chunk)).
// The kernel's grid has `num_splits` splits sized for kv_len (split_tokens each); a sequence
// shorter than kv_len (a block table wider than the batch needs, a ragged batch) would leave its
// last splits empty and give all its keys to the first few CTAs, so the chunk shrinks with the
// sequence: ceil(keys / num_splits) rounded up to the tile, at most split_tokens. At keys ==
// kv_len it is split_tokens itself (when num_splits is the caller's count or splits_to_cover's,
// and the tile is the one split_tokens_for was given), so a sequence that fills its block table
// is cut as before, bit for bit. A multiple of the tile, so every split starts where a tile of
// the old layout would (page groups and the TMA loader rely on it).
// (In 32-bit unsigned arithmetic, which cannot wrap here: keys < 2^31, num_splits <= 256 and
// tile <= 128. It runs at the start of every CTA, where a 64-bit division is a long call.)
KVCORE_HOST_DEVICE constexpr int split_chunk(int keys, int num_splits, int split_tokens, int tile) {
  const uint32_t n = keys > 0 ? uint32_t(keys) : 0u, s = uint32_t(num_splits), t = uint32_t(tile);
  const uint32_t rounded = ((n + s - 1) / s + t - 1) / t * t;
  const uint32_t chunk = rounded > t ? rounded : t;
  return chunk < uint32_t(split_tokens) ? int(chunk) : split_tokens;
}

}  // namespace kvcore
