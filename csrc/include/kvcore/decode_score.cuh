// Epilogue of gqa_decode's H2O score accumulation: score[b, h, p] += sum over the group's query
// heads g of the probability of key p under head g, for every key p the step attended.
//
// Since session 12 this kernel is the fallback: by default (KVCORE_SCORE_EPILOGUE=fused) the
// decode kernel finishes the score itself wherever its launch allows (GqaDecodeParams::
// score_fused: a one-wave cooperative grid, or unsplit pairs, and a CTA's keys' scratch fits its
// free shared memory), and this kernel runs only for the other launches.
//
// Why a second kernel: a key's probability needs the head's final log-sum-exp, known only after
// the split merge (in the last CTA of each (sequence, KV head)); doing the whole sequence's keys
// in that one CTA would leave a long single-CTA tail per pair. The decode kernel stores what it
// computes anyway, the unnormalised probabilities P = exp2(logit - base) of each 16-key block of
// a warp (P <= 1: the block's running max is the base), as fp16, plus each block's base per head
// and each head's final lse2. This grid spreads the keys over many CTAs:
// prob = P * exp2(base - lse2).
//
// Why fp16 P: the scratch is written and read once per step (at G4 D128, 2.25 bytes per key and
// query head instead of fp32 logits' 4: the K/V stream is 512 bytes per key), and its rounding is
// a relative error <= 2^-11 on each probability (P in [0, 1]; below 2^-14 fp16 keeps an absolute
// error <= 2^-25), well inside the tests' rtol 2e-3 and far below what H2O's ranking can notice.
//
// Launched with programmatic dependent launch on sm_90+, so it is scheduled while the decode grid
// drains: before griddepcontrol.wait it reads only what the decode grid does not write (seq_lens
// and the score buffer itself, last written by work that finished before the decode grid
// started), so the score read-modify-write's read is off the critical path; after the wait every
// remaining load is issued at once (the group loop is unrolled to a compile-time bound), one
// memory round trip instead of one per query head.
#pragma once

#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "kvcore/device_utils.cuh"

namespace kvcore {

// Keys per block of the probability scratch: one warp's share of a decode tile.
constexpr int kScoreBlock = 16;

struct DecodeScoreParams {
  const int* seq_lens;         // [B]
  const __half* probs;         // [B * Hkv, blocks, group, kScoreBlock]: P, keys relative to the window start
  const float* bases;          // [B * Hkv, blocks, group]: log2-domain base of each block's P
  const float* lse2;           // [B * Hq], log2 domain
  int64_t blocks;              // blocks per (sequence, KV head): ceil(kv_len / kScoreBlock)
  float* score;                // [B, Hkv, score_len] contiguous
  int64_t score_len;
  int num_kv_heads, group, window_left;  // window_left < 0: none
  int64_t capacity;                       // max_pages * page_size (seq_len is clamped to it)
  int l2;                                 // L2Priority of the P / base loads (the decode's stores' one)
};

constexpr int kDecodeScoreThreads = 256;

// Keys per thread: 4 (a quarter of a 16-key block: one 8-byte load of P per head, scalar score
// accesses; the default) or 8 (half a block: one 16-byte load of P per head, float4 score
// accesses where aligned; KVCORE_SCORE_EPILOGUE=wide, session 10; session 11 timed it no faster): the same bytes in
// about half the requests, for an epilogue that ncu found latency-bound (session 10: 18.5 stall
// cycles per issued instruction on long-scoreboard, 29% of DRAM peak).
template <int KPT>
constexpr int kDecodeScoreKeys = kDecodeScoreThreads * KPT;  // per CTA

// CTAs per SM the register budget must allow, up to group 4: enough for a grid of up to 8 x 132
// CTAs of 4 keys per thread, or 4 x 132 of 8, to run in one wave (B16 Hkv8 S8192: 1024 or 512
// CTAs; at 39 registers, 6 per SM, the narrow form ran 1.29 waves: ncu, session 10), so a second
// wave's round trips do not follow the first's. Larger groups keep the compiler's choice (a bound
// of 4 CTAs spills there).
template <int GMAX, int KPT>
constexpr int kDecodeScoreMinCtas = GMAX <= 4 ? (KPT == 4 ? 8 : 4) : 1;

template <int KPT>
struct ScorePVec;
template <>
struct ScorePVec<4> {
  using type = uint2;
};
template <>
struct ScorePVec<8> {
  using type = uint4;
};

// grid (ceil(kv_len / kDecodeScoreKeys<KPT>), Hkv, B); GMAX >= group (1, 2, 4, 8 or 16): the
// bound the head loop is unrolled to, so that all its loads are in flight together. Thread t of a
// CTA takes keys KPT (t % TPB) .. KPT (t % TPB) + KPT - 1 of block blockIdx.x * (256 / TPB) + t / TPB,
// TPB = 16 / KPT threads per block.
template <int GMAX, int KPT>
__global__ void __launch_bounds__(kDecodeScoreThreads, (kDecodeScoreMinCtas<GMAX, KPT>))
    decode_score_kernel(const DecodeScoreParams p) {
  static_assert(KPT == 4 || KPT == 8, "4 or 8 keys per thread");
  constexpr int TPB = kScoreBlock / KPT;
  using PVec = typename ScorePVec<KPT>::type;
  const int kvh = blockIdx.y, b = blockIdx.z;
  // The same clamp and window as the decode kernel, so the same keys.
  const int64_t seq_len = min(max(int64_t(__ldcg(p.seq_lens + b)), int64_t(0)), p.capacity);
  const int64_t first = p.window_left >= 0 ? max(int64_t(0), seq_len - 1 - p.window_left) : int64_t(0);
  const int64_t n = seq_len - first;
  const int64_t blk = int64_t(blockIdx.x) * (kDecodeScoreThreads / TPB) + threadIdx.x / TPB;
  const int64_t k0 = blk * kScoreBlock + (threadIdx.x % TPB) * KPT;  // first key of this thread
  const int64_t pair = int64_t(b) * p.num_kv_heads + kvh;
  float* sc = p.score + pair * p.score_len + first + k0;
  // Vector score accesses when all KPT keys are in range and the address allows (the window's
  // start and score_len decide the alignment); otherwise one float at a time.
  const bool vec = KPT == 8 && k0 + KPT <= n && (reinterpret_cast<uintptr_t>(sc) & 15) == 0;

  // Before the wait: the score values this thread updates (the decode grid never writes them).
  float old[KPT];
  if (vec) {
#pragma unroll
    for (int j = 0; j < KPT / 4; ++j) {
      const float4 v = *reinterpret_cast<const float4*>(sc + 4 * j);
      old[4 * j] = v.x;
      old[4 * j + 1] = v.y;
      old[4 * j + 2] = v.z;
      old[4 * j + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < KPT; ++i) old[i] = k0 + i < n ? sc[i] : 0.f;
  }

  // Every thread waits, also those with no key: then this grid cannot complete before the decode
  // grid has, and work queued after it on the stream is ordered after both, whatever the lengths.
  grid_dependency_wait();
  if (k0 >= n) return;  // past the sequence (or its window): nothing to add

  const int group = p.group;
  const int64_t row0 = (pair * p.blocks + blk) * group;  // (block, head 0) row of the scratch
  const uint64_t policy = l2_policy(p.l2);
  PVec pv[GMAX];
  float base[GMAX], l2[GMAX];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < group) {
      pv[g] = ldcg_hint(reinterpret_cast<const PVec*>(p.probs + (row0 + g) * kScoreBlock + (threadIdx.x % TPB) * KPT),
                        policy);
      base[g] = ldcg_hint(p.bases + row0 + g, policy);
      l2[g] = __ldcg(p.lse2 + pair * group + g);
    }
  }
  float acc[KPT] = {};
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < group) {
      const float f = exp2f(base[g] - l2[g]);
      const uint32_t* w = reinterpret_cast<const uint32_t*>(&pv[g]);
#pragma unroll
      for (int j = 0; j < KPT / 2; ++j) {
        const float2 h = __half22float2(*reinterpret_cast<const __half2*>(&w[j]));
        acc[2 * j] = fmaf(h.x, f, acc[2 * j]);
        acc[2 * j + 1] = fmaf(h.y, f, acc[2 * j + 1]);
      }
    }
  }
  if (vec) {
#pragma unroll
    for (int j = 0; j < KPT / 4; ++j)
      *reinterpret_cast<float4*>(sc + 4 * j) = make_float4(old[4 * j] + acc[4 * j], old[4 * j + 1] + acc[4 * j + 1],
                                                           old[4 * j + 2] + acc[4 * j + 2], old[4 * j + 3] + acc[4 * j + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < KPT; ++i)
      if (k0 + i < n) sc[i] = old[i] + acc[i];
  }
}

}  // namespace kvcore
