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
//   converted to fp32 once, so the inner loops do no conversions. A thread always copies the
//   same 16-byte column c of the head rows (THREADS is a multiple of D / 8), so the index work
//   per vector is one multiply-high division. Rows in shared memory are head-major and padded
//   by 4 floats, so float4 reads of different rows of one head fall on different banks.
// * Scores: a thread owns one query row against JT = 2 keys and walks D in float4 steps
//   (3 shared loads per 8 FMAs, no shuffles; JT = 4 loads less per FMA but left most lanes idle
//   at these sizes, e.g. 96 units for 256 threads); only the key tiles the causal mask leaves
//   are enumerated (a per-CTA table), so no lane idles on a masked tile.
//   Softmax: a thread per row, exp2 on pre-scaled logits. PV: a thread owns two adjacent rows
//   (sharing every V load) and 8 output dims (two float4 halves, so a quarter warp reads
//   contiguous shared memory).
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
  int chunk_kv_heads;   // HC (divides num_kv_heads)
  int chunk_q_heads;    // HC * group
  float scale_log2;     // scale * log2(e): logits are kept in base 2
  FastDiv chunks;       // item -> (block, chunk)
  FastDiv chunk_q;      // q unit (row * HCq + head) -> row
  FastDiv chunk_kv;     // k/v unit (key * HC + head) -> key
  FastDiv rows_div;     // score row (head * L + row) -> head
  FastDiv group;        // query head -> KV head
  FastDiv valid_tiles;  // score unit -> (head, entry of the valid-tile table)
};

template <int D>
struct TokenDecoderConfig {
  static constexpr int THREADS = 256;
  static constexpr int VPT = 8;      // 16-byte vectors per thread in a full prefetch stage
  static constexpr int CPR = D / 8;  // 16-byte chunks per head row
  static constexpr int DP = D + 4;   // padded fp32 row in shared memory
  static constexpr int JT = 2;       // keys per thread in the score loop (2: more, shorter units)
  static constexpr int STAGE_VECS = THREADS * VPT;
  static constexpr int STAGE_BYTES = STAGE_VECS * 16;
};

// Score tiles (JT keys each) of one head that the causal mask leaves: row i needs keys
// 0..P + i, i.e. ceil((P + i + 1) / JT) tiles.
inline int token_decoder_valid_tiles(int rows, int prefix, int jt) {
  int n = 0;
  for (int i = 0; i < rows; ++i) n += (prefix + i + jt) / jt;
  return n;
}

// Shared-memory bytes of a CTA: fp32 q, k, v rows (padded), scores, 1/sum per row (padded to
// 16 bytes), the two prefetch stages of raw 16-byte vectors, and the valid score-tile table.
inline int64_t token_decoder_smem_bytes(int rows, int keys, int keys_pad, int hc, int hcq, int dp, int cpr,
                                        int stage_vecs, int valid_tiles) {
  const int64_t floats =
      ((int64_t(rows) * hcq + 2 * int64_t(keys) * hc) * dp + int64_t(hcq) * rows * keys_pad + int64_t(hcq) * rows + 3) /
      4 * 4;
  const int64_t vecs = (int64_t(rows) * hcq + 2 * int64_t(keys) * hc) * cpr;
  return 4 * floats + 2 * 16 * (vecs < stage_vecs ? vecs : stage_vecs) + 4 * int64_t(valid_tiles);
}

// Calls f(vec, src, smem_offset) for each of this thread's 16-byte vectors of an item: q rows,
// then k, then v (vec numbers them in that order, the global order). A thread always takes
// column c = tid % (D/8) of a head row, so only the (row, head) split of its unit index needs a
// division. In shared memory the rows are head-major ([head][row][D + 4]): consecutive keys of
// one head are then D + 4 floats apart, an odd number of 16-byte bank groups, so the score
// loop's lanes, which read different keys at the same d, hit different banks.
template <typename T, int D, int THREADS, typename F>
__device__ __forceinline__ void for_each_item_vector(const TokenDecoderParams& p, int block, int chunk, int k_base,
                                                     int v_base, F&& f) {
  constexpr int CPR = D / 8, DP = D + 4, STEP = THREADS / CPR;
  static_assert(THREADS % CPR == 0, "each thread keeps one column");
  const int c = threadIdx.x & (CPR - 1);
  const int first_unit = threadIdx.x / CPR;
  const int HCQ = p.chunk_q_heads, HC = p.chunk_kv_heads;
  const T* q = static_cast<const T*>(p.q) + int64_t(block) * p.q_stride_n + chunk * HCQ * D + c * 8;
  for (int unit = first_unit; unit < p.rows * HCQ; unit += STEP) {  // unit = row * HCQ + head
    const int row = fast_div(unit, p.chunk_q);
    const int head = unit - row * HCQ;
    f(unit * CPR + c, q + (row * p.num_q_heads + head) * D, (head * p.rows + row) * DP + c * 8);
  }
  const int q_vecs = p.rows * HCQ * CPR, kv_vecs = p.keys * HC * CPR;
#pragma unroll
  for (int t = 0; t < 2; ++t) {  // k, then v
    const T* base = static_cast<const T*>(t ? p.v : p.k) + int64_t(block) * (t ? p.v_stride_n : p.k_stride_n) +
                    chunk * HC * D + c * 8;
    const int vec0 = q_vecs + t * kv_vecs, smem0 = t ? v_base : k_base;
    for (int unit = first_unit; unit < p.keys * HC; unit += STEP) {  // unit = key * HC + head
      const int key = fast_div(unit, p.chunk_kv);
      const int head = unit - key * HC;
      f(vec0 + unit * CPR + c, base + (key * p.num_kv_heads + head) * D, smem0 + (head * p.keys + key) * DP + c * 8);
    }
  }
}

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
  // The score tiles the causal mask leaves in one head: (row << 16) | tile, rows in order.
  int* tiles = reinterpret_cast<int*>(stages + 2 * slot_vecs);
  const int n_tiles = int(p.valid_tiles.d);
  for (int i = tid; i < R; i += Cfg::THREADS) {
    int at = 0;
    for (int i2 = 0; i2 < i; ++i2) at += (P + i2 + Cfg::JT) / Cfg::JT;
    for (int t = 0; t < (P + i + Cfg::JT) / Cfg::JT; ++t) tiles[at + t] = (i << 16) | t;
  }  // read only after the item loop's first barrier

  const int first = blockIdx.x * p.items_per_cta;
  const int last = min(p.num_items, first + p.items_per_cta);
  if (first >= last) return;

  int len0 = R, len1 = R;  // block_lens of the items in stage 0 and stage 1
  // Issues the copies of `item` into stage `slot`; always commits a group (empty past the
  // range), so that "all but the newest group done" always means "the current item is in".
  auto prefetch = [&](int item, int slot) {
    if (item < last) {
      const int block = fast_div(item, p.chunks);
      uint4* stage = stages + slot * slot_vecs;
      for_each_item_vector<T, D, Cfg::THREADS>(p, block, item - block * int(p.chunks.d), k_base, v_base,
                                               [&](int vec, const T* src, int) {
                                                 if (vec < slot_vecs) cp_async_16(stage + vec, src, true);
                                               });
      const int len = p.block_lens ? __ldg(p.block_lens + block) : R;
      if (slot) len1 = len; else len0 = len;
    }
    cp_async_commit();
  };

  prefetch(first, 0);
  prefetch(first + 1, 1);
  for (int item = first; item < last; ++item) {
    const int slot = (item - first) & 1;
    const int block = fast_div(item, p.chunks);
    const int chunk = item - block * int(p.chunks.d);
    const int hq0 = chunk * HCQ;
    const int blen = min(max(slot ? len1 : len0, 0), R);
    cp_async_wait<1>();  // this item's group is complete (the next item's may still be in flight)
    __syncthreads();     // ... for every thread's copies; and the previous compute is done with smem
    {
      // Each stage vector is converted by the thread that copied it; vectors past a stage (long
      // blocks only) are loaded here, in step.
      const uint4* stage = stages + slot * slot_vecs;
      for_each_item_vector<T, D, Cfg::THREADS>(
          p, block, chunk, k_base, v_base, [&](int vec, const T* src, int off) {
            uint4 raw;
            if (vec < slot_vecs)
              raw = stage[vec];
            else
              raw = __ldg(reinterpret_cast<const uint4*>(src));
            store_converted<T>(smem + off, raw);
          });
    }
    __syncthreads();           // fp32 copies ready; this stage is free again
    prefetch(item + 2, slot);  // in flight during this item's compute and the next one's

    // ---- scores S[h, i, j] = scale * log2(e) * q[i, h] . k[j, h / G], j <= P + i ----------
    for (int u = tid; u < HCQ * n_tiles; u += Cfg::THREADS) {
      const int h = fast_div(u, p.valid_tiles);
      const int entry = tiles[u - h * n_tiles];
      const int i = entry >> 16;
      const int j0 = (entry & 0xffff) * Cfg::JT;
      if (i >= blen) continue;  // padding row of a partial block
      const int r = h * R + i;  // score row
      const int kh = fast_div(h, p.group);
      const float* qrow = Qf + (h * R + i) * Cfg::DP;
      // 32-bit row offsets (not 64-bit pointers) keep the register count down; keys past the
      // block are clamped to a real row and their sums dropped below.
      int krow[Cfg::JT];
#pragma unroll
      for (int t = 0; t < Cfg::JT; ++t) krow[t] = (kh * KJ + min(j0 + t, KJ - 1)) * Cfg::DP;
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
      float* lse_dst = p.lse ? p.lse + (int64_t(block) * R + i) * p.num_q_heads + hq0 + h : nullptr;
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
      // sum == 0: nothing attended (out 0, lse -inf). A NaN sum (NaN in q or an attended key)
      // stays NaN in out and lse, so a later merge cannot mistake the row for an empty part.
      inv_sum[r] = sum == 0.f ? 0.f : 1.f / sum;
      if (lse_dst) *lse_dst = sum == 0.f ? -INFINITY : (base + log2f(sum)) * kLn2;
    }
    __syncthreads();

    // ---- out[i, h, :] = sum_j p[h, i, j] v[j, h / G, :] ------------------------------------
    // A thread owns rows 2m and 2m + 1 of one head (they share every V load; row 2m + 1 has one
    // key more) and dims [4c, 4c + 4) and [D/2 + 4c, D/2 + 4c + 4): consecutive lanes read
    // consecutive float4s of a V row.
    constexpr int HALF = D / 2;
    const int pairs = (R + 1) / 2;
    for (int u = tid; u < HCQ * pairs * Cfg::CPR; u += Cfg::THREADS) {
      const int hm = u / Cfg::CPR;  // head * pairs + m
      const int c = u & (Cfg::CPR - 1);
      const int h = hm / pairs;
      const int i0 = 2 * (hm - h * pairs), i1 = i0 + 1;
      const bool valid0 = i0 < blen, valid1 = i1 < blen;  // blen <= R, so valid1 implies i1 < R
      float acc0[8], acc1[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc0[e] = acc1[e] = 0.f;
      if (valid0) {
        const int kh = fast_div(h, p.group);
        const float* vcol = Vf + kh * KJ * Cfg::DP + c * 4;
        const float* p0 = Sf + (h * R + i0) * KJP;
        const float* p1 = valid1 ? p0 + KJP : p0;  // an invalid row 1 just repeats row 0 (unused)
        constexpr int vstride = Cfg::DP;
        const int n0 = P + i0 + 1;
#pragma unroll 2
        for (int j = 0; j < n0; ++j) {
          const float w0 = p0[j], w1 = p1[j];
          const float4 a = *reinterpret_cast<const float4*>(vcol + j * vstride);
          const float4 b = *reinterpret_cast<const float4*>(vcol + j * vstride + HALF);
          const float va[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            acc0[e] = fmaf(w0, va[e], acc0[e]);
            acc1[e] = fmaf(w1, va[e], acc1[e]);
          }
        }
        const float inv0 = inv_sum[h * R + i0];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc0[e] *= inv0;
        if (valid1) {  // row 1's last key, j = P + i1
          const float w1 = p1[n0];
          const float4 a = *reinterpret_cast<const float4*>(vcol + n0 * vstride);
          const float4 b = *reinterpret_cast<const float4*>(vcol + n0 * vstride + HALF);
          const float va[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
          const float inv1 = inv_sum[h * R + i1];
#pragma unroll
          for (int e = 0; e < 8; ++e) acc1[e] = fmaf(w1, va[e], acc1[e]) * inv1;
        }
      }
      if (!valid1) {  // (accumulated from row 0's weights above)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc1[e] = 0.f;
      }
      // Rows past blen are written as zeros; a row past the block (odd L) is not written.
      const int64_t row0 = (int64_t(block) * R + i0) * p.num_q_heads + hq0 + h;
      T* dst = static_cast<T*>(p.out) + row0 * D + c * 4;
      __stcs(reinterpret_cast<uint2*>(dst), make_uint2(pack2(acc0[0], acc0[1], T{}), pack2(acc0[2], acc0[3], T{})));
      __stcs(reinterpret_cast<uint2*>(dst + HALF),
             make_uint2(pack2(acc0[4], acc0[5], T{}), pack2(acc0[6], acc0[7], T{})));
      if (i1 < R) {
        dst += int64_t(p.num_q_heads) * D;  // row i1 of the same head
        __stcs(reinterpret_cast<uint2*>(dst), make_uint2(pack2(acc1[0], acc1[1], T{}), pack2(acc1[2], acc1[3], T{})));
        __stcs(reinterpret_cast<uint2*>(dst + HALF),
               make_uint2(pack2(acc1[4], acc1[5], T{}), pack2(acc1[6], acc1[7], T{})));
      }
    }
  }
}

}  // namespace kvcore
