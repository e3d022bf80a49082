// The most KV splits a decode call takes, on either device.
#pragma once

#include <cstdint>

namespace kvcore {

// A forced num_splits above this is taken as this many: each split is a partial output per query
// head, written and merged, and past a few hundred the GPU has no CTA slots left to fill (the CUDA
// launchers' split merge is sized for it). The CPU kernels take the same cap, so a huge num_splits
// cannot size their scratch (2^40 splits once asked for gigabytes of partials).
constexpr int64_t kMaxKvSplits = 256;

}  // namespace kvcore
