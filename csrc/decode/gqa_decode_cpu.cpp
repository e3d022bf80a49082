// CPU kernel of kvcore::gqa_decode: one query token per sequence against a paged KV cache.
//
// One task per (sequence, part of its key range). A task walks its keys in chunks of kChunk
// tokens and reads each token's whole [Hkv, D] row, which is contiguous in the cache, so memory
// is read in address order: a task per (sequence, KV head) instead reads one head's D elements
// every Hkv * D, a new 4 KiB page per row at Hkv * D * size >= 4 KiB, and paid a TLB miss and
// a memory latency per row (measured 8-11 ms against 1.9 ms for plain torch on B1 Hq32 Hkv8
// D128 S2048 fp32, 2 cores). Each row is converted to fp32 once and used by every query head
// of its KV head; an online softmax per query head runs over the chunk's logits. Parts of one
// sequence (split so that short batches still use every thread) write a normalised partial
// output and its log-sum-exp, merged at the end in a fixed order (deterministic).
//
// Safety without validation: seq_len is clamped to [0, max_pages * page_size] and each page
// index to [0, num_pages), so bad index contents give wrong numbers, never an out-of-bounds read.
// `workspace` and `num_splits` only matter to the CUDA split-KV path and are ignored here.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/checks.h"

namespace kvcore {
namespace {

constexpr int64_t kChunk = 32;           // keys per online-softmax step
constexpr int64_t kMinPartTokens = 256;  // a sequence is cut into parts no shorter than this

struct DecodeParams {
  int64_t batch, num_kv_heads, group, head_dim, num_pages, page_size, max_pages;
  int64_t q_stride_b, q_stride_h;    // q may be strided in dims 0/1 (elements)
  int64_t k_page_stride, v_page_stride;  // caches may be strided in dim 0 (elements)
  float scale, soft_cap;
  int64_t window_left;
};

// q.k with 8 independent partial sums: without -ffast-math the compiler may not reorder one
// running sum, so a single accumulator would leave the loop scalar; eight lanes vectorise.
inline float dot_product(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[d + j] * b[d + j];
  float tail = 0.f;
  for (; d < n; ++d) tail += a[d] * b[d];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

template <typename scalar_t>
void gqa_decode_tasks(const DecodeParams& p, const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                      const int32_t* block_table, const int32_t* seq_lens, scalar_t* out, float* lse) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t G = p.group, D = p.head_dim, H = p.num_kv_heads, Hq = H * G;
  const int64_t row = H * D;  // elements per token slot in a page (dense)
  const int64_t capacity = p.num_pages > 0 ? p.max_pages * p.page_size : 0;
  const bool capped = p.soft_cap > 0.0f;
  const float inv_cap = capped ? 1.0f / p.soft_cap : 0.0f;

  // Key range [lo, hi) of each sequence, and the number of parts each is cut into.
  std::vector<int64_t> lo(p.batch), hi(p.batch);
  int64_t longest = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    hi[b] = std::clamp<int64_t>(seq_lens[b], 0, capacity);
    lo[b] = p.window_left >= 0 ? std::max<int64_t>(0, hi[b] - 1 - p.window_left) : 0;
    longest = std::max(longest, hi[b] - lo[b]);
  }
  const int64_t threads = at::get_num_threads();
  const int64_t parts = std::clamp<int64_t>((2 * threads + p.batch - 1) / p.batch, 1,
                                            std::max<int64_t>(1, longest / kMinPartTokens));
  std::vector<float> part_out(p.batch * parts * Hq * D), part_lse(p.batch * parts * Hq);

  at::parallel_for(0, p.batch * parts, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch, reused across the tasks of this range.
    std::vector<float> qf(Hq * D), acc(Hq * D), krow(row), vrow(row), logits(Hq * kChunk), m(Hq), l(Hq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / parts, part = task % parts;
      const int64_t span = (hi[b] - lo[b] + parts - 1) / parts;
      const int64_t start = lo[b] + part * span, stop = std::min(hi[b], start + span);
      const int32_t* pages = block_table + b * p.max_pages;

      for (int64_t h = 0; h < Hq; ++h) {
        const scalar_t* qh = q + b * p.q_stride_b + h * p.q_stride_h;
        for (int64_t d = 0; d < D; ++d) qf[h * D + d] = static_cast<float>(qh[d]);
        m[h] = kNegInf;
        l[h] = 0.0f;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);

      for (int64_t c0 = start; c0 < stop; c0 += kChunk) {
        const int64_t n = std::min<int64_t>(kChunk, stop - c0);
        // Slot offsets (elements) of this chunk's token rows.
        int64_t k_off[kChunk], v_off[kChunk];
        for (int64_t i = 0; i < n; ++i) {
          const int64_t pos = c0 + i;
          const int64_t page = std::clamp<int64_t>(pages[pos / p.page_size], 0, p.num_pages - 1);
          k_off[i] = page * p.k_page_stride + (pos % p.page_size) * row;
          v_off[i] = page * p.v_page_stride + (pos % p.page_size) * row;
        }
        // Logits of every query head for the chunk; each K row is read and converted once.
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* kr = k_cache + k_off[i];
          for (int64_t e = 0; e < row; ++e) krow[e] = static_cast<float>(kr[e]);
          for (int64_t h = 0; h < Hq; ++h) {
            float s = dot_product(qf.data() + h * D, krow.data() + (h / G) * D, D) * p.scale;
            if (capped) s = p.soft_cap * std::tanh(s * inv_cap);
            logits[h * kChunk + i] = s;
          }
        }
        // Online softmax update per head; logits become probabilities (relative to the new max).
        for (int64_t h = 0; h < Hq; ++h) {
          float* lg = logits.data() + h * kChunk;
          float cmax = kNegInf;
          for (int64_t i = 0; i < n; ++i) cmax = std::max(cmax, lg[i]);
          const float m_new = std::max(m[h], cmax);
          // m_new = -inf only if every logit so far is -inf (non-finite inputs): keep the state.
          const float corr = (m[h] == m_new || m_new == kNegInf) ? 1.0f : std::exp(m[h] - m_new);
          float sum = 0.0f;
          for (int64_t i = 0; i < n; ++i) {
            // std::max skips NaN, so m_new = -inf means every logit so far is -inf or NaN: a -inf
            // weighs 0, a NaN must stay NaN (NaN in q or K poisons this head, never vanishes).
            const float e = m_new == kNegInf ? (std::isnan(lg[i]) ? lg[i] : 0.0f) : std::exp(lg[i] - m_new);
            lg[i] = e;
            sum += e;
          }
          l[h] = l[h] * corr + sum;
          m[h] = m_new;
          if (corr != 1.0f) {
            float* ah = acc.data() + h * D;
            for (int64_t d = 0; d < D; ++d) ah[d] *= corr;
          }
        }
        // Accumulate P V for every head; each V row is read and converted once.
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* vr = v_cache + v_off[i];
          for (int64_t e = 0; e < row; ++e) vrow[e] = static_cast<float>(vr[e]);
          for (int64_t h = 0; h < Hq; ++h) {
            const float w = logits[h * kChunk + i];
            const float* vh = vrow.data() + (h / G) * D;
            float* ah = acc.data() + h * D;
            for (int64_t d = 0; d < D; ++d) ah[d] += w * vh[d];
          }
        }
      }

      // This part's normalised output and log-sum-exp (-inf and zeros when it saw no key). A NaN
      // l (a NaN logit) is not empty: it gives NaN out and NaN lse, which the merge passes on.
      float* po = part_out.data() + task * Hq * D;
      float* pl = part_lse.data() + task * Hq;
      for (int64_t h = 0; h < Hq; ++h) {
        const bool empty = l[h] == 0.0f;
        const float inv_l = empty ? 0.0f : 1.0f / l[h];
        for (int64_t d = 0; d < D; ++d) po[h * D + d] = acc[h * D + d] * inv_l;
        pl[h] = empty ? kNegInf : m[h] + std::log(l[h]);
      }
    }
  });

  // Merge the parts of each (sequence, query head) in part order.
  at::parallel_for(0, p.batch * Hq, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      float mx = kNegInf;
      bool nan_part = false;
      for (int64_t j = 0; j < parts; ++j) {
        const float lj = part_lse[(b * parts + j) * Hq + h];
        nan_part |= std::isnan(lj);
        mx = std::max(mx, lj);
      }
      scalar_t* o = out + bh * D;  // out is contiguous [B, Hq, D]
      if (nan_part) {  // a NaN logit in any part: the whole row is NaN (std::max would drop it)
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(std::numeric_limits<float>::quiet_NaN());
        if (lse != nullptr) lse[bh] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      float wsum = 0.0f;
      std::vector<float> acc(D, 0.0f);
      if (mx != kNegInf) {
        for (int64_t j = 0; j < parts; ++j) {
          const float lj = part_lse[(b * parts + j) * Hq + h];
          if (lj == kNegInf) continue;  // an empty part contributes nothing
          const float w = std::exp(lj - mx);
          wsum += w;
          const float* pj = part_out.data() + ((b * parts + j) * Hq + h) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += w * pj[d];
        }
      }
      const float inv = wsum > 0.0f ? 1.0f / wsum : 0.0f;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d] * inv);
      if (lse != nullptr) lse[bh] = wsum > 0.0f ? mx + std::log(wsum) : kNegInf;
    }
  });
}

void gqa_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& block_table, const at::Tensor& seq_lens, double scale, int64_t window_left,
                    double logit_soft_cap, at::Tensor& out, const c10::optional<at::Tensor>& lse,
                    const c10::optional<at::Tensor>& workspace, int64_t num_splits) {
  (void)workspace;
  (void)num_splits;
  const PagedDecodeShape s = check_paged_decode(q, k_cache, v_cache, block_table, seq_lens, out, lse);
  check_decode_scalars(scale, window_left, logit_soft_cap, num_splits);
  if (s.batch == 0 || s.num_q_heads == 0 || s.head_dim == 0) return;

  DecodeParams p{};
  p.batch = s.batch;
  p.num_kv_heads = s.num_kv_heads;
  p.group = s.group;
  p.head_dim = s.head_dim;
  p.num_pages = s.num_pages;
  p.page_size = s.page_size;
  p.max_pages = s.max_pages;
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_page_stride = k_cache.stride(0);
  p.v_page_stride = v_cache.stride(0);
  p.scale = static_cast<float>(scale);
  p.soft_cap = static_cast<float>(logit_soft_cap);
  p.window_left = window_left;

  float* lse_ptr = lse.has_value() ? lse->mutable_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gqa_decode_cpu", [&] {
    gqa_decode_tasks<scalar_t>(p, q.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(),
                               v_cache.const_data_ptr<scalar_t>(), block_table.const_data_ptr<int32_t>(),
                               seq_lens.const_data_ptr<int32_t>(), out.mutable_data_ptr<scalar_t>(), lse_ptr);
  });
}

}  // namespace
}  // namespace kvcore

TORCH_LIBRARY_IMPL(kvcore, CPU, m) { m.impl("gqa_decode", &kvcore::gqa_decode_cpu); }
