// Pieces the CPU attention kernels share (gqa_decode, block_sparse_decode, mla_decode,
// token_decoder_attention, attention_scores): a vectorisable dot product, the online-softmax
// step with kvcore's NaN rule, a part's normalised output, and the ordered merge of parts.
//
// NaN rule (tests/test_nan.py): a NaN logit (NaN in q or an attended key) makes that head's out
// and lse NaN; it never vanishes into an "empty" result, and nothing unattended is ever read.
//
// Compiled once per instruction set: include it only through common/cpu_isa_kernels.h, which
// defines KVCORE_CPU_ISA_NS and includes the standard headers used here (so no include guard,
// and no #include below: see cpu_isa.h).
#ifndef KVCORE_CPU_ISA_NS
#error "cpu_attention.h is compiled per ISA: include common/cpu_isa_kernels.h instead"
#endif

namespace kvcore {
namespace {
namespace KVCORE_CPU_ISA_NS {
namespace cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// a.b with 8 independent partial sums: without -ffast-math the compiler may not reorder one
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

// One online-softmax step of one head over n logits: lg becomes the weights relative to the new
// running max m, l the running sum, and the head's accumulator acc [D] is rescaled to match.
inline void online_softmax_step(float* lg, int64_t n, float& m, float& l, float* acc, int64_t D) {
  float cmax = kNegInf;
  for (int64_t i = 0; i < n; ++i) cmax = std::max(cmax, lg[i]);
  const float m_new = std::max(m, cmax);
  // m_new = -inf only if every logit so far is -inf (non-finite inputs): keep the state.
  const float corr = (m == m_new || m_new == kNegInf) ? 1.0f : std::exp(m - m_new);
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    // std::max skips NaN, so m_new = -inf means every logit so far is -inf or NaN: a -inf weighs
    // 0, a NaN must stay NaN.
    const float e = m_new == kNegInf ? (std::isnan(lg[i]) ? lg[i] : 0.0f) : std::exp(lg[i] - m_new);
    lg[i] = e;
    sum += e;
  }
  l = l * corr + sum;
  m = m_new;
  if (corr != 1.0f)
    for (int64_t d = 0; d < D; ++d) acc[d] *= corr;
}

// Workspace and state of one task's query heads: heads x D queries (fp32), the running (m, l,
// acc) per head, and the conversion rows and logits of one chunk of keys.
struct ChunkScratch {
  float* krow;    // row_len floats
  float* vrow;    // row_len floats
  float* logits;  // heads x kChunk
  int64_t chunk;  // logits stride per head (the most keys of one chunk)
};

// One chunk of n keys for `heads` query heads: logits (scale, optional soft cap), the online
// softmax step, then P V. Key i's row starts at k_base + k_off[i] (v likewise); each row is
// converted to fp32 once (row_len elements) and query head h reads its KV head's D values at
// (h / group) * D within it. gqa_decode passes whole token rows (all KV heads); block_sparse_decode
// one head's row (row_len = D, group = heads).
template <typename T>
void attend_chunk(int64_t n, const T* k_base, const int64_t* k_off, const T* v_base, const int64_t* v_off,
                  int64_t row_len, int64_t heads, int64_t group, int64_t D, const float* qf, float scale,
                  float soft_cap, const ChunkScratch& w, float* m, float* l, float* acc) {
  const bool capped = soft_cap > 0.0f;
  const float inv_cap = capped ? 1.0f / soft_cap : 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const T* kr = k_base + k_off[i];
    for (int64_t e = 0; e < row_len; ++e) w.krow[e] = static_cast<float>(kr[e]);
    for (int64_t h = 0; h < heads; ++h) {
      float s = dot_product(qf + h * D, w.krow + (h / group) * D, D) * scale;
      if (capped) s = soft_cap * std::tanh(s * inv_cap);
      w.logits[h * w.chunk + i] = s;
    }
  }
  for (int64_t h = 0; h < heads; ++h) online_softmax_step(w.logits + h * w.chunk, n, m[h], l[h], acc + h * D, D);
  for (int64_t i = 0; i < n; ++i) {
    const T* vr = v_base + v_off[i];
    for (int64_t e = 0; e < row_len; ++e) w.vrow[e] = static_cast<float>(vr[e]);
    for (int64_t h = 0; h < heads; ++h) {
      const float wt = w.logits[h * w.chunk + i];
      const float* vh = w.vrow + (h / group) * D;
      float* ah = acc + h * D;
      for (int64_t d = 0; d < D; ++d) ah[d] += wt * vh[d];
    }
  }
}

// A part's normalised output [D] and lse (natural log): zeros and -inf when it saw no key; a NaN
// l (a NaN logit) is not empty and gives NaN out and NaN lse, which merge_parts passes on.
inline void finish_part(const float* acc, float m, float l, int64_t D, float* out, float* lse) {
  const bool empty = l == 0.0f;
  const float inv_l = empty ? 0.0f : 1.0f / l;
  for (int64_t d = 0; d < D; ++d) out[d] = acc[d] * inv_l;
  *lse = empty ? kNegInf : m + std::log(l);
}

// Merges `parts` normalised parts of one row in part order (so the result does not depend on
// the thread count): part_lse(j) and part_out(j) (a pointer to D floats) give part j. Writes the
// row to o [D] and, when lse is not null, its log-sum-exp. scratch: D floats.
template <typename T, typename LseOf, typename OutOf>
void merge_parts(int64_t parts, LseOf part_lse, OutOf part_out, int64_t D, T* o, float* lse, float* scratch) {
  float mx = kNegInf;
  bool nan_part = false;
  for (int64_t j = 0; j < parts; ++j) {
    const float lj = part_lse(j);
    nan_part |= std::isnan(lj);
    mx = std::max(mx, lj);
  }
  if (nan_part) {  // a NaN logit in any part: the whole row is NaN (std::max would drop it)
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(kNaN);
    if (lse != nullptr) *lse = kNaN;
    return;
  }
  std::fill(scratch, scratch + D, 0.0f);
  float wsum = 0.0f;
  if (mx != kNegInf) {
    for (int64_t j = 0; j < parts; ++j) {
      const float lj = part_lse(j);
      if (lj == kNegInf) continue;  // an empty part contributes nothing
      const float w = std::exp(lj - mx);
      wsum += w;
      const float* pj = part_out(j);
      for (int64_t d = 0; d < D; ++d) scratch[d] += w * pj[d];
    }
  }
  const float inv = wsum > 0.0f ? 1.0f / wsum : 0.0f;
  for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(scratch[d] * inv);
  if (lse != nullptr) *lse = wsum > 0.0f ? mx + std::log(wsum) : kNegInf;
}

}  // namespace cpu
}  // namespace KVCORE_CPU_ISA_NS
}  // namespace
}  // namespace kvcore
