// In-place compaction of a paged KV cache after eviction (kvcore::compact_kv), on many CTAs per
// (sequence, KV head).
//
// Problem: for each (sequence b, KV head h), row i of that head takes the K/V of row kept[i]
// (kept strictly increasing, so kept[i] >= i). Destination i may be the source of a row j <= i
// (kept[j] = i needs j <= kept[j] = i), never of a row j > i. So, with the rows of a head cut
// into chunks of C rows processed as "read the whole chunk, then write it":
//   * a chunk's reads never need to wait: none of its sources is a destination of an earlier
//     row, and a destination of a later row is only written once that later chunk has waited;
//   * chunk c's writes must wait until every earlier chunk j < c whose source range overlaps
//     c's destination range [cC, cC + C) has finished reading (its own sources it holds already).
// Each CTA takes its chunk from an atomic ticket (chunk-major: chunk c of every pair is ticketed
// before chunk c + 1 of any), so the CTAs it waits for hold smaller tickets, are already running,
// and publish their "read done" flag before they wait on anything: no deadlock whatever the
// scheduler does. The overlapping earlier chunks form a contiguous range found by two warp-wide
// 32-ary searches over kept (source ranges of successive chunks are disjoint and increasing, so at
// most three chunks overlap one destination range).
//
// Rows whose source is themselves (kept[i] == i, common for sinks) are neither read nor written.
// seq_lens[b] = kept_lens[b] is written by the last CTA to finish, after every CTA has read the
// old value (each reads it through thread 0 before its release fence and arrival count).
//
// Safety without validation: seq_len is clamped to [0, capacity], kept_lens to
// [0, min(max_kept, seq_len)], every kept position to [0, seq_len) and page ids to
// [0, num_pages): bad contents give wrong data but never an out-of-bounds access, and a CTA only
// ever waits on smaller tickets, so bad contents cannot hang it either.
#pragma once

#include <stdint.h>

namespace kvcore {

struct CompactKvParams {
  char* k_cache;  // bytes
  char* v_cache;
  int64_t k_page_stride, v_page_stride;  // bytes between pages
  int64_t row_stride;                    // bytes between token rows of a page (Hkv * D * elem)
  int64_t head_bytes;                    // D * elem
  int units;                             // head_bytes / sizeof(Vec)
  const int* block_table;                // [B, max_pages]
  int* seq_lens;                         // [B], updated at the end
  const int64_t* kept;                   // [B, Hkv, max_kept]
  const int* kept_lens;                  // [B]
  int batch, num_kv_heads, page_size, num_pages, max_pages;
  int64_t max_kept;
  int64_t capacity;      // max_pages * page_size
  int chunk_rows;        // C <= THREADS
  int64_t chunks;        // chunks per (b, h)
  int64_t tickets;       // pairs * chunks
  unsigned* scratch;     // [2 + tickets] zeroed: ticket counter, arrivals, read-done flags
};

namespace compact_detail {

__device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }
__device__ __forceinline__ int64_t lclamp(int64_t x, int64_t lo, int64_t hi) { return lmin(lmax(x, lo), hi); }

constexpr int kThreads = 256;
constexpr int kBytesPerThread = 64;  // per tensor (K, V) held in registers per chunk

__device__ __forceinline__ void store_release(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Smallest j in [lo, hi) with pred(j) true for a pred that is monotone (false ... true), or hi if
// none; one warp, 32 probes per round (two rounds up to 1024 chunks). Every lane returns it.
template <typename Pred>
__device__ int warp_search(int64_t lo, int64_t hi, Pred pred) {
  const int lane = threadIdx.x & 31;
  while (lo < hi) {  // answer in [lo, hi]; hi is true or the end
    const int64_t step = (hi - lo + 31) / 32;
    const int64_t probe = lo + lane * step;
    const bool valid = probe < hi;
    const unsigned mask = __ballot_sync(0xffffffffu, valid && pred(probe));
    if (mask == 0u) {
      const int64_t last = lo + lmin(31, (hi - lo - 1) / step) * step;  // last valid probe
      lo = last + 1;
    } else {
      const int k = __ffs(mask) - 1;
      hi = lo + k * step;
      if (k > 0) lo = lo + (k - 1) * step + 1;
    }
  }
  return int(lo);
}

}  // namespace compact_detail

template <typename Vec>
__global__ void __launch_bounds__(compact_detail::kThreads) compact_kv_kernel(const CompactKvParams p) {
  using namespace compact_detail;
  constexpr int SLOTS = kBytesPerThread / int(sizeof(Vec));
  __shared__ int64_t s_src_k[kThreads], s_src_v[kThreads], s_dst_k[kThreads], s_dst_v[kThreads];
  __shared__ unsigned char s_move[kThreads];
  __shared__ int64_t s_info[4];  // ticket, seq_len, kept count, (unused)
  __shared__ int s_range[2];     // earlier chunks [j0, j1) to wait for

  const int tid = threadIdx.x;
  if (tid == 0) {
    const int64_t t = atomicAdd(p.scratch, 1u);
    int64_t len = 0, n = 0;
    if (t < p.tickets) {
      const int64_t pairs = int64_t(p.batch) * p.num_kv_heads;
      const int b = int((t % pairs) / p.num_kv_heads);
      len = lclamp(p.seq_lens[b], 0, p.capacity);
      n = lclamp(p.kept_lens[b], 0, lmin(p.max_kept, len));
    }
    s_info[0] = t;
    s_info[1] = len;
    s_info[2] = n;
  }
  __syncthreads();
  const int64_t t = s_info[0], len = s_info[1], n = s_info[2];
  const int64_t pairs = int64_t(p.batch) * p.num_kv_heads;
  const int64_t C = p.chunk_rows;
  const int64_t c = t / lmax(pairs, 1), pair = t % lmax(pairs, 1);
  const int64_t row0 = c * C;
  const bool live = t < p.tickets && row0 < n;  // CTA-uniform

  if (live) {
    const int b = int(pair / p.num_kv_heads), h = int(pair % p.num_kv_heads);
    const int64_t rows = lmin(C, n - row0);
    const int* bt = p.block_table + int64_t(b) * p.max_pages;
    const int64_t* kp = p.kept + pair * p.max_kept;
    auto src_of = [&](int64_t i) { return lclamp(__ldg(kp + i), 0, len - 1); };
    auto page_off = [&](int64_t pos, int64_t page_stride) {
      const int64_t page = lclamp(__ldg(bt + pos / p.page_size), 0, p.num_pages - 1);
      return page * page_stride + (pos % p.page_size) * p.row_stride + int64_t(h) * p.head_bytes;
    };

    // ---- stage this chunk's rows: byte offsets of source and destination, and whether it moves
    bool moves = false;
    if (tid < rows) {
      const int64_t i = row0 + tid, s = src_of(i);
      moves = s != i;
      s_move[tid] = moves;
      if (moves) {
        s_src_k[tid] = page_off(s, p.k_page_stride);
        s_src_v[tid] = page_off(s, p.v_page_stride);
        s_dst_k[tid] = page_off(i, p.k_page_stride);
        s_dst_v[tid] = page_off(i, p.v_page_stride);
      }
    }
    unsigned* const flags = p.scratch + 2 + pair * p.chunks;
    if (__syncthreads_or(moves)) {
      // ---- read the whole chunk into registers ------------------------------------------------
      Vec kr[SLOTS], vr[SLOTS];
#pragma unroll
      for (int k = 0; k < SLOTS; ++k) {
        const int e = tid + k * kThreads, r = e / p.units, u = e - r * p.units;
        if (r < rows && s_move[r]) {
          kr[k] = __ldcg(reinterpret_cast<const Vec*>(p.k_cache + s_src_k[r]) + u);
          vr[k] = __ldcg(reinterpret_cast<const Vec*>(p.v_cache + s_src_v[r]) + u);
        }
      }
      // ---- which earlier chunks may still have to read our destinations (while loads fly) ----
      // Chunk j < c overlaps [row0, row0 + C) iff last_src(j) >= row0 and first_src(j) < row0 + C;
      // both are monotone in j for valid input, so the overlapping j form [j0, j1).
      const int warp = tid >> 5;
      if (warp == 0) {
        const int j0 = compact_detail::warp_search(0, c, [&](int64_t j) { return src_of((j + 1) * C - 1) >= row0; });
        if ((tid & 31) == 0) s_range[0] = j0;
      } else if (warp == 1) {
        const int j1 = compact_detail::warp_search(0, c, [&](int64_t j) { return src_of(j * C) >= row0 + C; });
        if ((tid & 31) == 0) s_range[1] = j1;
      }
      // ---- publish "read done": every thread's loads are ordered before the flag ---------------
      __threadfence();
      __syncthreads();
      if (tid == 0) compact_detail::store_release(flags + c, 1u);
      // ---- wait for the overlapping earlier chunks, then write ------------------------------
      for (int64_t j = s_range[0] + tid; j < s_range[1]; j += kThreads) {
        while (compact_detail::load_acquire(flags + j) == 0u) __nanosleep(64);
        __threadfence();
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < SLOTS; ++k) {
        const int e = tid + k * kThreads, r = e / p.units, u = e - r * p.units;
        if (r < rows && s_move[r]) {
          reinterpret_cast<Vec*>(p.k_cache + s_dst_k[r])[u] = kr[k];
          reinterpret_cast<Vec*>(p.v_cache + s_dst_v[r])[u] = vr[k];
        }
      }
    } else if (tid == 0) {
      compact_detail::store_release(flags + c, 1u);  // nothing moves: nothing to read or wait for
    }
  }

  // ---- the last CTA to arrive writes the new lengths (everyone has read the old ones) --------
  __shared__ bool s_last;
  if (tid == 0) {
    __threadfence();
    s_last = atomicAdd(p.scratch + 1, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (s_last) {
    __threadfence();
    for (int b = tid; b < p.batch; b += kThreads) {
      const int64_t l = lclamp(__ldcg(p.seq_lens + b), 0, p.capacity);
      p.seq_lens[b] = int(lclamp(__ldcg(p.kept_lens + b), 0, lmin(p.max_kept, l)));
    }
  }
}

}  // namespace kvcore
