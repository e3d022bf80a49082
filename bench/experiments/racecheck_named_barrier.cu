// Does compute-sanitizer racecheck understand a bar.arrive / bar.sync producer-consumer hand-off?
// mla_decode_wgmma_kernel hands P from warpgroup 0 to warpgroup 1 through one shared buffer:
// the producer waits (bar.sync) on "free" before writing and signals (bar.arrive) "full"; the
// consumer waits (bar.sync) on "full", reads, and signals (bar.arrive) "free". By PTX's barrier
// semantics every read of round r completes before any write of round r + 1 (bench/NOTES.md,
// session 8). This kernel runs exactly that protocol (and a plain __syncthreads-separated write
// and read after it, as in mla_split_merge) and checks the values, so a racecheck report here is
// about the tool, not about a kernel of ours.
//   nvcc -arch=sm_90a -o /tmp/rnb bench/experiments/racecheck_named_barrier.cu && \
//   compute-sanitizer --tool racecheck /tmp/rnb [arrive|sync]
// "sync" makes the consumer's signal a bar.sync too (a full rendezvous): the control.
#include <cstdio>
#include <cstring>

__device__ __forceinline__ void bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory"); }

constexpr int kRounds = 64, kN = 1024;

__global__ void handoff(int* bad, bool consumer_syncs) {
  __shared__ float buf[kN];
  __shared__ float scratch[256];
  const int tid = threadIdx.x, wg = tid / 128, t = tid % 128;
  int errors = 0;
  for (int r = 0; r < kRounds; ++r) {
    if (wg == 0) {
      if (r > 0) bar_sync(2, 256);  // free
      for (int i = t; i < kN; i += 128) buf[i] = float(r * kN + i);
      bar_arrive(1, 256);  // full
    } else {
      bar_sync(1, 256);  // full
      for (int i = t; i < kN; i += 128) errors += buf[(i + 64) % kN] != float(r * kN + (i + 64) % kN);
      if (r + 1 < kRounds) {
        if (consumer_syncs) bar_sync(2, 256);
        else bar_arrive(2, 256);  // free
      }
    }
  }
  __syncthreads();
  scratch[tid] = float(tid);
  __syncthreads();
  errors += scratch[255 - tid] != float(255 - tid);
  if (errors) atomicAdd(bad, errors);
}

int main(int argc, char** argv) {
  const bool consumer_syncs = argc > 1 && std::strcmp(argv[1], "sync") == 0;
  int* bad;
  cudaMalloc(&bad, sizeof(int));
  cudaMemset(bad, 0, sizeof(int));
  handoff<<<4, 256>>>(bad, consumer_syncs);
  int h = -1;
  cudaMemcpy(&h, bad, sizeof(int), cudaMemcpyDeviceToHost);
  std::printf("consumer signal: %s, wrong values: %d, status: %s\n", consumer_syncs ? "bar.sync" : "bar.arrive", h,
              cudaGetErrorString(cudaGetLastError()));
  return h == 0 ? 0 : 1;
}
