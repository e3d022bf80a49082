// mla_decode's 64-head wgmma kernel: its split merge in the last CTA of each (sequence, head
// block) against the separate merge kernel, at forced split counts (session 31).
//
// Why: session 31's ragged_mla.py short rows (every sequence 256 keys in a 4096-token table,
// B1 H128) took 27.3 us at 2 splits and 28.8 at 4, where the last CTA merges, against 21.5 at one
// split and 17.5 at 8, where mla_merge_kernel does (kSeparateMergeSplits = 4): the in-kernel merge
// looked ~10 us slower than the separate one for the same tiles. One CTA reads every split's
// fp32 partial of its 64 heads (128 KB a split) with ~64 KB in flight, a latency-bound stream;
// the separate kernel reads them with a CTA per (head, sequence). This times both merges on the
// same decode kernel, nothing else changed, and checks that their outputs agree.
//
// Framework-free (no torch): build it here and carry it (bench/calls/s31_merge_ab.sh):
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a
//        -Icsrc/include -Ibench/experiments bench/experiments/mla_merge_ab.cu -o .exp/mla_merge_ab
//   (one command line)
//   .exp/mla_merge_ab B H KEYS TABLE_TOKENS SPLITS[,SPLITS...]
// Prints per split count the median time (CUDA events, L2 flushed by a 256 MB write before each
// call) of the decode with its in-kernel merge ("last CTA") and of the decode plus the merge
// kernel ("separate"), and the largest difference between the two outputs.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda_check.h"
#include "kvcore/mla_decode_wgmma.cuh"
#include "kvcore/split_range.h"

namespace {

using T = __nv_bfloat16;
using Cfg = kvcore::MlaDecodeWgmmaConfig<576, 512, true>;
constexpr int kDk = 576, kDv = 512, kPage = 64, kMaxSplits = 256;

__global__ void fill_random(T* x, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned h = unsigned(i) * 2654435761u ^ seed * 40503u;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    x[i] = __float2bfloat16(float(h & 0xffff) / 65536.f - 0.5f);
  }
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s B H KEYS TABLE_TOKENS SPLITS[,SPLITS...]\n", argv[0]);
    return 2;
  }
  const int B = std::atoi(argv[1]), H = std::atoi(argv[2]), keys = std::atoi(argv[3]);
  const int table_tokens = std::atoi(argv[4]);
  std::vector<int> counts;
  for (std::string item, rest = argv[5]; !rest.empty();) {
    const size_t comma = rest.find(',');
    item = rest.substr(0, comma);
    rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
    counts.push_back(std::atoi(item.c_str()));
  }
  if (B < 1 || H <= 32 || keys < 1 || keys > table_tokens || table_tokens % kPage != 0) {
    std::fprintf(stderr, "need B >= 1, H > 32 (the 64-head kernel), 1 <= KEYS <= TABLE_TOKENS, TABLE_TOKENS %% %d == 0\n",
                 kPage);
    return 2;
  }
  const int max_pages = table_tokens / kPage, num_pages = B * max_pages, head_blocks = (H + 63) / 64;

  T *cache, *q, *out_a, *out_b;
  CUDA_CHECK(cudaMalloc(&cache, size_t(num_pages) * kPage * kDk * sizeof(T)));
  CUDA_CHECK(cudaMalloc(&q, size_t(B) * H * kDk * sizeof(T)));
  CUDA_CHECK(cudaMalloc(&out_a, size_t(B) * H * kDv * sizeof(T)));
  CUDA_CHECK(cudaMalloc(&out_b, size_t(B) * H * kDv * sizeof(T)));
  fill_random<<<1024, 256>>>(cache, size_t(num_pages) * kPage * kDk, 1u);
  fill_random<<<64, 256>>>(q, size_t(B) * H * kDk, 2u);
  std::vector<int> table(num_pages);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(7));  // the bench's random page order
  std::vector<int> lens(B, keys);
  int *d_table, *d_lens;
  CUDA_CHECK(cudaMalloc(&d_table, table.size() * sizeof(int)));
  CUDA_CHECK(cudaMalloc(&d_lens, lens.size() * sizeof(int)));
  CUDA_CHECK(cudaMemcpy(d_table, table.data(), table.size() * sizeof(int), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d_lens, lens.data(), lens.size() * sizeof(int), cudaMemcpyHostToDevice));
  const int most = *std::max_element(counts.begin(), counts.end());
  const size_t pairs = size_t(B) * head_blocks;
  float *plse, *pout, *lse;
  unsigned* counters;
  CUDA_CHECK(cudaMalloc(&plse, pairs * most * Cfg::ROWS * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&pout, pairs * most * Cfg::ROWS * kDv * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&lse, size_t(B) * H * sizeof(float)));
  CUDA_CHECK(cudaMalloc(&counters, pairs * sizeof(unsigned)));
  CUDA_CHECK(cudaMemset(counters, 0, pairs * sizeof(unsigned)));  // each merging CTA resets its own
  char* flush;
  const size_t flush_bytes = size_t(256) << 20;
  CUDA_CHECK(cudaMalloc(&flush, flush_bytes));

  auto kernel = kvcore::mla_decode_wgmma_kernel<T, Cfg>;
  auto merge = kvcore::mla_merge_kernel<T, Cfg::ROWS, kMaxSplits>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Cfg::SMEM_BYTES)));

  kvcore::MlaDecodeParams p{};
  p.q = q;
  p.q_stride_b = int64_t(H) * kDk;
  p.q_stride_h = kDk;
  p.cache = cache;
  p.page_stride = int64_t(kPage) * kDk;
  p.block_table = d_table;
  p.seq_lens = d_lens;
  p.lse = lse;
  p.partial_out = pout;
  p.partial_lse = plse;
  p.counters = counters;
  p.num_heads = H;
  p.head_blocks = head_blocks;
  p.dk = kDk;
  p.dv = kDv;
  p.page_size = kPage;
  p.page_shift = 6;
  p.num_pages = num_pages;
  p.max_pages = max_pages;
  p.scale = 0.07f;

  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<T> host_a(size_t(B) * H * kDv), host_b(host_a.size());
  for (const int splits : counts) {
    if (splits < 2 || splits > kMaxSplits) {
      std::fprintf(stderr, "split counts must be 2..%d, got %d\n", kMaxSplits, splits);
      return 2;
    }
    p.num_splits = splits;
    p.split_tokens = int(kvcore::split_tokens_for(table_tokens, splits, Cfg::TILE));
    const dim3 grid(head_blocks, splits, B);
    float ms[2] = {0.f, 0.f};
    for (int separate = 0; separate < 2; ++separate) {
      p.merge_separately = separate;
      p.out = separate ? out_b : out_a;
      std::vector<float> times;
      for (int rep = 0; rep < 40; ++rep) {
        CUDA_CHECK(cudaMemsetAsync(flush, rep & 0xff, flush_bytes));
        CUDA_CHECK(cudaEventRecord(start));
        kernel<<<grid, Cfg::THREADS, Cfg::SMEM_BYTES>>>(p);
        if (separate) merge<<<dim3(unsigned(H), unsigned(B)), 128>>>(p);
        CUDA_CHECK(cudaEventRecord(stop));
        CUDA_CHECK(cudaEventSynchronize(stop));
        CUDA_CHECK(cudaGetLastError());
        float t = 0.f;
        CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
        if (rep >= 5) times.push_back(t);  // after warm-up
      }
      ms[separate] = median(times);
    }
    CUDA_CHECK(cudaMemcpy(host_a.data(), out_a, host_a.size() * sizeof(T), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(host_b.data(), out_b, host_b.size() * sizeof(T), cudaMemcpyDeviceToHost));
    float diff = 0.f, biggest = 0.f;
    for (size_t i = 0; i < host_a.size(); ++i) {
      const float a = __bfloat162float(host_a[i]), b = __bfloat162float(host_b[i]);
      diff = std::max(diff, std::fabs(a - b));
      biggest = std::max(biggest, std::fabs(a));
    }
    std::printf("B%d H%d keys %d table %d splits %d (%d tokens a split): last CTA %.1f us, separate %.1f us;"
                " outputs differ by at most %.2e (largest |out| %.2e)\n",
                B, H, keys, table_tokens, splits, kvcore::split_chunk(keys, splits, p.split_tokens, Cfg::TILE),
                ms[0] * 1e3f, ms[1] * 1e3f, diff, biggest);
  }
  return 0;
}
