// The kernels of token_decoder_attention_cpu.cpp (see there), compiled once per instruction set through
// common/cpu_isa_kernels.h: no include guard and no #include here (cpu_isa.h says why).
namespace kvcore {
namespace {
namespace KVCORE_CPU_ISA_NS {

// One task per run of consecutive blocks; each block KV group by KV group. A group's K and V rows
// (fp32 read in place; others converted once into [P + blen, D] slabs) serve its query rows r =
// i * G + g (token i, head g of the group: keys P + i + 1), which go through the register blocks of
// cpu_attention.h, 4 rows at a time: cpu::logits_heads over the keys of the block's last row (a
// row's logits past its own keys are computed and never read), then the softmax of each row over
// its own keys, then cpu::pv_heads over the keys all 4 rows attend, each row finishing its own
// later keys alone. Every out element sums its keys in key order with the same roundings
// (cpu::mul_add in the scalar tail), whatever block its row falls in. (One dot product per (row,
// key) and a scalar P V ran at ~4% of the FMA peak: session 26.)
template <typename scalar_t>
void token_decoder_blocks(const TokenDecoderCpuParams& p, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                          const int32_t* block_lens, scalar_t* out, float* lse) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t L = p.rows, P = p.prefix, KJ = P + L, Hq = p.num_q_heads, Hkv = p.num_kv_heads, D = p.head_dim;
  const int64_t G = p.group;
  // Blocks per task: enough work per task to amortise the scheduling (~64K multiply-adds).
  const int64_t per_block = std::max<int64_t>(1, L * KJ * Hq * D);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / per_block);
  // A block's q and K (or V) slabs, and the share of each that one group's step prefetches.
  const int64_t q_len = L * Hq * D, kv_len = KJ * Hkv * D;
  const int64_t q_part = (q_len + Hkv - 1) / Hkv, kv_part = (kv_len + Hkv - 1) / Hkv;

  at::parallel_for(0, p.blocks, grain, [&](int64_t begin, int64_t end) {
    // One KV group's slabs, query rows, logits [L G, KJ], accumulators and normalisers.
    std::vector<float> kf(std::is_same_v<scalar_t, float> ? 0 : KJ * D), vf(kf.size());
    std::vector<float> qf(L * G * D), lg(L * G * KJ), acc(L * G * D), inv(L * G);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t blen = block_lens ? std::clamp<int64_t>(block_lens[n], 0, L) : L;
      scalar_t* out_n = out + n * L * Hq * D;  // out is contiguous
      float* lse_n = lse ? lse + n * L * Hq : nullptr;
      // Rows past the block's length: out 0, lse -inf.
      for (int64_t i = blen; i < L; ++i) {
        std::fill(out_n + i * Hq * D, out_n + (i + 1) * Hq * D, static_cast<scalar_t>(0.f));
        if (lse_n) std::fill(lse_n + i * Hq, lse_n + (i + 1) * Hq, kNegInf);
      }
      if (blen == 0) continue;
      const int64_t used = P + blen;  // only these K/V rows can be attended to
      const int64_t nrows = blen * G;
      const scalar_t* k_n = k + n * p.k_stride_n;
      const scalar_t* v_n = v + n * p.v_stride_n;
      const scalar_t* q_n = q + n * p.q_stride_n;
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        // The next block's q, K and V, one Hkv-th of each slab per group here, requested while
        // this block computes: a block's rows are read group by group (strided), and each group's
        // first touch stalled on DRAM (~70% of the time at bf16 under perf, session 26).
        if (n + 1 < end) {
          const int64_t q0 = std::min(q_len, hk * q_part), kv0 = std::min(kv_len, hk * kv_part);
          cpu::prefetch_row(q_n + p.q_stride_n + q0, std::min(q_part, q_len - q0));
          cpu::prefetch_row(k_n + p.k_stride_n + kv0, std::min(kv_part, kv_len - kv0));
          cpu::prefetch_row(v_n + p.v_stride_n + kv0, std::min(kv_part, kv_len - kv0));
        }
        // The group's K and V rows: fp32 read in place (row i at + i * Hkv * D), others converted
        // once into [used, D] slabs.
        const float* kr = kf.data();
        const float* vr = vf.data();
        int64_t kv_stride = D;
        if constexpr (std::is_same_v<scalar_t, float>) {
          kr = k_n + hk * D;
          vr = v_n + hk * D;
          kv_stride = Hkv * D;
        } else {
          for (int64_t j = 0; j < used; ++j) {
            cpu::to_float(k_n + (j * Hkv + hk) * D, kf.data() + j * D, D);
            cpu::to_float(v_n + (j * Hkv + hk) * D, vf.data() + j * D, D);
          }
        }
        // The group's G heads are adjacent in a token's [Hq, D] row.
        for (int64_t i = 0; i < blen; ++i) cpu::to_float(q_n + (i * Hq + hk * G) * D, qf.data() + i * G * D, G * D);
        for (int64_t r0 = 0; r0 < nrows; r0 += 4) {
          const int64_t nq = std::min<int64_t>(4, nrows - r0);
          const int64_t keys_last = P + (r0 + nq - 1) / G + 1;
          cpu::logits_heads(qf.data() + r0 * D, nq, kr, kv_stride, keys_last, D, p.scale, lg.data() + r0 * KJ, KJ);
        }
        for (int64_t r = 0; r < nrows; ++r) {
          const int64_t keys = P + r / G + 1;  // prefix slots, then tokens 0..i
          float* w = lg.data() + r * KJ;
          float mx = kNegInf;
          for (int64_t j = 0; j < keys; ++j) mx = std::max(mx, w[j]);
          // std::max skips NaN, so mx = -inf means every logit is -inf or NaN: a -inf weighs 0,
          // a NaN stays NaN (NaN in q or an attended K row poisons this row, never vanishes).
          if (mx == kNegInf) {
            for (int64_t j = 0; j < keys; ++j) w[j] = std::isnan(w[j]) ? w[j] : 0.f;
          } else {
            cpu::exp_diff(w, mx, w, keys);  // vectorised exp
          }
          float sum = 0.f;
          for (int64_t j = 0; j < keys; ++j) sum += w[j];
          // sum == 0: no finite logit (out 0, lse -inf). A NaN sum gives NaN out and NaN lse.
          inv[r] = sum == 0.f ? 0.f : 1.f / sum;
          if (lse_n) lse_n[(r / G) * Hq + hk * G + r % G] = sum == 0.f ? kNegInf : mx + std::log(sum);
        }
        std::fill(acc.begin(), acc.begin() + nrows * D, 0.f);
        for (int64_t r0 = 0; r0 < nrows; r0 += 4) {
          const int64_t nq = std::min<int64_t>(4, nrows - r0);
          const int64_t keys_first = P + r0 / G + 1;  // the keys every row of the block attends
          cpu::pv_heads(acc.data() + r0 * D, nq, D, keys_first, lg.data() + r0 * KJ, KJ, vr, kv_stride);
          for (int64_t r = r0 + 1; r < r0 + nq; ++r) {
            const int64_t keys = P + r / G + 1;
            if (keys > keys_first)
              cpu::pv_heads(acc.data() + r * D, 1, D, keys - keys_first, lg.data() + r * KJ + keys_first, KJ,
                            vr + keys_first * kv_stride, kv_stride);
          }
        }
        for (int64_t r = 0; r < nrows; ++r) {
          scalar_t* o = out_n + ((r / G) * Hq + hk * G + r % G) * D;
          const float* a = acc.data() + r * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(a[d] * inv[r]);
        }
      }
    }
  });
}

}  // namespace KVCORE_CPU_ISA_NS
}  // namespace
}  // namespace kvcore
