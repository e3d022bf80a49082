// CUDA launcher of gqa_decode: input checks and the window; the split choice, workspace layout
// and dispatch are shared with block_sparse_decode (paged_decode_launch.h). The kernel itself is
// framework-free: csrc/include/kvcore/gqa_decode.cuh.
#include <torch/library.h>

#include "common/env_switch.h"
#include "decode/paged_decode_launch.h"

namespace kvcore {
namespace {

// Page groups (GqaDecodeParams::dedup_pages; the default since session 12): consecutive copy
// slots of a thread in one page share one block_table lookup and one address computation (at
// page 16 and D128 a thread made 8 lookups per tile for 4 distinct pages, each slot ~55
// instructions of clamps and 64-bit products). KVCORE_DECODE_PAGE_GROUPS=off looks up every slot
// (an A/B switch, read once per process).
bool page_groups_enabled() {
  static const bool on = env_choice("KVCORE_DECODE_PAGE_GROUPS", {"on", "off"}, "gqa_decode (CUDA)") == 0;
  return on;
}

void gqa_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_table, const at::Tensor& seq_lens, double scale, int64_t window_left,
                     double logit_soft_cap, at::Tensor& out, const c10::optional<at::Tensor>& lse,
                     const c10::optional<at::Tensor>& workspace, int64_t num_splits,
                     const c10::optional<at::Tensor>& score, int64_t plan_total_keys, int64_t plan_max_keys) {
  const PagedDecodeShape s = check_paged_decode(q, k_cache, v_cache, block_table, seq_lens, out, lse);
  check_decode_scalars(scale, window_left, logit_soft_cap, num_splits);
  check_plan_keys(plan_total_keys, plan_max_keys);
  if (score.has_value()) {
    check_decode_score(*score, q, k_cache, v_cache, block_table, seq_lens, out, lse, s);
    // The score epilogue's grid has the KV heads on y; checked before anything is written.
    TORCH_CHECK(s.num_kv_heads <= 65535, "gqa_decode (CUDA): num_kv_heads must be <= 65535 with a score buffer, got ",
                s.num_kv_heads);
  }
  GqaDecodeParams p = paged_decode::common_params("gqa_decode", s, q, k_cache, v_cache, block_table, seq_lens, scale,
                                                  logit_soft_cap, out, lse, workspace);
  check_writes_apart({named(workspace, "workspace")}, {named(score, "score")});  // (the rest: common_params)
  if (s.batch == 0 || s.num_q_heads == 0) return;
  TORCH_CHECK(s.num_pages > 0, "k_cache must have at least one page");
  // A window at least as long as the block table's capacity is no window; clamping keeps the
  // kernel's int32 from wrapping a huge window_left into a small one.
  const int64_t capacity = s.max_pages * s.page_size;
  p.window_left = window_left >= capacity ? -1 : int(window_left);
  p.dedup_pages = page_groups_enabled() ? 1 : 0;  // page_groups checks the page size and alignment
  // Read on every call, not only where it applies (head_dim 128), so a misspelt value always fails.
  (void)paged_decode::decode_warps_switch();
  (void)paged_decode::decode_kernel_switch();
  const int64_t kv_len = p.window_left >= 0 ? std::min<int64_t>(capacity, int64_t(p.window_left) + 1) : capacity;
  // The caller's host-side lengths (kvcore.gqa_decode's plan_seq_lens), for an automatic split count.
  const paged_decode::SplitHint hint = paged_decode::split_hint(s.batch, kv_len, plan_total_keys, plan_max_keys);
  paged_decode::dispatch<false>("gqa_decode", q, p, s, kv_len, num_splits, workspace,
                                score.has_value() ? &*score : nullptr, hint);
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcore, CUDA, m) { m.impl("gqa_decode", &gqa_decode_cuda); }

}  // namespace kvcore
