// The kernels of mla_decode_cpu.cpp (see there), compiled once per instruction set through
// common/cpu_isa_kernels.h: no include guard and no #include here (cpu_isa.h says why).
namespace kvcore {
namespace {
namespace KVCORE_CPU_ISA_NS {

// Every latent row serves all H heads, and one head at a time re-read each row (2.3 KB, a chunk of
// 32 is 74 KB: past L1) once per head for the logits and again for the values, two loads per
// multiply-add. So both products go in register blocks of up to 4 heads: cpu::logits_heads and
// cpu::pv_heads (cpu_attention.h).

#if defined(KVCORE_CPU_BF16_DOT_FN)
// bf16 mla_decode with AVX512_BF16 (cpu_attention.h's bf16dot): the logits from q and the latent
// rows as stored, the values from the bf16 weights and the rows' first Dv columns in pairs.
namespace mla_bf16 {

// One chunk of n <= 32 rows (row_i at rows[i]) for all H heads (q_h at q + h * q_stride; the
// state m, l and acc as in the fp32 path). pairs: scratch of 16 x Dv words.
KVCORE_CPU_BF16_DOT_FN void chunk(const uint16_t* q, int64_t q_stride, int64_t H, const uint16_t* const* rows,
                                  int64_t n, int64_t Dk, int64_t Dv, float scale, float* logits, float* m, float* l,
                                  float* acc, uint32_t* pairs) {
  static_assert(kChunk <= 32, "a chunk's weights are converted as one pair of 16-float vectors");
  const int64_t npairs = (n + 1) / 2;
  cpu::bf16dot::interleave_pairs(rows, n, Dv, pairs);  // the rows' first Dv columns: the values
  alignas(64) uint32_t wp[4][16];
  for (int64_t h0 = 0; h0 < H; h0 += 4) {
    const int64_t nh = std::min<int64_t>(4, H - h0);
    float* lg = logits + h0 * kChunk;
    cpu::bf16dot::logits_heads(q + h0 * q_stride, q_stride, nh, rows, n, Dk, scale, lg, kChunk);
    for (int64_t j = 0; j < nh; ++j) {
      cpu::online_softmax_step(lg + j * kChunk, n, m[h0 + j], l[h0 + j], acc + (h0 + j) * Dv, Dv);
      cpu::bf16dot::weights_to_pairs(lg + j * kChunk, n, wp[j]);
    }
    cpu::bf16dot::values_heads(acc + h0 * Dv, nh, Dv, npairs, wp[0], pairs);
  }
}

}  // namespace mla_bf16
#endif

template <typename scalar_t>
void mla_decode_tasks(const MlaDecodeShape& s, const scalar_t* q, int64_t q_stride_b, int64_t q_stride_h,
                      const scalar_t* cache, int64_t page_stride, const int32_t* block_table, const int32_t* seq_lens,
                      float scale, int64_t num_splits, bool bf16_dot, scalar_t* out, float* lse) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t H = s.num_heads, Dk = s.dk, Dv = s.dv;
  const int64_t capacity = s.num_pages > 0 ? s.max_pages * s.page_size : 0;

  std::vector<int64_t> len(s.batch);
  int64_t longest = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    len[b] = std::clamp<int64_t>(seq_lens[b], 0, capacity);
    longest = std::max(longest, len[b]);
  }
  int64_t parts;
  if (num_splits > 0) {
    parts = forced_cpu_parts(num_splits, longest, kChunk);
  } else {
    const int64_t threads = at::get_num_threads();
    const int64_t min_part = std::max<int64_t>(kChunk, kMinPartMacs / std::max<int64_t>(1, H * (Dk + Dv)));
    parts = std::clamp<int64_t>((2 * threads + s.batch - 1) / s.batch, 1, std::max<int64_t>(1, longest / min_part));
  }
  std::vector<float> part_out(s.batch * parts * H * Dv), part_lse(s.batch * parts * H);

  at::parallel_for(0, s.batch * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * Dk), acc(H * Dv), rows(kChunk * Dk), logits(H * kChunk), m(H), l(H);
    const bool pairwise = bf16_dot && cpu::has_bf16_dot<scalar_t>();
    std::vector<uint32_t> pairs(pairwise ? (kChunk + 1) / 2 * Dv : 0);  // mla_bf16::chunk's row pairs
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / parts, part = task % parts;
      const int64_t span = (len[b] + parts - 1) / parts;
      const int64_t start = part * span, stop = std::min(len[b], start + span);
      const int32_t* pages = block_table + b * s.max_pages;

      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* qh = q + b * q_stride_b + h * q_stride_h;
        cpu::to_float(qh, qf.data() + h * Dk, Dk);
        m[h] = kNegInf;
        l[h] = 0.0f;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);

      for (int64_t c0 = start; c0 < stop; c0 += kChunk) {
        const int64_t n = std::min<int64_t>(kChunk, stop - c0);
#if defined(KVCORE_CPU_BF16_DOT_FN)
        if (pairwise) {  // the rows as stored, multiplied in bf16 pairs (see mla_bf16)
          const uint16_t* row_ptrs[kChunk];
          for (int64_t i = 0; i < n; ++i) {
            const int64_t pos = c0 + i;
            const int64_t page = std::clamp<int64_t>(pages[pos / s.page_size], 0, s.num_pages - 1);
            row_ptrs[i] = reinterpret_cast<const uint16_t*>(cache + page * page_stride + (pos % s.page_size) * Dk);
          }
          mla_bf16::chunk(reinterpret_cast<const uint16_t*>(q + b * q_stride_b), q_stride_h, H, row_ptrs, n, Dk, Dv,
                          scale, logits.data(), m.data(), l.data(), acc.data(), pairs.data());
          continue;
        }
#endif
        // The chunk's latent rows in fp32 (each read once; they serve as keys and as values): an
        // fp32 cache's rows in place, other types converted into `rows`.
        const float* row_at[kChunk];
        for (int64_t i = 0; i < n; ++i) {
          const int64_t pos = c0 + i;
          const int64_t page = std::clamp<int64_t>(pages[pos / s.page_size], 0, s.num_pages - 1);
          const scalar_t* src = cache + page * page_stride + (pos % s.page_size) * Dk;
          if constexpr (std::is_same_v<scalar_t, float>) {
            row_at[i] = src;
          } else {
            float* dst = rows.data() + i * Dk;
            cpu::to_float(src, dst, Dk);
            row_at[i] = dst;
          }
        }
        const auto row = [&](int64_t i) { return row_at[i]; };
        // Four heads at a time (see cpu::logits_block_at): their logits, each head's online-softmax
        // step, then their values (the row's first Dv columns), accumulated in registers.
        for (int64_t h0 = 0; h0 < H; h0 += 4) {
          const int64_t nh = std::min<int64_t>(4, H - h0);
          float* lg = logits.data() + h0 * kChunk;
          cpu::logits_heads_at(qf.data() + h0 * Dk, nh, row, n, Dk, scale, lg, kChunk);
          for (int64_t j = 0; j < nh; ++j)
            cpu::online_softmax_step(lg + j * kChunk, n, m[h0 + j], l[h0 + j], acc.data() + (h0 + j) * Dv, Dv);
          cpu::pv_heads_at(acc.data() + h0 * Dv, nh, Dv, n, lg, kChunk, row);
        }
      }

      float* po = part_out.data() + task * H * Dv;
      float* pl = part_lse.data() + task * H;
      for (int64_t h = 0; h < H; ++h) cpu::finish_part(acc.data() + h * Dv, m[h], l[h], Dv, po + h * Dv, pl + h);
    }
  });

  // Merge the parts of each (sequence, head) in part order.
  at::parallel_for(0, s.batch * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(Dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      cpu::merge_parts(
          parts, [&](int64_t j) { return part_lse[(b * parts + j) * H + h]; },
          [&](int64_t j) { return part_out.data() + ((b * parts + j) * H + h) * Dv; }, Dv, out + bh * Dv,
          lse != nullptr ? lse + bh : nullptr, scratch.data());
    }
  });
}

}  // namespace KVCORE_CPU_ISA_NS
}  // namespace
}  // namespace kvcore
