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
#if !defined(KVCORE_CPU_ISA_NS) || !defined(KVCORE_CPU_VEC_BYTES)
#error "cpu_attention.h is compiled per ISA: include common/cpu_isa_kernels.h instead"
#endif

namespace kvcore {
namespace {
namespace KVCORE_CPU_ISA_NS {
namespace cpu {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Vector type for the hand-vectorised loops below: GCC's vector extension (no intrinsics, so no
// #include: see cpu_isa.h), one register wide: KVCORE_CPU_VEC_BYTES (cpu_isa_kernels.h) is 64 in
// the AVX-512 copy (zmm, 16 floats), 32 in the AVX2 one (ymm, 8) and 16 in the baseline one (xmm,
// 4). (__AVX2__ is not defined inside the pragma target region here, so it cannot tell the copies
// apart.)
typedef float FVec __attribute__((vector_size(KVCORE_CPU_VEC_BYTES)));
constexpr int kVecLanes = sizeof(FVec) / sizeof(float);

inline FVec load_vec(const float* p) {
  FVec v;
  __builtin_memcpy(&v, p, sizeof v);  // an unaligned load (movups)
  return v;
}

// x in every lane. (Written x - 0, which GCC folds to a plain broadcast since it is x for every
// float; FVec{} + x is not (-0 + 0 is +0), and kept one add per broadcast in the hot loops.)
inline FVec splat(float x) { return x - FVec{}; }

// The sum of v's lanes, in a fixed tree (so the same lanes always give the same float): the upper
// half added onto the lower one down to 4 lanes, then (s0 + s1) + (s2 + s3) (the baseline's 4
// lanes: (v0 + v2) + (v1 + v3)). Written with shuffles: the same tree as scalar lane reads
// compiled to dozens of extracts and scalar adds per 16-lane sum (session 25, CPU mla_decode).
// (Without __builtin_shufflevector, KVCORE_CPU_SHUFFLEVECTOR 0: the scalar form of the same tree.)
#if KVCORE_CPU_SHUFFLEVECTOR
typedef float LaneSum4 __attribute__((vector_size(16)));
typedef float LaneSum2 __attribute__((vector_size(8)));
inline float lane_sum4(LaneSum4 v) {
  const LaneSum2 pairs = __builtin_shufflevector(v, v, 0, 2) + __builtin_shufflevector(v, v, 1, 3);
  return pairs[0] + pairs[1];
}
#endif
inline float lane_sum(const FVec& v) {
#if !KVCORE_CPU_SHUFFLEVECTOR && KVCORE_CPU_VEC_BYTES == 64
  float h[8];
  for (int i = 0; i < 8; ++i) h[i] = v[i] + v[i + 8];
  return ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]));
#elif !KVCORE_CPU_SHUFFLEVECTOR && KVCORE_CPU_VEC_BYTES == 32
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
#elif KVCORE_CPU_VEC_BYTES == 64
  typedef float LaneSum8 __attribute__((vector_size(32)));
  const LaneSum8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                     __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return lane_sum4(__builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7));
#elif KVCORE_CPU_VEC_BYTES == 32
  return lane_sum4(__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7));
#else
  return (v[0] + v[2]) + (v[1] + v[3]);
#endif
}

#if KVCORE_CPU_VEC_BYTES == 64
// out[k] = lane_sum(v[k]) for k < 16, bit for bit (the same tree for every vector), the sixteen
// reduced together: each step adds two shuffles of two vectors, halving the vectors while every
// lane keeps one vector's partial sum, so 15 vector adds and 30 shuffles do what 16 lane_sums do
// in 64 of each. (A 4 x 4 block of the CPU mla_decode's logits is 16 sums of 36 or 18 products.)
inline void lane_sums16(const FVec* v, float* out) {
#if !KVCORE_CPU_SHUFFLEVECTOR
  for (int k = 0; k < 16; ++k) out[k] = lane_sum(v[k]);
#else
  FVec c[8], e[4], g[2];
  // s1 = lower 8 lanes + upper 8: c[m] holds v[2m]'s s1 in lanes 0-7 and v[2m + 1]'s in 8-15.
  for (int m = 0; m < 8; ++m)
    c[m] = __builtin_shufflevector(v[2 * m], v[2 * m + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * m], v[2 * m + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                   31);
  // s2 = s1's lower 4 lanes + its upper 4: e[n]'s 4-lane group L holds v[4n + L]'s s2.
  for (int n = 0; n < 4; ++n)
    e[n] = __builtin_shufflevector(c[2 * n], c[2 * n + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(c[2 * n], c[2 * n + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  // (s2[0] + s2[1], s2[2] + s2[3]): group L of g[r] holds those of v[8r + L] and v[8r + 4 + L].
  for (int r = 0; r < 2; ++r)
    g[r] = __builtin_shufflevector(e[2 * r], e[2 * r + 1], 0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, 12, 14, 28, 30) +
           __builtin_shufflevector(e[2 * r], e[2 * r + 1], 1, 3, 17, 19, 5, 7, 21, 23, 9, 11, 25, 27, 13, 15, 29, 31);
  // Their sum: lane 4L + q holds v[4q + L]'s.
  const FVec sum = __builtin_shufflevector(g[0], g[1], 0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, 12, 14, 28, 30) +
                   __builtin_shufflevector(g[0], g[1], 1, 3, 17, 19, 5, 7, 21, 23, 9, 11, 25, 27, 13, 15, 29, 31);
  for (int L = 0; L < 4; ++L)
    for (int q = 0; q < 4; ++q) out[4 * q + L] = sum[4 * L + q];
#endif
}
#endif

// The end of every logits block (logits_block_at, bf16dot::logits_block): lg[j * lg_stride + i] =
// (lane_sum(acc[j][i]) + product(j, i, t) for the columns t in [d, D) past the last whole vector,
// in order) * scale, so a logit sums in the same order whatever block it falls in. A 16-accumulator
// block in the 16-lane copy reduces its lanes together (lane_sums16: the same bits).
template <int NH, int NK, typename Product>
inline void finish_logits(const FVec (&acc)[NH][NK], int64_t d, int64_t D, Product product, float scale, float* lg,
                          int64_t lg_stride) {
  float sums[NH * NK];
#if KVCORE_CPU_VEC_BYTES == 64
  if constexpr (NH * NK == 16)
    lane_sums16(&acc[0][0], sums);
  else
#endif
#pragma GCC unroll 4
    for (int k = 0; k < NH * NK; ++k) sums[k] = lane_sum(acc[k / NK][k % NK]);
#pragma GCC unroll 4
  for (int j = 0; j < NH; ++j) {
#pragma GCC unroll 4
    for (int i = 0; i < NK; ++i) {
      float s = sums[j * NK + i];
      for (int64_t t = d; t < D; ++t) s += product(j, i, t);
      lg[j * lg_stride + i] = s * scale;
    }
  }
}

// Register blocks of logits: NH query rows (heads, or a window's queries) x NK key rows, all fp32
// and D wide. The AVX-512 copy has 32 vector registers (16 elsewhere), so its blocks are 4 x 4
// (16 accumulators, 0.5 loads per multiply-add); the others' are 4 x 2 (0.75). Used by mla_decode
// (each latent row serves every head), attention_scores (each key serves a window of queries) and
// the token decoder (each key serves a KV group's rows).
constexpr int kLogitRows = KVCORE_CPU_VEC_BYTES == 64 ? 4 : 2;

// lg[j * lg_stride + i] = q_j . row_i * scale for NH query rows j (q_j at q + j * D) and NK key
// rows i (row_i at row_at(i)): NH x NK independent chains; per step of d, each of the
// NK row vectors is loaded once for the NH queries and each q vector once for the NK rows. Every
// (j, i) sums its products in the same order (one chain over d, then the lanes in a fixed tree,
// then the tail) whatever NH and NK are, so a logit does not depend on the block it falls in.
template <int NH, int NK, typename RowAt>
inline void logits_block_at(const float* q, RowAt row_at, int64_t D, float scale, float* lg, int64_t lg_stride) {
  FVec acc[NH][NK] = {};
  const float* rows[NK];
#pragma GCC unroll 4
  for (int i = 0; i < NK; ++i) rows[i] = row_at(i);
  int64_t d = 0;
  for (; d + kVecLanes <= D; d += kVecLanes) {
    FVec r[NK];
#pragma GCC unroll 4
    for (int i = 0; i < NK; ++i) r[i] = load_vec(rows[i] + d);
#pragma GCC unroll 4
    for (int j = 0; j < NH; ++j) {
      const FVec qv = load_vec(q + j * D + d);
#pragma GCC unroll 4
      for (int i = 0; i < NK; ++i) acc[j][i] += qv * r[i];
    }
  }
  const auto product = [&](int j, int i, int64_t t) { return q[j * D + t] * rows[i][t]; };
  finish_logits(acc, d, D, product, scale, lg, lg_stride);
}

// The logits of NH query rows for key rows [0, n) (row i at row_at(i)): blocks of kLogitRows
// rows, then one of the rest.
template <int NH, typename RowAt>
inline void logits_rows_at(const float* q, RowAt row_at, int64_t n, int64_t D, float scale, float* lg,
                           int64_t lg_stride) {
  int64_t i = 0;
  for (; i + kLogitRows <= n; i += kLogitRows) {
    const auto at = [&](int r) { return row_at(i + r); };
    logits_block_at<NH, kLogitRows>(q, at, D, scale, lg + i, lg_stride);
  }
  const auto at = [&](int r) { return row_at(i + r); };
  switch (n - i) {
    case 3: logits_block_at<NH, 3>(q, at, D, scale, lg + i, lg_stride); break;
    case 2: logits_block_at<NH, 2>(q, at, D, scale, lg + i, lg_stride); break;
    case 1: logits_block_at<NH, 1>(q, at, D, scale, lg + i, lg_stride); break;
    default: break;
  }
}

// The logits of nq <= 4 query rows (q_j at q + j * D) for key rows [0, n) (row i at row_at(i)).
template <typename RowAt>
inline void logits_heads_at(const float* q, int64_t nq, RowAt row_at, int64_t n, int64_t D, float scale, float* lg,
                            int64_t lg_stride) {
  switch (nq) {
    case 4: logits_rows_at<4>(q, row_at, n, D, scale, lg, lg_stride); break;
    case 3: logits_rows_at<3>(q, row_at, n, D, scale, lg, lg_stride); break;
    case 2: logits_rows_at<2>(q, row_at, n, D, scale, lg, lg_stride); break;
    default: logits_rows_at<1>(q, row_at, n, D, scale, lg, lg_stride); break;
  }
}

// The same with key row i at rows + i * row_stride.
inline void logits_heads(const float* q, int64_t nq, const float* rows, int64_t row_stride, int64_t n, int64_t D,
                         float scale, float* lg, int64_t lg_stride) {
  logits_heads_at(q, nq, [&](int64_t i) { return rows + i * row_stride; }, n, D, scale, lg, lg_stride);
}

// Register blocks of P V for several query rows over the same value rows (mla_decode's heads over
// one latent row; the token decoder's rows of a KV group): 4 rows x kValueVecs vectors, 4 x 4 in
// the AVX-512 copy (32 vector registers: 16 accumulators, 0.5 loads per multiply-add), 4 x 2 in
// the others (16 registers).
constexpr int kValueVecs = KVCORE_CPU_VEC_BYTES == 64 ? 4 : 2;

// acc_j[d, d + NV * lanes) += sum over i < n of w_j[i] * row_i[d, d + NV * lanes) for NH query rows
// j (acc_j at acc + j * Dv, w_j at w + j * w_stride, row_i at row_at(i)): NH x NV
// vector accumulators in registers across the rows, each row's NV vectors loaded once for the NH
// queries. Each element sums its rows in key order, one multiply-add a row, whatever block it falls in.
template <int NH, int NV, typename RowAt>
inline void pv_block(float* acc, int64_t Dv, int64_t d, int64_t n, const float* w, int64_t w_stride, RowAt row_at) {
  FVec a[NH][NV];
#pragma GCC unroll 4
  for (int j = 0; j < NH; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) a[j][v] = load_vec(acc + j * Dv + d + v * kVecLanes);
  for (int64_t i = 0; i < n; ++i) {
    const float* row = row_at(i) + d;
    FVec r[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) r[v] = load_vec(row + v * kVecLanes);
#pragma GCC unroll 4
    for (int j = 0; j < NH; ++j) {
      const FVec wv = splat(w[j * w_stride + i]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) a[j][v] += wv * r[v];
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NH; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) __builtin_memcpy(acc + j * Dv + d + v * kVecLanes, &a[j][v], sizeof(FVec));
}

// c + a * b rounded as the vector loops round it: fused where the copy has FMA (GCC contracts the
// vector loops' products into their adds there), with two roundings where it has not. Written out
// for the scalar tails: GCC vectorised an unfused tail four keys at a time (products rounded) and
// fused only the 1-3 keys left over, so a sum's bits depended on how its keys were split into calls
// (the token decoder's blocks; session 26's review).
inline float mul_add(float a, float b, float c) {
#if KVCORE_CPU_VEC_BYTES > 16 || defined(__FP_FAST_FMAF)
  return __builtin_fmaf(a, b, c);
#else
  return c + a * b;
#endif
}

// P V of NH query rows over all Dv columns (value row i's first Dv columns at row_at(i)): bands of
// kValueVecs vectors, then single vectors, then the columns past the last whole vector one at a time.
template <int NH, typename RowAt>
inline void pv_cols_at(float* acc, int64_t Dv, int64_t n, const float* w, int64_t w_stride, RowAt row_at) {
  int64_t d = 0;
  for (; d + kValueVecs * kVecLanes <= Dv; d += kValueVecs * kVecLanes)
    pv_block<NH, kValueVecs>(acc, Dv, d, n, w, w_stride, row_at);
  for (; d + kVecLanes <= Dv; d += kVecLanes) pv_block<NH, 1>(acc, Dv, d, n, w, w_stride, row_at);
  for (; d < Dv; ++d)
    for (int j = 0; j < NH; ++j) {
      float s = acc[j * Dv + d];
      for (int64_t i = 0; i < n; ++i) s = mul_add(w[j * w_stride + i], row_at(i)[d], s);
      acc[j * Dv + d] = s;
    }
}

// P V of nq <= 4 query rows (acc_j at acc + j * Dv, weights w_j at w + j * w_stride) over value rows
// [0, n) (row i's first Dv columns at row_at(i)).
template <typename RowAt>
inline void pv_heads_at(float* acc, int64_t nq, int64_t Dv, int64_t n, const float* w, int64_t w_stride,
                        RowAt row_at) {
  switch (nq) {
    case 4: pv_cols_at<4>(acc, Dv, n, w, w_stride, row_at); break;
    case 3: pv_cols_at<3>(acc, Dv, n, w, w_stride, row_at); break;
    case 2: pv_cols_at<2>(acc, Dv, n, w, w_stride, row_at); break;
    default: pv_cols_at<1>(acc, Dv, n, w, w_stride, row_at); break;
  }
}

// The same with value row i at rows + i * row_stride.
inline void pv_heads(float* acc, int64_t nq, int64_t Dv, int64_t n, const float* w, int64_t w_stride,
                     const float* rows, int64_t row_stride) {
  pv_heads_at(acc, nq, Dv, n, w, w_stride, [&](int64_t i) { return rows + i * row_stride; });
}

// x as a float in memory, as a store leaves it: stops FMA contraction from fusing the product that
// made x into the next add (gqa_decode's H2O score pass must use the logits the decode stored; the
// fused form kept the product unrounded: scores off by ~1e-6 with a soft cap, session 25's review).
inline float as_stored(float x) {
  __asm__("" : "+m"(x));
  return x;
}

// exp(x) without libm, on a float or an FVec (the same operations on each lane): x = n ln2 + r
// with n = round(x / ln2) (the 1.5 * 2^23 trick rounds without a rounding instruction, which SSE2
// lacks), ln2 split in two (Cody-Waite) so r is exact enough, e^r by Cephes' expf polynomial,
// then 2^n built in the exponent bits in two halves, so that a result in the subnormal range is
// rounded once, correctly. Within 1 ulp of the exactly rounded value for every float in
// [-110, 1] (checked exhaustively, with and without FMA contraction). NaN passes the clamps
// (comparisons with NaN are false) and stays NaN; -inf clamps to -110, whose exp rounds to
// exactly 0; +inf clamps to 88.8, giving +inf. Written on vector types rather than left to the
// auto-vectoriser: GCC does not if-convert the clamps of a scalar loop (a float compare may trap
// under the default -ftrapping-math), which left a libm-free but scalar loop.
typedef int32_t IVec __attribute__((vector_size(KVCORE_CPU_VEC_BYTES)));
template <typename V, typename I>
inline V exp_poly(V x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: x + kMagic keeps round(x) in the low bits
  x = x < -110.0f ? V{} - 110.0f : x;
  x = x > 88.8f ? V{} + 88.8f : x;
  const V t = x * 1.44269504088896341f + kMagic;
  const V nf = t - kMagic;
  V r = x - nf * 0.693359375f;  // ln2's leading 9 bits: nf * this is exact
  r = r - nf * -2.12194440e-4f;  // the rest of ln2
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // n in [-159, 128] (the clamps): each half within the normal exponents [-126, 127]. For a NaN x
  // n is garbage (no overflow: t's bits minus kMagic's fit in 32 bits), and p is NaN anyway.
  const I n = __builtin_bit_cast(I, t) - __builtin_bit_cast(int32_t, kMagic);
  const I n1 = n >> 1, n2 = n - n1;
  const V s1 = __builtin_bit_cast(V, (n1 + 127) << 23);
  const V s2 = __builtin_bit_cast(V, (n2 + 127) << 23);
  return p * s1 * s2;
}

// y[i] = exp(x[i] - m) for i < n, with exp(-inf - m) = 0 whatever m is (also -inf or NaN: a key
// that is masked out weighs 0); otherwise NaN stays NaN. x and y may be the same array.
inline void exp_diff(const float* x, float m, float* y, int64_t n) {
  constexpr float kNegInfF = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kVecLanes <= n; i += kVecLanes) {
    const FVec v = load_vec(x + i);
    const FVec e = v == kNegInfF ? FVec{} : exp_poly<FVec, IVec>(v - m);
    __builtin_memcpy(y + i, &e, sizeof e);
  }
  for (; i < n; ++i) y[i] = x[i] == kNegInfF ? 0.0f : exp_poly<float, int32_t>(x[i] - m);
}

// One online-softmax step of one head over n logits: lg becomes the weights relative to the new
// running max m, l the running sum, and the head's accumulator acc [D] is rescaled to match.
inline void online_softmax_step(float* lg, int64_t n, float& m, float& l, float* acc, int64_t D) {
  // The chunk's max a vector at a time (a std::max chain does not vectorise: its NaN rule is
  // not commutative). Both keep the running max where x is NaN, and a max has the same value in
  // any order (up to the sign of a zero, which no use below can tell).
  FVec vmax = FVec{} + kNegInf;
  int64_t i0 = 0;
  for (; i0 + kVecLanes <= n; i0 += kVecLanes) {
    const FVec v = load_vec(lg + i0);
    vmax = v > vmax ? v : vmax;
  }
  float cmax = kNegInf;
  for (int j = 0; j < kVecLanes; ++j) cmax = std::max(cmax, vmax[j]);
  for (int64_t i = i0; i < n; ++i) cmax = std::max(cmax, lg[i]);
  const float m_new = std::max(m, cmax);
  // m_new = -inf only if every logit so far is -inf (non-finite inputs): keep the state.
  const float corr = (m == m_new || m_new == kNegInf) ? 1.0f : std::exp(m - m_new);
  if (m_new == kNegInf) {
    // std::max skips NaN, so m_new = -inf means every logit so far is -inf or NaN: a -inf weighs
    // 0, a NaN must stay NaN.
    for (int64_t i = 0; i < n; ++i) lg[i] = std::isnan(lg[i]) ? lg[i] : 0.0f;
  } else {
    exp_diff(lg, m_new, lg, n);  // one vectorised pass over the chunk (NaN stays NaN, -inf weighs 0)
  }
  // Eight partial sums, so this vectorises too (a single running sum may not be reordered).
  float part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += lg[i + j];
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) sum += lg[i];
  l = l * corr + sum;
  m = m_new;
  if (corr != 1.0f)
    for (int64_t d = 0; d < D; ++d) acc[d] *= corr;
}

// n elements of a cache row (or a query) as fp32: fp16 through cpu_half_bits.h's vector
// conversion (exact, like c10's, which compiled to a scalar routine), fp32 copied, any other type
// (bf16, whose shift GCC vectorises itself; the float64 some CPU ops take) element by element.
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (n > 0) __builtin_memcpy(dst, src, size_t(n) * sizeof(float));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    fp16_bits_to_float(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// Whether this copy has the bf16 dot-product path for rows of type T (the AVX-512 copy, bf16): a
// kernel takes it when, besides, cpu_isa() is kAvx512Bf16 (its bf16_dot argument).
template <typename T>
constexpr bool has_bf16_dot() {
#if defined(KVCORE_CPU_BF16_DOT_FN)
  return std::is_same_v<T, c10::BFloat16>;
#else
  return false;
#endif
}

// Software prefetch of the K/V rows a loop over keys will read: rows come in the block table's
// (random) page order, 2-4 KB each, and V is read one KV head's slice of every row at a time,
// which the hardware prefetchers miss (session 23: ~45% of a bf16 gqa_decode call stalled on
// those loads).
template <typename T>
inline void prefetch_row(const T* row, int64_t row_len) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));  // elements per 64-byte line
  for (int64_t e = 0; e < row_len; e += kLine) __builtin_prefetch(row + e, 0, 3);
}

// The same into L2 only (prefetcht1): for rows used a whole chunk later, which an L1 prefetch
// would see evicted before they are read.
template <typename T>
inline void prefetch_row_l2(const T* row, int64_t row_len) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  for (int64_t e = 0; e < row_len; e += kLine) __builtin_prefetch(row + e, 0, 2);
}

// The soft cap (soft_cap > 0; else nothing) on a chunk's logits, `heads` rows of n, stride apart:
// x -> cap * tanh(x / cap), on the scaled logits as stored.
inline void cap_logits(float* logits, int64_t heads, int64_t n, int64_t stride, float soft_cap) {
  if (soft_cap <= 0.0f) return;
  const float inv_cap = 1.0f / soft_cap;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < n; ++i) {
      float& s = logits[h * stride + i];
      s = soft_cap * std::tanh(s * inv_cap);
    }
}

// Workspace and state of one task's query heads: heads x D queries (fp32), the running (m, l,
// acc) per head, and the conversion rows and logits of one chunk of keys.
struct ChunkScratch {
  float* krow;    // kLogitRows x row_len floats (unused when the cache is fp32)
  float* vrows;   // chunk x D floats: one KV head's V slices of the chunk as fp32 (unused when fp32)
  float* logits;  // heads x kChunk
  int64_t chunk;  // logits stride per head (the most keys of one chunk)
  // bf16 with AVX512_BF16 dot products (attend_chunk_bf16) when not null: the heads' q as given
  // (heads x D bf16 bits) and (chunk + 1) / 2 x D words for a KV head's value rows in pairs.
  const uint16_t* qbf = nullptr;
  uint32_t* pairs = nullptr;
};

#if defined(KVCORE_CPU_BF16_DOT_FN)
// bf16 attention with AVX512_BF16 (the AVX-512 copy, when cpu_isa() is kAvx512Bf16): vdpbf16ps
// multiplies 32 bf16 pairs and adds each lane's two products to an fp32 accumulator, so one
// instruction does twice the multiply-adds of an fp32 FMA and the cache rows need no fp32 copy.
// Logits multiply q and the keys as stored (products exact in fp32); values multiply the softmax
// weights rounded to bf16 (round to nearest even, as torch's bf16 matmul and the CUDA kernels' P V
// do) with the value rows, interleaved by pairs of keys. vdpbf16ps treats bf16 subnormals as zero
// and flushes subnormal results (the scalar tails past the last 32 / 16 columns do not). Each
// logit and each output element sums in one fixed order whatever block it falls in: pairs of d
// (logits) or of keys (values) along one chain, then the lanes' fixed tree. Used by mla_decode,
// gqa_decode (and its H2O score pass), block_sparse_decode and attention_scores (logits) for bf16
// inputs.
namespace bf16dot {

inline float bf16_bits_to_float(uint16_t b) { return __builtin_bit_cast(float, uint32_t(b) << 16); }

// lg[j * lg_stride + i] = q_j . row_i * scale for NH heads (q_j at q + j * q_stride) and NK rows
// (row_i at rows[i]), all bf16, 32 columns (16 pairs) a step; the columns past the last 32 one by
// one.
template <int NH, int NK>
KVCORE_CPU_BF16_DOT_FN void logits_block(const uint16_t* q, int64_t q_stride, const uint16_t* const* rows, int64_t Dk,
                                         float scale, float* lg, int64_t lg_stride) {
  cpu::FVec acc[NH][NK] = {};
  int64_t d = 0;
  for (; d + 32 <= Dk; d += 32) {
    __m512bh r[NK];
#pragma GCC unroll 4
    for (int i = 0; i < NK; ++i) __builtin_memcpy(&r[i], rows[i] + d, sizeof r[i]);
#pragma GCC unroll 4
    for (int j = 0; j < NH; ++j) {
      __m512bh qv;
      __builtin_memcpy(&qv, q + j * q_stride + d, sizeof qv);
#pragma GCC unroll 4
      for (int i = 0; i < NK; ++i) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], qv, r[i]);
    }
  }
  finish_logits(
      acc, d, Dk,
      [&](int j, int i, int64_t t) { return bf16_bits_to_float(q[j * q_stride + t]) * bf16_bits_to_float(rows[i][t]); },
      scale, lg, lg_stride);
}

template <int NH>
KVCORE_CPU_BF16_DOT_FN void logits_rows(const uint16_t* q, int64_t q_stride, const uint16_t* const* rows, int64_t n,
                                        int64_t Dk, float scale, float* lg, int64_t lg_stride) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) logits_block<NH, 4>(q, q_stride, rows + i, Dk, scale, lg + i, lg_stride);
  switch (n - i) {
    case 3: logits_block<NH, 3>(q, q_stride, rows + i, Dk, scale, lg + i, lg_stride); break;
    case 2: logits_block<NH, 2>(q, q_stride, rows + i, Dk, scale, lg + i, lg_stride); break;
    case 1: logits_block<NH, 1>(q, q_stride, rows + i, Dk, scale, lg + i, lg_stride); break;
    default: break;
  }
}

// acc_j[d, d + 16 NV) += sum over row pairs p of the pair's two weights times its two rows, for NH
// heads: wp[j * wp_stride + p] holds head j's bf16 weights of rows 2p (low half) and 2p + 1, and
// pairs[p * Dv + c] the two rows' column c the same way (what vdpbf16ps multiplies lane by lane).
template <int NH, int NV>
KVCORE_CPU_BF16_DOT_FN void values_block(float* acc, int64_t Dv, int64_t d, int64_t npairs, const uint32_t* wp,
                                         int64_t wp_stride, const uint32_t* pairs) {
  __m512 a[NH][NV];
#pragma GCC unroll 4
  for (int j = 0; j < NH; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) a[j][v] = _mm512_loadu_ps(acc + j * Dv + d + 16 * v);
  for (int64_t p = 0; p < npairs; ++p) {
    __m512bh r[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) __builtin_memcpy(&r[v], pairs + p * Dv + d + 16 * v, sizeof r[v]);
#pragma GCC unroll 4
    for (int j = 0; j < NH; ++j) {
      const __m512i w = _mm512_set1_epi32(static_cast<int>(wp[j * wp_stride + p]));
      __m512bh wv;
      __builtin_memcpy(&wv, &w, sizeof wv);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) a[j][v] = _mm512_dpbf16_ps(a[j][v], wv, r[v]);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NH; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(acc + j * Dv + d + 16 * v, a[j][v]);
}

template <int NH>
KVCORE_CPU_BF16_DOT_FN void values_cols(float* acc, int64_t Dv, int64_t npairs, const uint32_t* wp, int64_t wp_stride,
                                        const uint32_t* pairs) {
  int64_t d = 0;
  for (; d + 64 <= Dv; d += 64) values_block<NH, 4>(acc, Dv, d, npairs, wp, wp_stride, pairs);
  for (; d + 16 <= Dv; d += 16) values_block<NH, 1>(acc, Dv, d, npairs, wp, wp_stride, pairs);
  for (; d < Dv; ++d)  // the same pairs, one column at a time
    for (int j = 0; j < NH; ++j) {
      float s = acc[j * Dv + d];
      for (int64_t p = 0; p < npairs; ++p) {
        const uint32_t w = wp[j * wp_stride + p], r = pairs[p * Dv + d];
        s += bf16_bits_to_float(uint16_t(w)) * bf16_bits_to_float(uint16_t(r)) +
             bf16_bits_to_float(uint16_t(w >> 16)) * bf16_bits_to_float(uint16_t(r >> 16));
      }
      acc[j * Dv + d] = s;
    }
}

// The logits of nh <= 4 heads (q_j at q + j * q_stride) for rows [0, n) (row_i at rows[i]).
KVCORE_CPU_BF16_DOT_FN inline void logits_heads(const uint16_t* q, int64_t q_stride, int64_t nh,
                                                const uint16_t* const* rows, int64_t n, int64_t D, float scale,
                                                float* lg, int64_t lg_stride) {
  switch (nh) {
    case 4: logits_rows<4>(q, q_stride, rows, n, D, scale, lg, lg_stride); break;
    case 3: logits_rows<3>(q, q_stride, rows, n, D, scale, lg, lg_stride); break;
    case 2: logits_rows<2>(q, q_stride, rows, n, D, scale, lg, lg_stride); break;
    default: logits_rows<1>(q, q_stride, rows, n, D, scale, lg, lg_stride); break;
  }
}

// The values of nh <= 4 heads (acc_j at acc + j * Dv, weight pairs wp[j * 16 + p]).
KVCORE_CPU_BF16_DOT_FN inline void values_heads(float* acc, int64_t nh, int64_t Dv, int64_t npairs,
                                                const uint32_t* wp, const uint32_t* pairs) {
  switch (nh) {
    case 4: values_cols<4>(acc, Dv, npairs, wp, 16, pairs); break;
    case 3: values_cols<3>(acc, Dv, npairs, wp, 16, pairs); break;
    case 2: values_cols<2>(acc, Dv, npairs, wp, 16, pairs); break;
    default: values_cols<1>(acc, Dv, npairs, wp, 16, pairs); break;
  }
}

// pairs[p * cols + c] = rows[2p][c] (low half) | rows[2p + 1][c] << 16 for c < cols: n rows
// interleaved by pairs, an odd last row paired with zeros (which its zero weight multiplies).
KVCORE_CPU_BF16_DOT_FN inline void interleave_pairs(const uint16_t* const* rows, int64_t n, int64_t cols,
                                                    uint32_t* pairs) {
  typedef uint16_t Half16 __attribute__((vector_size(32)));
  typedef uint32_t Word16 __attribute__((vector_size(64)));
  for (int64_t p = 0; p < (n + 1) / 2; ++p) {
    const uint16_t* lo = rows[2 * p];
    const uint16_t* hi = 2 * p + 1 < n ? rows[2 * p + 1] : nullptr;
    uint32_t* dst = pairs + p * cols;
    int64_t c = 0;
    // (GCC's vector extension here: GCC 12's _mm512_cvtepu16_epi32 trips -Wmaybe-uninitialized.)
    for (; c + 16 <= cols; c += 16) {
      Half16 a, b = {};
      __builtin_memcpy(&a, lo + c, sizeof a);
      if (hi) __builtin_memcpy(&b, hi + c, sizeof b);
      const Word16 w = __builtin_convertvector(a, Word16) | (__builtin_convertvector(b, Word16) << 16);
      __builtin_memcpy(dst + c, &w, sizeof w);
    }
    for (; c < cols; ++c) dst[c] = uint32_t(lo[c]) | (hi ? uint32_t(hi[c]) << 16 : 0u);
  }
}

// dst[p] = bf16(w[2p]) | bf16(w[2p + 1]) << 16 for the n <= 32 weights w (round to nearest even;
// NaN stays NaN), zeros past n: the weight pairs values_block multiplies.
KVCORE_CPU_BF16_DOT_FN inline void weights_to_pairs(const float* w, int64_t n, uint32_t* dst) {
  const __mmask16 lo_mask = static_cast<__mmask16>(n >= 16 ? 0xffff : (1u << n) - 1);
  const __mmask16 hi_mask = static_cast<__mmask16>(n >= 32 ? 0xffff : n > 16 ? (1u << (n - 16)) - 1 : 0);
  const __m512 w_lo = _mm512_maskz_loadu_ps(lo_mask, w), w_hi = _mm512_maskz_loadu_ps(hi_mask, w + 16);
  const __m512bh wb = _mm512_cvtne2ps_pbh(w_hi, w_lo);  // bf16 k = w[k]: w_lo fills the low half
  __builtin_memcpy(dst, &wb, sizeof wb);
}

}  // namespace bf16dot

// attend_chunk for bf16 rows with the dot products above (w.qbf and w.pairs set): the same chunk
// step (logits, soft cap, online softmax, P V), KV head by KV head, blocks of up to 4 of its query
// heads; n <= 32 (every caller's kChunk). The logit of (head, key) has the same bits wherever it
// is computed (block sizes do not change a sum's order), which gqa_decode's H2O score pass relies
// on (key_logit_bf16).
template <typename T>
KVCORE_CPU_BF16_DOT_FN void attend_chunk_bf16(int64_t n, const T* k_base, const int64_t* k_off, const T* v_base,
                                              const int64_t* v_off, int64_t row_len, int64_t heads, int64_t group,
                                              int64_t D, float scale, float soft_cap, const ChunkScratch& w, float* m,
                                              float* l, float* acc) {
  static_assert(sizeof(T) == 2, "bf16 rows");
  const uint16_t* kb = reinterpret_cast<const uint16_t*>(k_base);
  const uint16_t* vb = reinterpret_cast<const uint16_t*>(v_base);
  // The chunk's rows, requested at once: each KV head below reads its slice of every row.
  for (int64_t i = 0; i < n; ++i) prefetch_row(kb + k_off[i], row_len);
  for (int64_t i = 0; i < n; ++i) prefetch_row(vb + v_off[i], row_len);
  const uint16_t* rows[32];
  const int64_t kv_heads = (heads + group - 1) / group;
  for (int64_t hk = 0; hk < kv_heads; ++hk) {
    for (int64_t i = 0; i < n; ++i) rows[i] = kb + k_off[i] + hk * D;
    for (int64_t h0 = hk * group; h0 < std::min(heads, (hk + 1) * group); h0 += 4) {
      const int64_t nh = std::min<int64_t>(4, std::min(heads, (hk + 1) * group) - h0);
      bf16dot::logits_heads(w.qbf + h0 * D, D, nh, rows, n, D, scale, w.logits + h0 * w.chunk, w.chunk);
    }
  }
  cap_logits(w.logits, heads, n, w.chunk, soft_cap);
  for (int64_t h = 0; h < heads; ++h) online_softmax_step(w.logits + h * w.chunk, n, m[h], l[h], acc + h * D, D);
  alignas(64) uint32_t wp[4][16];
  const int64_t npairs = (n + 1) / 2;
  for (int64_t hk = 0; hk < kv_heads; ++hk) {
    for (int64_t i = 0; i < n; ++i) rows[i] = vb + v_off[i] + hk * D;
    bf16dot::interleave_pairs(rows, n, D, w.pairs);
    for (int64_t h0 = hk * group; h0 < std::min(heads, (hk + 1) * group); h0 += 4) {
      const int64_t nh = std::min<int64_t>(4, std::min(heads, (hk + 1) * group) - h0);
      for (int64_t j = 0; j < nh; ++j) bf16dot::weights_to_pairs(w.logits + (h0 + j) * w.chunk, n, wp[j]);
      bf16dot::values_heads(acc + h0 * D, nh, D, npairs, wp[0], w.pairs);
    }
  }
}

// One (head, key) logit as attend_chunk_bf16 computes it: q . k * scale (before any soft cap).
KVCORE_CPU_BF16_DOT_FN inline float key_logit_bf16(const uint16_t* q, const uint16_t* k, int64_t D, float scale) {
  float x;
  bf16dot::logits_block<1, 1>(q, 0, &k, D, scale, &x, 1);
  return x;
}
#endif

// One chunk of n keys for `heads` query heads: logits (scale, optional soft cap), the online
// softmax step, then P V. Key i's row starts at k_base + k_off[i] (v likewise); query head h
// reads its KV head's D values at (h / group) * D within it. fp32 rows are read in place (the copy
// into scratch cost as much as the dot products: perf, gqa_decode fp32); other types are
// converted to fp32 once (row_len elements per row). gqa_decode passes whole token rows (all KV
// heads); block_sparse_decode one head's row (row_len = D, group = heads).
template <typename T>
void attend_chunk(int64_t n, const T* k_base, const int64_t* k_off, const T* v_base, const int64_t* v_off,
                  int64_t row_len, int64_t heads, int64_t group, int64_t D, const float* qf, float scale,
                  float soft_cap, const ChunkScratch& w, float* m, float* l, float* acc) {
#if defined(KVCORE_CPU_BF16_DOT_FN)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (w.pairs != nullptr) {
      attend_chunk_bf16(n, k_base, k_off, v_base, v_off, row_len, heads, group, D, scale, soft_cap, w, m, l, acc);
      return;
    }
  }
#endif
  constexpr bool kFp32 = std::is_same_v<T, float>;
  // Logits in register blocks (logits_heads_at: up to 4 query heads of one KV head x kLogitRows
  // keys, each K and q vector loaded once per block rather than once per (head, key) dot
  // product; other types than fp32 are converted a block of rows at a time).
  // Prefetch (session 33, this 2-core AVX-512 host, fp32 and fp16, B1-B8): the K rows are not
  // prefetched (a token's whole row is read at once, in page runs the hardware prefetcher
  // follows; a software prefetch of every line a few keys ahead filled the line-fill buffers:
  // 60% of the samples sat on it, and without it B1 S2048 ran ~10% faster), while each V row is
  // requested into L2 as its key's logits are computed (V is read a KV head's slice at a time,
  // a whole chunk later: a prefetch into L1 was evicted by then, none was slower at B8).
  for (int64_t i0 = 0; i0 < n; i0 += kLogitRows) {
    const int64_t nk = std::min<int64_t>(kLogitRows, n - i0);
    const float* kf[kLogitRows];
    for (int64_t r = 0; r < nk; ++r) {
      const int64_t i = i0 + r;
      prefetch_row_l2(v_base + v_off[i], row_len);
      if constexpr (kFp32) {
        kf[r] = k_base + k_off[i];
      } else {
        to_float(k_base + k_off[i], w.krow + r * row_len, row_len);
        kf[r] = w.krow + r * row_len;
      }
    }
    for (int64_t hk = 0; hk * group < heads; ++hk) {
      const int64_t h_end = std::min(heads, (hk + 1) * group);
      for (int64_t h0 = hk * group; h0 < h_end; h0 += 4)
        logits_heads_at(qf + h0 * D, std::min<int64_t>(4, h_end - h0), [&](int64_t r) { return kf[r] + hk * D; },
                        nk, D, scale, w.logits + h0 * w.chunk + i0, w.chunk);
    }
  }
  cap_logits(w.logits, heads, n, w.chunk, soft_cap);
  for (int64_t h = 0; h < heads; ++h) online_softmax_step(w.logits + h * w.chunk, n, m[h], l[h], acc + h * D, D);
  // KV head by KV head: its query heads in register blocks of up to 4 (pv_heads_at: each V vector
  // loaded once for the block), so its chunk of V slices (n x D) stays in L1. Other types than
  // fp32 convert those slices first (the whole chunk's rows, 128 KB at bf16 H8 D128, did not fit:
  // slower than the per-key form).
  for (int64_t hk = 0; hk * group < heads; ++hk) {
    if constexpr (!kFp32)
      for (int64_t i = 0; i < n; ++i) to_float(v_base + v_off[i] + hk * D, w.vrows + i * D, D);
    auto v_row = [&](int64_t i) -> const float* {
      if constexpr (kFp32)
        return v_base + v_off[i] + hk * D;
      else
        return w.vrows + i * D;
    };
    const int64_t h_end = std::min(heads, (hk + 1) * group);
    for (int64_t h0 = hk * group; h0 < h_end; h0 += 4)
      pv_heads_at(acc + h0 * D, std::min<int64_t>(4, h_end - h0), D, n, w.logits + h0 * w.chunk, w.chunk, v_row);
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

// A split decode's scratch: every task's normalised part ([tasks][rows][D]) and log-sum-exp
// ([tasks][rows]). Each task writes its whole part (finish_part) before the merge reads it, so
// both are left uninitialised: as value-initialised vectors they were zero-filled every call, 14-25%
// of a short mla_decode call on a 2-core AMX host (B1 H128 S256: 1 MB; bench/NOTES.md, session 36).
struct TaskParts {
  std::unique_ptr<float[]> out, lse;
  TaskParts(int64_t tasks, int64_t rows, int64_t D) : out(new float[tasks * rows * D]), lse(new float[tasks * rows]) {}
};

// Merges the rows bh in [begin, end) of a decode's [batch, heads] outputs from the `parts`
// normalised parts its tasks wrote, in part order: for b = bh / heads, h = bh % heads, part j's
// row at part_out + ((b * parts + j) * heads + h) * D and its log-sum-exp at part_lse[(b * parts
// + j) * heads + h] (task b * parts + j's heads in order). Writes out [bh, D] and, when lse is
// not null, lse[bh]. Callers hand it ranges of at::parallel_for (this header is torch-free).
template <typename T>
void merge_task_parts(int64_t begin, int64_t end, int64_t heads, int64_t D, int64_t parts, const float* part_out,
                      const float* part_lse, T* out, float* lse, float* scratch) {
  for (int64_t bh = begin; bh < end; ++bh) {
    const int64_t b = bh / heads, h = bh % heads;
    merge_parts(
        parts, [&](int64_t j) { return part_lse[(b * parts + j) * heads + h]; },
        [&](int64_t j) { return part_out + ((b * parts + j) * heads + h) * D; }, D, out + bh * D,
        lse != nullptr ? lse + bh : nullptr, scratch);
  }
}

}  // namespace cpu
}  // namespace KVCORE_CPU_ISA_NS
}  // namespace
}  // namespace kvcore
