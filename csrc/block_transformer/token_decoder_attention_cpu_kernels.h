// The kernels of token_decoder_attention_cpu.cpp (see there), compiled once per instruction set through
// common/cpu_isa_kernels.h: no include guard and no #include here (cpu_isa.h says why).
namespace kvcore {
namespace {
namespace KVCORE_CPU_ISA_NS {

template <typename scalar_t>
void token_decoder_blocks(const TokenDecoderCpuParams& p, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                          const int32_t* block_lens, scalar_t* out, float* lse) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t L = p.rows, P = p.prefix, KJ = P + L, Hq = p.num_q_heads, Hkv = p.num_kv_heads, D = p.head_dim;
  const int64_t G = p.group;
  const int64_t slab = KJ * Hkv * D;  // elements of one block's K (or V)
  // Blocks per task: enough work per task to amortise the scheduling (~64K multiply-adds).
  const int64_t per_block = std::max<int64_t>(1, L * KJ * Hq * D);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / per_block);

  at::parallel_for(0, p.blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> kf(slab), vf(slab), qf(D), logits(KJ), acc(D);
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
      // Only the first P + blen rows of K/V can be attended to.
      const int64_t used = (P + blen) * Hkv * D;
      const scalar_t* k_n = k + n * p.k_stride_n;
      const scalar_t* v_n = v + n * p.v_stride_n;
      cpu::to_float(k_n, kf.data(), used);
      cpu::to_float(v_n, vf.data(), used);

      for (int64_t i = 0; i < blen; ++i) {
        const int64_t keys = P + i + 1;  // prefix slots, then tokens 0..i
        for (int64_t h = 0; h < Hq; ++h) {
          const scalar_t* q_row = q + n * p.q_stride_n + (i * Hq + h) * D;
          cpu::to_float(q_row, qf.data(), D);
          const int64_t hk = h / G;
          float mx = kNegInf;
          for (int64_t j = 0; j < keys; ++j) {
            logits[j] = cpu::dot_product(qf.data(), kf.data() + (j * Hkv + hk) * D, D) * p.scale;
            mx = std::max(mx, logits[j]);
          }
          // std::max skips NaN, so mx = -inf means every logit is -inf or NaN: a -inf weighs 0,
          // a NaN stays NaN (NaN in q or an attended K row poisons this row, never vanishes).
          if (mx == kNegInf) {
            for (int64_t j = 0; j < keys; ++j) logits[j] = std::isnan(logits[j]) ? logits[j] : 0.f;
          } else {
            cpu::exp_diff(logits.data(), mx, logits.data(), keys);  // vectorised exp
          }
          float sum = 0.f;
          for (int64_t j = 0; j < keys; ++j) sum += logits[j];
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t j = 0; j < keys; ++j) {
            const float w = logits[j];
            const float* vr = vf.data() + (j * Hkv + hk) * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += w * vr[d];
          }
          // sum == 0: no finite logit (out 0, lse -inf). A NaN sum gives NaN out and NaN lse.
          const float inv = sum == 0.f ? 0.f : 1.f / sum;
          scalar_t* o = out_n + (i * Hq + h) * D;
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d] * inv);
          if (lse_n) lse_n[i * Hq + h] = sum == 0.f ? kNegInf : mx + std::log(sum);
        }
      }
    }
  });
}

}  // namespace KVCORE_CPU_ISA_NS
}  // namespace
}  // namespace kvcore
