// The automatic split count of the paged decode launchers (gqa_decode, block_sparse_decode,
// mla_decode): how many CTAs share a (sequence, KV head) pair's keys. Host only,
// framework-free, no CUDA headers: tests/cpp/split_plan_check.cpp compiles it without CUDA.
#pragma once

#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

namespace kvcore {
namespace paged_decode {

// A forced num_splits above this is taken as this many (common/split_limits.h's kMaxKvSplits).
constexpr int kMaxSplits = 256;
// A split shorter than this spends more on its prologue and on the merge than it saves.
constexpr int kMinSplitTokens = 256;

// The most splits a pair of `keys` keys takes: one per kMinSplitTokens (at least one), at most kMaxSplits.
inline int64_t max_splits_for(int64_t keys) {
  return std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, keys / kMinSplitTokens));
}

// The share of the CTA slots of `waves` full waves that `ctas` CTAs use (waves: as few as hold them).
inline double wave_fill(int64_t ctas, int64_t slots) {
  const int64_t waves = (ctas + slots - 1) / slots;
  return double(ctas) / double(waves * slots);
}

// Split count from shapes alone (no look at seq_lens, so no host sync and the choice is fixed
// for a captured graph): fill the GPU's CTA slots in as few, as full waves as possible.
// max_ctas > 0 caps the grid (pairs x splits) where pairs alone fit under it: one wave for the
// fused H2O score epilogue, whose CTAs wait for the other splits of their pair.
// merge_batch > 0: the split merge loads that many splits' partials per round trip, so a count
// past a multiple of it costs the merging CTA one more round trip at the very end of the kernel;
// such a count must gain more fill (kBatchFillGain) than a plain step. Session 18/19 (H200, B1
// Hq32 Hkv8 S131072): 33 splits (264 CTAs, every slot) 129.2-129.3 us, 32 (256 CTAs) 127.2-127.5.
constexpr double kStepFillGain = 0.02;
constexpr double kBatchFillGain = 0.05;
inline int choose_splits(int64_t pairs, int64_t kv_len, int slots, int64_t max_ctas = 0, int merge_batch = 0) {
  int64_t most = max_splits_for(kv_len);
  if (max_ctas > 0) most = std::max<int64_t>(1, std::min<int64_t>(most, max_ctas / std::max<int64_t>(pairs, 1)));
  auto batches = [&](int64_t s) { return merge_batch > 0 ? (s + merge_batch - 1) / merge_batch : 1; };
  int best = 1;
  double best_fill = 0.0;
  for (int64_t s = 1; s <= most; ++s) {
    const int64_t ctas = pairs * s;
    const double fill = wave_fill(ctas, slots);
    // more splits only for a real gain in SM fill
    if (fill > best_fill + (batches(s) > batches(best) ? kBatchFillGain : kStepFillGain)) {
      best = int(s);
      best_fill = fill;
    }
    if (ctas >= 4 * int64_t(slots)) break;  // plenty of waves: the tail no longer matters
  }
  return best;
}

// What the caller knows of the batch's lengths on the host (gqa_decode's plan_total_keys /
// plan_max_keys), for an automatic split count: `fill` = the keys attended over the batch /
// (batch x max_keys), `max_keys` = the longest pair's keys (<= kv_len). Inactive (max_keys 0):
// the split plan from shapes alone, as if every pair had kv_len keys. `equal_keys` also lets
// gqa_decode pick its kernel (page_major_fills_one_wave). The kernels still cut each sequence
// from its own seq_len on the device, so any hint gives correct results; a wrong one only a
// worse plan.
struct SplitHint {
  double fill = 1.0;
  int64_t max_keys = 0;
  // > 0: the caller's lengths are equal, every pair attending this many keys (set also where the
  // hint is otherwise inactive: equal lengths that fill the table). Only the kernel choice reads
  // it (page_major_fills_one_wave), never the split count.
  int64_t equal_keys = 0;
  bool active() const { return max_keys > 0; }
};

// The hint for a batch of `batch` sequences whose attended keys sum to `total_keys` with the
// longest `max_keys` (both from the caller, 0 when not given), under shapes that allow kv_len
// keys a pair. Inactive when not given or when it says what the shapes say (every pair full),
// so such a call plans exactly as one without it.
inline SplitHint split_hint(int64_t batch, int64_t kv_len, int64_t total_keys, int64_t max_keys) {
  if (max_keys <= 0 || batch <= 0 || kv_len <= 0) return {};
  const int64_t most = std::min(max_keys, kv_len);
  const int64_t total = std::min(std::max<int64_t>(total_keys, 0), batch * most);
  // Equal as the caller gave them: every sequence max_keys long (before clamping, so an
  // overstated total is not taken for equal lengths).
  const bool as_given = max_keys <= std::numeric_limits<int64_t>::max() / batch && total_keys == batch * max_keys;
  const int64_t equal = as_given ? most : 0;
  if (most == kv_len && total == batch * kv_len) return {1.0, 0, equal};
  return {double(total) / double(batch * most), most, equal};
}

// Whether an automatic gqa_decode of equal lengths (hint.equal_keys > 0) runs the page-major
// kernel (gqa_decode_page_major.cuh) with a given number of KV heads a CTA rather than a CTA per
// KV head: where its `blocks` CTAs (sequences x KV heads / heads a CTA), unsplit, fill the `sms`
// SMs once nearly whole, one CTA an SM, it reads each page's rows of all its heads as one run and
// needs no split merge, while the head kernel runs ~2-4 waves of 4-warp CTAs. gqa_decode asks at
// 8 heads a CTA, then at 4. Measured there: 8 heads at B128 Hq32 Hkv8 S2048 (128 of 132 SMs):
// H100 354.1 us against 359.0 (session 26), H200 245.5 against 250.7 (session 22), and in cache
// order 340.7 against 345.2-346.8 (H100, session 36, decode_trace); 4 heads at B64 S4096 (128
// CTAs) in cache order 340.9 against 344.5 (the same). With fewer blocks it needs splits and lost
// (8 heads: B64 360.0 / 359.3, B32 Hq64 363.2 / 359.8, B16 185.9 / 183.2 on the H100), and with
// unequal lengths its longest sequence on one CTA lost far more (B128 one long among short ones
// 165 / 72 us), hence equal lengths only.
constexpr double kPageMajorMinFill = 0.9;
inline bool page_major_fills_one_wave(int64_t blocks, const SplitHint& hint, int sms) {
  return hint.equal_keys > 0 && blocks <= sms && double(blocks) >= kPageMajorMinFill * double(sms);
}

// The pairs and keys a pair the plan sizes the grid for: with a hint, as many full-length pairs of
// max_keys as hold the batch's keys (at least one).
inline std::pair<int64_t, int64_t> planned_pairs(int64_t pairs, int64_t kv_len, const SplitHint& hint) {
  if (!hint.active()) return {pairs, kv_len};
  return {std::max<int64_t>(1, std::llround(double(pairs) * hint.fill)), hint.max_keys};
}

// The automatic split count with a hint. The real grid is pairs x splits, all launched (a short
// sequence's splits just take fewer keys), so it stays within four waves of CTA slots, past which
// each CTA's fixed cost outweighs the balance, and within max_ctas (the fused score epilogue's
// one wave). Below that:
// - unequal lengths over many pairs (at least a quarter pair a slot): the four waves themselves.
//   The planned pairs' wave fill says nothing there: CTAs of unequal work, many of them, are
//   what lets the hardware hand the SMs that finish first the next ones;
// - otherwise (few pairs, or equal lengths shorter than the table): choose_splits for the planned
//   pairs, as many full-length pairs of max_keys as hold the batch's keys.
// At most one split per kMinSplitTokens of the longest sequence either way. H100, forced counts
// (bench/results/h100-2026-12-05-s27/call3/ragged.log; 264 slots of the 4-warp kernel), us:
// B16 Hq32 Hkv8 in an 8192-token table (four waves: 8 splits), one sequence full and 15 of 1024:
// automatic from shapes (1) 104, 4 splits 63, 8 49; uniform lengths: 1 112, 4 101, 8 98; B64 in
// a 4096-token table (2 splits): the decode bench's ragged lengths 1 178, 2 166, 4 166, 8 177;
// uniform 1 195, 2 188, 4 185; one full and 63 of 512: 1 97, 2 77, 4 71; B128 S2048 (1 split):
// uniform 1 202, 2 207; one full and 127 of 256: 1 72, 2 70, 4 88.
inline int choose_splits_hinted(int64_t pairs, int64_t kv_len, const SplitHint& hint, int slots, int64_t max_ctas,
                                int merge_batch) {
  const auto [planned, keys] = planned_pairs(pairs, kv_len, hint);
  const int64_t real = std::max<int64_t>(pairs, 1);
  int64_t cap = std::max<int64_t>(1, 4 * int64_t(slots) / real);
  if (max_ctas > 0) cap = std::min(cap, std::max<int64_t>(1, max_ctas / real));
  cap = std::min(cap, max_splits_for(keys));
  if (hint.fill < 1.0 && 4 * real >= slots) return int(cap);
  return int(std::min<int64_t>(choose_splits(planned, keys, slots, 0, merge_batch), cap));
}

// The automatic split count of a compute-bound kernel with a hint (mla_decode's 32- and 64-head
// kernels: each split reads its block's queries and writes fp32 partials, and a split's loop is
// bound by its math, so choose_splits_hinted's four waves over-split them): the shapes' count,
// doubled where one long sequence dominates the batch (the longest at least 1 / kDominantFill
// times the mean) and the doubled grid still fits two waves of slots: the long sequence's CTAs
// are then the kernel's critical path, and twice as many share its keys. H100, session 29
// (bench/results/h100-2026-12-05-s29/call1/ragged.log; us, shapes' count / doubled): one sequence
// full and the rest at 1/8 of the table, B64 H32 S4096 108.4 / 63.6, B32 H128 S4096 79.7 / 66.6,
// B16 H128 S16384 141.6 / 108.5; B128 H128 S1024 (its 256 CTAs already two waves) 47.7, doubled
// 76.3, so not taken. Uniform lengths (mean about half the longest) lose with more splits (B32
// H128 79.3 against 83.4 doubled), and equal lengths take the shapes' count. Measured only from
// shapes' counts of 2 and 4, so larger ones (small batches, where the last CTA of the 32-head
// kernel would merge every split alone) are not doubled until timed.
// A hinted count is also at most one split per kMinSplitTokens of the longest sequence, as in
// choose_splits_hinted, from short_cap_min_pairs pairs on (below): where every sequence is short
// in a wide table the shapes' splits are mostly empty CTAs and a merge. H100, session 30
// (bench/results/h100-2026-12-05-s30/call1/ragged.log; every sequence 256 keys in a 4096-token
// table; us, shapes' 2 splits / one): B32 H128 30.9 / 23.0, B64 H32 29.4 / 23.8: 64 pairs on 132
// slots. The doubling never passes that count either, cap or not.
// The 64-head kernels pass kWideShortCapMinPairs: one CTA of theirs takes long over each tile of
// 64 heads, so at a few pairs the shapes' many short splits (merged by the separate merge kernel)
// beat one split that takes every tile in turn. Session 31 (bench/results/h100-2026-12-05-s31/
// call2/mla-short.log; the same lengths; us, the shapes' count / forced to one / best forced
// count), 64-head kernel at H128 (two pairs a sequence): B1 17.7 / 21.5 / 17.5 (8 splits); B2
// 18.3 / 21.3 / 18.3 (16); B4 (8 pairs) 21.0 / 21.5 / 18.9 (8), a tie between the first two;
// B8 (16 pairs) 22.2 / 20.8 / one; B16 31.1 / 21.7 / one. The 32-head kernel is fastest at one
// split at every batch: B1 32.7 / 23.7, B4 33.4 / 23.7, B8 33.0 / 22.8, B32 28.4 / 23.1 (the
// best of 1, 2, 4, 8 and 16 splits in each).
constexpr double kDominantFill = 0.25;
constexpr int kDominantMaxBase = 4;
constexpr int64_t kWideShortCapMinPairs = 16;
inline int choose_splits_dominant(int64_t pairs, int64_t kv_len, const SplitHint& hint, int slots, int64_t max_ctas,
                                  int merge_batch, int64_t short_cap_min_pairs = 0) {
  const int shapes = choose_splits(pairs, kv_len, slots, max_ctas, merge_batch);
  if (!hint.active()) return shapes;
  const bool capped = pairs >= short_cap_min_pairs;
  const int base = capped ? int(std::min<int64_t>(shapes, max_splits_for(hint.max_keys))) : shapes;
  if (hint.fill > kDominantFill || base > kDominantMaxBase) return base;
  const int64_t doubled = 2 * int64_t(base);
  const int64_t ctas = std::max<int64_t>(pairs, 1) * doubled;
  if (ctas > 2 * int64_t(slots) || (max_ctas > 0 && ctas > max_ctas) || doubled > max_splits_for(hint.max_keys))
    return base;
  return int(doubled);
}

}  // namespace paged_decode
}  // namespace kvcore
