// KVCORE_CPU_ISA (see cpu_isa.h) and the op kvcore::cpu_isa that reports the choice to Python.
#include "common/cpu_isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

#include "common/env_switch.h"

namespace kvcore {
namespace {

constexpr const char* kVariable = "KVCORE_CPU_ISA";

// Whether this CPU and its OS can run the AVX2 copy (AVX2, FMA, and F16C for its fp16 rows: every
// AVX2 CPU has F16C, which came earlier). libgcc's __builtin_cpu_supports reports AVX features
// only when the OS has enabled the YMM state (XGETBV), so no separate check.
bool avx2_supported() {
#if KVCORE_CPU_AVX2_PATH
  __builtin_cpu_init();  // only needed before constructors run, harmless after
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

CpuIsa pick_cpu_isa() {
  const int choice = env_choice(kVariable, {"auto", "baseline", "avx2"}, "kvcore CPU kernels");
  if (choice == 1) return CpuIsa::kBaseline;
  const bool avx2 = avx2_supported();
  if (choice == 2) {
    TORCH_CHECK(KVCORE_CPU_AVX2_PATH, "kvcore CPU kernels: ", kVariable,
                "=avx2, but this build has no AVX2 copy of the kernels (it needs GCC on x86-64); use 'auto' or "
                "'baseline'");
    TORCH_CHECK(avx2, "kvcore CPU kernels: ", kVariable,
                "=avx2, but this CPU (or its OS) does not support AVX2, FMA and F16C; use 'auto' or 'baseline'");
  }
  return avx2 ? CpuIsa::kAvx2 : CpuIsa::kBaseline;
}

std::string cpu_isa_op() { return cpu_isa_name(cpu_isa()); }

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = pick_cpu_isa();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) { return isa == CpuIsa::kAvx2 ? "avx2" : "baseline"; }

}  // namespace kvcore

// No tensor argument, so no backend key: the one kernel serves every dispatch.
TORCH_LIBRARY_IMPL(kvcore, CompositeImplicitAutograd, m) { m.impl("cpu_isa", &kvcore::cpu_isa_op); }
