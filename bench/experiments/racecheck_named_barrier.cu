// Does compute-sanitizer racecheck understand a bar.arrive / bar.sync producer-consumer hand-off?
// mla_decode_wgmma_kernel hands P from warpgroup 0 to warpgroup 1 through one shared buffer:
// the producer waits (bar.sync) on "free" before writing and signals (bar.arrive) "full"; the
// consumer waits (bar.sync) on "full", reads, and signals (bar.arrive) "free". By PTX's barrier
// semantics every read of round r completes before any write of round r + 1 (bench/NOTES.md,
// session 8). This kernel runs exactly that protocol (and a plain __syncthreads-separated write
// and read after it, as in mla_split_merge) and checks the values, so a racecheck report here is
// about the tool, not about a kernel of ours.
//   nvcc -arch=sm_90a -o /tmp/rnb bench/experiments/racecheck_named_barrier.cu && \
//   compute-sanitizer --tool racecheck /tmp/rnb [arrive|sync|mbarrier]
// "sync" makes the consumer's signal a bar.sync (the producer's stays bar.arrive); "mbarrier" runs
// the same protocol on two mbarriers (arrive / try_wait.parity), as KVCORE_MLA_WGMMA_HANDOFF=mbarrier
// does in the kernel. Session 8 (H200, racecheck 2025.3.1): 5 reports each for arrive and sync.
#include <cstdio>
#include <cstring>

__device__ __forceinline__ void bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id, int n) { asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory"); }

__device__ __forceinline__ unsigned smem_addr(const void* p) { return unsigned(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void mbar_init(unsigned long long* b, unsigned n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(b)), "r"(n) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* b) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}" ::"r"(smem_addr(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* b, unsigned parity) {
  asm volatile("{\n.reg .pred done;\nW_%=:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n@!done bra W_%=;\n}"
               ::"r"(smem_addr(b)), "r"(parity) : "memory");
}

constexpr int kRounds = 64, kN = 1024;
enum Mode { kArrive, kSync, kMbarrier };

__global__ void handoff(int* bad, int mode) {
  __shared__ float buf[kN];
  __shared__ float scratch[256];
  __shared__ unsigned long long full, free_;
  const int tid = threadIdx.x, wg = tid / 128, t = tid % 128;
  if (tid == 0) {
    mbar_init(&full, 128);
    mbar_init(&free_, 128);
  }
  __syncthreads();
  int errors = 0;
  if (mode == kMbarrier) {
    for (int r = 0; r < kRounds; ++r) {
      if (wg == 0) {
        if (r > 0) mbar_wait(&free_, (r - 1) & 1);
        for (int i = t; i < kN; i += 128) buf[i] = float(r * kN + i);
        mbar_arrive(&full);
      } else {
        mbar_wait(&full, r & 1);
        for (int i = t; i < kN; i += 128) errors += buf[(i + 64) % kN] != float(r * kN + (i + 64) % kN);
        mbar_arrive(&free_);
      }
    }
  }
  for (int r = 0; mode != kMbarrier && r < kRounds; ++r) {
    if (wg == 0) {
      if (r > 0) bar_sync(2, 256);  // free
      for (int i = t; i < kN; i += 128) buf[i] = float(r * kN + i);
      bar_arrive(1, 256);  // full
    } else {
      bar_sync(1, 256);  // full
      for (int i = t; i < kN; i += 128) errors += buf[(i + 64) % kN] != float(r * kN + (i + 64) % kN);
      if (r + 1 < kRounds) {
        if (mode == kSync) bar_sync(2, 256);
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
  const int mode = argc > 1 && std::strcmp(argv[1], "sync") == 0       ? kSync
                   : argc > 1 && std::strcmp(argv[1], "mbarrier") == 0 ? kMbarrier
                                                                        : kArrive;
  const char* names[] = {"bar.arrive", "bar.sync", "mbarrier"};
  int* bad;
  cudaMalloc(&bad, sizeof(int));
  cudaMemset(bad, 0, sizeof(int));
  handoff<<<4, 256>>>(bad, mode);
  int h = -1;
  cudaMemcpy(&h, bad, sizeof(int), cudaMemcpyDeviceToHost);
  std::printf("hand-off: %s, wrong values: %d, status: %s\n", names[mode], h,
              cudaGetErrorString(cudaGetLastError()));
  return h == 0 ? 0 : 1;
}
