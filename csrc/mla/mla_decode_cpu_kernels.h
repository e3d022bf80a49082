// The kernels of mla_decode_cpu.cpp (see there), compiled once per instruction set through
// common/cpu_isa_kernels.h: no include guard and no #include here (cpu_isa.h says why).
namespace kvcore {
namespace {
namespace KVCORE_CPU_ISA_NS {

// Register blocks of the chunk's two products, NH heads at a time: every latent row serves all H
// heads, and one head at a time re-read each row (2.3 KB, a chunk of 32 is 74 KB: past L1) once
// per head for the logits and again for the values, two loads per multiply-add.

// lg[j * lg_stride + i] = q_j . row_i * scale for NH heads j (q_j at q + j * Dk) and NK rows i
// (row_i at rows + i * Dk): NH x NK independent chains; per step of d, each of the NK row vectors
// is loaded once for the NH heads and each q vector once for the NK rows. Every (j, i) sums its
// products in the same order (one chain over d, then the lanes in a fixed tree, then the tail)
// whatever NH and NK are, so a logit does not depend on the block it falls in.
template <int NH, int NK>
inline void mla_logits_block(const float* q, const float* rows, int64_t Dk, float scale, float* lg,
                             int64_t lg_stride) {
  using cpu::FVec;
  using cpu::kVecLanes;
  FVec acc[NH][NK] = {};
  int64_t d = 0;
  for (; d + kVecLanes <= Dk; d += kVecLanes) {
    FVec r[NK];
#pragma GCC unroll 4
    for (int i = 0; i < NK; ++i) r[i] = cpu::load_vec(rows + i * Dk + d);
#pragma GCC unroll 4
    for (int j = 0; j < NH; ++j) {
      const FVec qv = cpu::load_vec(q + j * Dk + d);
#pragma GCC unroll 4
      for (int i = 0; i < NK; ++i) acc[j][i] += qv * r[i];
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < NH; ++j) {
#pragma GCC unroll 4
    for (int i = 0; i < NK; ++i) {
      float s = cpu::lane_sum(acc[j][i]);
      for (int64_t t = d; t < Dk; ++t) s += q[j * Dk + t] * rows[i * Dk + t];
      lg[j * lg_stride + i] = s * scale;
    }
  }
}

// acc_j[0, Dv) += sum over i < n of w_j[i] * row_i[0, Dv) for NH heads j (acc_j at acc + j * Dv,
// w_j at w + j * w_stride): 2 x NH vector accumulators in registers across the rows, each row's
// two vectors loaded once for the NH heads. Each element sums its rows in order, as
// cpu::accumulate_pv does.
template <int NH>
inline void mla_values_block(float* acc, int64_t Dv, int64_t n, const float* w, int64_t w_stride, const float* rows,
                             int64_t Dk) {
  using cpu::FVec;
  using cpu::kVecLanes;
  int64_t d = 0;
  for (; d + 2 * kVecLanes <= Dv; d += 2 * kVecLanes) {
    FVec a[NH][2];
#pragma GCC unroll 4
    for (int j = 0; j < NH; ++j) {
      a[j][0] = cpu::load_vec(acc + j * Dv + d);
      a[j][1] = cpu::load_vec(acc + j * Dv + d + kVecLanes);
    }
    for (int64_t i = 0; i < n; ++i) {
      const FVec v0 = cpu::load_vec(rows + i * Dk + d), v1 = cpu::load_vec(rows + i * Dk + d + kVecLanes);
#pragma GCC unroll 4
      for (int j = 0; j < NH; ++j) {
        const FVec wv = cpu::splat(w[j * w_stride + i]);
        a[j][0] += wv * v0;
        a[j][1] += wv * v1;
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NH; ++j) {
      __builtin_memcpy(acc + j * Dv + d, &a[j][0], sizeof(FVec));
      __builtin_memcpy(acc + j * Dv + d + kVecLanes, &a[j][1], sizeof(FVec));
    }
  }
  for (; d < Dv; ++d)
    for (int j = 0; j < NH; ++j) {
      float s = acc[j * Dv + d];
      for (int64_t i = 0; i < n; ++i) s += w[j * w_stride + i] * rows[i * Dk + d];
      acc[j * Dv + d] = s;
    }
}

// The chunk's logits for heads [h0, h0 + nh) (nh <= 4) and rows [0, n), in blocks of up to 4 x 2.
inline void mla_logits(const float* q, int64_t nh, const float* rows, int64_t n, int64_t Dk, float scale, float* lg,
                       int64_t lg_stride) {
  for (int64_t i = 0; i < n; i += 2) {
    const bool two = i + 1 < n;
    const float* r = rows + i * Dk;
    float* out = lg + i;
    switch (nh * 2 + (two ? 1 : 0)) {
      case 9: mla_logits_block<4, 2>(q, r, Dk, scale, out, lg_stride); break;
      case 8: mla_logits_block<4, 1>(q, r, Dk, scale, out, lg_stride); break;
      case 7: mla_logits_block<3, 2>(q, r, Dk, scale, out, lg_stride); break;
      case 6: mla_logits_block<3, 1>(q, r, Dk, scale, out, lg_stride); break;
      case 5: mla_logits_block<2, 2>(q, r, Dk, scale, out, lg_stride); break;
      case 4: mla_logits_block<2, 1>(q, r, Dk, scale, out, lg_stride); break;
      case 3: mla_logits_block<1, 2>(q, r, Dk, scale, out, lg_stride); break;
      default: mla_logits_block<1, 1>(q, r, Dk, scale, out, lg_stride); break;
    }
  }
}

inline void mla_values(float* acc, int64_t nh, int64_t Dv, int64_t n, const float* w, int64_t w_stride,
                       const float* rows, int64_t Dk) {
  switch (nh) {
    case 4: mla_values_block<4>(acc, Dv, n, w, w_stride, rows, Dk); break;
    case 3: mla_values_block<3>(acc, Dv, n, w, w_stride, rows, Dk); break;
    case 2: mla_values_block<2>(acc, Dv, n, w, w_stride, rows, Dk); break;
    default: mla_values_block<1>(acc, Dv, n, w, w_stride, rows, Dk); break;
  }
}

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
        // Four heads at a time (see mla_logits_block): their logits, each head's online-softmax
        // step, then their values (the row's first Dv columns), accumulated in registers.
        for (int64_t h0 = 0; h0 < H; h0 += 4) {
          const int64_t nh = std::min<int64_t>(4, H - h0);
          float* lg = logits.data() + h0 * kChunk;
          mla_logits(qf.data() + h0 * Dk, nh, rows.data(), n, Dk, scale, lg, kChunk);
          for (int64_t j = 0; j < nh; ++j)
            cpu::online_softmax_step(lg + j * kChunk, n, m[h0 + j], l[h0 + j], acc.data() + (h0 + j) * Dv, Dv);
          mla_values(acc.data() + h0 * Dv, nh, Dv, n, lg, kChunk, rows.data(), Dk);
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
