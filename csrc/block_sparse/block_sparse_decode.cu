// CUDA launcher of block_sparse_decode: the gqa_decode kernel in its SPARSE form, where each
// (sequence, KV head) streams the pages of its own list (csrc/include/kvcore/gqa_decode.cuh).
#include <torch/library.h>

#include "common/env_switch.h"
#include "decode/paged_decode_launch.h"

namespace kvcore {
namespace {

// Page dedup (the default since session 8): each thread looks up the list entry and page of the
// first copy slot of each group of its slots in one page only (GqaDecodeParams::dedup_pages;
// pairs until session 12, whole page groups since): at page 16 a D128 thread made 8 dependent
// list + block-table load pairs per tile for 4 distinct pages. Session 8 timed the pair form on
// B16 Hkv8 D128 S32768 (37 x 128 tokens selected) back to back: page 16 70.2% of copy with it vs
// 66.4% without, page 128 76.2% vs 70.6%; B1 unchanged. KVCORE_SPARSE_PAGE_DEDUP=off turns it
// off (an A/B switch, read once per process).
bool page_dedup_enabled() {
  static const bool on = env_choice("KVCORE_SPARSE_PAGE_DEDUP", {"on", "off"}, "block_sparse_decode (CUDA)") == 0;
  return on;
}

void block_sparse_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                              const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& sel_pages,
                              const at::Tensor& sel_counts, double scale, double logit_soft_cap, at::Tensor& out,
                              const c10::optional<at::Tensor>& lse, const c10::optional<at::Tensor>& workspace,
                              int64_t num_splits) {
  const BlockSparseDecodeShape bs =
      check_block_sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel_pages, sel_counts, out, lse);
  const PagedDecodeShape& s = bs.paged;
  check_decode_scalars(scale, -1, logit_soft_cap, num_splits);
  GqaDecodeParams p = paged_decode::common_params("block_sparse_decode", s, q, k_cache, v_cache, block_table,
                                                  seq_lens, scale, logit_soft_cap, out, lse, workspace);
  check_writes_apart({named(workspace, "workspace")},  // (the rest: common_params)
                     {named(sel_pages, "sel_pages"), named(sel_counts, "sel_counts")});
  TORCH_CHECK(bs.max_sel * s.page_size < paged_decode::kMaxPositions,
              "block_sparse_decode: max_sel x page_size (", bs.max_sel * s.page_size, ") must be < 2^31 - 2^16");
  if (s.batch == 0 || s.num_q_heads == 0) return;
  TORCH_CHECK(s.num_pages > 0, "k_cache must have at least one page");
  p.sel_pages = sel_pages.data_ptr<int>();
  p.sel_counts = sel_counts.data_ptr<int>();
  p.max_sel = int(bs.max_sel);
  p.dedup_pages = page_dedup_enabled() ? 1 : 0;  // page_groups checks the page size against the copy layout
  // Splits are cut over the list (max_sel pages), not over the sequence.
  const int64_t kv_len = std::max<int64_t>(1, bs.max_sel * s.page_size);
  paged_decode::dispatch<true>("block_sparse_decode", q, p, s, kv_len, num_splits, workspace);
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcore, CUDA, m) { m.impl("block_sparse_decode", &block_sparse_decode_cuda); }

}  // namespace kvcore
