#pragma once
// Hopper (sm_90a) building blocks: warpgroup MMA (wgmma) with shared-memory matrix descriptors,
// mbarriers (also as completion counters for cp.async), named barriers and the generic -> async
// proxy fence. Only what the kernels here use; everything is a thin wrapper over one PTX
// instruction. Callers compile these only for sm_90a (KVCORE_SM90A below), and their host code
// launches them only on compute capability 9.0.
//
// Layout convention of every wgmma operand in shared memory here: the 128-byte swizzle. A matrix
// of R rows x C 16-bit columns is stored as C / 64 column chunks, each R rows x 128 bytes
// (64 columns), rows 128 bytes apart, and within each 1024-byte group of 8 rows the 16-byte
// pieces of row r are XOR-permuted by r % 8 (`swz128_offset` below). Chunks start on 1024-byte
// boundaries. That one physical layout serves as a K-major operand (rows = M or N, columns = K)
// and as an MN-major one (rows = K, columns = N), which is how one latent tile is both K and V.

#include <stdint.h>

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define KVCORE_SM90A 1
#else
#define KVCORE_SM90A 0
#endif

namespace kvcore {

// Element offset of 16-byte piece `piece` (8 elements) of row `row` in a 128-byte-swizzled
// [rows][cols] matrix of 16-bit elements with `rows` rows per 64-column chunk.
__host__ __device__ __forceinline__ int swz128_offset(int rows, int row, int piece) {
  return (piece >> 3) * rows * 64 + row * 64 + (((piece & 7) ^ (row & 7)) << 3);
}

// Shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if KVCORE_SM90A

// ---- shared-memory matrix descriptor -------------------------------------------------------
// Bits 0-13 start address >> 4, 16-29 leading byte offset >> 4, 32-45 stride byte offset >> 4,
// 62-63 layout (1 = 128-byte swizzle). For the 128-byte swizzle:
//   K-major:  SBO = bytes between groups of 8 rows (1024 here); LBO unused (one instruction's
//             k16 never leaves a 64-column chunk).
//   MN-major: SBO = bytes between groups of 8 K rows (1024), LBO = bytes between 64-column
//             chunks along N.
__device__ __forceinline__ uint64_t smem_desc_sw128(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  const uint32_t addr = smem_u32(smem);
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo_bytes >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

// The descriptor of the matrix `bytes` further on in shared memory than `desc`'s (same layout,
// offsets and swizzle). Only the start-address field (bits 0-13, 16-byte units) moves, and a
// shared-memory address (< 2^18) plus an offset that stays inside shared memory cannot carry out
// of it, so adding bytes >> 4 to the low word is exact: one integer add per wgmma operand where
// smem_desc_sw128 costs a generic-to-shared conversion, masks, shifts and 64-bit ors.
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) {
  return (desc & 0xFFFFFFFF00000000ull) | uint32_t(uint32_t(desc) + (bytes >> 4));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accesses to accumulator registers across the asynchronous MMA
// (the registers are written by the tensor core between issue and wait).
template <int N>
__device__ __forceinline__ void wgmma_fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define KVCORE_WGMMA_D32                                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define KVCORE_WGMMA_D32_OPERANDS(d)                                                                           \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),  \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),   \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),  \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])

// D[64 x 64] (+)= A[64 x 16] B[16 x 64], A and B K-major in shared memory; fp32 accumulators in
// the m64nNk16 D layout (warp w of the group: rows 16w + lane/4 and +8; register 4i + j: columns
// 8i + 2 (lane % 4) + (j & 1), the row +8 for j >= 2). accumulate = false overwrites D.
#define KVCORE_WGMMA_SS(TYPE)                                                                                   \
  asm volatile(                                                                                                 \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                              \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " KVCORE_WGMMA_D32 ", %32, %33, p, 1, 1, 0, 0;\n}\n" \
      : KVCORE_WGMMA_D32_OPERANDS(d)                                                                            \
      : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)))
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, bool accumulate,
                                                   __nv_bfloat16) {
  KVCORE_WGMMA_SS("bf16");
}
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, bool accumulate,
                                                   __half) {
  KVCORE_WGMMA_SS("f16");
}
#undef KVCORE_WGMMA_SS

// D[64 x 64] += A[64 x 16] B[16 x 64], A from registers (the mma.sync m16n8k16 A fragment of the
// warp's 16 rows), B MN-major in shared memory (transposed: its rows are K).
#define KVCORE_WGMMA_RS_TB(TYPE)                                                                                 \
  asm volatile(                                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                              \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " KVCORE_WGMMA_D32                          \
      ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                                            \
      : KVCORE_WGMMA_D32_OPERANDS(d)                                                                             \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))
__device__ __forceinline__ void wgmma_m64n64k16_rs_tb(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                                      __nv_bfloat16) {
  KVCORE_WGMMA_RS_TB("bf16");
}
__device__ __forceinline__ void wgmma_m64n64k16_rs_tb(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b,
                                                      __half) {
  KVCORE_WGMMA_RS_TB("f16");
}
#undef KVCORE_WGMMA_RS_TB
#undef KVCORE_WGMMA_D32_OPERANDS
#undef KVCORE_WGMMA_D32

#endif  // KVCORE_SM90A

// ---- proxies and barriers ------------------------------------------------------------------
// Declared for every target, since templates compiled for older GPUs name them too (gqa_decode's
// body, whose TMA form is only instantiated on sm_90a); the instructions that need sm_90 trap
// where they do not exist.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define KVCORE_SM90_ONLY(...) __trap()
#else
#define KVCORE_SM90_ONLY(...) __VA_ARGS__
#endif

// Orders this thread's generic-proxy shared-memory accesses (plain stores, cp.async) with its
// later async-proxy ones (wgmma operand reads).
__device__ __forceinline__ void fence_proxy_async_smem() {
  KVCORE_SM90_ONLY(asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"));
}

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(smem_u32(bar))
               : "memory");
}

// One arrival on `bar` once every cp.async this thread issued so far has landed (the barrier's
// expected count includes it: .noinc).
__device__ __forceinline__ void cp_async_mbarrier_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

// Waits until the phase with parity `parity` of `bar` has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  KVCORE_SM90_ONLY(asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory"));
}

// One arrival on `bar` that also adds `bytes` to the transaction count its phase waits for (the
// bytes the TMA loads completing on it will deliver).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  KVCORE_SM90_ONLY(asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
                                "r"(bytes)
                                : "memory"));
}

// TMA: the box of the 3-D tensor map `map` (a __grid_constant__ kernel parameter) at coordinates
// (c0, c1, c2), innermost first, into shared memory at `dst`; its bytes complete on `bar`.
__device__ __forceinline__ void tma_load_3d(void* dst, const void* map, int c0, int c1, int c2, uint64_t* bar) {
  KVCORE_SM90_ONLY(asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::
          "r"(smem_u32(dst)),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
      : "memory"));
}

// Makes this thread's mbarrier initialisations visible to the async proxy (TMA's complete_tx).
__device__ __forceinline__ void fence_mbarrier_init() {
  KVCORE_SM90_ONLY(asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"));
}

// Named barriers (ids 1..15; 0 is __syncthreads). `threads` counts every thread that takes part,
// arriving or waiting; a multiple of 32.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

#undef KVCORE_SM90_ONLY


}  // namespace kvcore
