// KVCORE_CPU_ISA (see cpu_isa.h) and the op kvcore::cpu_isa that reports the choice to Python.
#include "common/cpu_isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

#if KVCORE_CPU_X86_COPIES
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#include "common/env_switch.h"

namespace kvcore {
namespace {

constexpr const char* kVariable = "KVCORE_CPU_ISA";

// Whether this CPU and its OS can run the AVX2 copy (AVX2, FMA, and F16C for its fp16 rows: every
// AVX2 CPU has F16C, which came earlier), the AVX-512 copy (those plus AVX-512 F, BW, DQ, VL) and
// that copy's bf16 dot products (AVX512_BF16 too).
// libgcc's __builtin_cpu_supports reports AVX and AVX-512 features only when the OS has enabled
// their register state (XGETBV), so no separate check.
bool avx2_supported() {
#if KVCORE_CPU_X86_COPIES
  __builtin_cpu_init();  // only needed before constructors run, harmless after
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool avx512_supported() {
#if KVCORE_CPU_X86_COPIES
  __builtin_cpu_init();
  return avx2_supported() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool avx512_bf16_supported() {
#if KVCORE_CPU_X86_COPIES
  __builtin_cpu_init();
  return avx512_supported() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22), and the OS's leave for this process
// to use the tile data registers: Linux (from 5.16) keeps them off until a process asks
// (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, feature 18), and a tile instruction without it
// faults. Asked at most once; granted for the whole process, so every thread may use the tiles.
bool amx_supported() {
#if KVCORE_CPU_AMX && defined(__linux__) && defined(SYS_arch_prctl)
  static const bool granted = [] {
    if (!avx512_bf16_supported()) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!((edx >> 24) & 1u) || !((edx >> 22) & 1u)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

CpuIsa pick_cpu_isa() {
  const int choice =
      env_choice(kVariable, {"auto", "baseline", "avx2", "avx512", "avx512bf16", "amx"}, "kvcore CPU kernels");
  if (choice == 1) return CpuIsa::kBaseline;
  if (choice >= 2) {
    const char* name = choice == 2 ? "avx2" : choice == 3 ? "avx512" : choice == 4 ? "avx512bf16" : "amx";
    TORCH_CHECK(KVCORE_CPU_X86_COPIES, "kvcore CPU kernels: ", kVariable, "=", name,
                ", but this build has no copy of the kernels for it (that needs GCC on x86-64); use 'auto' or "
                "'baseline'");
    if (choice == 2) {
      TORCH_CHECK(avx2_supported(), "kvcore CPU kernels: ", kVariable,
                  "=avx2, but this CPU (or its OS) does not support AVX2, FMA and F16C; use 'auto' or 'baseline'");
      return CpuIsa::kAvx2;
    }
    if (choice == 3) {
      TORCH_CHECK(avx512_supported(), "kvcore CPU kernels: ", kVariable,
                  "=avx512, but this CPU (or its OS) does not support AVX-512 F, BW, DQ and VL with AVX2, FMA and "
                  "F16C; use 'auto', 'avx2' or 'baseline'");
      return CpuIsa::kAvx512;
    }
    if (choice == 4) {
      TORCH_CHECK(avx512_bf16_supported(), "kvcore CPU kernels: ", kVariable,
                  "=avx512bf16, but this CPU (or its OS) does not support AVX512_BF16 with AVX-512 F, BW, DQ and "
                  "VL, AVX2, FMA and F16C; use 'auto', 'avx512', 'avx2' or 'baseline'");
      return CpuIsa::kAvx512Bf16;
    }
    TORCH_CHECK(amx_supported(), "kvcore CPU kernels: ", kVariable,
                "=amx, but this CPU does not support AMX-TILE and AMX-BF16 with AVX512_BF16, or its OS did not "
                "grant this process the tile registers (Linux 5.16 or later); use 'auto', 'avx512bf16', 'avx512', "
                "'avx2' or 'baseline'");
    return CpuIsa::kAmx;
  }
  if (amx_supported()) return CpuIsa::kAmx;
  if (avx512_bf16_supported()) return CpuIsa::kAvx512Bf16;
  if (avx512_supported()) return CpuIsa::kAvx512;
  return avx2_supported() ? CpuIsa::kAvx2 : CpuIsa::kBaseline;
}

std::string cpu_isa_op() { return cpu_isa_name(cpu_isa()); }

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = pick_cpu_isa();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx512Bf16:
      return "avx512bf16";
    case CpuIsa::kAmx:
      return "amx";
    default:
      return "baseline";
  }
}

}  // namespace kvcore

// No tensor argument, so no backend key: the one kernel serves every dispatch.
TORCH_LIBRARY_IMPL(kvcore, CompositeImplicitAutograd, m) { m.impl("cpu_isa", &kvcore::cpu_isa_op); }
