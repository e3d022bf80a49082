// The projection of mla_latent_project_cpu.cpp (see there), compiled once per instruction set
// through common/cpu_isa_kernels.h: no include guard and no #include here (cpu_isa.h says why).
namespace kvcore {
namespace {
namespace KVCORE_CPU_ISA_NS {

template <typename scalar_t>
void project_tasks(const MlaProjectShape& s, const scalar_t* hidden, int64_t hidden_stride, const scalar_t* w,
                   float* kv) {
  const int64_t width = s.rank + s.rope_dim;
  const int64_t tok_blocks = (s.tokens + kTokBlock - 1) / kTokBlock;
  const int64_t col_blocks = (width + kColBlock - 1) / kColBlock;
  at::parallel_for(0, tok_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    float acc[kTokBlock][kColBlock];
    float wf[kColBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t0 = (task / col_blocks) * kTokBlock, c0 = (task % col_blocks) * kColBlock;
      const int64_t nt = std::min(kTokBlock, s.tokens - t0), nc = std::min(kColBlock, width - c0);
      for (int64_t i = 0; i < kTokBlock; ++i)
        for (int64_t c = 0; c < kColBlock; ++c) acc[i][c] = 0.0f;
      for (int64_t k = 0; k < s.d_model; ++k) {
        // Convert the weight slice once, then one contiguous (vectorisable) update per token.
        const scalar_t* wr = w + k * width + c0;
        cpu::to_float(wr, wf, nc);
        for (int64_t i = 0; i < nt; ++i) {
          const float hv = static_cast<float>(hidden[(t0 + i) * hidden_stride + k]);
          for (int64_t c = 0; c < nc; ++c) acc[i][c] += hv * wf[c];
        }
      }
      for (int64_t i = 0; i < nt; ++i)
        for (int64_t c = 0; c < nc; ++c) kv[(t0 + i) * width + c0 + c] = acc[i][c];
    }
  });
}

}  // namespace KVCORE_CPU_ISA_NS
}  // namespace
}  // namespace kvcore
