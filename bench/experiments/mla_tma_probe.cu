// Can the MLA wgmma kernel's tiles come from TMA instead of cp.async? (issue 3; session 10's plan)
//
// mla_decode_wgmma_kernel keeps a 64-token tile of the paged latent cache ([pages, page_size,
// dk], dk = 576 bf16) in shared memory as 9 column chunks of 64 x 64 with the 128-byte swizzle
// (wgmma.cuh, swz128_offset): row r of a chunk at r * 128 bytes, its 16-byte pieces XOR-permuted
// by r % 8, chunks 1024-byte aligned. Today a whole warpgroup builds that with ~36 cp.async per
// thread per tile, after a block-table load per row; with TMA one thread issues a box of
// 64 columns x min(page_size, 64) rows per chunk and page, and the hardware applies the same
// swizzle. This probe checks the two claims that change rests on, on the GPU, without the kernel:
//   1. layout: TMA boxes written at chunk base + (page-in-tile x page_size) rows reproduce
//      swz128_offset's layout byte for byte (page sizes 16, 32, 64; a padded page stride; dk 576
//      and 512; columns past dk, which the tensor map's bounds fill with zeros);
//   2. rate: one issuing thread per CTA streams tiles (two 72 KB stages, 1 CTA per SM) at close
//      to copy bandwidth, next to 128 threads doing the same with cp.async as the kernel does.
//   nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/tma bench/experiments/mla_tma_probe.cu && /tmp/tma
// Prints one line per layout case (mismatching bytes: must be 0) and the streaming rates.
// Written in session 10 without a GPU (compiled only); run it first in session 11.
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_check.h"

constexpr int kTile = 64;       // tokens per tile (the kernel's TILE)
constexpr int kChunks = 9;      // 64-column chunks of a 576-wide row
constexpr int kThreads = 128;

// Element offset of (row, 8-element piece) in the tile buffer: the kernel's swz128_offset.
__host__ __device__ inline int swz(int row, int piece) {
  return (piece >> 3) * kTile * 64 + row * 64 + (((piece & 7) ^ (row & 7)) << 3);
}

__device__ inline uint32_t saddr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }
__device__ inline void mbar_init(uint64_t* b, uint32_t n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(saddr(b)), "r"(n) : "memory");
}
__device__ inline void mbar_expect_tx(uint64_t* b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(saddr(b)), "r"(bytes) : "memory");
}
__device__ inline void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(saddr(b)) : "memory");
}
__device__ inline void mbar_wait(uint64_t* b, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nW_%=:\nmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra W_%=;\n}" ::"r"(
          saddr(b)),
      "r"(parity)
      : "memory");
}
// One box of the 3-D map (column, row in page, page) into shared memory, completing on `bar`.
__device__ inline void tma_load(void* dst, const CUtensorMap* map, int col, int row, int page, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::
          "r"(saddr(dst)),
      "l"(map), "r"(col), "r"(row), "r"(page), "r"(saddr(bar))
      : "memory");
}

// Thread 0: every box of tile `tile` of the sequence whose pages are `bt`, into `dst`.
__device__ inline void issue_tile(unsigned short* dst, const CUtensorMap* map, const int* bt, int tile, int page_size,
                                  uint64_t* full) {
  const int rows = page_size < kTile ? page_size : kTile;
  const int pages = kTile / rows;
  mbar_expect_tx(full, uint32_t(kChunks * kTile * 64 * 2));
  for (int pg = 0; pg < pages; ++pg) {
    const int page = bt[(tile * kTile + pg * rows) / page_size];
    const int in_page = (tile * kTile + pg * rows) % page_size;  // 0 unless page_size > 64
    for (int c = 0; c < kChunks; ++c)
      tma_load(dst + c * kTile * 64 + pg * rows * 64, map, c * 64, in_page, page, full);
  }
}

// 1. Layout: CTA t loads tile t by TMA, then compares every element with the cache.
__global__ void check_layout(const __grid_constant__ CUtensorMap map, const unsigned short* cache, const int* bt,
                             int page_size, int64_t page_stride, int dk, unsigned long long* bad) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned short* tile = reinterpret_cast<unsigned short*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __shared__ uint64_t full;
  if (threadIdx.x == 0) {
    mbar_init(&full, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x == 0) issue_tile(tile, &map, bt, blockIdx.x, page_size, &full);
  mbar_wait(&full, 0);
  unsigned long long n = 0;
  for (int i = threadIdx.x; i < kTile * kChunks * 64; i += blockDim.x) {
    const int row = i / (kChunks * 64), col = i % (kChunks * 64);
    const int tok = blockIdx.x * kTile + row;
    const unsigned short want = col < dk ? cache[int64_t(bt[tok / page_size]) * page_stride + int64_t(tok % page_size) * dk + col] : 0;
    const unsigned short got = tile[swz(row, col >> 3) + (col & 7)];
    n += got != want;
  }
  if (n) atomicAdd(bad, n);
}

// 2a. Streaming by TMA: CTA b reads tiles b, b + grid, ... (two stages); thread 0 issues, every
// thread waits and touches one word of the tile (so the stage is "used"), then releases it.
__global__ void stream_tma(const __grid_constant__ CUtensorMap map, const int* bt, int page_size, int tiles,
                           unsigned* sink) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned short* base = reinterpret_cast<unsigned short*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __shared__ uint64_t full[2], empty[2];
  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], blockDim.x);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int stride = gridDim.x;
  int k = 0;
  if (threadIdx.x == 0)
    for (int s = 0; s < 2 && int(blockIdx.x) + s * stride < tiles; ++s)
      issue_tile(base + s * kTile * kChunks * 64, &map, bt, blockIdx.x + s * stride, page_size, &full[s]);
  unsigned acc = 0;
  for (int t = blockIdx.x; t < tiles; t += stride, ++k) {
    const int s = k & 1;
    mbar_wait(&full[s], (k >> 1) & 1);
    acc += base[s * kTile * kChunks * 64 + threadIdx.x * 64];
    mbar_arrive(&empty[s]);
    if (threadIdx.x == 0 && t + 2 * stride < tiles) {
      mbar_wait(&empty[s], (k >> 1) & 1);
      issue_tile(base + s * kTile * kChunks * 64, &map, bt, t + 2 * stride, page_size, &full[s]);
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;  // keeps the reads
}

// 2b. The same stream by cp.async from 128 threads (the kernel's way: 16 bytes per copy, rows
// split over the threads, one page lookup per row), two stages.
__global__ void stream_cpasync(const unsigned short* cache, const int* bt, int page_size, int64_t page_stride,
                               int tiles, unsigned* sink) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned short* base = reinterpret_cast<unsigned short*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  const int stride = gridDim.x;
  auto issue = [&](int t, int s) {
    unsigned short* dst = base + s * kTile * kChunks * 64;
    for (int i = threadIdx.x; i < kTile * kChunks * 8; i += blockDim.x) {
      const int row = i / (kChunks * 8), piece = i % (kChunks * 8);
      const int tok = t * kTile + row;
      const unsigned short* src = cache + int64_t(bt[tok / page_size]) * page_stride + int64_t(tok % page_size) * 576 + piece * 8;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(saddr(dst + swz(row, piece))), "l"(src)
                   : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  if (int(blockIdx.x) < tiles) issue(blockIdx.x, 0);
  if (int(blockIdx.x) + stride < tiles) issue(blockIdx.x + stride, 1);
  unsigned acc = 0;
  int k = 0;
  for (int t = blockIdx.x; t < tiles; t += stride, ++k) {
    const int s = k & 1;
    if (t + stride < tiles)
      asm volatile("cp.async.wait_group 1;" ::: "memory");
    else
      asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
    acc += base[s * kTile * kChunks * 64 + threadIdx.x * 64];
    __syncthreads();
    if (t + 2 * stride < tiles) issue(t + 2 * stride, s);
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

static PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q{};
  CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q));
  if (fn == nullptr || q != cudaDriverEntryPointSuccess) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled not found\n");
    std::exit(1);
  }
  return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
}

// The latent cache as a 3-D tensor (dk columns, page_size rows, pages), boxes of 64 columns x
// min(page_size, 64) rows x 1 page, 128-byte swizzle, out-of-bounds columns read as zero.
static CUtensorMap make_map(void* cache, int dk, int page_size, int64_t page_stride, int pages) {
  CUtensorMap m{};
  const cuuint64_t dims[3] = {cuuint64_t(dk), cuuint64_t(page_size), cuuint64_t(pages)};
  const cuuint64_t strides[2] = {cuuint64_t(dk) * 2, cuuint64_t(page_stride) * 2};  // bytes, dims 1 and 2
  const cuuint32_t box[3] = {64, cuuint32_t(page_size < kTile ? page_size : kTile), 1};
  const cuuint32_t elem[3] = {1, 1, 1};
  const CUresult r = encode_fn()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, cache, dims, strides, box, elem,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed (%d): dk %d page %d stride %lld\n", int(r), dk, page_size,
                 (long long)page_stride);
    std::exit(1);
  }
  return m;
}

struct Cache {
  unsigned short* d = nullptr;
  int* bt = nullptr;
  int pages = 0;
  int64_t page_stride = 0;
};

// `tokens` tokens of one long sequence on shuffled pages; elements random, non-zero.
static Cache make_cache(int tokens, int page_size, int dk, int pad, unsigned seed) {
  Cache c;
  c.pages = (tokens + page_size - 1) / page_size;
  c.page_stride = int64_t(page_size) * dk + pad;
  std::vector<unsigned short> h(size_t(c.pages) * c.page_stride);
  srand(seed);
  for (auto& x : h) x = (unsigned short)(1 + rand() % 65535);
  std::vector<int> bt(c.pages);
  for (int i = 0; i < c.pages; ++i) bt[i] = i;
  for (int i = c.pages - 1; i > 0; --i) std::swap(bt[i], bt[rand() % (i + 1)]);
  CUDA_CHECK(cudaMalloc(&c.d, h.size() * 2));
  CUDA_CHECK(cudaMemcpy(c.d, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMalloc(&c.bt, bt.size() * sizeof(int)));
  CUDA_CHECK(cudaMemcpy(c.bt, bt.data(), bt.size() * sizeof(int), cudaMemcpyHostToDevice));
  return c;
}

static void free_cache(Cache& c) {
  CUDA_CHECK(cudaFree(c.d));
  CUDA_CHECK(cudaFree(c.bt));
}

int main() {
  int dev = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const size_t tile_smem = size_t(kTile) * kChunks * 64 * 2;  // 73,728 bytes
  CUDA_CHECK(cudaFuncSetAttribute(check_layout, cudaFuncAttributeMaxDynamicSharedMemorySize, int(tile_smem + 1024)));
  CUDA_CHECK(cudaFuncSetAttribute(stream_tma, cudaFuncAttributeMaxDynamicSharedMemorySize, int(2 * tile_smem + 1024)));
  CUDA_CHECK(cudaFuncSetAttribute(stream_cpasync, cudaFuncAttributeMaxDynamicSharedMemorySize, int(2 * tile_smem + 1024)));
  unsigned long long* bad;
  unsigned* sink;
  CUDA_CHECK(cudaMalloc(&bad, sizeof(*bad)));
  CUDA_CHECK(cudaMalloc(&sink, sizeof(*sink)));

  // 1. Layout. pad: elements between pages beyond page_size x dk (a strided cache view), a
  // multiple of 8 (TMA wants 16-byte strides).
  struct L {
    int page_size, dk, pad;
  };
  const L cases[] = {{64, 576, 0}, {16, 576, 0}, {32, 576, 0}, {64, 576, 64}, {128, 576, 0}, {64, 512, 0}};
  for (const L& l : cases) {
    const int tiles = 24;
    Cache c = make_cache(tiles * kTile, l.page_size, l.dk, l.pad, 7);
    const CUtensorMap map = make_map(c.d, l.dk, l.page_size, c.page_stride, c.pages);
    CUDA_CHECK(cudaMemset(bad, 0, sizeof(*bad)));
    check_layout<<<tiles, kThreads, tile_smem + 1024>>>(map, c.d, c.bt, l.page_size, c.page_stride, l.dk, bad);
    CUDA_CHECK(cudaGetLastError());
    unsigned long long h = 0;
    CUDA_CHECK(cudaMemcpy(&h, bad, sizeof(h), cudaMemcpyDeviceToHost));
    std::printf("layout page %3d dk %d pad %2d: %llu mismatching elements of %d\n", l.page_size, l.dk, l.pad, h,
                tiles * kTile * kChunks * 64);
    free_cache(c);
  }

  // 2. Rate: 2 GiB-ish of latent tiles (page 64), 1 CTA per SM, against a device copy.
  const int tiles = 16384;  // 1.2 GB
  Cache c = make_cache(tiles * kTile, 64, 576, 0, 11);
  const CUtensorMap map = make_map(c.d, 576, 64, c.page_stride, c.pages);
  const double bytes = double(tiles) * kTile * 576 * 2;
  cudaEvent_t a, b;
  CUDA_CHECK(cudaEventCreate(&a));
  CUDA_CHECK(cudaEventCreate(&b));
  auto time_ms = [&](auto&& launch) {
    launch();
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<float> ms;
    for (int i = 0; i < 7; ++i) {
      CUDA_CHECK(cudaEventRecord(a));
      launch();
      CUDA_CHECK(cudaEventRecord(b));
      CUDA_CHECK(cudaEventSynchronize(b));
      float t = 0;
      CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return double(ms[ms.size() / 2]);
  };
  void* copy_dst;
  CUDA_CHECK(cudaMalloc(&copy_dst, size_t(bytes)));
  const double copy = time_ms([&] { CUDA_CHECK(cudaMemcpyAsync(copy_dst, c.d, size_t(bytes), cudaMemcpyDeviceToDevice)); });
  const double tma = time_ms([&] { stream_tma<<<sms, kThreads, 2 * tile_smem + 1024>>>(map, c.bt, 64, tiles, sink); });
  const double cpa =
      time_ms([&] { stream_cpasync<<<sms, kThreads, 2 * tile_smem + 1024>>>(c.d, c.bt, 64, c.page_stride, tiles, sink); });
  CUDA_CHECK(cudaGetLastError());
  const double copy_gbs = 2 * bytes / copy / 1e6;  // read + written
  std::printf("copy %.0f GB/s (read + written); stream %.0f MB of latent tiles, %d CTAs x 2 stages:\n", copy_gbs,
              bytes / 1e6, sms);
  std::printf("  TMA (1 issuing thread)  %.3f ms  %.0f GB/s  %.1f%% of copy\n", tma, bytes / tma / 1e6,
              100 * bytes / tma / 1e6 / copy_gbs);
  std::printf("  cp.async (128 threads)  %.3f ms  %.0f GB/s  %.1f%% of copy\n", cpa, bytes / cpa / 1e6,
              100 * bytes / cpa / 1e6 / copy_gbs);
  free_cache(c);
  return 0;
}
