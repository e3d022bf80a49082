// infllm_unit_scores' kernel (retrieval_cpu.cpp, see there), compiled once per instruction set
// through common/cpu_isa_kernels.h: no include guard and no #include here (cpu_isa.h says why).
namespace kvcore {
namespace {
namespace KVCORE_CPU_ISA_NS {

template <typename scalar_t, typename q_t>
void unit_scores_rows(const q_t* q, int64_t q_sb, int64_t q_sh, const scalar_t* keys, int64_t k_sb,
                      const UnitScoresShape& s, float* out) {
  const int64_t hkv = s.num_kv_heads, d = s.head_dim, g = s.group, units = s.units;
  at::parallel_for(0, s.batch, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qg(size_t(hkv * d)), rowf(size_t(hkv * d));
    for (int64_t b = b0; b < b1; ++b) {
      // The group's query heads share the key, so their sum is dotted once (as the CUDA kernel).
      for (int64_t h = 0; h < hkv; ++h)
        for (int64_t x = 0; x < d; ++x) {
          float acc = 0.0f;
          for (int64_t j = 0; j < g; ++j) acc += static_cast<float>(q[b * q_sb + (h * g + j) * q_sh + x]);
          qg[size_t(h * d + x)] = acc;
        }
      for (int64_t u = 0; u < units; ++u) {
        // The unit's key row in fp32 first (one vector conversion, cpu::to_float), then the dots.
        cpu::to_float(keys + b * k_sb + u * hkv * d, rowf.data(), hkv * d);
        float total = 0.0f;
        for (int64_t h = 0; h < hkv; ++h) {
          float acc = 0.0f;
          for (int64_t x = 0; x < d; ++x) acc += qg[size_t(h * d + x)] * rowf[size_t(h * d + x)];
          if (s.per_kv_head)
            out[(b * hkv + h) * units + u] = acc;
          else
            total += acc;
        }
        if (!s.per_kv_head) out[b * units + u] = total;
      }
    }
  });
}

}  // namespace KVCORE_CPU_ISA_NS
}  // namespace
}  // namespace kvcore
