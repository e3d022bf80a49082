// The kernels of attention_scores_cpu.cpp (see there), compiled once per instruction set through
// common/cpu_isa_kernels.h: no include guard and no #include here (cpu_isa.h says why).
namespace kvcore {
namespace {
namespace KVCORE_CPU_ISA_NS {

static_assert(kChunk <= 32, "the bf16 path's row pointers: at most 32 keys a chunk");

template <typename scalar_t>
void attention_scores_tasks(const ScoreParams& p, const scalar_t* q, const scalar_t* k_cache,
                            const int32_t* block_table, const int32_t* seq_lens, const float* lse_in, bool bf16_dot,
                            float* out) {
  const int64_t B = p.batch, H = p.num_kv_heads, G = p.group, W = p.window, D = p.head_dim;
  const int64_t R = G * W;  // query rows per (b, h); row r = g * W + i
  const int64_t Hq = H * G;
  const int64_t row_elems = H * D;
  const int64_t capacity = p.num_pages > 0 ? p.max_pages * p.page_size : 0;

  std::vector<int64_t> len(B);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    len[b] = std::clamp<int64_t>(seq_lens[b], 0, std::min(capacity, p.max_len));
    longest = std::max(longest, len[b]);
  }
  const int64_t threads = at::get_num_threads();
  const int64_t parts = std::clamp<int64_t>((2 * threads + B * H - 1) / (B * H), 1,
                                            std::max<int64_t>(1, longest / kMinPartTokens));
  const int64_t tasks = B * H * parts;

  auto part_range = [&](int64_t b, int64_t part, int64_t& start, int64_t& stop) {
    const int64_t span = (len[b] + parts - 1) / parts;
    start = std::min(len[b], part * span);
    stop = std::min(len[b], start + span);
  };

  // Loads the R query rows of (b, h) as fp32 and, per row, the last key position it sees
  // (-1: the row lies before the sequence start and sees nothing).
  auto load_queries = [&](int64_t b, int64_t h, float* qf, int64_t* last) {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < W; ++i) {
        const int64_t r = g * W + i;
        const scalar_t* src = q + b * p.q_stride_b + i * p.q_stride_w + (h * G + g) * p.q_stride_h;
        cpu::to_float(src, qf + r * D, D);
        last[r] = std::max<int64_t>(-1, len[b] - W + i);
      }
  };

  // Logits [R, n] of the keys c0 .. c0 + n - 1 of (b, h); a key a row does not see gets -inf.
  // The chunk's key rows are converted once (krows: n x D fp32), then every row's logits come in
  // register blocks of up to 4 query rows x cpu::kLogitRows keys (each key serves all R rows;
  // one dot product at a time reloaded the key row and reduced its lanes per row).
  // bf16 with AVX512_BF16 (bf16_dot): the rows as stored, multiplied in bf16 pairs (cpu::bf16dot).
  const bool pairwise = bf16_dot && cpu::has_bf16_dot<scalar_t>();
  auto chunk_logits = [&](int64_t b, int64_t h, int64_t c0, int64_t n, const float* qf, const int64_t* last,
                          float* krows, float* logits) {
    const int32_t* pages = block_table + b * p.max_pages;
#if defined(KVCORE_CPU_BF16_DOT_FN)
    if (pairwise) {
      const uint16_t* rows[kChunk];
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = c0 + j;
        const int64_t page = std::clamp<int64_t>(pages[pos / p.page_size], 0, p.num_pages - 1);
        rows[j] = reinterpret_cast<const uint16_t*>(k_cache + page * p.k_page_stride +
                                                    (pos % p.page_size) * row_elems + h * D);
      }
      // Row r = g * W + i: the window's queries of one head are q_stride_w apart.
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i0 = 0; i0 < W; i0 += 4) {
          const scalar_t* q0 = q + b * p.q_stride_b + i0 * p.q_stride_w + (h * G + g) * p.q_stride_h;
          cpu::bf16dot::logits_heads(reinterpret_cast<const uint16_t*>(q0), p.q_stride_w,
                                     std::min<int64_t>(4, W - i0), rows, n, D, p.scale,
                                     logits + (g * W + i0) * kChunk, kChunk);
        }
    }
#endif
    for (int64_t j = 0; j < n && !pairwise; ++j) {
      const int64_t pos = c0 + j;
      const int64_t page = std::clamp<int64_t>(pages[pos / p.page_size], 0, p.num_pages - 1);
      const scalar_t* kr = k_cache + page * p.k_page_stride + (pos % p.page_size) * row_elems + h * D;
      cpu::to_float(kr, krows + j * D, D);
    }
    for (int64_t r0 = 0; r0 < R && !pairwise; r0 += 4)
      cpu::logits_heads(qf + r0 * D, std::min<int64_t>(4, R - r0), krows, D, n, D, p.scale, logits + r0 * kChunk,
                        kChunk);
    for (int64_t r = 0; r < R; ++r)  // unseen keys (their logit, even a NaN one, is not used)
      for (int64_t j = std::max<int64_t>(0, last[r] + 1 - c0); j < n; ++j) logits[r * kChunk + j] = kNegInf;
  };

  // ---- pass 1: row log-sum-exp (skipped when the caller passes it) ----
  // The shared online-softmax step and ordered part merge carry kvcore's NaN rule: a NaN logit
  // (NaN in q or in a key the row sees) makes the row's lse NaN in every part split, rather than
  // being skipped as "no key seen" (std::max drops NaN) or turned into -inf by the merge.
  std::vector<float> row_lse(B * H * R);
  if (lse_in == nullptr) {
    std::vector<float> part_lse(tasks * R);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(R * D), krows(kChunk * D), logits(R * kChunk), m(R), l(R);
      std::vector<int64_t> last(R);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / parts, part = t % parts, b = bh / H, h = bh % H;
        int64_t start, stop;
        part_range(b, part, start, stop);
        std::fill(m.begin(), m.end(), kNegInf);
        std::fill(l.begin(), l.end(), 0.0f);
        if (start < stop) {
          load_queries(b, h, qf.data(), last.data());
          for (int64_t c0 = start; c0 < stop; c0 += kChunk) {
            const int64_t n = std::min(kChunk, stop - c0);
            chunk_logits(b, h, c0, n, qf.data(), last.data(), krows.data(), logits.data());
            // No accumulator (D = 0): only the running max and sum are needed here.
            for (int64_t r = 0; r < R; ++r)
              cpu::online_softmax_step(logits.data() + r * kChunk, n, m[r], l[r], nullptr, 0);
          }
        }
        for (int64_t r = 0; r < R; ++r) cpu::finish_part(nullptr, m[r], l[r], 0, nullptr, part_lse.data() + t * R + r);
      }
    });
    at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh)
        for (int64_t r = 0; r < R; ++r)
          cpu::merge_parts<float>(
              parts, [&](int64_t j) { return part_lse[(bh * parts + j) * R + r]; },
              [](int64_t) { return static_cast<const float*>(nullptr); }, 0, nullptr, row_lse.data() + bh * R + r,
              nullptr);
    });
  } else {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t i = 0; i < W; ++i)
            row_lse[(b * H + h) * R + g * W + i] = lse_in[(b * W + i) * Hq + h * G + g];
  }

  // ---- pass 2: probabilities reduced over the rows ----
  const bool use_max = p.opt.reduction == ScoreReduction::kMax;
  const float norm = p.opt.reduction == ScoreReduction::kMean ? 1.0f / static_cast<float>(R) : 1.0f;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(R * D), krows(kChunk * D), logits(R * kChunk);
    std::vector<int64_t> last(R);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / parts, part = t % parts, b = bh / H, h = bh % H;
      int64_t start, stop;
      part_range(b, part, start, stop);
      float* o = out + bh * p.max_len;
      if (part == parts - 1)  // keys past the sequence score 0
        std::fill(o + len[b], o + p.max_len, 0.0f);
      if (start >= stop) continue;
      load_queries(b, h, qf.data(), last.data());
      const float* lse_row = row_lse.data() + bh * R;
      for (int64_t c0 = start; c0 < stop; c0 += kChunk) {
        const int64_t n = std::min(kChunk, stop - c0);
        chunk_logits(b, h, c0, n, qf.data(), last.data(), krows.data(), logits.data());
        float acc[kChunk];
        std::fill(acc, acc + n, 0.0f);
        for (int64_t r = 0; r < R; ++r) {
          float* lg = logits.data() + r * kChunk;
          const float ls = lse_row[r];
          // Probabilities in place first, vectorised (exp_diff, not std::exp per key). exp(-inf -
          // x) = 0 for an unseen key (also when ls is -inf or NaN); a NaN logit or lse stays NaN.
          cpu::exp_diff(lg, ls, lg, n);
          if (use_max) {
            // once NaN, acc stays NaN (NaN > x is false); a NaN probability replaces acc.
            for (int64_t j = 0; j < n; ++j) acc[j] = (lg[j] > acc[j] || std::isnan(lg[j])) ? lg[j] : acc[j];
          } else {
            for (int64_t j = 0; j < n; ++j) acc[j] += lg[j];
          }
        }
        for (int64_t j = 0; j < n; ++j) o[c0 + j] = acc[j] * norm;
      }
    }
  });

  // ---- pooling of the prefix keys [0, len - W) ----
  if (p.opt.pooling == ScorePooling::kNone) return;
  const int64_t rad = p.opt.pool_kernel / 2;
  const bool avg = p.opt.pooling == ScorePooling::kAvg;
  const float inv_k = 1.0f / static_cast<float>(p.opt.pool_kernel);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t n = len[bh / H] - W;
      float* o = out + bh * p.max_len;
      float ring[8];  // original values of positions x - rad .. x - 1, at index pos % rad
      for (int64_t x = 0; x < n; ++x) {
        float acc = avg ? 0.0f : kNegInf;
        for (int64_t y = std::max<int64_t>(0, x - rad); y <= std::min(n - 1, x + rad); ++y) {
          const float v = y < x ? ring[y % rad] : o[y];
          acc = avg ? acc + v : ((v > acc || std::isnan(v)) ? v : acc);
        }
        ring[x % rad] = o[x];
        o[x] = avg ? acc * inv_k : acc;
      }
    }
  });
}

}  // namespace KVCORE_CPU_ISA_NS
}  // namespace
}  // namespace kvcore
