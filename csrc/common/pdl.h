// Programmatic dependent launch (sm_90+): a kernel launched with the programmatic stream
// serialization attribute may start before the kernel ahead of it on the stream has finished, and
// waits for it (griddepcontrol.wait) before reading what that kernel writes. Shared by the
// launchers that chain a small second kernel after a larger one (gqa_decode's H2O score epilogue,
// topk_rows after infllm_unit_scores).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>

namespace kvcore {

inline bool env_flag(const char* name) {
  const char* e = std::getenv(name);
  return e != nullptr && e[0] == '1';
}

// On sm_90+, unless KVCORE_NO_PDL=1. During CUDA graph capture only with KVCORE_PDL_IN_GRAPHS=1:
// captured programmatic edges need a recent driver and have not been tried on our GPU host yet,
// so graphs get the plain (always valid) stream order by default.
inline bool use_pdl(cudaStream_t stream) {
  static const bool off = env_flag("KVCORE_NO_PDL"), in_graphs = env_flag("KVCORE_PDL_IN_GRAPHS");
  if (off || at::cuda::getCurrentDeviceProperties()->major < 9) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status == cudaStreamCaptureStatusNone || in_graphs;
}

// A launch configuration (for cudaLaunchKernelEx) that carries the programmatic serialization
// attribute when use_pdl(stream). Not copyable: cfg points at the object's own attribute.
struct PdlLaunchConfig {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr[1];

  PdlLaunchConfig(dim3 grid, dim3 block, size_t smem, cudaStream_t stream) {
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = use_pdl(stream) ? 1 : 0;
  }
  PdlLaunchConfig(const PdlLaunchConfig&) = delete;
  PdlLaunchConfig& operator=(const PdlLaunchConfig&) = delete;
};

}  // namespace kvcore
