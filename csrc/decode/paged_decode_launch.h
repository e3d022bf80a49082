// Host side shared by the paged decode launchers (gqa_decode, block_sparse_decode): input checks
// common to both, the split choice, the workspace layout and the launch of gqa_decode_kernel.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "common/checks.h"
#include "common/cuda_dispatch.h"
#include "common/cuda_occupancy.h"
#include "common/env_switch.h"
#include "common/pdl.h"
#include "common/split_limits.h"
#include "common/tensor_map.h"
#include "kvcore/decode_score.cuh"
#include "kvcore/gqa_decode.cuh"
#include "kvcore/gqa_decode_page_major.cuh"
#include "kvcore/split_plan.h"
#include "kvcore/split_range.h"

namespace kvcore {
namespace paged_decode {

static_assert(kMaxSplits == kMaxKvSplits, "split_plan.h's cap is common/split_limits.h's");
// Leading workspace bytes that hold the per-(sequence, KV head) arrival counters.
constexpr int64_t kCounterBytes = int64_t(1) << 20;
// Positions are int32 in the kernel and run up to a few tiles past the capacity while pages are
// prefetched: keep that headroom below 2^31.
constexpr int64_t kMaxPositions = (int64_t(1) << 31) - (int64_t(1) << 16);

using kvcore::ctas_per_sm;  // csrc/common/cuda_occupancy.h

// Workspace regions start 256-byte aligned.
inline int64_t round256(int64_t n) { return (n + 255) / 256 * 256; }

// The split count and the split-KV workspace layout of one launch, shared by the paged decode
// kernels (gqa_decode, block_sparse_decode) and mla_decode. Workspace: arrival counters [pairs]
// in a fixed leading region (kCounterBytes), then `scratch` bytes the caller uses (gqa_decode's
// H2O score scratch; 0 otherwise), then partial_lse [pairs, splits, rows] (256-byte rounded) and
// partial_out [pairs, splits, rows, width] fp32. The counters must stay zero between calls
// whatever shapes the calls have, so no call's partials may ever overlap another call's counters:
// hence a fixed region rather than one sized by this call.
struct SplitPlan {
  int splits;
  int split_tokens;
  int64_t lse_offset;  // bytes from the workspace start (meaningful when splits > 1)
  int64_t out_offset;
};

// pairs: CTAs per split (what a counter counts for); pairs_name names them in the error
// message; kv_len: the most key positions one pair can have (from shapes only); tile: the
// kernel's tile (a split covers whole tiles); have: the workspace's bytes (0 when none).
// compute_bound: an automatic count from the hint by choose_splits_dominant (mla_decode's
// kernels above 16 heads a CTA) instead of choose_splits_hinted; short_cap_min_pairs: the pairs
// from which choose_splits_dominant caps a hinted count by the longest sequence. An explicit
// num_splits (requested > 1) that does not fit is an error; an automatic one is lowered until it fits.
inline SplitPlan plan_splits(const char* op, const char* pairs_name, int64_t pairs, int64_t kv_len, int slots,
                             int tile, int64_t requested, int64_t have, int64_t scratch, int64_t rows,
                             int64_t width, int64_t max_ctas = 0, int merge_batch = 0,
                             const SplitHint& hint = {}, bool compute_bound = false,
                             int64_t short_cap_min_pairs = 0) {
  int splits = requested > 0   ? int(std::min<int64_t>(requested, kMaxSplits))
               : compute_bound ? choose_splits_dominant(pairs, kv_len, hint, slots, max_ctas, merge_batch,
                                                         short_cap_min_pairs)
               : hint.active() ? choose_splits_hinted(pairs, kv_len, hint, slots, max_ctas, merge_batch)
                               : choose_splits(pairs, kv_len, slots, max_ctas, merge_batch);
  auto lse_bytes = [&](int n) { return round256(pairs * n * rows * 4); };
  auto bytes_for = [&](int n) { return kCounterBytes + scratch + lse_bytes(n) + pairs * n * rows * width * 4; };
  if (splits > 1) {
    TORCH_CHECK(requested <= 1 || (pairs * 4 <= kCounterBytes && bytes_for(splits) <= have), op, ": num_splits=",
                splits, " needs a workspace of ", bytes_for(splits), " bytes and ", pairs_name, " <= ",
                kCounterBytes / 4, "; got ", have, " bytes and ", pairs);
    if (pairs * 4 > kCounterBytes) splits = 1;
    while (splits > 1 && bytes_for(splits) > have) splits = std::max(1, splits / 2);
  }
  // Each split covers a whole number of tiles; an automatic count is recomputed to cover kv_len.
  // (The kernels shrink the split of a shorter sequence: split_range.h's split_chunk.)
  const int64_t split_tokens = split_tokens_for(kv_len, splits, tile);
  if (requested <= 0) splits = int(splits_to_cover(kv_len, split_tokens));
  const int64_t lse_offset = kCounterBytes + scratch;
  return {splits, int(split_tokens), lse_offset, lse_offset + lse_bytes(splits)};
}

// The workspace's size in bytes (0 when none is given): what plan_splits may lay out in it.
inline int64_t workspace_bytes(const c10::optional<at::Tensor>& workspace) {
  return workspace.has_value() ? workspace->numel() * workspace->element_size() : 0;
}

// Points a kernel's split scratch (arrival counters, partial_lse, partial_out) into the workspace
// at the plan's offsets; with one split the kernels touch none of it and nothing is set.
template <typename Params>
void use_split_workspace(Params& p, const SplitPlan& plan, const c10::optional<at::Tensor>& workspace) {
  if (plan.splits <= 1) return;
  uint8_t* base = static_cast<uint8_t*>(workspace->data_ptr());
  p.counters = reinterpret_cast<unsigned*>(base);
  p.partial_lse = reinterpret_cast<float*>(base + plan.lse_offset);
  p.partial_out = reinterpret_cast<float*>(base + plan.out_offset);
}

// Checks of the CUDA kernel's limits (beyond check_paged_decode's shape checks) and the fields
// of GqaDecodeParams that both ops fill the same way.
inline GqaDecodeParams common_params(const char* op, const PagedDecodeShape& s, const at::Tensor& q,
                                     const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                                     double logit_soft_cap, at::Tensor& out, const c10::optional<at::Tensor>& lse,
                                     const c10::optional<at::Tensor>& workspace) {
  TORCH_CHECK(q.is_cuda(), op, " (CUDA): q must be a CUDA tensor");
  TORCH_CHECK(s.head_dim == 64 || s.head_dim == 128 || s.head_dim == 256, op,
              " (CUDA): head_dim must be 64, 128 or 256, got ", s.head_dim);
  TORCH_CHECK(s.group >= 1 && s.group <= 16, op, " (CUDA): num_q_heads / num_kv_heads must be 1..16, got ", s.group);
  TORCH_CHECK(s.batch <= 65535, op, " (CUDA): batch must be <= 65535 (the grid's z dimension), got ", s.batch);
  TORCH_CHECK(s.max_pages * s.page_size < kMaxPositions, op, ": block_table capacity (max_pages x page_size = ",
              s.max_pages * s.page_size, ") must be < 2^31 - 2^16");
  TORCH_CHECK(s.num_pages < (int64_t(1) << 31), op, ": k_cache has too many pages (", s.num_pages, ")");
  TORCH_CHECK(q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0, op, ": q strides must be multiples of 8 elements, got ",
              c10::str(q.strides()));
  TORCH_CHECK(k_cache.stride(0) % 8 == 0 && v_cache.stride(0) % 8 == 0,
              op, ": k_cache/v_cache page strides must be multiples of 8 elements");
  check_aligned16(q, "q");
  check_aligned16(k_cache, "k_cache");
  check_aligned16(v_cache, "v_cache");
  check_aligned16(out, "out");
  if (workspace.has_value()) {
    check_same_device(*workspace, q, "workspace", "q");
    check_contiguous(*workspace, "workspace");
    check_aligned16(*workspace, "workspace");
  }
  // (The launchers check it against their own further arguments: score, the selection.)
  check_writes_apart({named(workspace, "workspace")},
                     {named(q, "q"), named(k_cache, "k_cache"), named(v_cache, "v_cache"), named(block_table, "block_table"),
                      named(seq_lens, "seq_lens"), named(out, "out"), named(lse, "lse")});
  GqaDecodeParams p{};
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_page_stride = k_cache.stride(0);
  p.v_page_stride = v_cache.stride(0);
  p.block_table = block_table.data_ptr<int>();
  p.seq_lens = seq_lens.data_ptr<int>();
  p.out = out.data_ptr();
  p.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  p.num_kv_heads = int(s.num_kv_heads);
  p.group = int(s.group);
  p.page_size = int(s.page_size);
  p.num_pages = int(s.num_pages);
  p.max_pages = int(s.max_pages);
  p.window_left = -1;
  p.soft_cap = float(logit_soft_cap);
  p.scale = float(scale);
  p.page_shift = (s.page_size & (s.page_size - 1)) == 0 ? __builtin_ctzll(uint64_t(s.page_size)) : -1;
  return p;
}

// H2O score scratch (decode_score.cuh): blocks of kScoreBlock keys per (sequence, KV head), and
// the workspace bytes it needs after the counters: the final lse2 per query head, then P (fp16)
// [pairs, blocks, group, kScoreBlock], then the bases (fp32) [pairs, blocks, group]. Each region
// starts 256-byte aligned (the decode kernel stores P rows as 8-byte pieces). 2.25 bytes per key
// and query head: no more than the 4 that kvcore.ops.decode_score_workspace_bytes still counts
// (the fp32 logits of the first version) for kv_len >= 9, up to one more 256-byte rounding; below
// that, and for the rounding, its room for split partials (63 MiB) covers the difference.
inline int64_t score_blocks(int64_t kv_len) { return (kv_len + kScoreBlock - 1) / kScoreBlock; }
inline int64_t score_lse_bytes(const PagedDecodeShape& s) { return round256(s.batch * s.num_q_heads * 4); }
inline int64_t score_prob_bytes(const PagedDecodeShape& s, int64_t kv_len) {
  return round256(s.batch * s.num_q_heads * score_blocks(kv_len) * kScoreBlock * 2);
}
inline int64_t score_bytes(const PagedDecodeShape& s, int64_t kv_len) {
  return score_lse_bytes(s) + score_prob_bytes(s, kv_len) + round256(s.batch * s.num_q_heads * score_blocks(kv_len) * 4);
}

// L2 priority of the H2O score path's P / base scratch (stored by the decode, read once by the
// epilogue): unset or "last" (the default since session 8) asks L2 to keep those lines
// (evict_last); KVCORE_SCORE_L2=normal leaves the normal priority. Session 8 timed the score
// path's overhead over plain gqa_decode back to back: B16 S8192 +12.7% (last) vs +16.8% (normal),
// B1 S32768 +18.3% vs +19.3% (bench/NOTES.md). Read once per process: an A/B switch.
inline int score_l2_priority() {
  static const int priority =
      env_choice("KVCORE_SCORE_L2", {"last", "normal"}, "gqa_decode (CUDA)") == 0 ? int(kL2EvictLast) : int(kL2Normal);
  return priority;
}

// KVCORE_SCORE_EPILOGUE: how the H2O score is finished. `fused` (the default since session 12):
// inside the decode kernel where the launch allows it (GqaDecodeParams::score_fused; see launch),
// else the epilogue kernel; `narrow` / `wide`: always the epilogue kernel (decode_score.cuh),
// with 4 keys per thread, or 8 (16-byte P loads and float4 score accesses; session 10; timed in
// session 11 no faster than narrow: bench/NOTES.md). Read once per process.
enum class ScoreEpilogue { kFused = 0, kNarrow = 1, kWide = 2 };
// (score_epilogue below.) KVCORE_SCORE_P: where a fused score launch keeps a CTA's P and bases.
// `local` (default since session 38): in the CTA's own shared memory past the ring, where that
// room keeps the CTAs per SM the plan assumed (GqaDecodeParams::score_p_local; see launch);
// `scratch`: always the workspace scratch, read back at the end. Read once per process.
inline bool score_p_local_allowed() {
  static const bool local = env_choice("KVCORE_SCORE_P", {"local", "scratch"}, "gqa_decode (CUDA)") == 0;
  return local;
}
inline ScoreEpilogue score_epilogue() {
  static const ScoreEpilogue mode = ScoreEpilogue(
      env_choice("KVCORE_SCORE_EPILOGUE", {"fused", "narrow", "wide"}, "gqa_decode (CUDA)"));
  return mode;
}

template <int KPT>
void launch_score_epilogue_kpt(const DecodeScoreParams& sp, int group, int64_t kv_len, int num_kv_heads, int64_t batch,
                               cudaStream_t stream) {
  const dim3 grid(unsigned((kv_len + kDecodeScoreKeys<KPT> - 1) / kDecodeScoreKeys<KPT>), unsigned(num_kv_heads),
                  unsigned(batch));
  const PdlLaunchConfig launch(grid, dim3(kDecodeScoreThreads), 0, stream);
  // The head loop's compile-time bound: the smallest of 1, 2, 4, 8, 16 that holds the group.
  auto kernel = group <= 1   ? decode_score_kernel<1, KPT>
                : group <= 2 ? decode_score_kernel<2, KPT>
                : group <= 4 ? decode_score_kernel<4, KPT>
                : group <= 8 ? decode_score_kernel<8, KPT>
                             : decode_score_kernel<16, KPT>;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.cfg, kernel, sp));
}

// The score epilogue (decode_score.cuh) after a SCORE decode launch on the same stream.
inline void launch_score_epilogue(const GqaDecodeParams& p, const PagedDecodeShape& s, int64_t kv_len,
                                  const at::Tensor& score, cudaStream_t stream) {
  if (kv_len <= 0) return;  // an empty block table attends nothing (and a 0-wide grid is an error)
  DecodeScoreParams sp{};
  sp.seq_lens = p.seq_lens;
  sp.probs = p.score_probs;
  sp.bases = p.score_bases;
  sp.lse2 = p.score_lse2;
  sp.blocks = p.score_blocks;
  sp.score = score.data_ptr<float>();
  sp.score_len = score.size(2);
  sp.num_kv_heads = int(s.num_kv_heads);
  sp.group = int(s.group);
  sp.window_left = p.window_left;
  sp.capacity = s.max_pages * s.page_size;
  sp.l2 = p.score_l2;
  if (score_epilogue() == ScoreEpilogue::kWide)
    launch_score_epilogue_kpt<8>(sp, int(s.group), kv_len, int(s.num_kv_heads), s.batch, stream);
  else
    launch_score_epilogue_kpt<4>(sp, int(s.group), kv_len, int(s.num_kv_heads), s.batch, stream);
}

// The K and V caches as gqa_decode_tma_kernel's tensor maps (GqaDecodeTmaMaps): columns are the
// num_kv_heads x D elements of a row, then page_size rows, then pages; boxes of 64 columns x
// min(page_size, TILE) rows x 1 page.
template <typename T, typename Cfg>
GqaDecodeTmaMaps kv_tensor_maps(const char* op, const GqaDecodeParams& p) {
  const bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  const cuuint64_t width = cuuint64_t(p.num_kv_heads) * Cfg::D;
  const cuuint32_t box[3] = {64, cuuint32_t(std::min(p.page_size, Cfg::TILE)), 1};
  const cuuint64_t k_dims[3] = {width, cuuint64_t(p.page_size), cuuint64_t(p.num_pages)};
  const cuuint64_t k_strides[2] = {width * sizeof(T), cuuint64_t(p.k_page_stride) * sizeof(T)};
  const cuuint64_t v_strides[2] = {width * sizeof(T), cuuint64_t(p.v_page_stride) * sizeof(T)};
  // L2 promotion of 128 bytes, the box rows' width. With 256 (the MLA map's) a box half's miss
  // also fetched the row's other half, which the next box read from L2: session 14, call 2, ncu
  // at B16 S8192: L2 hit rate 25.7% and 3.93 TB/s from DRAM against 0.9% and 4.20 for cp.async;
  // decode B16 91.0% of copy with 256, 94.7% with 128, 95.0% with none (cp.async: 97.8%).
  return {tensor_map_3d_sw128(op, bf16, p.k_cache, k_dims, k_strides, box, CU_TENSOR_MAP_L2_PROMOTION_L2_128B),
          tensor_map_3d_sw128(op, bf16, p.v_cache, k_dims, v_strides, box, CU_TENSOR_MAP_L2_PROMOTION_L2_128B)};
}

// Whether the loaded image of gqa_decode_tma_kernel has its body (sm_90a code only, see
// kernel_body_built): the body needs ~95-200 registers.
template <typename T, typename Cfg>
bool tma_body_built() {
  return kernel_body_built(reinterpret_cast<const void*>(gqa_decode_tma_kernel<T, Cfg, false>), 48);
}

// KVCORE_DECODE_LOADER: how gqa_decode brings K/V tiles into shared memory. `cp_async`: every
// thread issues 16-byte cp.async for its rows after a page lookup per page group; `tma`: warp 0
// issues TMA boxes, a few per tile (gqa_decode_tma_kernel), where tma_fits allows. Read once
// per process.
inline bool tma_loader_requested() {
  static const bool tma = env_choice("KVCORE_DECODE_LOADER", {"cp_async", "tma"}, "gqa_decode (CUDA)") == 1;
  return tma;
}

// Calls the TMA loader serves: no sliding window (its start moves tiles off page boundaries),
// page sizes that divide the tile with at least 8 rows (every segment starts on a 1024-byte
// swizzle atom) or are multiples of it, and a sm_90a image with the body. (The tensor map's
// 16-byte page strides hold already: common_params requires page strides of 8 elements.)
template <typename T, typename Cfg>
bool tma_fits(const GqaDecodeParams& p) {
  const int ps = p.page_size;
  if (p.window_left >= 0 || p.num_pages <= 0) return false;
  if (!((ps >= 8 && Cfg::TILE % ps == 0) || ps % Cfg::TILE == 0)) return false;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major == 9 && prop->minor == 0 && tma_body_built<T, Cfg>();
}

// KVCORE_DECODE_PAGE_ORDER: `auto` (default): where use_page_order says so, gqa_decode's CTAs
// visit their split's pages in cache order (the ORDER kernels, gqa_decode_body); `table`: always
// in the block table's order; `unsorted` (an A/B switch): as auto, but the head kernel's ORDER
// instances keep the table's order in their list (GqaDecodeParams::order_skip_sort). Read once
// per process.
inline int page_order_mode() {
  static const int mode =
      env_choice("KVCORE_DECODE_PAGE_ORDER", {"auto", "table", "unsorted"}, "gqa_decode (CUDA)");
  return mode;
}
inline bool page_order_switch_on() { return page_order_mode() != 1; }

// What every ORDER instance (the head kernel's and the page-major kernel's) needs: the switch
// allows it, a split's pages fit the sorted list (at most kOrderMaxPages) and the cache's page
// numbers fit the packed entries.
inline bool page_order_fits(const GqaDecodeParams& p, int64_t split_tokens) {
  return page_order_switch_on() && split_tokens / p.page_size <= kOrderMaxPages &&
         int64_t(p.num_pages) <= kOrderMaxCachePages;
}

// Whether a gqa_decode launch (no score buffer, cp.async loader) runs the ORDER kernel: an
// automatic split count (a forced one keeps the table's order, whose bits the score path
// reproduces at the same count), no sliding window (its start is not page-aligned), a
// power-of-two page of at most a tile, and page_order_fits.
template <typename Cfg>
bool use_page_order(const GqaDecodeParams& p, int64_t requested_splits, int64_t split_tokens) {
  return requested_splits == 0 && p.window_left < 0 && p.page_shift >= 0 && p.page_size <= Cfg::TILE &&
         page_order_fits(p, split_tokens);
}

// KVCORE_DECODE_NARROW_RING: the ring depth of gqa_decode's 4-warp kernel at head_dim 128 where
// no score buffer, TMA loader or block list is involved. `auto` (default): narrow_ring_depth_two's
// rule; `3`: always the 3-stage ring (GqaDecodeConfig<128>, also the score and block-sparse
// kernels' ring); `2`: always NarrowRingConfig. Read once per process.
inline int narrow_ring_switch() {
  static const int mode = env_choice("KVCORE_DECODE_NARROW_RING", {"auto", "3", "2"}, "gqa_decode (CUDA)");
  return mode;
}

// The 4-warp kernel with a ring of 2 tiles (64 KB) instead of 3, launched with the 3-stage ring's
// shared memory so that an SM still holds two CTAs, not three: the same tile, threads and CTAs
// per SM, so the split plan made for GqaDecodeConfig<128> holds for it unchanged.
using NarrowRingConfig = GqaDecodeConfig<128, 2, 4, GqaDecodeConfig<128>::SMEM_BYTES>;
static_assert(NarrowRingConfig::TILE == GqaDecodeConfig<128>::TILE &&
                  NarrowRingConfig::THREADS == GqaDecodeConfig<128>::THREADS &&
                  NarrowRingConfig::launch_smem(NarrowRingConfig::smem_bytes(false, false, true)) ==
                      GqaDecodeConfig<128>::SMEM_BYTES,
              "the 2-stage ring runs the 3-stage ring's plan: same tile and threads, padded to its shared memory");
// Tiles a split needs before the 2-stage ring is taken (auto).
constexpr int64_t kNarrowRingMinTiles = 64;

// Whether this launch of the 4-warp head_dim-128 kernel uses the 2-stage ring: under `auto`, on
// Hopper, where the grid is one wave (ctas <= slots) and each split has at least
// kNarrowRingMinTiles tiles. Measured (session 35, decode_trace with random tables and the page
// sort, us, 3 / 2 stages, two reps each): one wave of long splits gained, on an H200 B32 Hq64
// S8192 (128 tiles a CTA) 248.7-249.0 / 246.8-247.1 and B1 S131072 at 32 splits (64 tiles)
// 130.0-130.1 / 129.1, on an H100 348.8-349.2 / 344.9-345.0 and 179.0-179.1 / 178.4-178.7; short
// splits and several waves lost, on the H200 B1 S32768 at 32 splits (16 tiles) 38.4-38.5 / 38.9,
// B64 S4096 (2 waves) 250.0-250.3 / 251.9-252.2 (H100 343.5-343.7 / 344.0-344.2), B128 S2048 (4
// waves) 248.9 / 257.5-258.5.
inline bool narrow_ring_depth_two(int64_t ctas, int64_t slots, int64_t split_tokens) {
  const int mode = narrow_ring_switch();
  if (mode != 0) return mode == 2;
  return at::cuda::getCurrentDeviceProperties()->major == 9 && ctas <= slots &&
         split_tokens >= kNarrowRingMinTiles * GqaDecodeConfig<128>::TILE;
}

// Picks the split, lays out the workspace and launches. kv_len: the most key positions one
// (sequence, KV head) can have, from shapes only. SCORE: gqa_decode with an H2O score buffer
// (`score` not null), which also needs workspace room for the score scratch (score_bytes) and a second
// small launch.
// TMA: gqa_decode_tma_kernel (not SPARSE; SPP unused), with the caches' tensor maps built here.
template <typename T, typename Cfg, bool SPARSE, bool SCORE, int SPP, bool TMA = false>
void launch(const char* op, GqaDecodeParams& p, const PagedDecodeShape& s, int64_t kv_len,
            int64_t requested_splits, const c10::optional<at::Tensor>& workspace, cudaStream_t stream,
            const at::Tensor* score = nullptr, const SplitHint& hint = {}) {
  constexpr auto kernel = [] {
    if constexpr (TMA)
      return gqa_decode_tma_kernel<T, Cfg, SCORE>;
    else
      return gqa_decode_kernel<T, Cfg, SPARSE, SCORE, SPP>;
  }();
  const size_t smem = Cfg::launch_smem(Cfg::smem_bytes(SPARSE, TMA));
  [[maybe_unused]] GqaDecodeTmaMaps maps{};
  if constexpr (TMA) maps = kv_tensor_maps<T, Cfg>(op, p);
  const int per_sm = ctas_per_sm(reinterpret_cast<const void*>(kernel), Cfg::THREADS, smem, op);
  const int slots = per_sm * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  const int64_t pairs = s.batch * s.num_kv_heads;
  const int64_t have = workspace_bytes(workspace);
  const int64_t sbytes = SCORE ? score_bytes(s, kv_len) : 0;
  if constexpr (SCORE) {
    TORCH_CHECK(kCounterBytes + sbytes <= have, op, ": score accumulation needs a workspace of at least ",
                kCounterBytes + sbytes, " bytes, got ", have,
                " bytes; pass a larger workspace (kvcore.ops.decode_workspace sizes it when score is given)");
  }
  // SCORE: the fused epilogue needs every CTA of a split pair resident at once (they wait for
  // each other), so an automatic split count keeps the grid to one wave.
  const bool want_fused = SCORE && score_epilogue() == ScoreEpilogue::kFused;
  const SplitPlan plan = plan_splits(op, "batch x num_kv_heads", pairs, kv_len, slots, Cfg::TILE, requested_splits,
                                     have, sbytes, s.group, s.head_dim, want_fused ? slots : 0,
                                     kMergeBatch<Cfg::D>, hint);
  p.num_splits = plan.splits;
  p.split_tokens = plan.split_tokens;
  // What a non-TMA launch runs: the kernel of ring R (Cfg, or NarrowRingConfig below), or its
  // ORDER instance (instantiated for the two-slot and whole-tile page groups: pages of 16 to 64
  // tokens at D 128, up to 128 on the 8-warp kernel) where that serves the call and keeps the
  // CTAs per SM the plan assumed (per_sm).
  using Launchable = std::pair<void (*)(GqaDecodeParams), size_t>;
  [[maybe_unused]] auto instance = [&](auto ring) -> Launchable {
    using R = decltype(ring);
    Launchable run{gqa_decode_kernel<T, R, SPARSE, SCORE, SPP>, R::launch_smem(R::smem_bytes(SPARSE))};
    if constexpr (!SPARSE && !SCORE && (SPP == 2 || SPP == R::LOADS)) {
      if (use_page_order<R>(p, requested_splits, plan.split_tokens)) {
        const Launchable ordered{gqa_decode_kernel<T, R, false, false, SPP, true>,
                                 R::launch_smem(R::smem_bytes(false, false, true))};
        if (occupancy_per_sm(reinterpret_cast<const void*>(ordered.first), R::THREADS, ordered.second) == per_sm)
          run = ordered;
      }
    }
    return run;
  };
  Launchable run{nullptr, 0};
  if constexpr (!TMA) {
    run = instance(Cfg{});
    if constexpr (std::is_same_v<Cfg, GqaDecodeConfig<128>> && !SPARSE && !SCORE) {
      if (narrow_ring_depth_two(pairs * plan.splits, slots, plan.split_tokens)) {
        const Launchable shallow = instance(NarrowRingConfig{});
        if (occupancy_per_sm(reinterpret_cast<const void*>(shallow.first), NarrowRingConfig::THREADS, shallow.second) ==
            per_sm)
          run = shallow;
      }
    }
  }
  // Fused when the grid is one wave (or no pair is split), the departure counters fit next to the
  // arrival ones, and a CTA's staged keys fit the free part of its ring; otherwise (a forced
  // split count past one wave, long single-split pairs, large groups) the epilogue kernel.
  const bool fused = want_fused && (plan.splits == 1 || (pairs * plan.splits <= slots && 2 * pairs * 4 <= kCounterBytes)) &&
                     score_stage_total_bytes(plan.split_tokens, int(s.group)) <= Cfg::SMEM_STAGE;
  // Fused, a CTA adds only its own keys, so its P and bases can stay in its shared memory
  // (score_p_local): the launch grows by them past the ring, if the CTAs per SM stay per_sm (the
  // plan's, and a cooperative launch's) and the old values and lse2 fit the ring past the merge
  // area. It saves each P's store to the scratch and the read back at the end (B16 S8192: 8 MB
  // each way next to the 537 MB K/V stream).
  size_t launch_bytes = TMA ? smem : run.second;
  bool p_local = false;
  if constexpr (SCORE && !TMA) {
    const size_t keep = Cfg::SMEM_BYTES + score_stage_p_bytes(plan.split_tokens, int(s.group)) +
                        score_stage_base_bytes(plan.split_tokens, int(s.group));
    const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    if (fused && score_p_local_allowed() && keep <= optin && Cfg::SMEM_TILES >= Cfg::SMEM_MERGE &&
        Cfg::SMEM_MERGE + size_t(plan.split_tokens) * 4 + kScoreLse2Bytes <= Cfg::SMEM_TILES) {
      const size_t bytes = std::max(launch_bytes, keep);
      if (occupancy_per_sm(reinterpret_cast<const void*>(run.first), Cfg::THREADS, bytes) == per_sm) {
        p_local = true;
        launch_bytes = bytes;
      }
    }
  }
  use_split_workspace(p, plan, workspace);
  if constexpr (SCORE) {
    uint8_t* base = static_cast<uint8_t*>(workspace->data_ptr());
    p.score_lse2 = reinterpret_cast<float*>(base + kCounterBytes);
    p.score_probs = reinterpret_cast<__half*>(base + kCounterBytes + score_lse_bytes(s));
    p.score_bases = reinterpret_cast<float*>(base + kCounterBytes + score_lse_bytes(s) + score_prob_bytes(s, kv_len));
    p.score_blocks = score_blocks(kv_len);
    p.score_l2 = score_l2_priority();
    p.score_fused = fused ? 1 : 0;
    p.score_p_local = p_local ? 1 : 0;
    p.score = score->data_ptr<float>();
    p.score_len = score->size(2);
    p.departures = plan.splits > 1 ? p.counters + pairs : nullptr;
  }
  // KV heads vary fastest over the grid: the CTAs of one (sequence, split) read interleaved rows
  // of the same pages at about the same time, which keeps DRAM row-buffer locality.
  const dim3 grid(s.num_kv_heads, plan.splits, s.batch);
  if (fused && plan.splits > 1) {
    // Cooperative: the driver places the whole grid at once or fails the launch, so no CTA waits
    // for a pair mate that is not resident (also with other work on the GPU; captured graphs keep
    // the attribute on the kernel node).
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(Cfg::THREADS);
    cfg.dynamicSmemBytes = launch_bytes;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if constexpr (TMA)
      C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p, maps));
    else
      C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
  } else {
    if constexpr (TMA)
      kernel<<<grid, Cfg::THREADS, smem, stream>>>(p, maps);
    else
      run.first<<<grid, Cfg::THREADS, launch_bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if constexpr (SCORE) {
    if (!fused) launch_score_epilogue(p, s, kv_len, *score, stream);
  }
}

// Page groups of the kernel (gqa_decode_kernel's SPP): how many consecutive copy slots of a thread
// (THREADS / (D / 8) rows apart) share one page lookup. Groups need the page size to be a multiple
// of their row span and every tile to start aligned to it: tiles start at multiples of the tile
// from a split's first position, which is a multiple of the tile too, except with gqa_decode's
// sliding window (the window start moves it). Instantiated: 1, 2 and a whole tile's slots.
template <typename Cfg, bool SPARSE>
int page_groups(const GqaDecodeParams& p) {
  constexpr int step = Cfg::STEP;
  if (!p.dedup_pages || (!SPARSE && p.window_left >= 0)) return 1;
  if (p.page_size % (Cfg::LOADS * step) == 0) return Cfg::LOADS;
  return p.page_size % (2 * step) == 0 ? 2 : 1;
}

// KVCORE_DECODE_WARPS: warps per gqa_decode CTA at head_dim 128 without the TMA loader (and, since
// session 37, with a score buffer too). `auto` (default): use_wide_decode's choice; `4`: always the
// 4-warp kernel (64-token tiles, two CTAs per SM); `8`: always the 8-warp one (128-token tiles,
// one CTA per SM). Read once per process. (Where the 8-warp kernel's shared memory does not fit,
// the 4-warp one runs.)
inline int decode_warps_switch() {
  static const int mode = env_choice("KVCORE_DECODE_WARPS", {"auto", "4", "8"}, "gqa_decode (CUDA)");
  return mode;
}

// gqa_decode's 8-warp kernel (head_dim 128 only): 128-token tiles, a ring of 2 (132 KB of shared
// memory, one CTA per SM). Two stages, not three: one 64 KB tile in flight while one is computed
// was faster at B16 S8192 on an H100 (session 34, decode_trace, alternated: in order 178.8-179.0
// -> 175.8-175.9 us, random tables with the page sort 180.3-180.6 -> 178.2), though a CTA alone
// reads no faster (100.4 against 99.6 us of loop for 4 MiB).
using WideDecodeConfig = GqaDecodeConfig<128, 2, 8>;

// The 8-warp kernel with an H2O score buffer: the same ring, launched with 200 KB of shared
// memory (one CTA an SM either way) so that the fused score epilogue can stage a CTA's keys past
// the merge area: 128 KB, the P, bases and old scores of 10,000 keys at group 4 (B16 S8192 needs
// 104 KB; WideDecodeConfig's ring leaves 58 KB). Longer pairs take the epilogue kernel. (With P
// kept local, GqaDecodeParams::score_p_local, only the old values are staged there, and the launch
// grows past the ring by P and its bases where they fit: 204 KB at B16 S8192.)
using WideScoreConfig = GqaDecodeConfig<128, 2, 8, 200 * 1024>;

// Whether gqa_decode at head_dim 128 (cp.async loader; with or without a score buffer) runs the
// 8-warp kernel `Wide` (WideDecodeConfig, or WideScoreConfig with a score buffer; not where its
// launch's shared memory does not fit), one CTA per SM: when about one pair per SM fills the GPU
// as well as the 4-warp kernel's best split does, one CTA a pair needs no split merge at all.
// Session 17 (decode_trace, H200): B16 Hq32 Hkv8 S8192 127.9 us with one 8-warp CTA per pair
// against 129.7 with two 4-warp splits a pair; where the 8-warp kernel still needs splits or a
// second wave it was 0.3-2% slower (B1-B4, B32 Hq64, B64, B128). From shapes only, like the split
// count, and only for an automatic split count: a forced one keeps the 4-warp kernel (with and
// without a score buffer, which take the same kernel, so that they give the same bits at the same
// num_splits). With a hint of unequal lengths, only where the 4-warp kernel would not split either
// (then pairs <= SMs fill the GPU best one a CTA, as above): one CTA a pair leaves the longest
// pair's keys to one CTA, and the 8-warp kernel's 132 slots plan coarser splits than the 4-warp
// kernel's 264 (session 27, H100, B16 one long sequence among short ones: 51.5 us as 4 wide
// splits against 49.1 as 8 narrow ones; uniform lengths 101.3 as 2 wide against 98.3 as 4 narrow).
template <typename T, typename Wide>
bool use_wide_decode(const char* op, int64_t pairs, int64_t kv_len, int64_t requested_splits, const SplitHint& hint) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (Wide::launch_smem(Wide::smem_bytes(false)) > prop->sharedMemPerBlockOptin) return false;
  const int mode = decode_warps_switch();
  if (mode != 0) return mode == 2;
  // The automatic choice only where it was measured, Hopper (an A100's 164 KB per CTA did not hold
  // the 3-stage ring it had until session 34, and the 2-stage one has not been timed there).
  if (prop->major != 9) return false;
  const int sms = prop->multiProcessorCount;
  if (pairs > sms || requested_splits > 0) return false;
  using Narrow = GqaDecodeConfig<128>;
  const int narrow_slots = sms * ctas_per_sm(reinterpret_cast<const void*>(gqa_decode_kernel<T, Narrow, false, false, 2>),
                                             Narrow::THREADS, Narrow::smem_bytes(false), op);
  if (hint.active() && hint.fill < 1.0)
    return choose_splits_hinted(pairs, kv_len, hint, narrow_slots, 0, kMergeBatch<128>) == 1;
  // Equal lengths (a hint of fill 1 says only that they are max_keys, under the table's width):
  // the rule above at that length (planned_pairs keeps the pairs as they are).
  const auto [planned, keys] = planned_pairs(pairs, kv_len, hint);
  const int narrow_splits = choose_splits(planned, keys, narrow_slots, 0, kMergeBatch<128>);
  return double(pairs) / double(sms) + kStepFillGain >= wave_fill(pairs * narrow_splits, narrow_slots);
}

// KVCORE_DECODE_KERNEL: which kernel runs gqa_decode. `auto` (default): the page-major kernel
// with 8 or 4 KV heads a CTA where page_major_fills_one_wave says so (a hint of equal lengths), else
// gqa_decode_kernel; `head`: always gqa_decode_kernel, a CTA per (sequence, split, KV head);
// `page8`, `page4`, `page2`: the page-major kernel (gqa_decode_page_major.cuh) with a CTA per
// (sequence, split, block of that many KV heads) wherever it serves the call. Read once per process.
inline int decode_kernel_switch() {
  static const int mode =
      env_choice("KVCORE_DECODE_KERNEL", {"auto", "head", "page8", "page4", "page2"}, "gqa_decode (CUDA)");
  return mode;
}

// The KV heads a page-major CTA serves for this gqa_decode call (no score buffer), or 0 for
// gqa_decode_kernel: the switch asks for it (or, under `auto`, the hint's equal lengths fill the
// SMs once with unsplit CTAs of 8 KV heads, else of 4, and none of KVCORE_DECODE_WARPS,
// KVCORE_DECODE_NARROW_RING, the TMA loader or KVCORE_DECODE_PAGE_GROUPS=off is asked for),
// head_dim is 128, the page size a multiple of its 16-token stages, no sliding window (whose
// start is not stage-aligned), an automatic split count (a forced one keeps gqa_decode_kernel,
// whose bits the score path reproduces), the KV heads divide into blocks, and the ring fits the
// GPU's shared memory.
template <typename T>
int page_major_heads(const GqaDecodeParams& p, const PagedDecodeShape& s, int64_t requested_splits,
                     const SplitHint& hint) {
  const int mode = decode_kernel_switch();
  if (mode == 1) return 0;
  if (s.head_dim != 128 || p.window_left >= 0 || requested_splits > 0 || p.page_size % 16 != 0) return 0;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  auto serves = [&](auto cfg) {
    using Cfg = decltype(cfg);
    return s.num_kv_heads % Cfg::HEADS == 0 && Cfg::SMEM_BYTES <= prop->sharedMemPerBlockOptin;
  };
  if (mode == 2) return serves(PageMajorConfig<8>{}) ? 8 : 0;
  if (mode == 3) return serves(PageMajorConfig<4>{}) ? 4 : 0;
  if (mode == 4) return serves(PageMajorConfig<2>{}) ? 2 : 0;
  // `auto` steps aside for the other A/B switches, so that each still times what it names.
  if (hint.equal_keys <= 0 || decode_warps_switch() != 0 || narrow_ring_switch() != 0 || tma_loader_requested() ||
      !p.dedup_pages)
    return 0;
  // (a speed choice: where the kernel would not fit, the head kernel runs rather than an error)
  auto fills = [&](auto cfg) {
    using Cfg = decltype(cfg);
    return serves(cfg) &&
           occupancy_per_sm(reinterpret_cast<const void*>(gqa_decode_page_major_kernel<T, Cfg>), Cfg::THREADS,
                            Cfg::SMEM_BYTES) > 0 &&
           page_major_fills_one_wave(s.batch * (s.num_kv_heads / Cfg::HEADS), hint, prop->multiProcessorCount);
  };
  if (fills(PageMajorConfig<8>{})) return 8;
  return fills(PageMajorConfig<4>{}) ? 4 : 0;
}

// Launches the page-major kernel: the split count fills the CTA slots with (sequence, head block)
// units as choose_splits does with pairs; the workspace layout is plan_splits' with blocks for
// pairs and HEADS x group rows (the same bytes as gqa_decode_kernel's at the same split count).
// The slots are one CTA an SM at 8 and 4 heads (4 heads would fit two an SM): B64 S4096 Hq32
// Hkv8 as 4-head CTAs ran 340.9 us unsplit (128 CTAs, which the hardware places one an SM)
// against 346.1 as two splits (256 CTAs, two an SM; H100, session 36, decode_trace in cache order,
// random tables). At 2 heads (2 warps a CTA) B32 Hq64 ran 360.3 us unsplit (128 CTAs) against
// 350.4 as two splits (256), so the slots there stay the occupancy's.
//
// Its ORDER instance (pages visited in cache order) runs where pages are 16 tokens (a stage
// each), page_order_fits, and its 2 KB list keeps the CTAs per SM the plan assumed.
template <typename T, int HEADS>
void launch_page_major(const char* op, GqaDecodeParams& p, const PagedDecodeShape& s, int64_t kv_len,
                       const c10::optional<at::Tensor>& workspace, cudaStream_t stream) {
  using Cfg = PageMajorConfig<HEADS>;
  constexpr auto kernel = gqa_decode_page_major_kernel<T, Cfg>;
  constexpr auto ordered = gqa_decode_page_major_kernel<T, Cfg, true>;
  const int per_sm = ctas_per_sm(reinterpret_cast<const void*>(kernel), Cfg::THREADS, Cfg::SMEM_BYTES, op);
  const int slots = (HEADS >= 4 ? 1 : per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = s.batch * (s.num_kv_heads / HEADS);
  const int64_t have = workspace_bytes(workspace);
  const SplitPlan plan = plan_splits(op, "batch x num_kv_heads / heads per CTA", blocks, kv_len, slots,
                                     Cfg::STAGE_TOKENS, 0, have, 0, HEADS * s.group, s.head_dim, 0, Cfg::MERGE_SPLITS);
  p.num_splits = plan.splits;
  p.split_tokens = plan.split_tokens;
  use_split_workspace(p, plan, workspace);
  // Head blocks vary fastest: the CTAs of one (sequence, split) read the same pages at about the
  // same time.
  const dim3 grid(s.num_kv_heads / HEADS, plan.splits, s.batch);
  const bool order = p.page_size == Cfg::STAGE_TOKENS && page_order_fits(p, plan.split_tokens) &&
                     occupancy_per_sm(reinterpret_cast<const void*>(ordered), Cfg::THREADS,
                                      Cfg::smem_bytes(true)) == per_sm;
  if (order)
    ordered<<<grid, Cfg::THREADS, Cfg::smem_bytes(true), stream>>>(p);
  else
    kernel<<<grid, Cfg::THREADS, Cfg::SMEM_BYTES, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dtype x head-dim x page-group dispatch onto launch<T, Cfg, SPARSE, SCORE, SPP>.
// score (gqa_decode only, may be null): the H2O score buffer, which selects the SCORE kernels.
template <bool SPARSE>
void dispatch(const char* op, const at::Tensor& q, GqaDecodeParams& p, const PagedDecodeShape& s, int64_t kv_len,
              int64_t requested_splits, const c10::optional<at::Tensor>& workspace,
              const at::Tensor* score = nullptr, const SplitHint& hint = {}) {
  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_types(q.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    auto with_groups = [&](auto cfg, auto score_tag) {
      using Cfg = decltype(cfg);
      constexpr bool SCORE = decltype(score_tag)::value;
      const int spp = page_groups<Cfg, SPARSE>(p);
      if (spp == Cfg::LOADS)
        return launch<T, Cfg, SPARSE, SCORE, Cfg::LOADS>(op, p, s, kv_len, requested_splits, workspace, stream, score, hint);
      if (spp == 2) return launch<T, Cfg, SPARSE, SCORE, 2>(op, p, s, kv_len, requested_splits, workspace, stream, score, hint);
      return launch<T, Cfg, SPARSE, SCORE, 1>(op, p, s, kv_len, requested_splits, workspace, stream, score, hint);
    };
    auto go = [&](auto cfg) {
      using Cfg = decltype(cfg);
      if constexpr (!SPARSE) {
        // read on every gqa_decode call, so a misspelt value fails also where no kernel it names serves
        p.order_skip_sort = page_order_mode() == 2 ? 1 : 0;
        (void)narrow_ring_switch();
        if (score != nullptr) {
          // The score path runs the kernel the plain call would (the 8-warp one where
          // use_wide_decode says so), so that H2O's overhead is the score's alone: on an H100 at
          // B16 S8192 the 4-warp split kernel it always ran took 0.196 ms against plain decode's
          // 0.178 on the 8-warp kernel (0.180 on the 4-warp one; session 37).
          if constexpr (Cfg::D == 128) {
            if (use_wide_decode<T, WideScoreConfig>(op, s.batch * s.num_kv_heads, kv_len, requested_splits, hint))
              return with_groups(WideScoreConfig{}, std::true_type{});
          }
          return with_groups(cfg, std::true_type{});
        }
        if constexpr (Cfg::D == 128) {
          switch (page_major_heads<T>(p, s, requested_splits, hint)) {
            case 8: return launch_page_major<T, 8>(op, p, s, kv_len, workspace, stream);
            case 4: return launch_page_major<T, 4>(op, p, s, kv_len, workspace, stream);
            case 2: return launch_page_major<T, 2>(op, p, s, kv_len, workspace, stream);
            default: break;
          }
        }
        if (tma_loader_requested() && tma_fits<T, Cfg>(p))
          return launch<T, Cfg, false, false, 1, true>(op, p, s, kv_len, requested_splits, workspace, stream,
                                                       nullptr, hint);
        if constexpr (Cfg::D == 128) {
          if (use_wide_decode<T, WideDecodeConfig>(op, s.batch * s.num_kv_heads, kv_len, requested_splits, hint))
            return with_groups(WideDecodeConfig{}, std::false_type{});
        }
      }
      return with_groups(cfg, std::false_type{});
    };
    switch (s.head_dim) {
      case 64: return go(GqaDecodeConfig<64>{});
      case 128: return go(GqaDecodeConfig<128>{});
      default: return go(GqaDecodeConfig<256>{});
    }
  });
}

}  // namespace paged_decode
}  // namespace kvcore
