// The total order of kvcore::topk_rows, shared by the CPU and CUDA kernels so both return the
// same indices bit for bit: a score and its column pack into one 64-bit key whose unsigned order
// is the ranking (larger key = better), so "top k" is "the k largest keys" with no ties left.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define KVCORE_HD __host__ __device__ __forceinline__
#else
#define KVCORE_HD inline
#endif

namespace kvcore {

// Monotone map of a float onto uint32: x < y (as floats) <=> key(x) < key(y). -0.0 maps like
// +0.0 (they compare equal), and every NaN maps to 0, below -inf (0x007FFFFF), so a NaN score is
// never chosen over a number.
KVCORE_HD uint32_t ordered_float_bits(float x) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(x);
#else
  std::memcpy(&bits, &x, sizeof(bits));
#endif
  // Pure bit tests (no float compares), so fast-math / flush-to-zero builds rank exactly as the
  // CPU build: denormals stay distinct, NaN detection cannot be optimised away.
  const uint32_t mag = bits & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return 0u;  // NaN
  if (mag == 0u) bits = 0u;          // -0.0 -> +0.0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// High 32 bits: the score's order; low 32 bits: the inverted column, so that between equal
// scores the lower column is the larger key (ranked first).
KVCORE_HD uint64_t topk_key(float score, uint32_t column) {
  return (uint64_t(ordered_float_bits(score)) << 32) | uint64_t(0xFFFFFFFFu - column);
}

KVCORE_HD uint32_t topk_key_column(uint64_t key) { return 0xFFFFFFFFu - uint32_t(key & 0xFFFFFFFFull); }

// Largest k topk_rows accepts (its CUDA kernel ranks the chosen keys in shared memory).
constexpr int64_t kTopkMaxK = 256;

}  // namespace kvcore
