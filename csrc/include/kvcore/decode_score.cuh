// Epilogue of gqa_decode's H2O score accumulation: score[b, h, p] += sum over the group's query
// heads g of the probability of key p under head g, for every key p the step attended.
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
constexpr int kDecodeScoreKeysPerThread = 4;  // a quarter of a block: one 8-byte load of P per head
constexpr int kDecodeScoreKeys = kDecodeScoreThreads * kDecodeScoreKeysPerThread;  // per CTA

// CTAs per SM the register budget must allow: 8 (<= 32 registers) up to group 4, so that a grid
// of up to 8 x 132 CTAs runs in one wave (B16 Hkv8 S8192: 1024 CTAs; at 39 registers, 6 per SM,
// 1.29 waves: ncu, session 10), and the second wave's round trips do not follow the first's.
// Larger groups keep the compiler's choice (a bound of 4 CTAs spills there).
template <int GMAX>
constexpr int kDecodeScoreMinCtas = GMAX <= 4 ? 8 : 1;

// grid (ceil(kv_len / kDecodeScoreKeys), Hkv, B); GMAX >= group (1, 2, 4, 8 or 16): the bound the
// head loop is unrolled to, so that all its loads are in flight together. Thread t of a CTA takes
// keys 4 (t % 4) .. 4 (t % 4) + 3 of block blockIdx.x * 64 + t / 4.
template <int GMAX>
__global__ void __launch_bounds__(kDecodeScoreThreads, kDecodeScoreMinCtas<GMAX>)
    decode_score_kernel(const DecodeScoreParams p) {
  constexpr int KPT = kDecodeScoreKeysPerThread;
  const int kvh = blockIdx.y, b = blockIdx.z;
  // The same clamp and window as the decode kernel, so the same keys.
  const int64_t seq_len = min(max(int64_t(__ldcg(p.seq_lens + b)), int64_t(0)), p.capacity);
  const int64_t first = p.window_left >= 0 ? max(int64_t(0), seq_len - 1 - p.window_left) : int64_t(0);
  const int64_t n = seq_len - first;
  const int64_t blk = int64_t(blockIdx.x) * (kDecodeScoreThreads / 4) + threadIdx.x / 4;
  const int64_t k0 = blk * kScoreBlock + (threadIdx.x % 4) * KPT;  // first key of this thread
  const int64_t pair = int64_t(b) * p.num_kv_heads + kvh;
  float* sc = p.score + pair * p.score_len + first + k0;

  // Before the wait: the score values this thread updates (the decode grid never writes them).
  float old[KPT];
#pragma unroll
  for (int i = 0; i < KPT; ++i) old[i] = k0 + i < n ? sc[i] : 0.f;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Every thread waits, also those with no key: then this grid cannot complete before the decode
  // grid has, and work queued after it on the stream is ordered after both, whatever the lengths.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  if (k0 >= n) return;  // past the sequence (or its window): nothing to add

  const int group = p.group;
  const int64_t row0 = (pair * p.blocks + blk) * group;  // (block, head 0) row of the scratch
  const uint64_t policy = l2_policy(p.l2);
  uint2 pv[GMAX];
  float base[GMAX], l2[GMAX];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < group) {
      pv[g] = ldcg_hint(reinterpret_cast<const uint2*>(p.probs + (row0 + g) * kScoreBlock + (threadIdx.x % 4) * KPT),
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
      const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&pv[g].x));
      const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&pv[g].y));
      acc[0] = fmaf(lo.x, f, acc[0]);
      acc[1] = fmaf(lo.y, f, acc[1]);
      acc[2] = fmaf(hi.x, f, acc[2]);
      acc[3] = fmaf(hi.y, f, acc[3]);
    }
  }
#pragma unroll
  for (int i = 0; i < KPT; ++i)
    if (k0 + i < n) sc[i] = old[i] + acc[i];
}

}  // namespace kvcore
