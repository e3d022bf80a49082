// Standalone timing and per-CTA trace of the gqa_decode kernel, without torch, for kernel work.
//   nvcc -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -Icsrc/include bench/experiments/decode_trace.cu -o /tmp/decode_trace
//   /tmp/decode_trace B S SPLITS [Hq Hkv PAGE STAGES GRAIN]
// Prints the median time (CUDA events, L2 flushed by a 256 MB read before each call), the rate
// over the K/V bytes, and from one traced call the distribution of each CTA's phases
// (%globaltimer): entry skew, first copies issued, first-tile latency, main loop, epilogue
// (incl. the split merge), the merging CTAs' part, and the loop ends by CTAs per SM.
// TRACE_CSV=path also writes each CTA's stamps (and SM) as CSV. KV_LAYOUT=separate|adjacent|gapN
// places V relative to K (pagepair: one [pages, 2, PAGE, Hkv, D] allocation, each page's V right
// after its K, FlashInfer's paged layout). TABLE=random|seq|rowsorted|clusterN|shuffleN
// picks the block table's page order (default random); CLUSTER=n launches the KV heads of a
// split as thread-block clusters of n CTAs. A plain read of the same pages through the table
// (whole pages, one CTA each) and one in the kernel's pattern (a CTA per KV head and split) are
// timed next to the one-shot read.
// GRAIN (tokens, default the tile; a divisor of it): a split's length is rounded up to a multiple of it. The
// kernel is the library's page-group instance for the page size (SPP, as the launcher picks it).
// The output is checked against a one-split call of the same kernel.
// ORDER=1 times the kernel that visits each split's pages in cache order (gqa_decode_body's ORDER);
// ORDER_SKIP_SORT=1 runs it without its sort.
// PAGE_MAJOR=H:N[,H:N...] (D 128, page 16) also times the page-major kernel
// (kvcore/gqa_decode_page_major.cuh) with H KV heads a CTA (2, 4 or 8) and N splits, on the same
// inputs, checked against that output; with PM_ORDER=1 each entry in table order and then in
// cache order (its ORDER instance, 3-stage entries only).
#define KVCORE_DECODE_TRACE
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <numeric>
#include <random>
#include <vector>

#include "kvcore/gqa_decode.cuh"
#include "kvcore/gqa_decode_page_major.cuh"

#include "cuda_check.h"

using bf16 = __nv_bfloat16;

#ifndef TRACE_WARPS
#define TRACE_WARPS 4  // warps per CTA (GqaDecodeConfig's WARPS: a tile is 16 tokens per warp)
#endif

__global__ void fill_random(bf16* x, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned h = unsigned(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = __float2bfloat16((h & 0xffff) / 32768.f - 1.f);
  }
}

__global__ void read_all(const int4* buf, size_t n, int* sink) {
  int acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const int4 v = buf[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678) *sink = acc;  // keeps the loads alive
}

// One-shot read: every CTA reads 16 KB once (the shape of the best plain reads in
// bench/experiments/read_ceiling.py: thousands of small CTAs handed out by the hardware).
__global__ void read_oneshot(const int4* buf, size_t n, int* sink) {
  const size_t i0 = blockIdx.x * size_t(1024) + threadIdx.x;
  int4 v[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = i0 + j * 256 < n ? buf[i0 + j * 256] : make_int4(0, 0, 0, 0);
  int acc = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
  if (acc == 0x12345678) *sink = acc;
}

// Plain read through the block table: CTA i reads page table[i] of K and of V whole (all heads),
// as one contiguous run each, so its time against the one-shot read shows what the page order
// alone costs a reader that does nothing else.
// pair: 2 when a page's K and V lie side by side (KV_LAYOUT pagepair), so pages are 2 * page_vecs apart.
__global__ void read_paged(const int4* k, const int4* v, const int* table, int page_vecs, int pair, int* sink) {
  const int64_t page = table[blockIdx.x];
  int acc = 0;
  for (int i = threadIdx.x; i < page_vecs; i += blockDim.x) {
    const int4 a = k[page * pair * page_vecs + i], c = v[page * pair * page_vecs + i];
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ c.x ^ c.y ^ c.z ^ c.w;
  }
  if (acc == 0x12345678) *sink = acc;
}

// Plain read in the decode kernel's pattern: a CTA per (KV head, split, sequence), 128 threads,
// reading its head's 256-byte rows (2 KB apart at Hkv 8) of its split's tokens through the table,
// 128 tokens of K and V (64 KB; the kernel's ring holds 96 KB) a step, all of a step's loads
// issued before any is used. Against read_paged (whole pages, all heads a CTA) in one table order
// and another, it tells whether what the page order costs the kernel (session 17: B16 127.3 us
// random against 125.5 sequential, while read_paged does not care) comes from the per-head rows
// or from the kernel itself.
__global__ void read_paged_heads(const int4* k, const int4* v, const int* table, int pages_per_seq, int page,
                                 int hkv, int seq_len, int split_tokens, int pair, int* sink) {
  constexpr int kRowVecs = 128 * 2 / 16;  // D 128 bf16: 16 int4 a row
  constexpr int kRowsPerStep = 128;
  const int h = blockIdx.x, b = blockIdx.z;
  const int t0 = blockIdx.y * split_tokens, t1 = min(seq_len, t0 + split_tokens);
  const int lane_vec = threadIdx.x % kRowVecs, row0 = threadIdx.x / kRowVecs;  // 8 rows a pass
  const int* rowtab = table + size_t(b) * pages_per_seq;
  int acc = 0;
  for (int t = t0; t < t1; t += kRowsPerStep) {
    int4 a[kRowsPerStep / 8], c[kRowsPerStep / 8];
#pragma unroll
    for (int j = 0; j < kRowsPerStep / 8; ++j) {
      const int tok = t + row0 + 8 * j;
      if (tok < t1) {
        const int64_t row = (int64_t(rowtab[tok / page]) * pair * page + tok % page) * hkv + h;
        a[j] = __ldcg(k + row * kRowVecs + lane_vec);
        c[j] = __ldcg(v + row * kRowVecs + lane_vec);
      } else {
        a[j] = c[j] = make_int4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int j = 0; j < kRowsPerStep / 8; ++j) acc ^= a[j].x ^ a[j].y ^ a[j].z ^ a[j].w ^ c[j].x ^ c[j].y ^ c[j].z ^ c[j].w;
  }
  if (acc == 0x12345678) *sink = acc;
}

__global__ void empty_kernel() {}

static double pct(std::vector<double> v, double q) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, size_t(q * (v.size() - 1) + 0.5))];
}

// bf16 outputs on the host: their bits, a value, and the largest elementwise difference of two
// outputs (a NaN on either side, e.g. an element the kernel left poisoned, counts as infinite).
static std::vector<uint16_t> to_host(const bf16* d, size_t n) {
  std::vector<uint16_t> h(n);
  CUDA_CHECK(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost));
  return h;
}
static float bf16_value(uint16_t x) {
  const uint32_t u = uint32_t(x) << 16;
  float y;
  std::memcpy(&y, &u, 4);
  return y;
}
static double max_abs_diff(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(bf16_value(a[i])) - bf16_value(b[i]));
    worst = std::isnan(d) ? INFINITY : std::max(worst, d);
  }
  return worst;
}

// PAGE_MAJOR: the page-major kernel (kvcore/gqa_decode_page_major.cuh) for each "HEADS:SPLITS"
// entry of `spec`, on the inputs of `p` (its table, lengths, q and caches), its output poisoned
// before the checked call and compared with the one-split gqa_decode output `ref`.
template <int HEADS, int STAGES = 3, bool ORDER = false>
static void page_major_case(const kvcore::GqaDecodeParams& p, int B, int S, int Hq, int splits, const bf16* ref,
                            const std::function<double(std::function<void()>, int)>& time_it, double bytes) {
  using Cfg = kvcore::PageMajorConfig<HEADS, STAGES>;
  const int Hkv = p.num_kv_heads, group = p.group, D = Cfg::D;
  if (p.page_size % Cfg::STAGE_TOKENS != 0 || Hkv % HEADS != 0 || group > 16 || splits < 1 || splits > 256) {
    std::printf("page-major H%d splits %d: not run (pages of 16k tokens, Hkv a multiple of H, group <= 16, 1-256 splits)\n",
                HEADS, splits);
    return;
  }
  const int split_len = ((S + splits - 1) / splits + Cfg::STAGE_TOKENS - 1) / Cfg::STAGE_TOKENS * Cfg::STAGE_TOKENS;
  const int ns = (S + split_len - 1) / split_len;
  const size_t blocks = size_t(B) * (Hkv / HEADS);
  kvcore::GqaDecodeParams q = p;
  q.num_splits = ns;
  q.split_tokens = split_len;
  q.lse = nullptr;
  q.trace = nullptr;
  CUDA_CHECK(cudaMalloc(&q.out, size_t(B) * Hq * D * 2));
  CUDA_CHECK(cudaMalloc(&q.partial_out, blocks * ns * HEADS * group * D * 4));
  CUDA_CHECK(cudaMalloc(&q.partial_lse, blocks * ns * HEADS * group * 4));
  CUDA_CHECK(cudaMalloc(&q.counters, blocks * 4));
  CUDA_CHECK(cudaMemset(q.counters, 0, blocks * 4));
  if (ORDER && (p.page_size != Cfg::STAGE_TOKENS || split_len / Cfg::STAGE_TOKENS > kvcore::kOrderMaxPages)) {
    std::printf("page-major H%d ORDER: pages of 16 tokens, at most %d a split: not run\n", HEADS, kvcore::kOrderMaxPages);
    return;
  }
  auto kernel = kvcore::gqa_decode_page_major_kernel<bf16, Cfg, ORDER>;
  const size_t smem = Cfg::smem_bytes(ORDER);
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int per_sm = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Cfg::THREADS, smem));
  const dim3 grid(Hkv / HEADS, ns, B);
  CUDA_CHECK(cudaMemset(q.out, 0xff, size_t(B) * Hq * D * 2));  // poison: NaN in bf16
  kernel<<<grid, Cfg::THREADS, smem>>>(q);
  CUDA_CHECK(cudaDeviceSynchronize());
  const size_t n_out = size_t(B) * Hq * D;
  const double worst = max_abs_diff(to_host(static_cast<const bf16*>(q.out), n_out), to_host(ref, n_out));
  const double us = time_it([&] { kernel<<<grid, Cfg::THREADS, smem>>>(q); }, 50);
  CUDA_CHECK(cudaGetLastError());
  const char* order = ORDER ? " ORDER" : "";
  std::printf("check: page-major%s H%d %d stages max |out - one-split gqa_decode out| = %.3g%s\n", order, HEADS, STAGES,
              worst, worst < 2e-2 ? "" : "  <-- MISMATCH");
  std::printf("B%d S%d page-major%s H%d %d stages: %d splits x %d tokens, %d CTAs/SM, %zu CTAs, %.1f us, %.0f GB/s over K/V\n",
              B, S, order, HEADS, STAGES, ns, split_len, per_sm, blocks * ns, us, bytes / us * 1e-3);
  CUDA_CHECK(cudaFree(q.out));
  CUDA_CHECK(cudaFree(q.partial_out));
  CUDA_CHECK(cudaFree(q.partial_lse));
  CUDA_CHECK(cudaFree(q.counters));
}

static void time_page_major(const char* spec, const kvcore::GqaDecodeParams& p, int B, int S, int Hq, const bf16* ref,
                            const std::function<double(std::function<void()>, int)>& time_it, double bytes) {
  const bool pm_order = std::getenv("PM_ORDER") && std::atoi(std::getenv("PM_ORDER")) != 0;
  for (const char* c = spec; *c != '\0';) {
    // HEADS:SPLITS, or HEADS:SPLITS:STAGES for the one other ring depth built (4 heads, 6
    // stages: 192 KB, one CTA of 4 warps per SM, 160 KB in flight).
    int heads = 0, splits = 0, stages = 3, used = 0;
    if (std::sscanf(c, "%d:%d%n", &heads, &splits, &used) != 2) {
      std::fprintf(stderr, "PAGE_MAJOR: expected HEADS:SPLITS[:STAGES][,...], got \"%s\"\n", spec);
      std::exit(2);
    }
    int more = 0;
    if (c[used] == ':' && std::sscanf(c + used, ":%d%n", &stages, &more) == 1) used += more;
    if (stages == 3 && heads == 2) {
      page_major_case<2>(p, B, S, Hq, splits, ref, time_it, bytes);
      if (pm_order) page_major_case<2, 3, true>(p, B, S, Hq, splits, ref, time_it, bytes);
    } else if (stages == 3 && heads == 4) {
      page_major_case<4>(p, B, S, Hq, splits, ref, time_it, bytes);
      if (pm_order) page_major_case<4, 3, true>(p, B, S, Hq, splits, ref, time_it, bytes);
    } else if (stages == 3 && heads == 8) {
      page_major_case<8>(p, B, S, Hq, splits, ref, time_it, bytes);
      if (pm_order) page_major_case<8, 3, true>(p, B, S, Hq, splits, ref, time_it, bytes);
    }
    else if (stages == 6 && heads == 4)
      page_major_case<4, 6>(p, B, S, Hq, splits, ref, time_it, bytes);
    else
      std::printf("page-major: built for HEADS 2, 4, 8 with 3 stages and 4 with 6, got %d with %d\n", heads, stages);
    c += used;
    if (*c == ',') ++c;
  }
}

template <int STAGES, int SPP>
int run(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s B S SPLITS [Hq Hkv PAGE STAGES GRAIN]\n", argv[0]);
    return 2;
  }
  const int B = std::atoi(argv[1]), S = std::atoi(argv[2]), splits = std::atoi(argv[3]);
  const int Hq = argc > 4 ? std::atoi(argv[4]) : 32, Hkv = argc > 5 ? std::atoi(argv[5]) : 8;
  constexpr int D = 128;
  const int PAGE = argc > 6 ? std::atoi(argv[6]) : 16;
  using Cfg = kvcore::GqaDecodeConfig<D, STAGES, TRACE_WARPS>;
  const int grain = argc > 8 && std::atoi(argv[8]) > 0 ? std::atoi(argv[8]) : Cfg::TILE;
  // The kernel cuts each split at min(split_tokens, its own TILE-rounded share) (split_range.h),
  // so a grain coarser than the tile would not be what runs.
  if (grain > Cfg::TILE || Cfg::TILE % grain != 0) {
    std::fprintf(stderr, "GRAIN must divide the tile (%d)\n", Cfg::TILE);
    return 2;
  }
  const int pages_per_seq = (S + PAGE - 1) / PAGE, num_pages = B * pages_per_seq;
  const size_t cache_elems = size_t(num_pages) * PAGE * Hkv * D;

  bf16 *k, *v, *q, *out;
  // KV_LAYOUT (env): separate (default: two allocations, placed by the driver), adjacent (one
  // allocation, V right after K, as torch's caching allocator tends to put two 64 MB caches), or
  // gapN (V N bytes after K's end, rounded up to 256): does K and V's distance matter to DRAM?
  // pagepair: [pages, 2, PAGE, Hkv, D], a page's K and V one 2 * PAGE * Hkv * D run, so a random
  // table scatters 64 KB runs (page 16, Hkv 8, D 128) instead of twice as many 32 KB ones.
  const char* kv_layout = std::getenv("KV_LAYOUT") ? std::getenv("KV_LAYOUT") : "separate";
  const int pair = std::strcmp(kv_layout, "pagepair") == 0 ? 2 : 1;
  if (pair == 2) {
    CUDA_CHECK(cudaMalloc(&k, cache_elems * 2 * 2));
    v = k + size_t(PAGE) * Hkv * D;
  } else if (std::strcmp(kv_layout, "adjacent") == 0 || std::strncmp(kv_layout, "gap", 3) == 0) {
    size_t gap = std::strncmp(kv_layout, "gap", 3) == 0 ? std::strtoull(kv_layout + 3, nullptr, 10) : 0;
    gap = (gap + 255) / 256 * 256;
    CUDA_CHECK(cudaMalloc(&k, cache_elems * 2 * 2 + gap));
    v = k + cache_elems + gap / 2;
  } else {
    CUDA_CHECK(cudaMalloc(&k, cache_elems * 2));
    CUDA_CHECK(cudaMalloc(&v, cache_elems * 2));
  }
  std::printf("KV_LAYOUT %s: V - K = %lld bytes\n", kv_layout,
              static_cast<long long>(reinterpret_cast<const char*>(v) - reinterpret_cast<const char*>(k)));
  CUDA_CHECK(cudaMalloc(&q, size_t(B) * Hq * D * 2));
  CUDA_CHECK(cudaMalloc(&out, size_t(B) * Hq * D * 2));
  bf16* out_ref;
  CUDA_CHECK(cudaMalloc(&out_ref, size_t(B) * Hq * D * 2));
  if (pair == 2) {
    fill_random<<<1024, 256>>>(k, 2 * cache_elems, 1u);
  } else {
    fill_random<<<1024, 256>>>(k, cache_elems, 1u);
    fill_random<<<1024, 256>>>(v, cache_elems, 2u);
  }
  fill_random<<<64, 256>>>(q, size_t(B) * Hq * D, 3u);
  std::vector<int> table(num_pages), lens(B, S);
  // TABLE (env): random (default: a permutation of all pages), seq (each sequence's pages in
  // order), rowsorted (the random pages, each row sorted), clusterN (runs of N consecutive pages
  // in random order), shuffleN (the pages of each aligned block of N in random order, the blocks
  // in order: shuffle64 keeps each 2 MB region of K (pages of 32 KB) together and in place while
  // the order inside it is random, the complement of cluster64).
  const char* table_kind = std::getenv("TABLE") ? std::getenv("TABLE") : "random";
  std::iota(table.begin(), table.end(), 0);
  if (std::strncmp(table_kind, "shuffle", 7) == 0) {
    const int block = std::max(1, std::atoi(table_kind + 7));
    std::mt19937 rng(7);
    for (int first = 0; first < num_pages; first += block)
      std::shuffle(table.begin() + first, table.begin() + std::min(num_pages, first + block), rng);
  } else if (std::strncmp(table_kind, "cluster", 7) == 0) {
    const int run = std::max(1, std::atoi(table_kind + 7));
    std::vector<int> runs((num_pages + run - 1) / run);
    std::iota(runs.begin(), runs.end(), 0);
    std::shuffle(runs.begin(), runs.end(), std::mt19937(7));
    size_t n = 0;
    for (int r : runs)
      for (int i = r * run; i < std::min(num_pages, (r + 1) * run); ++i) table[n++] = i;
  } else if (std::strcmp(table_kind, "seq") != 0) {
    std::shuffle(table.begin(), table.end(), std::mt19937(7));
    if (std::strcmp(table_kind, "rowsorted") == 0)
      for (int bb = 0; bb < B; ++bb) std::sort(table.begin() + size_t(bb) * pages_per_seq, table.begin() + size_t(bb + 1) * pages_per_seq);
  }
  int *d_table, *d_lens;
  CUDA_CHECK(cudaMalloc(&d_table, table.size() * 4));
  CUDA_CHECK(cudaMalloc(&d_lens, lens.size() * 4));
  CUDA_CHECK(cudaMemcpy(d_table, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d_lens, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice));

  const int group = Hq / Hkv;
  const size_t pairs = size_t(B) * Hkv;
  unsigned* counters;
  float *plse, *pout;
  CUDA_CHECK(cudaMalloc(&counters, pairs * 4));
  CUDA_CHECK(cudaMemset(counters, 0, pairs * 4));
  const int split_tokens = (S + splits - 1) / splits;
  const int split_len = (split_tokens + grain - 1) / grain * grain;
  const int total_splits = (S + split_len - 1) / split_len;
  CUDA_CHECK(cudaMalloc(&plse, pairs * total_splits * group * 4));
  CUDA_CHECK(cudaMalloc(&pout, pairs * total_splits * group * D * 4));

  kvcore::GqaDecodeParams p{};
  p.q = q;
  p.q_stride_b = int64_t(Hq) * D;
  p.q_stride_h = D;
  p.k_cache = k;
  p.v_cache = v;
  p.k_page_stride = p.v_page_stride = int64_t(pair) * PAGE * Hkv * D;
  p.block_table = d_table;
  p.seq_lens = d_lens;
  p.out = out;
  p.partial_out = pout;
  p.partial_lse = plse;
  p.counters = counters;
  p.num_kv_heads = Hkv;
  p.group = group;
  p.page_size = PAGE;
  p.page_shift = __builtin_ctz(PAGE);
  p.num_pages = num_pages;
  p.max_pages = pages_per_seq;
  p.split_tokens = split_len;
  p.num_splits = total_splits;
  p.dedup_pages = 1;
  p.window_left = -1;
  p.scale = 0.08838834764831845f;
  p.soft_cap = 0.f;

  // ORDER=1 (env): the kernel that visits each split's pages in cache order (the library's ORDER
  // instance; a split of at most kvcore::kOrderMaxPages pages); the reference stays the plain one.
  const bool order = std::getenv("ORDER") && std::atoi(std::getenv("ORDER")) != 0;
  // ORDER_SKIP_SORT=1 (env): the ORDER kernel without its sort (its list in the table's order;
  // the library's KVCORE_DECODE_PAGE_ORDER=unsorted).
  p.order_skip_sort = std::getenv("ORDER_SKIP_SORT") && std::atoi(std::getenv("ORDER_SKIP_SORT")) != 0;
  auto plain = kvcore::gqa_decode_kernel<bf16, Cfg, false, false, SPP>;
  auto kernel = order ? kvcore::gqa_decode_kernel<bf16, Cfg, false, false, SPP, true> : plain;
  // SMEM_PAD (env, bytes): launch with at least this much dynamic shared memory (the kernel uses
  // what it always does), to cap CTAs per SM, e.g. a 2-stage ring held at the 3-stage ring's two.
  const size_t smem_pad = std::getenv("SMEM_PAD") ? size_t(std::atol(std::getenv("SMEM_PAD"))) : 0;
  const size_t smem = std::max(Cfg::smem_bytes(false, false, order), smem_pad);
  if (order && split_len / PAGE > kvcore::kOrderMaxPages) {
    std::printf("ORDER: %d pages a split, more than the kernel sorts (%d): not run\n", split_len / PAGE,
                kvcore::kOrderMaxPages);
    return 0;
  }
  CUDA_CHECK(cudaFuncSetAttribute(plain, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   int(std::max(Cfg::SMEM_BYTES, smem_pad))));
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int per_sm = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Cfg::THREADS, smem));
  // Reference: the same kernel with one split (no merge), compared below.
  {
    kvcore::GqaDecodeParams r = p;
    r.num_splits = 1;
    r.split_tokens = (S + Cfg::TILE - 1) / Cfg::TILE * Cfg::TILE;
    r.out = out_ref;
    plain<<<dim3(Hkv, 1, B), Cfg::THREADS, Cfg::SMEM_BYTES>>>(r);
    CUDA_CHECK(cudaDeviceSynchronize());
  }
  const dim3 grid(Hkv, p.num_splits, B);
  const size_t ctas = size_t(grid.x) * grid.y * grid.z;
  // CLUSTER (env): launch the KV heads of a split as thread-block clusters of that many CTAs.
  const int cluster = std::getenv("CLUSTER") ? std::atoi(std::getenv("CLUSTER")) : 1;
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute cattr[1];
  cfg.gridDim = grid;
  cfg.blockDim = dim3(Cfg::THREADS);
  cfg.dynamicSmemBytes = smem;
  cattr[0].id = cudaLaunchAttributeClusterDimension;
  cattr[0].val.clusterDim.x = unsigned(cluster);
  cattr[0].val.clusterDim.y = 1;
  cattr[0].val.clusterDim.z = 1;
  cfg.attrs = cattr;
  cfg.numAttrs = cluster > 1 ? 1 : 0;
  if (cluster > 1) {
    int max_clusters = 0;
    CUDA_CHECK(cudaOccupancyMaxActiveClusters(&max_clusters, kernel, &cfg));
    std::printf("clusters of %d: at most %d active (%d CTAs)\n", cluster, max_clusters, max_clusters * cluster);
  }
  auto launch = [&](const kvcore::GqaDecodeParams& lp) { CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, lp)); };

  const size_t flush_n = (256u << 20) / 16;
  int4* flush;
  int* sink;
  CUDA_CHECK(cudaMalloc(&flush, flush_n * 16));
  CUDA_CHECK(cudaMemset(flush, 1, flush_n * 16));
  CUDA_CHECK(cudaMalloc(&sink, 4));
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  auto time_it = [&](auto launch_fn, int reps) {
    std::vector<double> ts;
    for (int i = 0; i < reps + 3; ++i) {
      read_all<<<1056, 512>>>(flush, flush_n, sink);
      CUDA_CHECK(cudaEventRecord(e0));
      launch_fn();
      CUDA_CHECK(cudaEventRecord(e1));
      CUDA_CHECK(cudaEventSynchronize(e1));
      float ms;
      CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      if (i >= 3) ts.push_back(ms * 1e3);
    }
    return pct(ts, 0.5);
  };
  const double empty_us = time_it([&] { empty_kernel<<<1, 32>>>(); }, 50);
  // Ceiling: a plain streaming read of the same K and V bytes (contiguous, no compute).
  // K and V as one allocation would be one read; two allocations, two one-shot launches.
  const size_t n16 = cache_elems * 2 / 16;
  const double read_us = time_it([&] {
    if (pair == 2) {  // one allocation: one read of both halves
      read_oneshot<<<unsigned((2 * n16 + 1023) / 1024), 256>>>(reinterpret_cast<const int4*>(k), 2 * n16, sink);
      return;
    }
    read_oneshot<<<unsigned((n16 + 1023) / 1024), 256>>>(reinterpret_cast<const int4*>(k), n16, sink);
    read_oneshot<<<unsigned((n16 + 1023) / 1024), 256>>>(reinterpret_cast<const int4*>(v), n16, sink);
  }, 20);
  const int page_vecs = PAGE * Hkv * D * 2 / 16;
  const double paged_us = time_it([&] {
    read_paged<<<num_pages, 256>>>(reinterpret_cast<const int4*>(k), reinterpret_cast<const int4*>(v), d_table, page_vecs, pair, sink);
  }, 20);
  const double heads_us = time_it([&] {
    read_paged_heads<<<dim3(Hkv, p.num_splits, B), 128>>>(reinterpret_cast<const int4*>(k), reinterpret_cast<const int4*>(v),
                                                          d_table, pages_per_seq, PAGE, Hkv, S, p.split_tokens, pair, sink);
  }, 20);
  const double us = time_it([&] { launch(p); }, 50);
  CUDA_CHECK(cudaGetLastError());
  const double bytes = 2.0 * B * S * Hkv * D * 2;
  {
    const std::vector<uint16_t> a = to_host(out, size_t(B) * Hq * D);
    const double worst = max_abs_diff(a, to_host(out_ref, a.size()));
    std::printf("check: max |out - one-split out| = %.3g%s\n", worst, worst < 2e-2 ? "" : "  <-- MISMATCH");
    // Against a host reference for the first and last query head of the first and last sequence.
    const auto f = bf16_value;
    // With pagepair, k's host copy spans both halves and v's is the same copy shifted by a half page pair.
    const std::vector<uint16_t> hq = to_host(q, size_t(B) * Hq * D), hk = to_host(k, pair * cache_elems),
                                hv = pair == 2 ? std::vector<uint16_t>(hk.begin() + size_t(PAGE) * Hkv * D, hk.end())
                                               : to_host(v, cache_elems);
    double ref_worst = 0;
    for (const int bb : {0, B - 1})
      for (const int hh : {0, Hq - 1}) {
        const int kh = hh / group;
        std::vector<double> logit(S), acc(D, 0.0);
        double mx = -1e300, sum = 0;
        for (int t = 0; t < S; ++t) {
          const size_t row = (size_t(table[size_t(bb) * pages_per_seq + t / PAGE]) * pair * PAGE + t % PAGE) * Hkv + kh;
          double dot = 0;
          for (int d = 0; d < D; ++d) dot += double(f(hq[(size_t(bb) * Hq + hh) * D + d])) * f(hk[row * D + d]);
          logit[t] = dot * p.scale;
          mx = std::max(mx, logit[t]);
        }
        for (int t = 0; t < S; ++t) {
          const size_t row = (size_t(table[size_t(bb) * pages_per_seq + t / PAGE]) * pair * PAGE + t % PAGE) * Hkv + kh;
          const double w = std::exp(logit[t] - mx);
          sum += w;
          for (int d = 0; d < D; ++d) acc[d] += w * f(hv[row * D + d]);
        }
        for (int d = 0; d < D; ++d)
          ref_worst = std::max(ref_worst, std::fabs(acc[d] / sum - f(a[(size_t(bb) * Hq + hh) * D + d])));
      }
    std::printf("check: max |out - host reference| (4 heads) = %.3g%s\n", ref_worst, ref_worst < 2e-2 ? "" : "  <-- MISMATCH");
  }
  std::printf("%sB%d S%d Hq%d Hkv%d page %d SPP %d table %s cluster %d splits %d x %d tokens, %d stages, %d CTAs/SM: %zu CTAs, %.1f us, %.0f GB/s over K/V (empty kernel %.1f us; one-shot read of K and V %.1f us, %.0f GB/s; paged read %.1f us, %.0f GB/s; per-head paged read %.1f us, %.0f GB/s)\n",
              order ? "ORDER " : "", B, S, Hq, Hkv, PAGE, SPP, table_kind, cluster, p.num_splits, p.split_tokens, STAGES, per_sm, ctas, us,
              bytes / us * 1e-3, empty_us, read_us, bytes / read_us * 1e-3, paged_us, bytes / paged_us * 1e-3, heads_us,
              bytes / heads_us * 1e-3);

  if (const char* pm = std::getenv("PAGE_MAJOR")) time_page_major(pm, p, B, S, Hq, out_ref, time_it, bytes);

  unsigned long long* trace;
  constexpr int F = kvcore::kDecodeTraceFixed;
  const int tiles = std::min(4096, (p.split_tokens + Cfg::TILE - 1) / Cfg::TILE + 1), stride = F + tiles;
  CUDA_CHECK(cudaMalloc(&trace, ctas * stride * 8));
  // Zeroed: a CTA whose range has no tile writes no first-tile / loop-end stamps (session 9's
  // 33- to 132-split runs had some), and the statistics below leave those CTAs out.
  CUDA_CHECK(cudaMemset(trace, 0, ctas * stride * 8));
  p.trace = trace;
  p.trace_tiles = tiles;
  read_all<<<1056, 512>>>(flush, flush_n, sink);
  launch(p);
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<unsigned long long> tr(ctas * stride);
  CUDA_CHECK(cudaMemcpy(tr.data(), trace, tr.size() * 8, cudaMemcpyDeviceToHost));
  unsigned long long t0 = ~0ull, tend = 0;
  for (size_t c = 0; c < ctas; ++c) t0 = std::min(t0, tr[c * stride]), tend = std::max(tend, tr[c * stride + 3]);
  std::vector<double> entry, issued, first, loop, epi, exit_;
  std::vector<size_t> cta_of;  // the CTA of each entry of loop (CTAs with tiles only)
  size_t idle = 0;
  for (size_t c = 0; c < ctas; ++c) {
    entry.push_back((tr[c * stride] - t0) * 1e-3);
    exit_.push_back((tr[c * stride + 3] - t0) * 1e-3);
    if (tr[c * stride + 1] == 0 || tr[c * stride + 2] == 0) {  // no tile in this CTA's range
      ++idle;
      continue;
    }
    issued.push_back((tr[c * stride + 4] - tr[c * stride]) * 1e-3);
    first.push_back((tr[c * stride + 1] - tr[c * stride]) * 1e-3);
    loop.push_back((tr[c * stride + 2] - tr[c * stride + 1]) * 1e-3);
    epi.push_back((tr[c * stride + 3] - tr[c * stride + 2]) * 1e-3);
    cta_of.push_back(c);
  }
  if (const char* csv = std::getenv("TRACE_CSV")) {  // per-CTA rows for offline analysis
    if (FILE* fc = std::fopen(csv, "w")) {
      // tiles: the times its first trace_tiles tiles landed, ';'-separated (a CTA's rate over time).
      std::fprintf(fc, "cta,smid,entry,issued,first,loop_end,arrival,exit,tiles\n");
      auto us_of = [&](unsigned long long x) { return x >= t0 ? (x - t0) * 1e-3 : -1.0; };
      for (size_t c = 0; c < ctas; ++c) {
        const unsigned long long* r = &tr[c * stride];
        std::fprintf(fc, "%zu,%llu,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,", c, r[6], us_of(r[0]), us_of(r[4]), us_of(r[1]),
                     us_of(r[2]), us_of(r[5]), us_of(r[3]));
        for (int t = 0; t < tiles && r[F + t] != 0; ++t) std::fprintf(fc, "%s%.3f", t ? ";" : "", us_of(r[F + t]));
        std::fprintf(fc, "\n");
      }
      std::fclose(fc);
    }
  }
  std::printf("traced span %.1f us (first entry to last exit); %zu CTAs without a tile left out of the tile rows\n",
              (tend - t0) * 1e-3, idle);
  auto row = [&](const char* name, const std::vector<double>& x) {
    std::printf("  %-22s min %7.2f  p10 %7.2f  p50 %7.2f  p90 %7.2f  max %7.2f us\n", name, pct(x, 0), pct(x, 0.1),
                pct(x, 0.5), pct(x, 0.9), pct(x, 1));
  };
  row("entry (since first)", entry);
  row("first copies issued", issued);
  row("first tile latency", first);
  row("main loop", loop);
  row("epilogue+merge", epi);
  row("exit (since first)", exit_);
  // Loop time per KV head (grid x): a systematic difference between heads (their rows sit at
  // fixed offsets inside every page) would point at DRAM channel mapping rather than per-CTA luck.
  std::printf("  loop us per KV head (mean/min/max over its CTAs):");
  for (unsigned h = 0; h < grid.x; ++h) {
    double sum = 0, mn = 1e30, mx = 0;
    size_t n = 0;
    for (size_t i = 0; i < loop.size(); ++i) {
      if (cta_of[i] % grid.x != h) continue;
      const double x = loop[i];
      sum += x, mn = std::min(mn, x), mx = std::max(mx, x), ++n;
    }
    if (n > 0) std::printf(" h%u %.1f/%.1f/%.1f", h, sum / n, mn, mx);
  }
  std::printf("\n");
  // Bytes landed over time: a tile counts as landed when the CTA passed its wait. Print the
  // aggregate rate per window of 10 us, then of 2 us (K+V tile bytes of TILE tokens).
  const double tile_bytes = 2.0 * Cfg::TILE * D * 2;
  const double span = (tend - t0) * 1e-3;
  for (const int width_us : {10, 2}) {
    const int nwin = int(span / width_us) + 1;
    std::vector<double> win(nwin, 0.0);
    for (size_t c = 0; c < ctas; ++c)
      for (int t = 0; t < tiles; ++t) {
        const unsigned long long x = tr[c * stride + F + t];
        if (x >= t0 && x <= tend) win[std::min(nwin - 1, int((x - t0) * 1e-3 / width_us))] += tile_bytes;
      }
    std::printf("  landed GB/s per %d us:", width_us);
    for (int w = 0; w < nwin; ++w) std::printf(" %.0f", win[w] / (width_us * 1e-6) / 1e9);
    std::printf("\n");
  }
  if (p.num_splits > 1) {
    // Per pair: the last split's arrival, and the merging CTA (the last to arrive) from its
    // arrival to its exit.
    std::vector<double> last_arrival, merge_part, merger_exit;
    // The merging CTA's phases, each between two of thread 0's stamps (slots): 2 loop end, 10
    // before its arrival atomic, 5 past the barrier after it, 11 first partials issued, 12 its
    // first lse value back, 7 its warp's weights done, 8 past the barrier after the weights, 9
    // its items combined and stored, 3 exit. A phase counts where both stamps were written.
    struct Phase {
      const char* name;
      int from, to;
    };
    const Phase phases[] = {{"merger: loop end->atom", 2, 10}, {"merger: atomic", 10, 5},
                            {"merge: partials issue", 5, 11},  {"merge: lse round trip", 11, 12},
                            {"merge: reductions", 12, 7},      {"merge: arr->weights", 5, 7},
                            {"merge: weights barrier", 7, 8},  {"merge: combine+store", 8, 9},
                            {"merge: store->exit", 9, 3}};
    std::vector<std::vector<double>> phase_us(std::size(phases));
    for (size_t pr = 0; pr < pairs; ++pr) {
      const size_t h = pr % Hkv, b = pr / Hkv;
      unsigned long long la = 0, mx_exit = 0, arr_of_last = 0;
      size_t merger = 0;
      for (int sp = 0; sp < p.num_splits; ++sp) {
        const size_t c = h + size_t(Hkv) * (sp + size_t(p.num_splits) * b);
        if (tr[c * stride + 5] > la) la = tr[c * stride + 5];
        if (tr[c * stride + 3] > mx_exit) mx_exit = tr[c * stride + 3], arr_of_last = tr[c * stride + 5], merger = c;
      }
      const unsigned long long* mr = &tr[merger * stride];
      for (size_t i = 0; i < std::size(phases); ++i) {
        const unsigned long long a = mr[phases[i].from], z = mr[phases[i].to];
        if (a != 0 && z >= a) phase_us[i].push_back((z - a) * 1e-3);
      }
      last_arrival.push_back((la - t0) * 1e-3);
      merger_exit.push_back((mx_exit - t0) * 1e-3);
      merge_part.push_back((mx_exit - arr_of_last) * 1e-3);
    }
    row("pair: last arrival", last_arrival);
    row("pair: merge (arr->exit)", merge_part);
    row("pair: merger exit", merger_exit);
    for (size_t i = 0; i < std::size(phases); ++i)
      if (!phase_us[i].empty()) row(phases[i].name, phase_us[i]);
  }
  {
    // Loop ends (since the first entry) by how many CTAs their SM ran.
    std::vector<int> on_sm(1024, 0);
    for (size_t c = 0; c < ctas; ++c) ++on_sm[tr[c * stride + 6] & 1023];
    std::vector<std::vector<double>> by(8);
    for (size_t i = 0; i < cta_of.size(); ++i) {
      const size_t c = cta_of[i];
      const int n = std::min(7, on_sm[tr[c * stride + 6] & 1023]);
      by[n].push_back((tr[c * stride + 2] - t0) * 1e-3);
    }
    for (int n = 1; n < 8; ++n)
      if (!by[n].empty()) {
        char name[64];
        std::snprintf(name, sizeof name, "loop end, %d CTAs/SM (%zu)", n, by[n].size());
        row(name, by[n]);
      }
  }
  return 0;
}

// The page-group size the launcher picks (paged_decode::page_groups) for D 128: a whole tile's
// slots (8) when the page holds 64-row spans, 2 when it holds 16-row spans, else 1.
template <int STAGES>
int run_page(int argc, char** argv) {
  const int page = argc > 6 ? std::atoi(argv[6]) : 16;
  if (page % 64 == 0) return run<STAGES, 8>(argc, argv);
  if (page % 16 == 0) return run<STAGES, 2>(argc, argv);
  return run<STAGES, 1>(argc, argv);
}

int main(int argc, char** argv) {
  const int stages = argc > 7 ? std::atoi(argv[7]) : 3;
  switch (stages) {
    case 2: return run_page<2>(argc, argv);
    case 3: return run_page<3>(argc, argv);
    case 4: return run_page<4>(argc, argv);
    case 5: return run_page<5>(argc, argv);
    case 6: return run_page<6>(argc, argv);
    default: std::fprintf(stderr, "stages must be 2 to 6\n"); return 2;
  }
}
