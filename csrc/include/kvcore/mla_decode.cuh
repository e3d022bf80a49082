// Absorbed MLA decode on tensor cores (flash-decoding over a paged latent cache, split merge fused
// into the last CTA, as in gqa_decode.cuh).
//
// MLA decode is multi-query attention with one shared KV head: the key of position p is the whole
// latent row c_p (DK = 576 wide), its value the row's first dv (512) columns. So one latent tile in
// shared memory serves as K and as V, and every head of the sequence uses it.
//
// Two kernels: mla_decode_kernel (below; any head count, the launcher's choice above 16 heads)
// and mla_decode_h16_kernel (further down; up to 16 heads, memory-bound, shaped for HBM rate).
//
// mla_decode_kernel's work split: one CTA per (head block of 16 * M heads, KV split, sequence). Each latent byte is
// read from memory once per head block (head blocks of one sequence run side by side and share
// it through L2). Inside the CTA the 4 warps split the two products differently:
//   S = Q K^T: each warp takes WARP_TOKENS tokens of the tile over the full DK (the row max of
//              the tile is then exchanged through shared memory, so all warps share one running
//              max per head and rescale identically);
//   O += P V : each warp owns DV / 4 output columns over all tokens of the tile, with P shared
//              through shared memory. O per thread is M * (DV / 4 / 8) * 4 fp32 registers.
// Because every warp sees the same running max, the per-warp row sums l only need adding at the
// end, and O needs no cross-warp merge at all.
//
// Memory pipeline: latent tiles of TILE rows stream through a STAGES-deep ring filled by 16-byte
// cp.async (zero-filled past the range end and past the runtime width dk), 8 threads per row so a
// warp copies 4 whole 128-byte row segments per instruction. Rows are stored with their 16-byte
// chunks XOR-swizzled by (row % 8) so ldmatrix reads of 8 rows hit 8 bank groups (the row pitch,
// 1152 bytes, is a multiple of 128, so without the swizzle they would all collide). The page of
// each row a thread copies is fetched one tile ahead.
//
// Widths: DK / DV are the compile-time maxima; the runtime dk (<= DK) and dv (<= DV) only need to
// be multiples of 8. Columns past dk are zero in both Q and the tile, so they add nothing; output
// columns past dv are computed (from other latent columns) but never stored.
//
// Split-KV: each CTA writes its normalised partial output and log2-sum-exp into the workspace,
// bumps a per-(sequence, head block) counter, and the CTA arriving last merges and resets it.
#pragma once

#include <math.h>
#include <stdint.h>

#include "kvcore/device_utils.cuh"
#include "kvcore/split_range.h"

namespace kvcore {

struct MlaDecodeParams {
  const void* q;  // [B, H, dk], last dim contiguous
  int64_t q_stride_b, q_stride_h;
  const void* cache;        // [pages, page_size, dk], inner two dims dense
  int64_t page_stride;      // elements between pages
  const int* block_table;   // [B, max_pages]
  const int* seq_lens;      // [B]
  void* out;                // [B, H, dv] contiguous
  float* lse;               // [B, H] or nullptr (natural log)
  // split-KV scratch (only used when num_splits > 1)
  float* partial_out;  // [B, head_blocks, num_splits, ROWS, dv]
  float* partial_lse;  // [B, head_blocks, num_splits, ROWS], log2 domain
  unsigned* counters;  // [B, head_blocks], zero between launches
  int num_heads, head_blocks, dk, dv;
  int page_size, page_shift, num_pages, max_pages;  // page_shift < 0: page_size not a power of 2
  int num_splits, split_tokens;                     // split_tokens: the most a split takes (split_range.h); tiles
  // Split merge by a separate launch (mla_merge_kernel) instead of the last CTA of each (sequence,
  // head block): the last CTA reads num_splits * ROWS * dv * 4 bytes alone (8 MB at B1 H128
  // S32768), which a grid of one CTA per head reads in parallel. Honoured by
  // mla_decode_wgmma_kernel only.
  int merge_separately;
  float scale;
};

template <int DK_, int DV_, int M_, int WARP_TOKENS_>
struct MlaDecodeConfig {
  static constexpr int DK = DK_, DV = DV_;
  static constexpr int M = M_;                    // m16 row tiles (16 heads each) per CTA
  static constexpr int ROWS = 16 * M;             // heads per CTA (padded)
  static constexpr int WARPS = 4;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int WARP_TOKENS = WARP_TOKENS_;  // S columns per warp per tile (8 or 16)
  static constexpr int NT = WARP_TOKENS / 8;        // n8 tiles of S per warp
  static constexpr int TILE = WARPS * WARP_TOKENS;
  static constexpr int TD = DK / 8;                 // 16-byte chunks per latent row
  static constexpr int WCOLS = DV / WARPS;          // output columns per warp
  static constexpr int STAGES = TILE <= 32 ? 4 : 2;
  static constexpr int ROW_THREADS = 8;             // threads copying one row
  static constexpr int ROWS_PER_PASS = THREADS / ROW_THREADS;
  static constexpr int ROW_PASSES = TILE / ROWS_PER_PASS;
  static constexpr int ROW_CHUNKS = TD / ROW_THREADS;  // copies per thread per row
  static constexpr int P_PITCH = TILE + 8;          // P row pitch (elements): ldmatrix conflict-free
  static constexpr size_t SMEM_Q = size_t(ROWS) * DK * 2;
  static constexpr size_t SMEM_TILES = size_t(STAGES) * TILE * DK * 2;
  static constexpr size_t SMEM_P = size_t(ROWS) * P_PITCH * 2;
  static constexpr size_t SMEM_MAX = size_t(WARPS) * ROWS * 4;  // row maxima, then row sums
  static constexpr size_t SMEM_BYTES = SMEM_Q + SMEM_TILES + SMEM_P + SMEM_MAX;

  static_assert(DK % 64 == 0, "DK must be a multiple of 64 (8 chunks per row for the swizzle and copy)");
  static_assert(DV % 64 == 0 && DV <= DK, "DV must be a multiple of 64 and <= DK");
  static_assert(WCOLS % 16 == 0, "each warp's output columns must be whole ldmatrix.x4 blocks");
  static_assert(WARP_TOKENS == 8 || WARP_TOKENS == 16, "8 or 16 tokens per warp");
  static_assert(TILE % ROWS_PER_PASS == 0, "tile rows must divide over the copy passes");
  static_assert(TD % ROW_THREADS == 0, "row chunks must divide over the row's threads");
};

// The split merges' two steps on four output columns: acc += w * v, and acc * inv stored as T.
__device__ __forceinline__ void mla_fma4(float4& acc, float w, const float4& v) {
  acc.x = fmaf(w, v.x, acc.x);
  acc.y = fmaf(w, v.y, acc.y);
  acc.z = fmaf(w, v.z, acc.z);
  acc.w = fmaf(w, v.w, acc.w);
}
template <typename T>
__device__ __forceinline__ void mla_store4(T* dst, const float4& acc, float inv) {
  *reinterpret_cast<uint2*>(dst) =
      make_uint2(pack2(acc.x * inv, acc.y * inv, T{}), pack2(acc.z * inv, acc.w * inv, T{}));
}

// Four output columns of one head from the split partials: split s's at part + s * split_stride,
// weighted by w[s], times inv (1 / the weights' sum), stored to dst; UNROLL partial loads in flight.
template <int UNROLL, typename T>
__device__ __forceinline__ void mla_combine4(const float* part, int64_t split_stride, const float* w, int ns,
                                             float inv, T* dst) {
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll UNROLL
  for (int s = 0; s < ns; ++s) mla_fma4(acc, w[s], __ldcg(reinterpret_cast<const float4*>(part + s * split_stride)));
  mla_store4(dst, acc, inv);
}

// ---- split merge (every kernel here): publish the partial, count arrivals, the last CTA combines
// Called by all THREADS threads of the CTA after each wrote its normalised partial output and
// log2-sum-exp to the workspace (slot (pair * num_splits + split) * ROWS + row). `scratch` is
// shared memory for ROWS * (num_splits + 1) floats that no thread reads any more (the first
// barrier below ends every earlier use). The CTA arriving last merges every split of its
// (sequence, head block) into out (and lse) and resets the counter for the next launch.
template <typename T, int ROWS, int THREADS>
__device__ __forceinline__ void mla_split_merge(const MlaDecodeParams& p, int b, int h0, int64_t pair, float* scratch) {
  const int tid = threadIdx.x;
  __threadfence();
  __syncthreads();
  __shared__ bool is_last;
  if (tid == 0) is_last = atomicAdd(p.counters + pair, 1u) == unsigned(p.num_splits - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  // Weights of each split's partial per head: [rows][num_splits + 1] (weights, then their sum).
  // Only the block's real heads are merged. One thread per head: its splits' lse values are
  // independent loads (in flight together), kept in its own row of `scratch` until their maximum
  // is known. (A warp per head, as before, took two dependent round trips per head and eight
  // heads in turn per warp: ~16 round trips where this takes one.)
  float* const wgt = scratch;
  const int ns = p.num_splits;
  const int rows = min(ROWS, p.num_heads - h0);
  const float* plse = p.partial_lse + pair * ns * ROWS;
  for (int h = tid; h < rows; h += THREADS) {
    float* const wh = wgt + h * (ns + 1);
    float mx = -INFINITY;
#pragma unroll 8
    for (int s = 0; s < ns; ++s) {
      const float v = __ldcg(plse + s * ROWS + h);
      wh[s] = v;
      mx = fmaxf(mx, v);
    }
    const float base = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f;
    for (int s = 0; s < ns; ++s) {
      const float e = exp2f(wh[s] - base);
      wh[s] = e;
      sum += e;
    }
    wh[ns] = sum;
    if (p.lse != nullptr)
      p.lse[int64_t(b) * p.num_heads + h0 + h] = sum == 0.f ? -INFINITY : (base + log2f(sum)) * kLn2;
  }
  __syncthreads();
  // Each thread combines 4 output columns of one head across all splits (dv is a multiple of 8),
  // for BATCH such items at once: their partial loads are independent and go out together (one
  // item at a time waited a round trip per item, ~32 per thread for 64 heads x 512 columns).
  constexpr int BATCH = 8;
  const int dv4 = p.dv >> 2;
  const int items = rows * dv4;
  const int64_t split_stride = int64_t(ROWS) * p.dv;
  const float* pout = p.partial_out + pair * ns * ROWS * p.dv;
  T* const out = static_cast<T*>(p.out) + (int64_t(b) * p.num_heads + h0) * p.dv;
  for (int i0 = tid; i0 < items; i0 += THREADS * BATCH) {
    int off[BATCH], wrow[BATCH];
    float4 acc[BATCH];
#pragma unroll
    for (int k = 0; k < BATCH; ++k) {
      const int item = min(i0 + k * THREADS, items - 1);  // a clamped item repeats a real one, unstored
      const int h = item / dv4;
      off[k] = h * p.dv + (item - h * dv4) * 4;
      wrow[k] = h * (ns + 1);
      acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll 2
    for (int s = 0; s < ns; ++s) {
      float4 v[BATCH];
#pragma unroll
      for (int k = 0; k < BATCH; ++k) v[k] = __ldcg(reinterpret_cast<const float4*>(pout + s * split_stride + off[k]));
#pragma unroll
      for (int k = 0; k < BATCH; ++k) mla_fma4(acc[k], wgt[wrow[k] + s], v[k]);
    }
#pragma unroll
    for (int k = 0; k < BATCH; ++k) {
      if (i0 + k * THREADS < items) {
        const float sum = wgt[wrow[k] + ns];
        mla_store4(out + off[k], acc[k], sum == 0.f ? 0.f : 1.f / sum);
      }
    }
  }
  if (tid == 0) p.counters[pair] = 0u;  // ready for the next launch
}

// ---- split merge as its own launch: one CTA per (head, sequence) --------------------------------
// Reads the partials a decode kernel with merge_separately set wrote (ROWS rows per head block)
// and writes out (and lse) like mla_split_merge. MAX_SPLITS bounds num_splits (the launcher's
// kMaxSplits). 128 threads, 4 output columns each per pass.
template <typename T, int ROWS, int MAX_SPLITS>
__global__ void __launch_bounds__(128) mla_merge_kernel(const MlaDecodeParams p) {
  constexpr int THREADS = 128, WARPS = THREADS / 32;
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int hb = h / ROWS, row = h % ROWS, ns = p.num_splits;
  const int64_t pair = int64_t(b) * p.head_blocks + hb;
  const float* plse = p.partial_lse + pair * ns * ROWS + row;  // split s at s * ROWS
  __shared__ float wgt[MAX_SPLITS];
  __shared__ float red[WARPS];
  float mx = -INFINITY;
  for (int s = tid; s < ns; s += THREADS) mx = fmaxf(mx, __ldcg(plse + s * ROWS));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  mx = red[0];
#pragma unroll
  for (int w = 1; w < WARPS; ++w) mx = fmaxf(mx, red[w]);
  const float base = mx == -INFINITY ? 0.f : mx;
  float sum = 0.f;
  for (int s = tid; s < ns; s += THREADS) {
    const float e = exp2f(__ldcg(plse + s * ROWS) - base);
    wgt[s] = e;
    sum += e;
  }
  sum = group_sum<32>(sum);
  __syncthreads();  // every warp has read red (the maxima) before it holds the sums
  if (lane == 0) red[warp] = sum;
  __syncthreads();
  sum = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) sum += red[w];
  if (tid == 0 && p.lse != nullptr)
    p.lse[int64_t(b) * p.num_heads + h] = sum == 0.f ? -INFINITY : (base + log2f(sum)) * kLn2;
  const float inv = sum == 0.f ? 0.f : 1.f / sum;
  const float* pout = p.partial_out + (pair * ns * ROWS + row) * p.dv;  // split s at s * ROWS * dv
  const int64_t split_stride = int64_t(ROWS) * p.dv;
  T* const dst = static_cast<T*>(p.out) + (int64_t(b) * p.num_heads + h) * p.dv;
  for (int c = tid * 4; c < p.dv; c += THREADS * 4) mla_combine4<16>(pout + c, split_stride, wgt, ns, inv, dst + c);
}

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][TD chunks] tile
// (TD a multiple of 8, so the XOR stays inside the row).
template <int TD>
__device__ __forceinline__ int mla_swz(int row, int chunk) {
  return (row * TD + (chunk ^ (row & 7))) * 8;
}

// ---- the latent-tile loader and the Q staging every MLA decode kernel shares -----------------
// A thread copies 16-byte pieces c0 + 8 j (j < PIECES) of the tile rows r0 + RPP i (i < PASSES).
// The rows' pages are looked up a tile ahead of the copy (positions clamped to the block table,
// not to seq_len, so a split's first lookups can run while seq_len is in flight). Everything read
// is clamped: bad index contents give wrong numbers, never an out-of-bounds access. Rows past the
// range end and columns past dk are zero-filled: a zero key column adds nothing to S, and a zero
// value row times P = 0 adds nothing to O (stale data could be NaN, and NaN * 0 is NaN).
__device__ __forceinline__ int mla_page_of(const MlaDecodeParams& p, int pos) {
  return p.page_shift >= 0 ? pos >> p.page_shift : pos / p.page_size;
}
__device__ __forceinline__ int mla_in_page(const MlaDecodeParams& p, int pos) {
  return p.page_shift >= 0 ? pos & (p.page_size - 1) : pos % p.page_size;
}

// Pages of this thread's rows of the tile whose row r0 sits at position row_pos.
template <int PASSES, int RPP>
__device__ __forceinline__ void mla_fetch_pages(const MlaDecodeParams& p, const int* bt, int capacity, int row_pos,
                                                int (&pg)[PASSES]) {
#pragma unroll
  for (int i = 0; i < PASSES; ++i) {
    const int pos = min(row_pos + RPP * i, capacity - 1);
    pg[i] = capacity > 0 ? __ldg(bt + mla_page_of(p, pos)) : 0;
  }
}

// cp.async of this thread's pieces of the tile starting at position tile_pos into dst, laid out
// by swz(row, piece) (an element offset); positions from `end` on are zero-filled. c0 < 8, and
// the layout must put piece c0 + 8 j PIECE_STEP elements after piece c0 + 8 (j - 1) of the same
// row (both swizzles here do: the XOR touches the piece's low 3 bits only).
// A tile wholly inside the range with every column of the row in use (dk = 8 x 8 PIECES: the
// DeepSeek shape) takes the short path: per row one page lookup, one source and one destination
// address, then the pieces at constant offsets from them with no predicates - about 2
// instructions per 16-byte copy instead of ~17.
template <int PASSES, int PIECES, int RPP, int PIECE_STEP, typename T, typename Swizzle>
__device__ __forceinline__ void mla_copy_tile(const MlaDecodeParams& p, T* dst, Swizzle swz, const int (&pg)[PASSES],
                                              int tile_pos, int end, int r0, int c0) {
  const T* const cache = static_cast<const T*>(p.cache);
  const int dk_pieces = p.dk >> 3;
  if (tile_pos + PASSES * RPP <= end && dk_pieces == 8 * PIECES) {
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
      const int row = r0 + RPP * i;
      const int64_t page = min(max(pg[i], 0), p.num_pages - 1);
      const T* src = cache + page * p.page_stride + int64_t(mla_in_page(p, tile_pos + row)) * p.dk + c0 * 8;
      const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst + swz(row, c0)));
#pragma unroll
      for (int j = 0; j < PIECES; ++j) cp_async_16_at(s + j * PIECE_STEP * int(sizeof(T)), src + j * 64);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < PASSES; ++i) {
    const int row = r0 + RPP * i;
    const int pos = tile_pos + row;
    const bool row_ok = pos < end;
    const int64_t page = min(max(pg[i], 0), p.num_pages - 1);
    const T* src = cache + page * p.page_stride + int64_t(mla_in_page(p, min(pos, end - 1))) * p.dk;
#pragma unroll
    for (int j = 0; j < PIECES; ++j) {
      const int c = c0 + 8 * j;
      const bool ok = row_ok && c < dk_pieces;
      cp_async_16(dst + swz(row, c), src + (ok ? c * 8 : 0), ok);
    }
  }
}

// Q of heads h0 .. h0 + ROWS - 1 of sequence b into shared memory laid out by swz(row, piece), by
// all THREADS threads; heads past H and columns past dk are zero.
template <int ROWS, int TD, int THREADS, typename T, typename Swizzle>
__device__ __forceinline__ void mla_stage_q(const MlaDecodeParams& p, int b, int h0, T* sQ, Swizzle swz) {
  const int dk_pieces = p.dk >> 3;
  for (int i = threadIdx.x; i < ROWS * TD; i += THREADS) {
    const int row = i / TD, piece = i % TD;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (h0 + row < p.num_heads && piece < dk_pieces)
      v = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.q) + int64_t(b) * p.q_stride_b +
                                          int64_t(h0 + row) * p.q_stride_h + piece * 8);
    *reinterpret_cast<uint4*>(sQ + swz(row, piece)) = v;
  }
}

// mla_stage_q by cp.async, committed as one group that the caller waits for (cp_async_wait<0>,
// then fence_proxy_async_smem before wgmma reads sQ). Every piece goes out at once: the load and
// store per piece of mla_stage_q kept about two in flight per thread, ~9 round trips for 64
// heads of 576 columns at 256 threads (a tenth of the B32 H128 kernel's time, by ncu's
// per-instruction sampling in session 11). Other cp.async copies the thread issues after this
// and does not commit (those that arrive on an mbarrier) are not waited for with it.
template <int ROWS, int TD, int THREADS, typename T, typename Swizzle>
__device__ __forceinline__ void mla_stage_q_async(const MlaDecodeParams& p, int b, int h0, T* sQ, Swizzle swz) {
  const int dk_pieces = p.dk >> 3;
  const T* const q = static_cast<const T*>(p.q) + int64_t(b) * p.q_stride_b;
#pragma unroll 4
  for (int i = threadIdx.x; i < ROWS * TD; i += THREADS) {
    const int row = i / TD, piece = i % TD;
    const bool ok = h0 + row < p.num_heads && piece < dk_pieces;
    cp_async_16(sQ + swz(row, piece), q + (ok ? int64_t(h0 + row) * p.q_stride_h + piece * 8 : 0), ok);
  }
  cp_async_commit();
}

// One row of a head block's result from its sum lsum and max m_row (log2 domain): this lane's
// column pairs wcol + 8 n + cpair (n < NC) of the row, acc[n][2 r], acc[n][2 r + 1], scaled by
// 1 / lsum. With one split, to the output (head h0 + row, if < H) and the lse (one lane: warp 0,
// lane % 4 == 0); with more, to this split's slot of the partials (ROWS rows per head block).
// (warp and lane are derived here, not passed: as parameters their comparisons come out in
// another operand order, which changes the SASS.)
template <int ROWS, typename T, int NC>
__device__ __forceinline__ void mla_store_row(const MlaDecodeParams& p, int b, int64_t pair, int split, int h0, int row,
                                              float lsum, float m_row, const float (&acc)[NC][4], int r, int wcol,
                                              int cpair) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // lsum == 0: nothing attended (out 0, lse -inf). A NaN stays NaN in both, so a later merge
  // cannot mistake the row for an empty part.
  const float inv = lsum == 0.f ? 0.f : 1.f / lsum;
  const float lse2 = lsum == 0.f ? -INFINITY : m_row + log2f(lsum);
  const int h = h0 + row;
  if (p.num_splits == 1) {
    if (h < p.num_heads) {
      T* dst = static_cast<T*>(p.out) + (int64_t(b) * p.num_heads + h) * p.dv;
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        const int c = wcol + n * 8 + cpair;
        if (c < p.dv) *reinterpret_cast<uint32_t*>(dst + c) = pack2(acc[n][2 * r] * inv, acc[n][2 * r + 1] * inv, T{});
      }
      if (p.lse != nullptr && warp == 0 && (lane & 3) == 0) p.lse[int64_t(b) * p.num_heads + h] = lse2 * kLn2;
    }
  } else {
    const int64_t slot = (pair * p.num_splits + split) * ROWS + row;
    float* dst = p.partial_out + slot * p.dv;
#pragma unroll
    for (int n = 0; n < NC; ++n) {
      const int c = wcol + n * 8 + cpair;
      if (c < p.dv) *reinterpret_cast<float2*>(dst + c) = make_float2(acc[n][2 * r] * inv, acc[n][2 * r + 1] * inv);
    }
    if (warp == 0 && (lane & 3) == 0) p.partial_lse[slot] = lse2;
  }
}

// This CTA's KV range and its latent-tile ring, as mla_decode_kernel and mla_decode_h16_kernel run
// them (Cfg: TD, DK, TILE, STAGES, ROW_PASSES, ROW_CHUNKS, ROWS_PER_PASS). Thread tid copies chunks
// copy_c0 + 8 * j (j < ROW_CHUNKS) of tile rows copy_r0 + RPP * pass (mla_copy_tile) into stage
// t % STAGES of `tiles`; the page of each of its rows is read one tile ahead of the copy.
// Everything read from memory is clamped, so bad index contents give wrong numbers but never an
// out-of-bounds access. A split's range is [split * chunk, +chunk) with chunk = split_chunk(...)
// (split_range.h): split_tokens when the sequence fills its block table, less for a shorter one.
// prime() looks up the first pages of the full-length start (split * split_tokens) while seq_len
// is still in flight, so at full length the two loads overlap; a shorter sequence's CTAs fetch
// again from their own start.
template <typename T, typename Cfg>
struct MlaTileRing {
  static constexpr int TD = Cfg::TD, DK = Cfg::DK, TILE = Cfg::TILE, STAGES = Cfg::STAGES;
  static constexpr int ROW_PASSES = Cfg::ROW_PASSES, ROW_CHUNKS = Cfg::ROW_CHUNKS, RPP = Cfg::ROWS_PER_PASS;
  const MlaDecodeParams& p;
  T* const tiles;
  const int capacity, seq_len_raw, split;
  const int* const bt;
  const int copy_r0, copy_c0;
  int start, end = 0, num_tiles = 0;  // start's final value, end and num_tiles: set by prime()

  __device__ __forceinline__ MlaTileRing(const MlaDecodeParams& p_, int b, int split_, int tid, T* tiles_)
      : p(p_),
        tiles(tiles_),
        capacity(p_.max_pages * p_.page_size),
        seq_len_raw(__ldg(p_.seq_lens + b)),
        split(split_),
        bt(p_.block_table + int64_t(b) * p_.max_pages),
        copy_r0(tid >> 3),
        copy_c0(tid & 7),
        start(split_ * p_.split_tokens) {}
  // The pages of this thread's rows of tile t.
  __device__ __forceinline__ void fetch_pages(int t, int (&pages)[ROW_PASSES]) const {
    mla_fetch_pages<ROW_PASSES, RPP>(p, bt, capacity, start + t * TILE + copy_r0, pages);
  }
  // This thread's copies of tile t (pages fetched for it) into stage t % STAGES.
  __device__ __forceinline__ void issue_copies(int t, const int (&pages)[ROW_PASSES]) const {
    mla_copy_tile<ROW_PASSES, ROW_CHUNKS, RPP, 64>(p, tiles + (t % STAGES) * TILE * DK,
                                                    [](int row, int chunk) { return mla_swz<TD>(row, chunk); }, pages,
                                                    start + t * TILE, end, copy_r0, copy_c0);
  }
  // The range's end and tile count (seq_len clamped to the block table's capacity), and its first
  // STAGES - 1 tiles in flight, one commit group each (empty past the last tile).
  __device__ __forceinline__ void prime(int (&pages)[ROW_PASSES]) {
    fetch_pages(0, pages);
    const int seq_len = min(max(seq_len_raw, 0), capacity);
    const int chunk = split_chunk(seq_len, p.num_splits, p.split_tokens, TILE);
    if (split * chunk != start) {
      start = split * chunk;
      fetch_pages(0, pages);
    }
    end = min(seq_len, start + chunk);
    num_tiles = start < end ? (end - start + TILE - 1) / TILE : 0;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < num_tiles) issue_copies(s, pages);
      cp_async_commit();
      fetch_pages(s + 1, pages);
    }
  }
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS) mla_decode_kernel(const MlaDecodeParams p) {
  constexpr int DK = Cfg::DK, TD = Cfg::TD, TILE = Cfg::TILE, STAGES = Cfg::STAGES;
  constexpr int M = Cfg::M, ROWS = Cfg::ROWS, WARPS = Cfg::WARPS, NT = Cfg::NT, WCOLS = Cfg::WCOLS;
  constexpr int ROW_PASSES = Cfg::ROW_PASSES, PP = Cfg::P_PITCH;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const sQ = reinterpret_cast<T*>(smem_raw);
  T* const sTile = reinterpret_cast<T*>(smem_raw + Cfg::SMEM_Q);
  T* const sP = reinterpret_cast<T*>(smem_raw + Cfg::SMEM_Q + Cfg::SMEM_TILES);
  float* const sRed = reinterpret_cast<float*>(smem_raw + Cfg::SMEM_Q + Cfg::SMEM_TILES + Cfg::SMEM_P);

  const int hb = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  // ---- this CTA's KV range and its tile ring (MlaTileRing) -----------------------------------
  MlaTileRing<T, Cfg> ring(p, b, split, tid, sTile);
  int pages[ROW_PASSES];  // this thread's rows' pages of the next tile to issue
  ring.prime(pages);
  const int start = ring.start, end = ring.end, num_tiles = ring.num_tiles;
  const auto swz = [](int row, int chunk) { return mla_swz<TD>(row, chunk); };

  // ---- stage the head block's queries (heads past H and columns past dk are zero) -------------
  const int h0 = hb * ROWS;
  mla_stage_q<ROWS, TD, Cfg::THREADS>(p, b, h0, sQ, swz);
  // (the first __syncthreads of the loop, or the one before the epilogue, publishes sQ)

  // Fragment roles: rows r0 and r0 + 8 of each m16 tile; token / column pair cpair.
  const int r0 = lane >> 2, cpair = (lane & 3) * 2;
  const float s_scale = p.scale * kLog2e;
  float m[M][2], l[M][2];
  float o[M][WCOLS / 8][4];
#pragma unroll
  for (int mt = 0; mt < M; ++mt) {
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
#pragma unroll
    for (int n = 0; n < WCOLS / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
  }
  float* const sMax = sRed;  // [WARPS][ROWS]
  const int wrow = warp * Cfg::WARP_TOKENS;  // this warp's first S token in the tile
  const int wcol = warp * WCOLS;             // this warp's first output column

  for (int t = 0; t < num_tiles; ++t) {
    cp_async_wait<STAGES - 2>();
    // Tile t landed for every thread; every warp is done with tile t-1 (its stage is free again)
    // and with the previous tile's sMax and sP.
    __syncthreads();
    if (t + STAGES - 1 < num_tiles) ring.issue_copies(t + STAGES - 1, pages);
    cp_async_commit();
    ring.fetch_pages(t + STAGES, pages);
    const T* const kt = sTile + (t % STAGES) * TILE * DK;

    // S = Q K^T over the warp's tokens: M x NT mma tiles, DK / 16 k-steps (two per iteration).
    // Even and odd k-steps accumulate separately: two dependent mma chains of DK / 32 instead of
    // one of DK / 16, which halves the latency a warp waits on.
    float s[M][NT][4], s2[M][NT][4];
#pragma unroll
    for (int mt = 0; mt < M; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[mt][nt][i] = s2[mt][nt][i] = 0.f;
#pragma unroll 4
    for (int kc = 0; kc < DK / 16; kc += 2) {
      uint32_t bk[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) ldmatrix_x4(bk[nt], kt + mla_swz<TD>(wrow + nt * 8 + (lane & 7), kc * 2 + (lane >> 3)));
#pragma unroll
      for (int mt = 0; mt < M; ++mt) {
        uint32_t a0[4], a1[4];
        const int qrow = mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(a0, sQ + mla_swz<TD>(qrow, kc * 2 + (lane >> 4)));
        ldmatrix_x4(a1, sQ + mla_swz<TD>(qrow, kc * 2 + 2 + (lane >> 4)));
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          mma_16816(s[mt][nt], a0, bk[nt][0], bk[nt][1], T{});
          mma_16816(s2[mt][nt], a1, bk[nt][2], bk[nt][3], T{});
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < M; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[mt][nt][i] += s2[mt][nt][i];

    // Scale into the log2 domain, mask tokens past the range end, publish the warp's row maxima.
    const int tok0 = start + t * TILE + wrow + cpair;
#pragma unroll
    for (int mt = 0; mt < M; ++mt) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            float& x = s[mt][nt][2 * r + j];
            x = tok0 + nt * 8 + j < end ? x * s_scale : -INFINITY;
            mx = fmaxf(mx, x);
          }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        if ((lane & 3) == 0) sMax[warp * ROWS + mt * 16 + r0 + 8 * r] = mx;
      }
    }
    __syncthreads();  // every warp's maxima are visible

    // The tile's max over all warps: every warp computes the same new running max, so all of them
    // rescale O and l by the same factor. P goes to shared memory for the column-split P V.
#pragma unroll
    for (int mt = 0; mt < M; ++mt) {
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = mt * 16 + r0 + 8 * r;
        float mx = m[mt][r];
#pragma unroll
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sMax[w * ROWS + row]);
        const float base = mx == -INFINITY ? 0.f : mx;  // nothing seen yet: keep exp2 finite
        alpha[r] = exp2f(m[mt][r] - base);
        m[mt][r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float e0 = exp2f(s[mt][nt][2 * r] - base), e1 = exp2f(s[mt][nt][2 * r + 1] - base);
          sum += e0 + e1;
          *reinterpret_cast<uint32_t*>(sP + row * PP + wrow + nt * 8 + cpair) = pack2(e0, e1, T{});
        }
        l[mt][r] = l[mt][r] * alpha[r] + sum;  // this lane's tokens only; summed at the end
      }
#pragma unroll
      for (int n = 0; n < WCOLS / 8; ++n) {
        o[mt][n][0] *= alpha[0];
        o[mt][n][1] *= alpha[0];
        o[mt][n][2] *= alpha[1];
        o[mt][n][3] *= alpha[1];
      }
    }
    __syncthreads();  // all of P is visible

    // O[:, wcol:wcol+WCOLS] += P V over all TILE tokens (V = the tile's first columns).
#pragma unroll
    for (int ks = 0; ks < TILE / 16; ++ks) {
      uint32_t pa[M][4];
#pragma unroll
      for (int mt = 0; mt < M; ++mt)
        ldmatrix_x4(pa[mt], sP + (mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PP + ks * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int nd = 0; nd < WCOLS / 16; ++nd) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, kt + mla_swz<TD>(ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                               (wcol >> 3) + nd * 2 + (lane >> 4)));
#pragma unroll
        for (int mt = 0; mt < M; ++mt) {
          mma_16816(o[mt][2 * nd], pa[mt], bv[0], bv[1], T{});
          mma_16816(o[mt][2 * nd + 1], pa[mt], bv[2], bv[3], T{});
        }
      }
    }
  }
  cp_async_wait<0>();  // no copy may land after the CTA exits (all are zero-size past the end)

  // ---- row sums over the quad, then over the warps (the max is already common) ---------------
  float* const sSum = sRed;  // [WARPS][ROWS], reuses sMax
  __syncthreads();           // every warp is done reading sMax (and sQ is published if no tiles ran)
#pragma unroll
  for (int mt = 0; mt < M; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float x = l[mt][r];
      x += __shfl_xor_sync(0xffffffffu, x, 1);
      x += __shfl_xor_sync(0xffffffffu, x, 2);
      if ((lane & 3) == 0) sSum[warp * ROWS + mt * 16 + r0 + 8 * r] = x;
    }
  __syncthreads();

  const int64_t pair = int64_t(b) * p.head_blocks + hb;
#pragma unroll
  for (int mt = 0; mt < M; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = mt * 16 + r0 + 8 * r;
      float lsum = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) lsum += sSum[w * ROWS + row];
      mla_store_row<ROWS, T>(p, b, pair, split, h0, row, lsum, m[mt][r], o[mt], r, wcol, cpair);
    }
  }
  if (p.num_splits == 1) return;

  mla_split_merge<T, ROWS, Cfg::THREADS>(p, b, h0, pair, reinterpret_cast<float*>(sTile));
}

// ================================================================================================
// Few heads (H <= 16, one m16 tile): mla_decode_h16_kernel
// ================================================================================================
// At 16 heads the op is memory-bound (one 1,152-byte latent row serves 16 dot products of 576 and
// 16 x 512 multiply-adds), so the kernel exists to keep HBM busy: short per-tile dependency chains,
// two CTAs per SM (each hides the other's barriers and softmax), and a deep cp.async ring. The
// products are split differently from mla_decode_kernel:
//   S = Q K^T: warp w owns latent columns [w * DK/4, (w+1) * DK/4) for every token of the tile; its
//              slice of Q stays in registers as mma A fragments for the CTA's lifetime (read from
//              global once; mla_decode_kernel re-reads all of Q from shared memory every tile).
//              The four partial S tiles meet in shared memory, and EVERY warp adds them in the
//              same fixed order (0, 1, 2, 3), so all warps hold bitwise the same S. Each warp then
//              runs the online softmax by itself (same max, same P, same row sums in every warp):
//              no max exchange, no P round trip through shared memory, no cross-warp sum of l.
//   O += P V : warp w owns DV / 4 output columns, as in mla_decode_kernel; P comes straight from
//              the S accumulators (the C layout of two n8 tiles is the A layout of one k16 step).
// One barrier per tile: the loop is skewed by one tile (iteration t computes tile t+1's partial S
// while it runs tile t's softmax and P V; the partials are double-buffered), so a single barrier
// both publishes the partials and frees the ring stage. Split-KV, lse, workspace and merge
// contract as mla_decode_kernel (same MlaDecodeParams, same partial layout with ROWS = 16).
// bench/NOTES.md "mla_decode H16, session 6" has the byte and cycle counts behind the shape.

template <int DK_, int DV_>
struct MlaDecodeH16Config {
  static constexpr int DK = DK_, DV = DV_;
  static constexpr int ROWS = 16;  // heads per CTA (one m16 tile, padded)
  static constexpr int WARPS = 4;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int TILE = 16;     // tokens per tile: one k16 step of P V, two n8 tiles of S
  static constexpr int STAGES = 5;    // 3 tiles (54 KB) in flight per CTA while two are consumed
  static constexpr int TD = DK / 8;   // 16-byte chunks per latent row
  static constexpr int KSTEPS = DK / WARPS / 16;  // S k-steps per warp (9 at DK 576)
  static constexpr int WCOLS = DV / WARPS;        // output columns per warp
  static constexpr int ROW_THREADS = 8;           // threads copying one row
  static constexpr int ROWS_PER_PASS = THREADS / ROW_THREADS;
  static constexpr int ROW_PASSES = TILE / ROWS_PER_PASS;
  static constexpr int ROW_CHUNKS = TD / ROW_THREADS;
  static constexpr size_t SMEM_TILES = size_t(STAGES) * TILE * DK * 2;
  static constexpr size_t SMEM_PART = 2 * size_t(WARPS) * 2 * 32 * 16;  // [2][warp][n8 tile][lane] float4
  static constexpr size_t SMEM_BYTES = SMEM_TILES + SMEM_PART;

  static_assert(DK % 64 == 0, "DK must be a multiple of 64 (whole k16 steps per warp, 8-chunk swizzle groups)");
  static_assert(DV % 64 == 0 && DV <= DK, "DV must be a multiple of 64 and <= DK");
  static_assert(WCOLS % 16 == 0, "each warp's output columns must be whole ldmatrix.x4 blocks");
  static_assert(TILE % ROWS_PER_PASS == 0 && ROW_PASSES >= 1, "tile rows must divide over the copy passes");
  static_assert(TD % ROW_THREADS == 0, "row chunks must divide over the row's threads");
  // The merge keeps [ROWS][num_splits + 1] fp32 weights in the (then idle) ring.
  static_assert(SMEM_TILES >= size_t(ROWS) * 257 * 4, "the ring must hold the merge weights");
  // Two CTAs per SM on sm_90 (228 KB per SM, 1 KB reserved per CTA) is what the shape is for.
  static_assert(2 * (SMEM_BYTES + 1024 + 64) <= 233472, "two CTAs must fit one SM's shared memory");
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, 2) mla_decode_h16_kernel(const MlaDecodeParams p) {
  constexpr int DK = Cfg::DK, TD = Cfg::TD, TILE = Cfg::TILE, STAGES = Cfg::STAGES, ROWS = Cfg::ROWS;
  constexpr int WARPS = Cfg::WARPS, KSTEPS = Cfg::KSTEPS, WCOLS = Cfg::WCOLS;
  constexpr int ROW_PASSES = Cfg::ROW_PASSES;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const sTile = reinterpret_cast<T*>(smem_raw);
  float4* const sPart = reinterpret_cast<float4*>(smem_raw + Cfg::SMEM_TILES);

  const int hb = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  // ---- this CTA's KV range and its tile ring (MlaTileRing, as in mla_decode_kernel) -----------
  MlaTileRing<T, Cfg> ring(p, b, split, tid, sTile);
  int pages[ROW_PASSES];  // this thread's rows' pages of the next tile to issue
  ring.prime(pages);
  const int start = ring.start, end = ring.end, num_tiles = ring.num_tiles;

  // ---- this warp's slice of Q as A fragments, straight from global (while the ring fills) ------
  // Fragment roles (mma m16n8k16): rows r0 and r0 + 8 (heads), column / token pair cpair.
  // a0 = Q[r0][k + cpair, +1], a1 = Q[r0 + 8][same], a2 = Q[r0][k + 8 + cpair, +1], a3 = Q[r0 + 8][same].
  // Heads past H and columns past dk are zero (dk is a multiple of 8, so a pair never straddles it).
  const int r0 = lane >> 2, cpair = (lane & 3) * 2;
  const int h0 = hb * ROWS;
  const int kcol0 = warp * KSTEPS * 16;  // this warp's first S column
  uint32_t qf[KSTEPS][4];
  {
    const T* const qb = static_cast<const T*>(p.q) + int64_t(b) * p.q_stride_b;
    const bool lo_ok = h0 + r0 < p.num_heads, hi_ok = h0 + r0 + 8 < p.num_heads;
    // Clamped head rows keep the (unused) addresses inside q.
    const T* const q_lo = qb + int64_t(min(h0 + r0, p.num_heads - 1)) * p.q_stride_h;
    const T* const q_hi = qb + int64_t(min(h0 + r0 + 8, p.num_heads - 1)) * p.q_stride_h;
#pragma unroll
    for (int j = 0; j < KSTEPS; ++j) {
      const int c = kcol0 + j * 16 + cpair;
      const bool c_lo = c < p.dk, c_hi = c + 8 < p.dk;
      qf[j][0] = lo_ok && c_lo ? __ldg(reinterpret_cast<const unsigned*>(q_lo + c)) : 0u;
      qf[j][1] = hi_ok && c_lo ? __ldg(reinterpret_cast<const unsigned*>(q_hi + c)) : 0u;
      qf[j][2] = lo_ok && c_hi ? __ldg(reinterpret_cast<const unsigned*>(q_lo + c + 8)) : 0u;
      qf[j][3] = hi_ok && c_hi ? __ldg(reinterpret_cast<const unsigned*>(q_hi + c + 8)) : 0u;
    }
  }

  const float s_scale = p.scale * kLog2e;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows r0, r0 + 8 (same in every warp)
  float o[WCOLS / 8][4];
#pragma unroll
  for (int n = 0; n < WCOLS / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  const int kchunk0 = kcol0 >> 3;  // this warp's first 16-byte chunk of S columns
  const int wcol = warp * WCOLS;    // this warp's first output column

  // Partial S of tile t over this warp's columns into s: two n8 tiles (tokens 0-7, 8-15), two
  // independent mma chains of KSTEPS. ldmatrix.x4 matrices: (tokens 0-7, k lo), (0-7, k hi),
  // (8-15, k lo), (8-15, k hi) = b0, b1 of n-tile 0, then b0, b1 of n-tile 1.
  auto partial_s = [&](int t, float (&s)[2][4]) {
    const T* const kt = sTile + (t % STAGES) * TILE * DK;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int j = 0; j < KSTEPS; ++j) {
      uint32_t bk[4];
      ldmatrix_x4(bk, kt + mla_swz<TD>((lane & 7) + (lane >> 4) * 8, kchunk0 + 2 * j + ((lane >> 3) & 1)));
      mma_16816(s[0], qf[j], bk[0], bk[1], T{});
      mma_16816(s[1], qf[j], bk[2], bk[3], T{});
    }
  };
  // Partials of tile t go to buffer t & 1 in fragment order: [buffer][warp][n8 tile][lane] float4
  // (each lane its own 16 bytes: conflict-free stores and loads).
  auto store_partial = [&](int t, const float (&s)[2][4]) {
    float4* const dst = sPart + (t & 1) * (WARPS * 64) + warp * 64;
    dst[lane] = make_float4(s[0][0], s[0][1], s[0][2], s[0][3]);
    dst[32 + lane] = make_float4(s[1][0], s[1][1], s[1][2], s[1][3]);
  };

  // Software pipeline, one barrier per tile. Iteration t computes tile t+1's partial S (on its
  // stage) while it runs tile t's softmax and P V, so the S mma chain overlaps the softmax's
  // dependent steps. Invariants at the barrier of iteration t:
  //   * tile t+1 has landed (each thread waited for its own copies, the barrier publishes them);
  //   * tile t's partials (stored at the end of iteration t-1, or by the prologue for t = 0) are
  //     visible;
  //   * every warp is done with iteration t-1: its P V read stage (t-1) % STAGES, which is now
  //     refilled with tile t+STAGES-1, and its reads of partial buffer (t-1) & 1, which this
  //     iteration overwrites with tile t+1's partials.
  // Stages in use during iteration t: t (P V), t+1 (S), t+2 .. t+STAGES-1 in flight (STAGES-2
  // tiles = 54 KB per CTA), so STAGES >= 3 keeps them apart.
  static_assert(STAGES >= 3, "the skewed loop needs the stages of tiles t, t+1 and one copy target apart");
  if (num_tiles > 0) {
    cp_async_wait<STAGES - 2>();  // tile 0 (the first of the STAGES-1 committed groups) landed
    __syncthreads();
    float s0[2][4];
    partial_s(0, s0);
    store_partial(0, s0);
  }
  for (int t = 0; t < num_tiles; ++t) {
    // Committed so far: STAGES-1 + t groups (tiles 0 .. t+STAGES-2); tiles 0 .. t+1 must be done.
    cp_async_wait<STAGES - 3>();
    __syncthreads();
    if (t + STAGES - 1 < num_tiles) ring.issue_copies(t + STAGES - 1, pages);
    cp_async_commit();
    ring.fetch_pages(t + STAGES, pages);

    // Full S of tile t = ((P0 + P1) + P2) + P3 in every warp, so every warp gets bitwise the
    // same S (and with it the same max, P and row sums).
    float x[2][4];
    {
      const float4* const src = sPart + (t & 1) * (WARPS * 64);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        float4 acc = src[nt * 32 + lane];
#pragma unroll
        for (int w = 1; w < WARPS; ++w) {
          const float4 v = src[w * 64 + nt * 32 + lane];
          acc.x += v.x;
          acc.y += v.y;
          acc.z += v.z;
          acc.w += v.w;
        }
        x[nt][0] = acc.x;
        x[nt][1] = acc.y;
        x[nt][2] = acc.z;
        x[nt][3] = acc.w;
      }
    }

    // Tile t+1's partial S. Unconditional, to keep the loop body one basic block the compiler can
    // interleave: on the last iteration it reads a stage no copy is writing (tile num_tiles is
    // never issued; the stage holds an old tile or was never filled) and its result is stored
    // into a buffer nobody reads again.
    float s_next[2][4];
    partial_s(t + 1, s_next);

    // Online softmax in the log2 domain over the whole tile, rows r0 (r = 0) and r0 + 8.
    const int tok0 = start + t * TILE + cpair;
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float& v = x[nt][2 * r + j];
          v = tok0 + nt * 8 + j < end ? v * s_scale : -INFINITY;
          mx = fmaxf(mx, v);
        }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[r], mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;  // nothing seen yet: keep exp2 finite
      alpha[r] = exp2f(m[r] - base);
      m[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float& v = x[nt][2 * r + j];
          v = exp2f(v - base);
          sum += v;
        }
      l[r] = l[r] * alpha[r] + sum;  // this lane's tokens only; summed over the quad at the end
    }
    // P as the A fragment of the k16 step: a0 = (r0, tokens cpair..+1), a1 = (r0 + 8, same),
    // a2 = (r0, tokens 8 + cpair..+1), a3 = (r0 + 8, same).
    uint32_t pa[4];
    pa[0] = pack2(x[0][0], x[0][1], T{});
    pa[1] = pack2(x[0][2], x[0][3], T{});
    pa[2] = pack2(x[1][0], x[1][1], T{});
    pa[3] = pack2(x[1][2], x[1][3], T{});
#pragma unroll
    for (int n = 0; n < WCOLS / 8; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }

    // O[:, wcol:wcol+WCOLS] += P V (V = tile t's first columns). ldmatrix.x4.trans matrices:
    // (tokens 0-7, chunk c), (8-15, c), (0-7, c+1), (8-15, c+1) = b0, b1 of columns c, then c+1.
    const T* const vt = sTile + (t % STAGES) * TILE * DK;
#pragma unroll
    for (int nd = 0; nd < WCOLS / 16; ++nd) {
      uint32_t bv[4];
      ldmatrix_x4_trans(bv, vt + mla_swz<TD>((lane & 7) + ((lane >> 3) & 1) * 8, (wcol >> 3) + nd * 2 + (lane >> 4)));
      mma_16816(o[2 * nd], pa, bv[0], bv[1], T{});
      mma_16816(o[2 * nd + 1], pa, bv[2], bv[3], T{});
    }

    // Publish tile t+1's partial (buffer (t+1) & 1 was last read in iteration t-1, before this
    // iteration's barrier); the next barrier makes it visible.
    store_partial(t + 1, s_next);
  }
  cp_async_wait<0>();  // no copy may land after the CTA exits (all are zero-size past the end)

  // ---- row sums over the quad (every warp has the same ones), output or partial --------------
  const int64_t pair = int64_t(b) * p.head_blocks + hb;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float lsum = l[r];
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
    mla_store_row<ROWS, T>(p, b, pair, split, h0, r0 + 8 * r, lsum, m[r], o, r, wcol, cpair);
  }
  if (p.num_splits == 1) return;

  // (the merge weights reuse the tile ring: the function's first barrier ends every warp's reads of it)
  mla_split_merge<T, ROWS, Cfg::THREADS>(p, b, h0, pair, reinterpret_cast<float*>(sTile));
}

}  // namespace kvcore
