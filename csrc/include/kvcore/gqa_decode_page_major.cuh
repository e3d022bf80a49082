// Page-major paged GQA decode (head_dim 128): gqa_decode with a CTA per (sequence, KV split,
// block of HEADS KV heads) instead of one per (sequence, KV split, KV head), a warp per head.
//
// Why: gqa_decode_kernel's CTA reads one KV head's rows, 256 bytes every Hkv x 256 bytes of a page
// (2 KB apart at Hkv 8), and the 8 heads' CTAs of a page read it at different times. Session 17
// (bench/NOTES.md) measured gqa_decode 1.4% slower with the block table in random page order
// than in sequential order at B16 S8192, while a plain read that takes whole pages does not care
// about the order. Here the CTA's threads copy a token's HEADS x 256 bytes as one contiguous run:
// the whole page (all heads) at HEADS = Hkv. Selected by KVCORE_DECODE_KERNEL=page8 | page4 |
// page2 (paged_decode::page_major_heads), and with 8 or 4 heads by the default `auto` where a
// hint of equal lengths says its unsplit CTAs fill the SMs once (split_plan.h's
// page_major_fills_one_wave: measured ~1% ahead there, and behind wherever it needs a split
// merge; bench/NOTES.md, sessions 28 and 36).
//
// Everything else follows gqa_decode_kernel (gqa_decode.cuh), so that the access pattern is the
// difference: a stage is 16 tokens (of one page: the page size is a multiple of 16) of each of the
// CTA's heads, filled by 16-byte cp.async (zero-filled past the end) with rows XOR-swizzled for
// ldmatrix, STAGES deep, one barrier a stage; a warp does a gqa_decode warp's per-tile work (S = Q
// K^T on mma.sync with the group padded to 16 rows, online softmax, O += P V) on its head's 16
// tokens. What follows from the shape: a warp's query fragments stay in registers for the whole
// loop (loaded once from global memory); a warp's (m, l, O) is its heads' final state, so there
// is no merge across warps; and the split merge is per (sequence, head block): the last CTA of it
// combines every query head of the block, with a thread's partials MERGE_ITEMS items x
// MERGE_SPLITS splits in flight at once, the first batch issued before the lse round trip.
//
// ORDER (pages of exactly 16 tokens, so a stage is one page; at most kOrderMaxPages pages a split;
// cache page numbers that fit the packed entries): the CTA visits its split's pages in ascending
// cache order, as gqa_decode_kernel's ORDER instances do and for the same reason (gqa_decode.cuh:
// CTAs that each sweep the cache upwards read it together; a random block table otherwise costs
// ~1%, session 35's B128 354.8 us random against 351.2 in order with this kernel). The first
// STAGES - 1 pages keep the table's order, their copies in flight while the rest are sorted; a
// page's rows are then valid by its logical position, which its entry carries.
//
// Not served (the launcher keeps gqa_decode_kernel): other head dims, page sizes that are not
// multiples of 16, sliding windows, the H2O score buffer, forced split counts, block-sparse lists.
#pragma once

#include "kvcore/gqa_decode.cuh"

namespace kvcore {

template <int HEADS_, int STAGES_ = 3>
struct PageMajorConfig {
  static constexpr int HEADS = HEADS_;  // KV heads a CTA serves, a warp each
  static constexpr int WARPS = HEADS;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int D = 128, TD = D / 8;  // 16-byte chunks a row
  static constexpr int STAGE_TOKENS = 16;    // tokens a stage: one m16n8k16 tile of keys a warp
  static constexpr int STAGES = STAGES_;
  static constexpr int HEAD_TILE = STAGE_TOKENS * D;    // elements of one head's rows in a stage
  static constexpr int STAGE_ELEMS = HEADS * HEAD_TILE;  // per tensor
  // 16-byte copies a thread issues per tensor and stage (8), ROW_STEP rows apart.
  static constexpr int LOADS = STAGE_TOKENS * HEADS * TD / THREADS;
  static constexpr int ROW_STEP = THREADS / (HEADS * TD);
  static constexpr size_t SMEM_BYTES = size_t(STAGES) * STAGE_ELEMS * 2 * 2;  // K and V, 2-byte elements
  // ORDER: the sorted page list after the ring (kOrderMaxPages packed entries); the sort's
  // scratch buffer lives in the ring's last stage, which no copy fills before the sort ends.
  static constexpr size_t SMEM_ORDER = size_t(kOrderMaxPages) * 4;
  static constexpr size_t smem_bytes(bool order) { return SMEM_BYTES + (order ? SMEM_ORDER : 0); }
  // The split merge's batch: items (4 columns of one query head) x splits a thread has in flight.
  static constexpr int MERGE_ITEMS = 4, MERGE_SPLITS = 8;
  static_assert(HEADS == 2 || HEADS == 4 || HEADS == 8, "a CTA serves 2, 4 or 8 KV heads");
  static_assert(LOADS * THREADS == STAGE_TOKENS * HEADS * TD, "a stage's copies divide evenly");
  static_assert(THREADS % (D / 4) == 0, "a thread's merge items share their columns");
  static_assert(kOrderMaxPages % THREADS == 0 && size_t(STAGE_ELEMS) * 2 >= SMEM_ORDER,
                "ORDER: a thread's share of the list is whole, and the sort's scratch fits a stage of K");
};

// Element offset of chunk `chunk` of row `row` in one head's [16 rows][16 chunks] stage tile.
__device__ __forceinline__ int page_major_swz(int row, int chunk) { return (row * 16 + (chunk ^ (row & 7))) * 8; }

// p as for gqa_decode_kernel with window_left < 0 and page_size a multiple of 16; the split
// workspace is indexed by (sequence, head block) instead of (sequence, KV head): counters [B,
// Hkv / HEADS], partial_lse [B, Hkv / HEADS, num_splits, HEADS x group] (log2 domain),
// partial_out [B, Hkv / HEADS, num_splits, HEADS x group, D]; split_tokens a multiple of 16.
// ORDER: page_size 16, split_tokens at most kOrderMaxPages pages, num_pages at most
// kOrderMaxCachePages, Cfg::smem_bytes(true) of dynamic shared memory.
template <typename T, typename Cfg, bool ORDER = false>
__global__ void __launch_bounds__(Cfg::THREADS, 1) gqa_decode_page_major_kernel(const GqaDecodeParams p) {
  constexpr int D = Cfg::D, TD = Cfg::TD, ROWS = Cfg::STAGE_TOKENS, STAGES = Cfg::STAGES, HEADS = Cfg::HEADS;
  constexpr int LOADS = Cfg::LOADS, THREADS = Cfg::THREADS, WARPS = Cfg::WARPS, ROW_STEP = Cfg::ROW_STEP;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const sK = reinterpret_cast<T*>(smem_raw);
  T* const sV = sK + STAGES * Cfg::STAGE_ELEMS;

  const int hblk = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int group = p.group, kvh = hblk * HEADS + warp;  // this warp's KV head
  const int hq = p.num_kv_heads * group;

  // ---- this CTA's KV range (everything read from memory is clamped, as in gqa_decode_kernel) ----
  const int capacity = p.max_pages * p.page_size;
  const int seq_len = min(max(__ldg(p.seq_lens + b), 0), capacity);
  // A multiple of 16 (split_range.h's split_chunk, with the launcher's tile), so a stage lies in
  // one page.
  const int chunk = split_chunk(seq_len, p.num_splits, p.split_tokens, ROWS);
  const int start = split * chunk;
  const int end = min(seq_len, start + chunk);
  const int nstages = start < end ? (end - start + ROWS - 1) / ROWS : 0;
  const int* const bt = p.block_table + int64_t(b) * p.max_pages;
  auto page_of = [&](int pos) { return p.page_shift >= 0 ? pos >> p.page_shift : pos / p.page_size; };
  auto in_page = [&](int pos) { return p.page_shift >= 0 ? pos & (p.page_size - 1) : pos % p.page_size; };

  // Copy slot j of this thread: row row0 + j * ROW_STEP of head copy_head's tile, chunk
  // copy_chunk. Consecutive threads copy consecutive 16 bytes of the cache: a token's HEADS x 256
  // bytes are one contiguous run (the whole token row of the page at HEADS = Hkv).
  const int copy_chunk = tid % TD, copy_head = (tid / TD) % HEADS, row0 = tid / (HEADS * TD);
  const int64_t row_stride = int64_t(p.num_kv_heads) * D;  // elements between a page's tokens
  const int64_t src_off = int64_t(row0) * row_stride + int64_t(hblk * HEADS + copy_head) * D + copy_chunk * 8;
  const T* const kc = static_cast<const T*>(p.k_cache);
  const T* const vc = static_cast<const T*>(p.v_cache);
  // ORDER: stage t >= STAGES - 1 reads list entry t - (STAGES - 1), which names the cache page
  // (high bits) and its index from start (low bits; a stage is a page here).
  [[maybe_unused]] uint32_t* const sOrder = reinterpret_cast<uint32_t*>(smem_raw + Cfg::SMEM_BYTES);
  constexpr uint32_t kIndexMask = (1u << kOrderIndexBits) - 1;
  auto listed = [&](int t) { return ORDER && t >= STAGES - 1; };
  // The first token of stage t in the sequence, from its page entry.
  auto stage_pos = [&](int t, uint32_t entry) {
    return listed(t) ? start + int(entry & kIndexMask) * ROWS : start + t * ROWS;
  };
  // Stage t's page entry (the block table's, or ORDER's packed list entry), read one stage before
  // its copies are issued.
  auto page_at = [&](int t) -> uint32_t {
    if (t >= nstages) return 0u;
    if (listed(t)) return sOrder[t - (STAGES - 1)];
    return uint32_t(__ldg(bt + page_of(start + t * ROWS)));
  };
  auto issue_stage = [&](int t, uint32_t entry) {
    const int stage = t % STAGES;
    const int pos = stage_pos(t, entry);
    const int page = listed(t) ? int(entry >> kOrderIndexBits) : int(entry);
    const int64_t pg = min(max(page, 0), p.num_pages - 1);
    const int64_t row_off = int64_t(in_page(pos)) * row_stride + src_off;
    const T* ks = kc + pg * p.k_page_stride + row_off;
    const T* vs = vc + pg * p.v_page_stride + row_off;
    const int left = end - pos;  // valid rows of this stage from row 0
#pragma unroll
    for (int j = 0; j < LOADS; ++j) {
      const int row = row0 + j * ROW_STEP;
      const int s_off = stage * Cfg::STAGE_ELEMS + copy_head * Cfg::HEAD_TILE + page_major_swz(row, copy_chunk);
      cp_async_16(sK + s_off, ks, row < left);
      cp_async_16(sV + s_off, vs, row < left);
      ks += ROW_STEP * row_stride;
      vs += ROW_STEP * row_stride;
    }
  };

  // ORDER: the table entries of the pages after the first STAGES - 1, element i = tid * OE + s
  // (slot s) holding page STAGES - 1 + i from start, clamped into the table; loaded first, so
  // that they land while the first copies are issued.
  constexpr int OE = kOrderMaxPages / THREADS;
  [[maybe_unused]] int order_raw[ORDER ? OE : 1];
  if constexpr (ORDER) load_order_entries<THREADS>(order_raw, bt, page_of(start) + STAGES - 1, p.max_pages, nstages > 0);

  uint32_t next_page = page_at(0);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nstages) issue_stage(s, next_page);
    cp_async_commit();
    if (!listed(s + 1)) next_page = page_at(s + 1);  // (ORDER's list is not written yet)
  }

  // The query fragments (A operand of m16n8k16: rows = the group's heads padded to 16), kept in
  // registers: qa[k] holds rows r0 and r0 + 8, columns 16k + cpair (+1) and 16k + 8 + cpair (+1).
  const int r0 = lane >> 2, cpair = (lane & 3) * 2;
  const T* const qg = static_cast<const T*>(p.q) + int64_t(b) * p.q_stride_b + int64_t(kvh) * group * p.q_stride_h;
  auto q_pair = [&](int row, int col) {
    return row < group ? __ldg(reinterpret_cast<const uint32_t*>(qg + int64_t(row) * p.q_stride_h + col)) : 0u;
  };
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int k = 0; k < D / 16; ++k) {
    qa[k][0] = q_pair(r0, 16 * k + cpair);
    qa[k][1] = q_pair(r0 + 8, 16 * k + cpair);
    qa[k][2] = q_pair(r0, 16 * k + 8 + cpair);
    qa[k][3] = q_pair(r0 + 8, 16 * k + 8 + cpair);
  }

  if constexpr (ORDER) {
    // The split's pages after the first STAGES - 1, sorted by cache page (no ties: the index is in
    // the entry), pads after them, while the first pages' copies are in flight.
    sort_split_pages<THREADS>(order_raw, STAGES - 1, nstages, p.num_pages,
                              reinterpret_cast<uint32_t*>(sK + (STAGES - 1) * Cfg::STAGE_ELEMS), sOrder);
    next_page = page_at(STAGES - 1);
  }

  const float s_scale = p.soft_cap > 0.f ? p.scale : p.scale * kLog2e;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  for (int t = 0; t < nstages; ++t) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage t landed for every thread; stage (t - 1) % STAGES is free again
    const int spos = stage_pos(t, listed(t) ? sOrder[t - (STAGES - 1)] : 0u);  // the stage's first token
    if (t + STAGES - 1 < nstages) issue_stage(t + STAGES - 1, next_page);
    cp_async_commit();
    next_page = page_at(t + STAGES);

    const T* kt = sK + (t % STAGES) * Cfg::STAGE_ELEMS + warp * Cfg::HEAD_TILE;
    const T* vt = sV + (t % STAGES) * Cfg::STAGE_ELEMS + warp * Cfg::HEAD_TILE;
    // S = Q K^T over the stage's 16 tokens: two n-tiles of 8 tokens, D / 16 k-steps.
    float s[2][4] = {};
#pragma unroll
    for (int k = 0; k < D / 16; k += 2) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        uint32_t bk[4];
        ldmatrix_x4(bk, kt + page_major_swz(nt * 8 + (lane & 7), k * 2 + (lane >> 3)));
        mma_16816(s[nt], qa[k], bk[0], bk[1], T{});
        mma_16816(s[nt], qa[k + 1], bk[2], bk[3], T{});
      }
    }
    // Scale (or soft-cap) into the log2 domain, mask rows past the end, online-softmax update.
    const int tok0 = spos + cpair;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float x = s[nt][i] * s_scale;
        if (p.soft_cap > 0.f) x = p.soft_cap * tanhf(x / p.soft_cap) * kLog2e;
        s[nt][i] = tok0 + nt * 8 + (i & 1) < end ? x : -INFINITY;
      }
    float alpha[2], base[2];
    tile_softmax_update(s, m, l, alpha, base);
    tile_pv_update<T, D>(o, s, alpha, vt, 0, lane, [](int row, int chunk) { return page_major_swz(row, chunk); });
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  // This warp's query heads are rows r0 and r0 + 8 of its padded tile. l == 0: nothing attended
  // (out 0, lse -inf); a NaN l stays NaN in both, as in gqa_decode_kernel.
  const int64_t blk = int64_t(b) * (p.num_kv_heads / HEADS) + hblk;  // (sequence, head block)
  const int brows = HEADS * group;                                     // query heads of the block
  if (p.num_splits == 1) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = r0 + 8 * r;
      if (row >= group) continue;
      const float inv = l[r] == 0.f ? 0.f : 1.f / l[r];
      const int64_t qh = int64_t(b) * hq + int64_t(kvh) * group + row;
      T* dst = static_cast<T*>(p.out) + qh * D + cpair;
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<uint32_t*>(dst + n * 8) = pack2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv, T{});
      if (p.lse != nullptr && cpair == 0) p.lse[qh] = l[r] == 0.f ? -INFINITY : (m[r] + log2f(l[r])) * kLn2;
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r0 + 8 * r;
    if (row >= group) continue;
    const float inv = l[r] == 0.f ? 0.f : 1.f / l[r];
    const int64_t slot = (blk * p.num_splits + split) * brows + warp * group + row;
    float* dst = p.partial_out + slot * D + cpair;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    if (cpair == 0) p.partial_lse[slot] = l[r] == 0.f ? -INFINITY : m[r] + log2f(l[r]);
  }

  // ---- split merge: publish, count arrivals, the last CTA combines (as gqa_decode_kernel) -------
  __syncthreads();  // every partial stored before thread 0's release
  __shared__ bool is_last;
  if (tid == 0) is_last = atomic_add_acq_rel_gpu(p.counters + blk, 1u) == unsigned(p.num_splits - 1);
  __syncthreads();
  if (!is_last) return;

  // A thread's items (4 columns of one query head) are tid + k x THREADS: since THREADS is a
  // multiple of D / 4, item k's head is k x THREADS / (D / 4) heads after item 0's, at the same
  // columns, so the partials' addresses step by two constant strides.
  constexpr int KB = Cfg::MERGE_ITEMS, SB = Cfg::MERGE_SPLITS;
  const int ns = p.num_splits;
  float* const wgt = reinterpret_cast<float*>(smem_raw);  // [brows][ns + 1]; the ring is free now
  const int n_items = brows * (D / 4);
  const int my_items = tid < n_items ? (n_items - tid + THREADS - 1) / THREADS : 0;
  const float* const pout = p.partial_out + blk * ns * brows * D + (tid / (D / 4)) * D + (tid % (D / 4)) * 4;
  constexpr int64_t kItemStride = int64_t(THREADS / (D / 4)) * D;  // floats between a thread's items
  const int64_t split_stride = int64_t(brows) * D;                  // floats between splits
  float4 pv[KB][SB];
  auto load_batch = [&](int k0, int s0) {
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) {
      const float* src = pout + (k0 + kk) * kItemStride + s0 * split_stride;
#pragma unroll
      for (int ss = 0; ss < SB; ++ss) {
        if (k0 + kk < my_items && s0 + ss < ns) pv[kk][ss] = __ldcg(reinterpret_cast<const float4*>(src));
        src += split_stride;
      }
    }
  };
  load_batch(0, 0);  // in flight during the lse round trip below

  // Every (split, head) lse of the block at once, one a thread ([ns][brows] in memory, so the
  // loads are coalesced), into wgt: one L2 round trip, where a warp per head looping its heads
  // would wait one per head (brows / WARPS = group of them in a row).
  const float* const plse = p.partial_lse + blk * ns * brows;
  for (int i = tid; i < ns * brows; i += THREADS) {
    const int s = i / brows, h = i - s * brows;
    wgt[h * (ns + 1) + s] = __ldcg(plse + i);
  }
  __syncthreads();
  for (int h = warp; h < brows; h += WARPS) {
    float mx = -INFINITY;
    for (int s = lane; s < ns; s += 32) mx = fmaxf(mx, wgt[h * (ns + 1) + s]);
    const float2 bs = split_merge_weights(mx, h, ns, lane, wgt);
    const float base = bs.x, sum = bs.y;
    if (lane == 0) {
      wgt[h * (ns + 1) + ns] = sum;
      if (p.lse != nullptr)
        p.lse[int64_t(b) * hq + int64_t(hblk) * brows + h] = sum == 0.f ? -INFINITY : (base + log2f(sum)) * kLn2;
    }
  }
  __syncthreads();
  // Each item summed over the splits in split order (the same bits whatever the batching).
  for (int k0 = 0; k0 < my_items; k0 += KB) {
    float4 acc[KB];
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) acc[kk] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < ns; s0 += SB) {
      if (k0 > 0 || s0 > 0) load_batch(k0, s0);  // (the first batch came before the lse)
#pragma unroll
      for (int kk = 0; kk < KB; ++kk) {
        const int h = (tid + (k0 + kk) * THREADS) / (D / 4);
#pragma unroll
        for (int ss = 0; ss < SB; ++ss) {
          if (k0 + kk < my_items && s0 + ss < ns) {
            const float w = wgt[h * (ns + 1) + s0 + ss];
            acc[kk].x = fmaf(w, pv[kk][ss].x, acc[kk].x);
            acc[kk].y = fmaf(w, pv[kk][ss].y, acc[kk].y);
            acc[kk].z = fmaf(w, pv[kk][ss].z, acc[kk].z);
            acc[kk].w = fmaf(w, pv[kk][ss].w, acc[kk].w);
          }
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) {
      if (k0 + kk >= my_items) break;
      const int item = tid + (k0 + kk) * THREADS;
      const int h = item / (D / 4), c = (item % (D / 4)) * 4;
      const float sum = wgt[h * (ns + 1) + ns];
      const float inv = sum == 0.f ? 0.f : 1.f / sum;
      T* dst = static_cast<T*>(p.out) + (int64_t(b) * hq + int64_t(hblk) * brows + h) * D + c;
      *reinterpret_cast<uint2*>(dst) =
          make_uint2(pack2(acc[kk].x * inv, acc[kk].y * inv, T{}), pack2(acc[kk].z * inv, acc[kk].w * inv, T{}));
    }
  }
  if (tid == 0) p.counters[blk] = 0u;  // ready for the next launch
}

}  // namespace kvcore
