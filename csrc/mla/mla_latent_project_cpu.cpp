// CPU kernel of kvcore::mla_latent_project: hidden @ w_dkv, RMSNorm of the c_KV part, RoPE of
// the k_pe part, written into the paged latent cache (and optionally returned).
//
// Two phases. (1) The projection, in fp32, as tasks of (block of kTokBlock tokens, block of
// kColBlock latent columns): a task walks the d_model rows of w_dkv once and uses each row
// slice for all tokens of its block, so the weight is read ceil(T / kTokBlock) times instead of
// T times, and the column split gives every thread work when T is 1 (decode). (2) Per token:
// mean square of the c_KV columns, normalise, rotate the rope columns, then store to the cache
// slot and the optional outputs. The fp32 row is kept between the phases in a [T, R + P]
// scratch buffer (the op is not graph-captured on the CPU, so a host allocation is fine here).
//
// The projection (phase 1, the op's time) is in mla/mla_latent_project_cpu_kernels.h, compiled
// once per instruction set (baseline, AVX2, AVX-512: common/cpu_isa.h; the AVX2 and AVX-512
// copies convert fp16 weight rows with F16C); the op runs the copy KVCORE_CPU_ISA picked.
//
// Safety without validation: a slot outside [0, num_pages * page_size) is skipped (never
// written) and a position is clamped to [0, max_pos), so bad index contents give wrong numbers,
// never an out-of-bounds access.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace kvcore {
namespace {

constexpr int64_t kTokBlock = 4;   // tokens sharing one pass over the weight
constexpr int64_t kColBlock = 64;  // latent columns per task (576 = 9 blocks)

}  // namespace
}  // namespace kvcore

#define KVCORE_CPU_KERNELS "mla/mla_latent_project_cpu_kernels.h"
#include "common/cpu_isa_kernels.h"
#undef KVCORE_CPU_KERNELS

namespace kvcore {
namespace {

template <typename scalar_t>
void finish_tokens(const MlaProjectShape& s, float* kv, const scalar_t* norm_weight, float eps, const float* cos_sin,
                   const int64_t* positions, scalar_t* cache, int64_t page_stride, const int64_t* slots,
                   bool interleaved, scalar_t* c_kv_out, scalar_t* k_pe_out) {
  const int64_t width = s.rank + s.rope_dim, half = s.rope_dim / 2;
  const int64_t num_slots = s.num_pages * s.page_size;
  at::parallel_for(0, s.tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> rot(s.rope_dim);
    for (int64_t t = begin; t < end; ++t) {
      float* row = kv + t * width;
      // RMSNorm in double for the sum: 512 fp32 squares summed in order lose ~1e-5 relative.
      double ss = 0.0;
      for (int64_t c = 0; c < s.rank; ++c) ss += static_cast<double>(row[c]) * row[c];
      const float inv_rms = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(s.rank) + eps));
      for (int64_t c = 0; c < s.rank; ++c) row[c] = row[c] * inv_rms * static_cast<float>(norm_weight[c]);

      const int64_t pos = std::clamp<int64_t>(positions[t], 0, s.max_pos - 1);
      const float* cs = cos_sin + pos * s.rope_dim;  // [cos_0 .. cos_{P/2-1}, sin_0 .. sin_{P/2-1}]
      const float* x = row + s.rank;
      for (int64_t i = 0; i < half; ++i) {
        const float c = cs[i], sn = cs[half + i];
        // interleaved: pair (2i, 2i+1) (DeepSeek); NeoX: pair (i, i + P/2).
        const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        rot[a] = x[a] * c - x[b] * sn;
        rot[b] = x[b] * c + x[a] * sn;
      }
      std::copy(rot.begin(), rot.end(), row + s.rank);

      const int64_t slot = slots[t];
      if (slot >= 0 && slot < num_slots) {
        scalar_t* dst = cache + (slot / s.page_size) * page_stride + (slot % s.page_size) * width;
        for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<scalar_t>(row[c]);
      }
      if (c_kv_out != nullptr)
        for (int64_t c = 0; c < s.rank; ++c) c_kv_out[t * s.rank + c] = static_cast<scalar_t>(row[c]);
      if (k_pe_out != nullptr)
        for (int64_t c = 0; c < s.rope_dim; ++c) k_pe_out[t * s.rope_dim + c] = static_cast<scalar_t>(row[s.rank + c]);
    }
  });
}

void mla_latent_project_cpu(const at::Tensor& hidden, const at::Tensor& w_dkv, const at::Tensor& norm_weight,
                            double eps, const at::Tensor& cos_sin, const at::Tensor& positions,
                            at::Tensor& latent_cache, const at::Tensor& slot_mapping, bool interleaved_rope,
                            const c10::optional<at::Tensor>& c_kv_out, const c10::optional<at::Tensor>& k_pe_out) {
  const MlaProjectShape s = check_mla_latent_project(hidden, w_dkv, norm_weight, eps, cos_sin, positions,
                                                     latent_cache, slot_mapping, c_kv_out, k_pe_out);
  if (s.tokens == 0) return;
  std::vector<float> kv(s.tokens * (s.rank + s.rope_dim));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "mla_latent_project_cpu", [&] {
    const auto project = KVCORE_CPU_PICK(project_tasks<scalar_t>);
    project(s, hidden.const_data_ptr<scalar_t>(), hidden.stride(0), w_dkv.const_data_ptr<scalar_t>(), kv.data());
    finish_tokens<scalar_t>(s, kv.data(), norm_weight.const_data_ptr<scalar_t>(), static_cast<float>(eps),
                            cos_sin.const_data_ptr<float>(), positions.const_data_ptr<int64_t>(),
                            latent_cache.mutable_data_ptr<scalar_t>(), latent_cache.stride(0),
                            slot_mapping.const_data_ptr<int64_t>(), interleaved_rope,
                            c_kv_out.has_value() ? c_kv_out->mutable_data_ptr<scalar_t>() : nullptr,
                            k_pe_out.has_value() ? k_pe_out->mutable_data_ptr<scalar_t>() : nullptr);
  });
}

}  // namespace
}  // namespace kvcore

TORCH_LIBRARY_IMPL(kvcore, CPU, m) { m.impl("mla_latent_project", &kvcore::mla_latent_project_cpu); }
