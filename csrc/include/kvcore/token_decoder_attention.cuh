// Block Transformer token-decoder attention (prefill of many blocks) on tensor cores: token i of
// block n attends to the block's P prefix slots and its tokens 0..i. Framework-free; launcher in
// csrc/block_transformer/token_decoder_attention.cu.
//
// ---- Why tensor cores, counted (warp instructions; an H100 SM issues at most 4 per cycle) ------
// Per block, with L tokens, P prefix slots, Hq = G Hkv heads, head dim D, 2-byte elements:
//   bytes = q + k + v + out = (2 L Hq + 2 (P + L) Hkv) D 2
//   FLOPs = 4 Hq D sum_{i<L} (P + i + 1)                (unmasked products only)
// At 3 TB/s an SM receives ~13 bytes per cycle (132 SMs, 1.75 GHz).
//  * L16 P2 D128 G1 (B8 H16 S16384): per (block, head) 17.4 KB = ~1330 SM cycles of DRAM time
//    and 74 K FLOPs = 1150 warp FMAs on CUDA cores plus their shared-memory operand loads (the
//    previous fp32 kernel issued ~2.3 of 4 slots per cycle and measured 39.6% of copy). Here the
//    16 queries of a head are the 16 rows of an m16n8k16 tile; 18 keys = key tiles of 16 + 2. Per
//    item (2 heads, 4 warp units of 64 output columns each): per unit ~50 setup, tile 1 ~160
//    (8 + 8 ldmatrix, 16 mma for S; ~90 mask/softmax; 8 mma + 4 ldmatrix for P V), tile 2 ~170
//    (one n-tile of S only, rescale), epilogue ~110: ~490; x 4 = ~1960, plus ~600 for the copies
//    (13 16-byte vectors per thread) and ~380 for the V scan: ~3 K per ~2650 cycles, ~1.1 issue
//    slots per cycle.
//  * L4 P2 D64 G1 (B32 H12 S8192): per (block, head) 2.6 KB = ~200 cycles, 4.6 K FLOPs. One head
//    fills only L G = 4 rows of a tile, so HP = 4 heads share a tile (rows 4 s .. 4 s + 3 are head
//    s) over a virtual key axis of 4 x 8 keys (head s: keys 8 s .. 8 s + 5, the rest masked, and
//    P V's k16 steps pair two heads' 8-key slots, each lane pointing ldmatrix at its own head's V
//    row): per tile of 4 heads ~490 instructions as above (2 key tiles of 16, 8 n-tiles of 64
//    columns), i.e. 3 units = ~1.5 K per block of 12 heads, plus ~560 for copies and ~380 for
//    the V scan (below): ~2.5 K per ~2350 cycles (30 KB), ~1.1 slots per cycle. Without
//    packing it was ~5 K (12 units of ~330 at 25% row use), no better than the old kernel's ~4 K
//    which measured 61.8%; a CUDA-core path would need ~72 FMAs + ~70 shared loads per head
//    before any softmax or copy work, so it was not kept. Packing applies when L G <= 8 and HP x (P + L rounded up to a power of 2 >= 8)
//    <= 32; otherwise one head per unit, ceil(L G / 16) m-tiles.
//
// ---- Memory pipeline ----------------------------------------------------------------------------
// A work item is (block, chunk of HC KV heads with their G HC query heads): the largest chunk
// whose q + k + v bytes fit 32 KB (the whole block at L4/H12: 24 KB; 2 of 16 heads at L16/D128:
// 26 KB). Its inputs are three runs of contiguous rows (q: L runs of HC G D elements, k and v:
// P + L runs of HC D), copied by 16-byte cp.async into one stage of a ring of 2 or 3 stages (the
// launcher's choice: the depth that fits the most CTAs per SM), one commit group per item; a
// thread always copies the same 16-byte column, so a warp's copies cover 512 contiguous bytes. A
// CTA (4 warps) walks a contiguous range of items (consecutive blocks: reads stream in address
// order) with STAGES - 1 items in flight while it computes one: with 2 stages and 3 (L16) or 4
// (L4) CTAs per SM, 75-100 KB in flight per SM, still ~2-3x what Little's law asks at ~1 us
// latency; more warps per SM mattered more than a deeper ring (session 14). One
// __syncthreads per item; the block length of each stage's item travels through shared memory.
//
// Shared memory keeps the global row order (q row (i, h) at i HC G + h, k/v row (j, h) at
// j HC + h), so a copy's destination is its source offset, with the 16-byte chunks of a row
// XOR-swizzled by the position of the row in the sequence that one ldmatrix reads (q: its tile
// row; k/v: the key j), so the 8 rows of each ldmatrix phase hit 8 different bank groups
// (checked for every phase by the emulation in bench/experiments/token_decoder_emulate.py).
// ldmatrix takes one row address per lane, so rows outside the block (tile rows past L G, keys
// past P + L, heads past the chunk) point at a zero row instead of being stored padded.
//
// ---- Compute ------------------------------------------------------------------------------------
// A warp unit is (group of HP KV heads of the chunk, m-tile of 16 query rows, part of D): rows
// of one KV head (r = i G + g) share its keys, so GQA groups fill tiles. When an item has at most
// 2 (head group, m-tile) pairs for 4 warps (L16/D128: 2), the output columns are split in
// DSPLIT = 2 parts, each warp recomputing the (cheap) scores. Per key tile of 16 virtual keys
// (only those the causal mask of the unit's last valid row reaches): S = Q K^T (an n-tile past
// the last needed key skipped), scale into base 2, mask (x outside the row's own head's keys
// 0 .. P + i, rows past L G or block_lens), online softmax (flash style), then O += P V with P
// re-packed from the S accumulators as the A operand.
//
// Semantics (those of tests/test_nan.py): rows i >= block_lens[n] (clamped to [0, L]) give out 0
// and lse -inf. NaN in q[n, i, h] or in an attended K row makes the row's out and lse NaN (a NaN
// logit leaves fmaxf's max alone and turns l NaN; only l = 0 means "nothing attended"); masked
// logits are replaced, never added. NaN in an attended V element poisons that element only; a
// V row a query does not attend (a later token, one past block_lens, with packing another head)
// must not reach it, but the mma would multiply it by a zero weight (0 * NaN = NaN), so each
// unit first scans the V rows and columns it will read (~4-6 16-byte vectors per lane, ~15% of
// the instructions) and, if any is Inf/NaN, computes its rows by an exact per-row path instead.
//
// Safety: every address is computed from the shapes; block_lens only changes which rows are
// masked, so bad lengths change numbers, never the memory touched.
#pragma once

#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include "kvcore/device_utils.cuh"

namespace kvcore {

// n / d for 0 <= n < 2^31 by a multiply-high and a shift (Granlund-Montgomery): the copy loop
// decodes a flat vector index into (row, column) per 16-byte vector.
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
  int stages;    // ring depth: 2 or 3
  int rows;      // L
  int prefix;    // P
  int keys;      // P + L
  int num_q_heads, num_kv_heads, group;
  int chunk_kv_heads;  // HC (divides num_kv_heads)
  int chunk_q_heads;   // HC * G
  // Head packing (L G <= 8): HP KV heads share an m-tile, head s of the tile owning tile rows
  // [s LGP, (s + 1) LGP) and virtual keys [s NKP, (s + 1) NKP) (LGP = 16 / HP, NKP: P + L
  // rounded up to a power of two >= 8). HP = 1: one head per unit, m_tiles tiles of 16 rows,
  // and both shifts are 30, so that "head of the tile" is always 0.
  int heads_per_tile;  // HP, a power of two
  int row_shift;       // log2(LGP)
  int key_shift;       // log2(NKP)
  int head_groups;     // ceil(HC / HP)
  int m_tiles;         // ceil(L G / 16) (HP = 1) or 1
  int stage_elems;     // elements of one stage: (L HC G + 2 (P + L) HC) D
  float scale_log2;    // scale * log2(e): logits are kept in base 2
  FastDiv chunks;      // item -> (block, chunk)
  FastDiv chunk_q;     // q row of an item (i HC G + h) -> i
  FastDiv chunk_kv;    // k/v row of an item (j HC + h) -> j
  FastDiv group_div;   // query head (or tile row i G + g) -> (KV head, g) (or (i, g))
};

template <int D>
struct TokenDecoderConfig {
  static constexpr int WARPS = 4;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int TD = D / 8;  // 16-byte chunks per row
  static constexpr int ITEM_BYTES = 32 * 1024;  // target input bytes of a work item
  static_assert(D == 64 || D == 128 || D == 256, "head_dim must be 64, 128 or 256");
};

// Shared-memory bytes of a CTA: the ring, the zero row, and the block length of each stage.
inline int64_t token_decoder_smem_bytes(int64_t stage_elems, int stages, int head_dim) {
  return 2 * (stage_elems * stages + head_dim) + 16;
}

// Swizzled element offset of 16-byte chunk `chunk` of shared-memory row `row`, XOR key `key`.
__device__ __forceinline__ int td_swz(int row, int chunk, int key, int D) {
  return row * D + ((chunk ^ (key & 7)) << 3);
}

// Bit 15 of a 16-bit half of the result is set where that half of `w` is Inf or NaN (exponent
// all ones): adding the smallest such magnitude minus one carries into bit 15 exactly then, and
// never across halves (0x7fff + 0x0400 < 0x10000).
__device__ __forceinline__ uint32_t nonfinite_bits(uint32_t w, __nv_bfloat16) {
  return ((w & 0x7fff7fffu) + 0x00800080u) & 0x80008000u;
}
__device__ __forceinline__ uint32_t nonfinite_bits(uint32_t w, __half) {
  return ((w & 0x7fff7fffu) + 0x04000400u) & 0x80008000u;
}
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ void store_elem(__nv_bfloat16* dst, float x) { *dst = __float2bfloat16(x); }
__device__ __forceinline__ void store_elem(__half* dst, float x) { *dst = __float2half(x); }

// The exact path of a warp unit, taken when the V rows its P V product would read hold an Inf or
// NaN: the mma would multiply them by the zero weights of rows that must not see them (a later
// token, a token past block_lens, another head of a packed tile), and 0 * NaN = NaN. Here each
// row reads only its own keys 0 .. P + i: a warp per row, lanes over D for the scores (a warp
// sum) and over the unit's DW output columns, fp32 online softmax. Rare (non-finite inputs
// only), so it favours plainness over speed; same outputs and NaN semantics as the fast path.
// STAGED: out rows go into the staging tile `so` (the lean kernel: row i HCG + h, 16-byte chunks
// swizzled by the tile row, as the q rows) instead of global memory; lse always goes to global
// memory directly.
template <typename T, int D, int DW, bool STAGED>
__device__ __forceinline__ void token_decoder_unit_exact_rows(const TokenDecoderParams& p, const T* sq, const T* sk,
                                                              const T* sv, T* so, int block, int chunk, int hb,
                                                              int row0, int dpart, int blen) {
  constexpr int QPL = D / 32, OPL = DW / 32;  // score dims and output columns per lane (<= 8)
  static_assert(QPL >= 1 && OPL >= 1 && 8 % QPL == 0 && 8 % OPL == 0, "a lane's dims lie in one 16-byte chunk");
  const int lane = threadIdx.x & 31;
  const int L = p.rows, P = p.prefix, G = p.group, HC = p.chunk_kv_heads, HCG = p.chunk_q_heads, LG = L * G;
  const int row_mask = (1 << p.row_shift) - 1;
  const int d0 = lane * QPL, od0 = dpart * DW + lane * OPL;
  for (int t = 0; t < 16; ++t) {
    const int rr = row0 + t;  // tile row: its swizzle key
    const int rl = rr & row_mask, hh = hb + (rr >> p.row_shift);
    if (rl >= LG || hh >= HC) continue;  // padding row of the tile
    const int i = fast_div(rl, p.group_div);
    const int g = rl - i * G;
    const int hl = hh * G + g;  // query head within the chunk
    int64_t orow;
    T* dst;
    if constexpr (STAGED) {
      orow = (int64_t(block) * L + i) * p.num_q_heads + chunk * HCG + hl;
      dst = so + (i * HCG + hl) * D + ((((od0 >> 3) ^ (rr & 7)) << 3) | (od0 & 7));
    } else {
      orow = (int64_t(block) * L + i) * p.num_q_heads + (chunk * HC + hh) * G + g;
      dst = static_cast<T*>(p.out) + orow * D + od0;
    }
    if (i >= blen) {
#pragma unroll
      for (int e = 0; e < OPL; ++e) store_elem(dst + e, 0.f);
      if (p.lse != nullptr && dpart == 0 && lane == 0) p.lse[orow] = -INFINITY;
      continue;
    }
    const T* const qp = sq + (i * HCG + hl) * D + ((((d0 >> 3) ^ (rr & 7)) << 3) | (d0 & 7));
    float qv[QPL];
#pragma unroll
    for (int e = 0; e < QPL; ++e) qv[e] = to_float(qp[e]);
    float m = -INFINITY, l = 0.f, acc[OPL];
#pragma unroll
    for (int e = 0; e < OPL; ++e) acc[e] = 0.f;
    for (int j = 0; j <= P + i; ++j) {
      const T* const kp = sk + (j * HC + hh) * D + ((((d0 >> 3) ^ (j & 7)) << 3) | (d0 & 7));
      float part = 0.f;
#pragma unroll
      for (int e = 0; e < QPL; ++e) part = fmaf(qv[e], to_float(kp[e]), part);
      const float x = group_sum<32>(part) * p.scale_log2;
      const float mx = fmaxf(m, x);                   // a NaN logit leaves the max alone ...
      const float base = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(m - base), w = exp2f(x - base);  // ... and makes w, l, acc NaN
      m = mx;
      l = l * alpha + w;
      const T* const vp = sv + (j * HC + hh) * D + ((((od0 >> 3) ^ (j & 7)) << 3) | (od0 & 7));
#pragma unroll
      for (int e = 0; e < OPL; ++e) acc[e] = fmaf(w, to_float(vp[e]), acc[e] * alpha);
    }
    const float inv = l == 0.f ? 0.f : 1.f / l;
#pragma unroll
    for (int e = 0; e < OPL; ++e) store_elem(dst + e, acc[e] * inv);
    if (p.lse != nullptr && dpart == 0 && lane == 0) p.lse[orow] = l == 0.f ? -INFINITY : (m + log2f(l)) * kLn2;
  }
}

// The exact path of the classic kernel (out rows to global memory), a call of its own: it is rare.
template <typename T, int D, int DW>
__device__ __noinline__ void token_decoder_unit_exact(const TokenDecoderParams& p, const T* sq, const T* sk,
                                                      const T* sv, int block, int chunk, int hb, int row0, int dpart,
                                                      int blen) {
  token_decoder_unit_exact_rows<T, D, DW, false>(p, sq, sk, sv, nullptr, block, chunk, hb, row0, dpart, blen);
}

// ---- Shared by both kernels' unit loops ---------------------------------------------------------

// The launch's shapes as the kernels use them, read from the parameters once per CTA.
struct TdDims {
  int L, P, KJ, G;               // tokens of a block, prefix slots, keys P + L, query heads per KV head
  int HC, HCG, LG;               // KV and query heads of a chunk, tile rows of a KV head (L G)
  int HP, row_shift, key_shift;  // head packing (see TokenDecoderParams)
  int row_mask, key_mask;        // tile row -> row within its head; virtual key -> key j
};

__device__ __forceinline__ TdDims token_decoder_dims(const TokenDecoderParams& p) {
  TdDims d;
  d.L = p.rows;
  d.P = p.prefix;
  d.KJ = p.keys;
  d.G = p.group;
  d.HC = p.chunk_kv_heads;
  d.HCG = p.chunk_q_heads;
  d.LG = d.L * d.G;
  d.HP = p.heads_per_tile;
  d.row_shift = p.row_shift;
  d.key_shift = p.key_shift;
  d.row_mask = (1 << d.row_shift) - 1;
  d.key_mask = (1 << d.key_shift) - 1;
  return d;
}

// A warp unit of an item (see "Compute" above), decoded from its index u < head groups x m-tiles
// x DSPLIT.
struct TdUnit {
  int dpart;  // part of D: output columns dpart DW .. dpart DW + DW - 1
  int hb;     // first KV head of its head group within the chunk
  int row0;   // first tile row of its m-tile
  int heads;  // KV heads of its head group (HP, or fewer in the chunk's last group)
};

template <int DSPLIT>
__device__ __forceinline__ TdUnit token_decoder_unit(const TokenDecoderParams& p, const TdDims& d, int u) {
  const int dpart = DSPLIT == 1 ? 0 : u % DSPLIT;
  const int hm = DSPLIT == 1 ? u : u / DSPLIT;
  const int hg = hm / p.m_tiles;  // head group of the chunk
  const int mt = hm - hg * p.m_tiles;
  const int hb = hg * d.HP;
  return TdUnit{dpart, hb, mt * 16, min(d.HP, d.HC - hb)};
}

// Virtual keys x = s NKP + j (head s of the tile, key j) a unit needs: up to key P + i of the
// last valid row of its last head; 0 when all its rows are padding.
__device__ __forceinline__ int token_decoder_unit_keys(const TokenDecoderParams& p, const TdDims& d, TdUnit unit,
                                                       int blen) {
  const int i_first = fast_div(unit.row0, p.group_div);
  const int i_last = min(fast_div(min(unit.row0 + 15, d.LG - 1), p.group_div), blen - 1);
  return i_last >= i_first ? ((unit.heads - 1) << d.key_shift) + d.P + i_last + 1 : 0;
}

template <typename T, int D, int DSPLIT>
__global__ void __launch_bounds__(TokenDecoderConfig<D>::THREADS, 1)
    token_decoder_attention_kernel(const __grid_constant__ TokenDecoderParams p) {
  using Cfg = TokenDecoderConfig<D>;
  constexpr int TD = Cfg::TD, DW = D / DSPLIT;  // DW: output columns of a warp unit
  static_assert(DW % 16 == 0, "a warp's output columns are whole k16 tiles of V");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const ring = reinterpret_cast<T*>(smem_raw);
  T* const zero_row = ring + int64_t(p.stages) * p.stage_elems;
  int* const stage_len = reinterpret_cast<int*>(zero_row + D);  // block length of each stage's item

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const TdDims d = token_decoder_dims(p);
  const int k_off = d.L * d.HCG * D, v_off = k_off + d.KJ * d.HC * D;  // k and v regions within a stage

  for (int i = tid; i < D / 8; i += Cfg::THREADS)
    reinterpret_cast<uint4*>(zero_row)[i] = make_uint4(0u, 0u, 0u, 0u);

  const int first = blockIdx.x * p.items_per_cta;
  const int last = min(p.num_items, first + p.items_per_cta);
  if (first >= last) return;

  // Issues the copies of `item` into `stage`; always commits a group (empty past the range), so
  // that "all but the newest STAGES - 2 groups done" always means "the current item is in". A
  // thread always copies the same 16-byte column c of rows tid / TD, + THREADS / TD, ...; the
  // swizzle key of a q row is its tile row (head of the tile, i G + g), of a k/v row its key j.
  constexpr int ROW_STEP = Cfg::THREADS / TD;
  static_assert(Cfg::THREADS % TD == 0, "each thread keeps one column");
  const int col = tid & (TD - 1);
  auto prefetch = [&](int item, int stage) {
    if (item < last) {
      const int block = fast_div(item, p.chunks);
      const int chunk = item - block * int(p.chunks.d);
      T* const dst = ring + int64_t(stage) * p.stage_elems;
      const T* const q =
          static_cast<const T*>(p.q) + int64_t(block) * p.q_stride_n + int64_t(chunk) * d.HCG * D + col * 8;
      for (int r = tid / TD; r < d.L * d.HCG; r += ROW_STEP) {  // r = i HCG + h
        const int i = fast_div(r, p.chunk_q);
        const int h = r - i * d.HCG;
        const int hh = fast_div(h, p.group_div);
        const int key = ((hh & (d.HP - 1)) << d.row_shift) + i * d.G + (h - hh * d.G);
        cp_async_16(dst + td_swz(r, col, key, D), q + (int64_t(i) * p.num_q_heads + h) * D, true);
      }
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const T* const src = static_cast<const T*>(t ? p.v : p.k) + int64_t(block) * (t ? p.v_stride_n : p.k_stride_n) +
                             int64_t(chunk) * d.HC * D + col * 8;
        T* const kv = dst + (t ? v_off : k_off);
        for (int r = tid / TD; r < d.KJ * d.HC; r += ROW_STEP) {  // r = j HC + h
          const int j = fast_div(r, p.chunk_kv);
          cp_async_16(kv + td_swz(r, col, j, D), src + (int64_t(j) * p.num_kv_heads + (r - j * d.HC)) * D, true);
        }
      }
      if (tid == 0) stage_len[stage] = p.block_lens ? __ldg(p.block_lens + block) : d.L;
    }
    cp_async_commit();
  };

  const int S = p.stages;
  for (int s = 0; s < S - 1; ++s) prefetch(first + s, s);

  // Lane roles in the mma fragments: tile rows r0 = lane / 4 and r0 + 8; key/column pair
  // (lane % 4) * 2.
  const int r0 = lane >> 2, cpair = (lane & 3) * 2;
  const int units = p.head_groups * p.m_tiles * DSPLIT;

  int stage = 0;  // stage of `item`
  for (int item = first; item < last; ++item) {
    if (S == 3)
      cp_async_wait<1>();
    else
      cp_async_wait<0>();
    __syncthreads();  // this item landed for every thread; the previous item's stage is free
    {
      const int next_stage = stage == 0 ? S - 1 : stage - 1;  // (item + S - 1) % S
      prefetch(item + S - 1, next_stage);
    }
    const int block = fast_div(item, p.chunks);
    const int chunk = item - block * int(p.chunks.d);
    const int blen = min(max(stage_len[stage], 0), d.L);
    const T* const sq = ring + int64_t(stage) * p.stage_elems;
    const T* const sk = sq + k_off;
    const T* const sv = sq + v_off;

    for (int u = warp; u < units; u += Cfg::WARPS) {
      const TdUnit unit = token_decoder_unit<DSPLIT>(p, d, u);
      const int dpart = unit.dpart, hb = unit.hb, row0 = unit.row0, heads = unit.heads;
      const int n_x = token_decoder_unit_keys(p, d, unit, blen);

      // Inf/NaN in the V rows (of this unit's heads and columns) that its P V would read: take
      // the exact path (see token_decoder_unit_exact). Bit tricks over 16-byte vectors, a warp vote.
      {
        constexpr int CW = DW / 8;  // 16-byte chunks of the unit's columns in a row
        constexpr int CW_SHIFT = CW == 4 ? 2 : CW == 8 ? 3 : CW == 16 ? 4 : 5;
        const int hp_shift = __ffs(d.HP) - 1;
        uint32_t bad = 0;
        for (int t = lane; t < (d.KJ << (CW_SHIFT + hp_shift)); t += 32) {
          const int c = t & (CW - 1), sub = (t >> CW_SHIFT) & (d.HP - 1), j = t >> (CW_SHIFT + hp_shift);
          if (sub < heads) {
            const uint4 w = *reinterpret_cast<const uint4*>(sv + (j * d.HC + hb + sub) * D +
                                                            (((dpart * CW + c) ^ (j & 7)) << 3));
            bad |= nonfinite_bits(w.x, T{}) | nonfinite_bits(w.y, T{}) | nonfinite_bits(w.z, T{}) |
                   nonfinite_bits(w.w, T{});
          }
        }
        if (__any_sync(0xffffffffu, bad != 0u)) {
          token_decoder_unit_exact<T, D, DW>(p, sq, sk, sv, block, chunk, hb, row0, dpart, blen);
          continue;
        }
      }

      // This lane's A-operand row for ldmatrix (q). Padding rows read the zero row, swizzled by
      // their tile row like real rows, so the 8 rows of an ldmatrix phase fall on 8 bank groups.
      const int a_key = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const T* a_row = zero_row;
      {
        const int rl = a_key & d.row_mask, hh = hb + (a_key >> d.row_shift);
        if (rl < d.LG && hh < d.HC) {
          const int i = fast_div(rl, p.group_div);
          a_row = sq + (i * d.HCG + hh * d.G + (rl - i * d.G)) * D;
        }
      }
      // Virtual keys x this lane's two accumulator rows may attend: x_lo <= x <= x_hi (the
      // row's own head's keys 0 .. P + i; empty for padding rows and rows past block_lens).
      int x_lo[2], x_hi[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int rr = row0 + r0 + 8 * half;
        const int rl = rr & d.row_mask, sub = rr >> d.row_shift;
        const int i = fast_div(rl, p.group_div);
        x_lo[half] = sub << d.key_shift;
        x_hi[half] = (rl < d.LG && hb + sub < d.HC && i < blen) ? x_lo[half] + d.P + i : x_lo[half] - 1;
      }

      float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
      float o[DW / 8][4];
#pragma unroll
      for (int n = 0; n < DW / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

      for (int j0 = 0; j0 < n_x; j0 += 16) {
        // ---- S = Q K^T over virtual keys j0 .. j0 + 15 (the second n-tile only when needed) ----
        float s[2][4] = {};
        const bool second = j0 + 8 < n_x;
        // An n-tile of 8 virtual keys lies within one head (NKP is a multiple of 8). Keys past
        // the block (or heads past the chunk) are clamped to a real row: masked below.
        int jb[2];
        const T* b_row[2];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int x = j0 + nt * 8 + (lane & 7);
          jb[nt] = min(x & d.key_mask, d.KJ - 1);
          b_row[nt] = sk + (jb[nt] * d.HC + min(hb + (x >> d.key_shift), d.HC - 1)) * D;
        }
#pragma unroll
        for (int kc = 0; kc < D / 16; kc += 2) {
          uint32_t a0[4], a1[4];
          ldmatrix_x4(a0, a_row + (((kc * 2 + (lane >> 4)) ^ (a_key & 7)) << 3));
          ldmatrix_x4(a1, a_row + (((kc * 2 + 2 + (lane >> 4)) ^ (a_key & 7)) << 3));
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            if (nt == 0 || second) {
              uint32_t bk[4];
              ldmatrix_x4(bk, b_row[nt] + (((kc * 2 + (lane >> 3)) ^ (jb[nt] & 7)) << 3));
              mma_16816(s[nt], a0, bk[0], bk[1], T{});
              mma_16816(s[nt], a1, bk[2], bk[3], T{});
            }
          }
        }
        // ---- scale into base 2, mask, online softmax update ----
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int x = j0 + nt * 8 + cpair + (e & 1);
            s[nt][e] = (x >= x_lo[e >> 1] && x <= x_hi[e >> 1]) ? s[nt][e] * p.scale_log2 : -INFINITY;
          }
        float alpha[2], base[2];
        tile_softmax_update(s, m, l, alpha, base);
        if (j0 > 0) tile_rescale(o, alpha);  // the first tile starts from o = 0: nothing to rescale
        // ---- O += P V: P re-packed from S as the A operand. Keys past the block and heads past
        // the chunk read the zero row (swizzled by the key, as real rows) ----
        uint32_t pa[4];
        tile_pack_p<T>(pa, s);
        const int xv = j0 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int jv = xv & d.key_mask, hv = hb + (xv >> d.key_shift);
        const T* const v_row = (jv < d.KJ && hv < d.HC) ? sv + (jv * d.HC + hv) * D : zero_row;
#pragma unroll
        for (int nd = 0; nd < DW / 16; ++nd) {
          uint32_t bv[4];
          const int chunk_v = (dpart * DW) / 8 + nd * 2 + (lane >> 4);
          ldmatrix_x4_trans(bv, v_row + ((chunk_v ^ (jv & 7)) << 3));
          mma_16816(o[2 * nd], pa, bv[0], bv[1], T{});
          mma_16816(o[2 * nd + 1], pa, bv[2], bv[3], T{});
        }
      }

      // ---- epilogue: normalise, write out (zeros for rows past block_lens) and lse ----
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        l[half] += __shfl_xor_sync(0xffffffffu, l[half], 1);
        l[half] += __shfl_xor_sync(0xffffffffu, l[half], 2);
        const int rr = row0 + r0 + 8 * half;
        const int rl = rr & d.row_mask, hh = hb + (rr >> d.row_shift);
        if (rl >= d.LG || hh >= d.HC) continue;  // padding row of the tile
        const int i = fast_div(rl, p.group_div);
        const int hq = (chunk * d.HC + hh) * d.G + (rl - i * d.G);
        const bool valid = i < blen;
        // l = 0: nothing attended (Inf logits only); a NaN l (NaN in q or an attended key) stays
        // NaN in out and lse.
        const float inv = valid && l[half] != 0.f ? 1.f / l[half] : 0.f;
        const int64_t orow = (int64_t(block) * d.L + i) * p.num_q_heads + hq;
        T* const dst = static_cast<T*>(p.out) + orow * D + dpart * DW + cpair;
#pragma unroll
        for (int n = 0; n < DW / 8; ++n) {
          const float x = valid ? o[n][2 * half] * inv : 0.f;
          const float y = valid ? o[n][2 * half + 1] * inv : 0.f;
          *reinterpret_cast<uint32_t*>(dst + n * 8) = pack2(x, y, T{});
        }
        if (p.lse != nullptr && dpart == 0 && (lane & 3) == 0)
          p.lse[orow] = valid && l[half] != 0.f ? (m[half] + log2f(l[half])) * kLn2 : -INFINITY;
      }
    }
    stage = stage + 1 == S ? 0 : stage + 1;
  }
  cp_async_wait<0>();  // no copies outstanding at exit (the tail groups are empty)
}

// ================================================================================================
// Variant "lean" (picked by the launcher's default "auto" where it keeps the CTAs per SM of the
// classic kernel; KVCORE_TOKEN_DECODER_VARIANT=lean forces it): the same
// work items, ring, fragments, masking and softmax as token_decoder_attention_kernel above, with
// three changes that cut the warp instructions per item (bench/NOTES.md "token_decoder_attention
// L16, session 6": at L16 the item loop issues ~7 K warp instructions per item on 8 warps per SM,
// ~2 of the SM's 4 issue slots per cycle with only 2 warps per scheduler to hide latency):
//  1. Copy addresses from a per-CTA table. A thread copies the same vectors of every item (vector
//     v = k THREADS + tid), and each vector's source offset (relative to the item's base) and
//     swizzled destination are item-invariant, so they are computed once per CTA into shared
//     memory (4 or 8 bytes per entry: TdCopyEntry below): ~5-7 instructions per 16-byte copy
//     instead of ~28 (two multiply-high divisions, the swizzle key, 64-bit addressing).
//  2. The Inf/NaN scan of V once per item, over the V vectors each thread copied itself (visible
//     to it after its cp.async wait), combined by the item's barrier (__syncthreads_or): if any V
//     element of the item is not finite, every unit of the item takes the exact path. Before, each
//     warp unit scanned its own V rows and columns (~200 instructions per unit).
//  3. O through shared memory: the epilogue stores its C fragments into a staging tile laid out
//     and swizzled like the item's q rows; after the next item's barrier the CTA writes it out
//     with 16-byte stores over the q table (out has q's in-block layout), so each warp store
//     covers 512 contiguous bytes (whole 128-byte lines) instead of 8 rows x 16 bytes. Two
//     staging tiles alternate, so the copy-out of item t - 1 needs no barrier of its own: the
//     tile item t + 1 writes was read out before the barrier of item t + 1.
// Shared memory: ring | 2 staging tiles (L HCG D each) | zero row | table ((L HCG + KJ HC) TD
// entries of 4 or 8 bytes) | stage lengths.
// ================================================================================================

// An entry of the lean kernel's copy table: a 16-byte vector's source offset (from the item's
// q, k, v or out base in global memory) and its swizzled destination (from the stage's q or k/v
// region, or from the staging tile). Both are multiples of 8 elements (a row is D elements, a
// chunk 8), so they can be kept in units of 16-byte vectors.
//  * Wide (COMPACT = false): uint2 {source, destination} in elements; any shape the kernel runs.
//  * Compact (COMPACT = true): one uint32, destination vector in the low 14 bits, source vector in
//    the high 18. The destination always fits: a stage region is smaller than a CTA's shared
//    memory (227 KB < 2^14 vectors of 16 bytes = 256 KB); the source fits where a block's q rows
//    and its k rows each span at most 2^18 vectors (L Hq D and (P + L) Hkv D up to 2 M elements;
//    L16 D128 H16: 32 K and 36 K); the launcher checks both (token_decoder_lean_compact_fits)
//    and runs the wide table otherwise. Why: at L16 D128 the wide table is 8.5 KB of the 78.6 KB a
//    2-stage CTA needs, 1.8 KB more than three CTAs per SM allow (3 x (76.8 + 1 reserved) KB
//    <= 228 KB); the compact one (4.25 KB) makes it 74.3 KB. Decoding costs a shift or a mask per
//    offset (the source as IMAD.WIDE of the vector index by 16).
constexpr int kTdCompactDstBits = 14;
constexpr int kTdCompactSrcBits = 32 - kTdCompactDstBits;

template <bool COMPACT>
struct TdCopyEntry;

template <>
struct TdCopyEntry<false> {
  using type = uint2;
  static constexpr int BYTES = 8;
  // src, dst: element offsets.
  __device__ __forceinline__ static type make(uint32_t src, uint32_t dst) { return make_uint2(src, dst); }
  template <typename T>
  __device__ __forceinline__ static T* src(T* base, type e) {
    return base + e.x;
  }
  template <typename T>
  __device__ __forceinline__ static T* dst(T* base, type e) {
    return base + e.y;
  }
};

template <>
struct TdCopyEntry<true> {
  using type = uint32_t;
  static constexpr int BYTES = 4;
  // src, dst: element offsets, multiples of 8, within the ranges token_decoder_lean_compact_fits
  // checked.
  __device__ __forceinline__ static type make(uint32_t src, uint32_t dst) {
    return ((src >> 3) << kTdCompactDstBits) | (dst >> 3);
  }
  // The bases are 16-byte aligned (the launcher checks q, k, v, out and the block strides; stage
  // regions are whole rows), so stepping in uint4 is exact.
  template <typename T>
  __device__ __forceinline__ static T* src(T* base, type e) {
    using V = std::conditional_t<std::is_const_v<T>, const uint4, uint4>;
    return reinterpret_cast<T*>(reinterpret_cast<V*>(base) + (e >> kTdCompactDstBits));
  }
  template <typename T>
  __device__ __forceinline__ static T* dst(T* base, type e) {
    using V = std::conditional_t<std::is_const_v<T>, const uint4, uint4>;
    return reinterpret_cast<T*>(reinterpret_cast<V*>(base) + (e & ((1u << kTdCompactDstBits) - 1u)));
  }
};

// Whether every entry of a launch's table fits the compact form: the largest source vector index
// is the last 16-byte chunk of q row (L - 1, chunk head HCG - 1) or of k row (KJ - 1, HC - 1) (the
// item's base adds the chunk's head offset separately), the largest destination the last chunk of
// the q region (L HCG rows) or of the k/v region (KJ HC rows); bench/experiments/
// token_decoder_lean_emulate.py checks that these bounds are the exact maxima.
inline bool token_decoder_lean_compact_fits(int64_t rows, int64_t keys, int64_t num_q_heads, int64_t num_kv_heads,
                                            int64_t chunk_q_heads, int64_t chunk_kv_heads, int head_dim) {
  const int64_t td = head_dim / 8;
  const int64_t src_vectors =
      std::max(((rows - 1) * num_q_heads + chunk_q_heads) * td, ((keys - 1) * num_kv_heads + chunk_kv_heads) * td);
  const int64_t dst_vectors = std::max(rows * chunk_q_heads, keys * chunk_kv_heads) * td;
  return rows > 0 && src_vectors <= (int64_t(1) << kTdCompactSrcBits) &&
         dst_vectors <= (int64_t(1) << kTdCompactDstBits);
}

inline int64_t token_decoder_lean_smem_bytes(int64_t stage_elems, int stages, int head_dim, int64_t q_elems,
                                             int64_t table_entries, bool compact) {
  return 2 * (stage_elems * stages + 2 * q_elems + head_dim) + (compact ? 4 : 8) * table_entries + 16;
}

// The exact path of the lean kernel: out rows into the staging tile `so`.
template <typename T, int D, int DW>
__device__ __noinline__ void token_decoder_unit_exact_staged(const TokenDecoderParams& p, const T* sq, const T* sk,
                                                             const T* sv, T* so, int block, int chunk, int hb,
                                                             int row0, int dpart, int blen) {
  token_decoder_unit_exact_rows<T, D, DW, true>(p, sq, sk, sv, so, block, chunk, hb, row0, dpart, blen);
}

template <typename T, int D, int DSPLIT, bool COMPACT>
__global__ void __launch_bounds__(TokenDecoderConfig<D>::THREADS, 1)
    token_decoder_attention_lean_kernel(const __grid_constant__ TokenDecoderParams p) {
  using Cfg = TokenDecoderConfig<D>;
  constexpr int TD = Cfg::TD, DW = D / DSPLIT;  // DW: output columns of a warp unit
  constexpr int TD_SHIFT = TD == 8 ? 3 : TD == 16 ? 4 : 5;
  static_assert((1 << TD_SHIFT) == TD, "TD is 8, 16 or 32");
  static_assert(DW % 16 == 0, "a warp's output columns are whole k16 tiles of V");
  extern __shared__ __align__(128) unsigned char smem_raw[];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const TdDims d = token_decoder_dims(p);
  const int k_off = d.L * d.HCG * D, v_off = k_off + d.KJ * d.HC * D;  // k and v regions within a stage
  const int q_elems = d.L * d.HCG * D;                                  // one staging tile (= q region)
  const int nq = d.L * d.HCG * TD, nkv = d.KJ * d.HC * TD;              // 16-byte vectors of q (= out), of k (= v)

  T* const ring = reinterpret_cast<T*>(smem_raw);
  T* const staging = ring + int64_t(p.stages) * p.stage_elems;  // 2 tiles of q_elems
  T* const zero_row = staging + 2 * q_elems;
  using Entry = TdCopyEntry<COMPACT>;
  using E = typename Entry::type;
  E* const table = reinterpret_cast<E*>(zero_row + D);  // nq q/out entries, then nkv k/v entries
  int* const stage_len = reinterpret_cast<int*>(table + nq + nkv);

  for (int i = tid; i < D / 8; i += Cfg::THREADS)
    reinterpret_cast<uint4*>(zero_row)[i] = make_uint4(0u, 0u, 0u, 0u);

  const int first = blockIdx.x * p.items_per_cta;
  const int last = min(p.num_items, first + p.items_per_cta);
  if (first >= last) return;

  // The copy table. Entry v (row r = v / TD, 16-byte chunk c = v % TD) of q: source offset
  // (i Hq + h) D + 8 c from the item's q base (also out's offset from the item's out base),
  // destination td_swz(r, c, tile row); of k/v: (j Hkv + h) D + 8 c and td_swz(r, c, j). The
  // same formulas as token_decoder_attention_kernel's prefetch. A thread only ever reads the
  // entries it wrote (v = tid + k THREADS), so no barrier is needed before the first use.
  for (int v = tid; v < nq; v += Cfg::THREADS) {
    const int r = v >> TD_SHIFT, c = v & (TD - 1);
    const int i = fast_div(r, p.chunk_q);
    const int h = r - i * d.HCG;
    const int hh = fast_div(h, p.group_div);
    const int key = ((hh & (d.HP - 1)) << d.row_shift) + i * d.G + (h - hh * d.G);
    table[v] = Entry::make(uint32_t((i * p.num_q_heads + h) * D + c * 8), uint32_t(td_swz(r, c, key, D)));
  }
  for (int v = tid; v < nkv; v += Cfg::THREADS) {
    const int r = v >> TD_SHIFT, c = v & (TD - 1);
    const int j = fast_div(r, p.chunk_kv);
    table[nq + v] = Entry::make(uint32_t((j * p.num_kv_heads + (r - j * d.HC)) * D + c * 8), uint32_t(td_swz(r, c, j, D)));
  }

  // Issues the copies of `item` into `stage`; always commits a group (empty past the range), so
  // that "all but the newest STAGES - 2 groups done" always means "the current item is in".
  auto prefetch = [&](int item, int stage) {
    if (item < last) {
      const int block = fast_div(item, p.chunks);
      const int chunk = item - block * int(p.chunks.d);
      T* const dst = ring + int64_t(stage) * p.stage_elems;
      const T* const q = static_cast<const T*>(p.q) + int64_t(block) * p.q_stride_n + int64_t(chunk) * d.HCG * D;
      for (int v = tid; v < nq; v += Cfg::THREADS) {
        const E e = table[v];
        cp_async_16(Entry::dst(dst, e), Entry::src(q, e), true);
      }
      const T* const k = static_cast<const T*>(p.k) + int64_t(block) * p.k_stride_n + int64_t(chunk) * d.HC * D;
      const T* const vv = static_cast<const T*>(p.v) + int64_t(block) * p.v_stride_n + int64_t(chunk) * d.HC * D;
      T* const dk = dst + k_off;
      T* const dv = dst + v_off;
      for (int v = tid; v < nkv; v += Cfg::THREADS) {
        const E e = table[nq + v];
        cp_async_16(Entry::dst(dk, e), Entry::src(k, e), true);
        cp_async_16(Entry::dst(dv, e), Entry::src(vv, e), true);
      }
      if (tid == 0) stage_len[stage] = p.block_lens ? __ldg(p.block_lens + block) : d.L;
    }
    cp_async_commit();
  };

  // Writes the staged out tile of `item` to global memory: 16-byte vectors over the q entries.
  // Every element of the tile was written by the item's epilogue (zeros for rows past
  // block_lens), so every out element of the item is written here exactly once.
  auto store_out = [&](int item, const T* so) {
    const int block = fast_div(item, p.chunks);
    const int chunk = item - block * int(p.chunks.d);
    T* const o = static_cast<T*>(p.out) + int64_t(block) * d.L * p.num_q_heads * D + int64_t(chunk) * d.HCG * D;
    for (int v = tid; v < nq; v += Cfg::THREADS) {
      const E e = table[v];
      *reinterpret_cast<uint4*>(Entry::src(o, e)) = *reinterpret_cast<const uint4*>(Entry::dst(so, e));
    }
  };

  const int S = p.stages;
  for (int s = 0; s < S - 1; ++s) prefetch(first + s, s);

  // Lane roles in the mma fragments: tile rows r0 = lane / 4 and r0 + 8; key/column pair
  // (lane % 4) * 2.
  const int r0 = lane >> 2, cpair = (lane & 3) * 2;
  const int units = p.head_groups * p.m_tiles * DSPLIT;

  int stage = 0;  // stage of `item`
  for (int item = first; item < last; ++item) {
    if (S == 3)
      cp_async_wait<1>();
    else
      cp_async_wait<0>();
    const T* const sq = ring + int64_t(stage) * p.stage_elems;
    const T* const sk = sq + k_off;
    const T* const sv = sq + v_off;
    // Inf/NaN in any V element of the item (the vectors this thread copied, complete for it after
    // the wait): the barrier ORs the threads' findings.
    uint32_t bad = 0;
    for (int v = tid; v < nkv; v += Cfg::THREADS) {
      const uint4 w = *reinterpret_cast<const uint4*>(Entry::dst(sv, table[nq + v]));
      bad |= nonfinite_bits(w.x, T{}) | nonfinite_bits(w.y, T{}) | nonfinite_bits(w.z, T{}) | nonfinite_bits(w.w, T{});
    }
    // This item landed for every thread; the previous item's stage is free; the previous item's
    // staged out tile is complete.
    const bool item_bad = __syncthreads_or(bad != 0u) != 0;
    {
      const int next_stage = stage == 0 ? S - 1 : stage - 1;  // (item + S - 1) % S
      prefetch(item + S - 1, next_stage);
    }
    T* const so = staging + ((item - first) & 1) * q_elems;  // this item's staging tile
    if (item > first) store_out(item - 1, staging + ((item - 1 - first) & 1) * q_elems);
    const int block = fast_div(item, p.chunks);
    const int chunk = item - block * int(p.chunks.d);
    const int blen = min(max(stage_len[stage], 0), d.L);

    for (int u = warp; u < units; u += Cfg::WARPS) {
      const TdUnit unit = token_decoder_unit<DSPLIT>(p, d, u);
      const int dpart = unit.dpart, hb = unit.hb, row0 = unit.row0;

      if (item_bad) {  // uniform over the CTA
        token_decoder_unit_exact_staged<T, D, DW>(p, sq, sk, sv, so, block, chunk, hb, row0, dpart, blen);
        continue;
      }

      const int n_x = token_decoder_unit_keys(p, d, unit, blen);

      // This lane's A-operand row for ldmatrix (q). Padding rows read the zero row, swizzled by
      // their tile row like real rows, so the 8 rows of an ldmatrix phase fall on 8 bank groups.
      const int a_key = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
      const T* a_row = zero_row;
      {
        const int rl = a_key & d.row_mask, hh = hb + (a_key >> d.row_shift);
        if (rl < d.LG && hh < d.HC) {
          const int i = fast_div(rl, p.group_div);
          a_row = sq + (i * d.HCG + hh * d.G + (rl - i * d.G)) * D;
        }
      }
      // Virtual keys x this lane's two accumulator rows may attend: x_lo <= x <= x_hi (the
      // row's own head's keys 0 .. P + i; empty for padding rows and rows past block_lens).
      int x_lo[2], x_hi[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int rr = row0 + r0 + 8 * half;
        const int rl = rr & d.row_mask, sub = rr >> d.row_shift;
        const int i = fast_div(rl, p.group_div);
        x_lo[half] = sub << d.key_shift;
        x_hi[half] = (rl < d.LG && hb + sub < d.HC && i < blen) ? x_lo[half] + d.P + i : x_lo[half] - 1;
      }

      float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
      float o[DW / 8][4];
#pragma unroll
      for (int n = 0; n < DW / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

      for (int j0 = 0; j0 < n_x; j0 += 16) {
        // ---- S = Q K^T over virtual keys j0 .. j0 + 15 (the second n-tile only when needed) ----
        float s[2][4] = {};
        const bool second = j0 + 8 < n_x;
        int jb[2];
        const T* b_row[2];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int x = j0 + nt * 8 + (lane & 7);
          jb[nt] = min(x & d.key_mask, d.KJ - 1);
          b_row[nt] = sk + (jb[nt] * d.HC + min(hb + (x >> d.key_shift), d.HC - 1)) * D;
        }
#pragma unroll
        for (int kc = 0; kc < D / 16; kc += 2) {
          uint32_t a0[4], a1[4];
          ldmatrix_x4(a0, a_row + (((kc * 2 + (lane >> 4)) ^ (a_key & 7)) << 3));
          ldmatrix_x4(a1, a_row + (((kc * 2 + 2 + (lane >> 4)) ^ (a_key & 7)) << 3));
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            if (nt == 0 || second) {
              uint32_t bk[4];
              ldmatrix_x4(bk, b_row[nt] + (((kc * 2 + (lane >> 3)) ^ (jb[nt] & 7)) << 3));
              mma_16816(s[nt], a0, bk[0], bk[1], T{});
              mma_16816(s[nt], a1, bk[2], bk[3], T{});
            }
          }
        }
        // ---- scale into base 2, mask, online softmax update ----
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int x = j0 + nt * 8 + cpair + (e & 1);
            s[nt][e] = (x >= x_lo[e >> 1] && x <= x_hi[e >> 1]) ? s[nt][e] * p.scale_log2 : -INFINITY;
          }
        float alpha[2], base[2];
        tile_softmax_update(s, m, l, alpha, base);
        if (j0 > 0) tile_rescale(o, alpha);  // the first tile starts from o = 0: nothing to rescale
        // ---- O += P V: P re-packed from S as the A operand. Keys past the block and heads past
        // the chunk read the zero row (swizzled by the key, as real rows) ----
        uint32_t pa[4];
        tile_pack_p<T>(pa, s);
        const int xv = j0 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int jv = xv & d.key_mask, hv = hb + (xv >> d.key_shift);
        const T* const v_row = (jv < d.KJ && hv < d.HC) ? sv + (jv * d.HC + hv) * D : zero_row;
#pragma unroll
        for (int nd = 0; nd < DW / 16; ++nd) {
          uint32_t bv[4];
          const int chunk_v = (dpart * DW) / 8 + nd * 2 + (lane >> 4);
          ldmatrix_x4_trans(bv, v_row + ((chunk_v ^ (jv & 7)) << 3));
          mma_16816(o[2 * nd], pa, bv[0], bv[1], T{});
          mma_16816(o[2 * nd + 1], pa, bv[2], bv[3], T{});
        }
      }

      // ---- epilogue: normalise into the staging tile (zeros for rows past block_lens), lse ----
      // Staging row i HCG + h (the q row), 16-byte chunk swizzled by the tile row rr as q's: the
      // 8 rows of one 4-byte store are 8 consecutive tile rows, i.e. 8 different bank groups.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        l[half] += __shfl_xor_sync(0xffffffffu, l[half], 1);
        l[half] += __shfl_xor_sync(0xffffffffu, l[half], 2);
        const int rr = row0 + r0 + 8 * half;
        const int rl = rr & d.row_mask, hh = hb + (rr >> d.row_shift);
        if (rl >= d.LG || hh >= d.HC) continue;  // padding row of the tile
        const int i = fast_div(rl, p.group_div);
        const int hl = hh * d.G + (rl - i * d.G);  // query head within the chunk
        const bool valid = i < blen;
        // l = 0: nothing attended (Inf logits only); a NaN l (NaN in q or an attended key) stays
        // NaN in out and lse.
        const float inv = valid && l[half] != 0.f ? 1.f / l[half] : 0.f;
        T* const srow = so + (i * d.HCG + hl) * D + cpair;
#pragma unroll
        for (int n = 0; n < DW / 8; ++n) {
          const float x = valid ? o[n][2 * half] * inv : 0.f;
          const float y = valid ? o[n][2 * half + 1] * inv : 0.f;
          *reinterpret_cast<uint32_t*>(srow + ((((dpart * DW) / 8 + n) ^ (rr & 7)) << 3)) = pack2(x, y, T{});
        }
        if (p.lse != nullptr && dpart == 0 && (lane & 3) == 0) {
          const int64_t orow = (int64_t(block) * d.L + i) * p.num_q_heads + chunk * d.HCG + hl;
          p.lse[orow] = valid && l[half] != 0.f ? (m[half] + log2f(l[half])) * kLn2 : -INFINITY;
        }
      }
    }
    stage = stage + 1 == S ? 0 : stage + 1;
  }
  __syncthreads();  // the last item's staged tile is complete
  store_out(last - 1, staging + ((last - 1 - first) & 1) * q_elems);
  cp_async_wait<0>();  // no copies outstanding at exit (the tail groups are empty)
}

}  // namespace kvcore
