// Checks kvcore/split_plan.h on the host (tests/test_host_checks.py compiles and runs it): the
// automatic split count with a host-side length hint (gqa_decode's plan_seq_lens).
// - A hint that says what the shapes say (every sequence fills the table) is inactive, so the
//   plan is exactly the one without it, over a grid of batches, head counts, widths and slots.
// - Equal lengths are named as such (SplitHint::equal_keys), and only they, with 90-100% of one
//   wave of unsplit 8-head blocks, take the page-major kernel, and such a grid plans one split.
// - Any hint keeps the count in [1, kMaxSplits], the real grid within four waves (or one CTA a
//   pair) and within max_ctas where that is given (the fused H2O epilogue's one wave).
// - The picks on the rows sessions 26 and 27 timed with forced counts on an H100 (132 SMs, two
//   4-warp CTAs each: 264 slots, merge batch 32): the measured best or within 3% of it (two rows
//   noted otherwise).
// - The compute-bound rule (choose_splits_dominant, mla_decode above 16 heads a CTA): the shapes'
//   count unless one long sequence dominates, then at most double it within two waves; and the
//   picks on the rows sessions 29-31 timed with forced counts (H100: 132 slots of one CTA); from
//   the kernel's short_cap_min_pairs pairs, a hinted count never past one split per
//   kMinSplitTokens of the longest sequence.
// Prints the number of checked plans; exits 1 on a failure.
#include <cstdint>
#include <cstdio>
#include <initializer_list>

#include "kvcore/split_plan.h"

namespace {

using kvcore::paged_decode::choose_splits;
using kvcore::paged_decode::choose_splits_dominant;
using kvcore::paged_decode::choose_splits_hinted;
using kvcore::paged_decode::max_splits_for;
using kvcore::paged_decode::kMaxSplits;
using kvcore::paged_decode::kWideShortCapMinPairs;
using kvcore::paged_decode::page_major_fills_one_wave;
using kvcore::paged_decode::split_hint;

int failures = 0;
long long checked = 0;

void expect(bool ok, const char* what, long long a, long long b, long long c, long long d) {
  ++checked;
  if (!ok && ++failures <= 20) std::printf("FAIL %s: %lld %lld %lld %lld\n", what, a, b, c, d);
}

// The split count gqa_decode's launcher takes for this batch (D 128's merge batch, 32).
int plan(int64_t batch, int64_t kv_heads, int64_t kv_len, int64_t total, int64_t most, int slots,
         int64_t max_ctas = 0) {
  const auto hint = split_hint(batch, kv_len, total, most);
  const int64_t pairs = batch * kv_heads;
  return hint.active() ? choose_splits_hinted(pairs, kv_len, hint, slots, max_ctas, 32)
                       : choose_splits(pairs, kv_len, slots, max_ctas, 32);
}

}  // namespace

int main() {
  // Full hints are inactive: the same count as the shapes-only plan.
  for (int64_t batch : {1, 2, 3, 7, 16, 33, 64, 128, 500, 65535})
    for (int64_t kv_len : std::initializer_list<int64_t>{0, 1, 255, 256, 4096, 8192, 32768, 131072, 2147418111}) {
      expect(!split_hint(batch, kv_len, batch * kv_len, kv_len).active(), "full hint active", batch, kv_len, 0, 0);
      // a max_keys past the table is clamped to it: still the full hint
      expect(!split_hint(batch, kv_len, batch * kv_len * 2, kv_len * 3).active(), "clamped full hint active", batch,
             kv_len, 0, 0);
      // equal lengths shorter than the table: active, with fill exactly 1 (use_wide_decode's test)
      if (kv_len > 1) {
        const auto h = split_hint(batch, kv_len, batch * (kv_len - 1), kv_len - 1);
        expect(h.active() && h.fill == 1.0, "equal shorter lengths", batch, kv_len, 0, 0);
        expect(h.equal_keys == kv_len - 1, "equal shorter lengths' equal_keys", batch, kv_len, h.equal_keys, 0);
      }
      // equal lengths are named as such, full or not; a batch one key short of equal is not
      if (kv_len > 0)
        expect(split_hint(batch, kv_len, batch * kv_len, kv_len).equal_keys == kv_len, "full hint's equal_keys",
               batch, kv_len, 0, 0);
      if (kv_len > 1 && batch > 1)
        expect(split_hint(batch, kv_len, batch * kv_len - 1, kv_len).equal_keys == 0, "unequal named equal", batch,
               kv_len, 0, 0);
    }
  expect(split_hint(4, 4096, 0, 0).equal_keys == 0, "no hint named equal", 4, 4096, 0, 0);
  // equality is the caller's (before clamping): an overstated total, or unequal lengths that
  // clamp to the table's width, are not equal; equal ones past the width are
  expect(split_hint(2, 2048, 5120, 4096).equal_keys == 0, "overstated total named equal", 2, 2048, 5120, 4096);
  expect(split_hint(2, 2048, 8192, 4096).equal_keys == 2048, "equal past the width", 2, 2048, 8192, 4096);
  expect(split_hint(3, 2048, 3, int64_t(1) << 62).equal_keys == 0, "overflowing max_keys", 3, 2048, 3, 0);

  // The page-major kernel only for equal lengths whose unsplit blocks fill 90-100% of the SMs
  // once (132 on an H100), one CTA an SM.
  for (int64_t blocks : {1, 16, 64, 118, 119, 128, 132, 133, 256})
    for (int64_t total_div : {1, 2}) {
      const auto h = split_hint(blocks, 2048, blocks * 2048 / total_div, 2048);  // Hkv 8: a block a sequence
      const bool want = total_div == 1 && blocks >= 119 && blocks <= 132;
      expect(page_major_fills_one_wave(blocks, h, 132) == want, "page-major rule", blocks, total_div, want, 0);
    }
  // ... and such a grid plans one split (launch_page_major plans again from the shapes, with one
  // CTA an SM for the slots at 8 and 4 heads): the unsplit grid is what was measured; a split
  // page-major grid lost (B16, B64, B32 Hq64).
  for (int sms = 60; sms <= 200; ++sms)
    for (int64_t kv_len : {16, 256, 2048, 4096, 131072})
      for (int64_t blocks = 1; blocks <= 2 * sms; ++blocks) {
        if (page_major_fills_one_wave(blocks, split_hint(blocks, kv_len, blocks * kv_len, kv_len), sms))
          expect(choose_splits(blocks, kv_len, sms, 0, 8) == 1, "page-major rule's grid splits", blocks, kv_len, sms, 0);
      }

  // Any hint: the count's bounds and the grid caps.
  for (int64_t batch : {1, 2, 5, 16, 64, 128, 1000})
    for (int64_t kv_heads : {1, 8})
      for (int64_t kv_len : {16, 256, 4096, 131072})
        for (int64_t most_div : {1, 2, 16, 1000})
          for (int64_t fill_pct : {0, 1, 10, 50, 90, 100})
            for (int slots : {132, 264})
              for (int64_t max_ctas : {int64_t(0), int64_t(slots)}) {
                const int64_t most = std::max<int64_t>(1, kv_len / most_div);
                const int64_t total = batch * most * fill_pct / 100;
                const int64_t pairs = batch * kv_heads;
                const int s = plan(batch, kv_heads, kv_len, total, most, slots, max_ctas);
                expect(s >= 1 && s <= kMaxSplits, "count out of range", batch, kv_len, total, s);
                if (split_hint(batch, kv_len, total, most).active()) {
                  expect(s == 1 || pairs * s <= 4 * int64_t(slots), "past four waves", pairs, kv_len, total, s);
                  expect(max_ctas == 0 || s == 1 || pairs * s <= max_ctas, "past max_ctas", pairs, kv_len, total, s);
                }
              }

  // Measured H100 rows (264 slots; bench/results/h100-2026-12-05-s27/call3/ragged.log, lengths
  // as bench/experiments/ragged_decode.py makes them): B x 8 KV heads, us at forced counts. Each
  // row's [lo, hi] holds the best measured count and those within 3% of it, except where noted.
  struct Row {
    const char* name;
    int64_t batch, kv_len, total, most;
    int lo, hi;
  };
  const Row rows[] = {
      // one sequence full, 15 of 1024: 1 split 104, 2 86, 4 63, 8 49 (session 26: 16 55)
      {"B16 one-long", 16, 8192, 8192 + 15 * 1024, 8192, 8, 8},
      // uniform lengths (59289 keys, longest 7567): 1 112, 2 102, 4 100.5, 8 98
      {"B16 uniform", 16, 8192, 59289, 7567, 4, 8},
      // the decode bench's ragged row (63471 keys, longest 7136): 1 109, 2 105, 4 104, 8 100
      {"B16 bench", 16, 8192, 63471, 7136, 8, 8},
      // every sequence 128: 1 10.1, 2 12.6
      {"B16 short", 16, 8192, 16 * 128, 128, 1, 1},
      // the bench's ragged row (109403 keys, longest 3983): 1 178, 2 166.4, 4 166.3, 8 177
      {"B64 bench", 64, 4096, 109403, 3983, 2, 4},
      // uniform (120535 keys): 1 195, 2 188, 4 185
      {"B64 uniform", 64, 4096, 120535, 4096, 2, 4},
      // one full, 63 of 512: 1 97, 2 77, 4 71 (the pick, 2, is 9% off the best)
      {"B64 one-long", 64, 4096, 4096 + 63 * 512, 4096, 2, 4},
      // uniform (136625 keys): 1 202, 2 207, 4 210
      {"B128 uniform", 128, 2048, 136625, 2048, 1, 1},
      // one full, 127 of 256: 1 72, 2 70, 4 88
      {"B128 one-long", 128, 2048, 2048 + 127 * 256, 2048, 1, 2},
      // every sequence 32: 1 18.9, 2 41.5
      {"B128 short", 128, 2048, 128 * 32, 32, 1, 1},
      // one sequence of 2048 in a 131072-token table: 4 16.7, 8 14.1, the shapes' 32 splits 13.0
      // (session 26: 16 13.1): the pick, 8 (one split per kMinSplitTokens), is 8% off the best
      {"B1 short", 1, 131072, 2048, 2048, 8, 16},
      // one of 76624: 8 155, the shapes' count (32) 114 (session 26: 16 115.5)
      {"B1 uniform", 1, 131072, 76624, 76624, 16, 33},
  };
  for (const Row& r : rows) {
    const int s = plan(r.batch, 8, r.kv_len, r.total, r.most, 264);
    std::printf("%-14s %d splits\n", r.name, s);
    expect(s >= r.lo && s <= r.hi, r.name, s, r.lo, r.hi, 0);
  }

  // The compute-bound rule: the shapes' count where no sequence dominates (no hint, equal or
  // uniform-like lengths), otherwise that count or, from a count of at most 4, twice it, within
  // two waves and the longest sequence's kMinSplitTokens.
  for (int64_t batch : {1, 2, 5, 16, 64, 128, 1000})
    for (int64_t blocks : {1, 2})
      for (int64_t kv_len : {16, 256, 4096, 131072})
        for (int64_t most_div : {1, 2, 16, 1000})
          for (int64_t fill_pct : {0, 1, 10, 25, 26, 50, 100})
            for (int slots : {66, 132, 264})
              for (int64_t cap_from : {int64_t(0), kWideShortCapMinPairs}) {
                const int64_t most = std::max<int64_t>(1, kv_len / most_div);
                const int64_t total = batch * most * fill_pct / 100;
                const int64_t pairs = batch * blocks;
                const auto hint = split_hint(batch, kv_len, total, most);
                const int shapes = choose_splits(pairs, kv_len, slots, 0, 0);
                // from cap_from pairs a hint caps the count at one split per kMinSplitTokens of the
                // longest sequence
                const bool capped = hint.active() && pairs >= cap_from;
                const int base = capped ? int(std::min<int64_t>(shapes, max_splits_for(hint.max_keys))) : shapes;
                const int s = choose_splits_dominant(pairs, kv_len, hint, slots, 0, 0, cap_from);
                expect(s >= 1 && (!capped || s <= max_splits_for(hint.max_keys)),
                       "compute-bound: past the longest sequence's splits", pairs, kv_len, total, s);
                if (!hint.active() || hint.fill > 0.25)
                  expect(s == base, "compute-bound: not dominant, not the shapes' count", pairs, kv_len, total, s);
                else
                  expect(s == base || (s == 2 * base && base <= 4 && pairs * s <= 2 * int64_t(slots) &&
                                       s <= max_splits_for(most)),
                         "compute-bound: dominant count", pairs, kv_len, total, s);
              }
  // The H100 rows of sessions 29-31 (bench/results/h100-2026-12-05-s29/call1/ragged.log and
  // later; lengths as bench/experiments/ragged_mla.py makes them; 132 slots): sequences x head
  // blocks (32-head kernel: one block; 64-head kernels: two at H128), us at forced counts.
  struct MlaRow {
    const char* name;
    int64_t batch, blocks, kv_len, total, most;
    int want;
    int64_t cap_from = 0;  // the kernel's short_cap_min_pairs
  };
  constexpr int64_t kWide = kWideShortCapMinPairs;  // the 64-head kernels' (H128: two blocks a sequence)
  const MlaRow mla_rows[] = {
      // one sequence full, the rest at 1/8: auto (2) 108.4, 4 63.6, 8 75.6
      {"MLA B64 H32 one-long", 64, 1, 4096, 4096 + 63 * 512, 4096, 4},
      // auto (2) 79.7, 4 66.6, 8 89.5
      {"MLA B32 H128 one-long", 32, 2, 4096, 4096 + 31 * 512, 4096, 4},
      // auto (4) 141.6, 8 108.5
      {"MLA B16 H128 one-long", 16, 2, 16384, 16384 + 15 * 2048, 16384, 8},
      // auto (1) 47.7, 2 76.3: two waves already
      {"MLA B128 H128 one-long", 128, 2, 1024, 1024 + 127 * 128, 1024, 1},
      // uniform lengths: auto (2) 79.3, 4 83.4
      {"MLA B32 H128 uniform", 32, 2, 4096, 69784, 4096, 2},
      // uniform: auto (2) 108.9, 4 114.1
      {"MLA B64 H32 uniform", 64, 1, 4096, 144341, 4096, 2},
      // every sequence 256 keys (equal, short): the shapes' 2 30.1, 4 47.4 (session 29); session 30
      // (bench/results/h100-2026-12-05-s30/call1/ragged.log): the shapes' 2 30.9, 1 23.0
      {"MLA B32 H128 short", 32, 2, 4096, 32 * 256, 256, 1, kWide},
      // the same lengths at 32 heads (session 30): the shapes' 2 29.4, 1 23.8
      {"MLA B64 H32 short", 64, 1, 4096, 64 * 256, 256, 1},
      // 512 keys each: the cap (2) is the shapes' count, so no change
      {"MLA B32 H128 512", 32, 2, 4096, 32 * 512, 512, 2, kWide},
      // Session 31 (bench/results/h100-2026-12-05-s31/call2/mla-short.log), every sequence 256 keys
      // in a 4096-token table, us at forced 1 / 2 / 4 / 8 / 16 splits. 64-head kernel, below 16
      // pairs the shapes' count (16): B1 21.5 / 27.3 / 28.8 / 17.5 / 17.6; B4 21.5 / 26.1 / 27.3 /
      // 18.9 / 21.1 (1 is 14% off the best, the pick 12%)
      {"MLA B1 H128 short", 1, 2, 4096, 256, 256, 16, kWide},
      {"MLA B4 H128 short", 4, 2, 4096, 4 * 256, 256, 16, kWide},
      // from 16 pairs one: B8 20.8 / 26.3 / 28.2 / 22.2 / 32.6; B16 21.7 / 27.6 / 31.2 / 36.4 / 70.0
      {"MLA B8 H128 short", 8, 2, 4096, 8 * 256, 256, 1, kWide},
      {"MLA B16 H128 short", 16, 2, 4096, 16 * 256, 256, 1, kWide},
      // 32-head kernel, one at every batch: B1 23.7 / 27.6 / 26.9 / 27.2 / 33.0 (the shapes' 16
      // 32.7); B8 22.8 / 27.1 / 26.8 / 27.7 / 33.4
      {"MLA B1 H32 short", 1, 1, 4096, 256, 256, 1},
      {"MLA B8 H32 short", 8, 1, 4096, 8 * 256, 256, 1},
  };
  for (const MlaRow& r : mla_rows) {
    const int s = choose_splits_dominant(r.batch * r.blocks, r.kv_len, split_hint(r.batch, r.kv_len, r.total, r.most),
                                         132, 0, 0, r.cap_from);
    std::printf("%-22s %d splits\n", r.name, s);
    expect(s == r.want, r.name, s, r.want, 0, 0);
  }

  std::printf("checked %lld plans, %d failures\n", checked, failures);
  return failures == 0 ? 0 : 1;
}
