// fp16 to fp32 from the bits, a vector register at a time, for the CPU kernels' row conversions
// (cpu_attention.h's to_float). Compiled once per instruction set like cpu_attention.h (included
// by common/cpu_isa_kernels.h in each copy's region; no include guard, no #include), and on its
// own by tests/cpp/half_bits_check.cpp, which checks all 65,536 bit patterns at every vector width.
//
// Why not c10::Half's conversion: it compiled to a scalar routine per element here, and fp16
// gqa_decode took 4.7x bf16's time on the same rows (session 24: B1 Hq32 Hkv8 D128 S8192, one
// thread, 16.2 ms against 3.4; 6.6-6.9 ms with this). Plain integer and float vector operations
// (GCC's vector extension: no intrinsics, so the same source serves every copy), or the hardware's
// vcvtph2ps where the copy has F16C (below). bf16 needs none of this: c10's conversion is a
// shift, which GCC vectorises itself (faster than this file's form of it, session 24: 1.79-1.94
// against 2.04-2.18 ms at two threads).
#if !defined(KVCORE_CPU_ISA_NS) || !defined(KVCORE_CPU_VEC_BYTES)
#error "cpu_half_bits.h is compiled per ISA: include common/cpu_isa_kernels.h instead"
#endif

namespace kvcore {
namespace {
namespace KVCORE_CPU_ISA_NS {
namespace cpu {

// One register of fp32 lanes, of their 32-bit patterns, and of the 16-bit inputs (half as wide).
typedef float HalfBitsF __attribute__((vector_size(KVCORE_CPU_VEC_BYTES)));
typedef uint32_t HalfBitsU __attribute__((vector_size(KVCORE_CPU_VEC_BYTES)));
typedef int32_t HalfBitsI __attribute__((vector_size(KVCORE_CPU_VEC_BYTES)));
typedef uint16_t HalfBitsIn __attribute__((vector_size(KVCORE_CPU_VEC_BYTES / 2)));
constexpr int kHalfBitsLanes = KVCORE_CPU_VEC_BYTES / 4;

// fp16 (1 sign, 5 exponent bits biased by 15, 10 mantissa bits) to fp32, exactly:
//   exponent 1..30 (normal): the exponent and mantissa fields shifted into fp32's places, the
//     exponent rebiased by 127 - 15 = 112;
//   exponent 31 (inf, NaN): rebiased by 112 twice, to fp32's 255; the mantissa (so a NaN's payload
//     and quiet bit) kept;
//   exponent 0 (zero, subnormal): mantissa x 2^-24, computed in float from the integer mantissa
//     (exact: at most 10 significant bits, and the result is a normal fp32 or zero), so no fp32
//     subnormal arises anywhere and flush-to-zero modes cannot change a result.
// The sign is put back last (-0 stays -0). w: the 16-bit patterns, zero-extended.
inline HalfBitsF fp16_bits_to_float(HalfBitsU w) {
  const HalfBitsU mag = (w & 0x7fffu) << 13;
  const HalfBitsU special = (HalfBitsU)(mag >= (0x1fu << 23));  // all ones where inf / NaN
  const HalfBitsU normal = mag + (112u << 23) + (special & (112u << 23));
  const HalfBitsF tiny = __builtin_convertvector((HalfBitsI)(w & 0x3ffu), HalfBitsF) * 0x1p-24f;
  const HalfBitsU small = (HalfBitsU)(mag < (1u << 23));  // all ones where the exponent is 0
  const HalfBitsU bits = (small & __builtin_bit_cast(HalfBitsU, tiny)) | (~small & normal);
  return __builtin_bit_cast(HalfBitsF, bits | ((w & 0x8000u) << 16));
}

// The same for one value (a row's tail), with the same operations, so every element of a row
// converts the same way wherever it falls.
inline float fp16_bits_to_float(uint32_t w) {
  const uint32_t mag = (w & 0x7fffu) << 13;
  const uint32_t normal = mag + (112u << 23) + (mag >= (0x1fu << 23) ? (112u << 23) : 0u);
  const float tiny = static_cast<float>(static_cast<int32_t>(w & 0x3ffu)) * 0x1p-24f;
  const uint32_t bits = mag < (1u << 23) ? __builtin_bit_cast(uint32_t, tiny) : normal;
  return __builtin_bit_cast(float, bits | ((w & 0x8000u) << 16));
}

// dst[i] = the value of the fp16 bit pattern src[i], i < n. (Written as a scalar loop GCC does not
// vectorise it: 10 ms for the case above.) Where the copy is compiled for F16C (KVCORE_CPU_F16C:
// the AVX2 and AVX-512 copies, cpu_isa_kernels.h), the vector part is the hardware's vcvtph2ps
// instead, one instruction for 8 values (16 in the AVX-512 copy's zmm form); exact too, except
// that it quiets a signalling NaN, as torch's own conversion does. The tail stays the bit form.
inline void fp16_bits_to_float(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(KVCORE_CPU_F16C) && KVCORE_CPU_VEC_BYTES == 32
  typedef short HalfBitsS8 __attribute__((vector_size(16)));
  for (; i + 8 <= n; i += 8) {
    HalfBitsS8 h;
    __builtin_memcpy(&h, src + i, sizeof h);
    const HalfBitsF f = __builtin_ia32_vcvtph2ps256(h);
    __builtin_memcpy(dst + i, &f, sizeof f);
  }
#elif defined(KVCORE_CPU_F16C) && KVCORE_CPU_VEC_BYTES == 64
  typedef short HalfBitsS16 __attribute__((vector_size(32)));
  for (; i + 16 <= n; i += 16) {
    HalfBitsS16 h;
    __builtin_memcpy(&h, src + i, sizeof h);
    // All 16 lanes (mask -1), no merge source needed; 4 = _MM_FROUND_CUR_DIRECTION (exact anyway).
    const HalfBitsF f = __builtin_ia32_vcvtph2ps512_mask(h, HalfBitsF{}, static_cast<unsigned short>(0xffff), 4);
    __builtin_memcpy(dst + i, &f, sizeof f);
  }
#else
  for (; i + kHalfBitsLanes <= n; i += kHalfBitsLanes) {
    HalfBitsIn h;
    __builtin_memcpy(&h, src + i, sizeof h);
    const HalfBitsF f = fp16_bits_to_float(__builtin_convertvector(h, HalfBitsU));
    __builtin_memcpy(dst + i, &f, sizeof f);
  }
#endif
  for (; i < n; ++i) dst[i] = fp16_bits_to_float(uint32_t(src[i]));
}

}  // namespace cpu
}  // namespace KVCORE_CPU_ISA_NS
}  // namespace
}  // namespace kvcore
