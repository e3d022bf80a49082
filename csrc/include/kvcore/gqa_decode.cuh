// Paged GQA decode on tensor cores (flash-decoding, with the split merge fused into the last CTA).
//
// One CTA per (KV head, KV split, sequence) computes all query heads of the KV group at once, so
// each cached K/V byte is read from memory once. The group's queries (1..16 heads) are padded to
// the 16 rows of an mma.sync m16n8k16 tile: decode does only ~2 * group FLOPs per cached byte, so
// the padding is free on tensor cores, while doing the same products on CUDA cores costs more
// instructions per byte than a Hopper SM can issue at full memory bandwidth.
//
// Memory pipeline: K/V tiles of TILE tokens stream through a STAGES-deep shared-memory ring
// filled by 16-byte cp.async (zero-filled past the end); the page of every row a thread copies is
// fetched one tile ahead, so the dependent block_table read never stalls the copy issue. Rows are
// stored with their 16-byte chunks XOR-swizzled by (row % 8), so the ldmatrix reads of 8 rows hit
// 8 different bank groups.
//
// Compute: each warp takes 16 tokens of a tile: S = Q K^T (16 heads x 16 tokens, fp32), an
// online-softmax update per head row, then O += P V with P re-packed from the S accumulators as
// the next mma's A operand. The warps' (m, l, O) states are merged through shared memory. A CTA
// has 4 warps (64-token tiles, two CTAs per SM at D 128), or 8 (128-token tiles in a ring of 2,
// one CTA per SM: the launcher's choice when about one (sequence, KV head) pair per SM fills the
// GPU unsplit).
//
// When the KV range is split (num_splits > 1), each CTA writes a normalised partial output and
// its log2-sum-exp into the workspace, bumps a per-(sequence, KV head) counter, and the CTA that
// arrives last merges all partials and resets the counter, so no second launch is needed and the
// workspace is ready for the next call.
//
// H2O score (the SCORE kernels): every attended key's probability, summed over the group, is
// added into a score buffer. The loop stores each 16-key block's unnormalised P (fp16) and base;
// the probabilities need each head's final lse, so either every CTA waits for its pair's other
// splits (a cooperative one-wave grid), then reads its own P back and adds its keys' share (the
// fused epilogue, default), or a second kernel does it for all keys (decode_score.cuh).
#pragma once

#include <cuda.h>  // CUtensorMap
#include <math.h>
#include <stdint.h>

#include "kvcore/device_utils.cuh"
#include "kvcore/split_range.h"
#include "kvcore/wgmma.cuh"  // swz128_offset; on sm_90a the mbarrier and TMA helpers

namespace kvcore {

struct GqaDecodeParams {
  const void* q;  // [B, Hq, D], last dim contiguous
  int64_t q_stride_b, q_stride_h;
  const void* k_cache;  // [pages, page_size, Hkv, D], inner three dims dense
  const void* v_cache;
  int64_t k_page_stride, v_page_stride;  // elements between pages
  const int* block_table;                // [B, max_pages]
  const int* seq_lens;                   // [B]
  void* out;                             // [B, Hq, D] contiguous
  float* lse;                            // [B, Hq] or nullptr (natural log)
  // split-KV scratch (only used when num_splits > 1)
  float* partial_out;  // [B, Hkv, num_splits, group, D]
  float* partial_lse;  // [B, Hkv, num_splits, group], log2 domain
  unsigned* counters;  // [B, Hkv], zero between launches
  int num_kv_heads, group, page_size, page_shift, num_pages, max_pages;  // page_shift < 0: not a power of 2
  int num_splits, split_tokens;  // split_tokens: the most KV positions a split takes (split_range.h), a multiple of the tile
  int window_left;               // < 0: none
  float scale;                   // softmax scale
  float soft_cap;                // > 0: logits = cap * tanh(scale q.k / cap)
  // Block-sparse mode (the SPARSE kernels only): each (sequence, KV head) attends to the tokens
  // of a list of its logical pages. Positions are then virtual: v -> list entry v / page_size.
  const int* sel_pages;   // [B, Hkv, max_sel] logical page numbers
  const int* sel_counts;  // [B, Hkv]
  int max_sel;
  // Page groups: when consecutive copy slots of a thread lie in one page (the page size and the
  // CTA's first position are multiples of their row span), only the first looks the page up (list
  // entry and block_table entry) and computes addresses; the others step on from it. Nonzero asks
  // for it where the page size and alignment allow (both ops; an A/B switch each). Read by the
  // launcher, which picks the kernel's SPP (paged_decode::page_groups).
  int dedup_pages;
  // Per-CTA timestamps for bench/experiments/decode_trace.cu, compiled in only with
  // KVCORE_DECODE_TRACE (the library never sets them): entry, first tile landed, loop done,
  // exit, the first tiles' copies issued, the split arrival counted (split CTAs), the SM's id
  // (a value, not a time), then the time each of the first trace_tiles tiles landed.
  unsigned long long* trace;  // [grid CTAs][kDecodeTraceFixed + trace_tiles]
  int trace_tiles;
  // H2O score accumulation (the SCORE kernels only; workspace scratch). Keys are numbered from
  // the window start and grouped in blocks of 16 (one warp's share of a tile). For every attended
  // block and query head g: P = exp2(logit - base) as fp16 at score_probs[((pair * score_blocks +
  // block) * group + g) * 16 + key % 16] and the block's base at score_bases[(pair *
  // score_blocks + block) * group + g]; each head's final log2-sum-exp in score_lse2 [B * Hq].
  // The epilogue kernel (decode_score.cuh) turns them into probabilities after the split merge.
  __half* score_probs;
  float* score_bases;
  float* score_lse2;
  int64_t score_blocks;  // blocks per (sequence, KV head)
  int score_l2;          // L2Priority of the P / base stores (and the epilogue's loads of them)
  // Fused score epilogue (score_fused != 0; the launcher's choice, see paged_decode::launch): no
  // epilogue kernel. Each CTA adds its own keys' probabilities into `score` once its heads' final
  // lse is known: at once with one split, else after every split of its pair has published its
  // partial lse (all CTAs of the grid are resident: a cooperative launch), reading its P back
  // from the scratch through shared memory (GqaDecodeConfig::SMEM_STAGE), or, with
  // score_p_local, from where it kept it in shared memory.
  int score_fused;
  // With score_fused: nonzero keeps the CTA's P and bases in its own shared memory past the ring
  // (GqaDecodeConfig::SMEM_BYTES on, laid out as the staging area's first two regions) instead of
  // the scratch: in the fused epilogue a CTA adds only its own keys, so P need not leave the SM.
  // The launcher sets it where that room keeps the CTAs per SM (paged_decode::launch).
  int score_p_local;
  float* score;             // [B, Hkv, score_len] fp32
  int64_t score_len;
  unsigned* departures;     // [B, Hkv], zero between launches: CTAs past the wait (splits > 1)
  // The head kernel's ORDER instances: nonzero skips the sort, so the list keeps the table's
  // order (an A/B switch, KVCORE_DECODE_PAGE_ORDER=unsorted: what the ORDER kernel costs apart
  // from its sort, on a table already in cache order).
  int order_skip_sort;
};

constexpr int kDecodeTraceFixed = 13;  // GqaDecodeParams::trace's slots before the tiles'
#ifdef KVCORE_DECODE_TRACE
#define KVCORE_TRACE_VALUE(p, slot, value)                                                      \
  do {                                                                                          \
    if ((p).trace != nullptr && threadIdx.x == 0) {                                             \
      const size_t cta_ = blockIdx.x + size_t(gridDim.x) * (blockIdx.y + size_t(gridDim.y) * blockIdx.z); \
      (p).trace[cta_ * (kDecodeTraceFixed + (p).trace_tiles) + (slot)] = (value);              \
    }                                                                                           \
  } while (0)
__device__ __forceinline__ unsigned long long trace_smid() {
  unsigned id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}
#define KVCORE_TRACE(p, slot)                                  \
  do {                                                         \
    unsigned long long t_;                                     \
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));     \
    KVCORE_TRACE_VALUE(p, slot, t_);                           \
  } while (0)
// The time once `dep` (a float) has arrived: the timer read waits for it.
#define KVCORE_TRACE_AFTER(p, slot, dep)                                        \
  do {                                                                          \
    unsigned long long t_;                                                      \
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_) : "f"(dep));           \
    KVCORE_TRACE_VALUE(p, slot, t_);                                            \
  } while (0)
#else
#define KVCORE_TRACE_AFTER(p, slot, dep) \
  do {                                   \
  } while (0)
#define KVCORE_TRACE_VALUE(p, slot, value) \
  do {                                     \
  } while (0)
#define KVCORE_TRACE(p, slot) \
  do {                        \
  } while (0)
#endif

// The most pages a CTA of the ORDER kernels sorts (gqa_decode_body): its split's pages, at most
// split_tokens / page_size of them (the launcher takes those kernels only where that fits), each
// a packed 32-bit entry (cache page << 10 | index in the split), so also fewer than 1024.
constexpr int kOrderMaxPages = 512;
constexpr int kOrderIndexBits = 10;
constexpr int64_t kOrderMaxCachePages = int64_t(1) << (32 - kOrderIndexBits);

// STAGES_ = 0 picks the ring depth from the head dim (the library's choice); experiments may
// force another. WARPS_: 4, or 8 (paged_decode::use_wide_decode; D 128 with 2 or 3 stages only).
// MIN_SMEM_: launch with at least this many bytes of dynamic shared memory (launch_smem; the
// kernel's layout does not change), which caps the CTAs an SM holds: a shallower ring that keeps
// the deeper ring's occupancy, and with it the launcher's split plan (paged_decode::NarrowRingConfig).
template <int D_, int STAGES_ = 0, int WARPS_ = 4, size_t MIN_SMEM_ = 0>
struct GqaDecodeConfig {
  static constexpr int D = D_;
  static constexpr int WARPS = WARPS_;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int ROWS = 16;                 // query rows of an mma tile (group padded up)
  static constexpr int WARP_TOKENS = 16;          // tokens per warp per tile
  static constexpr int TILE = WARPS * WARP_TOKENS;
  static constexpr int TD = D / 8;                // 16-byte chunks per row
  static constexpr int STAGES = STAGES_ > 0 ? STAGES_ : (D <= 64 ? 4 : (D <= 128 ? 3 : 2));
  static constexpr int LOADS = TILE * TD / THREADS;  // 16-byte copies per thread per tensor per tile
  // Copy slots: each 128 threads fill 64 rows of the tile (the 4-warp tile; 8 warps fill two),
  // a thread's slot i copying row row0 + i * STEP, so a pair of slots spans 2 * STEP rows (16 at
  // D 128) whatever the warp count, and page groups (SPP) work at page 16 for 8 warps too.
  static constexpr int COPY_THREADS = 128;
  static constexpr int STEP = COPY_THREADS / TD;
  static constexpr size_t SMEM_Q = size_t(ROWS) * D * 2;
  static constexpr size_t SMEM_TILES = size_t(STAGES) * TILE * D * 2 * 2;
  // The warps' states at the end: o rows of MERGE_STRIDE floats (D + 8: a warp's stores of
  // 8 rows x 4 column pairs then fill two bank wavefronts instead of eight), then m and l.
  static constexpr int MERGE_STRIDE = D + 8;
  static constexpr size_t SMEM_MERGE = size_t(WARPS) * ROWS * (MERGE_STRIDE + 2) * sizeof(float);
  static constexpr size_t SMEM_BYTES = SMEM_Q + (SMEM_TILES > SMEM_MERGE ? SMEM_TILES : SMEM_MERGE);
  // Fused score epilogue: where a CTA stages its keys' P, bases and old score values
  // (score_stage_bytes) once the loop is done: from the end of the merge area to the end of the
  // ring, or of a launch of MIN_SMEM_ bytes if that is further (paged_decode::WideScoreConfig).
  // (The score kernels keep nothing after SMEM_BYTES: they are not SPARSE, ORDER or TMA.)
  static constexpr size_t SMEM_LAUNCH_ROOM = MIN_SMEM_ > SMEM_Q ? MIN_SMEM_ - SMEM_Q : 0;
  static constexpr size_t SMEM_RING_ROOM = SMEM_TILES > SMEM_LAUNCH_ROOM ? SMEM_TILES : SMEM_LAUNCH_ROOM;
  static constexpr size_t SMEM_STAGE = SMEM_RING_ROOM > SMEM_MERGE ? SMEM_RING_ROOM - SMEM_MERGE : 0;
  // Block-sparse kernels also keep a validity byte per tile row (a selected page may lie past
  // seq_len or be the partial last page, anywhere in the list).
  static constexpr size_t SMEM_VALID = size_t(STAGES) * TILE;
  // ORDER kernels (pages visited in cache order): the validity bytes as above, then the CTA's
  // sorted page list (kOrderMaxPages packed entries, see gqa_decode_body).
  static constexpr size_t SMEM_ORDER = size_t(kOrderMaxPages) * 4;
  // TMA loader (gqa_decode_tma_kernel): one mbarrier per stage after the rest, and up to 1024
  // bytes to align the base (the 128-byte swizzle is a function of address bits 7-9, so each
  // box must land on a 1024-byte boundary for its rows to take the pattern ldmatrix expects).
  static constexpr size_t SMEM_TMA_ALIGN = 1024;
  static constexpr size_t smem_bytes(bool sparse, bool tma = false, bool order = false) {
    return SMEM_BYTES + (sparse || order ? SMEM_VALID : 0) + (order ? SMEM_ORDER : 0) +
           (tma ? SMEM_TMA_ALIGN + STAGES * 8 : 0);
  }
  // What a launch asks for: the layout's `used` bytes, at least MIN_SMEM_ (see above).
  static constexpr size_t launch_smem(size_t used) { return used > MIN_SMEM_ ? used : MIN_SMEM_; }

  static_assert(D % 32 == 0 && D >= 64 && D <= 256, "head_dim must be 64, 128 or 256");
  static_assert((TILE * TD) % THREADS == 0, "tile copies must divide evenly");
  static_assert(kOrderMaxPages % THREADS == 0 && size_t(TILE) * D * 2 >= SMEM_ORDER,
                "the page sort's elements divide over the threads; its scratch fits a stage's K tile");
  static_assert(THREADS % COPY_THREADS == 0 && LOADS * STEP * (THREADS / COPY_THREADS) == TILE,
                "each 128 threads' copy slots cover their 64 rows of the tile");
  static_assert(LOADS % 2 == 0 && TILE % (2 * STEP) == 0,
                "copy slots pair up within a tile (GqaDecodeParams::dedup_pages)");
};

// Bytes the fused score epilogue stages for a CTA of `split_tokens` keys (a multiple of 16) and
// `group` query heads: P (fp16, 16 keys x group per block), the blocks' bases (fp32, group per
// block) and the old score values (fp32 per key), each region 16-byte aligned.
__host__ __device__ constexpr size_t score_stage_p_bytes(int64_t split_tokens, int group) {
  return size_t(split_tokens / 16) * group * 32;
}
__host__ __device__ constexpr size_t score_stage_base_bytes(int64_t split_tokens, int group) {
  return (size_t(split_tokens / 16) * group * 4 + 15) / 16 * 16;
}
__host__ __device__ constexpr size_t score_stage_bytes(int64_t split_tokens, int group) {
  return score_stage_p_bytes(split_tokens, group) + score_stage_base_bytes(split_tokens, group) +
         size_t(split_tokens) * 4;
}
// ... plus each head's final lse2 after them (16 floats, the most heads a group has).
constexpr size_t kScoreLse2Bytes = 16 * 4;
__host__ __device__ constexpr size_t score_stage_total_bytes(int64_t split_tokens, int group) {
  return score_stage_bytes(split_tokens, group) + kScoreLse2Bytes;
}

// Splits whose partials (one float4 each) a thread of the last CTA has in flight at once during
// the split merge. 16 at D 64, whose 3 CTAs per SM leave 170 registers a thread (32 took it from
// 96 to 168). A split count past a multiple of it costs the merge another round trip on the
// critical path (session 18, call 4: B1 S131072's 33 splits, merge 3.6-4.1 us against 1.8-2.0
// at 32), so the launcher's automatic count avoids that (paged_decode::choose_splits). A batch
// of 36 at D 128 (33 splits in one) measured no faster than 32 splits (session 19, call 1: 127.5-
// 128.0 us against 127.2-127.5) and took the D 128 kernels to 196-211 registers.
template <int D>
constexpr int kMergeBatch = D <= 64 ? 16 : 32;

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][TD chunks] tile.
template <int TD>
__device__ __forceinline__ int swz(int row, int chunk) {
  return (row * TD + (chunk ^ (row & 7))) * 8;
}

// ---- one warp's P V step over 16 keys, shared by gqa_decode_kernel and the page-major kernel
// (gqa_decode_page_major.cuh), after tile_softmax_update (device_utils.cuh) ----------------------

// O = alpha O + P V for the tile: P (16 heads x 16 keys) is the S accumulator re-packed as an A
// fragment; V's 16 rows start at row0 of the shared tile vt, whose layout tile_off(row, chunk)
// gives (the element offset of 16-byte chunk `chunk` of row `row`).
template <typename T, int D, typename TileOff>
__device__ __forceinline__ void tile_pv_update(float (&o)[D / 8][4], const float (&s)[2][4], const float (&alpha)[2],
                                               const T* vt, int row0, int lane, TileOff tile_off) {
  tile_rescale(o, alpha);
  uint32_t pa[4];
  tile_pack_p<T>(pa, s);
#pragma unroll
  for (int nd = 0; nd < D / 16; ++nd) {
    uint32_t bv[4];
    ldmatrix_x4_trans(bv, vt + tile_off(row0 + (lane & 7) + ((lane >> 3) & 1) * 8, nd * 2 + (lane >> 4)));
    mma_16816(o[2 * nd], pa, bv[0], bv[1], T{});
    mma_16816(o[2 * nd + 1], pa, bv[2], bv[3], T{});
  }
}

// ---- the split merge's weights, shared by gqa_decode_kernel and the page-major kernel ----------
// Query head h's weights over its ns split partials, a lane per split (lane, lane + 32, ...),
// once each lane's entries hold the splits' partial log2-sum-exps at wgt[h * (ns + 1) + s] and
// mx is their largest: wgt's entries become exp2(lse_s - base), base the warp's largest lse (0
// when every split is empty); returns {base, the weights' sum} in every lane. Each lane touches
// only its own entries, so no barrier is needed in between.
__device__ __forceinline__ float2 split_merge_weights(float mx, int h, int ns, int lane, float* wgt) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  const float base = mx == -INFINITY ? 0.f : mx;
  float sum = 0.f;
  for (int s = lane; s < ns; s += 32) {
    const float e = exp2f(wgt[h * (ns + 1) + s] - base);
    wgt[h * (ns + 1) + s] = e;
    sum += e;
  }
  sum = group_sum<32>(sum);
  return make_float2(base, sum);
}

// The K and V caches as TMA tensor maps (gqa_decode_tma_kernel): 3-D, innermost first
// (num_kv_heads x D columns, page_size rows, pages), boxes of 64 columns x min(page_size, TILE)
// rows x 1 page with the 128-byte swizzle. Built on the host per call (paged_decode::launch).
struct GqaDecodeTmaMaps {
  CUtensorMap k;
  CUtensorMap v;
};

// ---- the ORDER kernels' page sort -------------------------------------------------------------
// A CTA's kOrderMaxPages packed entries (cache page << kOrderIndexBits | index in the split) sit
// blocked over its threads: element i = tid * E + s is slot s of thread tid's v (E =
// kOrderMaxPages / THREADS), so that warp w holds the chunk of elements w * 32E .. (w + 1) * 32E - 1.
// The sort runs in two phases:
//  1. each warp sorts its own chunk in registers with a bitonic network, unrolled at compile time
//     (21 steps at 8 warps, 28 at 4; partners less than E apart in one thread, the rest shuffles);
//  2. the sorted chunks go to shared memory, one barrier, and each entry's place in the whole list
//     is the number of entries smaller than it: its own place in its chunk plus a binary search in
//     each other chunk (the entries are distinct, so these places are a permutation).
// Why this shape: the time it takes sits between a CTA's first copies and the rest (B16 random,
// 512-entry splits at 8 warps), and the kernel's code size shows in the bench's short rows.
// Session 40 replaced a strided layout (7-9 shared-memory steps, 3.8 us a CTA at 8 warps) by the
// blocked one with the whole 45-step network per size unrolled: 2,754 cycles for 512 entries at
// 8 warps, but the bf16 4-warp ORDER kernel's code doubled (59 -> 120 KB) and the bench's B1
// S32768 lost ~2.5 us a call (instruction fetch, cold after the bench's other kernels, is the
// suspect; decode_trace never showed it). Session 41's run-time loop over the same network kept
// the code small but took 5,157 cycles. Here one fixed 32E-entry network plus 7 (3) searches of
// 7 (8) loads per entry, with one barrier instead of six (three). Session 42 (H100): 512 entries
// 3,167 cycles a CTA at 8 warps, 3,145 at 4; 64 entries 1,470 / 1,486 (the loop 2,759 / 2,951).
// The bf16 ORDER kernels' code: 4 warps 61 -> 78 KB, 8 warps 58 -> 66 KB.

// Sorts the first cnt entries of v (0 <= cnt <= kOrderMaxPages; the entries from cnt on must be
// pads, 0xFFFFFFFF, and those before it distinct and smaller, as the packing makes them) and stores
// them ascending at list[0 .. cnt - 1], pads at list[cnt ..]. `scratch`: kOrderMaxPages words of
// shared memory (not list). Every thread must call it; the caller's barrier must follow before
// list is read.
template <int THREADS>
__device__ __forceinline__ void sort_page_entries(uint32_t (&v)[kOrderMaxPages / THREADS], int cnt, uint32_t* scratch,
                                                  uint32_t* list) {
  constexpr int E = kOrderMaxPages / THREADS;
  constexpr int LOGE = E == 1 ? 0 : E == 2 ? 1 : E == 4 ? 2 : E == 8 ? 3 : E == 16 ? 4 : -1;
  static_assert((THREADS & (THREADS - 1)) == 0 && LOGE >= 0 && THREADS >= 32,
                "the partner of element i is i ^ j: powers of two, at least a warp");
  constexpr int CHUNK = 32 * E, LOGC = LOGE + 5, CHUNKS = THREADS / 32;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int i0 = tid * E;              // this thread's first element
  const int c0 = (tid & 31) * E;       // ... and its place in the warp's chunk
  // Already ascending (a row of an in-order table, or one a host sorted): stored as it is, for two
  // barriers. Each thread's slots in order, and its last no greater than the next thread's first
  // (read through `scratch`, which phase 2 overwrites only after the second barrier).
  scratch[tid] = v[0];
  __syncthreads();
  bool ascending = tid + 1 == THREADS || v[E - 1] <= scratch[tid + 1];
#pragma unroll
  for (int sl = 0; sl + 1 < E; ++sl) ascending &= v[sl] <= v[sl + 1];
  if (__syncthreads_and(ascending)) {
#pragma unroll
    for (int sl = 0; sl < E; ++sl) list[i0 + sl] = v[sl];
    return;
  }
  // Phase 1. Sequences of 1 << lk elements, partners 1 << lj apart: element i keeps the smaller of
  // its pair where its bit lj equals its bit lk (ascending runs where bit lk is clear), else the
  // larger. Only the sizes the chunk's entries need (logm: warp-uniform, so the shuffles' warp is
  // whole); the pads after them are equal, whatever order they end in.
  const int m = min(max(cnt - warp * CHUNK, 0), CHUNK);
  const int logm = m <= 1 ? 0 : 32 - __clz(m - 1);
#pragma unroll
  for (int lk = 1; lk <= LOGC; ++lk) {
    if (lk > logm) break;
#pragma unroll
    for (int lj = lk - 1; lj >= 0; --lj) {
      if (lj >= LOGE) {  // partner in lane ^ (1 << (lj - LOGE)), slot for slot
        const bool take_min = (((c0 >> lj) ^ (c0 >> lk)) & 1) == 0;
#pragma unroll
        for (int sl = 0; sl < E; ++sl) {
          const uint32_t w = __shfl_xor_sync(0xffffffffu, v[sl], 1 << (lj - LOGE));
          v[sl] = take_min ? min(v[sl], w) : max(v[sl], w);
        }
      } else {  // partner in this thread
#pragma unroll
        for (int sl = 0; sl < E; ++sl) {
          if (sl & (1 << lj)) continue;
          const bool up = (((c0 + sl) >> lk) & 1) == 0;
          const uint32_t a = v[sl], b = v[sl | (1 << lj)];
          v[sl] = up ? min(a, b) : max(a, b);
          v[sl | (1 << lj)] = up ? max(a, b) : min(a, b);
        }
      }
    }
  }
  if (cnt <= CHUNK) {  // warp 0's chunk holds every entry (the other chunks are all pads)
#pragma unroll
    for (int sl = 0; sl < E; ++sl) list[i0 + sl] = v[sl];
    return;
  }
  // Phase 2. An entry's place: its place in its chunk plus, in every other chunk, how many entries
  // are smaller (lower bound: the greedy bit search finds min(count, CHUNK - 1), the last load
  // settles CHUNK). Pads keep their places (>= cnt: a chunk's pads stay at its end).
#pragma unroll
  for (int sl = 0; sl < E; ++sl) scratch[i0 + sl] = v[sl];
  __syncthreads();
  int rank[E];
#pragma unroll
  for (int sl = 0; sl < E; ++sl) rank[sl] = c0 + sl;
#pragma unroll
  for (int c = 0; c + 1 < CHUNKS; ++c) {
    const uint32_t* const a = scratch + (c < warp ? c : c + 1) * CHUNK;  // the other chunks
    const uint32_t* q[E];
#pragma unroll
    for (int sl = 0; sl < E; ++sl) q[sl] = a;
#pragma unroll
    for (int step = CHUNK / 2; step >= 1; step >>= 1)
#pragma unroll
      for (int sl = 0; sl < E; ++sl) q[sl] += q[sl][step - 1] < v[sl] ? step : 0;
#pragma unroll
    for (int sl = 0; sl < E; ++sl) rank[sl] += int(q[sl] - a) + (q[sl][0] < v[sl] ? 1 : 0);
  }
#pragma unroll
  for (int sl = 0; sl < E; ++sl) list[i0 + sl < cnt ? rank[sl] : i0 + sl] = v[sl];
}

// The ORDER kernels' page list in two steps, so that the table entries land while a CTA issues
// its first copies. load_order_entries: the block_table entries of the split's pages from p0
// (element i = tid * E + s, slot s, holds page p0 + i, clamped into the table; zeros where `any`
// is false: an empty range or table). sort_split_pages: packs elements first .. count - 1 of
// those pages (count: the split's pages, first: those it visits in the table's order, so element
// i holds split page first + i) as cache page << kOrderIndexBits | index from the split's start,
// pads (0xFFFFFFFF) after them, sorts them into the list (sort_page_entries, with `scratch` its
// buffer; unless `sort` is false, which stores the table's order; entry i at list[i]),
// ending at a barrier: the list is whole and `scratch` free again. Every thread must call both.
template <int THREADS>
__device__ __forceinline__ void load_order_entries(int (&raw)[kOrderMaxPages / THREADS], const int* bt, int p0,
                                                   int max_pages, bool any) {
  constexpr int E = kOrderMaxPages / THREADS;
#pragma unroll
  for (int sl = 0; sl < E; ++sl)
    raw[sl] = any ? __ldg(bt + min(p0 + int(threadIdx.x) * E + sl, max_pages - 1)) : 0;
}

template <int THREADS>
__device__ __forceinline__ void sort_split_pages(const int (&raw)[kOrderMaxPages / THREADS], int first, int count,
                                                 int num_pages, uint32_t* scratch, uint32_t* list,
                                                 bool sort = true) {
  constexpr int E = kOrderMaxPages / THREADS;
  const int i0 = int(threadIdx.x) * E;
  uint32_t v[E];
#pragma unroll
  for (int sl = 0; sl < E; ++sl) {
    const int j = first + i0 + sl;
    v[sl] = j < count ? uint32_t(min(max(raw[sl], 0), num_pages - 1)) << kOrderIndexBits | uint32_t(j) : 0xFFFFFFFFu;
  }
  if (sort) {
    sort_page_entries<THREADS>(v, max(count - first, 0), scratch, list);
  } else {
#pragma unroll
    for (int sl = 0; sl < E; ++sl) list[i0 + sl] = v[sl];
  }
  __syncthreads();
}

// SPARSE = false: gqa_decode (a contiguous range of the sequence). SPARSE = true:
// block_sparse_decode (the tokens of the pages listed for the pair, in list order).
// SCORE = true (gqa_decode with an H2O score buffer; not with SPARSE): also stores every attended
// key's unnormalised probability P and adds the probabilities into the score buffer itself (the
// fused epilogue) or leaves them, with each head's final log2-sum-exp, for the epilogue kernel;
// with SCORE = false none of that code exists.
// SPP (page groups): how many consecutive copy slots of a thread share one page lookup (1: every
// slot looks its page up; see "Page groups" below); the launcher picks it (page_groups).
// TMA (gqa_decode_tma_kernel, sm_90a; not with SPARSE; SPP unused): warp 0 loads each tile as a
// few TMA boxes (one per page segment, 64-column half and tensor) completing on the stage's
// mbarrier, instead of every thread issuing LOADS 16-byte cp.async per tensor after a page lookup
// each. The tiles are then 128-byte swizzled in 64-column halves (swz128_offset) rather than
// swz<TD>'s whole-row swizzle.
// ORDER (gqa_decode without score, window or TMA; pages of at most a tile, a power of two; a split
// of at most kOrderMaxPages pages): each CTA visits its split's pages in ascending cache order
// rather than the sequence's, except the first STAGES - 1 tiles' pages, whose copies it issues in
// the table's order and then sorts the rest while they land (sorting first cost ~1.5 us a CTA,
// session 30: B16 in-order 180.5 -> 182.0 us). Attention over a set of keys does not depend on
// their order, only the rounding does. Why: the same pages read through a random block table take
// ~2% longer than in order, and a random table with each sequence's row sorted is as fast as an
// in-order one (H100, session 30, decode_trace B16 S8192 Hq32 Hkv8 page 16: random 183.5 us,
// row-sorted 179.8, in order 179.0; runs of 2 / 8 / 16 / 64 consecutive pages in random order
// 182.3 / 181.6 / 180.7 / 179.3): the cost follows how scattered the SMs' concurrent reads are
// over the cache, and sorted CTAs sweep it together. Rows are then valid by their logical
// position, kept per row as SPARSE keeps it.
template <typename T, typename Cfg, bool SPARSE, bool SCORE, int SPP, bool TMA, bool ORDER = false>
__device__ __forceinline__ void gqa_decode_body(const GqaDecodeParams& p, [[maybe_unused]] const GqaDecodeTmaMaps* maps) {
  static_assert(!(SPARSE && SCORE), "score accumulation is a gqa_decode feature");
  static_assert(!(SPARSE && TMA), "the TMA loader is gqa_decode's");
  static_assert(!(ORDER && (SPARSE || SCORE || TMA)), "the page sort is plain gqa_decode's");
  static_assert(SPP >= 1 && Cfg::LOADS % SPP == 0 && (SPP & (SPP - 1)) == 0, "SPP: a power of two dividing LOADS");
  constexpr int D = Cfg::D, TD = Cfg::TD, TILE = Cfg::TILE, STAGES = Cfg::STAGES, LOADS = Cfg::LOADS;
  constexpr int ROWS = Cfg::ROWS, WARPS = Cfg::WARPS;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* const smem =
      TMA ? reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + Cfg::SMEM_TMA_ALIGN - 1) &
                                             ~uintptr_t(Cfg::SMEM_TMA_ALIGN - 1))
          : smem_raw;
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sK = reinterpret_cast<T*>(smem + Cfg::SMEM_Q);
  T* const sV = sK + STAGES * TILE * D;
  float* const sMerge = reinterpret_cast<float*>(smem + Cfg::SMEM_Q);  // reuses the ring at the end
  unsigned char* const sValid = smem + Cfg::SMEM_BYTES;                 // SPARSE, ORDER: [STAGES][TILE]
  // ORDER: the split's pages sorted, packed (cache page << kOrderIndexBits | index from start)
  [[maybe_unused]] uint32_t* const sOrder = reinterpret_cast<uint32_t*>(smem + Cfg::SMEM_BYTES + Cfg::SMEM_VALID);
  // SCORE with p.score_p_local: the CTA's P, then its blocks' bases, past the ring (the layout of
  // the staging area's first two regions, see stage_score).
  [[maybe_unused]] unsigned char* const s_pkeep = smem + Cfg::SMEM_BYTES;
  [[maybe_unused]] float* const s_pkeep_bases =
      reinterpret_cast<float*>(s_pkeep + score_stage_p_bytes(p.split_tokens, p.group));
  // TMA: full[s] completes when stage s's boxes have landed (one arrival: warp 0's expect_tx).
  [[maybe_unused]] uint64_t* const full = reinterpret_cast<uint64_t*>(smem + Cfg::smem_bytes(SPARSE));
  // Element offset of chunk `chunk` of row `row` in a K or V tile (the two loaders' layouts).
  auto tile_off = [](int row, int chunk) {
    if constexpr (TMA)
      return swz128_offset(TILE, row, chunk);
    else
      return swz<TD>(row, chunk);
  };

  const int kvh = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  KVCORE_TRACE(p, 0);
  KVCORE_TRACE_VALUE(p, 6, trace_smid());
  [[maybe_unused]] uint64_t score_policy = 0;  // SCORE: L2 policy of the P / base stores
  if constexpr (SCORE) {
    // Let the epilogue grid launch as soon as every CTA of this one has started (programmatic
    // dependent launch); it waits for this grid's completion before reading anything.
    if (!p.score_fused) grid_launch_dependents();
    score_policy = l2_policy(p.score_l2);  // once, not per tile (createpolicy is volatile asm)
  }
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int group = p.group;
  if constexpr (TMA) {
    if (tid == 0) {
#pragma unroll
      for (int s = 0; s < STAGES; ++s) mbarrier_init(full + s, 1);
      fence_mbarrier_init();  // visible to the async proxy; the prologue's barrier orders the rest
    }
  }

  // ---- this CTA's KV range -------------------------------------------------------------------
  // Everything read from memory is clamped, so bad index contents give wrong numbers but never
  // an out-of-bounds access (the Python wrapper validates them when validation is on).
  // A split's range is [first + split * chunk, +chunk) within the attended keys [first, seq_len),
  // chunk = split_chunk(...) (split_range.h): split_tokens for a sequence that fills its block
  // table, less for a shorter one. Both depend on seq_len; without a sliding window the first
  // pages are fetched for the full-length start (split * split_tokens) before seq_len arrives,
  // so at full length the two loads overlap instead of chaining, and a shorter sequence's CTAs
  // fetch again from their own start.
  const int capacity = p.max_pages * p.page_size;
  const int seq_len_raw = __ldg(p.seq_lens + b);
  int start = split * p.split_tokens, end = 0;  // end: set once seq_len is known
  const int* bt = p.block_table + int64_t(b) * p.max_pages;
  // SPARSE: the pair's page list, and its length in virtual positions (clamped to the list).
  const int* sel = SPARSE ? p.sel_pages + (int64_t(b) * p.num_kv_heads + kvh) * p.max_sel : nullptr;
  const int sel_count = SPARSE ? min(max(__ldg(p.sel_counts + int64_t(b) * p.num_kv_heads + kvh), 0), p.max_sel) : 0;
  const T* const kbase = static_cast<const T*>(p.k_cache) + int64_t(kvh) * D;
  const T* const vbase = static_cast<const T*>(p.v_cache) + int64_t(kvh) * D;
  const int64_t row_stride = int64_t(p.num_kv_heads) * D;
  const int copy_chunk = tid % TD;  // every copy of this thread is the same chunk of its rows
  auto page_of = [&](int pos) { return p.page_shift >= 0 ? pos >> p.page_shift : pos / p.page_size; };
  auto in_page = [&](int pos) { return p.page_shift >= 0 ? pos & (p.page_size - 1) : pos % p.page_size; };
  // ORDER: the pages of the first STAGES - 1 tiles, which keep the table's order
  [[maybe_unused]] const int order_first = ORDER ? ((STAGES - 1) * TILE) >> p.page_shift : 0;

  // Page of each row this thread copies for tile t (read a tile ahead of the copies). Positions
  // are clamped to the block table, not to seq_len, so this can run before seq_len is known;
  // rows past seq_len are zero-filled by the copy whatever page they name. SPARSE: each row's
  // page goes through two dependent loads, its list entry and then the block_table entry it
  // names. The list entries are read one tile earlier still (fetch_list(t + 1) in
  // fetch_pages(t)), so neither load waits on the other in the loop: with both in one call,
  // every tile's fetch stalled its warp a full round trip before the tile's compute (13.6% +
  // 4.5% of the block-sparse B16 kernel's stall samples in session 11's ncu source profile).
  // The entries are clamped to the list (so they can be read before its count is known) and
  // kept in lpg, the entries of the tile `pages` holds, for the validity test at copy time.
  //
  // Page groups (SPP > 1): a thread's copy slots i and i + 1 are STEP rows apart. When SPP
  // consecutive slots (SPP x STEP rows, aligned) lie in one page, only the group's first slot,
  // its leader, looks the page up (list entry, block_table entry) and works
  // out the addresses and how many of the group's rows are valid; the others step on from it by
  // STEP rows. Session 11's profile of block-sparse B16 put ~35% of the samples on the copy
  // issue at ~55 instructions per slot, most of them a page lookup's clamps and 64-bit products
  // repeated for every slot of a page. Followers load nothing and copy no register a load is
  // still filling (a register copy of a load in flight waits for it: session 11's first form of
  // the pair dedup stalled twice per tile on such copies).
  constexpr int STEP = Cfg::STEP;
  // slot i copies row row0 + i * STEP of each tile (GqaDecodeConfig::STEP)
  const int row0 = (tid % Cfg::COPY_THREADS) / TD + (tid / Cfg::COPY_THREADS) * (Cfg::LOADS * STEP);
  // SPP is a template parameter (the launcher's page_groups): with a runtime group size every
  // slot became a uniform branch between the leader's and the follower's code, which cost the
  // slots' interleaving (session 12, call 1: gqa_decode B16 92.4% of copy with groups of 2, 82.7%
  // with groups of 1, against 93.3% for the straight-line per-slot code before).
  constexpr auto leads = [](int i) { return i % SPP == 0; };
  int lpg[SPARSE ? LOADS : 1];
  int lnext[SPARSE ? LOADS : 1];  // SPARSE: the list entries of the tile after lpg's
#pragma unroll
  for (int i = 0; i < (SPARSE ? LOADS : 1); ++i) lpg[i] = lnext[i] = -1;  // (followers' stay so)
  auto fetch_list = [&](int t) {
    if constexpr (SPARSE) {
#pragma unroll
      for (int i = 0; i < LOADS; ++i) {
        if (leads(i)) {
          const int j = min(page_of(start + t * TILE + row0 + i * STEP), p.max_sel - 1);
          lnext[i] = p.max_sel > 0 ? __ldg(sel + j) : -1;
        }
      }
    }
  };
  // ORDER: `listed` looks tile t's pages up in the sorted list, else in the block table (the first
  // STAGES - 1 tiles, copied while the list is sorted). Every call passes a constant.
  auto fetch_pages = [&](int t, int (&pg)[LOADS], bool listed) {
    if constexpr (SPARSE) {
#pragma unroll
      for (int i = 0; i < LOADS; ++i) lpg[i] = lnext[i];  // tile t's entries, read a call ago
#pragma unroll
      for (int i = 0; i < LOADS; ++i)
        if (leads(i)) pg[i] = capacity > 0 ? __ldg(bt + min(max(lpg[i], 0), p.max_pages - 1)) : 0;
      fetch_list(t + 1);
    } else if (ORDER && listed) {
      // the sorted list's entry for the row's page (0xFFFFFFFF past the list: an invalid row)
#pragma unroll
      for (int i = 0; i < LOADS; ++i) {
        if (leads(i)) {
          const int idx = ((t * TILE + row0 + i * STEP) >> p.page_shift) - order_first;
          pg[i] = int(unsigned(idx) < unsigned(kOrderMaxPages) ? sOrder[idx] : 0xFFFFFFFFu);
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < LOADS; ++i) {
        if (leads(i)) {
          const int pos = min(start + t * TILE + row0 + i * STEP, capacity - 1);
          pg[i] = capacity > 0 ? __ldg(bt + page_of(pos)) : 0;
        }
      }
    }
  };
  int seq_len = 0;
  const int64_t step_bytes = STEP * row_stride * int64_t(sizeof(T));
  auto issue_copies = [&](int t, const int (&pg)[LOADS], bool listed) {
    const int stage = t % STAGES;
    // The current slot's source rows (as byte addresses: a follower's step is then one 64-bit
    // add each), and how many rows of its group are valid from it on (valid iff left > 0).
    const char* ka = nullptr;
    const char* va = nullptr;
    int left = 0;
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int row = row0 + i * STEP;
      [[maybe_unused]] const int pos = start + t * TILE + row;
      if (leads(i)) {
        // In a group (SPP > 1) pos's own row keeps every follower's address inside the page;
        // alone, an invalid row takes the last valid one's (a legal address, never read).
        int in_pg;
        int64_t page;
        if (ORDER && listed) {
          // The entry names the cache page and its index from start, hence the row's logical
          // position (tiles and start are page-aligned here); a pad's index (1023) puts it past
          // the end, since a split has at most kOrderMaxPages < 1023 pages.
          const uint32_t e = uint32_t(pg[i]);
          in_pg = row & (p.page_size - 1);
          left = end - (start + (int(e & ((1u << kOrderIndexBits) - 1)) << p.page_shift) + in_pg);
          page = min(int64_t(e >> kOrderIndexBits), int64_t(p.num_pages) - 1);
        } else {
          in_pg = max(in_page(SPP > 1 ? pos : min(pos, end - 1)), 0);
          left = end - pos;
          if constexpr (SPARSE) {
            // A listed page outside the sequence attends nothing; the partial last page only its
            // first seq_len % page_size rows. (lp < max_pages keeps lp * page_size in int32.)
            const int lp = lpg[i];
            left = min(left, lp >= 0 && lp < p.max_pages ? seq_len - lp * p.page_size - in_pg : 0);
          }
          page = min(max(pg[i], 0), p.num_pages - 1);
        }
        const int64_t off = int64_t(in_pg) * row_stride + copy_chunk * 8;
        ka = reinterpret_cast<const char*>(kbase + page * p.k_page_stride + off);
        va = reinterpret_cast<const char*>(vbase + page * p.v_page_stride + off);
      } else {
        ka += step_bytes;
        va += step_bytes;
        left -= STEP;
      }
      const bool valid = left > 0;
      if constexpr (SPARSE || ORDER) {
        if (copy_chunk == 0) sValid[stage * TILE + row] = valid;
      }
      const int s_off = stage * TILE * D + swz<TD>(row, copy_chunk);
      cp_async_16(sK + s_off, ka, valid);
      cp_async_16(sV + s_off, va, valid);
    }
  };

  // ---- stage the group's queries (rows >= group zero-filled), then start the KV copies ---------
  // Q by cp.async, issued first and committed with tile 0's copies (the loop's first wait covers
  // it). It used to be loaded into registers and stored after the first tiles' copies were
  // issued: its requests queued behind them, and each thread's two pieces (D128) were two
  // dependent round trips; the per-SASS profile of block-sparse B1 (session 13, call 2) had 16%
  // of the stall samples on that store. (Times did not move: those warps had nothing else to do
  // before their first tile landed.)
  for (int i = tid; i < ROWS * TD; i += Cfg::THREADS) {
    const int row = i / TD, chunk = i % TD;
    const int qrow = row < group ? row : 0;  // zero-filled rows still name a legal address
    cp_async_16(sQ + swz<TD>(row, chunk),
                static_cast<const T*>(p.q) + int64_t(b) * p.q_stride_b + int64_t(kvh * group + qrow) * p.q_stride_h +
                    chunk * 8,
                row < group);
  }
  // TMA: a tile is `segs` segments of seg_rows = min(page_size, TILE) rows, each inside one page
  // (the launcher takes this loader only where page sizes divide the tile or are multiples of it,
  // without a window, so tiles start page-aligned). Lane l of warp 0 serves segment l % segs of
  // the (l / segs)-th tile of a call, and holds that segment's page, looked up one call ahead.
  [[maybe_unused]] const int seg_rows = TMA ? min(p.page_size, TILE) : 1;
  [[maybe_unused]] const int segs = TILE / seg_rows;
  [[maybe_unused]] const int tma_rel = lane / segs, tma_seg = lane - tma_rel * segs;
  [[maybe_unused]] int tma_page = 0;
  [[maybe_unused]] auto fetch_pages_tma = [&](int t0, int ntiles) {  // warp 0
    if (tma_rel < ntiles) {
      const int pos = min(start + (t0 + tma_rel) * TILE + tma_seg * seg_rows, capacity - 1);
      tma_page = capacity > 0 ? __ldg(bt + page_of(pos)) : 0;
    }
  };

  int pages[LOADS];
  // ORDER: the block_table entries of the split's pages after its first order_first (those of
  // the first STAGES - 1 tiles, visited in the table's order while the rest are sorted): element
  // i = tid * OE + s (slot s) is page order_first + i from start, clamped into the table.
  constexpr int OE = kOrderMaxPages / Cfg::THREADS;
  [[maybe_unused]] int order_raw[ORDER ? OE : 1];
  [[maybe_unused]] auto fetch_order = [&]() {
    if constexpr (ORDER)
      load_order_entries<Cfg::THREADS>(order_raw, bt, page_of(start) + order_first, p.max_pages, capacity > 0);
  };
  // The first pages (SPARSE: list entries, then pages) are fetched for the full-length start
  // before seq_len is known, except with a window, whose start depends on it (TMA has none).
  const bool early_pages = SPARSE || p.window_left < 0;
  if constexpr (TMA) {
    if (warp == 0) fetch_pages_tma(0, STAGES - 1);
  } else {
    if constexpr (SPARSE) fetch_list(0);
    if (early_pages) fetch_pages(0, pages, false);
    if constexpr (ORDER) fetch_order();
  }
  seq_len = min(max(seq_len_raw, 0), capacity);
  // first: the window's first key (0 without one; the score scratch numbers keys from it).
  // (A window's start is unaligned: the launcher then gives SPP = 1.) SPARSE: the keys are the
  // list's virtual positions, sel_count pages' worth.
  const int first = !SPARSE && p.window_left >= 0 ? max(0, seq_len - 1 - p.window_left) : 0;
  const int keys = SPARSE ? sel_count * p.page_size : seq_len - first;
  const int chunk = split_chunk(keys, p.num_splits, p.split_tokens, TILE);
  if (!early_pages || first + split * chunk != start) {
    start = first + split * chunk;
    if constexpr (TMA) {
      if (warp == 0) fetch_pages_tma(0, STAGES - 1);
    } else {
      if constexpr (SPARSE) fetch_list(0);  // (fetch_pages reads these entries: one more round trip)
      fetch_pages(0, pages, false);
      if constexpr (ORDER) fetch_order();
    }
  }
  end = min(first + keys, start + chunk);
  [[maybe_unused]] const int score_first = first;
  const int num_tiles = start < end ? (end - start + TILE - 1) / TILE : 0;

  // TMA (warp 0): tiles t0 .. t0 + ntiles - 1 that exist, each as its segments up to the end
  // (segments wholly past it are not loaded) x two 64-column halves (D / 64) x K and V, all
  // completing on the stage's mbarrier, whose one arrival carries the bytes to expect.
  [[maybe_unused]] auto issue_tma = [&](int t0, int ntiles) {
    const int t = t0 + tma_rel;
    const bool mine = tma_rel < ntiles && t < num_tiles;
    const int tile_pos = start + t * TILE;
    const int nseg = mine ? min(segs, (end - tile_pos + seg_rows - 1) / seg_rows) : 0;
    const int stage = t % STAGES;
    if (mine && tma_seg == 0)
      mbarrier_arrive_expect_tx(full + stage, uint32_t(nseg * seg_rows) * uint32_t(D * 2 * sizeof(T)));
    __syncwarp();  // each tile's expected bytes are set before its boxes are issued
    if (tma_seg < nseg) {
      const int page = min(max(tma_page, 0), p.num_pages - 1);
      const int row = in_page(tile_pos);  // 0 unless page_size > TILE
      T* const dk = sK + stage * TILE * D + tma_seg * seg_rows * 64;
      T* const dv = sV + stage * TILE * D + tma_seg * seg_rows * 64;
#pragma unroll
      for (int h = 0; h < D / 64; ++h) {
        tma_load_3d(dk + h * TILE * 64, &maps->k, kvh * D + h * 64, row, page, full + stage);
        tma_load_3d(dv + h * TILE * 64, &maps->v, kvh * D + h * 64, row, page, full + stage);
      }
    }
  };

  if constexpr (TMA) {
    cp_async_commit();  // Q's group
    __syncthreads();    // the mbarriers' initialisation is visible to every thread
    if (warp == 0) {
      issue_tma(0, STAGES - 1);
      fetch_pages_tma(STAGES - 1, 1);
    }
  } else {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < num_tiles) issue_copies(s, pages, false);
      cp_async_commit();
      if (!ORDER || s + 1 < STAGES - 1) fetch_pages(s + 1, pages, false);
    }
  }
  if constexpr (ORDER) {
    // The split's pages after the first order_first, sorted by cache page (no ties: the index is
    // in the entry), pads after them, while the first tiles' copies are in flight. The sort's
    // scratch is the ring's last stage, which the loop fills first.
    const int n = start < end ? (end - start + p.page_size - 1) >> p.page_shift : 0;
    sort_split_pages<Cfg::THREADS>(order_raw, order_first, n, p.num_pages,
                                   reinterpret_cast<uint32_t*>(sK + (STAGES - 1) * TILE * D), sOrder,
                                   p.order_skip_sort == 0);
    fetch_pages(STAGES - 1, pages, /*listed=*/true);  // (the sorted list; ORDER is true here)
  }
  KVCORE_TRACE(p, 4);

  // Lane roles in the mma fragments: rows r0 = lane/4 and r0 + 8; token/column pair (lane%4)*2.
  const int r0 = lane >> 2, cpair = (lane & 3) * 2;
  const float s_scale = p.soft_cap > 0.f ? p.scale : p.scale * kLog2e;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  for (int t = 0; t < num_tiles; ++t) {
    if constexpr (TMA) {
      if (t == 0) cp_async_wait<0>();  // Q
      mbarrier_wait(full + t % STAGES, (t / STAGES) & 1);
      // The last tile's rows past the end hold whatever the cache (or an earlier tile) left
      // there. K rows are masked below; V rows must be zero, not merely unused: P is 0 there,
      // and 0 x NaN is NaN. (The cp.async loader zero-fills them.)
      const int valid = end - (start + t * TILE);
      if (valid < TILE) {
        T* const vs = sV + (t % STAGES) * TILE * D;
        for (int i = tid; i < (TILE - valid) * TD; i += Cfg::THREADS)
          *reinterpret_cast<uint4*>(vs + tile_off(valid + i / TD, i % TD)) = make_uint4(0u, 0u, 0u, 0u);
      }
    } else {
      cp_async_wait<STAGES - 2>();
    }
    __syncthreads();  // tile t landed for every thread; stage (t-1) % STAGES is free again
    if (t == 0) KVCORE_TRACE(p, 1);
    if (t < p.trace_tiles) KVCORE_TRACE(p, kDecodeTraceFixed + t);
    if constexpr (TMA) {
      if (warp == 0) {
        issue_tma(t + STAGES - 1, 1);
        fetch_pages_tma(t + STAGES, 1);
      }
    } else {
      if (t + STAGES - 1 < num_tiles) issue_copies(t + STAGES - 1, pages, ORDER);
      cp_async_commit();
      fetch_pages(t + STAGES, pages, ORDER);
    }

    const T* kt = sK + (t % STAGES) * TILE * D;
    const T* vt = sV + (t % STAGES) * TILE * D;
    const int wrow = warp * Cfg::WARP_TOKENS;  // this warp's first row in the tile

    // S = Q K^T over the warp's 16 tokens: two n-tiles of 8 tokens, D/16 k-steps.
    float s[2][4] = {};
#pragma unroll
    for (int kc = 0; kc < D / 16; kc += 2) {
      uint32_t a0[4], a1[4];
      ldmatrix_x4(a0, sQ + swz<TD>((lane & 7) + ((lane >> 3) & 1) * 8, kc * 2 + (lane >> 4)));
      ldmatrix_x4(a1, sQ + swz<TD>((lane & 7) + ((lane >> 3) & 1) * 8, kc * 2 + 2 + (lane >> 4)));
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        uint32_t bk[4];
        ldmatrix_x4(bk, kt + tile_off(wrow + nt * 8 + (lane & 7), kc * 2 + (lane >> 3)));
        mma_16816(s[nt], a0, bk[0], bk[1], T{});
        mma_16816(s[nt], a1, bk[2], bk[3], T{});
      }
    }

    // Scale (or soft-cap) into the log2 domain, mask rows past the end, online-softmax update.
    const int tok0 = start + t * TILE + wrow + cpair;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float x = s[nt][i] * s_scale;
        if (p.soft_cap > 0.f) x = p.soft_cap * tanhf(x / p.soft_cap) * kLog2e;
        bool ok;
        if constexpr (SPARSE)
          ok = sValid[(t % STAGES) * TILE + wrow + cpair + nt * 8 + (i & 1)] != 0 && tok0 + nt * 8 + (i & 1) < end;
        else if constexpr (ORDER)  // (a row's tile position says nothing of its logical one)
          ok = sValid[(t % STAGES) * TILE + wrow + cpair + nt * 8 + (i & 1)] != 0;
        else
          ok = tok0 + nt * 8 + (i & 1) < end;
        s[nt][i] = ok ? x : -INFINITY;
      }
    float alpha[2], pbase[2];  // pbase: the base of this tile's P per row half (SCORE stores it)
    tile_softmax_update(s, m, l, alpha, pbase);
    if constexpr (SCORE) {
      // Store this warp's block of P (16 keys x the group's heads, fp16) and its base per head
      // for the epilogue (see GqaDecodeParams). A quad holds one head row's 16 keys as pairs:
      // lane q has keys 2q, 2q + 1 (n-tile 0) and 8 + 2q, 9 + 2q (n-tile 1), stored where they
      // are as two 4-byte pieces. (Until session 12 four shuffles first gave lane q keys 4q ..
      // 4q + 3 for one 8-byte store; the shuffles' latency sat in every tile's chain before P V:
      // 6.5% of the B16 kernel's stall samples in that store region in session 11's profile.)
      // Blocks wholly past the end are not stored (nothing reads keys >= seq_len); masked keys
      // inside a stored block hold P = 0.
      const int blk_pos = start + t * TILE + wrow;  // warp-uniform
      // Each stored head row (rows 8..15 are padding at group <= 8) as its two P words and base,
      // handed to `put`; one call per destination below, so each keeps its own inlined loop.
      auto each_p_row = [&](auto&& put) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          if (r == 1 && group <= 8) break;
          const int row = r0 + 8 * r;
          if (row < group)
            put(row, pack2(s[0][2 * r], s[0][2 * r + 1], __half{}), pack2(s[1][2 * r], s[1][2 * r + 1], __half{}),
                pbase[r]);
        }
      };
      if (blk_pos < end && p.score_p_local) {
        // The CTA's block (blk_pos - start) / 16 in its own staging layout (see stage_score):
        // lane 4 r0 + q stores words 8 r0 + q and + 4 past the block's first row (at group 4,
        // 16 distinct banks a store).
        const int lrow0 = ((blk_pos - start) / Cfg::WARP_TOKENS) * group;
        each_p_row([&](int row, uint32_t w0, uint32_t w1, float base) {
          uint32_t* dst = reinterpret_cast<uint32_t*>(s_pkeep) + (lrow0 + row) * (Cfg::WARP_TOKENS / 2) + cpair / 2;
          dst[0] = w0;
          dst[4] = w1;
          if (cpair == 0) s_pkeep_bases[lrow0 + row] = base;
        });
      } else if (blk_pos < end) {
        // evict_last (KVCORE_SCORE_L2=last) asks L2 to keep P until it is read back: the same
        // workspace lines are rewritten by the next layer's decode, so P need not reach DRAM
        // while the K/V stream, which is DRAM-bound at B16, passes through.
        const int64_t row0 =
            ((int64_t(b) * p.num_kv_heads + kvh) * p.score_blocks + (blk_pos - score_first) / Cfg::WARP_TOKENS) * group;
        each_p_row([&](int row, uint32_t w0, uint32_t w1, float base) {
          uint32_t* dst = reinterpret_cast<uint32_t*>(p.score_probs + (row0 + row) * Cfg::WARP_TOKENS + cpair);
          st_global_hint(dst, w0, score_policy);
          st_global_hint(dst + 4, w1, score_policy);
          if (cpair == 0) st_global_hint(p.score_bases + row0 + row, base, score_policy);
        });
      }
    }
    tile_pv_update<T, D>(o, s, alpha, vt, wrow, lane, tile_off);
  }
  cp_async_wait<0>();
  __syncthreads();  // the tile ring is reused below
  KVCORE_TRACE(p, 2);

  const int64_t pair = int64_t(b) * p.num_kv_heads + kvh;
  // SCORE, fused epilogue: each query head's final log2-sum-exp, and the staging of this CTA's P,
  // bases and old score values into the free part of the ring (SMEM_STAGE). The scratch rows
  // were stored by this CTA's warps; the __threadfence and barrier before stage_score make them
  // visible to the cp.async reads of other threads. With p.score_p_local, P and the bases are
  // already in shared memory (s_pkeep) and only the old score values are staged, at the start
  // of the area, each head's lse2 after them.
  [[maybe_unused]] unsigned char* const s_stage = smem + Cfg::SMEM_Q + Cfg::SMEM_MERGE;
  [[maybe_unused]] const unsigned char* const s_probs = p.score_p_local ? s_pkeep : s_stage;
  [[maybe_unused]] const float* const s_bases =
      reinterpret_cast<const float*>(s_probs + score_stage_p_bytes(p.split_tokens, group));
  [[maybe_unused]] float* const s_old =
      p.score_p_local ? reinterpret_cast<float*>(s_stage)
                      : reinterpret_cast<float*>(s_stage + score_stage_p_bytes(p.split_tokens, group) +
                                                 score_stage_base_bytes(p.split_tokens, group));
  [[maybe_unused]] float* const s_lse2 =  // [group], after the old values (the launcher counts it)
      reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(s_old) + size_t(p.split_tokens) * 4);
  [[maybe_unused]] const int score_keys = max(end - start, 0);
  [[maybe_unused]] const int score_nblk = (score_keys + Cfg::WARP_TOKENS - 1) / Cfg::WARP_TOKENS;
  [[maybe_unused]] auto stage_score = [&]() {
    if constexpr (SCORE) {
      if (!p.score_p_local) {
        const int64_t blk0 = (start - score_first) / Cfg::WARP_TOKENS;  // this CTA's first block
        const int64_t row0 = (pair * p.score_blocks + blk0) * group;
        const int rows = score_nblk * group;
        const __half* gp = p.score_probs + row0 * Cfg::WARP_TOKENS;
        const float* gb = p.score_bases + row0;
        unsigned char* const sp = s_stage;
        float* const sb = reinterpret_cast<float*>(s_stage + score_stage_p_bytes(p.split_tokens, group));
        for (int i = tid; i < rows * 2; i += Cfg::THREADS) cp_async_16(sp + i * 16, gp + i * 8, true);
        for (int i = tid; i < rows; i += Cfg::THREADS) cp_async_4(sb + i, gb + i);
      }
      const float* gs = p.score + pair * p.score_len + start;
      for (int i = tid; i < score_keys; i += Cfg::THREADS) cp_async_4(s_old + i, gs + i);
      cp_async_commit();
    }
  };
  // Local P: the old score values start on their way now, past the merge area the warps fill
  // next, so their round trip overlaps the merge (with the scratch, stage_score waits for every
  // warp's P stores to be visible, after the merge).
  if constexpr (SCORE) {
    if (p.score_fused && p.score_p_local) stage_score();
  }

  // ---- merge the warps' states through shared memory -------------------------------------------
  // sMerge: o [WARPS][ROWS][MERGE_STRIDE], then m and l [WARPS][ROWS]. Only the group's rows are
  // stored (the rest are padding). Until session 16 all 16 rows went in at a stride of D floats:
  // eight rows on the same banks, an 8-way conflict on every store (0.5-1 us of the epilogue in
  // session 16's traces).
  constexpr int MS = Cfg::MERGE_STRIDE;
  float* const sm_m = sMerge + WARPS * ROWS * MS;
  float* const sm_l = sm_m + WARPS * ROWS;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  if (r0 < group) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(sMerge + (warp * ROWS + r0) * MS + n * 8 + cpair) = make_float2(o[n][0], o[n][1]);
  }
  if (r0 + 8 < group) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(sMerge + (warp * ROWS + r0 + 8) * MS + n * 8 + cpair) = make_float2(o[n][2], o[n][3]);
  }
  if ((lane & 3) == 0) {
    sm_m[warp * ROWS + r0] = m[0];
    sm_m[warp * ROWS + r0 + 8] = m[1];
    sm_l[warp * ROWS + r0] = l[0];
    sm_l[warp * ROWS + r0 + 8] = l[1];
  }
  __syncthreads();

  // score[k] += sum over the group's heads g of P[k, g] exp2(base[block of k, g] - lse2[g]) for
  // this CTA's keys, once s_lse2 holds the final values; 4 keys of one block per thread.
  [[maybe_unused]] auto add_scores = [&]() {
    if constexpr (SCORE) {
      cp_async_wait<0>();
      __syncthreads();  // the staged rows and s_lse2 are visible to every thread
      const __half* sp = reinterpret_cast<const __half*>(s_probs);
      const float* sb = s_bases;
      const float* ss = s_old;
      float* const gs = p.score + pair * p.score_len + start;
      for (int k = tid * 4; k < score_keys; k += Cfg::THREADS * 4) {
        const int blk = k / Cfg::WARP_TOKENS;
        float acc[4] = {ss[k], 0.f, 0.f, 0.f};
#pragma unroll
        for (int i = 1; i < 4; ++i) acc[i] = k + i < score_keys ? ss[k + i] : 0.f;
        for (int g = 0; g < group; ++g) {
          const float f = exp2f(sb[blk * group + g] - s_lse2[g]);
          const uint2 hv = *reinterpret_cast<const uint2*>(sp + (blk * group + g) * Cfg::WARP_TOKENS + k % Cfg::WARP_TOKENS);
          const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&hv.x));
          const float2 y = __half22float2(*reinterpret_cast<const __half2*>(&hv.y));
          acc[0] = fmaf(x.x, f, acc[0]);
          acc[1] = fmaf(x.y, f, acc[1]);
          acc[2] = fmaf(y.x, f, acc[2]);
          acc[3] = fmaf(y.y, f, acc[3]);
        }
        if (k + 4 <= score_keys && (reinterpret_cast<uintptr_t>(gs + k) & 15) == 0) {
          *reinterpret_cast<float4*>(gs + k) = make_float4(acc[0], acc[1], acc[2], acc[3]);
        } else {
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (k + i < score_keys) gs[k + i] = acc[i];
        }
      }
    }
  };
  for (int item = tid; item < group * TD; item += Cfg::THREADS) {
    const int h = item / TD, c = (item % TD) * 8;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm_m[w * ROWS + h]);
    const float base = mx == -INFINITY ? 0.f : mx;
    float lsum = 0.f, acc[8] = {};
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float f = exp2f(sm_m[w * ROWS + h] - base);
      lsum += sm_l[w * ROWS + h] * f;
      const float4* src = reinterpret_cast<const float4*>(sMerge + (w * ROWS + h) * MS + c);
      const float4 x = src[0], y = src[1];
      acc[0] += x.x * f, acc[1] += x.y * f, acc[2] += x.z * f, acc[3] += x.w * f;
      acc[4] += y.x * f, acc[5] += y.y * f, acc[6] += y.z * f, acc[7] += y.w * f;
    }
    // lsum == 0: nothing attended (out 0, lse -inf). A NaN lsum (NaN in q or an attended key)
    // stays NaN in both, so a later merge cannot mistake the row for an empty part.
    const float inv = lsum == 0.f ? 0.f : 1.f / lsum;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] *= inv;
    const float lse2 = lsum == 0.f ? -INFINITY : base + log2f(lsum);
    if (p.num_splits == 1) {
      const int64_t qh = pair * group + h;
      *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + qh * D + c) = pack8<T>(acc);
      if (p.lse != nullptr && c == 0) p.lse[qh] = lse2 * kLn2;
      if constexpr (SCORE) {
        if (c == 0) {
          if (p.score_fused)
            s_lse2[h] = lse2;
          else
            p.score_lse2[qh] = lse2;
        }
      }
    } else {
      const int64_t slot = (pair * p.num_splits + split) * group + h;
      float4* dst = reinterpret_cast<float4*>(p.partial_out + slot * D + c);
      dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      if (c == 0) p.partial_lse[slot] = lse2;
    }
  }
  [[maybe_unused]] const bool fused = SCORE && p.score_fused;
  if (p.num_splits == 1) {
    if constexpr (SCORE) {
      if (fused) {
        if (!p.score_p_local) {  // (local P: staged after the loop)
          __threadfence();
          __syncthreads();  // every warp's P stores visible to the staging reads
          stage_score();
        }
        add_scores();  // (its barrier: s_lse2 written)
      }
    }
    KVCORE_TRACE(p, 3);
    return;
  }

  // ---- split merge: publish the partial, count arrivals, the last CTA combines ----------------
  // Without the score epilogue, thread 0's acq_rel atomic publishes the CTA's partial (ordered
  // before it by the barrier) and, for the last CTA, makes the others' visible to the reads after
  // the next barrier: one instruction instead of a fence in every thread plus a relaxed atomic and
  // a second fence (session 16: B1 S32768 0.2-0.3 us faster). The SCORE kernels keep the fences:
  // their CTAs also read each other's P rows and wait on the counters.
  constexpr bool kAcqRel = !SCORE;
  if (!kAcqRel) __threadfence();
  __syncthreads();
  if constexpr (SCORE) {
    if (fused && !p.score_p_local) stage_score();  // in flight during the arrival and the wait below
  }
  __shared__ bool is_last;
  [[maybe_unused]] unsigned departed = 0;  // SCORE, fused (thread 0): CTAs of the pair out before this one
  // The last CTA out resets both counters; no CTA of this launch reads them after its departure.
  [[maybe_unused]] auto depart = [&]() {
    if (tid == 0 && departed == unsigned(p.num_splits - 1)) {
      p.counters[pair] = 0u;
      p.departures[pair] = 0u;
    }
  };
  if (tid == 0) {
    KVCORE_TRACE(p, 10);
    const unsigned before = kAcqRel ? atomic_add_acq_rel_gpu(p.counters + pair, 1u) : atomicAdd(p.counters + pair, 1u);
    is_last = before == unsigned(p.num_splits - 1);
  }
  __syncthreads();
  KVCORE_TRACE(p, 5);
  if constexpr (SCORE) {
    if (fused) {
      // Wait for the pair's other splits (every CTA of the grid is resident: the launch is
      // cooperative), then count this CTA out.
      if (tid == 0) {
        if (!is_last)
          while (ld_acquire_gpu(p.counters + pair) < unsigned(p.num_splits)) __nanosleep(32);
        // The count's value is first needed at the CTA's end (depart), so its round trip overlaps
        // the lse loads and the score update instead of preceding them.
        departed = atomicAdd(p.departures + pair, 1u);
      }
      __syncthreads();
    }
  }
  if (!is_last && !fused) {
    KVCORE_TRACE(p, 3);
    return;
  }
  if (!kAcqRel) __threadfence();

  // Weights of each split's partial per head, through shared memory: [group][num_splits + 1]
  // (weights, then their sum).
  float* const wgt = sMerge;
  const int ns = p.num_splits;
  // The partials of this thread's first (head, 4 columns) item, up to BATCH splits, start
  // on their way now: their round trip overlaps the lse values' below instead of following it
  // (session 16: one round trip fewer at B1 S32768's 32 splits).
  const int items = group * (D / 4);
  const float* pout = p.partial_out + pair * ns * group * D;
  constexpr int BATCH = kMergeBatch<D>;
  float4 pv[BATCH];
  auto load_partials = [&](int item, int s0) {
    const int h = item / (D / 4), c = (item % (D / 4)) * 4;
    // One pointer stepped by a split's stride: ~4 instructions a load, where each load's own
    // 64-bit products took ~13 (issued even where the load is predicated off: ~380 instructions
    // before the lse loads; session 19, call 1: the merge 0.1-0.3 us shorter with the barrier
    // change below).
    const float4* src = reinterpret_cast<const float4*>(pout + (int64_t(s0) * group + h) * D + c);
    const int64_t stride = int64_t(group) * (D / 4);
    const int n = ns - s0;
#pragma unroll
    for (int j = 0; j < BATCH; ++j) {
      if (j < n) pv[j] = __ldcg(src);
      src += stride;
    }
  };
  if (is_last && tid < items) load_partials(tid, 0);
  KVCORE_TRACE(p, 11);

  const float* plse = p.partial_lse + pair * ns * group;
  for (int h = warp; h < group; h += WARPS) {
    // Each lane reads its splits' lse once (L2 round trips are what this merge is made of: it
    // runs after every other CTA of the pair, on the critical path) and keeps them in wgt.
    float mx = -INFINITY;
    for (int s = lane; s < ns; s += 32) {
      const float x = __ldcg(plse + s * group + h);
      if (s == lane && h == warp) KVCORE_TRACE_AFTER(p, 12, x);
      wgt[h * (ns + 1) + s] = x;
      mx = fmaxf(mx, x);
    }
    const float2 bs = split_merge_weights(mx, h, ns, lane, wgt);
    const float base = bs.x, sum = bs.y;
    if (lane == 0) {
      wgt[h * (ns + 1) + ns] = sum;
      if (p.lse != nullptr && (!fused || is_last))
        p.lse[pair * group + h] = sum == 0.f ? -INFINITY : (base + log2f(sum)) * kLn2;
      if constexpr (SCORE) {
        const float lse2 = sum == 0.f ? -INFINITY : base + log2f(sum);
        if (fused)
          s_lse2[h] = lse2;
        else
          p.score_lse2[pair * group + h] = lse2;
      }
    }
  }
  KVCORE_TRACE(p, 7);  // thread 0: its warp's heads' weights done (lse round trip and reductions)
  // At D 128 a warp's combine items below (item = tid + k x THREADS, head item / 32) are the
  // heads whose weights it worked out above (warp + k x WARPS): only the warp must see them. The
  // fused score epilogue's add_scores has its own barrier before it reads s_lse2.
  if constexpr (D / 4 == 32)
    __syncwarp();
  else
    __syncthreads();
  KVCORE_TRACE(p, 8);
  if constexpr (SCORE) {
    if (fused && !is_last) {  // every split knows its heads' final lse: add its keys' share
      add_scores();
      depart();
      KVCORE_TRACE(p, 3);
      return;
    }
  }
  // Each thread combines 4 output elements of one head across all splits, BATCH splits'
  // partials in flight at a time, summed in split order (the same bits whatever the batching).
  for (int item = tid; item < items; item += Cfg::THREADS) {
    const int h = item / (D / 4), c = (item % (D / 4)) * 4;
    const float* wh = wgt + h * (ns + 1);
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < ns; s0 += BATCH) {
      if (item != tid || s0 > 0) load_partials(item, s0);  // (the first batch came before the lse)
#pragma unroll
      for (int j = 0; j < BATCH; ++j) {
        if (s0 + j < ns) {
          const float ws = wh[s0 + j];
          acc.x = fmaf(ws, pv[j].x, acc.x);
          acc.y = fmaf(ws, pv[j].y, acc.y);
          acc.z = fmaf(ws, pv[j].z, acc.z);
          acc.w = fmaf(ws, pv[j].w, acc.w);
        }
      }
    }
    const float inv = wh[ns] == 0.f ? 0.f : 1.f / wh[ns];
    T* dst = static_cast<T*>(p.out) + (pair * group + h) * D + c;
    *reinterpret_cast<uint2*>(dst) = make_uint2(pack2(acc.x * inv, acc.y * inv, T{}), pack2(acc.z * inv, acc.w * inv, T{}));
  }
  KVCORE_TRACE(p, 9);  // thread 0: its items combined and stored
  if constexpr (SCORE) {
    if (fused) {
      add_scores();
      depart();
      KVCORE_TRACE(p, 3);
      return;
    }
  }
  if (tid == 0) p.counters[pair] = 0u;  // ready for the next launch
  KVCORE_TRACE(p, 3);
}


template <typename T, typename Cfg, bool SPARSE = false, bool SCORE = false, int SPP = 1, bool ORDER = false>
__global__ void __launch_bounds__(Cfg::THREADS) gqa_decode_kernel(const GqaDecodeParams p) {
  gqa_decode_body<T, Cfg, SPARSE, SCORE, SPP, false, ORDER>(p, nullptr);
}

// gqa_decode with the TMA loader. Its body exists in sm_90a code only; elsewhere (and in a build
// for plain sm_90) it traps, and the launcher never picks it (paged_decode::tma_body_built).
template <typename T, typename Cfg, bool SCORE = false>
__global__ void __launch_bounds__(Cfg::THREADS)
    gqa_decode_tma_kernel(const GqaDecodeParams p, const __grid_constant__ GqaDecodeTmaMaps maps) {
#if KVCORE_SM90A
  gqa_decode_body<T, Cfg, false, SCORE, 1, true>(p, &maps);
#else
  __trap();
#endif
}

}  // namespace kvcore
