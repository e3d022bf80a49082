// Small device helpers shared by kvcore's CUDA kernels: 16-byte vectors of bf16/fp16 and their
// conversion to float, cp.async, warp reductions. Framework-free (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace kvcore {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- 8 elements (16 bytes) of bf16/fp16 <-> 8 floats -------------------------------------------

__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8], __nv_bfloat16) {
  // bf16 is the top half of an fp32: shifting is the whole conversion.
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8], __half) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    *reinterpret_cast<uint32_t*>(&h) = w[i];
    const float2 v = __half22float2(h);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

__device__ __forceinline__ uint32_t pack2(float a, float b, __nv_bfloat16) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t pack2(float a, float b, __half) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  return make_uint4(pack2(f[0], f[1], T{}), pack2(f[2], f[3], T{}), pack2(f[4], f[5], T{}), pack2(f[6], f[7], T{}));
}

// ---- cp.async (Ampere+): 16-byte global->shared copies that bypass registers ------------------

// The L2 prefetch size of the 16-byte copies below (cp.async's .L2::NB qualifier: how many
// bytes around a miss L2 fetches from DRAM). The library is built with 128; an experiment may
// build with -DKVCORE_CP_ASYNC_L2_BYTES=64 or 256 (bench/calls/s20_call1.sh: the K/V rows are
// 256 contiguous bytes per head at D 128).
#ifndef KVCORE_CP_ASYNC_L2_BYTES
#define KVCORE_CP_ASYNC_L2_BYTES 128
#endif
#define KVCORE_STRINGIFY_(x) #x
#define KVCORE_STRINGIFY(x) KVCORE_STRINGIFY_(x)
#define KVCORE_CP_ASYNC_CG "cp.async.cg.shared.global.L2::" KVCORE_STRINGIFY(KVCORE_CP_ASYNC_L2_BYTES) "B"

// Copies 16 bytes, or writes 16 zero bytes when !valid (src is then not read, but must still be a
// legal address expression).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile(KVCORE_CP_ASYNC_CG " [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}

// cp_async_16 for a piece known to be in range (no source-size operand to compute), with the
// shared address already converted: callers that issue many pieces from one base add constant
// offsets to it.
__device__ __forceinline__ void cp_async_16_at(uint32_t smem_addr, const void* gmem) {
  asm volatile(KVCORE_CP_ASYNC_CG " [%0], [%1], 16;\n" ::"r"(smem_addr), "l"(gmem));
}

// 4 bytes (gmem and smem 4-byte aligned): for arrays whose 16-byte alignment depends on the data
// (a score row starting at an arbitrary key).
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- L2 eviction priority (sm_80+): a policy operand for .L2::cache_hint accesses -------------

enum L2Priority : int { kL2Normal = 0, kL2EvictLast = 1 };

// The policy descriptor for `priority` over every access that carries it (fraction 1.0).
__device__ __forceinline__ uint64_t l2_policy(int priority) {
  uint64_t policy;
  if (priority == kL2EvictLast) {
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  } else {
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(policy));
  }
  return policy;
}

__device__ __forceinline__ void st_global_hint(uint2* gmem, uint2 v, uint64_t policy) {
  asm volatile("st.global.L2::cache_hint.v2.b32 [%0], {%1, %2}, %3;\n" ::"l"(gmem), "r"(v.x), "r"(v.y), "l"(policy)
               : "memory");
}

// No "memory" clobber: for scratch this kernel only reads back after a fence and a barrier (both
// compiler barriers), so the compiler may keep scheduling shared-memory work around the store.
__device__ __forceinline__ void st_global_hint(uint32_t* gmem, uint32_t v, uint64_t policy) {
  asm volatile("st.global.L2::cache_hint.b32 [%0], %1, %2;\n" ::"l"(gmem), "r"(v), "l"(policy));
}

__device__ __forceinline__ void st_global_hint(float* gmem, float v, uint64_t policy) {
  asm volatile("st.global.L2::cache_hint.f32 [%0], %1, %2;\n" ::"l"(gmem), "f"(v), "l"(policy) : "memory");
}

// Load that bypasses L1 (as __ldcg) with an L2 policy.
__device__ __forceinline__ uint2 ldcg_hint(const uint2* gmem, uint64_t policy) {
  uint2 v;
  asm volatile("ld.global.cg.L2::cache_hint.v2.b32 {%0, %1}, [%2], %3;\n" : "=r"(v.x), "=r"(v.y) : "l"(gmem), "l"(policy)
               : "memory");
  return v;
}

__device__ __forceinline__ uint4 ldcg_hint(const uint4* gmem, uint64_t policy) {
  uint4 v;
  asm volatile("ld.global.cg.L2::cache_hint.v4.b32 {%0, %1, %2, %3}, [%4], %5;\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(gmem), "l"(policy)
               : "memory");
  return v;
}

__device__ __forceinline__ float ldcg_hint(const float* gmem, uint64_t policy) {
  float v;
  asm volatile("ld.global.cg.L2::cache_hint.f32 %0, [%1], %2;\n" : "=f"(v) : "l"(gmem), "l"(policy) : "memory");
  return v;
}

// Asks L2 to fetch [gmem, gmem + bytes) without waiting for it (sm_90's bulk prefetch; nothing
// before sm_90). gmem 16-byte aligned, bytes a multiple of 16.
__device__ __forceinline__ void prefetch_l2_bulk(const void* gmem, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(gmem), "r"(bytes) : "memory");
#endif
}

// Programmatic dependent launch (sm_90; nothing before): let the next grid on the stream, when it
// was launched with the programmatic serialization attribute, start before this one ends; and, in
// such a grid, wait for the grid ahead to complete with its writes visible.
__device__ __forceinline__ void grid_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// ---- inter-CTA flags ---------------------------------------------------------------------------

// A GPU-scope acquire load: what the CTA that released the value (a __threadfence before its
// atomic) wrote before it is visible to this thread afterwards (and, after a barrier, to its CTA).
__device__ __forceinline__ unsigned ld_acquire_gpu(const unsigned* gmem) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(gmem) : "memory");
  return v;
}

// atomicAdd with acquire-release semantics at GPU scope: the writes ordered before it (this
// thread's, and other threads' through a CTA barrier before it) are visible to whoever observes
// the new count, and reads after it (after a CTA barrier, for other threads) see what the
// earlier arrivals published. One instruction instead of a fence per thread plus a relaxed atomic.
__device__ __forceinline__ unsigned atomic_add_acq_rel_gpu(unsigned* gmem, unsigned v) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;\n" : "=r"(old) : "l"(gmem), "r"(v) : "memory");
  return old;
}

// ---- warp reductions over aligned lane groups -------------------------------------------------

// Sum over the WIDTH lanes of an aligned lane group (WIDTH a power of two <= 32); every lane of
// the group gets the result.
template <int WIDTH>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

}  // namespace kvcore

namespace kvcore {

// ---- tensor-core fragments (sm_80+: ldmatrix, mma.sync m16n8k16, fp32 accumulate) -------------

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// d += a (16x16, row-major) * b (16x8, column-major), fp32 accumulators.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                          __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- online softmax over a warp's 16-key mma tile ------------------------------------------------
// The S accumulator of m16n8k16 (two n-tiles) s[nt][i] holds row r0 + 8 * (i / 2) (r0 = lane / 4)
// and key nt * 8 + (lane % 4) * 2 + i % 2 of the warp's 16 (gqa_decode, its page-major form and
// the token decoder).

// Online-softmax update of a scaled, masked (-inf) S tile: per row half r the new running max
// m[r], the factor alpha[r] that scales the old state, the tile's base (the max, or 0 while
// nothing has been seen, to keep exp2 finite; the H2O score path stores it beside P), P =
// exp2(S - base) in place, and the lane's partial row sum in l[r] (summed over the quad at the end).
__device__ __forceinline__ void tile_softmax_update(float (&s)[2][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                                    float (&base)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    mx = fmaxf(mx, m[r]);
    base[r] = mx == -INFINITY ? 0.f : mx;
    alpha[r] = exp2f(m[r] - base[r]);
    m[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        s[nt][2 * r + j] = exp2f(s[nt][2 * r + j] - base[r]);
        sum += s[nt][2 * r + j];
      }
    l[r] = l[r] * alpha[r] + sum;
  }
}

// o *= alpha per row half before a tile's P V (o[n][0..1]: row r0, o[n][2..3]: row r0 + 8).
template <int N>
__device__ __forceinline__ void tile_rescale(float (&o)[N][4], const float (&alpha)[2]) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
    o[n][0] *= alpha[0];
    o[n][1] *= alpha[0];
    o[n][2] *= alpha[1];
    o[n][3] *= alpha[1];
  }
}

// P (the S accumulator after tile_softmax_update) re-packed as the A fragment of the k16 P V
// step: pa[0] = (r0, keys cpair..+1), pa[1] = (r0 + 8, same), pa[2] = (r0, keys 8 + cpair..+1),
// pa[3] = (r0 + 8, same).
template <typename T>
__device__ __forceinline__ void tile_pack_p(uint32_t (&pa)[4], const float (&s)[2][4]) {
  pa[0] = pack2(s[0][0], s[0][1], T{});
  pa[1] = pack2(s[0][2], s[0][3], T{});
  pa[2] = pack2(s[1][0], s[1][1], T{});
  pa[3] = pack2(s[1][2], s[1][3], T{});
}

}  // namespace kvcore
