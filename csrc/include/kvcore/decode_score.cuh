// Epilogue of gqa_decode's H2O score accumulation: score[b, h, p] += sum over the group's query
// heads g of exp2(logit[g, p] - lse2[g]) for every key p the step attended.
//
// Why a second kernel: a key's probability needs the head's final log-sum-exp, known only after
// the split merge (in the last CTA of each (sequence, KV head)); doing the whole sequence's keys
// in that one CTA would leave a long single-CTA tail per pair. The decode kernel stores the
// log2-domain logits it computes anyway (G floats per key) and the final lse2 per head into the
// workspace; this grid spreads the keys over many CTAs. It is launched with programmatic
// dependent launch on sm_90+, so it is scheduled while the decode grid drains and waits in
// griddepcontrol.wait until that grid has completed and its writes are visible.
#pragma once

#include <math.h>
#include <stdint.h>

namespace kvcore {

struct DecodeScoreParams {
  const int* seq_lens;  // [B]
  const float* logits;  // [B * Hkv * group, ld], log2 domain, relative to the window start
  const float* lse2;    // [B * Hq], log2 domain
  int64_t ld;
  float* score;         // [B, Hkv, score_len] contiguous
  int64_t score_len;
  int num_kv_heads, group, window_left;  // window_left < 0: none
  int64_t capacity;                       // max_pages * page_size (seq_len is clamped to it)
};

constexpr int kDecodeScoreThreads = 256;
constexpr int kDecodeScoreKeysPerThread = 4;
constexpr int kDecodeScoreKeys = kDecodeScoreThreads * kDecodeScoreKeysPerThread;  // per CTA

// grid (ceil(kv_len / kDecodeScoreKeys), Hkv, B). A template (instantiated once, with the
// defaults) so that the header can be included by several launch units without the kernel's
// host stub being defined twice.
template <int THREADS = kDecodeScoreThreads, int KEYS_PER_THREAD = kDecodeScoreKeysPerThread>
__global__ void __launch_bounds__(THREADS) decode_score_kernel(const DecodeScoreParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  const int kvh = blockIdx.y, b = blockIdx.z;
  // The same clamp and window as the decode kernel, so the same keys.
  const int64_t seq_len = min(max(int64_t(__ldcg(p.seq_lens + b)), int64_t(0)), p.capacity);
  const int64_t first = p.window_left >= 0 ? max(int64_t(0), seq_len - 1 - p.window_left) : int64_t(0);
  const int64_t n = seq_len - first;
  const int64_t k0 = int64_t(blockIdx.x) * THREADS * KEYS_PER_THREAD;
  if (k0 >= n) return;
  const int64_t pair = int64_t(b) * p.num_kv_heads + kvh;
  const float* lg = p.logits + pair * p.group * p.ld;
  const float* l2 = p.lse2 + pair * p.group;
  float* sc = p.score + pair * p.score_len + first;

  float acc[KEYS_PER_THREAD] = {};
  for (int g = 0; g < p.group; ++g) {
    const float m = __ldcg(l2 + g);
#pragma unroll
    for (int i = 0; i < KEYS_PER_THREAD; ++i) {
      const int64_t k = k0 + i * THREADS + threadIdx.x;
      if (k < n) acc[i] += exp2f(__ldcg(lg + g * p.ld + k) - m);
    }
  }
#pragma unroll
  for (int i = 0; i < KEYS_PER_THREAD; ++i) {
    const int64_t k = k0 + i * THREADS + threadIdx.x;
    if (k < n) sc[k] += acc[i];
  }
}

}  // namespace kvcore
