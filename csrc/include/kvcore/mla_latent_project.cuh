// MLA latent projection (kvcore::mla_latent_project) on the GPU, framework-free.
//
//   kv   = hidden [T, K] @ w [K, W]                 (W = R + P; fp32 accumulation)
//   c_kv = kv[:, :R] * rsqrt(mean(kv[:, :R]^2) + eps) * norm_weight
//   k_pe = RoPE(kv[:, R:], positions)
//   latent_cache[slot] = [c_kv, k_pe] (slot_mapping; out-of-range slots skipped), optional outputs.
//
// Decode-sized T (<= 64 tokens, mla_project_kernel): the weight (K x W, 8 MiB for DeepSeek's
// 7168 x 576) is the only large operand and is read exactly once, so the kernel is a split-K
// GEMV/skinny GEMM spread over every SM. The grid is (column tile of 64, K split). Each CTA
// streams its K-slice of 64 weight columns (128-byte row segments: whole cache lines) through an
// 8-stage cp.async ring - for the usual shapes its whole slice is requested up front - together
// with the matching hidden columns, and multiplies them on tensor cores (mma.sync m16n8k16, the
// tokens padded to 16-row tiles by pointing ldmatrix at a zero block, so padded rows cost no
// loads). Warps split the 64-row stage four ways along K and the 64 columns two ways; a smem
// reduction over the K-warps gives the CTA's fp32 partial [T, 64], stored to a workspace.
// Reduction without a second launch: the last CTA of each column tile (arrival counter) sums
// the tile's partials into kv [T, W]; the last of those tiles (a second counter) runs the
// epilogue (RMSNorm, RoPE, rounding, stores) for all tokens. When the partials are few (small
// T x splits) the tile level is skipped and the last CTA of the grid sums them directly.
// Counters are zero on entry and reset by the CTA that sees the final arrival, so they are zero
// again when the kernel ends (the launcher keeps them in a persistent buffer).
//
// Larger T (prefill): the launcher computes kv with cuBLAS and mla_project_finish_kernel runs
// the same epilogue (finish_tokens) with 8 tokens per CTA.
//
// Rounding follows the CPU kernel: kv, the norm and the rotation in fp32, one rounding to the
// cache dtype at the store. Bad index contents never cause out-of-bounds accesses: slots outside
// [0, num_slots) are skipped, positions clamped to [0, max_pos).
#pragma once

#include <stdint.h>

#include "kvcore/device_utils.cuh"

namespace kvcore {

struct MlaProjectParams {
  const void* hidden;        // [T, K], row stride hidden_stride elements, last dim dense
  int64_t hidden_stride;
  const void* w;             // [K, W] dense
  const void* norm_weight;   // [R]
  const float* cos_sin;      // [max_pos, P]: cos of the P/2 angles, then their sin
  const int64_t* positions;  // [T]
  const int64_t* slots;      // [T]
  void* cache;               // [pages, page_size, W], inner two dims dense, page stride page_stride
  int64_t page_stride;
  void* c_kv_out;            // [T, R] or null
  void* k_pe_out;            // [T, P] or null
  float* partials;           // [splits, T, W] fp32 workspace (fused kernel)
  float* kv;                 // [T, W] fp32: tile sums (fused kernel) or the cuBLAS product (finish kernel)
  unsigned* counters;        // [1 + col_tiles]: zero on entry, zero again on exit (fused kernel)
  int64_t num_slots;         // pages * page_size
  int tokens, d_model, rank, rope_dim, width, max_pos, page_size;
  int chunks_per_split;      // 64-row weight chunks per K split (fused kernel)
  float eps;
  bool interleaved;          // RoPE pairs (2i, 2i+1) if true, else (i, i + P/2)
  bool hidden_vec;           // hidden rows may be copied with 16-byte cp.async
  bool c_kv_vec, k_pe_vec;   // the optional outputs may be stored 16 bytes at a time
  bool single_level;         // the grid's last CTA sums all partials (no tile level)
};

struct MlaProjectConfig {
  static constexpr int THREADS = 256;
  static constexpr int NTILE = 64;        // weight columns per CTA (128-byte row segments)
  static constexpr int KC = 64;           // weight rows per pipeline stage
  static constexpr int STAGES = 8;        // ring depth: 64 KiB of weight requested per CTA
  static constexpr int MAX_TOKENS = 64;   // the fused kernel's limit (4 token tiles of 16)
  static constexpr int FIN_TOKENS = 8;    // tokens per epilogue round (one warp each)
  static constexpr int MAX_WIDTH = 1024;  // R + P: the epilogue keeps FIN_TOKENS fp32 rows in smem
  static constexpr int RED_STRIDE = NTILE + 8;  // padded fp32 row of the cross-warp reduction
  static constexpr int W_STAGE_BYTES = KC * NTILE * 2;
  template <int MT>
  static constexpr int h_stage_bytes() { return 16 * MT * KC * 2; }
  template <int MT>
  static constexpr int smem_bytes() { return STAGES * (W_STAGE_BYTES + h_stage_bytes<MT>()) + 16; }
  static constexpr int finish_smem_bytes() { return FIN_TOKENS * MAX_WIDTH * 4; }
};

namespace mla_project_detail {

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float4 ldcg4(const float* p) { return __ldcg(reinterpret_cast<const float4*>(p)); }

__device__ __forceinline__ void add4(float4& a, const float4& b) {
  a.x += b.x;
  a.y += b.y;
  a.z += b.z;
  a.w += b.w;
}

// Publishes this CTA's global writes and counts its arrival at *counter; true (in every thread)
// for the CTA that arrives last of `expected`, which also resets the counter to zero. The
// fence / barrier / atomic / fence sequence is the usual last-block pattern: the writers' fences
// order their stores before the atomic, the reader's fence orders its later loads after it.
__device__ __forceinline__ bool arrive_last(unsigned* counter, unsigned expected, int* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned prev = atomicAdd(counter, 1u);
    const bool last = prev + 1 == expected;
    if (last) atomicExch(counter, 0u);  // nobody else touches it again in this launch
    __threadfence();
    *flag = last;
  }
  __syncthreads();
  return *flag != 0;
}

// The epilogue for tokens [t_begin, t_end): row t of the projection is the sum over s < nsum of
// src[s * src_stride + t * W + c] (fp32, read through L2: other CTAs wrote it in this launch).
// FIN_TOKENS rows at a time are staged in smem (the RoPE partner of a column may lie in another
// thread's part of the row), then one warp per token normalises, rotates, rounds and stores.
template <typename T>
__device__ __forceinline__ void finish_tokens(const MlaProjectParams& p, const float* src, int nsum,
                                              int64_t src_stride, int t_begin, int t_end, uint8_t* smem) {
  using Cfg = MlaProjectConfig;
  float* rows = reinterpret_cast<float*>(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int W = p.width, R = p.rank, P = p.rope_dim, hp = P / 2;
  const int W4 = W / 4, W8 = W / 8;
  const T* norm_weight = static_cast<const T*>(p.norm_weight);
  for (int tg = t_begin; tg < t_end; tg += Cfg::FIN_TOKENS) {
    const int n = min(Cfg::FIN_TOKENS, t_end - tg);
    // The token's position and slot are loaded before the sum, so their round trip overlaps it
    // instead of following it (the epilogue of a decode-sized call is a chain of round trips).
    int64_t pos = 0, slot = -1;
    if (warp < n) {
      pos = p.positions[tg + warp];
      slot = p.slots[tg + warp];
    }
    for (int idx = tid; idx < n * W4; idx += Cfg::THREADS) {
      const int t = idx / W4, q = idx - t * W4;
      const float* s0 = src + int64_t(tg + t) * W + 4 * q;
      float4 v = ldcg4(s0);
      // Unrolled 16 deep so that up to 16 partials' loads are in flight at once: at T = 1 a
      // thread sums all 28 K splits itself (2 round trips instead of 7 at depth 4).
#pragma unroll 16
      for (int s = 1; s < nsum; ++s) add4(v, ldcg4(s0 + int64_t(s) * src_stride));
      *reinterpret_cast<float4*>(rows + t * W + 4 * q) = v;
    }
    __syncthreads();
    if (warp < n) {  // warp-uniform
      const int t = tg + warp;
      const float* row = rows + warp * W;
      float ss = 0.0f;
      for (int c = lane; c < R; c += 32) ss += row[c] * row[c];
      ss = group_sum<32>(ss);
      const float inv_rms = 1.0f / sqrtf(ss / float(R) + p.eps);
      pos = pos < 0 ? 0 : (pos >= p.max_pos ? p.max_pos - 1 : pos);
      const float* cs = p.cos_sin + pos * P;
      const float* x = row + R;
      T* dst = nullptr;
      if (slot >= 0 && slot < p.num_slots)
        dst = static_cast<T*>(p.cache) + (slot / p.page_size) * p.page_stride + (slot % p.page_size) * int64_t(W);
      T* c_kv = p.c_kv_out ? static_cast<T*>(p.c_kv_out) + int64_t(t) * R : nullptr;
      T* k_pe = p.k_pe_out ? static_cast<T*>(p.k_pe_out) + int64_t(t) * P : nullptr;
      for (int j = lane; j < W8; j += 32) {
        float y[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int c = 8 * j + e;
          if (c < R) {
            y[e] = row[c] * inv_rms * to_float(norm_weight[c]);
          } else {
            const int i = c - R;
            if (p.interleaved) {  // pairs (2m, 2m+1)
              const int m = i >> 1;
              const float cv = cs[m], sv = cs[hp + m], a = x[2 * m], b = x[2 * m + 1];
              y[e] = (i & 1) ? b * cv + a * sv : a * cv - b * sv;
            } else {  // pairs (m, m + P/2)
              const int m = i < hp ? i : i - hp;
              const float cv = cs[m], sv = cs[hp + m], a = x[m], b = x[m + hp];
              y[e] = i < hp ? a * cv - b * sv : b * cv + a * sv;
            }
          }
        }
        const uint4 packed = pack8<T>(y);
        if (dst) *reinterpret_cast<uint4*>(dst + 8 * j) = packed;
        const int c0 = 8 * j;
        if (c_kv && c0 < R) {
          if (p.c_kv_vec) {  // R % 8 == 0: the chunk lies wholly in c_KV
            *reinterpret_cast<uint4*>(c_kv + c0) = packed;
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e)
              if (c0 + e < R) c_kv[c0 + e] = from_float<T>(y[e]);
          }
        }
        if (k_pe && c0 + 8 > R) {
          if (p.k_pe_vec) {  // R % 8 == 0: the chunk lies wholly in k_pe
            *reinterpret_cast<uint4*>(k_pe + (c0 - R)) = packed;
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e)
              if (c0 + e >= R) k_pe[c0 + e - R] = from_float<T>(y[e]);
          }
        }
      }
    }
    __syncthreads();  // rows is rewritten by the next round
  }
}

}  // namespace mla_project_detail

// Grid (col_tiles, splits), MlaProjectConfig::THREADS threads, smem_bytes<MT>() dynamic smem.
// MT: 16-token tiles (tokens <= 16 * MT).
template <typename T, int MT>
__global__ void __launch_bounds__(MlaProjectConfig::THREADS, MT == 1 ? 2 : 1)
    mla_project_kernel(const MlaProjectParams p) {
  using Cfg = MlaProjectConfig;
  using namespace mla_project_detail;
  constexpr int H_STAGE = Cfg::h_stage_bytes<MT>();
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* w_ring = smem;
  uint8_t* h_ring = smem + Cfg::STAGES * Cfg::W_STAGE_BYTES;
  uint8_t* zero16 = h_ring + Cfg::STAGES * H_STAGE;  // ldmatrix source of the padding token rows
  __shared__ int s_flag;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = blockIdx.x, split = blockIdx.y;
  const int n0 = tile * Cfg::NTILE;
  const int W = p.width, K = p.d_model, tokens = p.tokens;
  const int total_chunks = (K + Cfg::KC - 1) / Cfg::KC;
  const int chunk0 = split * p.chunks_per_split;
  const int n_chunks = max(0, min(p.chunks_per_split, total_chunks - chunk0));
  const T* w = static_cast<const T*>(p.w);
  const T* hidden = static_cast<const T*>(p.hidden);
  if (tid == 0) *reinterpret_cast<uint4*>(zero16) = make_uint4(0u, 0u, 0u, 0u);

  // Stage layout: weight [KC rows][8 chunks of 16 bytes], hidden [16 * MT tokens][8 chunks]; the
  // chunk index is XOR-swizzled with (row & 7) so that the 8 rows one ldmatrix reads at the same
  // logical chunk fall into 8 different bank groups.
  auto load_chunk = [&](int i, int stage) {
    const int64_t k0 = int64_t(chunk0 + i) * Cfg::KC;
    uint8_t* ws = w_ring + stage * Cfg::W_STAGE_BYTES;
#pragma unroll
    for (int q = tid; q < Cfg::KC * 8; q += Cfg::THREADS) {
      const int row = q >> 3, c = q & 7;
      const int64_t k = k0 + row;
      const int col = n0 + c * 8;
      const bool ok = k < K && col < W;  // W % 8 == 0: a chunk is wholly in or out
      cp_async_16(ws + row * 128 + ((c ^ (row & 7)) << 4), ok ? w + k * W + col : w, ok);
    }
    uint8_t* hs = h_ring + stage * H_STAGE;
    for (int q = tid; q < tokens * 8; q += Cfg::THREADS) {
      const int t = q >> 3, c = q & 7;
      const int64_t k = k0 + c * 8;
      uint8_t* dst = hs + t * 128 + ((c ^ (t & 7)) << 4);
      const T* src = hidden + int64_t(t) * p.hidden_stride;
      if (p.hidden_vec) {  // K % 8 == 0 and aligned rows: a chunk is wholly in or out
        const bool ok = k < K;
        cp_async_16(dst, ok ? src + k : hidden, ok);
      } else {  // odd d_model or stride: element loads, zeros past K
        const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
        uint16_t v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = k + e < K ? s16[k + e] : uint16_t(0);
        *reinterpret_cast<uint4*>(dst) = make_uint4(v[0] | (uint32_t(v[1]) << 16), v[2] | (uint32_t(v[3]) << 16),
                                                     v[4] | (uint32_t(v[5]) << 16), v[6] | (uint32_t(v[7]) << 16));
      }
    }
  };

  // Warp (wk, wn): k-rows [16 wk, 16 wk + 16) of each stage, columns [32 wn, 32 wn + 32).
  const int wk = warp & 3, wn = warp >> 2;
  float acc[MT][4][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < n_chunks) load_chunk(s, s);
    cp_async_commit();  // empty groups keep the wait count uniform
  }
  for (int i = 0; i < n_chunks; ++i) {
    const int next = i + Cfg::STAGES - 1;
    if (next < n_chunks) load_chunk(next, next % Cfg::STAGES);  // the stage freed by iteration i - 1
    cp_async_commit();
    cp_async_wait<Cfg::STAGES - 1>();  // chunk i has landed (this thread's copies)
    __syncthreads();                   // ... and every thread's
    const int stage = i % Cfg::STAGES;
    const uint8_t* ws = w_ring + stage * Cfg::W_STAGE_BYTES;
    const uint8_t* hs = h_ring + stage * H_STAGE;
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      // A (16 tokens x 16 k): lanes 0-15 rows 0-15 at k 0-7, lanes 16-31 the same rows at k 8-15.
      const int r = mt * 16 + (lane & 15), c = wk * 2 + (lane >> 4);
      ldmatrix_x4(a[mt], r < tokens ? hs + r * 128 + ((c ^ (r & 7)) << 4) : zero16);
    }
#pragma unroll
    for (int pr = 0; pr < 2; ++pr) {
      // B (16 k x 16 columns) transposed out of the row-major weight: matrices (k 0-7, n 0-7),
      // (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15) -> b0/b1 of two n8 tiles.
      const int m = lane >> 3;
      const int r = wk * 16 + (lane & 7) + ((m & 1) << 3), c = wn * 4 + pr * 2 + (m >> 1);
      uint32_t b[4];
      ldmatrix_x4_trans(b, ws + r * 128 + ((c ^ (r & 7)) << 4));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816(acc[mt][pr * 2], a[mt], b[0], b[1], T{});
        mma_16816(acc[mt][pr * 2 + 1], a[mt], b[2], b[3], T{});
      }
    }
    __syncthreads();  // the stage is refilled by the next iteration
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring is reused below

  // Sum the four K-warps of each column half in smem: red[wk][token row][column].
  float* red = reinterpret_cast<float*>(smem);
  constexpr int RS = Cfg::RED_STRIDE;
  const int g = lane >> 2, q2 = (lane & 3) * 2;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int row = mt * 16 + g, col = wn * 32 + nt * 8 + q2;
      float* base = red + (wk * 16 * MT + row) * RS + col;
      *reinterpret_cast<float2*>(base) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
      *reinterpret_cast<float2*>(base + 8 * RS) = make_float2(acc[mt][nt][2], acc[mt][nt][3]);
    }
  __syncthreads();
  const int tile_cols = min(Cfg::NTILE, W - n0);  // a multiple of 8
  {
    float* part = p.partials + int64_t(split) * tokens * W + n0;
    for (int idx = tid; idx < tokens * (Cfg::NTILE / 4); idx += Cfg::THREADS) {
      const int t = idx >> 4, col = (idx & 15) * 4;
      if (col >= tile_cols) continue;
      float4 v = *reinterpret_cast<const float4*>(red + t * RS + col);
#pragma unroll
      for (int k = 1; k < 4; ++k) add4(v, *reinterpret_cast<const float4*>(red + (k * 16 * MT + t) * RS + col));
      *reinterpret_cast<float4*>(part + int64_t(t) * W + col) = v;
    }
  }

  const int splits = gridDim.y;
  if (p.single_level) {
    if (!arrive_last(p.counters, gridDim.x * gridDim.y, &s_flag)) return;
    finish_tokens<T>(p, p.partials, splits, int64_t(tokens) * W, 0, tokens, smem);
    return;
  }
  if (!arrive_last(p.counters + 1 + tile, splits, &s_flag)) return;
  // Last CTA of this column tile: kv[:, tile] = sum of the tile's partials.
  for (int idx = tid; idx < tokens * (Cfg::NTILE / 4); idx += Cfg::THREADS) {
    const int t = idx >> 4, col = (idx & 15) * 4;
    if (col >= tile_cols) continue;
    const float* s0 = p.partials + int64_t(t) * W + n0 + col;
    float4 v = ldcg4(s0);
#pragma unroll 16  // as in finish_tokens: the splits' loads in flight together
    for (int s = 1; s < splits; ++s) add4(v, ldcg4(s0 + int64_t(s) * tokens * W));
    *reinterpret_cast<float4*>(p.kv + int64_t(t) * W + n0 + col) = v;
  }
  if (!arrive_last(p.counters, gridDim.x, &s_flag)) return;
  finish_tokens<T>(p, p.kv, 1, 0, 0, tokens, smem);
}

// The epilogue alone over kv [T, W] fp32 (the cuBLAS path): grid ceil(T / FIN_TOKENS),
// MlaProjectConfig::THREADS threads, FIN_TOKENS * W * 4 bytes of dynamic smem.
template <typename T>
__global__ void __launch_bounds__(MlaProjectConfig::THREADS) mla_project_finish_kernel(const MlaProjectParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int t0 = blockIdx.x * MlaProjectConfig::FIN_TOKENS;
  mla_project_detail::finish_tokens<T>(p, p.kv, 1, 0, t0, min(t0 + MlaProjectConfig::FIN_TOKENS, p.tokens), smem);
}

}  // namespace kvcore
