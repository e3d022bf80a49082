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
// Speed (bench/NOTES.md, "compact_kv, session 5"): the copy is bound by how many chunk payloads
// are in flight per SM, and a CTA's life is a chain of dependent round trips of which only one
// carries the payload. So the chunk lands in shared memory by cp.async (no payload registers:
// 128 threads, 6 CTAs per SM) and the chain is short: ticket; kept + lengths together (the chunk
// search runs meanwhile in warps 2-3); block table; payload (with a first look at the flags it
// waits for); then fire-and-forget stores. The arrival count that elects the CTA writing the new
// lengths is taken at the start, right after the CTA's last read of seq_lens, not at the end.
// The ordering guarantee is the one of the register version: "read done" is published only once
// the bytes sit in this CTA's shared memory (each thread's cp.async.wait_all, a barrier, then
// thread 0's release store), a CTA publishes before it waits on anyone, and it writes only after
// acquiring every flag it waits for and a barrier. The search now reads raw positions (before
// the length is known): identical for valid input, and for bad input it still returns a range
// of smaller chunks, which can cost correctness of the data only, never a hang.
//
// The tickets, arrivals and flags live in a scratch buffer that the launcher keeps per stream
// (csrc/eviction/compact_kv.cu): the last CTA to arrive puts the two counters back to zero, and
// each launch marks its flags with a value (flag_mark) that no earlier launch on the buffer used,
// so consecutive launches need no memset node in between (the memset was part of the ~7 us fixed
// cost per call measured in session 7; issue 6 asks 80% of copy).
//
// Rows whose source is themselves (kept[i] == i, common for sinks) are neither read nor written.
// seq_lens[b] = kept_lens[b] is written by the last CTA to arrive; every CTA arrives after its
// read of seq_lens (thread 0: load, then a releasing arrival count; the last one fences before
// writing), so no CTA reads a new length.
//
// Safety without validation: seq_len is clamped to [0, capacity], kept_lens to
// [0, min(max_kept, seq_len)], every kept position to [0, seq_len) and page ids to
// [0, num_pages): bad contents give wrong data but never an out-of-bounds access, and a CTA only
// ever waits on smaller tickets, so bad contents cannot hang it either.
#pragma once

#include <stdint.h>

#include "kvcore/device_utils.cuh"

namespace kvcore {

struct CompactKvParams {
  char* k_cache;  // bytes
  char* v_cache;
  int64_t k_page_stride, v_page_stride;  // bytes between pages
  int64_t row_stride;                    // bytes between token rows of a page (Hkv * D * elem)
  int64_t head_bytes;                    // D * elem
  int units;                             // head_bytes / sizeof(Vec)
  const int* block_table;                // [B, max_pages]
  int* seq_lens;                         // [B], updated by the last CTA to arrive
  const int64_t* kept;                   // [B, Hkv, max_kept]
  const int* kept_lens;                  // [B]
  int batch, num_kv_heads, page_size, num_pages, max_pages;
  int64_t max_kept;
  int64_t capacity;      // max_pages * page_size
  int chunk_rows;        // C <= kRows, C * head_bytes <= kChunkBytes
  int64_t chunks;        // chunks per (b, h), over min(max_kept, capacity) rows
  int64_t tickets;       // pairs * chunks; the grid is max(1, tickets) CTAs
  // [2 + tickets]: ticket counter, arrival counter (both zero before a launch, and left zero by
  // it), then one read-done flag per chunk, which holds flag_mark once the chunk has read its
  // sources. The flags start with any value other than flag_mark (a fresh buffer: zero).
  unsigned* scratch;
  unsigned flag_mark;  // != 0
};

namespace compact_detail {

__device__ __forceinline__ int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }
__device__ __forceinline__ int64_t lclamp(int64_t x, int64_t lo, int64_t hi) { return lmin(lmax(x, lo), hi); }

constexpr int kThreads = 128;
constexpr int kMinCtasPerSm = 6;    // 6 x ~36 KB of shared memory fit an SM of sm_90 (228 KB)
constexpr int kRows = 64;           // rows per chunk at most: warp 0 stages two rows per lane
constexpr int kChunkBytes = 16384;  // per tensor (K, V) and chunk, in shared memory

__device__ __forceinline__ void store_release(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

// (the acquiring flag load is device_utils' ld_acquire_gpu, shared with gqa_decode's fused score wait)
using kvcore::ld_acquire_gpu;

// Release only: an acquiring atomic would hold back the thread's next loads until it returns,
// putting a round trip on the CTA's critical path; the one CTA that needs the acquire (the last
// to arrive) fences after reading the count instead.
__device__ __forceinline__ unsigned atom_add_release(unsigned* p, unsigned v) {
  unsigned old;
  asm volatile("atom.release.gpu.global.add.u32 %0, [%1], %2;\n" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

// Ordering between CTAs follows one pattern throughout (as CUTLASS's semaphores do): the threads
// of a CTA meet at a barrier, then one thread releases (st.release / atom.release); on the other
// side threads acquire (ld.acquire, or a relaxed read then a fence), then meet at a barrier
// before acting. The barrier carries the ordering to the other threads of the CTA, so no
// per-thread fence is needed.

// One Vec from global to shared memory: cp.async (L2 only for 16 bytes) on sm_80+, where 4, 8
// and 16 bytes are the sizes it takes; a plain load and store otherwise (2-byte rows, older GPUs).
template <typename Vec>
__device__ __forceinline__ void copy_in(Vec* smem, const Vec* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (sizeof(Vec) >= 4) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    if constexpr (sizeof(Vec) == 16) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
    } else {
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(s), "l"(gmem), "n"(int(sizeof(Vec)))
                   : "memory");
    }
    return;
  }
#endif
  *smem = __ldcg(gmem);
}

// Every cp.async this thread issued has landed in shared memory (and so has read global memory).
__device__ __forceinline__ void copy_in_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Smallest j in [lo, hi) with pred(j) true for a pred that is monotone (false ... true), or hi if
// none; one warp, 32 probes per round (two rounds up to 1024 chunks). Every lane returns it.
// For a pred that is not monotone (bad input) it still ends, with some j in [lo, hi].
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

// Sequence b's length, clamped to [0, capacity], and its kept count, clamped to
// [0, min(max_kept, len)]. (compact_kv_pipelined_kernel's header spells them out: called from its
// stage_header lambda, these change its SASS.)
__device__ __forceinline__ int64_t clamped_seq_len(const CompactKvParams& p, int b) {
  return lclamp(__ldcg(p.seq_lens + b), 0, p.capacity);
}
__device__ __forceinline__ int64_t clamped_kept_len(const CompactKvParams& p, int b, int64_t len) {
  return lclamp(__ldcg(p.kept_lens + b), 0, lmin(p.max_kept, len));
}

// Page of token row pos (< capacity) from the block-table row bt, clamped to [0, num_pages), and
// the byte offset of head h of that row inside its page.
__device__ __forceinline__ int64_t page_of(const CompactKvParams& p, const int* bt, int64_t pos) {
  return lclamp(__ldg(bt + pos / p.page_size), 0, p.num_pages - 1);
}
__device__ __forceinline__ int64_t offset_in_page(const CompactKvParams& p, int64_t pos, int h) {
  return (pos % p.page_size) * p.row_stride + int64_t(h) * p.head_bytes;
}

// Until every chunk of [j0, j1) (flags of this pair) holds flag_mark, i.e. has read its sources:
// the CTA's threads share the chunks; `seen`: this thread's first one, j0 + tid, was set already.
__device__ __forceinline__ void wait_for_reads(const CompactKvParams& p, const unsigned* flags, int64_t j0, int64_t j1,
                                               bool seen, int tid) {
  for (int64_t j = j0 + tid; j < j1; j += kThreads) {
    if (j == j0 + tid && seen) continue;
    while (ld_acquire_gpu(flags + j) != p.flag_mark) __nanosleep(64);
  }
}

// Thread 0 at the end of a launch; `last`: its CTA arrived last (every CTA's reads of the lengths
// are done). That CTA zeroes both counters for the next launch on the buffer (every CTA took its
// tickets before arriving, and nothing reads either counter after its arrival). Returns last.
__device__ __forceinline__ bool reset_counters_if_last(const CompactKvParams& p, bool last) {
  if (last) {
    __threadfence();  // acquire: every CTA's reads of the lengths before our writes
    p.scratch[0] = 0u;
    p.scratch[1] = 0u;
  }
  return last;
}

// The last CTA, once thread 0 has told it so: the new lengths, kept_lens clamped as every CTA
// read it.
__device__ __forceinline__ void write_new_lengths(const CompactKvParams& p, int tid) {
  for (int bb = tid; bb < p.batch; bb += kThreads) {
    const int64_t l = clamped_seq_len(p, bb);
    p.seq_lens[bb] = int(clamped_kept_len(p, bb, l));
  }
}

}  // namespace compact_detail

template <typename Vec>
__global__ void __launch_bounds__(compact_detail::kThreads, compact_detail::kMinCtasPerSm)
    compact_kv_kernel(const CompactKvParams p) {
  using namespace compact_detail;
  constexpr int kVecs = kChunkBytes / int(sizeof(Vec));  // Vecs of one tensor's chunk
  constexpr int SLOTS = kVecs / kThreads;                 // per thread and tensor
  static_assert(kVecs % kThreads == 0, "a chunk must split evenly over the threads");
  static_assert(kRows <= 64, "rows are staged by warp 0 (two per lane); warps 2-3 search");
  __shared__ __align__(16) unsigned char s_payload[2 * kChunkBytes];  // K chunk, then V chunk
  __shared__ int64_t s_src_k[kRows], s_src_v[kRows], s_dst_k[kRows], s_dst_v[kRows];  // byte offsets
  __shared__ unsigned char s_move[kRows];
  __shared__ int64_t s_ticket, s_n;
  __shared__ int s_range[2];  // earlier chunks [j0, j1) whose reads this chunk's writes wait for
  __shared__ int s_last;
  Vec* const s_k = reinterpret_cast<Vec*>(s_payload);
  Vec* const s_v = reinterpret_cast<Vec*>(s_payload + kChunkBytes);

  const int tid = threadIdx.x, warp = tid >> 5;
  // ---- round trip 1: the ticket -------------------------------------------------------------
  if (tid == 0) s_ticket = atomicAdd(p.scratch, 1u);
  __syncthreads();
  const int64_t t = s_ticket;
  const bool ticketed = t < p.tickets;  // CTA-uniform; false only for the lone CTA of an empty call
  const int64_t pairs = lmax(int64_t(p.batch) * p.num_kv_heads, 1);
  const int64_t c = t / pairs, pair = t % pairs;
  const int b = ticketed ? int(pair / p.num_kv_heads) : 0, h = ticketed ? int(pair % p.num_kv_heads) : 0;
  const int64_t C = p.chunk_rows, row0 = c * C;
  const int64_t* const kp = p.kept + pair * p.max_kept;

  // ---- round trips 2-3: warp 0 stages the rows, warps 2-3 search the chunks to wait for -------
  // Both take two dependent round trips (kept + lengths, then the block table; two 32-ary search
  // rounds), so the two halves only meet at the barrier before the payload.
  // A ticketed chunk has c < chunks, so row0 < min(max_kept, capacity): every kept index read
  // below (row0 + tid < max_kept; the searches read indices < row0) is inside kept's row.
  unsigned arrival = 0;
  bool moves = false;
  if (warp == 0) {
    // Warp 0 alone (two rows per lane), so that the lengths pass from lane 0 by a shuffle: a
    // named barrier over warps 0-1 made compute-sanitizer racecheck report hazards (2026-12-03)
    // between barrier-separated accesses, and a second warp reading seq_lens itself would not be
    // ordered before the arrival count below.
    const int lane = tid;
    int64_t raw[2] = {0, 0};  // kept[row0 + lane + 32 q], unclamped (the length is not known yet)
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int r = lane + 32 * q;
      if (ticketed && r < C && row0 + r < p.max_kept) raw[q] = __ldg(kp + row0 + r);
    }
    int64_t len = 0, n = 0;
    if (lane == 0) {
      if (ticketed) {
        len = clamped_seq_len(p, b);
        n = clamped_kept_len(p, b, len);
      }
      s_n = n;
      // Release: this CTA's read of seq_lens[b] is ordered before its arrival, so the last to
      // arrive may overwrite the lengths. The count's value is only needed at the very end.
      arrival = atom_add_release(p.scratch + 1, 1u);
    }
    len = __shfl_sync(0xffffffffu, len, 0);
    n = __shfl_sync(0xffffffffu, n, 0);
    const int64_t rows = (ticketed && row0 < n) ? lmin(C, n - row0) : 0;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int r = lane + 32 * q;
      if (r < rows) {  // rows <= C <= kRows = 64
        const int64_t i = row0 + r, s = lclamp(raw[q], 0, len - 1);
        const bool m = s != i;
        moves |= m;
        if (m) {
          // s, i < len <= capacity = max_pages * page_size: both page indices are inside the row.
          const int* bt = p.block_table + int64_t(b) * p.max_pages;
          const int64_t sp = page_of(p, bt, s), dp = page_of(p, bt, i);
          const int64_t so = offset_in_page(p, s, h), dof = offset_in_page(p, i, h);
          s_src_k[r] = sp * p.k_page_stride + so;
          s_src_v[r] = sp * p.v_page_stride + so;
          s_dst_k[r] = dp * p.k_page_stride + dof;
          s_dst_v[r] = dp * p.v_page_stride + dof;
        }
        s_move[r] = m;
      }
    }
  } else if (warp >= 2 && ticketed) {  // warp 1 idles here: s_range has one slot per searching warp
    // Chunk j < c overlaps [row0, row0 + C) iff last_src(j) >= row0 and first_src(j) < row0 + C;
    // both are monotone in j for valid input, so the overlapping j form [j0, j1). Raw positions:
    // valid input is inside [0, seq_len) already; for bad input any [j0, j1) within [0, c] is
    // safe (it only decides which smaller tickets to wait for). Harmless for a chunk that turns
    // out not to be live (its indices are in range all the same).
    int j;
    if (warp == 2) {
      j = warp_search(0, c, [&](int64_t q) { return __ldg(kp + (q + 1) * C - 1) >= row0; });
    } else {
      j = warp_search(0, c, [&](int64_t q) { return __ldg(kp + q * C) >= row0 + C; });
    }
    if ((tid & 31) == 0) s_range[warp - 2] = j;
  }
  const bool any = __syncthreads_or(moves);  // CTA-uniform
  const int64_t n = s_n;
  const bool live = ticketed && row0 < n;  // CTA-uniform
  const int64_t rows = live ? lmin(C, n - row0) : 0;

  // ---- round trip 4: the payload into shared memory; a first look at the flags meanwhile ----
  // Element e of a tensor's chunk is row e / units, Vec e % units; each thread later stores
  // exactly the elements it loaded. C * units <= kVecs, so e < kVecs indexes the buffers.
  const int units = p.units;
  unsigned* const flags = p.scratch + 2 + pair * p.chunks;
  int64_t j0 = 0, j1 = 0;
  bool seen = true;  // this thread's first flag (j0 + tid) was already set before we published
  if (any) {
#pragma unroll
    for (int k = 0; k < SLOTS; ++k) {
      const int e = tid + k * kThreads, r = e / units, u = e - r * units;
      if (r < rows && s_move[r]) {
        copy_in(s_k + e, reinterpret_cast<const Vec*>(p.k_cache + s_src_k[r]) + u);
        copy_in(s_v + e, reinterpret_cast<const Vec*>(p.v_cache + s_src_v[r]) + u);
      }
    }
    j0 = s_range[0];
    j1 = s_range[1];
    // A non-blocking look (this CTA has not published yet, so it must not wait here); within a
    // launch a flag only ever changes to flag_mark, so once seen it stays set.
    if (j0 + tid < j1) seen = ld_acquire_gpu(flags + j0 + tid) == p.flag_mark;
    // This thread's reads of the chunk have completed: the data is in shared memory.
    copy_in_wait_all();
  }
  if (live) {
    __syncthreads();  // every thread's reads are done before the flag says so
    if (tid == 0) store_release(flags + c, p.flag_mark);  // "chunk c has read its sources"
    if (any) {
      // ---- wait for the earlier chunks that still read our destinations, then write -------
      // They hold smaller tickets and published (or will publish) before waiting themselves.
      wait_for_reads(p, flags, j0, j1, seen, tid);
      __syncthreads();  // every flag acquired (by some thread) before any thread writes
#pragma unroll
      for (int k = 0; k < SLOTS; ++k) {
        const int e = tid + k * kThreads, r = e / units, u = e - r * units;
        if (r < rows && s_move[r]) {
          reinterpret_cast<Vec*>(p.k_cache + s_dst_k[r])[u] = s_k[e];
          reinterpret_cast<Vec*>(p.v_cache + s_dst_v[r])[u] = s_v[e];
        }
      }
    }
  }

  // ---- the last CTA to arrive writes the new lengths (everyone has read the old ones) --------
  if (tid == 0) s_last = reset_counters_if_last(p, arrival == gridDim.x - 1);
  __syncthreads();
  if (s_last) write_new_lengths(p, tid);
}

// ---- the pipelined form (the default since session 12) ------------------------------------------
//
// Why: the chunk kernel above spends most of a CTA's life on its header chain (ticket, then kept
// and the lengths, then the block table; the chunk search alongside), and its payload is in flight
// for one round trip of the ~5: with 6 CTAs per SM about a sixth of the 192 KB of chunk buffers
// per SM holds bytes in flight, ~13 GB/s of reads per SM at the loaded latency (session 12's
// count; the copy rate needs ~16). Here each CTA stays resident and loops over tickets, and stages
// the next chunk's header while the current chunk's payload is in flight: the next ticket is
// taken one chunk ahead and the header loads of chunk k + 1 are issued right after chunk k's
// payload copies, so a chunk costs about max(payload, header) instead of their sum.
//
// Ordering and progress are the chunk kernel's: a chunk's reads never wait; its writes wait for
// the earlier chunks whose sources overlap its destinations, all holding smaller tickets; its
// "read done" flag is published once its bytes sit in shared memory and before it waits. A CTA
// takes its tickets in increasing order, so the smallest unfinished ticket is either being copied
// (it waits only on finished ones) or held ahead by a CTA copying a smaller one, which cannot be:
// no CTA waits forever. The lengths: every CTA reads seq_lens / kept_lens only in its headers,
// all before it counts itself out at its end (a releasing atomic); the last CTA out writes them
// and zeroes both counters.
template <typename Vec>
__global__ void __launch_bounds__(compact_detail::kThreads, compact_detail::kMinCtasPerSm)
    compact_kv_pipelined_kernel(const CompactKvParams p) {
  using namespace compact_detail;
  constexpr int kVecs = kChunkBytes / int(sizeof(Vec));
  constexpr int SLOTS = kVecs / kThreads;
  static_assert(kVecs % kThreads == 0, "a chunk must split evenly over the threads");
  static_assert(kRows <= 64, "rows are staged by warp 0 (two per lane); warps 2-3 search");
  __shared__ __align__(16) unsigned char s_payload[2 * kChunkBytes];  // K chunk, then V chunk
  // Two headers: the chunk being copied and the next one. Per row: source and destination page
  // (block_table entries, clamped) and byte offset inside the page (int32: the launcher checks
  // page_size x row_stride < 2^31).
  __shared__ int s_src_page[2][kRows], s_dst_page[2][kRows], s_src_off[2][kRows], s_dst_off[2][kRows];
  __shared__ unsigned char s_move[2][kRows];
  __shared__ int64_t s_ticket[2], s_n[2];
  __shared__ int s_range[2][2];  // earlier chunks [j0, j1) whose reads the chunk's writes wait for
  __shared__ int s_any[2];       // some row of the chunk moves
  __shared__ int s_last;
  Vec* const s_k = reinterpret_cast<Vec*>(s_payload);
  Vec* const s_v = reinterpret_cast<Vec*>(s_payload + kChunkBytes);

  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t pairs = lmax(int64_t(p.batch) * p.num_kv_heads, 1);
  const int64_t C = p.chunk_rows;

  // The header of ticket t into buffer `buf`: warp 0 the rows (kept, lengths, then the block
  // table: two dependent round trips), warps 2-3 the range of earlier chunks to wait for (two
  // search rounds). The chunk kernel's header code with the offsets split into page and offset.
  auto stage_header = [&](int buf, int64_t t) {
    const bool ticketed = t < p.tickets;
    const int64_t c = t / pairs, pair = t % pairs;
    const int b = ticketed ? int(pair / p.num_kv_heads) : 0, h = ticketed ? int(pair % p.num_kv_heads) : 0;
    const int64_t row0 = c * C;
    const int64_t* const kp = p.kept + pair * p.max_kept;
    if (warp == 0) {
      const int lane = tid;
      int64_t raw[2] = {0, 0};
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int r = lane + 32 * q;
        if (ticketed && r < C && row0 + r < p.max_kept) raw[q] = __ldg(kp + row0 + r);
      }
      int64_t len = 0, n = 0;
      if (lane == 0 && ticketed) {
        len = lclamp(__ldcg(p.seq_lens + b), 0, p.capacity);
        n = lclamp(__ldcg(p.kept_lens + b), 0, lmin(p.max_kept, len));
      }
      len = __shfl_sync(0xffffffffu, len, 0);
      n = __shfl_sync(0xffffffffu, n, 0);
      const int64_t rows = (ticketed && row0 < n) ? lmin(C, n - row0) : 0;
      bool moves = false;
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int r = lane + 32 * q;
        if (r < rows) {
          const int64_t i = row0 + r, s = lclamp(raw[q], 0, len - 1);
          const bool m = s != i;
          moves |= m;
          if (m) {
            const int* bt = p.block_table + int64_t(b) * p.max_pages;
            s_src_page[buf][r] = int(page_of(p, bt, s));
            s_dst_page[buf][r] = int(page_of(p, bt, i));
            s_src_off[buf][r] = int(offset_in_page(p, s, h));
            s_dst_off[buf][r] = int(offset_in_page(p, i, h));
          }
          s_move[buf][r] = m;
        }
      }
      moves = __any_sync(0xffffffffu, moves);
      if (lane == 0) {
        s_n[buf] = n;
        s_any[buf] = moves;
      }
    } else if (warp >= 2 && ticketed) {
      int j;
      if (warp == 2) {
        j = warp_search(0, c, [&](int64_t q) { return __ldg(kp + (q + 1) * C - 1) >= row0; });
      } else {
        j = warp_search(0, c, [&](int64_t q) { return __ldg(kp + q * C) >= row0 + C; });
      }
      if ((tid & 31) == 0) s_range[buf][warp - 2] = j;
    }
  };

  // ---- prologue: the first ticket's header, and the second ticket ------------------------------
  if (tid == 0) {
    s_ticket[0] = atomicAdd(p.scratch, 1u);
    s_ticket[1] = atomicAdd(p.scratch, 1u);
  }
  __syncthreads();
  stage_header(0, s_ticket[0]);
  __syncthreads();

  const int units = p.units;
  for (int cur = 0;; cur ^= 1) {
    const int64_t t = s_ticket[cur];
    if (t >= p.tickets) break;  // CTA-uniform (read after a barrier)
    const int64_t c = t / pairs, pair = t % pairs;
    const int64_t row0 = c * C, n = s_n[cur];
    const bool live = row0 < n;
    const int64_t rows = live ? lmin(C, n - row0) : 0;
    const bool any = s_any[cur] != 0;
    unsigned* const flags = p.scratch + 2 + pair * p.chunks;

    // The payload into shared memory, and a first look at the flags this chunk waits for.
    int64_t j0 = 0, j1 = 0;
    bool seen = true;
    if (any) {
#pragma unroll
      for (int k = 0; k < SLOTS; ++k) {
        const int e = tid + k * kThreads, r = e / units, u = e - r * units;
        if (r < rows && s_move[cur][r]) {
          const int64_t sp = s_src_page[cur][r], so = s_src_off[cur][r];
          copy_in(s_k + e, reinterpret_cast<const Vec*>(p.k_cache + sp * p.k_page_stride + so) + u);
          copy_in(s_v + e, reinterpret_cast<const Vec*>(p.v_cache + sp * p.v_page_stride + so) + u);
        }
      }
      j0 = s_range[cur][0];
      j1 = s_range[cur][1];
      if (j0 + tid < j1) seen = ld_acquire_gpu(flags + j0 + tid) == p.flag_mark;
    }
    // The ticket after the next one, and the next chunk's header, while the payload is in flight.
    unsigned after = 0;
    if (tid == 0) after = atomicAdd(p.scratch, 1u);  // first needed at the end of this iteration
    stage_header(cur ^ 1, s_ticket[cur ^ 1]);
    if (any) copy_in_wait_all();  // this thread's reads of the chunk have completed
    __syncthreads();              // every thread's reads done (and the next header staged)
    if (live) {
      if (tid == 0) store_release(flags + c, p.flag_mark);  // "chunk c has read its sources"
      if (any) {
        wait_for_reads(p, flags, j0, j1, seen, tid);
        __syncthreads();  // every flag acquired (by some thread) before any thread writes
#pragma unroll
        for (int k = 0; k < SLOTS; ++k) {
          const int e = tid + k * kThreads, r = e / units, u = e - r * units;
          if (r < rows && s_move[cur][r]) {
            const int64_t dp = s_dst_page[cur][r], dof = s_dst_off[cur][r];
            reinterpret_cast<Vec*>(p.k_cache + dp * p.k_page_stride + dof)[u] = s_k[e];
            reinterpret_cast<Vec*>(p.v_cache + dp * p.v_page_stride + dof)[u] = s_v[e];
          }
        }
      }
    }
    if (tid == 0) s_ticket[cur] = after;  // this buffer's next chunk: the one after the next
    __syncthreads();  // the payload buffer is free again, the ticket visible
  }

  // ---- the last CTA out writes the new lengths and zeroes both counters -----------------------
  // Every CTA read seq_lens / kept_lens (thread 0) only in its headers, before this releasing
  // count; nothing reads either counter after its CTA has counted itself out.
  if (tid == 0) s_last = reset_counters_if_last(p, atom_add_release(p.scratch + 1, 1u) == gridDim.x - 1);
  __syncthreads();
  if (s_last) write_new_lengths(p, tid);
}

}  // namespace kvcore
