// Prototype (not the library's): gqa_decode as a persistent stream of fixed pieces handed out late.
//
// Why: at the one-wave grid points (B16, B64, B32 Hq64, B1 S131072) kvcore's CTAs end apart by
// the SMs' rate spread (bench/NOTES.md, sessions 17 and 27), and cuDNN SDPA runs the same grid.
// Here every (sequence, KV head) pair's keys are cut into the same fixed pieces (so the
// arithmetic, and the bits, do not depend on timing); a CTA takes its first piece by its index
// and each later one from a global counter, claimed a piece ahead, and its tile ring runs on
// from one piece into the next without draining, so a late piece costs no pipeline start. Each
// piece writes a normalised partial and its log2-sum-exp; the pair's last piece to arrive merges
// them in piece order. The warps' states at a piece's end go through the ring stage its last
// tile used (free until the next iteration refills it).
//
// Limits of the prototype: equal lengths (every pair the same pieces, from a token list), no
// window, soft-cap or score, group <= 8, every piece at least STAGES + 1 tiles (so at most two
// pieces are live in a CTA: the one computed and the one being fetched).
//
//   nvcc -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
//        -Icsrc/include bench/experiments/decode_stream.cu -o /tmp/decode_stream
//   /tmp/decode_stream B S Hq Hkv BASE_WARPS BASE_SPLITS PIECES [PIECES ...]
// PIECES: piece lengths in tokens, comma-separated, "N*L" for N pieces of L, summing to S; a
// prefix "w8:" runs the 8-warp (128-token tile) kernel. The baseline is the library's kernel
// (BASE_WARPS 4 or 8, BASE_SPLITS splits). Each run is checked against the one-split library
// output, then timed (CUDA events, L2 flushed, median of 50), alternating with the baseline.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvcore/gqa_decode.cuh"

#include "cuda_check.h"

using bf16 = __nv_bfloat16;

namespace stream {
using namespace kvcore;

constexpr int kMaxPieces = 64;

struct StreamWork {
  int pieces;                   // per pair
  int cut[kMaxPieces + 1];      // piece boundaries in tiles (cut[0] = 0)
  int keys;                     // every pair's length (equal lengths)
  int total;                    // pairs x pieces
  unsigned* claim;              // claims past the grid's first units; reset by the last CTA out
  unsigned* exits;
};

struct Unit {
  int pair, piece, pos0, end, g0, nt;  // nt == 0: no more work
};

template <typename T, typename Cfg, int SPP>
__global__ void __launch_bounds__(Cfg::THREADS) stream_kernel(const GqaDecodeParams p, const StreamWork w) {
  constexpr int D = Cfg::D, TD = Cfg::TD, TILE = Cfg::TILE, STAGES = Cfg::STAGES, LOADS = Cfg::LOADS;
  constexpr int ROWS = Cfg::ROWS, WARPS = Cfg::WARPS, STEP = Cfg::STEP, MS = Cfg::MERGE_STRIDE;
  extern __shared__ __align__(128) unsigned char smem[];
  T* const sQ = reinterpret_cast<T*>(smem);  // [2][ROWS * D]: the units of even / odd ordinal
  T* const sK = sQ + 2 * ROWS * D;
  T* const sV = sK + STAGES * TILE * D;
  __shared__ Unit s_unit[2];
  __shared__ float s_m[WARPS * ROWS], s_l[WARPS * ROWS];
  __shared__ float s_wgt[8 * (kMaxPieces + 1)];  // [group][pieces + 1]
  __shared__ bool s_is_last;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int group = p.group, hkv = p.num_kv_heads;
  const int capacity = p.max_pages * p.page_size;
  const int64_t row_stride = int64_t(hkv) * D;
  const int copy_chunk = tid % TD;
  const int row0 = (tid % Cfg::COPY_THREADS) / TD + (tid / Cfg::COPY_THREADS) * (LOADS * STEP);
  auto page_of = [&](int pos) { return p.page_shift >= 0 ? pos >> p.page_shift : pos / p.page_size; };
  auto in_page = [&](int pos) { return p.page_shift >= 0 ? pos & (p.page_size - 1) : pos % p.page_size; };
  constexpr auto leads = [](int i) { return i % SPP == 0; };

  const int pairs_total = w.total / w.pieces;
  auto make_unit = [&](unsigned u, int g0) {
    Unit d{};
    d.g0 = g0;
    if (u >= unsigned(w.total)) return d;  // nt 0
    d.piece = int(u) / pairs_total;
    d.pair = int(u) % pairs_total;
    d.pos0 = w.cut[d.piece] * TILE;
    d.end = min(w.cut[d.piece + 1] * TILE, w.keys);
    d.nt = d.end > d.pos0 ? (d.end - d.pos0 + TILE - 1) / TILE : 0;
    return d;
  };

  unsigned pending = 0;  // thread 0: the next claimed unit
  if (tid == 0) {
    s_unit[0] = make_unit(blockIdx.x, 0);
    if (s_unit[0].nt > 0) pending = atomicAdd(w.claim, 1u) + gridDim.x;
  }
  __syncthreads();
  int newest = 0;  // ordinal of the newest published unit (slot newest & 1)
  // The unit (ordinal) holding global tile x: the newest or the one before.
  auto ord_of = [&](int x) { return x >= s_unit[newest & 1].g0 ? newest : newest - 1; };

  int pages[LOADS];
  auto fetch_pages = [&](int x) {
    const Unit& d = s_unit[ord_of(x) & 1];
    if (d.nt == 0) return;
    const int* bt = p.block_table + int64_t(d.pair / hkv) * p.max_pages;
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      if (leads(i)) {
        const int pos = min(d.pos0 + (x - d.g0) * TILE + row0 + i * STEP, capacity - 1);
        pages[i] = __ldg(bt + page_of(pos));
      }
    }
  };
  const int64_t step_bytes = STEP * row_stride * int64_t(sizeof(T));
  auto issue_copies = [&](int x) {
    const int ord = ord_of(x);
    const Unit& d = s_unit[ord & 1];
    if (d.nt == 0) return;
    const int b = d.pair / hkv, kvh = d.pair % hkv;
    if (x == d.g0) {  // the unit's queries, with its first tile
      T* q = sQ + (ord & 1) * ROWS * D;
      for (int i = tid; i < ROWS * TD; i += Cfg::THREADS) {
        const int row = i / TD, chunk = i % TD;
        const int qrow = row < group ? row : 0;
        cp_async_16(q + swz<TD>(row, chunk),
                    static_cast<const T*>(p.q) + int64_t(b) * p.q_stride_b + int64_t(kvh * group + qrow) * p.q_stride_h +
                        chunk * 8,
                    row < group);
      }
    }
    const T* const kbase = static_cast<const T*>(p.k_cache) + int64_t(kvh) * D;
    const T* const vbase = static_cast<const T*>(p.v_cache) + int64_t(kvh) * D;
    const int stage = x % STAGES;
    const int start = d.pos0 + (x - d.g0) * TILE, end = d.end;
    const char* ka = nullptr;
    const char* va = nullptr;
    int left = 0;
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int row = row0 + i * STEP;
      const int pos = start + row;
      if (leads(i)) {
        const int in_pg = max(in_page(SPP > 1 ? pos : min(pos, end - 1)), 0);
        left = end - pos;
        const int64_t page = min(max(pages[i], 0), p.num_pages - 1);
        const int64_t off = int64_t(in_pg) * row_stride + copy_chunk * 8;
        ka = reinterpret_cast<const char*>(kbase + page * p.k_page_stride + off);
        va = reinterpret_cast<const char*>(vbase + page * p.v_page_stride + off);
      } else {
        ka += step_bytes;
        va += step_bytes;
        left -= STEP;
      }
      const int s_off = stage * TILE * D + swz<TD>(row, copy_chunk);
      cp_async_16(sK + s_off, ka, left > 0);
      cp_async_16(sV + s_off, va, left > 0);
    }
  };

  if (s_unit[0].nt > 0) {
    fetch_pages(0);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      issue_copies(s);
      cp_async_commit();
      fetch_pages(s + 1);
    }
  }

  const int r0 = lane >> 2, cpair = (lane & 3) * 2;
  const float s_scale = p.scale * kLog2e;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  for (int t = 0;; ++t) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile t landed; stage (t - 1) % STAGES is free again
    const int ord = ord_of(t);
    const Unit& cu = s_unit[ord & 1];
    if (cu.nt == 0) break;
    const int pair = cu.pair, piece = cu.piece, cend = cu.end, tpos = cu.pos0 + (t - cu.g0) * TILE;
    const bool unit_ends = t == cu.g0 + cu.nt - 1;
    // The next unit is published when the fetch one iteration ahead reaches its first tile.
    const Unit& nu = s_unit[newest & 1];
    const bool publish = nu.nt > 0 && t + STAGES + 1 == nu.g0 + nu.nt;
    if (publish && tid == 0) {
      const Unit d = make_unit(pending, nu.g0 + nu.nt);
      s_unit[(newest + 1) & 1] = d;
      if (d.nt > 0) pending = atomicAdd(w.claim, 1u) + gridDim.x;
    }
    issue_copies(t + STAGES - 1);
    cp_async_commit();
    fetch_pages(t + STAGES);

    const T* kt = sK + (t % STAGES) * TILE * D;
    const T* vt = sV + (t % STAGES) * TILE * D;
    const T* q = sQ + (ord & 1) * ROWS * D;
    const int wrow = warp * Cfg::WARP_TOKENS;
    float s[2][4] = {};
#pragma unroll
    for (int kc = 0; kc < D / 16; kc += 2) {
      uint32_t a0[4], a1[4];
      ldmatrix_x4(a0, q + swz<TD>((lane & 7) + ((lane >> 3) & 1) * 8, kc * 2 + (lane >> 4)));
      ldmatrix_x4(a1, q + swz<TD>((lane & 7) + ((lane >> 3) & 1) * 8, kc * 2 + 2 + (lane >> 4)));
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        uint32_t bk[4];
        ldmatrix_x4(bk, kt + swz<TD>(wrow + nt * 8 + (lane & 7), kc * 2 + (lane >> 3)));
        mma_16816(s[nt], a0, bk[0], bk[1], T{});
        mma_16816(s[nt], a1, bk[2], bk[3], T{});
      }
    }
    const int tok0 = tpos + wrow + cpair;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = tok0 + nt * 8 + (i & 1) < cend ? s[nt][i] * s_scale : -INFINITY;
    float alpha[2], pbase[2];
    tile_softmax_update(s, m, l, alpha, pbase);
    tile_pv_update<T, D>(o, s, alpha, vt, wrow, lane, [](int row, int chunk) { return swz<TD>(row, chunk); });

    if (unit_ends) {
      // ---- the piece's end: warps' states through stage t's ring slots, partial, arrival ----
      __syncthreads();  // every warp is done with tile t's K and V
      float* const mk = reinterpret_cast<float*>(sK + (t % STAGES) * TILE * D);  // warps 0 .. WARPS/2-1
      float* const mv = reinterpret_cast<float*>(sV + (t % STAGES) * TILE * D);  // the others
      auto mrow = [&](int wp, int h) { return (wp < WARPS / 2 ? mk : mv) + ((wp % (WARPS / 2)) * group + h) * MS; };
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
      }
      if (r0 < group) {
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
          *reinterpret_cast<float2*>(mrow(warp, r0) + n * 8 + cpair) = make_float2(o[n][0], o[n][1]);
      }
      if (r0 + 8 < group) {
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
          *reinterpret_cast<float2*>(mrow(warp, r0 + 8) + n * 8 + cpair) = make_float2(o[n][2], o[n][3]);
      }
      if ((lane & 3) == 0) {
        s_m[warp * ROWS + r0] = m[0];
        s_m[warp * ROWS + r0 + 8] = m[1];
        s_l[warp * ROWS + r0] = l[0];
        s_l[warp * ROWS + r0 + 8] = l[1];
      }
      __syncthreads();
      const int ns = w.pieces;
      for (int item = tid; item < group * TD; item += Cfg::THREADS) {
        const int h = item / TD, c = (item % TD) * 8;
        float mx = -INFINITY;
#pragma unroll
        for (int wp = 0; wp < WARPS; ++wp) mx = fmaxf(mx, s_m[wp * ROWS + h]);
        const float base = mx == -INFINITY ? 0.f : mx;
        float lsum = 0.f, acc[8] = {};
#pragma unroll
        for (int wp = 0; wp < WARPS; ++wp) {
          const float f = exp2f(s_m[wp * ROWS + h] - base);
          lsum += s_l[wp * ROWS + h] * f;
          const float4* src = reinterpret_cast<const float4*>(mrow(wp, h) + c);
          const float4 x = src[0], y = src[1];
          acc[0] += x.x * f, acc[1] += x.y * f, acc[2] += x.z * f, acc[3] += x.w * f;
          acc[4] += y.x * f, acc[5] += y.y * f, acc[6] += y.z * f, acc[7] += y.w * f;
        }
        const float inv = lsum == 0.f ? 0.f : 1.f / lsum;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] *= inv;
        const float lse2 = lsum == 0.f ? -INFINITY : base + log2f(lsum);
        if (ns == 1) {
          const int64_t qh = int64_t(pair) * group + h;
          *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + qh * D + c) = pack8<T>(acc);
          if (p.lse != nullptr && c == 0) p.lse[qh] = lse2 * kLn2;
        } else {
          const int64_t slot = (int64_t(pair) * ns + piece) * group + h;
          float4* dst = reinterpret_cast<float4*>(p.partial_out + slot * D + c);
          dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
          dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
          if (c == 0) p.partial_lse[slot] = lse2;
        }
      }
      if (ns > 1) {
        __syncthreads();
        if (tid == 0) s_is_last = atomic_add_acq_rel_gpu(p.counters + pair, 1u) == unsigned(ns - 1);
        __syncthreads();
        if (s_is_last) {
          const float* plse = p.partial_lse + int64_t(pair) * ns * group;
          for (int h = warp; h < group; h += WARPS) {
            float mx = -INFINITY;
            for (int sp = lane; sp < ns; sp += 32) {
              const float x = __ldcg(plse + sp * group + h);
              s_wgt[h * (ns + 1) + sp] = x;
              mx = fmaxf(mx, x);
            }
            const float2 bs = split_merge_weights(mx, h, ns, lane, s_wgt);
            if (lane == 0) {
              s_wgt[h * (ns + 1) + ns] = bs.y;
              if (p.lse != nullptr) p.lse[int64_t(pair) * group + h] = bs.y == 0.f ? -INFINITY : (bs.x + log2f(bs.y)) * kLn2;
            }
          }
          __syncthreads();
          const float* pout = p.partial_out + int64_t(pair) * ns * group * D;
          for (int item = tid; item < group * (D / 4); item += Cfg::THREADS) {
            const int h = item / (D / 4), c = (item % (D / 4)) * 4;
            const float* wh = s_wgt + h * (ns + 1);
            float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
            constexpr int BATCH = 8;  // partials in flight at once, summed in piece order
            for (int s0 = 0; s0 < ns; s0 += BATCH) {
              float4 x[BATCH];
#pragma unroll
              for (int j = 0; j < BATCH; ++j)
                if (s0 + j < ns) x[j] = __ldcg(reinterpret_cast<const float4*>(pout + (int64_t(s0 + j) * group + h) * D + c));
#pragma unroll
              for (int j = 0; j < BATCH; ++j) {
                if (s0 + j < ns) {
                  const float ws = wh[s0 + j];
                  acc.x = fmaf(ws, x[j].x, acc.x);
                  acc.y = fmaf(ws, x[j].y, acc.y);
                  acc.z = fmaf(ws, x[j].z, acc.z);
                  acc.w = fmaf(ws, x[j].w, acc.w);
                }
              }
            }
            const float inv = wh[ns] == 0.f ? 0.f : 1.f / wh[ns];
            T* dst = static_cast<T*>(p.out) + (int64_t(pair) * group + h) * D + c;
            *reinterpret_cast<uint2*>(dst) =
                make_uint2(pack2(acc.x * inv, acc.y * inv, T{}), pack2(acc.z * inv, acc.w * inv, T{}));
          }
          if (tid == 0) p.counters[pair] = 0u;
        }
      }
      m[0] = m[1] = -INFINITY;
      l[0] = l[1] = 0.f;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    }
    if (publish) ++newest;
  }
  cp_async_wait<0>();
  if (tid == 0 && atomicAdd(w.exits, 1u) == gridDim.x - 1) {
    *w.claim = 0u;
    *w.exits = 0u;
  }
}

}  // namespace stream

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
  if (acc == 0x12345678) *sink = acc;
}

static float bf16_value(uint16_t x) {
  const uint32_t u = uint32_t(x) << 16;
  float y;
  std::memcpy(&y, &u, 4);
  return y;
}

// Piece lengths (tokens) from "a,b,N*c,...", optionally prefixed "w8:".
static std::vector<int> parse_pieces(std::string spec, bool& wide) {
  wide = spec.rfind("w8:", 0) == 0;
  if (wide) spec = spec.substr(3);
  std::vector<int> out;
  size_t at = 0;
  while (at < spec.size()) {
    size_t comma = spec.find(',', at);
    if (comma == std::string::npos) comma = spec.size();
    const std::string item = spec.substr(at, comma - at);
    const size_t star = item.find('*');
    const int n = star == std::string::npos ? 1 : std::atoi(item.substr(0, star).c_str());
    const int len = std::atoi(star == std::string::npos ? item.c_str() : item.substr(star + 1).c_str());
    for (int i = 0; i < n; ++i) out.push_back(len);
    at = comma + 1;
  }
  return out;
}

int main(int argc, char** argv) {
  if (argc < 8) {
    std::fprintf(stderr, "usage: %s B S Hq Hkv BASE_WARPS BASE_SPLITS PIECES [PIECES ...]\n", argv[0]);
    return 2;
  }
  const int B = std::atoi(argv[1]), S = std::atoi(argv[2]), Hq = std::atoi(argv[3]), Hkv = std::atoi(argv[4]);
  const int base_warps = std::atoi(argv[5]), base_splits = std::atoi(argv[6]);
  constexpr int D = 128, PAGE = 16;
  const int group = Hq / Hkv, pairs = B * Hkv;
  const int pages_per_seq = (S + PAGE - 1) / PAGE, num_pages = B * pages_per_seq;
  const size_t cache_elems = size_t(num_pages) * PAGE * Hkv * D;
  bf16 *k, *v, *q, *out, *out_ref;
  CUDA_CHECK(cudaMalloc(&k, cache_elems * 2));
  CUDA_CHECK(cudaMalloc(&v, cache_elems * 2));
  CUDA_CHECK(cudaMalloc(&q, size_t(B) * Hq * D * 2));
  CUDA_CHECK(cudaMalloc(&out, size_t(B) * Hq * D * 2));
  CUDA_CHECK(cudaMalloc(&out_ref, size_t(B) * Hq * D * 2));
  fill_random<<<1024, 256>>>(k, cache_elems, 1u);
  fill_random<<<1024, 256>>>(v, cache_elems, 2u);
  fill_random<<<64, 256>>>(q, size_t(B) * Hq * D, 3u);
  std::vector<int> table(num_pages), lens(B, S);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(7));
  int *d_table, *d_lens;
  CUDA_CHECK(cudaMalloc(&d_table, table.size() * 4));
  CUDA_CHECK(cudaMalloc(&d_lens, lens.size() * 4));
  CUDA_CHECK(cudaMemcpy(d_table, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d_lens, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice));
  unsigned* counters;
  CUDA_CHECK(cudaMalloc(&counters, (pairs + 2) * 4));
  CUDA_CHECK(cudaMemset(counters, 0, (pairs + 2) * 4));
  const int max_parts = std::max(64, base_splits);
  float *plse, *pout;
  CUDA_CHECK(cudaMalloc(&plse, size_t(pairs) * max_parts * group * 4));
  CUDA_CHECK(cudaMalloc(&pout, size_t(pairs) * max_parts * group * D * 4));

  kvcore::GqaDecodeParams p{};
  p.q = q;
  p.q_stride_b = int64_t(Hq) * D;
  p.q_stride_h = D;
  p.k_cache = k;
  p.v_cache = v;
  p.k_page_stride = p.v_page_stride = int64_t(PAGE) * Hkv * D;
  p.block_table = d_table;
  p.seq_lens = d_lens;
  p.out = out;
  p.partial_out = pout;
  p.partial_lse = plse;
  p.counters = counters;
  p.num_kv_heads = Hkv;
  p.group = group;
  p.page_size = PAGE;
  p.page_shift = 4;
  p.num_pages = num_pages;
  p.max_pages = pages_per_seq;
  p.dedup_pages = 1;
  p.window_left = -1;
  p.scale = 0.08838834764831845f;

  int sms = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const size_t flush_n = (256u << 20) / 16;
  int4* flush;
  int* sink;
  CUDA_CHECK(cudaMalloc(&flush, flush_n * 16));
  CUDA_CHECK(cudaMemset(flush, 1, flush_n * 16));
  CUDA_CHECK(cudaMalloc(&sink, 4));
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  auto time_one = [&](auto&& fn) {
    read_all<<<1056, 512>>>(flush, flush_n, sink);
    CUDA_CHECK(cudaEventRecord(e0));
    fn();
    CUDA_CHECK(cudaEventRecord(e1));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float ms;
    CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    return double(ms) * 1e3;
  };
  const double bytes = 2.0 * B * S * Hkv * D * 2;

  // Baseline: the library kernel at BASE_WARPS / BASE_SPLITS; reference: its one-split output.
  using Cfg4 = kvcore::GqaDecodeConfig<D, 0, 4>;
  using Cfg8 = kvcore::GqaDecodeConfig<D, 3, 8>;
  auto lib4 = kvcore::gqa_decode_kernel<bf16, Cfg4, false, false, 2>;
  auto lib8 = kvcore::gqa_decode_kernel<bf16, Cfg8, false, false, 2>;
  CUDA_CHECK(cudaFuncSetAttribute(lib4, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Cfg4::SMEM_BYTES)));
  CUDA_CHECK(cudaFuncSetAttribute(lib8, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Cfg8::SMEM_BYTES)));
  auto lib_launch = [&](kvcore::GqaDecodeParams lp, int warps, int splits) {
    const int tile = warps == 8 ? Cfg8::TILE : Cfg4::TILE;
    const int per = ((S + splits - 1) / splits + tile - 1) / tile * tile;
    lp.split_tokens = per;
    lp.num_splits = (S + per - 1) / per;
    const dim3 grid(Hkv, lp.num_splits, B);
    if (warps == 8)
      lib8<<<grid, Cfg8::THREADS, Cfg8::SMEM_BYTES>>>(lp);
    else
      lib4<<<grid, Cfg4::THREADS, Cfg4::SMEM_BYTES>>>(lp);
  };
  {
    kvcore::GqaDecodeParams r = p;
    r.out = out_ref;
    lib_launch(r, 4, 1);
    CUDA_CHECK(cudaDeviceSynchronize());
  }
  std::vector<uint16_t> ref(size_t(B) * Hq * D), got(ref.size());
  CUDA_CHECK(cudaMemcpy(ref.data(), out_ref, ref.size() * 2, cudaMemcpyDeviceToHost));
  auto check = [&](const char* what) {
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaMemcpy(got.data(), out, got.size() * 2, cudaMemcpyDeviceToHost));
    double worst = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double d = std::fabs(double(bf16_value(got[i])) - bf16_value(ref[i]));
      worst = std::isnan(d) ? INFINITY : std::max(worst, d);
    }
    std::printf("check %s: max |out - one-split out| = %.3g%s\n", what, worst, worst < 2e-2 ? "" : "  <-- MISMATCH");
  };

  for (int a = 7; a < argc; ++a) {
    bool wide = false;
    const std::vector<int> lens_tok = parse_pieces(argv[a], wide);
    const int tile = wide ? Cfg8::TILE : Cfg4::TILE, stages = wide ? Cfg8::STAGES : Cfg4::STAGES;
    stream::StreamWork w{};
    w.pieces = int(lens_tok.size());
    w.keys = S;
    w.total = pairs * w.pieces;
    w.claim = counters + pairs;
    w.exits = counters + pairs + 1;
    int sum = 0;
    bool ok = w.pieces >= 1 && w.pieces <= stream::kMaxPieces && group <= 8;
    for (int i = 0; i < w.pieces; ++i) {
      ok = ok && lens_tok[i] % tile == 0 && lens_tok[i] >= (stages + 1) * tile;
      w.cut[i] = sum / tile;
      sum += lens_tok[i];
    }
    w.cut[w.pieces] = sum / tile;
    if (!ok || sum != S) {
      std::printf("pieces %s: not run (need 1-%d pieces, multiples of the %d-token tile, each >= %d tiles, summing to S = %d; group <= 8)\n",
                  argv[a], stream::kMaxPieces, tile, stages + 1, S);
      continue;
    }
    auto run_stream = [&](kvcore::GqaDecodeParams lp) {
      if (wide) {
        auto kern = stream::stream_kernel<bf16, Cfg8, 2>;
        const size_t smem = Cfg8::SMEM_TILES + 2 * Cfg8::SMEM_Q;
        CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
        int per_sm = 0;
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, Cfg8::THREADS, smem));
        kern<<<std::min(per_sm * sms, w.total), Cfg8::THREADS, smem>>>(lp, w);
      } else {
        auto kern = stream::stream_kernel<bf16, Cfg4, 2>;
        const size_t smem = Cfg4::SMEM_TILES + 2 * Cfg4::SMEM_Q;
        CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
        int per_sm = 0;
        CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, Cfg4::THREADS, smem));
        kern<<<std::min(per_sm * sms, w.total), Cfg4::THREADS, smem>>>(lp, w);
      }
    };
    CUDA_CHECK(cudaMemset(out, 0xff, got.size() * 2));
    run_stream(p);
    CUDA_CHECK(cudaGetLastError());
    check(argv[a]);
    CUDA_CHECK(cudaMemset(out, 0xff, got.size() * 2));
    run_stream(p);  // a second call: the counters were reset by the first
    check("(second call)");
    std::vector<double> ts, tb;
    for (int i = 0; i < 53; ++i) {
      const double x = time_one([&] { run_stream(p); });
      const double y = time_one([&] { lib_launch(p, base_warps, base_splits); });
      if (i >= 3) ts.push_back(x), tb.push_back(y);
    }
    std::sort(ts.begin(), ts.end());
    std::sort(tb.begin(), tb.end());
    CUDA_CHECK(cudaGetLastError());
    std::printf("B%d S%d Hq%d Hkv%d pieces %s (%d a pair, %d units): stream %.1f us (%.0f GB/s) | library %d warps %d splits %.1f us (%.0f GB/s) | p10/p90 stream %.1f/%.1f library %.1f/%.1f\n",
                B, S, Hq, Hkv, argv[a], w.pieces, w.total, ts[ts.size() / 2], bytes / ts[ts.size() / 2] * 1e-3, base_warps,
                base_splits, tb[tb.size() / 2], bytes / tb[tb.size() / 2] * 1e-3, ts[ts.size() / 10], ts[ts.size() * 9 / 10],
                tb[tb.size() / 10], tb[tb.size() * 9 / 10]);
  }
  check("(library, last timed)");  // the baseline's output of its last timed call
  return 0;
}
