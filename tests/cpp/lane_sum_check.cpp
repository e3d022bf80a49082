// Checks the lane sums of csrc/common/cpu_attention.h on the host (tests/test_host_checks.py
// compiles and runs it): cpu::lane_sum at every vector width the CPU kernels use (16, 32 and 64
// bytes) and cpu::lane_sums16 (64 bytes) are compiled twice, with the __builtin_shufflevector forms
// (where the compiler has them) and with the scalar fallback older compilers get
// (KVCORE_CPU_SHUFFLEVECTOR 0), and must give the same bits as a scalar sum written here in the
// documented tree, on random vectors with wide exponents, zeros of both signs, infinities and NaN
// (NaN: any NaN). Prints the number of checked sums; exits 1 on a mismatch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <type_traits>

namespace c10 {
struct Half;  // cpu_attention.h names these; nothing here converts rows
struct BFloat16;
}  // namespace c10

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define HAVE_SHUFFLEVECTOR 1
#else
#define HAVE_SHUFFLEVECTOR 0
#endif

#define KVCORE_CPU_SHUFFLEVECTOR 0
#define KVCORE_CPU_ISA_NS scalar16
#define KVCORE_CPU_VEC_BYTES 16
#include "common/cpu_half_bits.h"
#include "common/cpu_attention.h"
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS
#define KVCORE_CPU_ISA_NS scalar32
#define KVCORE_CPU_VEC_BYTES 32
#include "common/cpu_half_bits.h"
#include "common/cpu_attention.h"
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS
#define KVCORE_CPU_ISA_NS scalar64
#define KVCORE_CPU_VEC_BYTES 64
#include "common/cpu_half_bits.h"
#include "common/cpu_attention.h"
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS
#undef KVCORE_CPU_SHUFFLEVECTOR
#if HAVE_SHUFFLEVECTOR
#define KVCORE_CPU_SHUFFLEVECTOR 1
#define KVCORE_CPU_ISA_NS shuffle32
#define KVCORE_CPU_VEC_BYTES 32
#include "common/cpu_half_bits.h"
#include "common/cpu_attention.h"
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS
#define KVCORE_CPU_ISA_NS shuffle64
#define KVCORE_CPU_VEC_BYTES 64
#include "common/cpu_half_bits.h"
#include "common/cpu_attention.h"
#undef KVCORE_CPU_VEC_BYTES
#undef KVCORE_CPU_ISA_NS
#undef KVCORE_CPU_SHUFFLEVECTOR
#endif

namespace {

int failures = 0;
long long checked = 0;

// The documented tree: halves folded down to 4 lanes, then (s0 + s1) + (s2 + s3); 4 lanes:
// (v0 + v2) + (v1 + v3).
float tree_sum(const float* v, int lanes) {
  float h[16];
  std::copy(v, v + lanes, h);
  if (lanes == 4) return (h[0] + h[2]) + (h[1] + h[3]);
  for (int n = lanes / 2; n >= 4; n /= 2)
    for (int i = 0; i < n; ++i) h[i] = h[i] + h[i + n];
  return (h[0] + h[1]) + (h[2] + h[3]);
}

bool same(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  uint32_t x, y;
  std::memcpy(&x, &a, 4);
  std::memcpy(&y, &b, 4);
  return x == y;
}

void expect(const char* what, float got, float want) {
  ++checked;
  if (!same(got, want) && ++failures <= 20) std::printf("FAIL %s: got %a, want %a\n", what, got, want);
}

float draw(std::mt19937& rng) {
  const uint32_t kind = rng() % 64;
  if (kind == 0) return std::numeric_limits<float>::infinity();
  if (kind == 1) return -std::numeric_limits<float>::infinity();
  if (kind == 2) return std::numeric_limits<float>::quiet_NaN();
  if (kind == 3) return -0.0f;
  if (kind == 4) return 0.0f;
  std::normal_distribution<float> nd;
  return std::ldexp(nd(rng), int(rng() % 60) - 30);
}

template <typename FVec, int kLanes, typename LaneSum>
void check_lane_sum(const char* what, std::mt19937& rng, LaneSum lane_sum) {
  for (int t = 0; t < 200000; ++t) {
    FVec v;
    float lanes[kLanes];
    for (int i = 0; i < kLanes; ++i) v[i] = lanes[i] = draw(rng);
    expect(what, lane_sum(v), tree_sum(lanes, kLanes));
  }
}

template <typename FVec, typename LaneSums16>
void check_lane_sums16(const char* what, std::mt19937& rng, LaneSums16 lane_sums16) {
  for (int t = 0; t < 20000; ++t) {
    FVec v[16];
    float lanes[16][16], out[16];
    for (int k = 0; k < 16; ++k)
      for (int i = 0; i < 16; ++i) v[k][i] = lanes[k][i] = draw(rng);
    lane_sums16(v, out);
    for (int k = 0; k < 16; ++k) expect(what, out[k], tree_sum(lanes[k], 16));
  }
}

}  // namespace

int main() {
  namespace k = kvcore;
  std::mt19937 rng(25);
  check_lane_sum<k::scalar16::cpu::FVec, 4>("16-byte", rng,
                                            [](const auto& v) { return k::scalar16::cpu::lane_sum(v); });
  check_lane_sum<k::scalar32::cpu::FVec, 8>("32-byte scalar", rng,
                                            [](const auto& v) { return k::scalar32::cpu::lane_sum(v); });
  check_lane_sum<k::scalar64::cpu::FVec, 16>("64-byte scalar", rng,
                                             [](const auto& v) { return k::scalar64::cpu::lane_sum(v); });
  check_lane_sums16<k::scalar64::cpu::FVec>("lane_sums16 scalar", rng,
                                            [](const auto* v, float* o) { k::scalar64::cpu::lane_sums16(v, o); });
#if HAVE_SHUFFLEVECTOR
  check_lane_sum<k::shuffle32::cpu::FVec, 8>("32-byte shuffles", rng,
                                             [](const auto& v) { return k::shuffle32::cpu::lane_sum(v); });
  check_lane_sum<k::shuffle64::cpu::FVec, 16>("64-byte shuffles", rng,
                                              [](const auto& v) { return k::shuffle64::cpu::lane_sum(v); });
  check_lane_sums16<k::shuffle64::cpu::FVec>("lane_sums16 shuffles", rng,
                                             [](const auto* v, float* o) { k::shuffle64::cpu::lane_sums16(v, o); });
  std::printf("with the shuffle forms\n");
#endif
  std::printf("checked %lld sums, %d failures\n", checked, failures);
  return failures == 0 ? 0 : 1;
}
