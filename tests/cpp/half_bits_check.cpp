// Checks csrc/common/cpu_half_bits.h on the host (tests/test_host_checks.py compiles and runs
// it, also with -mavx2 -mfma -mf16c and with -mavx512f added, where the CPU has them): every one
// of the 65,536 fp16 bit patterns, through the vector path and the scalar tail, at every register
// width the CPU kernels use (16 bytes: the baseline copy; 32: the AVX2 one; 64: the AVX-512 one),
// with the F16C paths when compiled for them (the AVX2 copy's 8-wide vcvtph2ps under -mf16c, the
// AVX-512 copy's 16-wide form under -mavx512f), against a decoder written from the format's
// definition with ldexp. Values must match
// bit for bit (NaN: the expected sign and payload; a signalling NaN may come back quieted).
// Prints the number of checked conversions; exits 1 on a mismatch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#define KVCORE_CPU_ISA_NS width16
#define KVCORE_CPU_VEC_BYTES 16
#include "common/cpu_half_bits.h"
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS
#define KVCORE_CPU_ISA_NS width32
#define KVCORE_CPU_VEC_BYTES 32
#include "common/cpu_half_bits.h"
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS
#define KVCORE_CPU_ISA_NS width64
#define KVCORE_CPU_VEC_BYTES 64
#include "common/cpu_half_bits.h"
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS
#if defined(__F16C__)  // compiled with -mf16c: the AVX2 copy's vcvtph2ps path too
#define KVCORE_CPU_ISA_NS width32_f16c
#define KVCORE_CPU_VEC_BYTES 32
#define KVCORE_CPU_F16C 1
#include "common/cpu_half_bits.h"
#undef KVCORE_CPU_F16C
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS
#endif
#if defined(__F16C__) && defined(__AVX512F__)  // and the AVX-512 copy's zmm form
#define KVCORE_CPU_ISA_NS width64_f16c
#define KVCORE_CPU_VEC_BYTES 64
#define KVCORE_CPU_F16C 1
#include "common/cpu_half_bits.h"
#undef KVCORE_CPU_F16C
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS
#endif

namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// The fp32 bit pattern of the 16-bit float h with an ebits-wide exponent (bias 2^(ebits-1) - 1) and
// an mbits-wide mantissa, by the definition (2^(e - bias) x 1.m; subnormal 2^(1 - bias) x 0.m).
uint32_t expected(uint32_t h, int ebits, int mbits) {
  const uint32_t sign = (h >> (ebits + mbits)) & 1u, e = (h >> mbits) & ((1u << ebits) - 1), m = h & ((1u << mbits) - 1);
  const int bias = (1 << (ebits - 1)) - 1;
  if (e == (1u << ebits) - 1)  // inf or NaN: fp32's all-ones exponent, the mantissa at its top
    return (sign << 31) | 0x7f800000u | (m << (23 - mbits));
  const double mag = e == 0 ? std::ldexp(double(m), 1 - bias - mbits) : std::ldexp(double((1u << mbits) | m), int(e) - bias - mbits);
  return bits_of(static_cast<float>(sign ? -mag : mag));
}

int failures = 0;
long long checked = 0;

template <typename Convert>
void check_all(const char* name, Convert convert) {
  static uint16_t src[65536 + 3];
  static float dst[65536 + 3];
  // n = 65536 + 3 with the first 3 patterns again at the end (the vector loop, then the scalar
  // tail), and then every pattern again on its own (n = 1: the scalar tail alone).
  for (uint32_t i = 0; i < 65536 + 3; ++i) src[i] = uint16_t(i % 65536);
  convert(src, dst, 65536 + 3);
  for (uint32_t i = 0; i < 65536 + 3; ++i) {
    const uint32_t want = expected(src[i], 5, 10);
    // A signalling NaN may come back quieted (vcvtph2ps sets the quiet bit, as torch's own fp16
    // conversion on x86 does); sign and payload must stay.
    const bool nan = (want & 0x7f800000u) == 0x7f800000u && (want & 0x007fffffu) != 0;
    auto same = [&](float got) { return bits_of(got) == want || (nan && bits_of(got) == (want | 0x00400000u)); };
    if (!same(dst[i]) && ++failures <= 20)
      std::printf("FAIL %s: 0x%04x -> 0x%08x, want 0x%08x\n", name, src[i], bits_of(dst[i]), want);
    ++checked;
    if (i < 65536) {
      float one[1];
      convert(src + i, one, 1);
      if (!same(one[0]) && ++failures <= 20)
        std::printf("FAIL %s: 0x%04x alone -> 0x%08x, want 0x%08x\n", name, src[i], bits_of(one[0]), want);
      ++checked;
    }
  }
}

}  // namespace

int main() {
  check_all("16-byte", [](const uint16_t* s, float* d, int64_t n) { kvcore::width16::cpu::fp16_bits_to_float(s, d, n); });
  check_all("32-byte", [](const uint16_t* s, float* d, int64_t n) { kvcore::width32::cpu::fp16_bits_to_float(s, d, n); });
  check_all("64-byte", [](const uint16_t* s, float* d, int64_t n) {
    kvcore::width64::cpu::fp16_bits_to_float(s, d, n);
  });
#if defined(__F16C__)
  check_all("32-byte F16C", [](const uint16_t* s, float* d, int64_t n) {
    kvcore::width32_f16c::cpu::fp16_bits_to_float(s, d, n);
  });
  std::printf("with the F16C path\n");
#endif
#if defined(__F16C__) && defined(__AVX512F__)
  check_all("64-byte F16C", [](const uint16_t* s, float* d, int64_t n) {
    kvcore::width64_f16c::cpu::fp16_bits_to_float(s, d, n);
  });
  std::printf("with the AVX-512 F16C path\n");
#endif
  std::printf("checked %lld conversions, %d failures\n", checked, failures);
  return failures == 0 ? 0 : 1;
}
