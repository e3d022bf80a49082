// TMA tensor maps for the CUDA launchers (mla_decode's and gqa_decode's TMA loaders): the driver's
// cuTensorMapEncodeTiled, found through the runtime so the library does not link against libcuda,
// and a 3-D tiled map of a 16-bit tensor with the 128-byte swizzle the kernels' tiles use.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

namespace kvcore {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder(const char* op) {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q);
    return e == cudaSuccess && q == cudaDriverEntryPointSuccess ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f)
                                                                : nullptr;
  }();
  TORCH_CHECK(fn != nullptr, op, " (CUDA): the driver has no cuTensorMapEncodeTiled (needed by the TMA loader)");
  return fn;
}

// A 3-D map (dims innermost first; strides_bytes for dims 1 and 2) of 16-bit elements, read in
// boxes of `box` elements with the 128-byte swizzle (box[0] must be 64), out-of-range elements
// read as zero. Host-only work (no device call), so it can be built per launch.
inline CUtensorMap tensor_map_3d_sw128(const char* op, bool bf16, const void* base, const cuuint64_t (&dims)[3],
                                       const cuuint64_t (&strides_bytes)[2], const cuuint32_t (&box)[3],
                                       CUtensorMapL2promotion l2 = CU_TENSOR_MAP_L2_PROMOTION_L2_256B) {
  CUtensorMap map{};
  const cuuint32_t elem[3] = {1, 1, 1};
  const CUresult r = tensor_map_encoder(op)(
      &map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3, const_cast<void*>(base), dims,
      strides_bytes, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      l2, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, op, " (CUDA): cuTensorMapEncodeTiled failed (", int(r), ") for dims [", dims[0], ", ",
              dims[1], ", ", dims[2], "], strides [", strides_bytes[0], ", ", strides_bytes[1], "] bytes, box [", box[0],
              ", ", box[1], ", ", box[2], "]");
  return map;
}

}  // namespace kvcore
