#pragma once
// Many heads (compute-bound MLA decode, H >= 64 in practice): mla_decode_wgmma_kernel, on Hopper's
// warpgroup MMA. Same contract as mla_decode_kernel (MlaDecodeParams, the split workspace and the
// merge in mla_decode.cuh), with 64 heads per CTA (one wgmma M) and 64-token latent tiles.
//
// Why wgmma: at 128 heads the op does 2 H (576 + 512) FLOPs per latent byte pair, ~60 per byte,
// far past the ~190 FLOP/byte at which an H100 turns compute-bound. mma.sync at 32 heads per CTA
// reached 22% of the bf16 GEMM rate (session 4): every ldmatrix of Q and of the tile fed a few
// m16n8k16 only. wgmma reads both operands from shared memory itself, 64 heads at a time.
//
// Work split inside the CTA (two warpgroups, 256 threads), per tile t of N = 64 tokens:
//   warpgroup 0: S = Q K_t^T (64 x N, k = 576: 36 wgmma m64n64k16, both operands in shared
//                memory), the online softmax, P (bf16) and the rows' rescale factors to shared
//                memory for warpgroup 1, then O[:, 0:256] += P V_t with P from its registers.
//   warpgroup 1: loads the latent tiles (cp.async, completion counted by an mbarrier, so the
//                waiting side need not be the issuing one; in mla_decode_wgmma_tma_kernel one of
//                its threads issues TMA boxes instead), and O[:, 256:512] += P V_t with P read
//                from shared memory. Its P V of tile t runs while warpgroup 0 computes S of t+1,
//                so the tensor pipe has work during warpgroup 0's softmax.
// V is the tile itself read MN-major (wgmma's transposed B): the latent row's first 512 columns.
//
// Shared memory (bf16): Q 72 KB, tile stages 144 KB (2 x 64 tokens), P 8 KB, row
// factors and barriers: 226 KB, one CTA per SM. Synchronisation:
//   full[s]  (mbarrier, 128 arrivals): tile in stage s landed (warpgroup 1's cp.async completions)
//   empty[s] (mbarrier, 256 arrivals): both warpgroups are done reading stage s
//   P_FULL   (named barrier, or mbarrier with MBAR_HANDOFF): warpgroup 0 wrote P(t) and the
//            factors; warpgroup 1 waits
//   P_FREE   (likewise): warpgroup 1 has P(t) in registers; warpgroup 0 may write P(t+1)
//   STATS    (named barrier, or __syncthreads): warpgroup 0 published the final row statistics
// bench/NOTES.md ("mla_decode H128 on wgmma, session 7") has the counts behind the shape.

#include <cuda.h>  // CUtensorMap

#include "kvcore/mla_decode.cuh"
#include "kvcore/wgmma.cuh"

namespace kvcore {

// 64-token tiles in 2 stages. (32-token tiles in 4 stages, the same shared memory, kept three tiles
// in flight instead of one but read Q from shared memory twice as often per token, as m64n32k16:
// session 8 timed them slower, 0.141 vs 0.129 ms at B32 H128 S4096, and they were removed.)
// MBAR_HANDOFF: the P hand-off between the warpgroups on two mbarriers instead of named barriers
// (bar.arrive / bar.sync), for compute-sanitizer's racecheck, which models mbarriers but not
// bar.arrive (bench/experiments/racecheck_named_barrier.cu; bench/NOTES.md, session 8). The
// launcher's default since session 9 (same speed, racecheck-clean); the named form stays behind
// KVCORE_MLA_WGMMA_HANDOFF=named.
// What the 64-heads-per-CTA warpgroup-MMA kernels share (this one and mla_decode_seesaw.cuh's):
// the CTA shape, the 64-token tile, the loader roles and the operand sizes.
template <int DK_, int DV_>
struct MlaWgmmaShape {
  static constexpr int DK = DK_, DV = DV_;
  static constexpr int ROWS = 64;     // heads per CTA: one wgmma M
  static constexpr int THREADS = 256; // two warpgroups
  static constexpr int TILE = 64;     // tokens per tile: the N of S, TILE / 16 k-steps of P V
  static constexpr int STAGES = 2;
  static constexpr int TD = DK / 8;   // 16-byte pieces per latent row
  static constexpr int KSTEPS = DK / 16;
  static constexpr int DV_HALF = DV / 2;  // output columns per warpgroup
  static constexpr int VCHUNKS = DV_HALF / 64;  // 64-column chunks (n64 wgmma) per warpgroup
  static constexpr int ROW_THREADS = 8;  // loader threads per latent row
  static constexpr int ROWS_PER_PASS = 128 / ROW_THREADS;
  static constexpr int ROW_PASSES = TILE / ROWS_PER_PASS;
  static constexpr int ROW_PIECES = TD / ROW_THREADS;
  static constexpr size_t SMEM_Q = size_t(ROWS) * DK * 2;
  static constexpr size_t SMEM_TILE = size_t(TILE) * DK * 2;
  static constexpr size_t SMEM_ALIGN = 1024;  // swizzle atoms start on 1024-byte boundaries
  static_assert(DK % 64 == 0 && DV % 128 == 0, "wgmma MLA decode: DK a multiple of 64, DV of 128");
  static_assert(TD % ROW_THREADS == 0, "latent row pieces must split evenly over the loader threads");
};

// TMA: the tiles come from TMA boxes issued by one thread of warpgroup 1 (mla_decode_wgmma_tma_kernel,
// KVCORE_MLA_WGMMA_LOADER=tma; session 10, timed no faster in session 11) instead of the warpgroup's
// cp.async.
template <int DK_, int DV_, bool MBAR_HANDOFF_ = true, bool TMA_ = false>
struct MlaDecodeWgmmaConfig : MlaWgmmaShape<DK_, DV_> {
  using Shape = MlaWgmmaShape<DK_, DV_>;
  static constexpr bool MBAR_HANDOFF = MBAR_HANDOFF_;
  static constexpr bool TMA = TMA_;
  static constexpr size_t SMEM_P = size_t(Shape::ROWS) * 64 * 2;  // 128-byte rows whatever the tile
  static constexpr size_t SMEM_ROWF = 3 * Shape::ROWS * 4;  // factors, then 1/l and lse
  static constexpr size_t SMEM_BAR = (2 * Shape::STAGES + 2) * 8;  // full[], empty[], P full, P free
  static constexpr size_t SMEM_BYTES =
      Shape::SMEM_ALIGN + Shape::SMEM_Q + Shape::STAGES * Shape::SMEM_TILE + SMEM_P + SMEM_ROWF + SMEM_BAR;
  static_assert(SMEM_BYTES <= 227 * 1024 - 64, "wgmma MLA decode: shared memory over the sm_90 limit");
};

namespace mla_wgmma {
enum NamedBarrier : int { kPFull = 1, kPFree = 2, kStats = 3 };

#if KVCORE_SM90A
// Pieces of the tile loop both 64-head kernels run (mla_decode_wgmma_kernel and
// mla_decode_seesaw_kernel). Fragment roles: this thread holds rows r0 and r0 + 8 of the
// warpgroup's 64 (r0 = 16 warp + lane / 4) and columns 8 i + cpair (+1) (cpair = 2 (lane % 4)).

// This CTA's range of the sequence's latent rows, and one warpgroup's share of loading it: the
// range clamped as in the other MLA kernels (every index read is), and the cp.async roles of the
// warpgroup's thread wtid (pieces copy_c0 + 8 j of rows copy_r0 + RPP i of a tile, in the 128-byte
// swizzle wgmma reads), with the pages of those rows fetched one tile ahead of their copies.
// The dynamic shared memory, aligned up to Shape::SMEM_ALIGN (swizzle atoms start on 1024-byte
// boundaries; SMEM_BYTES counts the slack).
template <typename Shape>
__device__ __forceinline__ unsigned char* aligned_smem() {
  extern __shared__ unsigned char smem_raw[];
  return reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + Shape::SMEM_ALIGN - 1) & ~uintptr_t(Shape::SMEM_ALIGN - 1));
}

// Q of head block h0 into sQ in the 128-byte swizzle wgmma reads (heads past H and columns past
// dk are zero), by cp.async of all the CTA's threads; the caller waits for the copies.
template <typename Shape, typename T>
__device__ __forceinline__ void stage_q_sw128(const MlaDecodeParams& p, int b, int h0, T* sQ) {
  constexpr int ROWS = Shape::ROWS;
  mla_stage_q_async<ROWS, Shape::TD, Shape::THREADS>(p, b, h0, sQ,
                                                       [](int row, int piece) { return swz128_offset(ROWS, row, piece); });
}

// The output accumulators (VCHUNKS chunks of 64 columns, one m64n64 D fragment each), zeroed.
template <int VCHUNKS>
__device__ __forceinline__ void zero_out_acc(float (&o)[VCHUNKS][32]) {
#pragma unroll
  for (int c = 0; c < VCHUNKS; ++c)
#pragma unroll
    for (int i = 0; i < 32; ++i) o[c][i] = 0.f;
}

template <typename T, typename Shape>
struct TileStream {
  int capacity, start, end, num_tiles;
  const int* bt;
  int copy_r0, copy_c0;
  int pages[Shape::ROW_PASSES];

  // The range [split * chunk, +chunk) of MlaTileRing (split_range.h), and the pages of tile
  // first_tile (the first this thread's warpgroup loads) in `pages`: looked up for the full-length
  // start (split * split_tokens) while seq_len is in flight, so at full length the two loads
  // overlap, and again from a shorter sequence's own start.
  __device__ __forceinline__ TileStream(const MlaDecodeParams& p, int b, int split, int wtid, int first_tile) {
    capacity = p.max_pages * p.page_size;
    bt = p.block_table + int64_t(b) * p.max_pages;
    copy_r0 = wtid >> 3;
    copy_c0 = wtid & 7;
    const int seq_len_raw = __ldg(p.seq_lens + b);
    start = split * p.split_tokens;
    fetch_pages(p, first_tile);
    const int seq_len = min(max(seq_len_raw, 0), capacity);
    const int chunk = split_chunk(seq_len, p.num_splits, p.split_tokens, Shape::TILE);
    if (split * chunk != start) {
      start = split * chunk;
      fetch_pages(p, first_tile);
    }
    end = min(seq_len, start + chunk);
    num_tiles = start < end ? (end - start + Shape::TILE - 1) / Shape::TILE : 0;
  }
  // The pages of this thread's rows of tile t.
  __device__ __forceinline__ void fetch_pages(const MlaDecodeParams& p, int t) {
    mla_fetch_pages<Shape::ROW_PASSES, Shape::ROWS_PER_PASS>(p, bt, capacity, start + t * Shape::TILE + copy_r0, pages);
  }
  // This thread's copies of tile t (pages fetched for it) into stage t % STAGES of sTile, counted
  // on that stage's full barrier.
  __device__ __forceinline__ void issue_tile(const MlaDecodeParams& p, int t, T* sTile, uint64_t* full) {
    constexpr int TILE = Shape::TILE, STAGES = Shape::STAGES;
    mla_copy_tile<Shape::ROW_PASSES, Shape::ROW_PIECES, Shape::ROWS_PER_PASS, TILE * 64>(
        p, sTile + (t % STAGES) * TILE * Shape::DK, [](int row, int piece) { return swz128_offset(TILE, row, piece); },
        pages, start + t * TILE, end, copy_r0, copy_c0);
    cp_async_mbarrier_arrive(full + t % STAGES);
  }
};

// TMA form of a tile load (one thread): tile t of the range into stage t % STAGES, completing on
// that stage's full barrier by transaction count. `map` is the latent cache as a 3-D tensor
// (dk columns, page_size rows, pages; latent_tensor_map in csrc/mla/mla_decode.cu builds it) with boxes
// of 64 columns x min(page_size, TILE) rows x 1 page and the 128-byte swizzle, which is
// swz128_offset's layout, so box (chunk c, page segment g) lands at chunk c's base plus g x rows
// rows. The launcher uses this form only for page sizes that divide TILE or are multiples of it
// (at least 8 rows, so segments start on 1024-byte swizzle atoms). Columns past dk are outside
// the map and arrive as zeros; rows past the range's end arrive as whatever the cache holds there
// (the kernel zeroes them before use); page ids are clamped as in the cp.async path.
template <typename Shape, typename T>
__device__ __forceinline__ void issue_tile_tma(const MlaDecodeParams& p, const void* map, const int* bt, int capacity,
                                               int tile_pos, T* dst, uint64_t* full) {
  constexpr int TILE = Shape::TILE, CHUNKS = Shape::DK / 64, SEGMENTS = TILE / 8;
  const int rows = p.page_size < TILE ? p.page_size : TILE;
  // Every segment's page first (independent loads, one round trip), then the boxes.
  int page[SEGMENTS];
#pragma unroll
  for (int g = 0; g < SEGMENTS; ++g) {
    if (g * rows < TILE)
      page[g] = min(max(__ldg(bt + mla_page_of(p, min(tile_pos + g * rows, capacity - 1))), 0), p.num_pages - 1);
  }
  const int in_page = mla_in_page(p, tile_pos);  // 0 unless page_size > TILE
  mbarrier_arrive_expect_tx(full, uint32_t(TILE) * Shape::DK * uint32_t(sizeof(T)));
#pragma unroll
  for (int g = 0; g < SEGMENTS; ++g) {
    if (g * rows < TILE) {
#pragma unroll 1  // one thread issues these: keep the loop body (and the instruction cache) small
      for (int c = 0; c < CHUNKS; ++c)
        tma_load_3d(dst + (c * TILE + g * rows) * 64, map, c * 64, in_page, page[g], full);
    }
  }
}

// Rows [valid, TILE) of a stage's tile set to zero by all THREADS threads, then made visible to
// wgmma (the TMA form loads those rows from the cache as they are; the cp.async form zero-fills
// them). V rows past the end must be zero, not merely unused: P is 0 there, and 0 x inf is NaN.
template <typename Shape, typename T>
__device__ __forceinline__ void zero_tile_tail(T* stage, int valid, int tid) {
  constexpr int TD = Shape::TD, TILE = Shape::TILE;
  for (int i = tid; i < (TILE - valid) * TD; i += Shape::THREADS) {
    const int row = valid + i / TD, piece = i % TD;
    *reinterpret_cast<uint4*>(stage + swz128_offset(TILE, row, piece)) = make_uint4(0u, 0u, 0u, 0u);
  }
  fence_proxy_async_smem();
  __syncthreads();
}

// O's rows r0 and r0 + 8 times the softmax's rescale factors. Once the running maxima settle
// (after the first tiles, as a rule) every factor is exactly 1 (exp2(0)): a warp whose rows all
// have 1 skips its multiplies. NaN and 0 factors rescale as before.
template <int VCHUNKS>
__device__ __forceinline__ void rescale_o(float (&o)[VCHUNKS][32], float a0, float a1) {
  if (__all_sync(0xffffffffu, a0 == 1.f && a1 == 1.f)) return;
#pragma unroll
  for (int c = 0; c < VCHUNKS; ++c)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      o[c][4 * i + 0] *= a0;
      o[c][4 * i + 1] *= a0;
      o[c][4 * i + 2] *= a1;
      o[c][4 * i + 3] *= a1;
    }
}

// S = Q K^T of one tile (KSTEPS k-steps of 16 latent columns; each 64-column chunk holds 4),
// waited, in the log2 domain; tokens from `end` on are -inf (only a range's last tile, one that
// reaches past `end`, pays the per-element test). dQ / dK: the descriptors of Q and of the tile
// as K (K-major), advanced here by constant offsets.
template <typename T, int KSTEPS, int ROWS, int TILE>
__device__ __forceinline__ void tile_scores(float (&sv)[TILE / 2], uint64_t dQ, uint64_t dK, float s_scale,
                                            int tile_pos, int end, int cpair) {
#pragma unroll
  for (int i = 0; i < TILE / 2; ++i) sv[i] = 0.f;
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
    const uint32_t off = ((ks >> 2) * ROWS * 64 + (ks & 3) * 16) * 2;  // bytes: chunk, then k16 within
    const uint32_t koff = ((ks >> 2) * TILE * 64 + (ks & 3) * 16) * 2;
    wgmma_m64n64k16_ss(sv, desc_advance(dQ, off), desc_advance(dK, koff), ks > 0, T{});
  }
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_regs(sv);
#pragma unroll
  for (int i = 0; i < TILE / 2; ++i) sv[i] *= s_scale;
  if (tile_pos + TILE > end) {
    const int tok0 = tile_pos + cpair;
#pragma unroll
    for (int i = 0; i < TILE / 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (tok0 + 8 * i + (j & 1) >= end) sv[4 * i + j] = -INFINITY;
  }
}

// The factor that rescales a sum taken against running max `from` to running max `to` (to >=
// from): exp2(from - base(to)), where a max of -inf (nothing seen yet) has base 0 so that exp2
// stays finite. The softmax below uses the same expression, so a warpgroup that only learns the
// new maxima computes the factor bit for bit as the one that took them.
__device__ __forceinline__ float rescale_factor(float from, float to) {
  return exp2f(from - (to == -INFINITY ? 0.f : to));
}

// Online softmax of one tile's scores (log2 domain) against the running maxima m (updated): sv
// becomes P = exp2(S - m) in place and packed into wgmma A fragments pk; alpha gets the old
// maxima's rescale factors; l (this lane's tokens; the quad's sum is taken at the end) is rescaled
// and added to.
template <typename T, int TILE>
__device__ __forceinline__ void tile_softmax(float (&sv)[TILE / 2], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                             uint32_t (&pk)[TILE / 16][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = m[r];
#pragma unroll
    for (int i = 0; i < TILE / 8; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) mx = fmaxf(mx, sv[4 * i + 2 * r + j]);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float base = mx == -INFINITY ? 0.f : mx;  // nothing seen yet: keep exp2 finite
    alpha[r] = rescale_factor(m[r], mx);
    m[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < TILE / 8; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float& x = sv[4 * i + 2 * r + j];
        x = exp2f(x - base);
        sum += x;
      }
    l[r] = l[r] * alpha[r] + sum;
  }
#pragma unroll
  for (int ks = 0; ks < TILE / 16; ++ks) {
    pk[ks][0] = pack2(sv[8 * ks + 0], sv[8 * ks + 1], T{});
    pk[ks][1] = pack2(sv[8 * ks + 2], sv[8 * ks + 3], T{});
    pk[ks][2] = pack2(sv[8 * ks + 4], sv[8 * ks + 5], T{});
    pk[ks][3] = pack2(sv[8 * ks + 6], sv[8 * ks + 7], T{});
  }
}

// P (A fragments) into a ROWS x 128-byte swizzled buffer sP, for the other warpgroup.
template <int ROWS, int TILE, typename T>
__device__ __forceinline__ void store_p(T* sP, const uint32_t (&pk)[TILE / 16][4], int r0, int cpair) {
#pragma unroll
  for (int ks = 0; ks < TILE / 16; ++ks)
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // n8 tile 2 ks + h: tokens 16 ks + 8 h + cpair
      *reinterpret_cast<uint32_t*>(sP + swz128_offset(ROWS, r0, 2 * ks + h) + cpair) = pk[ks][2 * h];
      *reinterpret_cast<uint32_t*>(sP + swz128_offset(ROWS, r0 + 8, 2 * ks + h) + cpair) = pk[ks][2 * h + 1];
    }
}

// The other warpgroup's P from sP as this warpgroup's A fragments.
template <int ROWS, int TILE, typename T>
__device__ __forceinline__ void load_p(const T* sP, uint32_t (&pk)[TILE / 16][4], int warp, int lane) {
#pragma unroll
  for (int ks = 0; ks < TILE / 16; ++ks)
    ldmatrix_x4(pk[ks], sP + swz128_offset(ROWS, warp * 16 + (lane & 15), 2 * ks + (lane >> 4)));
}

// O[:, this warpgroup's columns] += P V of a tile, committed, not waited: V chunk c is the tile's
// column chunk c (dV: this warpgroup's first), read MN-major (its rows are the k of the product),
// 16 tokens = 2 groups of 8 rows per k-step.
template <typename T, int TILE, int VCHUNKS>
__device__ __forceinline__ void issue_pv(float (&o)[VCHUNKS][32], const uint32_t (&pk)[TILE / 16][4], uint64_t dV) {
#pragma unroll
  for (int c = 0; c < VCHUNKS; ++c) wgmma_fence_regs(o[c]);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < TILE / 16; ++ks)
#pragma unroll
    for (int c = 0; c < VCHUNKS; ++c)
      wgmma_m64n64k16_rs_tb(o[c], pk[ks], desc_advance(dV, (c * TILE * 64 + ks * 16 * 64) * 2), T{});
  wgmma_commit();
}

template <int VCHUNKS>
__device__ __forceinline__ void wait_pv(float (&o)[VCHUNKS][32]) {
  wgmma_wait<0>();
#pragma unroll
  for (int c = 0; c < VCHUNKS; ++c) wgmma_fence_regs(o[c]);
}

// The CTA's results once sInv / sLse (1 / l and the log2 lse per row) are published: this
// warpgroup's half of O scaled by 1 / l into `out` (one split) or the split's partial, the lse,
// then the split merge by the last CTA of the head block unless a separate merge kernel follows
// (its weights reuse `scratch`, the tile stages, every copy into which has landed).
template <typename T, int ROWS, int THREADS, int VCHUNKS>
__device__ __forceinline__ void store_out(const MlaDecodeParams& p, const float (&o)[VCHUNKS][32], const float* sInv,
                                          const float* sLse, int b, int hb, int split, int wg, int r0, int cpair,
                                          int lane, float* scratch) {
  const int h0 = hb * ROWS, vchunk0 = wg * VCHUNKS;
  auto for_each_pair = [&](int r, float inv, auto&& store) {
#pragma unroll
    for (int c = 0; c < VCHUNKS; ++c)
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int col = (vchunk0 + c) * 64 + 8 * i + cpair;
        if (col < p.dv) store(col, o[c][4 * i + 2 * r] * inv, o[c][4 * i + 2 * r + 1] * inv);
      }
  };
  const int64_t pair = int64_t(b) * p.head_blocks + hb;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r0 + 8 * r, h = h0 + row;
    const float inv = sInv[row], lse2 = sLse[row];
    if (p.num_splits == 1) {
      if (h < p.num_heads) {
        T* dst = static_cast<T*>(p.out) + (int64_t(b) * p.num_heads + h) * p.dv;
        for_each_pair(r, inv, [&](int col, float x, float y) {
          *reinterpret_cast<uint32_t*>(dst + col) = pack2(x, y, T{});
        });
        if (p.lse != nullptr && wg == 0 && (lane & 3) == 0) p.lse[int64_t(b) * p.num_heads + h] = lse2 * kLn2;
      }
    } else {
      const int64_t slot = (pair * p.num_splits + split) * ROWS + row;
      float* dst = p.partial_out + slot * p.dv;
      for_each_pair(r, inv, [&](int col, float x, float y) {
        *reinterpret_cast<float2*>(dst + col) = make_float2(x, y);
      });
      if (wg == 0 && (lane & 3) == 0) p.partial_lse[slot] = lse2;
    }
  }
  if (p.num_splits == 1 || p.merge_separately) return;
  mla_split_merge<T, ROWS, THREADS>(p, b, h0, pair, scratch);
}
#endif  // KVCORE_SM90A
}  // namespace mla_wgmma

namespace mla_wgmma {
// The kernel's body; `map` (Cfg::TMA only) is the TMA kernel's tensor-map parameter.
template <typename T, typename Cfg>
__device__ __forceinline__ void wgmma_decode(const MlaDecodeParams& p, const void* map) {
#if KVCORE_SM90A
  constexpr int DK = Cfg::DK, TILE = Cfg::TILE, ROWS = Cfg::ROWS, KSTEPS = Cfg::KSTEPS;
  constexpr int VCHUNKS = Cfg::VCHUNKS, STAGES = Cfg::STAGES;
  unsigned char* const smem = aligned_smem<Cfg>();
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sTile = reinterpret_cast<T*>(smem + Cfg::SMEM_Q);
  T* const sP = reinterpret_cast<T*>(smem + Cfg::SMEM_Q + STAGES * Cfg::SMEM_TILE);
  float* const sFactor = reinterpret_cast<float*>(smem + Cfg::SMEM_Q + STAGES * Cfg::SMEM_TILE + Cfg::SMEM_P);
  float* const sInv = sFactor + ROWS;
  float* const sLse = sInv + ROWS;
  uint64_t* const full = reinterpret_cast<uint64_t*>(sFactor + 3 * ROWS);
  uint64_t* const empty = full + STAGES;
  uint64_t* const p_full = empty + STAGES;  // MBAR_HANDOFF only
  uint64_t* const p_free = p_full + 1;

  const int hb = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, wg = tid >> 7, wtid = tid & 127, warp = wtid >> 5, lane = tid & 31;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbarrier_init(full + s, Cfg::TMA ? 1 : 128);  // TMA: the issuing thread's expect_tx arrival
      mbarrier_init(empty + s, 256);
    }
    if (Cfg::MBAR_HANDOFF) {
      mbarrier_init(p_full, 128);
      mbarrier_init(p_free, 128);
    }
    // TMA completes transactions on the full barriers from the async proxy: make the
    // initialisation visible to it (the __syncthreads below then orders it before any issue).
    if constexpr (Cfg::TMA) asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }

  // This CTA's KV range; warpgroup 1 loads it (tile 0's pages are in ts.pages).
  TileStream<T, Cfg> ts(p, b, split, wtid, 0);
  const int start = ts.start, end = ts.end, num_tiles = ts.num_tiles;

  // ---- Q of the head block, 128-byte swizzled (heads past H and columns past dk are zero) ----
  // Its copies go out first; the first tiles' loads are issued while they are in flight (they
  // need only the barrier initialisation, published by the first __syncthreads), and Q is
  // waited for after them.
  const int h0 = hb * ROWS;
  stage_q_sw128<Cfg>(p, b, h0, sQ);
  __syncthreads();  // the barrier initialisation is visible to all

  if constexpr (Cfg::TMA) {
    if (tid == 128) {
      for (int s = 0; s < STAGES && s < num_tiles; ++s)
        issue_tile_tma<Cfg>(p, map, ts.bt, ts.capacity, start + s * TILE, sTile + s * TILE * DK, full + s);
    }
  } else if (wg == 1) {
    for (int s = 0; s < STAGES; ++s) {
      if (s > 0) ts.fetch_pages(p, s);  // (tile 0's: fetched by the constructor)
      if (s < num_tiles) ts.issue_tile(p, s, sTile, full);
    }
    ts.fetch_pages(p, STAGES);
  }
  cp_async_wait<0>();        // this thread's pieces of Q (the tiles' copies are not in the group)
  fence_proxy_async_smem();  // Q, written through the generic proxy, before wgmma reads it
  __syncthreads();           // every thread's pieces of Q

  // D fragment roles (both warpgroups): rows r0 and r0 + 8, columns 8 i + cpair (+1).
  const int r0 = warp * 16 + (lane >> 2), cpair = (lane & 3) * 2;
  float o[VCHUNKS][32];
  zero_out_acc(o);
  const uint32_t kSbo = 1024, kChunkBytes = TILE * 128;
  // Operand descriptors built once: Q (K-major), the first stage as K (K-major) and as V
  // (MN-major, this warpgroup's first 64-column chunk); each wgmma adds its constant offset
  // (desc_advance), the stage's offset once per tile.
  const uint64_t dQ = smem_desc_sw128(sQ, 16, kSbo);
  const uint64_t dK0 = smem_desc_sw128(sTile, 16, kSbo);
  const int vchunk0 = wg * VCHUNKS;  // this warpgroup's first 64-column chunk of V and O
  const uint64_t dV0 = smem_desc_sw128(sTile + vchunk0 * TILE * 64, kChunkBytes, kSbo);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // warpgroup 0 only
  const float s_scale = p.scale * kLog2e;

  for (int t = 0; t < num_tiles; ++t) {
    const int stage = t % STAGES;
    const uint32_t phase = (t / STAGES) & 1;
    // This stage's operand descriptors: the wgmma add only constant offsets to them.
    const uint64_t dK = desc_advance(dK0, uint32_t(stage) * TILE * DK * 2);
    const uint64_t dV = desc_advance(dV0, uint32_t(stage) * TILE * DK * 2);
    uint32_t pa[TILE / 16][4];  // P as wgmma A fragments, one per k-step of 16 tokens
    mbarrier_wait(full + stage, phase);
    fence_proxy_async_smem();
    if constexpr (Cfg::TMA) {
      // CTA-uniform: only a range's last tile can reach past its end.
      if (start + t * TILE + TILE > end) zero_tile_tail<Cfg>(sTile + stage * TILE * DK, end - start - t * TILE, tid);
    }

    if (wg == 0) {
      float s[TILE / 2], alpha[2];
      tile_scores<T, KSTEPS, ROWS, TILE>(s, dQ, dK, s_scale, start + t * TILE, end, cpair);
      tile_softmax<T, TILE>(s, m, l, alpha, pa);
      // Hand P(t) and the factors to warpgroup 1 once it holds P(t-1) in registers.
      if (t > 0) {
        if constexpr (Cfg::MBAR_HANDOFF)
          mbarrier_wait(p_free, (t - 1) & 1);
        else
          named_barrier_sync(kPFree, 256);
      }
      store_p<ROWS, TILE>(sP, pa, r0, cpair);
      if ((lane & 3) == 0) {
        sFactor[r0] = alpha[0];
        sFactor[r0 + 8] = alpha[1];
      }
      if constexpr (Cfg::MBAR_HANDOFF)
        mbarrier_arrive(p_full);
      else
        named_barrier_arrive(kPFull, 256);
      rescale_o(o, alpha[0], alpha[1]);
    } else {
      // Tile t+2's pages while warpgroup 0 computes S (they were fetched for tile 2 up front).
      if constexpr (Cfg::MBAR_HANDOFF)
        mbarrier_wait(p_full, t & 1);
      else
        named_barrier_sync(kPFull, 256);
      load_p<ROWS, TILE>(sP, pa, warp, lane);
      const float alpha0 = sFactor[r0], alpha1 = sFactor[r0 + 8];
      if constexpr (Cfg::MBAR_HANDOFF)
        mbarrier_arrive(p_free);
      else if (t + 1 < num_tiles)
        named_barrier_arrive(kPFree, 256);
      rescale_o(o, alpha0, alpha1);
    }

    issue_pv<T, TILE>(o, pa, dV);
    wait_pv(o);
    mbarrier_arrive(empty + stage);

    if constexpr (Cfg::TMA) {
      if (tid == 128 && t + STAGES < num_tiles) {
        mbarrier_wait(empty + stage, phase);  // both warpgroups are done with the stage
        issue_tile_tma<Cfg>(p, map, ts.bt, ts.capacity, start + (t + STAGES) * TILE, sTile + stage * TILE * DK,
                            full + stage);
      }
    } else if (wg == 1 && t + STAGES < num_tiles) {
      mbarrier_wait(empty + stage, phase);  // warpgroup 0 is done with the stage too
      ts.issue_tile(p, t + STAGES, sTile, full);
      ts.fetch_pages(p, t + STAGES + 1);
    }
  }

  // ---- final row statistics (warpgroup 0), then both halves of O ------------------------------
  if (wg == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float lsum = l[r];
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
      if ((lane & 3) == 0) {
        // lsum == 0: nothing attended (out 0, lse -inf). A NaN stays NaN in both.
        sInv[r0 + 8 * r] = lsum == 0.f ? 0.f : 1.f / lsum;
        sLse[r0 + 8 * r] = lsum == 0.f ? -INFINITY : m[r] + log2f(lsum);
      }
    }
  }
  if constexpr (Cfg::MBAR_HANDOFF)
    __syncthreads();
  else
    named_barrier_sync(kStats, 256);
  store_out<T, ROWS, Cfg::THREADS>(p, o, sInv, sLse, b, hb, split, wg, r0, cpair, lane, reinterpret_cast<float*>(sTile));
#else
  // Built without sm_90a: the launcher never selects this kernel there (it checks the device and
  // this image's register count); a launch anyway fails loudly instead of leaving `out` unwritten.
  __trap();
#endif
}
}  // namespace mla_wgmma

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, 1) mla_decode_wgmma_kernel(const MlaDecodeParams p) {
  static_assert(!Cfg::TMA, "the TMA form is mla_decode_wgmma_tma_kernel");
  mla_wgmma::wgmma_decode<T, Cfg>(p, nullptr);
}

// The TMA form (Cfg::TMA): `map` describes the latent cache (see mla_wgmma::issue_tile_tma).
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, 1)
    mla_decode_wgmma_tma_kernel(const MlaDecodeParams p, const __grid_constant__ CUtensorMap map) {
  static_assert(Cfg::TMA, "the cp.async form is mla_decode_wgmma_kernel");
  mla_wgmma::wgmma_decode<T, Cfg>(p, &map);
}

}  // namespace kvcore
