// Dtype dispatch for the CUDA launchers: maps torch's 16-bit float types onto the CUDA types the
// framework-free kernels in csrc/include take, with one call site per op (no branch per dtype).
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kvcore {

template <typename F>
void dispatch_half_types(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kBFloat16:
      f(__nv_bfloat16{});
      break;
    case at::kHalf:
      f(__half{});
      break;
    default:
      TORCH_CHECK(false, what, ": CUDA kernels take bfloat16 or float16, got ", dtype);
  }
}

inline void check_aligned16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must start on a 16-byte boundary (the kernels use 16-byte vector loads); pass a fresh contiguous tensor");
}

}  // namespace kvcore
