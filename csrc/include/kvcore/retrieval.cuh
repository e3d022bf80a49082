// InfLLM retrieval kernels (framework-free: raw pointers, no torch headers).
//
// infllm_unit_scores_kernel: s[b, h, u] = qg[b, h] . repr_keys[b, u, h], qg = the sum of KV head
//   h's query heads. Memory-bound (each representative key is read once, by one lane group, with
//   the whole group's query folded into qg in shared memory), so the layout is built for bytes in
//   flight: a unit's Hkv * D keys are contiguous, one aligned group of LPU lanes (a warp, or less
//   for small units) streams them in 16-byte vectors, four vectors per lane before any math.
//
// topk_rows_kernel: one CTA per row; radix select over 64-bit keys (kvcore/topk_key.h: score
//   order in the high half, inverted column in the low half, so every key is unique and "top k"
//   has no ties), 8 bits per pass from the top, stopping as soon as the bin holding the k-th key
//   holds exactly the keys still needed. Then every key >= the threshold is gathered (exactly
//   min(k, U) of them) and ranked by counting larger keys (k <= 256, so O(k^2) is nothing).
//   The first kTopkRegKeys * kTopkThreads columns of a row are read once into registers; only
//   columns past that are read again by each pass (from L2). For k <= 32 over a row held in
//   registers a bound comes first (the k-th largest warp maximum): when at most kTopkMaxK keys
//   reach it, those are ranked directly and no pass runs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "kvcore/device_utils.cuh"
#include "kvcore/topk_key.h"

namespace kvcore {

struct UnitScoresParams {
  const void* q;        // [B, Hq, D] with element strides q_sb, q_sh (last dim contiguous)
  int64_t q_sb, q_sh;
  const void* keys;     // [B, U, Hkv, D], batch stride k_sb elements, the rest dense
  int64_t k_sb;
  float* out;           // [B, U] or [B, Hkv, U]
  int64_t units;
  int64_t units_per_cta;  // a multiple of the units one CTA pass covers
  int hkv, head_dim, group;
  int vec_per_head;     // head_dim / 8, a power of two <= 32
  int lanes_per_unit;   // LPU: 32, or a power of two >= Hkv * vec_per_head when that is < 32
  int per_kv_head;
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

// Segmented sum over aligned groups of `width` lanes (a power of two <= 32, runtime); every lane
// of the warp must call it (the shuffles use the full mask).
__device__ __forceinline__ float segment_sum(float x, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Grid (ctas per batch row, B); dynamic shared memory: Hkv * D floats.
template <typename T, typename TQ>
__global__ void __launch_bounds__(256) infllm_unit_scores_kernel(UnitScoresParams p) {
  extern __shared__ float qg[];
  // A top-k launched behind this grid (programmatic dependent launch) may start now; it waits
  // for this grid to finish before reading the scores.
  grid_launch_dependents();
  const int64_t b = blockIdx.y;
  const int d = p.head_dim, hkv = p.hkv, g = p.group;
  const int qg_len = hkv * d;
  const int nvec = hkv * p.vec_per_head;  // 16-byte vectors per unit
  const int64_t u_begin = int64_t(blockIdx.x) * p.units_per_cta;
  int64_t u_end = u_begin + p.units_per_cta;
  if (u_end > p.units) u_end = p.units;
  const T* keys = static_cast<const T*>(p.keys) + b * p.k_sb;
  // The keys do not depend on q: start their DRAM reads (up to 64 KB, B1's whole range at 1M
  // tokens) before the q fold's round trip instead of after it.
  if (threadIdx.x == 0 && u_end > u_begin) {
    const int64_t bytes = (u_end - u_begin) * int64_t(nvec) * 16;
    prefetch_l2_bulk(keys + u_begin * int64_t(nvec) * 8, uint32_t(bytes < 65536 ? bytes : 65536));
  }
  const TQ* q = static_cast<const TQ*>(p.q) + b * p.q_sb;
  for (int e = threadIdx.x; e < qg_len; e += blockDim.x) {
    const int h = e / d, x = e - h * d;
    float acc = 0.0f;
    for (int j = 0; j < g; ++j) acc += to_float<TQ>(q[int64_t(h * g + j) * p.q_sh + x]);
    qg[e] = acc;
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int lpu = p.lanes_per_unit, vph = p.vec_per_head;
  const int upw = 32 / lpu;             // units per warp per pass
  const int sub = lane & (lpu - 1);     // lane within the unit's lane group
  const int slot = lane / lpu;          // which of the warp's units

  // ubase is warp-uniform, so every lane runs the same iterations and the shuffles stay full-mask.
  for (int64_t ubase = u_begin + int64_t(warp) * upw; ubase < u_end; ubase += int64_t(nwarps) * upw) {
    const int64_t u = ubase + slot;
    const bool valid = u < u_end;
    const uint4* row = reinterpret_cast<const uint4*>(keys + (valid ? u : u_begin) * int64_t(nvec) * 8);
    float total = 0.0f;
    for (int v0 = 0; v0 < nvec; v0 += 4 * lpu) {
      uint4 raw[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int v = v0 + j * lpu + sub;
        raw[j] = (valid && v < nvec) ? __ldg(row + v) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int v = v0 + j * lpu + sub;
        const bool live = valid && v < nvec;
        float part = 0.0f;
        if (live) {
          float f[8];
          unpack8(raw[j], f, T{});
          const float* qv = qg + v * 8;
#pragma unroll
          for (int i = 0; i < 8; ++i) part = fmaf(f[i], qv[i], part);
        }
        if (p.per_kv_head) {
          // v0 + j * lpu is a multiple of lpu, hence of vph: each aligned vph-lane segment is
          // exactly one head's D elements.
          if (v0 + j * lpu < nvec) {  // warp-uniform: skip shuffles for blocks wholly past the unit
            part = segment_sum(part, vph);
            if (live && (sub & (vph - 1)) == 0) {
              const int h = v / vph;
              p.out[(b * hkv + h) * p.units + u] = part;
            }
          }
        } else {
          total += part;
        }
      }
    }
    if (!p.per_kv_head) {
      total = segment_sum(total, lpu);
      if (valid && sub == 0) p.out[b * p.units + u] = total;
    }
  }
}

// Flat form, for units of nvec = 2^n >= 32 vectors (every power-of-two Hkv x D of at least 256
// elements, the InfLLM shapes among them): a CTA's units are one contiguous run of vectors, which
// consecutive threads read in chunks of kScoreFlatLoads vectors each, a whole chunk in flight
// before any math, and the CTA's first chunk before the q fold (the keys do not depend on q). A
// warp's 32 vectors lie in one unit (one KV head's vph vectors in one aligned lane segment), so a
// warp sum is one unit's partial; the partials of a chunk's units are added in a fixed order
// (deterministic). The general kernel above keeps one unit (2 KB at Hkv 8 x D 128) per warp in
// flight and folds q first. Session 13, B1's 16.8 MB of keys on an H200: 11.1 us of device time
// there, 10.3-10.5 here, the time torch.sum takes to read the same bytes (a small read's fixed
// cost dominates at this size).
constexpr int kScoreFlatLoads = 8;
constexpr int kScoreFlatChunk = kScoreFlatLoads * 256;  // vectors per chunk (256 threads)

template <typename T, typename TQ>
__global__ void __launch_bounds__(256) infllm_unit_scores_flat_kernel(UnitScoresParams p) {
  extern __shared__ float qg[];
  // A top-k launched behind this grid (programmatic dependent launch) may start now; it waits
  // for this grid to finish before reading the scores.
  grid_launch_dependents();
  __shared__ float partial[kScoreFlatChunk / 32];  // one per warp slice of a chunk
  const int64_t b = blockIdx.y;
  const int d = p.head_dim, hkv = p.hkv, g = p.group;
  const int qg_len = hkv * d;
  const int vph = p.vec_per_head;
  const int nvec = hkv * vph;  // a power of two, 32 .. kScoreFlatChunk (the launcher checks)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t u_begin = int64_t(blockIdx.x) * p.units_per_cta;
  const int64_t u_end = min(u_begin + p.units_per_cta, p.units);
  const uint4* vecs = reinterpret_cast<const uint4*>(static_cast<const T*>(p.keys) + b * p.k_sb) + u_begin * nvec;
  const int64_t total = (u_end - u_begin) * nvec;  // this CTA's vectors: a multiple of 32

  uint4 raw[kScoreFlatLoads];
  auto load_chunk = [&](int64_t base) {
#pragma unroll
    for (int j = 0; j < kScoreFlatLoads; ++j) {
      const int64_t v = base + j * 256 + tid;
      raw[j] = v < total ? __ldg(vecs + v) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  load_chunk(0);
  if (tid == 0 && total > kScoreFlatChunk) {  // later chunks: start their DRAM reads now too
    const int64_t bytes = (total - kScoreFlatChunk) * 16;
    prefetch_l2_bulk(vecs + kScoreFlatChunk, uint32_t(bytes < 65536 ? bytes : 65536));
  }

  // qg = the sum of each KV head's query heads, 4 elements per thread in flight at once.
  const TQ* q = static_cast<const TQ*>(p.q) + b * p.q_sb;
  for (int e0 = 0; e0 < qg_len; e0 += 4 * 256) {
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int j = 0; j < g; ++j) {
      float x[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int e = min(e0 + r * 256 + tid, qg_len - 1);
        const int h = e / d;
        x[r] = to_float<TQ>(q[int64_t(h * g + j) * p.q_sh + (e - h * d)]);
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[r] += x[r];
    }
#pragma unroll
    for (int r = 0; r < 4; ++r)
      if (e0 + r * 256 + tid < qg_len) qg[e0 + r * 256 + tid] = acc[r];
  }
  __syncthreads();

  for (int64_t base = 0; base < total; base += kScoreFlatChunk) {
    if (base > 0) load_chunk(base);
    float sums[kScoreFlatLoads];
#pragma unroll
    for (int j = 0; j < kScoreFlatLoads; ++j) {
      const int64_t v = base + j * 256 + tid;
      float part = 0.0f;
      if (v < total) {
        float f[8];
        unpack8(raw[j], f, T{});
        const float* qv = qg + int(v & (nvec - 1)) * 8;
#pragma unroll
        for (int i = 0; i < 8; ++i) part = fmaf(f[i], qv[i], part);
      }
      sums[j] = part;
    }
    if (p.per_kv_head) {
#pragma unroll
      for (int j = 0; j < kScoreFlatLoads; ++j) {
        const int64_t v = base + j * 256 + tid;  // v < total is warp-uniform: full-mask shuffles
        const float x = segment_sum(sums[j], vph);
        if (v < total && (lane & (vph - 1)) == 0) {
          const int64_t u = u_begin + v / nvec;
          const int h = int(v & (nvec - 1)) / vph;
          p.out[(b * hkv + h) * p.units + u] = x;
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kScoreFlatLoads; ++j) {
        const float x = segment_sum(sums[j], 32);
        if (lane == 0) partial[j * 8 + warp] = x;  // slice j * 8 + warp = vectors (j * 8 + warp) * 32 ..
      }
      __syncthreads();
      // A chunk holds whole units (nvec divides the chunk); unit c's slices: c * wpu .. + wpu - 1.
      const int wpu = nvec / 32;
      const int64_t left = total - base;
      const int units_here = int((left < kScoreFlatChunk ? left : kScoreFlatChunk) / nvec);
      for (int c = tid; c < units_here; c += 256) {
        float x = 0.0f;
        for (int w = 0; w < wpu; ++w) x += partial[c * wpu + w];
        p.out[b * p.units + u_begin + base / nvec + c] = x;
      }
      __syncthreads();  // partial is rewritten by the next chunk
    }
  }
}

struct TopkRowsParams {
  const float* scores;  // [rows, cols], row stride row_stride, columns contiguous
  int64_t row_stride;
  int64_t rows, cols;
  int k;                // 1..kTopkMaxK
  float* values;        // [rows, k]
  void* indices;        // [rows, k] int32 / int64
};

constexpr int kTopkThreads = 1024;
// Keys per thread held in registers: rows of up to 8192 columns (InfLLM's 1M-token memory in units
// of 128) are read from memory once.
constexpr int kTopkRegKeys = 8;

// Grid (rows); block kTopkThreads.
template <typename IndexT>
__global__ void __launch_bounds__(kTopkThreads, 1) topk_rows_kernel(TopkRowsParams p) {
  __shared__ uint32_t hist[256];
  __shared__ uint64_t s_keys[kTopkMaxK];
  __shared__ uint64_t s_prefix;
  __shared__ uint32_t s_remaining;
  __shared__ int s_done;
  __shared__ int s_count;
  __shared__ uint64_t s_warp_max[kTopkThreads / 32];
  __shared__ uint64_t s_bound;

  // Launched programmatically behind the kernel that wrote the scores (infllm_unit_scores): every
  // thread waits for that grid before reading them, so this grid also completes after it and work
  // queued later on the stream is ordered after both. Without the launch attribute: a no-op.
  grid_dependency_wait();
  const int64_t row = blockIdx.x;
  const float* src = p.scores + row * p.row_stride;
  const int64_t n = p.cols;
  const int k = p.k;
  const int kk = int(n < int64_t(k) ? n : int64_t(k));  // keys to choose
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // Column tid + j * kTopkThreads of the row; 0 marks a column past the row (a real key's low
  // half, the inverted column of a column < 2^31, is never 0).
  // All loads first, from clamped columns (no branch between them), so they are in flight together.
  uint64_t held[kTopkRegKeys];
  float raw[kTopkRegKeys];
  if (n > 0) {
#pragma unroll
    for (int j = 0; j < kTopkRegKeys; ++j) {
      const int64_t i = tid + int64_t(j) * kTopkThreads;
      raw[j] = __ldg(src + (i < n ? i : n - 1));
    }
  }
#pragma unroll
  for (int j = 0; j < kTopkRegKeys; ++j) {
    const int64_t i = tid + int64_t(j) * kTopkThreads;
    held[j] = i < n ? topk_key(raw[j], uint32_t(i)) : 0ull;
  }
  const int64_t held_end = int64_t(kTopkRegKeys) * kTopkThreads;  // columns from here: read per pass

  // Threshold: the k-th largest key, or a prefix of it below which no chosen key lies.
  uint64_t prefix = 0, mask = 0;

  // Fast bound (k <= 32, the whole row in registers): the 32 warps' maxima are distinct keys, so
  // the k-th largest of them is <= the row's k-th largest key, and every chosen key is >= it.
  // When at most kTopkMaxK keys reach it, they are ranked directly and no radix pass runs (InfLLM's
  // scores: a few dozen); otherwise (e.g. ascending scores, whose warp maxima all lie in the
  // row's last columns) the passes below do. Session 13 timed the passes alone at 6.7 us of
  // device time for one row of 8192 (two or three passes, each a chain of barriers and shared
  // atomics).
  static_assert(kTopkThreads / 32 == 32, "the fast bound ranks one warp maximum per lane");
  bool fast = false;
  if (int64_t(kk) < n && kk <= 32 && n <= held_end) {
    if (tid == 0) {
      s_bound = 0ull;  // (stays so if absent warps' zero maxima tie at the k-th place: every key)
      s_count = 0;
    }
    uint64_t m = 0ull;
#pragma unroll
    for (int j = 0; j < kTopkRegKeys; ++j) m = held[j] > m ? held[j] : m;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const uint64_t o = __shfl_xor_sync(0xffffffffu, m, off);
      m = o > m ? o : m;
    }
    if (lane == 0) s_warp_max[warp] = m;
    __syncthreads();
    if (warp == 0) {
      const uint64_t mine = s_warp_max[lane];
      int above = 0;
#pragma unroll 8
      for (int w = 0; w < 32; ++w) above += s_warp_max[w] > mine ? 1 : 0;
      if (above == kk - 1) s_bound = mine;
    }
    __syncthreads();
    const uint64_t bound = s_bound;
    int mine = 0;
#pragma unroll
    for (int j = 0; j < kTopkRegKeys; ++j) mine += (held[j] != 0ull && held[j] >= bound) ? 1 : 0;
    mine = __reduce_add_sync(0xffffffffu, mine);
    if (lane == 0 && mine > 0) atomicAdd(&s_count, mine);
    __syncthreads();
    fast = s_count <= int(kTopkMaxK);  // block-uniform
    if (fast) prefix = bound;
  }
  if (int64_t(kk) < n && !fast) {
    uint32_t remaining = uint32_t(kk);  // chosen keys still to place among those matching prefix
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kTopkThreads) hist[i] = 0u;
      __syncthreads();
      // Every lane of the warp calls it (uniform loops below): the match uses the full mask.
      auto tally = [&](uint64_t key) {
        int digit = -1;
        if (key != 0ull && (key & mask) == prefix) digit = int((key >> shift) & 255u);
        // After the first pass few keys still match the prefix: most warps have none to count.
        if (!__any_sync(0xffffffffu, digit >= 0)) return;
        // Lanes with the same digit add once (the first passes see few distinct digits, and
        // per-lane shared atomics on one address would serialise).
        const unsigned peers = __match_any_sync(0xffffffffu, digit);
        if (digit >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], uint32_t(__popc(peers)));
      };
#pragma unroll
      for (int j = 0; j < kTopkRegKeys; ++j) tally(held[j]);
      for (int64_t base = held_end; base < n; base += kTopkThreads) {
        const int64_t i = base + tid;
        tally(i < n ? topk_key(__ldg(src + i), uint32_t(i)) : 0ull);
      }
      __syncthreads();
      if (warp == 0) {
        // Lane l owns digits 255 - 8l .. 248 - 8l (descending), so an inclusive scan over lanes
        // counts the keys in higher bins.
        uint32_t c[8];
        uint32_t sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          c[j] = hist[255 - 8 * lane - j];
          sum += c[j];
        }
        uint32_t incl = sum;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const uint32_t t = __shfl_up_sync(0xffffffffu, incl, off);
          if (lane >= off) incl += t;
        }
        const uint32_t excl = incl - sum;
        if (excl < remaining && remaining <= incl) {  // exactly one lane
          uint32_t acc = excl;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (acc + c[j] >= remaining) {
              const uint32_t need = remaining - acc;
              s_prefix = prefix | (uint64_t(255 - 8 * lane - j) << shift);
              s_remaining = need;
              s_done = (c[j] == need) ? 1 : 0;
              break;
            }
            acc += c[j];
          }
        }
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      mask |= uint64_t(255) << shift;
      const bool done = s_done != 0;
      // The next pass writes hist and s_* only after its first __syncthreads, which every
      // thread reaches after these reads.
      if (done) break;  // block-uniform
    }
  }

  // Every key >= prefix is a candidate: after the passes exactly the chosen ones (the keys of
  // higher bins in some pass plus the whole bin the search stopped in; prefix has zeros below
  // its bits, so key >= prefix <=> its top bits >= prefix's); after the fast bound, at most
  // kTopkMaxK keys of which the kk largest are chosen.
  __syncthreads();  // every thread has read s_count (the fast bound's test) before the reset
  if (tid == 0) s_count = 0;
  __syncthreads();
  auto gather = [&](uint64_t key) {
    if (key != 0ull && key >= prefix) {
      const int pos = atomicAdd(&s_count, 1);
      if (pos < kTopkMaxK) s_keys[pos] = key;
    }
  };
#pragma unroll
  for (int j = 0; j < kTopkRegKeys; ++j) gather(held[j]);
  for (int64_t i = held_end + tid; i < n; i += kTopkThreads) gather(topk_key(__ldg(src + i), uint32_t(i)));
  __syncthreads();
  // Candidates ranked by counting larger ones (keys are unique); ranks below kk are written. The
  // passes leave exactly kk candidates; the min keeps the reads in s_keys.
  const int cnt = s_count < int(kTopkMaxK) ? s_count : int(kTopkMaxK);
  IndexT* indices = static_cast<IndexT*>(p.indices) + row * k;
  float* values = p.values + row * k;
  for (int j = tid; j < cnt; j += kTopkThreads) {
    const uint64_t key = s_keys[j];
    int rank = 0;
    for (int m = 0; m < cnt; ++m) rank += s_keys[m] > key ? 1 : 0;
    if (rank < kk) {
      const uint32_t col = topk_key_column(key);
      values[rank] = __ldg(src + col);
      indices[rank] = IndexT(col);
    }
  }
  for (int j = kk + tid; j < k; j += kTopkThreads) {  // rows shorter than k
    values[j] = -__int_as_float(0x7f800000);
    indices[j] = IndexT(-1);
  }
}

}  // namespace kvcore
