// Checks kvcore/split_range.h on the host (tests/test_host_checks.py compiles and runs it): for
// every plan the launchers can make (automatic and forced split counts, several tiles, table
// widths from empty to 2^20 keys) and every sequence length up to the table's width, the splits'
// ranges cover the sequence exactly once, each is whole tiles no longer than split_tokens and
// within a tile of an even share, and a sequence that fills the table is cut into split_tokens
// pieces as before. Prints the number of checked (plan, length) pairs; exits 1 on a failure.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "kvcore/split_range.h"

namespace {

int failures = 0;

void fail(const char* what, int64_t kv_len, int64_t splits, int64_t tile, int64_t keys, int64_t chunk) {
  if (++failures <= 20)
    std::printf("FAIL %s: kv_len=%lld splits=%lld tile=%lld keys=%lld chunk=%lld\n", what, (long long)kv_len,
                (long long)splits, (long long)tile, (long long)keys, (long long)chunk);
}

// One plan: split_tokens and the split count as paged_decode::plan_splits makes them.
int64_t check_plan(int64_t kv_len, int64_t asked, bool automatic, int64_t tile) {
  const int64_t split_tokens = kvcore::split_tokens_for(kv_len, asked, tile);
  const int64_t splits = automatic ? kvcore::splits_to_cover(kv_len, split_tokens) : asked;
  if (split_tokens % tile != 0 || split_tokens < tile) fail("split_tokens not whole tiles", kv_len, splits, tile, -1, split_tokens);
  if (splits * split_tokens < kv_len) fail("plan does not cover kv_len", kv_len, splits, tile, -1, split_tokens);
  // Lengths: every one up to 600, then a spread with both edges of each tile and split boundary.
  std::vector<int64_t> lengths;
  for (int64_t n = 0; n <= kv_len && n <= 600; ++n) lengths.push_back(n);
  for (int64_t n = 601; n <= kv_len; n += 1 + n / 7) lengths.push_back(n);
  for (int64_t k = 1; k <= splits; ++k)
    for (int64_t d = -1; d <= 1; ++d)
      if (k * split_tokens + d > 0 && k * split_tokens + d <= kv_len) lengths.push_back(k * split_tokens + d);
  lengths.push_back(kv_len);
  std::sort(lengths.begin(), lengths.end());
  int64_t checked = 0, previous_chunk = 0;
  for (int64_t keys : lengths) {
    const int chunk = kvcore::split_chunk(int(keys), int(splits), int(split_tokens), int(tile));
    const int64_t share = (keys + splits - 1) / splits;
    // The device form (32-bit) agrees with the host's 64-bit split_tokens_for.
    if (chunk != std::min<int64_t>(split_tokens, kvcore::split_tokens_for(keys, splits, tile)))
      fail("32-bit chunk differs from split_tokens_for", kv_len, splits, tile, keys, chunk);
    if (chunk % tile != 0 || chunk < tile || chunk > split_tokens) fail("chunk not whole tiles within split_tokens", kv_len, splits, tile, keys, chunk);
    // The ranges [s * chunk, min(keys, (s + 1) * chunk)) for s < splits tile [0, keys) in order.
    if (splits * int64_t(chunk) < keys) fail("splits do not cover the sequence", kv_len, splits, tile, keys, chunk);
    if (chunk >= share + tile && chunk > tile) fail("chunk more than a tile over an even share", kv_len, splits, tile, keys, chunk);
    if (keys == kv_len && chunk != split_tokens) fail("full length not cut as before", kv_len, splits, tile, keys, chunk);
    if (chunk < previous_chunk) fail("chunk shrinks as the sequence grows", kv_len, splits, tile, keys, chunk);
    previous_chunk = chunk;
    ++checked;
  }
  return checked;
}

}  // namespace

int main() {
  int64_t checked = 0;
  const int64_t kv_lens[] = {0, 1, 15, 16, 17, 63, 64, 65, 100, 127, 128, 129, 700, 1000, 2047, 2048, 4097,
                             8192, 20000, 32768, 40000, 131072, 1 << 20, (1 << 30) - 1};
  for (int64_t tile : {16, 32, 64, 128})
    for (int64_t kv_len : kv_lens) {
      for (int64_t asked = 1; asked <= 40; ++asked) checked += check_plan(kv_len, asked, true, tile);
      for (int64_t asked : {1, 2, 3, 7, 9, 33, 70, 128, 256}) checked += check_plan(kv_len, asked, false, tile);
    }
  std::printf("checked %lld (plan, length) pairs, %d failures\n", (long long)checked, failures);
  return failures == 0 ? 0 : 1;
}
