// Run-time choice of the instruction set the CPU attention kernels run with.
//
// pip users get a build for the x86-64 baseline (SSE2), yet on an AVX2+FMA CPU the same kernels
// built with -mavx2 -mfma took half the time (gqa_decode B1 Hq32 Hkv8 D128 S2048 fp32, 2 cores:
// 4.63 ms against 2.34 ms). Neither build (setup.py through torch's BuildExtension, which has no
// per-file flags, nor CMakeLists.txt) can give one file other flags, so a kernel file compiles
// its kernels once per instruction set in one translation unit (common/cpu_isa_kernels.h): plain,
// under `#pragma GCC target("avx2,fma,f16c")` and under the same plus AVX-512 (F, BW, DQ, VL),
// each copy in its own namespace, and calls one of them per op. (F16C: the fp16 rows' vcvtph2ps,
// cpu_half_bits.h.) The AVX-512 copy uses 64-byte vectors: on a Zen 5 EPYC, CPU mla_decode (which
// is FMA-bound) took ~0.7x the AVX2 copy's time (bench/NOTES.md, session 25). Where the CPU also
// has AVX512_BF16, bf16 gqa_decode, block_sparse_decode, mla_decode and attention_scores in that
// copy multiply bf16 pairs with vdpbf16ps (cpu_attention.h's bf16dot: functions marked KVCORE_CPU_BF16_DOT_FN, called
// only when cpu_isa() is kAvx512Bf16 or kAmx). Where it also has AMX-BF16 and the OS lets the
// process use the tile registers, bf16 mla_decode in that copy multiplies on AMX tiles (functions
// marked KVCORE_CPU_AMX_FN, called only when cpu_isa() is kAmx).
//
// Why a pragma region and not __attribute__((target)) on the kernel functions: the kernels run
// their work in lambdas handed to at::parallel_for and in helpers that may stay out of line;
// neither inherits a function's target attribute, so the hot loops would stay SSE2. Every
// function *defined* inside the region (lambdas and template instantiations included) gets the
// target. Nothing may be #included inside it: an inline function from a header compiled there
// for AVX2 is a COMDAT the linker may also hand to the baseline path (SIGILL on an old CPU).
//
// The AVX2 and AVX-512 copies exist only where the compiler has the pragma and
// __builtin_cpu_supports: GCC on x86-64. Other compilers (clang has neither in this form) and
// other architectures (aarch64) compile the baseline copy alone, and KVCORE_CPU_ISA=avx2 or
// avx512 is an error there. Defining KVCORE_CPU_X86_COPIES=0 on the command line builds that way
// anywhere (to check that it compiles).
#pragma once

#ifndef KVCORE_CPU_X86_COPIES
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define KVCORE_CPU_X86_COPIES 1
#else
#define KVCORE_CPU_X86_COPIES 0
#endif
#endif

// The amx setting's kernels need GCC 11's AMX intrinsics; older compilers build without them and
// never pick amx.
#ifndef KVCORE_CPU_AMX
#if KVCORE_CPU_X86_COPIES && __GNUC__ >= 11
#define KVCORE_CPU_AMX 1
#else
#define KVCORE_CPU_AMX 0
#endif
#endif

namespace kvcore {

enum class CpuIsa { kBaseline, kAvx2, kAvx512, kAvx512Bf16, kAmx };

// The instruction set the CPU kernels use, from KVCORE_CPU_ISA (read once per process):
//   auto (default, also unset or empty): the widest copy this build has and the CPU (and the OS,
//     which must save the YMM / ZMM registers) supports: amx (avx512bf16's features, AMX-TILE and
//     AMX-BF16, and the OS's leave to use the tile registers), else avx512bf16 (avx512's features
//     and AVX512_BF16), else avx512 (AVX-512 F, BW, DQ and VL with AVX2, FMA and F16C), else avx2
//     (AVX2, FMA and F16C; every AVX2 CPU has F16C), else baseline;
//   baseline: the plain copy; avx2: the AVX2+FMA(+F16C) copy; avx512: the AVX-512 copy;
//   avx512bf16: the AVX-512 copy with bf16 dot products for bf16 gqa_decode (and its H2O score
//     pass), block_sparse_decode, mla_decode (their softmax weights rounded to bf16 before they
//     multiply the values, as a bf16 matmul does) and attention_scores (logits only);
//   amx: avx512bf16, except that bf16 mla_decode multiplies on AMX tiles (tdpbf16ps: both
//     products of 16 x 16 blocks of heads x keys / heads x columns; mla_decode_cpu_kernels.h).
// Any other value, or a copy that cannot run here, raises an error naming the variable, at every
// call (the failing first read leaves the cached choice unset), so a misspelt value cannot
// silently time the default.
CpuIsa cpu_isa();

// Whether the kernels' bf16 rows take the AVX512_BF16 dot products (their `bf16_dot` argument).
inline bool cpu_bf16_dot() { return cpu_isa() == CpuIsa::kAvx512Bf16 || cpu_isa() == CpuIsa::kAmx; }

// Whether bf16 mla_decode runs on AMX tiles (its `amx` argument); the OS has granted this process
// the tile registers when it is true.
inline bool cpu_amx() { return cpu_isa() == CpuIsa::kAmx; }

// "baseline", "avx2", "avx512", "avx512bf16" or "amx": the name KVCORE_CPU_ISA uses for `isa`.
const char* cpu_isa_name(CpuIsa isa);

}  // namespace kvcore
