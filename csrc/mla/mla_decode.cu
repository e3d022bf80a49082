// CUDA launcher of mla_decode: the CUDA-only input checks, the head-block and split choice (from
// shapes and the caller's host-side length hint: never from seq_lens, so the call never syncs
// and can be captured in a CUDA graph), the workspace layout
// and the dtype dispatch. The kernel itself is framework-free: csrc/include/kvcore/mla_decode.cuh.
// The split count, workspace layout and occupancy query are gqa_decode's (paged_decode_launch.h).
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "common/cuda_occupancy.h"
#include "common/env_switch.h"
#include "common/tensor_map.h"
#include "decode/paged_decode_launch.h"
#include "kvcore/mla_decode.cuh"
#include "kvcore/mla_decode_seesaw.cuh"
#include "kvcore/mla_decode_wgmma.cuh"

namespace kvcore {
namespace {

// Widest latent row / value the kernel is compiled for (DeepSeek-V2/V3: 512 + 64 and 512).
// Narrower widths run on the same instantiation with zero-padded columns.
constexpr int kMaxDk = 576;
constexpr int kMaxDv = 512;

// Up to 16 heads run on mla_decode_h16_kernel (session 6's kernel; the default since session 7,
// when it passed the MLA CUDA tests and timed 88% of copy against mla_decode_kernel's 67%).
// KVCORE_MLA_DECODE_H16=old puts them back on mla_decode_kernel: read once per process, an A/B
// switch for `python -m kvcore.bench --group mla` and the old path's tests.
bool use_h16_kernel() {
  static const bool use = env_choice("KVCORE_MLA_DECODE_H16", {"new", "old"}, "mla_decode (CUDA)") == 0;
  return use;
}

// More than 32 heads run on mla_decode_wgmma_kernel (Hopper's warpgroup MMA, 64 heads per CTA,
// 64-token tiles; session 7) when the device is compute capability 9.0: the default since session 8,
// when it timed B1 H128 S32768 / B32 H128 S4096 / B128 H128 S1024 at 0.048 / 0.129 / 0.122 ms
// against mla_decode_kernel's (mma.sync, 32 heads per CTA) 0.146 / 0.210 / 0.233 ms.
// KVCORE_MLA_DECODE_WIDE=old puts them back on mla_decode_kernel: read once per process, an A/B
// switch for the benchmark and the old path's tests. (32-token tiles in 4 stages timed slower
// than 64-token tiles in 2, 0.141 vs 0.129 ms at B32: bench/NOTES.md, session 8.)
// KVCORE_MLA_DECODE_WIDE=seesaw runs mla_decode_seesaw_kernel instead (both warpgroups compute S,
// for alternate tiles; session 9; timed slower in session 10: B32 0.124 vs 0.110 ms).
enum class WideKernel { kWgmma = 0, kOld = 1, kSeesaw = 2 };
WideKernel wide_kernel() {
  static const WideKernel k =
      WideKernel(env_choice("KVCORE_MLA_DECODE_WIDE", {"wgmma", "old", "seesaw"}, "mla_decode (CUDA)"));
  return k;
}

// When a kernel that can defer its split merge (MlaDecodeParams::merge_separately; the 64-head
// kernels) does: the last CTA of a head block merges in the kernel only with at most
// kInKernelMergeMaxSplits splits and at least kInKernelMergeMinPairs (sequence, head block) pairs.
// Otherwise that CTA would read every split's partials alone at the end of the kernel, the
// critical path when few pairs share the GPU. bench/experiments/mla_merge_ab.cu (session 32, H100,
// H128, forced splits, us in-kernel / separate): 4096 keys, 16 pairs 2 splits 80.8 / 75.9, 4
// splits 54.7 / 48.4; 32 pairs 82.8 / 80.8, 61.7 / 58.9; 64 pairs 92.1 / 94.3, 3 splits 122.4 /
// 124.9, 4 splits 125.1 / 110.7; 128 pairs (2048 keys) 2 splits 114.9 / 118.7; 256 keys, 2-8
// pairs, 2-8 splits 23.0-29.0 / 16.3-18.1. (Until session 32: in the kernel up to 4 splits.)
constexpr int kInKernelMergeMaxSplits = 3;
constexpr int64_t kInKernelMergeMinPairs = 64;

// The length hint (plan_seq_lens) plans the split count of the 16-head kernels (h16 and the
// mma.sync kernel with M = 1) as gqa_decode's (choose_splits_hinted). The 32-head mma.sync kernel
// (17-32 heads on Hopper; every head count above 16 elsewhere) and the 64-head ones (wgmma,
// seesaw) are compute-bound, and each split reads its block's Q and writes its block's fp32
// partials: that plan's four waves over-split uniform lengths there (H100, session 28,
// bench/experiments/ragged_mla.py, B32 H128 on the wgmma kernel in a 4096-token table, us; no
// hint / that plan: uniform lengths 80.0 / 83.7), while it gained on one sequence of 4096 among
// 512s (80.6 / 67.0) and on every sequence at 256 keys (30.7 / 23.3, one split). They take the
// shapes' count, doubled where one long sequence dominates (split_plan.h's
// choose_splits_dominant, measured in session 29) and capped at a split per 256 keys of the
// longest (session 30: every sequence at 256 keys, B32 H128 30.9 -> 23.0 us, B64 H32 29.4 -> 23.8;
// on the 64-head kernels only from 16 pairs, session 31: B1 H128 17.7 us uncapped, 21.5 capped).
// The 16-head kernel with the hint: B64 H16 in an 8192-token table, one sequence full and the
// rest at 1024, 113.7 -> 82.1 us; every sequence 512 keys 30.9 -> 27.6; equal and uniform
// lengths unchanged.
constexpr int kMaxHintedRows = 16;

// The caller's split count (num_splits: 0 automatic) and host-side length hint (plan_seq_lens).
struct SplitRequest {
  int64_t splits;
  paged_decode::SplitHint hint;
};

// Occupancy, split plan and workspace layout of one kernel instantiation (Cfg: its ROWS, TILE,
// THREADS and SMEM_BYTES): fills p's split fields and returns the grid. can_merge_separately: the
// kernel can defer its split merge to a separate merge kernel (launch_merge).
template <typename Cfg>
dim3 plan_grid(const void* kernel, const MlaDecodeShape& s, MlaDecodeParams& p, const SplitRequest& req,
               const c10::optional<at::Tensor>& workspace, bool can_merge_separately) {
  const int per_sm = paged_decode::ctas_per_sm(kernel, Cfg::THREADS, Cfg::SMEM_BYTES, "mla_decode");
  const int slots = per_sm * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  p.head_blocks = int((s.num_heads + Cfg::ROWS - 1) / Cfg::ROWS);
  const int64_t pairs = s.batch * p.head_blocks;
  const int64_t kv_len = int64_t(p.max_pages) * p.page_size;
  const int64_t have = paged_decode::workspace_bytes(workspace);
  const paged_decode::SplitPlan plan = paged_decode::plan_splits(
      "mla_decode", "batch x head blocks", pairs, kv_len, slots, Cfg::TILE, req.splits, have, 0, Cfg::ROWS, s.dv, 0, 0,
      req.hint, /*compute_bound=*/Cfg::ROWS > kMaxHintedRows,
      /*short_cap_min_pairs=*/Cfg::ROWS >= 64 ? paged_decode::kWideShortCapMinPairs : 0);
  p.num_splits = plan.splits;
  p.split_tokens = plan.split_tokens;
  paged_decode::use_split_workspace(p, plan, workspace);
  // Head blocks vary fastest: the CTAs of one (sequence, split) read the same latent rows at
  // about the same time, so all but the first find them in L2.
  p.merge_separately =
      can_merge_separately && plan.splits > 1 &&
              (plan.splits > kInKernelMergeMaxSplits || pairs < kInKernelMergeMinPairs)
          ? 1
          : 0;
  return dim3(p.head_blocks, plan.splits, s.batch);
}

// The separate split merge, when plan_grid chose it.
void launch_merge(void (*merge)(MlaDecodeParams), const MlaDecodeShape& s, const MlaDecodeParams& p,
                  cudaStream_t stream) {
  if (p.merge_separately) {
    merge<<<dim3(unsigned(s.num_heads), unsigned(s.batch)), 128, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Occupancy, split plan, workspace layout and launch of one kernel instantiation (Cfg: its
// ROWS, TILE, THREADS and SMEM_BYTES). `merge`, when given, is the separate split-merge kernel
// the decode kernel defers to where plan_grid says (kInKernelMergeMaxSplits, kInKernelMergeMinPairs).
template <typename Cfg>
void launch(void (*kernel)(MlaDecodeParams), const MlaDecodeShape& s, MlaDecodeParams& p, const SplitRequest& req,
            const c10::optional<at::Tensor>& workspace, cudaStream_t stream,
            void (*merge)(MlaDecodeParams) = nullptr) {
  const dim3 grid =
      plan_grid<Cfg>(reinterpret_cast<const void*>(kernel), s, p, req, workspace, merge != nullptr);
  kernel<<<grid, Cfg::THREADS, Cfg::SMEM_BYTES, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_merge(merge, s, p, stream);
}

template <typename T, int M, int WARP_TOKENS>
void launch(const MlaDecodeShape& s, MlaDecodeParams& p, const SplitRequest& req,
            const c10::optional<at::Tensor>& workspace, cudaStream_t stream) {
  using Cfg = MlaDecodeConfig<kMaxDk, kMaxDv, M, WARP_TOKENS>;
  launch<Cfg>(mla_decode_kernel<T, Cfg>, s, p, req, workspace, stream);
}

template <typename T>
void launch_h16(const MlaDecodeShape& s, MlaDecodeParams& p, const SplitRequest& req,
                const c10::optional<at::Tensor>& workspace, cudaStream_t stream) {
  using Cfg = MlaDecodeH16Config<kMaxDk, kMaxDv>;
  auto kernel = mla_decode_h16_kernel<T, Cfg>;
  // Shaped for two CTAs per SM (98 KB of shared memory each): the largest carveout, so the driver
  // does not settle on one that holds a single CTA.
  prefer_max_shared_carveout(reinterpret_cast<const void*>(kernel));
  launch<Cfg>(kernel, s, p, req, workspace, stream);
}

// Whether the loaded image of mla_decode_wgmma_kernel has its body (sm_90a code only, see
// kernel_body_built): the body needs ~230 registers.
template <typename T>
bool wgmma_body_built() {
  return kernel_body_built(reinterpret_cast<const void*>(mla_decode_wgmma_kernel<T, MlaDecodeWgmmaConfig<kMaxDk, kMaxDv>>),
                           64);
}

// KVCORE_MLA_WGMMA_HANDOFF: how the wgmma kernel's warpgroups hand P to each other
// (MlaDecodeWgmmaConfig::MBAR_HANDOFF). `mbarrier` (the default since session 9) is the form
// compute-sanitizer's racecheck can judge (it does not model bar.arrive: session 8's
// bench/experiments/racecheck_named_barrier.cu) and timed the same as named barriers back to back
// (B32 H128 0.110 / 0.110 ms, B128 0.104 / 0.102, B1 0.046 / 0.045); `named` keeps the
// named-barrier form. Read once per process.
bool use_mbarrier_handoff() {
  static const bool use =
      env_choice("KVCORE_MLA_WGMMA_HANDOFF", {"mbarrier", "named"}, "mla_decode (CUDA)") == 0;
  return use;
}

template <typename T>
void launch_seesaw(const MlaDecodeShape& s, MlaDecodeParams& p, const SplitRequest& req,
                   const c10::optional<at::Tensor>& workspace, cudaStream_t stream) {
  using Cfg = MlaDecodeSeesawConfig<kMaxDk, kMaxDv>;
  launch<Cfg>(mla_decode_seesaw_kernel<T, Cfg>, s, p, req, workspace, stream,
              mla_merge_kernel<T, Cfg::ROWS, paged_decode::kMaxSplits>);
}

// KVCORE_MLA_WGMMA_LOADER: how the wgmma kernel loads its latent tiles. `cp_async` (the default):
// warpgroup 1's 128 threads, ~36 16-byte cp.async each per tile after a block-table load per row;
// `tma`: one thread issues TMA boxes (mla_decode_wgmma_tma_kernel, with the mbarrier hand-off;
// session 10; timed in session 11 no faster than cp.async: bench/NOTES.md), where the page size
// allows (tma_fits). Read once per process.
bool use_tma_loader() {
  static const bool use = env_choice("KVCORE_MLA_WGMMA_LOADER", {"cp_async", "tma"}, "mla_decode (CUDA)") == 1;
  return use;
}

// Page sizes the TMA boxes tile exactly (mla_wgmma::issue_tile_tma): a divisor of the 64-token tile
// of at least 8 rows (each page segment starts on a 1024-byte swizzle atom), or a multiple of it.
bool tma_fits(const MlaDecodeParams& p) {
  const int ps = p.page_size;
  return p.num_pages > 0 && ((ps >= 8 && 64 % ps == 0) || ps % 64 == 0);
}

template <typename T>
CUtensorMap latent_tensor_map(const MlaDecodeParams& p) {
  const cuuint64_t dims[3] = {cuuint64_t(p.dk), cuuint64_t(p.page_size), cuuint64_t(p.num_pages)};
  const cuuint64_t strides[2] = {cuuint64_t(p.dk) * sizeof(T), cuuint64_t(p.page_stride) * sizeof(T)};  // bytes
  const cuuint32_t box[3] = {64, cuuint32_t(std::min(p.page_size, 64)), 1};
  return tensor_map_3d_sw128("mla_decode", std::is_same<T, __nv_bfloat16>::value, p.cache, dims, strides, box);
}

template <typename T>
void launch_wgmma(const MlaDecodeShape& s, MlaDecodeParams& p, const SplitRequest& req,
                  const c10::optional<at::Tensor>& workspace, cudaStream_t stream) {
  if (use_tma_loader() && tma_fits(p)) {
    using Cfg = MlaDecodeWgmmaConfig<kMaxDk, kMaxDv, true, true>;
    auto kernel = mla_decode_wgmma_tma_kernel<T, Cfg>;
    const CUtensorMap map = latent_tensor_map<T>(p);
    const dim3 grid = plan_grid<Cfg>(reinterpret_cast<const void*>(kernel), s, p, req, workspace, true);
    kernel<<<grid, Cfg::THREADS, Cfg::SMEM_BYTES, stream>>>(p, map);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_merge(mla_merge_kernel<T, Cfg::ROWS, paged_decode::kMaxSplits>, s, p, stream);
    return;
  }
  auto go = [&](auto cfg) {
    using Cfg = decltype(cfg);
    launch<Cfg>(mla_decode_wgmma_kernel<T, Cfg>, s, p, req, workspace, stream,
                mla_merge_kernel<T, Cfg::ROWS, paged_decode::kMaxSplits>);
  };
  if (use_mbarrier_handoff())
    go(MlaDecodeWgmmaConfig<kMaxDk, kMaxDv, true>{});
  else
    go(MlaDecodeWgmmaConfig<kMaxDk, kMaxDv, false>{});
}

void mla_decode_cuda(const at::Tensor& q, const at::Tensor& latent_cache, const at::Tensor& block_table,
                     const at::Tensor& seq_lens, double scale, at::Tensor& out, const c10::optional<at::Tensor>& lse,
                     const c10::optional<at::Tensor>& workspace, int64_t num_splits, int64_t plan_total_keys,
                     int64_t plan_max_keys) {
  const MlaDecodeShape s = check_mla_decode(q, latent_cache, block_table, seq_lens, scale, out, lse, num_splits);
  check_plan_keys(plan_total_keys, plan_max_keys);
  TORCH_CHECK(q.is_cuda(), "mla_decode (CUDA): q must be a CUDA tensor");
  TORCH_CHECK(s.dk % 8 == 0 && s.dk <= kMaxDk, "mla_decode (CUDA): q's last dim (Dk) must be a multiple of 8 and <= ",
              kMaxDk, ", got ", s.dk);
  TORCH_CHECK(s.dv % 8 == 0 && s.dv <= kMaxDv, "mla_decode (CUDA): out's last dim (Dv) must be a multiple of 8 and <= ",
              kMaxDv, ", got ", s.dv);
  TORCH_CHECK(s.batch <= 65535, "mla_decode (CUDA): batch must be <= 65535 (the grid's z dimension), got ", s.batch);
  TORCH_CHECK(s.max_pages * s.page_size < paged_decode::kMaxPositions,
              "mla_decode: block_table capacity (max_pages x page_size = ", s.max_pages * s.page_size,
              ") must be < 2^31 - 2^16");
  TORCH_CHECK(s.num_pages < (int64_t(1) << 31), "mla_decode: latent_cache has too many pages (", s.num_pages, ")");
  TORCH_CHECK(q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0,
              "mla_decode (CUDA): q strides must be multiples of 8 elements, got ", c10::str(q.strides()));
  TORCH_CHECK(latent_cache.stride(0) % 8 == 0, "mla_decode (CUDA): latent_cache page stride must be a multiple of 8 "
              "elements, got ", latent_cache.stride(0));
  check_aligned16(q, "q");
  check_aligned16(latent_cache, "latent_cache");
  check_aligned16(out, "out");
  if (workspace.has_value()) {
    check_same_device(*workspace, q, "workspace", "q");
    check_contiguous(*workspace, "workspace");
    check_aligned16(*workspace, "workspace");
  }
  check_writes_apart({named(workspace, "workspace")}, {named(q, "q"), named(latent_cache, "latent_cache"),
                                                      named(block_table, "block_table"), named(seq_lens, "seq_lens"),
                                                      named(out, "out"), named(lse, "lse")});
  // A bad kernel switch fails every call, empty ones and those its kernel would not run too.
  use_h16_kernel();
  wide_kernel();
  use_mbarrier_handoff();
  use_tma_loader();
  if (s.batch == 0 || s.num_heads == 0) return;
  // int32 in the kernels (q's head stride may be 0, so an expanded q can claim any count).
  TORCH_CHECK(s.num_heads < (int64_t(1) << 31), "mla_decode (CUDA): num_heads must be < 2^31, got ", s.num_heads);

  MlaDecodeParams p{};
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.cache = latent_cache.data_ptr();
  p.page_stride = latent_cache.stride(0);
  p.block_table = block_table.data_ptr<int>();
  p.seq_lens = seq_lens.data_ptr<int>();
  p.out = out.data_ptr();
  p.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  p.num_heads = int(s.num_heads);
  p.dk = int(s.dk);
  p.dv = int(s.dv);
  p.page_size = int(s.page_size);
  p.num_pages = int(s.num_pages);
  // No pages at all: every sequence is empty (as on CPU), which a zero capacity gives the kernel.
  p.max_pages = s.num_pages > 0 ? int(s.max_pages) : 0;
  p.scale = float(scale);
  p.page_shift = (s.page_size & (s.page_size - 1)) == 0 ? __builtin_ctzll(uint64_t(s.page_size)) : -1;

  // The caller's host-side lengths (kvcore.mla_decode's plan_seq_lens), for an automatic split
  // count (the kernel choice follows the head count alone).
  const SplitRequest req{num_splits, paged_decode::split_hint(s.batch, int64_t(p.max_pages) * p.page_size,
                                                              plan_total_keys, plan_max_keys)};

  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_half_types(q.scalar_type(), "mla_decode", [&](auto tag) {
    using T = decltype(tag);
    // Up to 16 heads (memory-bound): mla_decode_h16_kernel (S split over the latent columns, Q
    // in registers, 16-token tiles in a 5-deep ring, two CTAs per SM); with
    // KVCORE_MLA_DECODE_H16=old, one m16 tile per CTA on mla_decode_kernel, 32-token tiles in a
    // 4-deep ring. More heads (compute-bound): 32 heads per CTA, which halves the
    // latent re-reads from L2, and 16 tokens per warp, so each Q fragment read from shared
    // memory serves two mma (Q reads dominate the shared-memory traffic); 64-token tiles leave
    // room for a 2-deep ring only, which a compute-bound tile loop hides.
    // More than 32 heads on Hopper: 64 heads per CTA on warpgroup MMA (the kernel has a body in
    // sm_90a code only; other devices and builds, and KVCORE_MLA_DECODE_WIDE=old, keep mma.sync).
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    const bool hopper = s.num_heads > 32 && prop->major == 9 && prop->minor == 0 && wgmma_body_built<T>();
    if (hopper && wide_kernel() == WideKernel::kWgmma)
      launch_wgmma<T>(s, p, req, workspace, stream);
    else if (hopper && wide_kernel() == WideKernel::kSeesaw)
      launch_seesaw<T>(s, p, req, workspace, stream);
    else if (s.num_heads <= 16 && use_h16_kernel())
      launch_h16<T>(s, p, req, workspace, stream);
    else if (s.num_heads <= 16)
      launch<T, 1, 8>(s, p, req, workspace, stream);
    else
      launch<T, 2, 16>(s, p, req, workspace, stream);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcore, CUDA, m) { m.impl("mla_decode", &mla_decode_cuda); }

}  // namespace kvcore
