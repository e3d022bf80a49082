// The kernels of mla_decode_cpu.cpp (see there), compiled once per instruction set through
// common/cpu_isa_kernels.h: no include guard and no #include here (cpu_isa.h says why).
namespace kvcore {
namespace {
namespace KVCORE_CPU_ISA_NS {

template <typename scalar_t>
void mla_decode_tasks(const MlaDecodeShape& s, const scalar_t* q, int64_t q_stride_b, int64_t q_stride_h,
                      const scalar_t* cache, int64_t page_stride, const int32_t* block_table, const int32_t* seq_lens,
                      float scale, int64_t num_splits, scalar_t* out, float* lse) {
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
    parts = std::clamp<int64_t>((2 * threads + s.batch - 1) / s.batch, 1,
                                std::max<int64_t>(1, longest / kMinPartTokens));
  }
  std::vector<float> part_out(s.batch * parts * H * Dv), part_lse(s.batch * parts * H);

  at::parallel_for(0, s.batch * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * Dk), acc(H * Dv), rows(kChunk * Dk), logits(H * kChunk), m(H), l(H);
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
        // The chunk's latent rows in fp32 (each read once; they serve as keys and as values).
        for (int64_t i = 0; i < n; ++i) {
          const int64_t pos = c0 + i;
          const int64_t page = std::clamp<int64_t>(pages[pos / s.page_size], 0, s.num_pages - 1);
          const scalar_t* src = cache + page * page_stride + (pos % s.page_size) * Dk;
          float* dst = rows.data() + i * Dk;
          cpu::to_float(src, dst, Dk);
        }
        for (int64_t h = 0; h < H; ++h) {
          float* lg = logits.data() + h * kChunk;
          for (int64_t i = 0; i < n; ++i) lg[i] = cpu::dot_product(qf.data() + h * Dk, rows.data() + i * Dk, Dk) * scale;
          float* ah = acc.data() + h * Dv;
          cpu::online_softmax_step(lg, n, m[h], l[h], ah, Dv);
          // The value is the row's first Dv columns; accumulated in registers over the chunk.
          cpu::accumulate_pv(ah, Dv, n, lg, [&](int64_t i) -> const float* { return rows.data() + i * Dk; });
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
