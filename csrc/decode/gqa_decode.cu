// CUDA launcher of gqa_decode: input checks and the window; the split choice, workspace layout
// and dispatch are shared with block_sparse_decode (paged_decode_launch.h). The kernel itself is
// framework-free: csrc/include/kvcore/gqa_decode.cuh.
#include <torch/library.h>

#include "decode/paged_decode_launch.h"

namespace kvcore {
namespace {

void gqa_decode_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_table, const at::Tensor& seq_lens, double scale, int64_t window_left,
                     double logit_soft_cap, at::Tensor& out, const c10::optional<at::Tensor>& lse,
                     const c10::optional<at::Tensor>& workspace, int64_t num_splits,
                     const c10::optional<at::Tensor>& score) {
  const PagedDecodeShape s = check_paged_decode(q, k_cache, v_cache, block_table, seq_lens, out, lse);
  check_decode_scalars(scale, window_left, logit_soft_cap, num_splits);
  if (score.has_value()) check_decode_score(*score, q, s);
  GqaDecodeParams p = paged_decode::common_params("gqa_decode", s, q, k_cache, v_cache, block_table, seq_lens, scale,
                                                  logit_soft_cap, out, lse, workspace);
  if (s.batch == 0 || s.num_q_heads == 0) return;
  TORCH_CHECK(s.num_pages > 0, "k_cache must have at least one page");
  // A window at least as long as the block table's capacity is no window; clamping keeps the
  // kernel's int32 from wrapping a huge window_left into a small one.
  const int64_t capacity = s.max_pages * s.page_size;
  p.window_left = window_left >= capacity ? -1 : int(window_left);
  const int64_t kv_len = p.window_left >= 0 ? std::min<int64_t>(capacity, int64_t(p.window_left) + 1) : capacity;
  paged_decode::dispatch<false>("gqa_decode", q, p, s, kv_len, num_splits, workspace,
                                score.has_value() ? &*score : nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcore, CUDA, m) { m.impl("gqa_decode", &gqa_decode_cuda); }

}  // namespace kvcore
