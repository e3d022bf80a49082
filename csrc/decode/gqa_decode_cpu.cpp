// CPU kernel of kvcore::gqa_decode: one query token per sequence against a paged KV cache.
//
// One task per (sequence, KV head). A task holds the whole query group (g = Hq / Hkv heads) in
// fp32 and walks the sequence's keys in chunks of kChunk tokens: each K row is converted to fp32
// once and dotted with all g queries, the chunk's logits update an online softmax per head, and
// each V row is converted once and accumulated into all g outputs. So every cached byte is read
// once per task, and the per-task state (g x D accumulators, g x kChunk logits) stays in L1/L2.
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

constexpr int64_t kChunk = 32;  // keys per online-softmax step

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
  const int64_t G = p.group, D = p.head_dim;
  const int64_t H = p.num_kv_heads;
  const int64_t row = H * D;  // elements per token slot in a page (dense)
  const int64_t capacity = p.num_pages > 0 ? p.max_pages * p.page_size : 0;
  const bool capped = p.soft_cap > 0.0f;
  const float inv_cap = capped ? 1.0f / p.soft_cap : 0.0f;

  at::parallel_for(0, p.batch * H, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch, reused across the tasks of this range.
    std::vector<float> qf(G * D), acc(G * D), krow(D), vrow(D), logits(G * kChunk), m(G), l(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, kvh = task % H;
      const int64_t L = std::clamp<int64_t>(seq_lens[b], 0, capacity);
      const int64_t start = p.window_left >= 0 ? std::max<int64_t>(0, L - 1 - p.window_left) : 0;
      const int32_t* pages = block_table + b * p.max_pages;

      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* qh = q + b * p.q_stride_b + (kvh * G + g) * p.q_stride_h;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(qh[d]);
        m[g] = kNegInf;
        l[g] = 0.0f;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);

      for (int64_t c0 = start; c0 < L; c0 += kChunk) {
        const int64_t n = std::min<int64_t>(kChunk, L - c0);
        // Slot offsets (elements, within a page's K or V) of this chunk's tokens.
        int64_t k_off[kChunk], v_off[kChunk];
        for (int64_t i = 0; i < n; ++i) {
          const int64_t pos = c0 + i;
          const int64_t page = std::clamp<int64_t>(pages[pos / p.page_size], 0, p.num_pages - 1);
          const int64_t in_page = (pos % p.page_size) * row + kvh * D;
          k_off[i] = page * p.k_page_stride + in_page;
          v_off[i] = page * p.v_page_stride + in_page;
        }
        // Logits of the chunk for all G heads; each K row read once.
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* kr = k_cache + k_off[i];
          for (int64_t d = 0; d < D; ++d) krow[d] = static_cast<float>(kr[d]);
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            const float dot = dot_product(qg, krow.data(), D);
            float s = dot * p.scale;
            if (capped) s = p.soft_cap * std::tanh(s * inv_cap);
            logits[g * kChunk + i] = s;
          }
        }
        // Online softmax update per head; logits become probabilities (relative to the new max).
        for (int64_t g = 0; g < G; ++g) {
          float* lg = logits.data() + g * kChunk;
          float cmax = kNegInf;
          for (int64_t i = 0; i < n; ++i) cmax = std::max(cmax, lg[i]);
          const float m_new = std::max(m[g], cmax);
          // m_new = -inf only if every logit so far is -inf (non-finite inputs): keep the state.
          const float corr = (m[g] == m_new || m_new == kNegInf) ? 1.0f : std::exp(m[g] - m_new);
          float sum = 0.0f;
          for (int64_t i = 0; i < n; ++i) {
            const float e = m_new == kNegInf ? 0.0f : std::exp(lg[i] - m_new);
            lg[i] = e;
            sum += e;
          }
          l[g] = l[g] * corr + sum;
          m[g] = m_new;
          if (corr != 1.0f) {
            float* ag = acc.data() + g * D;
            for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
          }
        }
        // Accumulate P V for all G heads; each V row read once.
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* vr = v_cache + v_off[i];
          for (int64_t d = 0; d < D; ++d) vrow[d] = static_cast<float>(vr[d]);
          for (int64_t g = 0; g < G; ++g) {
            const float w = logits[g * kChunk + i];
            float* ag = acc.data() + g * D;
            for (int64_t d = 0; d < D; ++d) ag[d] += w * vrow[d];
          }
        }
      }

      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kvh * G + g;
        scalar_t* o = out + (b * H * G + h) * D;  // out is contiguous [B, Hq, D]
        const bool empty = !(l[g] > 0.0f);
        const float inv_l = empty ? 0.0f : 1.0f / l[g];
        const float* ag = acc.data() + g * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(ag[d] * inv_l);
        if (lse != nullptr) lse[b * H * G + h] = empty ? kNegInf : m[g] + std::log(l[g]);
      }
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
