// The kernels of gqa_decode_cpu.cpp (see there), compiled once per instruction set through
// common/cpu_isa_kernels.h: no include guard and no #include here (cpu_isa.h says why).
namespace kvcore {
namespace {
namespace KVCORE_CPU_ISA_NS {

static_assert(kChunk <= 32, "cpu::attend_chunk_bf16 takes at most 32 keys a chunk");

template <typename scalar_t>
void gqa_decode_tasks(const DecodeParams& p, const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                      const int32_t* block_table, const int32_t* seq_lens, bool bf16_dot, scalar_t* out, float* lse) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t G = p.group, D = p.head_dim, H = p.num_kv_heads, Hq = H * G;
  const int64_t row = H * D;  // elements per token slot in a page (dense)
  const int64_t capacity = p.num_pages > 0 ? p.max_pages * p.page_size : 0;

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
  const cpu::TaskParts task_parts(p.batch * parts, Hq, D);
  float* const part_out = task_parts.out.get();
  float* const part_lse = task_parts.lse.get();

  at::parallel_for(0, p.batch * parts, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch, reused across the tasks of this range.
    // (No conversion rows for an fp32 cache: attend_chunk reads it in place.)
    constexpr bool fp32 = std::is_same_v<scalar_t, float>;
    std::vector<float> qf(Hq * D), acc(Hq * D), krow(fp32 ? 0 : cpu::kLogitRows * row), vrows(fp32 ? 0 : kChunk * D),
        logits(Hq * kChunk), m(Hq), l(Hq);
    // bf16 with AVX512_BF16 (cpu::attend_chunk_bf16): q's bits and the value pairs.
    const bool pairwise = bf16_dot && cpu::has_bf16_dot<scalar_t>();
    std::vector<uint16_t> qbf(pairwise ? Hq * D : 0);
    std::vector<uint32_t> pairs(pairwise ? (kChunk + 1) / 2 * D : 0);
    const cpu::ChunkScratch scratch{krow.data(), vrows.data(), logits.data(), kChunk, pairwise ? qbf.data() : nullptr,
                                    pairwise ? pairs.data() : nullptr};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / parts, part = task % parts;
      const int64_t span = (hi[b] - lo[b] + parts - 1) / parts;
      const int64_t start = lo[b] + part * span, stop = std::min(hi[b], start + span);
      const int32_t* pages = block_table + b * p.max_pages;

      for (int64_t h = 0; h < Hq; ++h) {
        const scalar_t* qh = q + b * p.q_stride_b + h * p.q_stride_h;
        cpu::to_float(qh, qf.data() + h * D, D);
        if (pairwise) __builtin_memcpy(qbf.data() + h * D, qh, D * sizeof(uint16_t));
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
        cpu::attend_chunk(n, k_cache, k_off, v_cache, v_off, row, Hq, G, D, qf.data(), p.scale, p.soft_cap,
                          scratch, m.data(), l.data(), acc.data());
      }

      // This part's normalised output and log-sum-exp (-inf and zeros when it saw no key). A NaN
      // l (a NaN logit) is not empty: it gives NaN out and NaN lse, which the merge passes on.
      float* po = part_out + task * Hq * D;
      float* pl = part_lse + task * Hq;
      for (int64_t h = 0; h < Hq; ++h) cpu::finish_part(acc.data() + h * D, m[h], l[h], D, po + h * D, pl + h);
    }
  });

  // Merge the parts of each (sequence, query head) in part order.
  at::parallel_for(0, p.batch * Hq, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(D);
    cpu::merge_task_parts(begin, end, Hq, D, parts, part_out, part_lse, out, lse, scratch.data());
  });
}

// H2O accumulation (score given): after the decode, score[b, h, p] += sum over the group's query
// heads of exp(logit - lse) for every attended key p. A second pass over the keys recomputes the
// logits exactly as attend_chunk does (its register blocks, whose summation order does not depend
// on the block, then the same scale and cap; with bf16_dot the bf16 dot products,
// cpu::key_logit_bf16), so they match the lse.
// Tasks are (sequence, key chunk): disjoint score elements, and each element sums its group's
// heads in order (deterministic).
template <typename scalar_t>
void accumulate_scores(const DecodeParams& p, const scalar_t* q, const scalar_t* k_cache, const int32_t* block_table,
                       const int32_t* seq_lens, bool bf16_dot, const float* lse, float* score, int64_t score_len) {
  constexpr int64_t kKeys = 256;
  const int64_t G = p.group, D = p.head_dim, H = p.num_kv_heads, Hq = H * G, row = H * D;
  const int64_t capacity = p.num_pages > 0 ? p.max_pages * p.page_size : 0;
  const bool capped = p.soft_cap > 0.0f;
  const float inv_cap = capped ? 1.0f / p.soft_cap : 0.0f;
  const int64_t chunks = (capacity + kKeys - 1) / kKeys;
  at::parallel_for(0, p.batch * chunks, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t kRows = cpu::kLogitRows;
    constexpr bool fp32 = std::is_same_v<scalar_t, float>;
    // Scratch: kRows token rows as fp32 (other types than fp32), every query head's logits of the chunk.
    std::vector<float> qf(Hq * D), krows(fp32 ? 0 : kRows * row), lg(Hq * kKeys);
    int64_t qf_b = -1;
    const bool pairwise = bf16_dot && cpu::has_bf16_dot<scalar_t>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, chunk = task % chunks;
      const int64_t hi = std::clamp<int64_t>(seq_lens[b], 0, capacity);
      const int64_t lo = p.window_left >= 0 ? std::max<int64_t>(0, hi - 1 - p.window_left) : 0;
      const int64_t start = std::max(lo, chunk * kKeys), stop = std::min(hi, (chunk + 1) * kKeys);
      if (start >= stop) continue;
      if (qf_b != b) {
        for (int64_t h = 0; h < Hq; ++h) {
          const scalar_t* qh = q + b * p.q_stride_b + h * p.q_stride_h;
          cpu::to_float(qh, qf.data() + h * D, D);
        }
        qf_b = b;
      }
      const int32_t* pages = block_table + b * p.max_pages;
      auto row_of = [&](int64_t pos) {
        const int64_t page = std::clamp<int64_t>(pages[pos / p.page_size], 0, p.num_pages - 1);
        return k_cache + page * p.k_page_stride + (pos % p.page_size) * row;
      };
      // A key's logit as the decode kept it, from the scaled dot product (capped when asked).
      auto stored_logit = [&](float x) {
        x = cpu::as_stored(x);
        return capped ? cpu::as_stored(p.soft_cap * std::tanh(x * inv_cap)) : x;
      };
      // Query head hq's probability of a key from its scaled dot product x (the exp of the
      // vectorised pass below).
      [[maybe_unused]] auto prob = [&](int64_t hq, float x) {
        float y = stored_logit(x);
        cpu::exp_diff(&y, lse[b * Hq + hq], &y, 1);
        return y;
      };
#if defined(KVCORE_CPU_BF16_DOT_FN)
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (pairwise) {  // the bf16 dot products, key by key (cpu::key_logit_bf16)
          for (int64_t pos = start; pos < stop; ++pos) {
            const uint16_t* kr = reinterpret_cast<const uint16_t*>(row_of(pos));
            for (int64_t h = 0; h < H; ++h) {
              float sum = 0.0f;
              for (int64_t g = 0; g < G; ++g) {
                const int64_t hq = h * G + g;
                const uint16_t* qh = reinterpret_cast<const uint16_t*>(q + b * p.q_stride_b + hq * p.q_stride_h);
                sum += prob(hq, cpu::key_logit_bf16(qh, kr + h * D, D, p.scale));
              }
              score[(b * H + h) * score_len + pos] += sum;
            }
          }
          continue;
        }
      }
#endif
      (void)pairwise;
      // kRows keys at a time: each KV head's logits in attend_chunk's register blocks (the same
      // summation order, so the same logits) into lg, a row of the chunk's keys per query head;
      // then each head's probabilities in one vectorised pass over its row, and each key's summed
      // over the group in head order. No K prefetch (attend_chunk says why).
      const int64_t n = stop - start;
      for (int64_t pos0 = start; pos0 < stop; pos0 += kRows) {
        const int64_t nk = std::min<int64_t>(kRows, stop - pos0);
        const float* kf[kRows];
        for (int64_t r = 0; r < nk; ++r) {
          if constexpr (fp32) {
            kf[r] = row_of(pos0 + r);
          } else {
            cpu::to_float(row_of(pos0 + r), krows.data() + r * row, row);
            kf[r] = krows.data() + r * row;
          }
        }
        for (int64_t h = 0; h < H; ++h)
          for (int64_t g0 = 0; g0 < G; g0 += 4)
            cpu::logits_heads_at(qf.data() + (h * G + g0) * D, std::min<int64_t>(4, G - g0),
                                 [&](int64_t r) { return kf[r] + h * D; }, nk, D, p.scale,
                                 lg.data() + (h * G + g0) * kKeys + (pos0 - start), kKeys);
      }
      for (int64_t hq = 0; hq < Hq; ++hq) {
        float* x = lg.data() + hq * kKeys;
        for (int64_t r = 0; r < n; ++r) x[r] = stored_logit(x[r]);
        cpu::exp_diff(x, lse[b * Hq + hq], x, n);
      }
      for (int64_t h = 0; h < H; ++h) {
        float* dst = score + (b * H + h) * score_len + start;
        for (int64_t r = 0; r < n; ++r) {
          float sum = 0.0f;
          for (int64_t g = 0; g < G; ++g) sum += lg[(h * G + g) * kKeys + r];
          dst[r] += sum;
        }
      }
    }
  });
}

}  // namespace KVCORE_CPU_ISA_NS
}  // namespace
}  // namespace kvcore
