// Page-major paged GQA decode: an experiment beside the library's gqa_decode_kernel, timed by
// decode_trace.cu (PAGE_MAJOR=...). Not part of the library.
//
// Question it answers: does reading the cache a page at a time, all (or several) KV heads of the
// page's tokens by one CTA, recover what the random page order costs gqa_decode at B >= 16?
// Session 17 measured that a plain read taking whole pages (all heads) does not care about the
// page order (B16 S8192 120.0 us random, 119.5 sequential), while gqa_decode, whose CTA reads one
// KV head's 256-byte rows (2 KB apart at Hkv 8), does (127.3 against 125.5). Here a CTA serves
// HEADS consecutive KV heads of one sequence's split, a warp per head, so a page's K (and V) is
// read as page_size runs of HEADS x 256 contiguous bytes: the whole 32 KB page at HEADS = Hkv = 8.
//
// Everything else follows gqa_decode so that the access pattern is the one difference: a stage
// is one page (16 tokens) of each of the CTA's heads, filled by 16-byte cp.async (zero-filled past
// the end) with rows XOR-swizzled for ldmatrix, STAGES deep, one barrier a stage; a warp does
// the same per-16-token work as a gqa_decode warp does per tile (S = Q K^T on mma.sync with the
// group padded to 16 rows, online softmax, O += P V). Differences that follow from the shape: the
// warp's query fragments stay in registers for the whole loop (loaded once from global memory),
// a warp's (m, l, O) is its heads' final state (no merge across warps), and the split merge is
// per (sequence, head block): the last CTA of it combines every head's partials.
//
// Limits (the experiment's, checked by its host code): D 128, page size 16, group <= 16, the split
// length a multiple of the page size, num_splits <= 32.
#pragma once

#include "kvcore/device_utils.cuh"

namespace kvexp {

template <int HEADS_, int STAGES_ = 3>
struct PageMajorConfig {
  static constexpr int HEADS = HEADS_;   // KV heads a CTA serves, a warp each
  static constexpr int WARPS = HEADS;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int D = 128, TD = D / 8;  // 16-byte chunks a row
  static constexpr int PAGE = 16;            // tokens a stage (one page)
  static constexpr int STAGES = STAGES_;
  static constexpr int HEAD_TILE = PAGE * D;            // elements of one head's page in a stage
  static constexpr int STAGE_ELEMS = HEADS * HEAD_TILE;  // per tensor
  static constexpr int LOADS = PAGE * HEADS * TD / THREADS;  // 16-byte copies a thread a tensor a page (8)
  static constexpr size_t SMEM_BYTES = size_t(STAGES) * STAGE_ELEMS * 2 * 2;
  static_assert(LOADS * THREADS == PAGE * HEADS * TD, "a page's copies divide evenly");
};

struct PageMajorParams {
  const void* q;  // [B, Hq, D] contiguous
  const void* k_cache;  // [pages, 16, Hkv, D] contiguous
  const void* v_cache;
  const int* block_table;  // [B, max_pages]
  const int* seq_lens;     // [B]
  void* out;               // [B, Hq, D]
  float* partial_out;      // [B, Hkv / HEADS, num_splits, HEADS * group, D]
  float* partial_lse;      // [B, Hkv / HEADS, num_splits, HEADS * group], log2 domain
  unsigned* counters;      // [B, Hkv / HEADS], zero between launches
  int num_kv_heads, group, num_pages, max_pages;
  int num_splits, split_tokens;  // split_tokens: a multiple of 16
  float scale;
};

// Element offset of chunk `chunk` of row `row` in a [16 rows][16 chunks] head tile, the chunks
// XOR-swizzled by row % 8 (ldmatrix's 8 rows then hit 8 different bank groups).
__device__ __forceinline__ int pm_swz(int row, int chunk) { return (row * 16 + (chunk ^ (row & 7))) * 8; }

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, 1) page_major_decode_kernel(const PageMajorParams p) {
  using kvcore::cp_async_16;
  constexpr int D = Cfg::D, TD = Cfg::TD, PAGE = Cfg::PAGE, STAGES = Cfg::STAGES, HEADS = Cfg::HEADS;
  constexpr int LOADS = Cfg::LOADS, THREADS = Cfg::THREADS, WARPS = Cfg::WARPS;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const sK = reinterpret_cast<T*>(smem_raw);
  T* const sV = sK + STAGES * Cfg::STAGE_ELEMS;

  const int hblk = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int group = p.group, kvh = hblk * HEADS + warp;  // this warp's KV head
  const int hq = p.num_kv_heads * group;

  const int seq_len = max(0, min(__ldg(p.seq_lens + b), p.max_pages * PAGE));
  const int start = split * p.split_tokens;  // page-aligned
  const int end = min(seq_len, start + p.split_tokens);
  const int npages = start < end ? (end - start + PAGE - 1) / PAGE : 0;
  const int* bt = p.block_table + int64_t(b) * p.max_pages + start / PAGE;

  // Copy slot j of this thread: chunk tid + j * THREADS of the CTA's share of a page, i.e. token
  // row0 + j * ROW_STEP, head (tid / TD) % HEADS, chunk tid % TD. Consecutive threads copy
  // consecutive 16 bytes of the cache: a warp two heads' rows, the CTA's threads HEADS x 256
  // contiguous bytes of a token (the whole token at HEADS = Hkv).
  constexpr int ROW_STEP = THREADS / (HEADS * TD);
  const int copy_chunk = tid % TD, copy_head = (tid / TD) % HEADS, row0 = tid / (HEADS * TD);
  const int64_t row_stride = int64_t(p.num_kv_heads) * D;  // elements between a page's tokens
  const int64_t page_stride = PAGE * row_stride;
  const int64_t src_off = int64_t(row0) * row_stride + int64_t(hblk * HEADS + copy_head) * D + copy_chunk * 8;
  const T* const kc = static_cast<const T*>(p.k_cache);
  const T* const vc = static_cast<const T*>(p.v_cache);
  auto issue_page = [&](int t, int page) {
    const int stage = t % STAGES;
    const int64_t base = int64_t(min(max(page, 0), p.num_pages - 1)) * page_stride + src_off;
    const int left = end - (start + t * PAGE);  // valid rows of this page from row 0
#pragma unroll
    for (int j = 0; j < LOADS; ++j) {
      const int row = row0 + j * ROW_STEP;
      const int s_off = stage * Cfg::STAGE_ELEMS + copy_head * Cfg::HEAD_TILE + pm_swz(row, copy_chunk);
      const int64_t g_off = base + int64_t(j * ROW_STEP) * row_stride;
      cp_async_16(sK + s_off, kc + g_off, row < left);
      cp_async_16(sV + s_off, vc + g_off, row < left);
    }
  };
  // The block table entry of each page, read one page before its copies are issued.
  auto page_at = [&](int t) { return t < npages ? __ldg(bt + t) : 0; };

  int next_page = page_at(0);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < npages) issue_page(s, next_page);
    kvcore::cp_async_commit();
    next_page = page_at(s + 1);
  }

  // Query fragments (A operand of m16n8k16, rows = the group's heads padded to 16), kept in
  // registers: qa[k][0..3] = rows r0 / r0 + 8, columns 16k + cpair (+1) and 16k + 8 + cpair (+1).
  const int r0 = lane >> 2, cpair = (lane & 3) * 2;
  const T* const qh = static_cast<const T*>(p.q) + (int64_t(b) * hq + int64_t(kvh) * group) * D;
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int k = 0; k < D / 16; ++k) {
    const int c0 = 16 * k + cpair;
    qa[k][0] = r0 < group ? __ldg(reinterpret_cast<const uint32_t*>(qh + r0 * D + c0)) : 0u;
    qa[k][1] = r0 + 8 < group ? __ldg(reinterpret_cast<const uint32_t*>(qh + (r0 + 8) * D + c0)) : 0u;
    qa[k][2] = r0 < group ? __ldg(reinterpret_cast<const uint32_t*>(qh + r0 * D + c0 + 8)) : 0u;
    qa[k][3] = r0 + 8 < group ? __ldg(reinterpret_cast<const uint32_t*>(qh + (r0 + 8) * D + c0 + 8)) : 0u;
  }

  const float s_scale = p.scale * kvcore::kLog2e;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  for (int t = 0; t < npages; ++t) {
    kvcore::cp_async_wait<STAGES - 2>();
    __syncthreads();  // page t landed for every thread; stage (t - 1) % STAGES is free again
    if (t + STAGES - 1 < npages) issue_page(t + STAGES - 1, next_page);
    kvcore::cp_async_commit();
    next_page = page_at(t + STAGES);

    const T* kt = sK + (t % STAGES) * Cfg::STAGE_ELEMS + warp * Cfg::HEAD_TILE;
    const T* vt = sV + (t % STAGES) * Cfg::STAGE_ELEMS + warp * Cfg::HEAD_TILE;
    float s[2][4] = {};
#pragma unroll
    for (int k = 0; k < D / 16; k += 2) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        uint32_t bk[4];
        kvcore::ldmatrix_x4(bk, kt + pm_swz(nt * 8 + (lane & 7), k * 2 + (lane >> 3)));
        kvcore::mma_16816(s[nt], qa[k], bk[0], bk[1], T{});
        kvcore::mma_16816(s[nt], qa[k + 1], bk[2], bk[3], T{});
      }
    }
    const int tok0 = start + t * PAGE + cpair;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = tok0 + nt * 8 + (i & 1) < end ? s[nt][i] * s_scale : -INFINITY;
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx = fmaxf(mx, m[r]);
      const float base = mx == -INFINITY ? 0.f : mx;
      alpha[r] = exp2f(m[r] - base);
      m[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          s[nt][2 * r + j] = exp2f(s[nt][2 * r + j] - base);
          sum += s[nt][2 * r + j];
        }
      l[r] = l[r] * alpha[r] + sum;
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
    uint32_t pa[4];
    pa[0] = kvcore::pack2(s[0][0], s[0][1], T{});
    pa[1] = kvcore::pack2(s[0][2], s[0][3], T{});
    pa[2] = kvcore::pack2(s[1][0], s[1][1], T{});
    pa[3] = kvcore::pack2(s[1][2], s[1][3], T{});
#pragma unroll
    for (int nd = 0; nd < D / 16; ++nd) {
      uint32_t bv[4];
      kvcore::ldmatrix_x4_trans(bv, vt + pm_swz((lane & 7) + ((lane >> 3) & 1) * 8, nd * 2 + (lane >> 4)));
      kvcore::mma_16816(o[2 * nd], pa, bv[0], bv[1], T{});
      kvcore::mma_16816(o[2 * nd + 1], pa, bv[2], bv[3], T{});
    }
  }
  kvcore::cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  // This warp's rows are its KV head's query heads: rows r0 and r0 + 8 of the padded tile.
  const int64_t blk = int64_t(b) * (p.num_kv_heads / HEADS) + hblk;  // (sequence, head block)
  const int brows = HEADS * group;                                     // query heads of the block
  if (p.num_splits == 1) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = r0 + 8 * r;
      if (row >= group) continue;
      const float inv = l[r] == 0.f ? 0.f : 1.f / l[r];
      T* dst = static_cast<T*>(p.out) + (int64_t(b) * hq + int64_t(kvh) * group + row) * D + cpair;
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<uint32_t*>(dst + n * 8) = kvcore::pack2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv, T{});
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
  __syncthreads();  // every partial stored before thread 0's release
  __shared__ bool is_last;
  if (tid == 0) is_last = kvcore::atomic_add_acq_rel_gpu(p.counters + blk, 1u) == unsigned(p.num_splits - 1);
  __syncthreads();
  if (!is_last) return;

  // The last CTA of the (sequence, head block) combines every query head's partials. A thread's
  // items (4 columns of one head) are tid + k x THREADS; their partials are loaded KB items x SB
  // splits at a time (32 float4 in flight), the first batch before the lse round trip so the two
  // overlap (the merge is on the critical path: it starts after the pair's last split). The
  // weights of each split per head go through shared memory ([brows][num_splits + 1], the sum
  // last). Since THREADS is a multiple of D / 4, item k's head is k x THREADS / (D / 4) heads
  // after item 0's at the same columns: the addresses step by constant strides.
  constexpr int KB = 4, SB = 8;
  const int ns = p.num_splits;
  float* const wgt = reinterpret_cast<float*>(smem_raw);  // the ring is free: every copy waited for
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
  load_batch(0, 0);

  const float* plse = p.partial_lse + blk * ns * brows;
  for (int h = warp; h < brows; h += WARPS) {
    const float x = lane < ns ? __ldcg(plse + lane * brows + h) : -INFINITY;
    float mx = x;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    const float base = mx == -INFINITY ? 0.f : mx;
    const float e = lane < ns ? exp2f(x - base) : 0.f;
    if (lane < ns) wgt[h * (ns + 1) + lane] = e;
    const float sum = kvcore::group_sum<32>(e);
    if (lane == 0) wgt[h * (ns + 1) + ns] = sum;
  }
  __syncthreads();
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
      *reinterpret_cast<uint2*>(dst) = make_uint2(kvcore::pack2(acc[kk].x * inv, acc[kk].y * inv, T{}),
                                                  kvcore::pack2(acc[kk].z * inv, acc[kk].w * inv, T{}));
    }
  }
  if (tid == 0) p.counters[blk] = 0u;  // ready for the next launch
}

}  // namespace kvexp
