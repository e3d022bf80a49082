// Merge two partial attention results (out, lse) over disjoint key sets. A CTA is a 2-D block:
// x walks the 16-byte chunks of a row, y the rows. Every thread reads its row's two lse values
// before the barrier and writes after it, so out/lse may be out_a/lse_a (in-place accumulate).
#pragma once

#include <math.h>
#include <stdint.h>

#include "kvcore/device_utils.cuh"

namespace kvcore {

struct MergeStatesParams {
  const void* out_a;
  const float* lse_a;
  const void* out_b;
  const float* lse_b;
  void* out;
  float* lse;
  int64_t rows;  // N * H
  int chunks;    // 16-byte chunks per row: D / 8
};

template <typename T>
__global__ void merge_attention_states_kernel(const MergeStatesParams p) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool active = row < p.rows;
  float la = -INFINITY, lb = -INFINITY;
  if (active) {
    la = p.lse_a[row];
    lb = p.lse_b[row];
  }
  __syncthreads();  // all lse reads happen before any lse write (in-place use)
  if (!active) return;
  // fmaxf drops a NaN and the weights would turn it into 0 or -inf; a NaN lse on either side
  // makes the whole row NaN instead (NaN in, NaN out), so a poisoned part is never merged away.
  const bool nan_in = isnan(la) || isnan(lb);
  const float mx = fmaxf(la, lb);
  const float base = mx == -INFINITY ? 0.f : mx;
  const float wa = exp2f((la - base) * kLog2e), wb = exp2f((lb - base) * kLog2e);
  const float sum = wa + wb;
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  for (int c = threadIdx.x; c < p.chunks; c += blockDim.x) {
    const int64_t o = row * p.chunks * 8 + int64_t(c) * 8;
    float a[8], b[8], r[8];
    unpack8(*reinterpret_cast<const uint4*>(static_cast<const T*>(p.out_a) + o), a, T{});
    unpack8(*reinterpret_cast<const uint4*>(static_cast<const T*>(p.out_b) + o), b, T{});
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      // A part without keys (weight 0) contributes nothing, even if its out is NaN (unwritten).
      r[i] = nan_in ? NAN : ((wa > 0.f ? a[i] * wa : 0.f) + (wb > 0.f ? b[i] * wb : 0.f)) * inv;
    }
    *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + o) = pack8<T>(r);
  }
  if (threadIdx.x == 0) p.lse[row] = nan_in ? NAN : (sum > 0.f ? base + logf(sum) : -INFINITY);
}

}  // namespace kvcore
