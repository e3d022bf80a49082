// Rows to fp32 for the CPU kernels outside the per-ISA scheme (mla_latent_project, retrieval:
// plain files compiled once for the build's baseline, see common/cpu_isa.h): fp16 through
// cpu_half_bits.h's vector conversion at the baseline's 16-byte width (c10::Half's compiled to a
// scalar routine: mla_latent_project fp16 took 8x bf16's time at one token, session 24's review),
// anything else through static_cast (bf16's shift vectorises as it is). Everything here is in an
// anonymous namespace: each file gets its own copy, all at the baseline.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#define KVCORE_CPU_ISA_NS plain_rows
#define KVCORE_CPU_VEC_BYTES 16
#include "common/cpu_half_bits.h"
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS

namespace kvcore {
namespace {

// dst[i] = float(src[i]) for i < n.
template <typename T>
inline void rows_to_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    plain_rows::cpu::fp16_bits_to_float(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

}  // namespace
}  // namespace kvcore
