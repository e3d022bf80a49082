// The most KV splits a decode call takes, on either device.
#pragma once

#include <algorithm>
#include <cstdint>

namespace kvcore {

// A forced num_splits above this is taken as this many: each split is a partial output per query
// head, written and merged, and past a few hundred the GPU has no CTA slots left to fill (the CUDA
// launchers' split merge is sized for it). The CPU kernels take the same cap, so a huge num_splits
// cannot size their scratch (2^40 splits once asked for gigabytes of partials).
constexpr int64_t kMaxKvSplits = 256;

// The CPU kernels' part count for a forced num_splits > 0: at most kMaxKvSplits and one part per
// `chunk` keys of the longest list (the parts' scratch is allocated up front).
inline int64_t forced_cpu_parts(int64_t num_splits, int64_t longest, int64_t chunk) {
  const int64_t by_keys = (longest + chunk - 1) / chunk;
  return std::max<int64_t>(1, std::min({num_splits, kMaxKvSplits, by_keys}));
}

}  // namespace kvcore
