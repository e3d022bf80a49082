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

#if defined(KVCORE_CPU_AMX_FN)
// bf16 mla_decode on AMX tiles (cpu_isa() kAmx). vdpbf16ps reached ~140 GFLOP/s on two cores of
// an AMX Xeon, a third of torch's bf16 matmul there (oneDNN on the tiles; session 33), and MLA
// decode at H >= 16 is compute-bound on a CPU (B1 H128: 1,088 multiply-adds per head
// per latent row). Both products run as tdpbf16ps on 16 x 16 fp32 blocks:
//   logits S [heads x keys] = Q [heads x Dk] K^T, A = 16 heads x 32 columns of Q (a zero-padded
//     bf16 copy), B = the keys' 32 columns as 16 column pairs x 16 keys (a 16 x 16 dword
//     transpose of the latent rows: transpose_16x16);
//   values O [heads x Dv] += P [heads x keys] V, A = 16 heads x 32 keys of P (bf16, rounded as the
//     AVX512_BF16 path rounds them), B = 16 key pairs x 16 columns (bf16dot::interleave_pairs).
// The online softmax takes steps of kKeys keys, so each step's rescale of the fp32 accumulator
// (which lives in memory: 16 x Dv x 4 bytes per 16 heads, far past the 8 tile registers) is
// spread over many keys. Tiles 0-3 accumulate a 2 x 2 block, 4-5 hold A, 6-7 B.
namespace mla_amx {

constexpr int64_t kKeys = 256;  // keys per online-softmax step, a multiple of 32 (one K step)

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows of 64 bytes (palette 1); the configuration is per thread.
KVCORE_CPU_AMX_FN inline void configure_tiles() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  // GCC 12 does not count ldtilecfg as a read of cfg and drops the stores above (the tiles were
  // then left unconfigured: SIGILL at the first tilezero); the empty asm makes them happen.
  __asm__ __volatile__("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

KVCORE_CPU_AMX_FN inline void release_tiles() { _tile_release(); }

// dst (16 rows of 16 dwords) = the transpose of the 16 x 16 dwords whose row i starts at src[i]:
// 32-bit then 64-bit interleaves of row pairs inside each 128-bit lane, then the 4 x 4 transpose
// of the lanes (64 shuffles, no gathers).
KVCORE_CPU_AMX_FN inline void transpose_16x16(const uint32_t* const* src, uint32_t* dst) {
  // (The maskz forms with every lane kept: GCC 12's plain ones read an undefined source vector
  // and trip -Wuninitialized.)
  constexpr __mmask16 all16 = 0xFFFF;
  constexpr __mmask8 all8 = 0xFF;
  __m512i r[16], a[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src[i]);
  for (int g = 0; g < 4; ++g) {  // a[4g + c], lane L: column 4L + c of rows 4g .. 4g + 3
    const __m512i a0 = _mm512_maskz_unpacklo_epi32(all16, r[4 * g], r[4 * g + 1]);
    const __m512i a1 = _mm512_maskz_unpackhi_epi32(all16, r[4 * g], r[4 * g + 1]);
    const __m512i a2 = _mm512_maskz_unpacklo_epi32(all16, r[4 * g + 2], r[4 * g + 3]);
    const __m512i a3 = _mm512_maskz_unpackhi_epi32(all16, r[4 * g + 2], r[4 * g + 3]);
    a[4 * g + 0] = _mm512_maskz_unpacklo_epi64(all8, a0, a2);
    a[4 * g + 1] = _mm512_maskz_unpackhi_epi64(all8, a0, a2);
    a[4 * g + 2] = _mm512_maskz_unpacklo_epi64(all8, a1, a3);
    a[4 * g + 3] = _mm512_maskz_unpackhi_epi64(all8, a1, a3);
  }
  for (int c = 0; c < 4; ++c) {  // output row 4L + c: lane L of a[c], a[4 + c], a[8 + c], a[12 + c]
    const __m512i s0 = _mm512_maskz_shuffle_i32x4(all16, a[c], a[4 + c], 0x44);
    const __m512i s1 = _mm512_maskz_shuffle_i32x4(all16, a[c], a[4 + c], 0xEE);
    const __m512i s2 = _mm512_maskz_shuffle_i32x4(all16, a[8 + c], a[12 + c], 0x44);
    const __m512i s3 = _mm512_maskz_shuffle_i32x4(all16, a[8 + c], a[12 + c], 0xEE);
    _mm512_storeu_si512(dst + (0 + c) * 16, _mm512_maskz_shuffle_i32x4(all16, s0, s2, 0x88));
    _mm512_storeu_si512(dst + (4 + c) * 16, _mm512_maskz_shuffle_i32x4(all16, s0, s2, 0xDD));
    _mm512_storeu_si512(dst + (8 + c) * 16, _mm512_maskz_shuffle_i32x4(all16, s1, s3, 0x88));
    _mm512_storeu_si512(dst + (12 + c) * 16, _mm512_maskz_shuffle_i32x4(all16, s1, s3, 0xDD));
  }
}

// A thread's buffers for H heads (Hp = H rounded up to 16), Dk / Dv columns (multiples of 32).
struct Scratch {
  int64_t Hp = 0, Dk = 0, Dv = 0;
  std::vector<uint16_t> q;    // [Hp][Dk] bf16, heads past H zero
  std::vector<uint32_t> kt;   // [kKeys / 16][Dk / 32][16 column pairs][16 keys]
  std::vector<uint32_t> vp;   // [kKeys / 2][Dv]: key pairs' values (bf16dot::interleave_pairs)
  std::vector<float> lg;      // [Hp][kKeys] logits, then weights
  std::vector<uint16_t> p;    // [Hp][kKeys] bf16 weights, heads past H zero
  std::vector<float> acc;     // [Hp][Dv]
  std::vector<uint16_t> zero; // [Dk]: the row the keys past the step's end read
  int64_t H = -1;
  // Sized for H heads; the rows past H of q and p are zero (nothing writes them).
  void resize(int64_t heads, int64_t dk, int64_t dv) {
    if (heads == H && dk == Dk && dv == Dv) return;
    H = heads, Hp = (heads + 15) / 16 * 16, Dk = dk, Dv = dv;
    q.assign(Hp * Dk, 0);
    kt.assign(kKeys * Dk / 2, 0);
    vp.assign(kKeys / 2 * Dv, 0);
    lg.assign(Hp * kKeys, 0.0f);
    p.assign(Hp * kKeys, 0);
    acc.assign(Hp * Dv, 0.0f);
    zero.assign(Dk, 0);
  }
};

// The calling thread's scratch, kept between calls (at H128 ~1.2 MB: allocated and zeroed afresh
// per call it cost more than the tiles' work at S 256, in page faults alone).
inline Scratch& thread_scratch(int64_t H, int64_t Dk, int64_t Dv) {
  static thread_local Scratch w;
  w.resize(H, Dk, Dv);
  return w;
}

// Tiles 0-3 hold a 2 x 2 block of fp32 accumulators: rows of a head block (tiles 0, 1) and of the
// next one (tiles 2, 3; only when `two`, else the lone last head block), columns c and c + 16.
// c: the block's first element, ld: its row stride in floats.
KVCORE_CPU_AMX_FN inline void zero_block() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

KVCORE_CPU_AMX_FN inline void load_block(const float* c, int64_t ld, bool two) {
  _tile_loadd(0, c, ld * 4);
  _tile_loadd(1, c + 16, ld * 4);
  if (two) {
    _tile_loadd(2, c + 16 * ld, ld * 4);
    _tile_loadd(3, c + 16 * ld + 16, ld * 4);
  }
}

KVCORE_CPU_AMX_FN inline void store_block(float* c, int64_t ld, bool two) {
  _tile_stored(0, c, ld * 4);
  _tile_stored(1, c + 16, ld * 4);
  if (two) {
    _tile_stored(2, c + 16 * ld, ld * 4);
    _tile_stored(3, c + 16 * ld + 16, ld * 4);
  }
}

// One k step of the block: A (bf16, 16 rows of 32 at a, row stride lda bytes; the next head
// block's 16 rows right after them) times the two B tiles b0 and b1 (row stride ldb bytes).
KVCORE_CPU_AMX_FN inline void dp_block(const uint16_t* a, int64_t lda, const void* b0, const void* b1, int64_t ldb,
                                       bool two) {
  _tile_loadd(4, a, lda);
  _tile_loadd(6, b0, ldb);
  _tile_loadd(7, b1, ldb);
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  if (two) {
    _tile_loadd(5, a + 16 * (lda / 2), lda);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// One step over n <= kKeys keys (row i at rows[i] for i < np = n rounded up to 32, the rows past
// n pointing at w.zero) for the H heads of w.q: logits, online softmax (m, l and the first H rows
// of w.acc), P V. first: the task's first step, whose accumulator starts at zero (w.acc is then
// neither read nor rescaled, only written).
KVCORE_CPU_AMX_FN void step(Scratch& w, int64_t H, const uint16_t* const* rows, int64_t n, int64_t np, float scale,
                            float* m, float* l, bool first) {
  const int64_t Dk = w.Dk, Dv = w.Dv, KS = Dk / 32, HB = w.Hp / 16, NB = np / 16, DB = Dv / 16;
  // K^T blocks: 16 keys x 16 column pairs each.
  for (int64_t kb = 0; kb < NB; ++kb)
    for (int64_t ks = 0; ks < KS; ++ks) {
      const uint32_t* src[16];
      for (int j = 0; j < 16; ++j) src[j] = reinterpret_cast<const uint32_t*>(rows[kb * 16 + j]) + ks * 16;
      transpose_16x16(src, w.kt.data() + (kb * KS + ks) * 256);
    }
  cpu::bf16dot::interleave_pairs(rows, np, Dv, w.vp.data());

  // Logits, 2 head blocks x 2 key blocks a time; a lone last head block takes tiles 0-1 only.
  const uint16_t* q = w.q.data();
  float* lg = w.lg.data();
  for (int64_t hb = 0; hb < HB; hb += 2) {
    const bool two = hb + 1 < HB;
    for (int64_t kb = 0; kb < NB; kb += 2) {
      zero_block();
      for (int64_t ks = 0; ks < KS; ++ks)
        dp_block(q + hb * 16 * Dk + ks * 32, Dk * 2, w.kt.data() + (kb * KS + ks) * 256,
                 w.kt.data() + ((kb + 1) * KS + ks) * 256, 64, two);
      store_block(lg + hb * 16 * kKeys + kb * 16, kKeys, two);
    }
  }

  // Each head's online-softmax step (rescaling its accumulator row), its weights to bf16.
  for (int64_t h = 0; h < H; ++h) {
    float* x = lg + h * kKeys;
    for (int64_t i = 0; i < n; ++i) x[i] *= scale;
    cpu::online_softmax_step(x, n, m[h], l[h], w.acc.data() + h * Dv, first ? 0 : Dv);
    for (int64_t i = n; i < np; ++i) x[i] = 0.0f;
    for (int64_t i = 0; i < np; i += 32) {
      const __m512bh wb = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
      __builtin_memcpy(w.p.data() + h * kKeys + i, &wb, sizeof wb);
    }
  }

  // P V into the accumulator, 2 head blocks x 2 column blocks a time.
  const uint16_t* pw = w.p.data();
  float* acc = w.acc.data();
  for (int64_t hb = 0; hb < HB; hb += 2) {
    const bool two = hb + 1 < HB;
    for (int64_t db = 0; db < DB; db += 2) {
      float* c = acc + hb * 16 * Dv + db * 16;
      if (first)
        zero_block();
      else
        load_block(c, Dv, two);
      for (int64_t ks = 0; ks < np / 32; ++ks) {
        const uint32_t* v = w.vp.data() + ks * 16 * Dv + db * 16;
        dp_block(pw + hb * 16 * kKeys + ks * 32, kKeys * 2, v, v + 16, Dv * 4, two);
      }
      store_block(c, Dv, two);
    }
  }
}

}  // namespace mla_amx
#endif

template <typename scalar_t>
void mla_decode_tasks(const MlaDecodeShape& s, const scalar_t* q, int64_t q_stride_b, int64_t q_stride_h,
                      const scalar_t* cache, int64_t page_stride, const int32_t* block_table, const int32_t* seq_lens,
                      float scale, int64_t num_splits, bool bf16_dot, bool amx, scalar_t* out, float* lse) {
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
  const cpu::TaskParts task_parts(s.batch * parts, H, Dv);
  float* const part_out = task_parts.out.get();
  float* const part_lse = task_parts.lse.get();
  // Task t: part t % parts of sequence t / parts, the keys [start, stop) of it.
  struct TaskRange {
    int64_t b, start, stop;
  };
  const auto task_range = [&](int64_t task) {
    const int64_t b = task / parts, span = (len[b] + parts - 1) / parts, start = task % parts * span;
    return TaskRange{b, start, std::min(len[b], start + span)};
  };
  // The tasks' parts merged per (sequence, head), in part order.
  const auto merge_parts_of_tasks = [&] {
    at::parallel_for(0, s.batch * H, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> scratch(Dv);
      cpu::merge_task_parts(begin, end, H, Dv, parts, part_out, part_lse, out, lse, scratch.data());
    });
  };
  // Sequence b's latent row at position pos (its page index clamped into the cache).
  const auto latent_row = [&](int64_t b, int64_t pos) {
    const int64_t page = std::clamp<int64_t>(block_table[b * s.max_pages + pos / s.page_size], 0, s.num_pages - 1);
    return cache + page * page_stride + (pos % s.page_size) * Dk;
  };

#if defined(KVCORE_CPU_AMX_FN)
  // AMX tiles (see mla_amx): bf16 rows whose widths split into 32-column steps.
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (amx && Dk % 32 == 0 && Dv % 32 == 0) {
      at::parallel_for(0, s.batch * parts, 1, [&](int64_t begin, int64_t end) {
        mla_amx::Scratch& w = mla_amx::thread_scratch(H, Dk, Dv);
        std::vector<float> m(H), l(H);
        const uint16_t* row_ptrs[mla_amx::kKeys];
        int64_t q_b = -1;
        mla_amx::configure_tiles();
        for (int64_t task = begin; task < end; ++task) {
          const auto [b, start, stop] = task_range(task);
          if (q_b != b) {  // the sequence's heads as rows of Dk (w.q's rows past H stay zero)
            for (int64_t h = 0; h < H; ++h)
              std::copy_n(reinterpret_cast<const uint16_t*>(q + b * q_stride_b + h * q_stride_h), Dk,
                          w.q.data() + h * Dk);
            q_b = b;
          }
          std::fill(m.begin(), m.end(), kNegInf);
          std::fill(l.begin(), l.end(), 0.0f);
          if (start >= stop)  // an empty part: no step writes the accumulator
            std::fill(w.acc.begin(), w.acc.begin() + H * Dv, 0.0f);
          for (int64_t c0 = start; c0 < stop; c0 += mla_amx::kKeys) {
            const int64_t n = std::min<int64_t>(mla_amx::kKeys, stop - c0), np = (n + 31) / 32 * 32;
            for (int64_t i = 0; i < np; ++i)
              row_ptrs[i] = i < n ? reinterpret_cast<const uint16_t*>(latent_row(b, c0 + i)) : w.zero.data();
            mla_amx::step(w, H, row_ptrs, n, np, scale, m.data(), l.data(), c0 == start);
          }
          float* po = part_out + task * H * Dv;
          float* pl = part_lse + task * H;
          for (int64_t h = 0; h < H; ++h)
            cpu::finish_part(w.acc.data() + h * Dv, m[h], l[h], Dv, po + h * Dv, pl + h);
        }
        mla_amx::release_tiles();
      });
      merge_parts_of_tasks();
      return;
    }
  }
#else
  (void)amx;
#endif
  at::parallel_for(0, s.batch * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * Dk), acc(H * Dv), rows(kChunk * Dk), logits(H * kChunk), m(H), l(H);
    const bool pairwise = bf16_dot && cpu::has_bf16_dot<scalar_t>();
    std::vector<uint32_t> pairs(pairwise ? (kChunk + 1) / 2 * Dv : 0);  // mla_bf16::chunk's row pairs
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, start, stop] = task_range(task);
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
          for (int64_t i = 0; i < n; ++i) row_ptrs[i] = reinterpret_cast<const uint16_t*>(latent_row(b, c0 + i));
          mla_bf16::chunk(reinterpret_cast<const uint16_t*>(q + b * q_stride_b), q_stride_h, H, row_ptrs, n, Dk, Dv,
                          scale, logits.data(), m.data(), l.data(), acc.data(), pairs.data());
          continue;
        }
#endif
        // The chunk's latent rows in fp32 (each read once; they serve as keys and as values): an
        // fp32 cache's rows in place, other types converted into `rows`.
        const float* row_at[kChunk];
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* src = latent_row(b, c0 + i);
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

      float* po = part_out + task * H * Dv;
      float* pl = part_lse + task * H;
      for (int64_t h = 0; h < H; ++h) cpu::finish_part(acc.data() + h * Dv, m[h], l[h], Dv, po + h * Dv, pl + h);
    }
  });

  merge_parts_of_tasks();
}

}  // namespace KVCORE_CPU_ISA_NS
}  // namespace
}  // namespace kvcore
