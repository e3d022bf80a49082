// The ORDER kernels' page sort alone (kvcore/gqa_decode.cuh: load_order_entries + sort_split_pages),
// checked against std::sort and timed per CTA with clock64, for kernel work on the sort.
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc/include \
//        bench/experiments/order_sort_check.cu -o /tmp/order_sort_check
//   /tmp/order_sort_check [CTAS]
// For 128 and 256 threads a CTA and splits of 20, 64, 200, 496 and 512 pages (first = 16 of them
// kept in the table's order, as the 8-warp kernel's two stages of 128 tokens at page 16 do): each CTA
// sorts its own random row of a block table over 8192 cache pages (and one in-order row, to time
// the already-ascending exit), and the list must hold the split's pages after `first`, ascending by
// cache page, pads after them. Prints the median and max cycles a CTA spent from its loads to the
// list's last barrier.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda_check.h"
#include "kvcore/gqa_decode.cuh"

template <int THREADS>
__global__ void __launch_bounds__(THREADS) sort_kernel(const int* table, int width, int first, int count,
                                                       int num_pages, uint32_t* lists, long long* cycles) {
  __shared__ uint32_t scratch[2 * kvcore::kOrderMaxPages];
  __shared__ uint32_t list[kvcore::kOrderMaxPages];
  const int* bt = table + size_t(blockIdx.x) * width;
  int raw[kvcore::kOrderMaxPages / THREADS];
  __syncthreads();
  const long long t0 = clock64();
  kvcore::load_order_entries<THREADS>(raw, bt, first, width, true);
  kvcore::sort_split_pages<THREADS>(raw, first, count, num_pages, scratch, list);
  const long long t1 = clock64();
  for (int i = threadIdx.x; i < kvcore::kOrderMaxPages; i += THREADS)
    lists[size_t(blockIdx.x) * kvcore::kOrderMaxPages + i] = list[i];
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

template <int THREADS>
bool run(int ctas, int count, bool in_order) {
  const int num_pages = 8192, width = count, first = std::min(16, count);
  std::mt19937 rng(1234 + count * 7 + THREADS + in_order);
  std::vector<int> table(size_t(ctas) * width);
  std::vector<int> perm(num_pages);
  for (int c = 0; c < ctas; ++c) {
    for (int i = 0; i < num_pages; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    if (in_order) std::sort(perm.begin(), perm.begin() + width);
    std::copy(perm.begin(), perm.begin() + width, table.begin() + size_t(c) * width);
  }
  int* d_table;
  uint32_t* d_lists;
  long long* d_cycles;
  CUDA_CHECK(cudaMalloc(&d_table, table.size() * 4));
  CUDA_CHECK(cudaMalloc(&d_lists, size_t(ctas) * kvcore::kOrderMaxPages * 4));
  CUDA_CHECK(cudaMalloc(&d_cycles, ctas * 8));
  CUDA_CHECK(cudaMemcpy(d_table, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemset(d_lists, 0x5a, size_t(ctas) * kvcore::kOrderMaxPages * 4));  // poisoned
  std::vector<long long> med;
  std::vector<long long> cycles(ctas);
  for (int rep = 0; rep < 5; ++rep) {
    sort_kernel<THREADS><<<ctas, THREADS>>>(d_table, width, first, count, num_pages, d_lists, d_cycles);
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaMemcpy(cycles.data(), d_cycles, ctas * 8, cudaMemcpyDeviceToHost));
    std::sort(cycles.begin(), cycles.end());
    med.push_back(cycles[ctas / 2]);
  }
  std::vector<uint32_t> lists(size_t(ctas) * kvcore::kOrderMaxPages);
  CUDA_CHECK(cudaMemcpy(lists.data(), d_lists, lists.size() * 4, cudaMemcpyDeviceToHost));
  int bad = 0;
  for (int c = 0; c < ctas; ++c) {
    std::vector<uint32_t> want;
    for (int j = first; j < count; ++j)
      want.push_back(uint32_t(table[size_t(c) * width + j]) << kvcore::kOrderIndexBits | uint32_t(j));
    std::sort(want.begin(), want.end());
    want.resize(kvcore::kOrderMaxPages, 0xFFFFFFFFu);
    if (!std::equal(want.begin(), want.end(), lists.begin() + size_t(c) * kvcore::kOrderMaxPages)) ++bad;
  }
  std::sort(med.begin(), med.end());
  std::printf("THREADS %3d pages %3d %-8s: %s (%d of %d CTAs wrong); cycles a CTA: median %lld (median of 5 launches), max %lld\n",
              THREADS, count, in_order ? "in-order" : "random", bad ? "MISMATCH" : "sorted", bad, ctas, med[2],
              cycles.back());
  CUDA_CHECK(cudaFree(d_table));
  CUDA_CHECK(cudaFree(d_lists));
  CUDA_CHECK(cudaFree(d_cycles));
  return bad == 0;
}

int main(int argc, char** argv) {
  const int ctas = argc > 1 ? std::atoi(argv[1]) : 132;
  bool ok = true;
  for (bool in_order : {false, true})
    for (int count : {20, 64, 200, 496, 512}) {
      ok &= run<128>(ctas, count, in_order);
      ok &= run<256>(ctas, count, in_order);
    }
  std::printf("%s\n", ok ? "all sorted" : "MISMATCH");
  return ok ? 0 : 1;
}
