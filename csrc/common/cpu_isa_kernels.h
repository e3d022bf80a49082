// Compiles one CPU kernel file's kernels once per instruction set (see cpu_isa.h for why).
//
//   #define KVCORE_CPU_KERNELS "decode/gqa_decode_cpu_kernels.h"
//   #include "common/cpu_isa_kernels.h"
//
// at namespace scope, after the kernel file's own #includes and the types its kernels use. It
// defines the shared pieces (cpu_half_bits.h, cpu_attention.h) and the kernels of
// KVCORE_CPU_KERNELS in kvcore::(anonymous)::isa_baseline and, where the build has the x86
// copies, again in kvcore::(anonymous)::isa_avx2 under target("avx2,fma,f16c") and in
// kvcore::(anonymous)::isa_avx512 under the same plus AVX-512 F, BW, DQ and VL; elsewhere both
// names mean isa_baseline, so callers pick with KVCORE_CPU_PICK(f) (below) everywhere.
// The anonymous namespace keeps each file's copies to itself: no COMDAT of an AVX2 function can
// stand in for a baseline one across files.
//
// Deliberately no include guard (it is meant to be included once per kernel file), and the
// fragments it includes must include nothing themselves: anything first included inside the
// target region would be compiled for AVX2 (see cpu_isa.h). The headers they use are included
// here, before the region.
#ifndef KVCORE_CPU_KERNELS
#error "define KVCORE_CPU_KERNELS (the kernel fragment to compile per ISA) before including cpu_isa_kernels.h"
#endif

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/cpu_isa.h"

#if KVCORE_CPU_X86_COPIES
// The intrinsics of the AVX-512 copy's bf16 dot products. Safe outside the regions: each intrinsic
// is an always-inline function with its own target attribute, never emitted out of line.
#include <immintrin.h>
#endif

// Whether the compiler has __builtin_shufflevector (clang; GCC from 12): cpu_attention.h's lane
// sums use it, and fall back to scalar lane reads in the same order (the same bits) without it.
#ifndef KVCORE_CPU_SHUFFLEVECTOR
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define KVCORE_CPU_SHUFFLEVECTOR 1
#else
#define KVCORE_CPU_SHUFFLEVECTOR 0
#endif
#endif

// KVCORE_CPU_VEC_BYTES: the width of one vector register in this copy (cpu_attention.h's FVec).
#define KVCORE_CPU_ISA_NS isa_baseline
#define KVCORE_CPU_VEC_BYTES 16
#include "common/cpu_half_bits.h"
#include "common/cpu_attention.h"
#include KVCORE_CPU_KERNELS
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS

#if KVCORE_CPU_X86_COPIES
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define KVCORE_CPU_ISA_NS isa_avx2
#define KVCORE_CPU_VEC_BYTES 32
#define KVCORE_CPU_F16C 1  // cpu_half_bits.h: vcvtph2ps
#include "common/cpu_half_bits.h"
#include "common/cpu_attention.h"
#include KVCORE_CPU_KERNELS
#undef KVCORE_CPU_F16C
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS
#pragma GCC pop_options

// 64-byte vectors (zmm, 16 floats); the fp16 rows through AVX-512 F's 16-wide vcvtph2ps.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
#define KVCORE_CPU_ISA_NS isa_avx512
#define KVCORE_CPU_VEC_BYTES 64
#define KVCORE_CPU_F16C 1  // cpu_half_bits.h: vcvtph2ps, zmm form
// Functions marked with this also get AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16; <immintrin.h>'s
// intrinsics, included above the regions): kernels call them only when cpu_isa() is kAvx512Bf16.
// They must be named functions, not lambdas (which would not inherit the attribute).
#define KVCORE_CPU_BF16_DOT_FN __attribute__((target("avx512bf16")))
// ... and functions marked with this AMX's tiles too (called only when cpu_isa() is kAmx).
#if KVCORE_CPU_AMX
#define KVCORE_CPU_AMX_FN __attribute__((target("avx512bf16,amx-tile,amx-bf16")))
#endif
#include "common/cpu_half_bits.h"
#include "common/cpu_attention.h"
#include KVCORE_CPU_KERNELS
#undef KVCORE_CPU_AMX_FN
#undef KVCORE_CPU_BF16_DOT_FN
#undef KVCORE_CPU_F16C
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS
#pragma GCC pop_options
#else
namespace kvcore {
namespace {
namespace isa_avx2 = isa_baseline;  // never chosen: cpu_isa() is kBaseline in such builds
namespace isa_avx512 = isa_baseline;
}  // namespace
}  // namespace kvcore
#endif

// The copy of kernel `f` (a function or function template specialisation, named without its
// isa_* namespace) that this process's KVCORE_CPU_ISA picked, as a function pointer.
#ifndef KVCORE_CPU_PICK
#define KVCORE_CPU_PICK(...)                                                                      \
  (::kvcore::cpu_isa() >= ::kvcore::CpuIsa::kAvx512                                              \
       ? &isa_avx512::__VA_ARGS__                                                                 \
   : ::kvcore::cpu_isa() == ::kvcore::CpuIsa::kAvx2 ? &isa_avx2::__VA_ARGS__                      \
                                                    : &isa_baseline::__VA_ARGS__)
#endif
