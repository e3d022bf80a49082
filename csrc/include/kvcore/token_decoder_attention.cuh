// Block Transformer token-decoder attention (prefill of many blocks): token i of block n attends
// to the block's P prefix slots and its tokens 0..i. Framework-free; launcher in
// csrc/block_transformer/token_decoder_attention.cu.
//
// Why this shape of kernel. Per block the work is tiny and the bytes are not: with L tokens,
// P prefix slots, Hq query heads, Hkv KV heads and head dim D (2-byte elements),
//   bytes = q + k + v + out = (2 * L * Hq + 2 * (P + L) * Hkv) * D * 2
//   FLOPs = 4 * Hq * D * sum_{i<L} (P + i + 1) = 4 * Hq * D * L * (P + (L + 1) / 2)
// e.g. L 4 P 2 H 12 D 64: 30 KB and 0.9 FMA per byte; L 16 P 2 H 16 D 128: 272 KB and 2.5 FMA
// per byte. At ~3 TB/s an H100 SM receives ~13 bytes per cycle, i.e. 12-33 FMAs (one warp
// instruction) per cycle against an issue rate of 4 warp instructions per cycle: CUDA cores in
// fp32 suffice if the loops carry little besides FMAs, so the design is all about bytes in flight
// and instruction economy:
//
// * A work item is (block, chunk of HC KV heads with their query heads), sized to <= 32 KB of
//   input: the whole block when it fits (all heads of a block in one CTA), else a few heads.
//   Each CTA walks a contiguous range of items (consecutive blocks), so its reads stream through
//   memory in address order.
// * The next two items are prefetched with 16-byte cp.async copies into a ring of two raw
//   stages in shared memory (up to 8 independent copies per thread per stage, no registers
//   held), so loads are in flight while the current item is converted and computed; a stage is
//   converted to fp32 once, so the inner loops do no conversions. Each per-head row in shared memory is padded by 4 floats so
//   that float4 reads of different rows fall on different banks.
// * Scores: a thread owns one query row against JT = 4 keys and walks D in float4 steps
//   (5 shared loads per 16 FMAs, no shuffles); masked (future) key tiles are skipped.
//   Softmax: a thread per row, exp2 on pre-scaled logits. PV: a thread owns one row and 8 output
//   dims (two float4 halves, so a quarter warp reads contiguous shared memory).
//
// Safety: block_lens[n] is clamped to [0, L]; every address is computed from the shapes, so
// bad lengths change the numbers, never the memory touched.
#pragma once

#include <math.h>
#include <stdint.h>

#include "kvcore/device_utils.cuh"

namespace kvcore {

// n / d for 0 <= n < 2^31 by a multiply-high and a shift (Granlund-Montgomery): the loops decode
// flat indices into (row, head) pairs and a hardware integer division costs ~20 instructions.
struct FastDiv {
  uint32_t d, m, s;
};

inline FastDiv make_fast_div(uint32_t d) {
  FastDiv f{d, 0u, 0u};
  while ((uint64_t(1) << f.s) < d) ++f.s;
  f.m = uint32_t(((uint64_t(1) << 32) * ((uint64_t(1) << f.s) - d)) / d + 1);
  return f;
}

__device__ __forceinline__ int fast_div(int n, const FastDiv& f) {
  const uint32_t u = uint32_t(n);
  return int((__umulhi(u, f.m) + u) >> f.s);
}

struct TokenDecoderParams {
  const void* q;
  const void* k;
  const void* v;
  const int* block_lens;  // [N] or nullptr (all blocks full)
  void* out;              // [N, L, Hq, D], contiguous
  float* lse;             // [N, L, Hq] or nullptr
  int64_t q_stride_n, k_stride_n, v_stride_n;  // elements between consecutive blocks
  int num_items;                                // blocks * chunks
  int items_per_cta;
  int rows;      // L
  int prefix;    // P
  int keys;      // P + L
  int keys_pad;  // row stride of the score matrix in shared memory (odd)
  int num_q_heads, num_kv_heads;
  int chunk_kv_heads;  // HC (divides num_kv_heads)
  int chunk_q_heads;   // HC * group
  float scale_log2;    // scale * log2(e): logits are kept in base 2
  FastDiv chunks;      // item -> (block, chunk)
  FastDiv chunk_q;     // q unit (row * HCq + head) -> row
  FastDiv chunk_kv;    // k/v unit (key * HC + head) -> key
  FastDiv rows_div;    // score row (head * L + row) -> head
  FastDiv group;       // query head -> KV head
  FastDiv jtiles;      // score unit -> (score row, key tile)
};

template <int D>
struct TokenDecoderConfig {
  static constexpr int THREADS = 256;
  static constexpr int VPT = 8;             // 16-byte vectors per thread in a full prefetch stage
  static constexpr int CPR = D / 8;         // 16-byte chunks per head row
  static constexpr int DP = D + 4;          // padded fp32 row in shared memory
  static constexpr int JT = 4;              // keys per thread in the score loop
  static constexpr int STAGE_VECS = THREADS * VPT;
  static constexpr int STAGE_BYTES = STAGE_VECS * 16;
};

// Shared-memory bytes for one item: fp32 q, k, v rows (padded), scores, 1/sum per row (padded to
// 16 bytes), then the two prefetch stages of raw 16-byte vectors.
inline int64_t token_decoder_smem_bytes(int rows, int keys, int keys_pad, int hc, int hcq, int dp, int cpr,
                                        int stage_vecs) {
  const int64_t floats =
      ((int64_t(rows) * hcq + 2 * int64_t(keys) * hc) * dp + int64_t(hcq) * rows * keys_pad + int64_t(hcq) * rows + 3) /
      4 * 4;
  const int64_t vecs = (int64_t(rows) * hcq + 2 * int64_t(keys) * hc) * cpr;
  return 4 * floats + 2 * 16 * (vecs < stage_vecs ? vecs : stage_vecs);
}

template <typename T, int D>
struct TokenDecoderItem {
  using Cfg = TokenDecoderConfig<D>;
  const TokenDecoderParams& p;
  int block, hq0, hk0;  // block index, first query head and first KV head of the chunk
  int q_vecs, kv_vecs;

  __device__ TokenDecoderItem(const TokenDecoderParams& params, int item) : p(params) {
    block = fast_div(item, p.chunks);
    const int chunk = item - block * int(p.chunks.d);
    hk0 = chunk * p.chunk_kv_heads;
    hq0 = chunk * p.chunk_q_heads;
    q_vecs = p.rows * p.chunk_q_heads * Cfg::CPR;
    kv_vecs = p.keys * p.chunk_kv_heads * Cfg::CPR;
  }

  __device__ int total_vecs() const { return q_vecs + 2 * kv_vecs; }

  // Global source and shared-memory destination (float offset) of 16-byte vector `vec`.
  __device__ const uint4* source(int vec, int& smem_offset, int k_base, int v_base) const {
    const int c = vec & (Cfg::CPR - 1);
    if (vec < q_vecs) {
      const int unit = vec / Cfg::CPR;  // row * HCq + head (CPR is a power of two)
      const int row = fast_div(unit, p.chunk_q);
      const int head = unit - row * p.chunk_q_heads;
      smem_offset = unit * Cfg::DP + c * 8;
      const T* src = static_cast<const T*>(p.q) + int64_t(block) * p.q_stride_n +
                     (int64_t(row) * p.num_q_heads + hq0 + head) * D + c * 8;
      return reinterpret_cast<const uint4*>(src);
    }
    int w = vec - q_vecs;
    const bool is_v = w >= kv_vecs;
    if (is_v) w -= kv_vecs;
    const int unit = w / Cfg::CPR;  // key * HC + head
    const int key = fast_div(unit, p.chunk_kv);
    const int head = unit - key * p.chunk_kv_heads;
    smem_offset = (is_v ? v_base : k_base) + unit * Cfg::DP + c * 8;
    const T* base = static_cast<const T*>(is_v ? p.v : p.k) + int64_t(block) * (is_v ? p.v_stride_n : p.k_stride_n);
    return reinterpret_cast<const uint4*>(base + (int64_t(key) * p.num_kv_heads + hk0 + head) * D + c * 8);
  }
};

template <typename T>
__device__ __forceinline__ void store_converted(float* smem, const uint4& raw) {
  float f[8];
  unpack8(raw, f, T{});
  *reinterpret_cast<float4*>(smem) = make_float4(f[0], f[1], f[2], f[3]);
  *reinterpret_cast<float4*>(smem + 4) = make_float4(f[4], f[5], f[6], f[7]);
}

__device__ __forceinline__ void fma4(float& acc, const float4& a, const float4& b) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  acc = fmaf(a.w, b.w, acc);
}

template <typename T, int D>
__global__ void __launch_bounds__(TokenDecoderConfig<D>::THREADS, 2)
    token_decoder_attention_kernel(const __grid_constant__ TokenDecoderParams p) {
  using Cfg = TokenDecoderConfig<D>;
  extern __shared__ __align__(16) float smem[];
  const int tid = threadIdx.x;
  const int R = p.rows, P = p.prefix, KJ = p.keys, KJP = p.keys_pad;
  const int HC = p.chunk_kv_heads, HCQ = p.chunk_q_heads;
  const int k_base = R * HCQ * Cfg::DP;
  const int v_base = k_base + KJ * HC * Cfg::DP;
  float* Qf = smem;
  float* Kf = smem + k_base;
  float* Vf = smem + v_base;
  float* Sf = smem + v_base + KJ * HC * Cfg::DP;
  float* inv_sum = Sf + HCQ * R * KJP;

  // Two prefetch stages (a ring): raw 16-byte vectors of the next two items in load order
  // (vector v of a stage at byte 16 v), filled by cp.async while the current item is converted
  // and computed, so loads stay in flight through every phase of the loop.
  const int stage_off = (v_base + KJ * HC * Cfg::DP + HCQ * R * KJP + HCQ * R + 3) / 4 * 4;  // 16-byte aligned
  const int slot_vecs = min((R * HCQ + 2 * KJ * HC) * Cfg::CPR, Cfg::STAGE_VECS);
  uint4* stages = reinterpret_cast<uint4*>(smem + stage_off);

  const int first = blockIdx.x * p.items_per_cta;
  const int last = min(p.num_items, first + p.items_per_cta);
  if (first >= last) return;

  int len0 = R, len1 = R;  // block_lens of the items in stage 0 and stage 1
  // Issues the copies of `item` into stage `slot`; always commits a group (empty past the
  // range), so that "all but the newest group done" always means "the current item is in".
  auto prefetch = [&](int item, int slot) {
    if (item < last) {
      const TokenDecoderItem<T, D> it(p, item);
      uint4* stage = stages + slot * slot_vecs;
      int off;
      for (int vec = tid; vec < slot_vecs; vec += Cfg::THREADS)
        cp_async_16(stage + vec, it.source(vec, off, k_base, v_base), true);
      const int len = p.block_lens ? __ldg(p.block_lens + it.block) : R;
      if (slot) len1 = len; else len0 = len;
    }
    cp_async_commit();
  };

  prefetch(first, 0);
  prefetch(first + 1, 1);
  for (int item = first; item < last; ++item) {
    const int slot = (item - first) & 1;
    const TokenDecoderItem<T, D> it(p, item);
    const int total = it.total_vecs();
    const int blen = min(max(slot ? len1 : len0, 0), R);
    cp_async_wait<1>();  // this item's group is complete (the next item's may still be in flight)
    __syncthreads();     // ... for every thread's copies; and the previous compute is done with smem
    {
      const uint4* stage = stages + slot * slot_vecs;
      int off;
      for (int vec = tid; vec < slot_vecs; vec += Cfg::THREADS) {
        it.source(vec, off, k_base, v_base);
        store_converted<T>(smem + off, stage[vec]);
      }
      // Items larger than a stage (long blocks): the rest is loaded here, in step.
      for (int vec = Cfg::STAGE_VECS + tid; vec < total; vec += Cfg::THREADS) {
        const uint4 raw = __ldg(it.source(vec, off, k_base, v_base));
        store_converted<T>(smem + off, raw);
      }
    }
    __syncthreads();  // fp32 copies ready; this stage is free again
    prefetch(item + 2, slot);  // in flight during this item's compute and the next one's

    // ---- scores S[h, i, j] = scale * log2(e) * q[i, h] . k[j, h / G], j <= P + i ----------
    const int jtiles = int(p.jtiles.d);
    const int score_units = HCQ * R * jtiles;
    for (int u = tid; u < score_units; u += Cfg::THREADS) {
      const int r = fast_div(u, p.jtiles);  // score row = head * R + i
      const int j0 = (u - r * jtiles) * Cfg::JT;
      const int h = fast_div(r, p.rows_div);
      const int i = r - h * R;
      if (i >= blen || j0 > P + i) continue;  // padding row, or a tile of future keys
      const int kh = fast_div(h, p.group);
      const float* qrow = Qf + (i * HCQ + h) * Cfg::DP;
      // 32-bit row offsets (not 64-bit pointers) keep the register count down; keys past the
      // block are clamped to a real row and their sums dropped below.
      int krow[Cfg::JT];
#pragma unroll
      for (int t = 0; t < Cfg::JT; ++t) krow[t] = (min(j0 + t, KJ - 1) * HC + kh) * Cfg::DP;
      float acc[Cfg::JT];
#pragma unroll
      for (int t = 0; t < Cfg::JT; ++t) acc[t] = 0.f;
#pragma unroll 2
      for (int d = 0; d < D; d += 4) {
        const float4 qv = *reinterpret_cast<const float4*>(qrow + d);
#pragma unroll
        for (int t = 0; t < Cfg::JT; ++t) fma4(acc[t], qv, *reinterpret_cast<const float4*>(Kf + krow[t] + d));
      }
      float* srow = Sf + r * KJP;
#pragma unroll
      for (int t = 0; t < Cfg::JT; ++t)
        if (j0 + t <= P + i) srow[j0 + t] = acc[t] * p.scale_log2;
    }
    __syncthreads();

    // ---- softmax per row (base 2), lse in natural log -----------------------------------
    for (int r = tid; r < HCQ * R; r += Cfg::THREADS) {
      const int h = fast_div(r, p.rows_div);
      const int i = r - h * R;
      float* lse_dst = p.lse ? p.lse + (int64_t(it.block) * R + i) * p.num_q_heads + it.hq0 + h : nullptr;
      if (i >= blen) {
        if (lse_dst) *lse_dst = -INFINITY;
        continue;
      }
      float* srow = Sf + r * KJP;
      const int n_keys = P + i + 1;
      float mx = -INFINITY;
      for (int j = 0; j < n_keys; ++j) mx = fmaxf(mx, srow[j]);
      const float base = mx == -INFINITY ? 0.f : mx;  // all -inf (infinite inputs): weights 0
      float sum = 0.f;
      for (int j = 0; j < n_keys; ++j) {
        const float e = exp2f(srow[j] - base);
        srow[j] = e;
        sum += e;
      }
      inv_sum[r] = sum > 0.f ? 1.f / sum : 0.f;
      if (lse_dst) *lse_dst = sum > 0.f ? (base + log2f(sum)) * kLn2 : -INFINITY;
    }
    __syncthreads();

    // ---- out[i, h, :] = sum_j p[h, i, j] v[j, h / G, :] ------------------------------------
    // A thread owns dims [4c, 4c + 4) and [D/2 + 4c, D/2 + 4c + 4) of one row: consecutive
    // lanes read consecutive float4s of a V row.
    constexpr int HALF = D / 2;
    for (int u = tid; u < HCQ * R * Cfg::CPR; u += Cfg::THREADS) {
      const int r = u / Cfg::CPR;
      const int c = u & (Cfg::CPR - 1);
      const int h = fast_div(r, p.rows_div);
      const int i = r - h * R;
      float acc[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = 0.f;
      if (i < blen) {
        const int kh = fast_div(h, p.group);
        const float* vcol = Vf + kh * Cfg::DP + c * 4;
        const float* prow = Sf + r * KJP;
        const int vstride = HC * Cfg::DP;
        const int n_keys = P + i + 1;
        for (int j = 0; j < n_keys; ++j) {
          const float w = prow[j];
          const float4 a = *reinterpret_cast<const float4*>(vcol + j * vstride);
          const float4 b = *reinterpret_cast<const float4*>(vcol + j * vstride + HALF);
          acc[0] = fmaf(w, a.x, acc[0]);
          acc[1] = fmaf(w, a.y, acc[1]);
          acc[2] = fmaf(w, a.z, acc[2]);
          acc[3] = fmaf(w, a.w, acc[3]);
          acc[4] = fmaf(w, b.x, acc[4]);
          acc[5] = fmaf(w, b.y, acc[5]);
          acc[6] = fmaf(w, b.z, acc[6]);
          acc[7] = fmaf(w, b.w, acc[7]);
        }
        const float inv = inv_sum[r];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] *= inv;
      }
      T* dst = static_cast<T*>(p.out) + ((int64_t(it.block) * R + i) * p.num_q_heads + it.hq0 + h) * D + c * 4;
      const uint2 lo = make_uint2(pack2(acc[0], acc[1], T{}), pack2(acc[2], acc[3], T{}));
      const uint2 hi = make_uint2(pack2(acc[4], acc[5], T{}), pack2(acc[6], acc[7], T{}));
      __stcs(reinterpret_cast<uint2*>(dst), lo);
      __stcs(reinterpret_cast<uint2*>(dst + HALF), hi);
    }
  }
}

}  // namespace kvcore
