// Paged GQA decode (flash-decoding with the merge fused into the last CTA).
//
// One CTA per (KV split, KV head, sequence) computes all query heads of the KV group, so each
// cached K/V byte is read from memory once. K/V tiles stream through a STAGES-deep shared-memory
// ring filled by 16-byte cp.async; page numbers for a tile are fetched one tile ahead, so the
// dependent block_table read never stalls the copy issue. Scores are computed on CUDA cores:
// decode does ~2 * group FLOPs per cached byte, far under the FP32 rate at group <= 16, so the
// kernel is bound by bytes in flight, not arithmetic.
//
// Thread layout (128 threads = 4 warps): a K/V row of D elements is read by TD = D/8 lanes, 16
// bytes each; a warp covers TPW = 32/TD rows per step. The warps form WH head groups x WT token
// groups (WH * WT = 4): each warp owns HPW query heads (q and the output accumulators live in its
// registers) and every (WT) warp-row walks its share of each tile. Per-lane online-softmax states
// are merged across lanes (shuffles) and warps (shared memory) at the end.
//
// When the KV range is split (num_splits > 1), each CTA writes a normalised partial output and
// its log2-sum-exp into the workspace, bumps a per-(sequence, KV head) counter, and the CTA that
// arrives last merges all partials and resets the counter, so no second launch is needed and the
// workspace is ready for the next call.
#pragma once

#include <math.h>
#include <stdint.h>

#include "kvcore/device_utils.cuh"

namespace kvcore {

struct GqaDecodeParams {
  const void* q;        // [B, Hq, D], last dim contiguous
  int64_t q_stride_b, q_stride_h;
  const void* k_cache;  // [pages, page_size, Hkv, D], inner three dims dense
  const void* v_cache;
  int64_t k_page_stride, v_page_stride;  // elements between pages
  const int* block_table;  // [B, max_pages]
  const int* seq_lens;     // [B]
  void* out;               // [B, Hq, D] contiguous
  float* lse;              // [B, Hq] or nullptr (natural log)
  // split-KV scratch (only read when num_splits > 1)
  float* partial_out;      // [B, Hkv, num_splits, group, D]
  float* partial_lse;      // [B, Hkv, num_splits, group], log2 domain
  unsigned* counters;      // [B, Hkv], zero between launches
  int num_kv_heads, group, page_size, num_pages, max_pages;
  int num_splits, split_tokens;  // split_tokens: KV positions per split, a multiple of the tile
  int window_left;               // < 0: none
  float q_scale;                 // multiplies q: scale * log2(e), or scale when soft-capping
  float soft_cap;                // > 0: logits = cap * tanh(scale q.k / cap)
};

template <int D_, int HPW_, int WH_>
struct GqaDecodeConfig {
  static constexpr int D = D_;
  static constexpr int HPW = HPW_;                  // query heads per warp
  static constexpr int WH = WH_;                    // warp head groups
  static constexpr int WARPS = 4;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int WT = WARPS / WH;             // warp token groups
  static constexpr int TD = D / 8;                  // lanes per K/V row
  static constexpr int TPW = 32 / TD;               // rows per warp step
  static constexpr int TILE = 4096 / D;             // rows per stage: 8 KiB of K + 8 KiB of V (16-bit)
  static constexpr int STAGES = 4;
  static constexpr int ROWS_PER_WARP = TILE / WT;   // rows of a tile one warp walks
  static constexpr int STEPS = ROWS_PER_WARP / TPW;
  static constexpr int SUB = STEPS < 4 ? STEPS : 4; // steps scored before each softmax update
  static constexpr int LOADS = TILE * TD / THREADS; // 16-byte copies per thread per tensor per tile
  static constexpr int MAX_HEADS = HPW * WH;
  static constexpr size_t SMEM_TILES = size_t(STAGES) * TILE * D * 2 * 2;
  static constexpr size_t SMEM_MERGE = size_t(WT) * MAX_HEADS * (D + 2) * sizeof(float);
  static constexpr size_t SMEM_BYTES = SMEM_TILES > SMEM_MERGE ? SMEM_TILES : SMEM_MERGE;

  static_assert(TD >= 1 && TD <= 32 && 32 % TD == 0, "head_dim must be 8..256, a power of two");
  static_assert(STEPS >= 1 && STEPS % SUB == 0, "tile must cover whole warp steps");
  static_assert(LOADS >= 1 && (TILE * TD) % THREADS == 0, "tile copies must divide evenly");
  static_assert(WH * WT == WARPS, "warps split into head and token groups");
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS) gqa_decode_kernel(const GqaDecodeParams p) {
  constexpr int D = Cfg::D, HPW = Cfg::HPW, WH = Cfg::WH, TD = Cfg::TD, TPW = Cfg::TPW, TILE = Cfg::TILE;
  constexpr int STAGES = Cfg::STAGES, STEPS = Cfg::STEPS, SUB = Cfg::SUB, LOADS = Cfg::LOADS, WT = Cfg::WT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sK = reinterpret_cast<T*>(smem_raw);
  T* const sV = sK + STAGES * TILE * D;

  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wh = warp % WH, wt = warp / WH;
  const int dl = lane % TD, tl = lane / TD;

  // ---- this CTA's KV range -------------------------------------------------------------------
  // Clamp everything read from memory, so bad contents can give wrong numbers but never an
  // out-of-bounds access (the Python wrapper validates them when validation is on).
  const int capacity = p.max_pages * p.page_size;
  const int seq_len = min(max(p.seq_lens[b], 0), capacity);
  const int lo = p.window_left >= 0 ? max(0, seq_len - 1 - p.window_left) : 0;
  const int start = lo + split * p.split_tokens;
  const int end = min(seq_len, start + p.split_tokens);
  const int num_tiles = start < end ? (end - start + TILE - 1) / TILE : 0;

  const int* bt = p.block_table + int64_t(b) * p.max_pages;
  const T* const kbase = static_cast<const T*>(p.k_cache) + int64_t(kvh) * D;
  const T* const vbase = static_cast<const T*>(p.v_cache) + int64_t(kvh) * D;
  const int64_t row_stride = int64_t(p.num_kv_heads) * D;

  // Page of each row this thread copies, for the tile `t` (fetched a tile ahead of its copy).
  auto fetch_pages = [&](int t, int (&pg)[LOADS]) {
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int pos = min(start + t * TILE + (tid + i * Cfg::THREADS) / TD, end - 1);
      pg[i] = (t < num_tiles) ? __ldg(bt + pos / p.page_size) : 0;
    }
  };
  auto issue_copies = [&](int t, const int (&pg)[LOADS]) {
    const int stage = t % STAGES;
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int c = tid + i * Cfg::THREADS;
      const int row = c / TD, col = (c % TD) * 8;
      const int pos = start + t * TILE + row;
      const bool valid = pos < end;
      const int page = min(max(pg[i], 0), p.num_pages - 1);
      const int64_t off = int64_t(min(pos, end - 1) % p.page_size) * row_stride + col;
      const int smem_off = (stage * TILE + row) * D + col;
      cp_async_16(sK + smem_off, kbase + int64_t(page) * p.k_page_stride + off, valid);
      cp_async_16(sV + smem_off, vbase + int64_t(page) * p.v_page_stride + off, valid);
    }
  };

  // ---- queries of this warp's heads, pre-scaled ------------------------------------------------
  float qf[HPW][8];
#pragma unroll
  for (int h = 0; h < HPW; ++h) {
    const int head = wh * HPW + h;
    if (head < p.group) {
      const T* qp = static_cast<const T*>(p.q) + int64_t(b) * p.q_stride_b +
                    int64_t(kvh * p.group + head) * p.q_stride_h + dl * 8;
      unpack8(*reinterpret_cast<const uint4*>(qp), qf[h], T{});
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qf[h][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) qf[h][i] *= p.q_scale;
  }

  float m[HPW], l[HPW], o[HPW][8];
#pragma unroll
  for (int h = 0; h < HPW; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) o[h][i] = 0.f;
  }

  // ---- pipeline: STAGES-1 tiles in flight ahead of the one being computed --------------------
  int pages[LOADS];
  fetch_pages(0, pages);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_tiles) issue_copies(s, pages);
    cp_async_commit();
    fetch_pages(s + 1, pages);
  }

  for (int t = 0; t < num_tiles; ++t) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile t landed for every thread; stage (t-1) % STAGES is free again
    if (t + STAGES - 1 < num_tiles) issue_copies(t + STAGES - 1, pages);
    cp_async_commit();
    fetch_pages(t + STAGES, pages);

    const T* kt = sK + (t % STAGES) * TILE * D;
    const T* vt = sV + (t % STAGES) * TILE * D;
    const int tile_pos = start + t * TILE;
#pragma unroll
    for (int s0 = 0; s0 < STEPS; s0 += SUB) {
      float sc[SUB][HPW];
#pragma unroll
      for (int j = 0; j < SUB; ++j) {
        const int row = wt * Cfg::ROWS_PER_WARP + (s0 + j) * TPW + tl;
        float kf[8];
        unpack8(*reinterpret_cast<const uint4*>(kt + row * D + dl * 8), kf, T{});
        const bool valid = tile_pos + row < end;
#pragma unroll
        for (int h = 0; h < HPW; ++h) {
          float acc = 0.f;
#pragma unroll
          for (int i = 0; i < 8; ++i) acc = fmaf(qf[h][i], kf[i], acc);
          acc = group_sum<TD>(acc);
          if (p.soft_cap > 0.f) acc = p.soft_cap * tanhf(acc / p.soft_cap) * kLog2e;
          sc[j][h] = valid ? acc : -INFINITY;
        }
      }
      // online softmax update over the SUB rows just scored
      float scale_o[HPW];
#pragma unroll
      for (int h = 0; h < HPW; ++h) {
        float mx = m[h];
#pragma unroll
        for (int j = 0; j < SUB; ++j) mx = fmaxf(mx, sc[j][h]);
        const float base = mx == -INFINITY ? 0.f : mx;  // all masked so far: keep exp2 finite
        scale_o[h] = exp2f(m[h] - base);
        m[h] = mx;
        l[h] *= scale_o[h];
#pragma unroll
        for (int j = 0; j < SUB; ++j) {
          sc[j][h] = exp2f(sc[j][h] - base);
          l[h] += sc[j][h];
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) o[h][i] *= scale_o[h];
      }
#pragma unroll
      for (int j = 0; j < SUB; ++j) {
        const int row = wt * Cfg::ROWS_PER_WARP + (s0 + j) * TPW + tl;
        float vf[8];
        unpack8(*reinterpret_cast<const uint4*>(vt + row * D + dl * 8), vf, T{});
#pragma unroll
        for (int h = 0; h < HPW; ++h)
#pragma unroll
          for (int i = 0; i < 8; ++i) o[h][i] = fmaf(sc[j][h], vf[i], o[h][i]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the tile ring is reused below as merge scratch

  // ---- merge the per-lane states of the TPW rows a warp step covers ----------------------------
#pragma unroll
  for (int off = TD; off < 32; off <<= 1) {
#pragma unroll
    for (int h = 0; h < HPW; ++h) {
      const float m_o = __shfl_xor_sync(0xffffffffu, m[h], off);
      const float l_o = __shfl_xor_sync(0xffffffffu, l[h], off);
      const float mx = fmaxf(m[h], m_o);
      const float base = mx == -INFINITY ? 0.f : mx;
      const float a = exp2f(m[h] - base), c = exp2f(m_o - base);
      l[h] = l[h] * a + l_o * c;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[h][i] = o[h][i] * a + __shfl_xor_sync(0xffffffffu, o[h][i], off) * c;
      m[h] = mx;
    }
  }

  // ---- merge across the WT token-group warps through shared memory -----------------------------
  float* const sm_o = reinterpret_cast<float*>(smem_raw);         // [WT][MAX_HEADS][D]
  float* const sm_ml = sm_o + WT * Cfg::MAX_HEADS * D;             // [WT][MAX_HEADS][2]
  if (WT > 1) {
    if (tl == 0) {
#pragma unroll
      for (int h = 0; h < HPW; ++h) {
        const int head = wh * HPW + h;
        float* dst = sm_o + (wt * Cfg::MAX_HEADS + head) * D + dl * 8;
#pragma unroll
        for (int i = 0; i < 8; ++i) dst[i] = o[h][i];
        if (dl == 0) {
          sm_ml[(wt * Cfg::MAX_HEADS + head) * 2] = m[h];
          sm_ml[(wt * Cfg::MAX_HEADS + head) * 2 + 1] = l[h];
        }
      }
    }
    __syncthreads();
    if (wt == 0 && tl == 0) {
#pragma unroll
      for (int h = 0; h < HPW; ++h) {
        const int head = wh * HPW + h;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < WT; ++w) mx = fmaxf(mx, sm_ml[(w * Cfg::MAX_HEADS + head) * 2]);
        const float base = mx == -INFINITY ? 0.f : mx;
        float lsum = 0.f, acc[8] = {};
#pragma unroll
        for (int w = 0; w < WT; ++w) {
          const float c = exp2f(sm_ml[(w * Cfg::MAX_HEADS + head) * 2] - base);
          lsum += sm_ml[(w * Cfg::MAX_HEADS + head) * 2 + 1] * c;
          const float* src = sm_o + (w * Cfg::MAX_HEADS + head) * D + dl * 8;
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i] += src[i] * c;
        }
        m[h] = mx;
        l[h] = lsum;
#pragma unroll
        for (int i = 0; i < 8; ++i) o[h][i] = acc[i];
      }
    }
  }

  // ---- write: final output, or a partial for the split merge ----------------------------------
  const bool writer = (wt == 0 && tl == 0);
  if (p.num_splits == 1) {
    if (writer) {
#pragma unroll
      for (int h = 0; h < HPW; ++h) {
        const int head = wh * HPW + h;
        if (head >= p.group) continue;
        const int64_t qh = int64_t(b) * p.num_kv_heads * p.group + int64_t(kvh) * p.group + head;
        const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
        float r[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) r[i] = o[h][i] * inv;
        *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + qh * D + dl * 8) = pack8<T>(r);
        if (p.lse != nullptr && dl == 0) p.lse[qh] = l[h] > 0.f ? (m[h] + log2f(l[h])) * kLn2 : -INFINITY;
      }
    }
    return;
  }

  const int64_t pair = int64_t(b) * p.num_kv_heads + kvh;
  if (writer) {
#pragma unroll
    for (int h = 0; h < HPW; ++h) {
      const int head = wh * HPW + h;
      if (head >= p.group) continue;
      const int64_t slot = (pair * p.num_splits + split) * p.group + head;
      const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
      float4* dst = reinterpret_cast<float4*>(p.partial_out + slot * D + dl * 8);
      dst[0] = make_float4(o[h][0] * inv, o[h][1] * inv, o[h][2] * inv, o[h][3] * inv);
      dst[1] = make_float4(o[h][4] * inv, o[h][5] * inv, o[h][6] * inv, o[h][7] * inv);
      if (dl == 0) p.partial_lse[slot] = l[h] > 0.f ? m[h] + log2f(l[h]) : -INFINITY;
    }
  }
  // Publish the partial, then count arrivals; the last CTA of this (sequence, KV head) merges.
  __threadfence();
  __syncthreads();
  __shared__ bool is_last;
  if (tid == 0) is_last = atomicAdd(p.counters + pair, 1u) == unsigned(p.num_splits - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  // Weights of each split's partial, per head, through shared memory (the tile ring is free).
  float* const w = reinterpret_cast<float*>(smem_raw);  // [group][num_splits + 1]: weights, then sum
  const int ns = p.num_splits;
  const float* plse = p.partial_lse + pair * ns * p.group;
  for (int h = warp; h < p.group; h += Cfg::WARPS) {
    float mx = -INFINITY;
    for (int s = lane; s < ns; s += 32) mx = fmaxf(mx, __ldcg(plse + s * p.group + h));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float base = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f;
    for (int s = lane; s < ns; s += 32) {
      const float e = exp2f(__ldcg(plse + s * p.group + h) - base);
      w[h * (ns + 1) + s] = e;
      sum += e;
    }
    sum = group_sum<32>(sum);
    if (lane == 0) {
      w[h * (ns + 1) + ns] = sum;
      if (p.lse != nullptr) p.lse[pair * p.group + h] = sum > 0.f ? (base + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
  __syncthreads();
  // Each thread combines 4 output elements of one head across all splits.
  const float* pout = p.partial_out + pair * ns * p.group * D;
  for (int item = tid; item < p.group * (D / 4); item += Cfg::THREADS) {
    const int h = item / (D / 4), c = (item % (D / 4)) * 4;
    const float* wh_ = w + h * (ns + 1);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int s = 0; s < ns; ++s) {
      const float ws = wh_[s];
      const float4 v = __ldcg(reinterpret_cast<const float4*>(pout + (int64_t(s) * p.group + h) * D + c));
      acc.x = fmaf(ws, v.x, acc.x);
      acc.y = fmaf(ws, v.y, acc.y);
      acc.z = fmaf(ws, v.z, acc.z);
      acc.w = fmaf(ws, v.w, acc.w);
    }
    const float inv = wh_[ns] > 0.f ? 1.f / wh_[ns] : 0.f;
    T* dst = static_cast<T*>(p.out) + (pair * p.group + h) * D + c;
    const uint32_t lo2 = pack2(acc.x * inv, acc.y * inv, T{}), hi2 = pack2(acc.z * inv, acc.w * inv, T{});
    *reinterpret_cast<uint2*>(dst) = make_uint2(lo2, hi2);
  }
  if (tid == 0) p.counters[pair] = 0u;  // ready for the next launch
}

}  // namespace kvcore
