// Resident CTAs per SM of one kernel instantiation, shared by every CUDA launcher that sizes its
// grid (split counts, one-wave grids) from the occupancy.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>

namespace kvcore {

// Resident CTAs per SM of `kernel` with `smem` bytes of dynamic shared memory (0 when it does not
// fit), cached per (kernel, smem, device): the occupancy query costs microseconds and launches
// happen every decode step, and a launcher may compare several footprints of one kernel (the
// token decoder's ring depths). Also raises the kernel's dynamic shared-memory limit on that
// device to the largest size asked for so far, which a launch with more than 48 KB needs; `smem`
// must not exceed the device's opt-in maximum.
inline int occupancy_per_sm(const void* kernel, int threads, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, size_t, int>, int> cache;
  static std::map<std::pair<const void*, int>, size_t> limit;  // the limit set per (kernel, device)
  const int dev = at::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find({kernel, smem, dev});
  if (it != cache.end()) return it->second;
  size_t& most = limit[{kernel, dev}];
  if (smem > most) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    most = smem;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
  return cache[{kernel, smem, dev}] = n;
}

// occupancy_per_sm for launchers that have one footprint per kernel: an error naming `op` when
// the kernel does not fit.
inline int ctas_per_sm(const void* kernel, int threads, size_t smem, const char* op) {
  const int n = occupancy_per_sm(kernel, threads, smem);
  TORCH_CHECK(n > 0, op, ": the kernel does not fit on this GPU (", smem, " bytes of shared memory per CTA)");
  return n;
}

// Asks the driver for the largest shared-memory carveout for `kernel` on the current device, once
// per (kernel, device): kernels sized for several CTAs per SM by their shared memory would
// otherwise get whatever split of L1 / shared memory the driver picks, which may hold fewer.
// Call it before the occupancy query (ctas_per_sm) and the launch.
inline void prefer_max_shared_carveout(const void* kernel) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  const int dev = at::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  if (!done.insert({kernel, dev}).second) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      int(cudaSharedmemCarveoutMaxShared)));
}

// Whether the image of `kernel` loaded on the current device has its body, for kernels whose
// body exists only in sm_90a code (a build for plain sm_90, or for an older GPU, compiles a trap
// in its place): the image tells without a launch, so also inside a graph capture, by its
// register count (a body needs at least `min_regs`, the trap a handful). Cached per (kernel,
// device).
inline bool kernel_body_built(const void* kernel, int min_regs) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, bool> cache;
  const int dev = at::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find({kernel, dev});
  if (it != cache.end()) return it->second;
  cudaFuncAttributes a{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&a, kernel));
  return cache[{kernel, dev}] = a.numRegs >= min_regs;
}

}  // namespace kvcore
