// Eviction scores on tensor cores without the [w, S] score matrix (kvcore::attention_scores).
//
// For a sequence b of length L, KV head h and key p, the score reduces over the R = w * G query
// rows of the KV group (row r = i * G + g: window query i, group head g; row r sees the keys
// p <= L - w + i) the probabilities exp(logit[r, p] - lse[r]). Two passes over the keys:
//
//   pass 1 (only without the caller's lse): one CTA per (KV head, key split, sequence) computes
//     its rows' logits against the split's keys and keeps, per row, a running max and sum of exp
//     in registers; it writes one log2-sum-exp per (row, split) into a workspace
//     [B, Hkv, R, splits]. merge_lse_kernel folds the splits of each row into the natural-log
//     lse, laid out [B, w, Hq] like the caller's, so pass 2 reads either the same way.
//   pass 2: the same CTAs recompute the logits, p = exp2(logit * log2e - lse * log2e) for the
//     keys a row sees, reduced over the rows (sum / max) straight into out[b, h, p]. Each CTA
//     also zero-fills its keys past L (and the last split everything up to S).
//   pooling (pool_kernel): SnapKV's 1-D pooling of the prefix keys p < L - w, from out into out.
//     Pooling segments of kPoolSeg keys are independent CTAs; the few keys a segment's window
//     reads from its neighbours (kEdge on each side) are copied by pass 2 into a small side
//     buffer, so no CTA reads a value another CTA of the same launch overwrites.
//
// Compute mapping (both passes): the key tiles of a split stream through a STAGES-deep
// cp.async ring (16-byte copies, rows past the end zero-filled, XOR-swizzled 16-byte chunks for
// conflict-free ldmatrix). The rows are held as mma A fragments in registers: each of the 8
// warps owns MT m-tiles (16 rows each) and sweeps every key of every tile in sub-tiles of 16
// keys, so a K fragment read from shared memory feeds MT mmas. When R exceeds the 8 warps' rows
// the CTA repeats its split once per block of rows (the split's keys are then re-read, mostly
// from L2); pass 2 accumulates the row blocks into out in order, so results are deterministic.
//
// Per key, pass 2 reduces within a warp with butterfly shuffles over the lanes that hold the
// same key column, then over the warps through shared memory in warp order: a fixed order, so
// the scores are bitwise reproducible run to run.
//
// NaN rules (tests/test_nan.py): a NaN logit that a row sees makes the row's lse NaN (the sum
// of exp is NaN; fmaxf-based maxima skip it, so nothing turns it into -inf), hence every score of
// the keys it sees; a key a row does not see contributes an exact 0 (selected, never computed
// as exp(-inf - lse)); max-reduction and max-pooling let a NaN win.
#pragma once

#include <math.h>
#include <stdint.h>

#include <type_traits>

#include "kvcore/device_utils.cuh"

namespace kvcore {

enum ScoreReduce : int { kScoreSum = 0, kScoreMean = 1, kScoreMax = 2 };

struct AttentionScoresParams {
  const void* q;  // [B, w, Hq, D], last dim contiguous; strides even (4-byte fragment loads)
  int64_t q_stride_b, q_stride_w, q_stride_h;
  const void* k_cache;  // [pages, page_size, Hkv, D], inner three dims dense
  int64_t k_page_stride;  // elements between pages (a multiple of 8)
  const int* block_table;  // [B, max_pages]
  const int* seq_lens;     // [B]
  const float* lse;        // pass 2: [B, w, Hq] natural log (the caller's, or merge_lse_kernel's)
  float* lse_out;          // merge_lse_kernel: [B, w, Hq]
  float* part;             // pass 1 out / merge in: [B, Hkv, R, splits], log2 domain
  float* out;              // [B, Hkv, S] fp32 contiguous
  float* edges;            // pooling: [B, Hkv, num_segs, 2 * kEdge] (nullptr without pooling)
  int batch, window, num_kv_heads, group, rows;  // rows = window * group
  int num_pages, page_size, page_shift, max_pages;  // page_shift < 0: page_size not a power of 2
  int kv_len;              // positions a sequence can have: min(block-table capacity, S); 0 without pages
  int max_len;             // S
  int splits, split_tokens;  // split_tokens: a multiple of the key tile
  int num_segs;            // pooling segments: ceil(S / kPoolSeg)
  float scale_log2;        // softmax scale * log2(e)
  int reduction;           // ScoreReduce
  int pool_kernel;         // 0: no pooling; else 5 or 7
  int pool_max;            // 1: max pooling, 0: avg pooling
};

constexpr int kPoolSeg = 1024;  // keys per pooling CTA
constexpr int kEdge = 3;        // halo keys kept per segment side (pool_kernel 7 -> radius 3)

template <int D_>
struct ScoresConfig {
  static constexpr int D = D_;
  static constexpr int WARPS = 8;
  static constexpr int THREADS = WARPS * 32;
  static constexpr int TK = 64;                          // keys per tile (one ring stage)
  static constexpr int MT = D <= 128 ? 2 : 1;           // m-tiles (16 rows) per warp: 64 regs of Q at D 128 / 256
  static constexpr int ROWS = WARPS * MT * 16;          // rows per row block
  static constexpr int KS = D / 16;                     // mma k-steps
  static constexpr int TD = D / 8;                      // 16-byte chunks per key row
  static constexpr int STAGES = D <= 128 ? 4 : 3;
  static constexpr int LOADS = TK * TD / THREADS;       // 16-byte copies per thread per tile
  static constexpr size_t SMEM_TILES = size_t(STAGES) * TK * D * 2;
  static constexpr size_t SMEM_RED = size_t(WARPS) * TK * sizeof(float);
  static constexpr size_t SMEM_BYTES = SMEM_TILES + SMEM_RED;
  static constexpr size_t SMEM_BYTES_T = SMEM_TILES + 2 * SMEM_RED;  // attention_scores_pass2_t_kernel
  static_assert(D == 64 || D == 128 || D == 256, "head_dim must be 64, 128 or 256");
  static_assert((TK * TD) % THREADS == 0 && THREADS % TD == 0, "tile copies must divide evenly");
};

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][TD chunks] tile.
template <int TD>
__device__ __forceinline__ int scores_swz(int row, int chunk) {
  return (row * TD + (chunk ^ (row & 7))) * 8;
}

// max that lets a NaN win (torch's amax / max_pool1d propagate NaN; fmaxf would drop it).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || isnan(a)) ? a : b; }

// Clamped sequence length: never past the block table, the output or an empty cache.
__device__ __forceinline__ int scores_len(const AttentionScoresParams& p, int b) {
  return min(max(__ldg(p.seq_lens + b), 0), p.kv_len);
}

// The keys a pass CTA covers: split `split` of sequence b, [start, end) of its len keys in
// num_tiles tiles of TK (0 when the split starts at or past len).
struct ScoresSplit {
  int len, start, end, num_tiles;
};
template <int TK>
__device__ __forceinline__ ScoresSplit scores_split(const AttentionScoresParams& p, int split, int b) {
  const int len = scores_len(p, b);
  const int start = split * p.split_tokens;
  const int end = min(len, start + p.split_tokens);
  return {len, start, end, start < end ? (end - start + TK - 1) / TK : 0};
}

// Pass 2: keys past the sequence score 0: this CTA's share of [len, S) (the CTA of the last split,
// blockIdx.y, also takes the positions past the block table's capacity, up to S). The split is
// read here rather than passed: compared with a parameter, the loaded p.splits - 1 would be put
// first and change the kernels' SASS.
template <int THREADS>
__device__ __forceinline__ void scores_zero_tail(const AttentionScoresParams& p, float* out_row, int start, int len,
                                                 int tid) {
  const int zero_end = blockIdx.y == p.splits - 1 ? p.max_len : start + p.split_tokens;
  for (int k = max(start, len) + tid; k < zero_end; k += THREADS) out_row[k] = 0.f;
}

// Pass 1 on a split without keys: every row's part is empty (-inf), so the merge can read all splits.
template <int THREADS>
__device__ __forceinline__ void scores_empty_parts(const AttentionScoresParams& p, int64_t pair, int split, int tid) {
  for (int r = tid; r < p.rows; r += THREADS) p.part[(pair * p.rows + r) * p.splits + split] = -INFINITY;
}

// Row r of a KV group of G = group heads is window query i, group head g (r = i * G + g). Returns
// whether the row is real (r < R = rows); a padding row is query 0, head 0, and its callers zero or
// mask what they read for it. (R and G come by value: compared with a parameter, a value loaded
// here would be put first and flip the kernels' predicates.)
__device__ __forceinline__ bool scores_row(int r, int rows, int group, int& i, int& g) {
  const bool real = r < rows;
  i = real ? r / group : 0;
  g = real ? r - i * group : 0;
  return real;
}

// This lane's first element (column cpair) of the query row of window query i, query head qh.
template <typename T>
__device__ __forceinline__ const T* scores_q_row(const AttentionScoresParams& p, int b, int i, int qh, int cpair) {
  return static_cast<const T*>(p.q) + int64_t(b) * p.q_stride_b + int64_t(i) * p.q_stride_w +
         int64_t(qh) * p.q_stride_h + cpair;
}

// The row's two 4-byte fragments of k-step ks (columns cpair, +1 and cpair + 8, +9 of the step);
// zero for a padding row.
template <typename T>
__device__ __forceinline__ void scores_q_frags(const T* qrow, int ks, bool real, uint32_t& lo, uint32_t& hi) {
  lo = real ? __ldg(reinterpret_cast<const unsigned int*>(qrow + ks * 16)) : 0u;
  hi = real ? __ldg(reinterpret_cast<const unsigned int*>(qrow + ks * 16 + 8)) : 0u;
}

// This warp's rows with rows on the mma's M dimension (attention_scores_kernel, pass 1 of the
// transposed variant): rows warp_row0 + mt * 16 + r0 and + 8 of each of its MT m-tiles. Loads their
// A fragments qa (zero past R) and each row's last visible key lim (-1: none; padding rows see
// nothing); with LSE (pass 2), also each row's lse in the log2 domain into lse2 ([MT][2]; not
// touched, and may be null, without LSE).
template <bool LSE, typename T, int MT, int KS>
__device__ __forceinline__ void scores_load_rows(const AttentionScoresParams& p, int b, int h, int len, int warp_row0,
                                                 int r0, int cpair, uint32_t (&qa)[MT][KS][4], int (&lim)[MT][2],
                                                 float (*lse2)[2]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      int i, g;
      const bool real = scores_row(warp_row0 + mt * 16 + half * 8 + r0, p.rows, p.group, i, g);
      lim[mt][half] = real ? len - p.window + i : -1;
      const int qh = h * p.group + g;
      if constexpr (LSE)
        lse2[mt][half] =
            real ? __ldg(p.lse + (int64_t(b) * p.window + i) * (int64_t(p.num_kv_heads) * p.group) + qh) * kLog2e : 0.f;
      const T* qrow = scores_q_row<T>(p, b, i, qh, cpair);
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) scores_q_frags(qrow, ks, real, qa[mt][ks][half], qa[mt][ks][2 + half]);
    }
}

// Pass 1: one row's running max (log2 units) and sum of exp2 over this lane's keys, taking four
// more logits x (-inf for a key the row does not see).
__device__ __forceinline__ void scores_online_update(const float (&x)[4], float& m, float& l) {
  const float mx = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));  // skips NaN
  if (mx > m) {  // rescale only when the max grows (exact either way)
    l *= exp2f(m - mx);
    m = mx;
  }
  const float base = m == -INFINITY ? 0.f : m;
  l += exp2f(x[0] - base) + exp2f(x[1] - base) + exp2f(x[2] - base) + exp2f(x[3] - base);
}

// Pass 1 after a row block's last tile: the (max, sum) of each of this lane's rows (r0 and r0 + 8
// of each m-tile) merged over the quad of lanes holding its key columns, written as the row's
// part of this split (log2 domain; -inf for a row that saw no key).
template <int MT>
__device__ __forceinline__ void scores_write_parts(const AttentionScoresParams& p, const float (&m)[MT][2],
                                                   const float (&l)[MT][2], int64_t pair, int split, int warp_row0,
                                                   int r0, int lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      // Merge the quad's (max, sum) pairs; a NaN sum stays NaN (the row saw a NaN logit).
      float mx = m[mt][half];
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.f : mx;
      float sum = l[mt][half] * exp2f(m[mt][half] - base);
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int r = warp_row0 + mt * 16 + half * 8 + r0;
      if ((lane & 3) == 0 && r < p.rows)
        p.part[(pair * p.rows + r) * p.splits + split] = sum == 0.f ? -INFINITY : base + log2f(sum);
    }
}

// Pass 2 after the last row block: a key among the first or last kEdge of its pooling segment
// also keeps its final score v in the segment's edges, which pool_scores_kernel reads as halo.
__device__ __forceinline__ void scores_save_edge(const AttentionScoresParams& p, int64_t pair, int key, float v) {
  if (p.edges != nullptr) {
    const int in_seg = key % kPoolSeg;
    const int64_t seg_base = (pair * p.num_segs + key / kPoolSeg) * (2 * kEdge);
    if (in_seg < kEdge) p.edges[seg_base + in_seg] = v;
    else if (in_seg >= kPoolSeg - kEdge) p.edges[seg_base + kEdge + in_seg - (kPoolSeg - kEdge)] = v;
  }
}

template <typename T, typename Cfg, bool PASS2>
__global__ void __launch_bounds__(Cfg::THREADS, 2) attention_scores_kernel(const AttentionScoresParams p) {
  constexpr int D = Cfg::D, TD = Cfg::TD, TK = Cfg::TK, STAGES = Cfg::STAGES, LOADS = Cfg::LOADS;
  constexpr int MT = Cfg::MT, KS = Cfg::KS, WARPS = Cfg::WARPS, THREADS = Cfg::THREADS;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const sK = reinterpret_cast<T*>(smem_raw);
  float* const sRed = reinterpret_cast<float*>(smem_raw + Cfg::SMEM_TILES);  // [WARPS][TK]

  const int h = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const ScoresSplit sp = scores_split<TK>(p, split, b);
  const int len = sp.len, start = sp.start, end = sp.end, num_tiles = sp.num_tiles;
  const int64_t pair = int64_t(b) * p.num_kv_heads + h;
  float* const out_row = p.out + pair * p.max_len;

  if constexpr (PASS2) scores_zero_tail<THREADS>(p, out_row, start, len, tid);
  const int num_row_blocks = (p.rows + Cfg::ROWS - 1) / Cfg::ROWS;
  if (num_tiles == 0) {
    if constexpr (!PASS2) scores_empty_parts<THREADS>(p, pair, split, tid);
    return;
  }

  // ---- the K ring ------------------------------------------------------------------------------
  // Every index read from memory is clamped, so bad block-table contents give wrong numbers but
  // never an out-of-bounds access (the Python wrapper validates them when validation is on).
  const int* bt = p.block_table + int64_t(b) * p.max_pages;
  const T* const kbase = static_cast<const T*>(p.k_cache) + int64_t(h) * D;
  const int64_t row_stride = int64_t(p.num_kv_heads) * D;
  const int copy_chunk = tid % TD;  // THREADS % TD == 0: every copy of a thread is the same chunk
  auto page_of = [&](int pos) { return p.page_shift >= 0 ? pos >> p.page_shift : pos / p.page_size; };
  auto in_page = [&](int pos) { return p.page_shift >= 0 ? pos & (p.page_size - 1) : pos % p.page_size; };
  // Pages of the rows this thread copies for tile t, fetched a tile ahead of the copies so the
  // dependent block-table load does not stall them. Positions clamp to [0, len - 1] (len > 0 here).
  auto fetch_pages = [&](int t, int (&pg)[LOADS]) {
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int pos = min(start + t * TK + (tid + i * THREADS) / TD, len - 1);
      pg[i] = __ldg(bt + page_of(pos));
    }
  };
  auto issue_copies = [&](int t, const int (&pg)[LOADS]) {
    const int stage = t % STAGES;
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int row = (tid + i * THREADS) / TD;
      const int pos = start + t * TK + row;
      const bool valid = pos < end;
      const int64_t page = min(max(pg[i], 0), p.num_pages - 1);
      const int64_t off = int64_t(in_page(min(pos, end - 1))) * row_stride + copy_chunk * 8;
      cp_async_16(sK + stage * TK * D + scores_swz<TD>(row, copy_chunk), kbase + page * p.k_page_stride + off, valid);
    }
  };

  // Lane roles in the mma fragments: rows r0 and r0 + 8 of each m-tile; key columns cpair, +1.
  const int r0 = lane >> 2, cpair = (lane & 3) * 2;
  const float norm = p.reduction == kScoreMean ? 1.f / float(p.rows) : 1.f;
  const bool use_max = p.reduction == kScoreMax;

  for (int rb = 0; rb < num_row_blocks; ++rb) {
    int pages[LOADS];
    fetch_pages(0, pages);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < num_tiles) issue_copies(s, pages);
      cp_async_commit();
      fetch_pages(s + 1, pages);
    }

    // This warp's rows as A fragments (rows >= R are zero), each row's last visible key (-1:
    // none; padding rows see nothing) and, in pass 2, its lse in the log2 domain.
    const int warp_row0 = rb * Cfg::ROWS + warp * MT * 16;
    const bool active = warp_row0 < p.rows;  // a warp past the last row skips the math
    uint32_t qa[MT][KS][4];
    int lim[MT][2];
    float lse2[MT][2];
    scores_load_rows<PASS2, T>(p, b, h, len, warp_row0, r0, cpair, qa, lim, lse2);

    // Pass 1 state per lane and row: running max (log2 units) and sum of exp2 over this lane's
    // key columns; the four lanes of a row are merged after the loop.
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;

    for (int t = 0; t < num_tiles; ++t) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // tile t landed for every thread; stage (t-1) % STAGES is free again
      if (t + STAGES - 1 < num_tiles) issue_copies(t + STAGES - 1, pages);
      cp_async_commit();
      fetch_pages(t + STAGES, pages);

      const T* kt = sK + (t % STAGES) * TK * D;
      const int tile0 = start + t * TK;
      if (active) {
#pragma unroll 1
        for (int j = 0; j < TK / 16; ++j) {
          float s[MT][2][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
          for (int kc = 0; kc < KS; kc += 2) {
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
              uint32_t bk[4];  // keys j*16 + nt*8 .. +7, d 16*kc .. 16*kc + 31
              ldmatrix_x4(bk, kt + scores_swz<TD>(j * 16 + nt * 8 + (lane & 7), kc * 2 + (lane >> 3)));
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) {
                mma_16816(s[mt][nt], qa[mt][kc], bk[0], bk[1], T{});
                mma_16816(s[mt][nt], qa[mt][kc + 1], bk[2], bk[3], T{});
              }
            }
          }
          const int key0 = tile0 + j * 16 + cpair;  // key of s[.][nt][e] is key0 + nt * 8 + (e & 1)
          if constexpr (!PASS2) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
              for (int half = 0; half < 2; ++half) {
                float x[4];
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                  for (int e = 0; e < 2; ++e)
                    x[nt * 2 + e] = key0 + nt * 8 + e <= lim[mt][half] ? s[mt][nt][half * 2 + e] * p.scale_log2 : -INFINITY;
                scores_online_update(x, m[mt][half], l[mt][half]);
              }
          } else {
            float c[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // per key column: sum or max over this lane's rows
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
              for (int half = 0; half < 2; ++half)
#pragma unroll
                for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                  for (int e = 0; e < 2; ++e) {
                    // An unseen key contributes an exact 0, whatever the logit or lse holds.
                    const float pr = key0 + nt * 8 + e <= lim[mt][half]
                                         ? exp2f(s[mt][nt][half * 2 + e] * p.scale_log2 - lse2[mt][half])
                                         : 0.f;
                    c[nt][e] = use_max ? nan_max(c[nt][e], pr) : c[nt][e] + pr;
                  }
            // Fold the 8 row groups of the warp (lane bits 2..4) for each key column.
#pragma unroll
            for (int off = 4; off < 32; off <<= 1)
#pragma unroll
              for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                  const float o = __shfl_xor_sync(0xffffffffu, c[nt][e], off);
                  c[nt][e] = use_max ? nan_max(c[nt][e], o) : c[nt][e] + o;
                }
            if (lane < 4) {
#pragma unroll
              for (int nt = 0; nt < 2; ++nt) {
                sRed[warp * TK + j * 16 + nt * 8 + cpair] = c[nt][0];
                sRed[warp * TK + j * 16 + nt * 8 + cpair + 1] = c[nt][1];
              }
            }
          }
        }
      }
      if constexpr (PASS2) {
        __syncthreads();  // every active warp's column results are in sRed
        if (tid < TK) {
          const int key = tile0 + tid;
          if (key < end) {
            const int nact = min(WARPS, (p.rows - rb * Cfg::ROWS + MT * 16 - 1) / (MT * 16));
            float v = sRed[tid];
            for (int w = 1; w < nact; ++w) v = use_max ? nan_max(v, sRed[w * TK + tid]) : v + sRed[w * TK + tid];
            // Row blocks after the first add to what the earlier ones wrote (same thread, same key).
            if (rb > 0) v = use_max ? nan_max(out_row[key], v) : out_row[key] + v;
            if (rb == num_row_blocks - 1) {
              v *= norm;
              scores_save_edge(p, pair, key, v);
            }
            out_row[key] = v;
          }
        }
        // sRed is written again only after the next tile's __syncthreads, which these threads
        // reach after their reads.
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the ring is refilled by the next row block

    if constexpr (!PASS2) {
      if (active) scores_write_parts<MT>(p, m, l, pair, split, warp_row0, r0, lane);
    }
  }
}

// cp.async of 16 bytes to a shared-space address; !valid zero-fills (the source is not read).
__device__ __forceinline__ void cp_async_16_s(uint32_t saddr, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(gmem),
               "r"(valid ? 16 : 0));
}

// ldmatrix.x4 from a shared-space address (the variant below keeps its addresses as 32-bit offsets).
__device__ __forceinline__ void ldmatrix_x4_s(uint32_t (&r)[4], uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr));
}

template <bool MAX>
__device__ __forceinline__ float scores_combine(float a, float b) {
  if constexpr (MAX) return nan_max(a, b);
  else return a + b;
}

// The K ring of the variant kernels below: the same tiles as attention_scores_kernel's (same
// swizzle, rows past the split's end zero-filled, every index read from memory clamped), but each
// thread copies chunks c_q + 4 i (i < LOADS) of ONE key row, c_row: one block-table read and one
// 64-bit address per thread and tile instead of LOADS, and its copies differ by constant offsets
// (global: 64 bytes; shared: the swizzled chunk (c_q + 4 i) ^ (c_row & 7) == 4 i ^ z
// == 8 (i / 2) + ((4 (i % 2)) ^ z), z = c_q ^ (c_row & 7) < 8). A warp's copy instruction moves 64
// contiguous bytes of each of 8 rows (whole sectors), and its shared chunks spread evenly over the
// banks. Positions are clamped to [0, len - 1] and [0, end - 1]: only built when len > 0.
template <typename T, typename Cfg>
struct ScoresKRing {
  static constexpr int D = Cfg::D, TD = Cfg::TD, TK = Cfg::TK, STAGES = Cfg::STAGES, LOADS = Cfg::LOADS;
  static_assert(TD == 4 * LOADS && TK * 4 == Cfg::THREADS, "one key row per 4 threads per tile");
  const AttentionScoresParams& p;
  const int* bt;
  const T* kbase;  // this KV head's elements of row 0 of page 0
  int64_t row_stride;
  int start, end, len, c_row, c_q;
  uint32_t c_dst[2];  // shared addresses of this thread's chunks for i % 2 == 0, 1 (stage 0, i / 2 == 0)

  __device__ __forceinline__ ScoresKRing(const AttentionScoresParams& p_, uint32_t sK_s, int h, int b, int tid,
                                         int start_, int end_, int len_)
      : p(p_), start(start_), end(end_), len(len_) {
    bt = p.block_table + int64_t(b) * p.max_pages;
    kbase = static_cast<const T*>(p.k_cache) + int64_t(h) * D;
    row_stride = int64_t(p.num_kv_heads) * D;
    c_row = tid >> 2;
    c_q = tid & 3;
    const int z = c_q ^ (c_row & 7);
    c_dst[0] = sK_s + uint32_t((c_row * TD + z) * 16);
    c_dst[1] = sK_s + uint32_t((c_row * TD + (4 ^ z)) * 16);
  }
  // This thread's row of tile t: its page, read a tile ahead of the copies so the dependent
  // block-table load does not stall them.
  __device__ __forceinline__ int fetch_page(int t) const {
    const int pos = min(start + t * TK + c_row, len - 1);
    return __ldg(bt + (p.page_shift >= 0 ? pos >> p.page_shift : pos / p.page_size));
  }
  __device__ __forceinline__ void issue(int t, int pg) const {
    const uint32_t stage_ofs = uint32_t((t % STAGES) * TK * D * 2);
    const int pos = start + t * TK + c_row;
    const bool valid = pos < end;
    const int cpos = min(pos, end - 1);
    const int in_page = p.page_shift >= 0 ? cpos & (p.page_size - 1) : cpos % p.page_size;
    const int64_t page = min(max(pg, 0), p.num_pages - 1);
    const T* src = kbase + page * p.k_page_stride + int64_t(in_page) * row_stride + c_q * 8;
#pragma unroll
    for (int i = 0; i < LOADS; ++i)
      cp_async_16_s(c_dst[i % 2] + stage_ofs + uint32_t((i / 2) * 128), src + i * 32, valid);
  }
  // One commit group: tile t's copies (none past the split's last tile) with its row's page pg;
  // returns the page of tile t + 1.
  __device__ __forceinline__ int step(int t, int num_tiles, int pg) const {
    if (t < num_tiles) issue(t, pg);
    cp_async_commit();
    return fetch_page(t + 1);
  }
  // The ring's first STAGES - 1 tiles in flight; returns the page of tile STAGES - 1.
  __device__ __forceinline__ int prime(int num_tiles) const {
    int pg = fetch_page(0);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) pg = step(s, num_tiles, pg);
    return pg;
  }
};

// ---- pass 2, "transposed" (the default since session 8; KVCORE_SCORES_VARIANT=untransposed runs
// attention_scores_kernel<.., true> instead) ------------------------------------------------------
// The same scores as attention_scores_kernel<.., true> (same reduction order guarantees: fixed,
// hence bitwise reproducible; not bitwise equal to it), built for the per-element epilogue that
// the SASS counts in bench/NOTES.md ("attention_scores, session 6") found dominant:
//  * keys on the mma's M dimension and query rows on N (S^T = K Q^T): ldmatrix of the K tile gives
//    the A fragment, the row fragments held in registers are the B operand (the same registers as
//    the A fragments of the default kernel: B's (n, k) pairs are A's (m, k) pairs). A lane then
//    holds 2 keys x 8 rows, so the reduction over rows is 7 in-thread combines per key and a
//    2-step quad butterfly (the default: 4 keys x 4 rows, then a 3-step butterfly per key pair);
//  * the reduction (sum or max) is a template parameter: no branch per combine;
//  * tiles whose keys every row of a warp sees (all but the last w or so keys of a sequence) skip
//    the per-element visibility select;
//  * the cross-warp sum of tile t is done after the barrier that opens tile t + 1 (sRed is double
//    buffered), so a tile costs one barrier, not two, and the 8-value sums hide behind the mmas.
// Cfg is ScoresConfig<D>; this kernel takes Cfg::SMEM_BYTES_T of dynamic shared memory.
template <typename T, typename Cfg, bool MAX>
__global__ void __launch_bounds__(Cfg::THREADS, 2) attention_scores_pass2_t_kernel(const AttentionScoresParams p) {
  constexpr int D = Cfg::D, TK = Cfg::TK, STAGES = Cfg::STAGES;
  constexpr int MT = Cfg::MT, KS = Cfg::KS, WARPS = Cfg::WARPS, THREADS = Cfg::THREADS;
  constexpr int NT = MT * 2;  // n-tiles of 8 rows per warp (the warp's MT * 16 rows)
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const sK = reinterpret_cast<T*>(smem_raw);
  float* const sRed = reinterpret_cast<float*>(smem_raw + Cfg::SMEM_TILES);  // [2][WARPS][TK]
  const uint32_t sK_s = static_cast<uint32_t>(__cvta_generic_to_shared(sK));

  const int h = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const ScoresSplit sp = scores_split<TK>(p, split, b);
  const int len = sp.len, start = sp.start, end = sp.end, num_tiles = sp.num_tiles;
  const int64_t pair = int64_t(b) * p.num_kv_heads + h;
  float* const out_row = p.out + pair * p.max_len;

  scores_zero_tail<THREADS>(p, out_row, start, len, tid);
  if (num_tiles == 0) return;
  const int num_row_blocks = (p.rows + Cfg::ROWS - 1) / Cfg::ROWS;

  const ScoresKRing<T, Cfg> ring(p, sK_s, h, b, tid, start, end, len);

  // Lane roles. A (keys x d, from ldmatrix): lane l addresses key (l & 7) + 8 * ((l >> 3) & 1) of
  // the 16-key sub-tile and 16-byte chunk (l >> 4) of the k-step. B (d x rows): row r0 of each
  // n-tile, d pairs cpair, cpair + 8. C (keys x rows): keys r0 and r0 + 8, rows cpair and cpair + 1.
  const int r0 = lane >> 2, cpair = (lane & 3) * 2;
  const int a_key = (lane & 7) + ((lane >> 3) & 1) * 8, a_chunk = lane >> 4;
  const float norm = p.reduction == kScoreMean ? 1.f / float(p.rows) : 1.f;
  const float scale_log2 = p.scale_log2;

  for (int rb = 0; rb < num_row_blocks; ++rb) {
    int page = ring.prime(num_tiles);

    const int warp_row0 = rb * Cfg::ROWS + warp * MT * 16;
    const bool active = warp_row0 < p.rows;
    // Every row of this warp is real: then a tile all of whose keys are <= len - w (the first
    // window query's last key) is seen by every row, and the select can go.
    const bool warp_full = warp_row0 + MT * 16 <= p.rows;
    const int nact = min(WARPS, (p.rows - rb * Cfg::ROWS + MT * 16 - 1) / (MT * 16));
    // B fragments: row warp_row0 + nt * 8 + r0 (zero past R).
    uint32_t qb[NT][KS][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      int i, g;
      const bool real = scores_row(warp_row0 + nt * 8 + r0, p.rows, p.group, i, g);
      const T* qrow = scores_q_row<T>(p, b, i, h * p.group + g, cpair);
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) scores_q_frags(qrow, ks, real, qb[nt][ks][0], qb[nt][ks][1]);
    }
    // The C columns' rows warp_row0 + nt * 8 + cpair + e (c = nt * 8 + e below): lse in the log2
    // domain (0 for padding rows, which the visibility mask drops).
    float lse2[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        int i, g;
        const bool real = scores_row(warp_row0 + nt * 8 + cpair + e, p.rows, p.group, i, g);
        lse2[nt][e] = real ? __ldg(p.lse + (int64_t(b) * p.window + i) * (int64_t(p.num_kv_heads) * p.group) +
                                   h * p.group + g) * kLog2e
                           : 0.f;
      }
    // Visibility without a per-row limit in registers: row r (< R) sees key k iff
    // k <= len - w + floor(r / G), i.e. iff (k - (len - w)) * G <= r (integers, G > 0). With
    // r = lane_row0 + c: c >= (k - len + w) * G - lane_row0, and c < R - lane_row0 for real rows.
    // The factor is clamped at -1 (every real row sees such a key) so the product stays in int32:
    // keys run at most a tile past len, so it is <= (w + TK) * G <= 2^30.
    const int lane_row0 = warp_row0 + cpair;
    const int rows_left = p.rows - lane_row0;
    const uint32_t real_bits = rows_left >= 32 ? 0xffffffffu : rows_left <= 0 ? 0u : (1u << rows_left) - 1u;
    auto seen_bits = [&](int key) {  // bit c set: row lane_row0 + c sees key
      const int first = max(key - (len - p.window), -1) * p.group - lane_row0;
      const uint32_t from = first <= 0 ? 0xffffffffu : first >= 32 ? 0u : 0xffffffffu << first;
      return from & real_bits;
    };

    // Cross-warp combine of tile tt's per-warp column results (sRed[tt & 1]) into out, in warp
    // order; row blocks after the first add to what the earlier ones wrote (same thread, same key).
    auto finish_tile = [&](int tt) {
      if (tid < TK) {
        const int key = start + tt * TK + tid;
        if (key < end) {
          const float* red = sRed + (tt & 1) * (WARPS * TK) + tid;
          float v = red[0];
#pragma unroll
          for (int w = 1; w < WARPS; ++w)
            if (w < nact) v = scores_combine<MAX>(v, red[w * TK]);
          if (rb > 0) v = scores_combine<MAX>(out_row[key], v);
          if (rb == num_row_blocks - 1) {
            v *= norm;
            scores_save_edge(p, pair, key, v);
          }
          out_row[key] = v;
        }
      }
    };

    // One tile of this warp: 4 sub-tiles of 16 keys. FULL: every row of the warp sees every key.
    // ldmatrix addresses: the key row's chunk ks*2 + a_chunk sits at chunk (ks*2 + a_chunk) ^ (key & 7)
    // (scores_swz), and key & 7 == lane & 7 for every sub-tile. Since ks*2 + a_chunk == (ks*2) ^ a_chunk,
    // that chunk is 8 * (ks / 4) + ((2 * (ks % 4)) ^ y) with y = a_chunk ^ (lane & 7) < 8: four
    // per-thread byte offsets (ks % 4) plus 128-byte steps, so the k-steps cost no address math.
    const int y = a_chunk ^ (lane & 7);
    auto warp_tile = [&](uint32_t kt_s, int tile0, float* red, auto full_tag) {
      constexpr bool FULL = decltype(full_tag)::value;
      uint32_t a_addr[4];
#pragma unroll
      for (int k4 = 0; k4 < 4; ++k4) a_addr[k4] = kt_s + uint32_t(a_key * D * 2 + ((2 * k4) ^ y) * 16);
      float* const my_red = red + r0;
#pragma unroll 1
      for (int j = 0; j < TK / 16; ++j) {
        float acc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
        const uint32_t jofs = uint32_t(j * 16 * D * 2);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
          uint32_t ka[4];  // keys j*16 .. +15, d 16*ks .. +15
          ldmatrix_x4_s(ka, a_addr[ks % 4] + jofs + uint32_t((ks / 4) * 128));
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma_16816(acc[nt], ka, qb[nt][ks][0], qb[nt][ks][1], T{});
        }
        // c[hk]: this lane's rows combined for key j*16 + r0 + 8 * hk (acc[.][2 * hk + e]), in the
        // fixed order nt, e. The first term starts the combine (for max too: every term is >= 0 or NaN).
        float c[2];
        uint32_t seen[2] = {0xffffffffu, 0xffffffffu};
        if constexpr (!FULL) {
          const int key0 = tile0 + j * 16 + r0;
          seen[0] = seen_bits(key0);
          seen[1] = seen_bits(key0 + 8);
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int hk = 0; hk < 2; ++hk)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float x = acc[nt][2 * hk + e] * scale_log2 - lse2[nt][e];
              float pr;
              if constexpr (FULL) pr = exp2f(x);
              else pr = (seen[hk] >> (nt * 8 + e)) & 1u ? exp2f(x) : 0.f;  // unseen: an exact 0
              c[hk] = nt == 0 && e == 0 ? pr : scores_combine<MAX>(c[hk], pr);
            }
        // The quad's lanes hold the other rows (cpair) of the same two keys.
#pragma unroll
        for (int off = 1; off < 4; off <<= 1)
#pragma unroll
          for (int hk = 0; hk < 2; ++hk) c[hk] = scores_combine<MAX>(c[hk], __shfl_xor_sync(0xffffffffu, c[hk], off));
        if ((lane & 3) == 0) {
          my_red[j * 16] = c[0];
          my_red[j * 16 + 8] = c[1];
        }
      }
    };

    for (int t = 0; t < num_tiles; ++t) {
      cp_async_wait<STAGES - 2>();
      // Tile t landed for every thread; stage (t-1) % STAGES is free again; every warp's tile t-1
      // results are in sRed[(t-1) & 1], and nobody still reads sRed[t & 1] (tile t-2's, read by
      // finish_tile before this barrier).
      __syncthreads();
      if (t > 0) finish_tile(t - 1);
      page = ring.step(t + STAGES - 1, num_tiles, page);

      const uint32_t kt_s = sK_s + uint32_t((t % STAGES) * TK * D * 2);
      const int tile0 = start + t * TK;
      if (active) {
        float* red = sRed + (t & 1) * (WARPS * TK) + warp * TK;
        if (warp_full && tile0 + TK - 1 <= len - p.window) warp_tile(kt_s, tile0, red, std::true_type{});
        else warp_tile(kt_s, tile0, red, std::false_type{});
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the last tile's results are in sRed; the ring is free for the next row block
    finish_tile(num_tiles - 1);
    __syncthreads();  // sRed is rewritten by the next row block's first tiles
  }
}

// ---- pass 1 of the transposed variant (the default since session 8) ----------------------------
// attention_scores_kernel<.., false> with the variant ring (ScoresKRing), ldmatrix addresses kept in
// two registers, and no visibility select on tiles every row of the warp sees. The layout stays
// rows-on-M (the row-wise running max and sum want a lane to hold few rows and many keys), so the
// epilogue per element is the default's: the same values in the same order, hence the same part
// sums bit for bit on every tile whose select it drops (the select only touches unseen keys).
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, 2) attention_scores_pass1_t_kernel(const AttentionScoresParams p) {
  constexpr int D = Cfg::D, TK = Cfg::TK, STAGES = Cfg::STAGES;
  constexpr int MT = Cfg::MT, KS = Cfg::KS, THREADS = Cfg::THREADS;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t sK_s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));

  const int h = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const ScoresSplit sp = scores_split<TK>(p, split, b);
  const int len = sp.len, start = sp.start, end = sp.end, num_tiles = sp.num_tiles;
  const int64_t pair = int64_t(b) * p.num_kv_heads + h;
  if (num_tiles == 0) {
    scores_empty_parts<THREADS>(p, pair, split, tid);
    return;
  }
  const int num_row_blocks = (p.rows + Cfg::ROWS - 1) / Cfg::ROWS;
  const ScoresKRing<T, Cfg> ring(p, sK_s, h, b, tid, start, end, len);

  // Lane roles as in attention_scores_kernel: rows r0 and r0 + 8 of each m-tile; key columns
  // cpair, +1. B fragments (keys x d) by ldmatrix: lane l addresses key (l & 7) of the n-tile and
  // logical chunk 4 * (kc / 2) + (l >> 3) of the k-step pair kc, kc + 1; swizzled (scores_swz, and
  // key & 7 == l & 7) that is (4 m) ^ yb == 8 (m / 2) + ((4 (m % 2)) ^ yb) with m = kc / 2 and
  // yb = (l >> 3) ^ (l & 7) < 8: two per-thread offsets plus 128-byte steps.
  const int r0 = lane >> 2, cpair = (lane & 3) * 2;
  const int yb = (lane >> 3) ^ (lane & 7);
  const float scale_log2 = p.scale_log2;

  for (int rb = 0; rb < num_row_blocks; ++rb) {
    int page = ring.prime(num_tiles);

    const int warp_row0 = rb * Cfg::ROWS + warp * MT * 16;
    const bool active = warp_row0 < p.rows;
    const bool warp_full = warp_row0 + MT * 16 <= p.rows;  // no padding row in this warp
    uint32_t qa[MT][KS][4];
    int lim[MT][2];
    scores_load_rows<false, T>(p, b, h, len, warp_row0, r0, cpair, qa, lim, nullptr);

    // Running max (log2 units) and sum of exp2 per lane and row, as in attention_scores_kernel.
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.f;

    auto warp_tile = [&](uint32_t kt_s, int tile0, auto full_tag) {
      constexpr bool FULL = decltype(full_tag)::value;
      const uint32_t b_addr[2] = {kt_s + uint32_t((lane & 7) * D * 2 + yb * 16),
                                  kt_s + uint32_t((lane & 7) * D * 2 + (4 ^ yb) * 16)};
#pragma unroll 1
      for (int j = 0; j < TK / 16; ++j) {
        float s[MT][2][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
        const uint32_t jofs = uint32_t(j * 16 * D * 2);
#pragma unroll
        for (int kc = 0; kc < KS; kc += 2) {
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            uint32_t bk[4];  // keys j*16 + nt*8 .. +7, d 16*kc .. 16*kc + 31
            ldmatrix_x4_s(bk, b_addr[(kc / 2) % 2] + jofs + uint32_t(nt * 8 * D * 2 + (kc / 4) * 128));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              mma_16816(s[mt][nt], qa[mt][kc], bk[0], bk[1], T{});
              mma_16816(s[mt][nt], qa[mt][kc + 1], bk[2], bk[3], T{});
            }
          }
        }
        const int key0 = tile0 + j * 16 + cpair;  // key of s[.][nt][e] is key0 + nt * 8 + (e & 1)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            float x[4];
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const float v = s[mt][nt][half * 2 + e] * scale_log2;
                if constexpr (FULL) x[nt * 2 + e] = v;
                else x[nt * 2 + e] = key0 + nt * 8 + e <= lim[mt][half] ? v : -INFINITY;
              }
            scores_online_update(x, m[mt][half], l[mt][half]);
          }
      }
    };

    for (int t = 0; t < num_tiles; ++t) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // tile t landed for every thread; stage (t-1) % STAGES is free again
      page = ring.step(t + STAGES - 1, num_tiles, page);
      const uint32_t kt_s = sK_s + uint32_t((t % STAGES) * TK * D * 2);
      const int tile0 = start + t * TK;
      if (active) {
        if (warp_full && tile0 + TK - 1 <= len - p.window) warp_tile(kt_s, tile0, std::true_type{});
        else warp_tile(kt_s, tile0, std::false_type{});
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the ring is refilled by the next row block

    if (active) scores_write_parts<MT>(p, m, l, pair, split, warp_row0, r0, lane);
  }
}

// One warp per (sequence, KV head, row): the row's natural-log lse from its split parts, into
// lse_out [B, w, Hq]. Fixed order (lane-strided, then a butterfly), so the result is reproducible.
__global__ void __launch_bounds__(256) merge_lse_kernel(const AttentionScoresParams p) {
  const int64_t item = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t total = int64_t(p.batch) * p.num_kv_heads * p.rows;
  if (item >= total) return;  // whole warps leave together (item is uniform in a warp)
  const float* part = p.part + item * p.splits;
  float mx = -INFINITY;
  for (int s = lane; s < p.splits; s += 32) mx = fmaxf(mx, part[s]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  const float base = mx == -INFINITY ? 0.f : mx;
  float sum = 0.f;
  for (int s = lane; s < p.splits; s += 32) sum += exp2f(part[s] - base);  // NaN part -> NaN sum
  sum = group_sum<32>(sum);
  if (lane == 0) {
    const int r = int(item % p.rows);
    const int64_t pair = item / p.rows;
    const int64_t b = pair / p.num_kv_heads, h = pair % p.num_kv_heads;
    const int i = r / p.group, g = r % p.group;
    const int64_t hq = int64_t(p.num_kv_heads) * p.group;
    p.lse_out[(b * p.window + i) * hq + h * p.group + g] = sum == 0.f ? -INFINITY : (base + log2f(sum)) * kLn2;
  }
}

// Pooling of the prefix keys [0, L - w) of one (sequence, KV head, segment of kPoolSeg keys):
// the segment's unpooled scores are staged in shared memory before any is overwritten; the
// neighbours' keys its windows reach come from the edges pass 2 saved.
__global__ void __launch_bounds__(256) pool_scores_kernel(const AttentionScoresParams p) {
  __shared__ float seg[kPoolSeg + 2 * kEdge];  // seg[kEdge + k]: key x0 + k, k in [-kEdge, kPoolSeg + kEdge)
  const int sg = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int n = scores_len(p, b) - p.window;  // prefix length
  const int x0 = sg * kPoolSeg;
  if (x0 >= n) return;  // uniform over the CTA
  const int x1 = min(n, x0 + kPoolSeg);
  const int64_t pair = int64_t(b) * p.num_kv_heads + h;
  float* const out_row = p.out + pair * p.max_len;
  const int rad = p.pool_kernel / 2;
  for (int k = threadIdx.x; k < x1 - x0; k += blockDim.x) seg[kEdge + k] = out_row[x0 + k];
  if (threadIdx.x < kEdge) {
    const int k = threadIdx.x;
    // Left halo keys x0 - kEdge + k are the right edge of segment sg - 1; right halo keys x1 + k
    // (only read when x1 is a segment end, i.e. the next segment exists and holds them).
    seg[k] = sg > 0 ? p.edges[(pair * p.num_segs + sg - 1) * (2 * kEdge) + kEdge + k] : 0.f;
    const bool right = x1 == x0 + kPoolSeg && x1 + k < n;
    seg[kEdge + kPoolSeg + k] = right ? p.edges[(pair * p.num_segs + sg + 1) * (2 * kEdge) + k] : 0.f;
  }
  __syncthreads();
  const float inv_k = 1.f / float(p.pool_kernel);
  for (int x = x0 + threadIdx.x; x < x1; x += blockDim.x) {
    const int lo = max(0, x - rad), hi = min(n - 1, x + rad);
    float acc = p.pool_max ? -INFINITY : 0.f;
    for (int y = lo; y <= hi; ++y) {
      const float v = seg[kEdge + y - x0];
      acc = p.pool_max ? nan_max(acc, v) : acc + v;
    }
    out_row[x] = p.pool_max ? acc : acc * inv_k;
  }
}

}  // namespace kvcore
