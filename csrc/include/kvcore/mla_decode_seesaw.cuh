// mla_decode_seesaw_kernel: absorbed MLA decode for 64 heads per CTA on Hopper warpgroup MMA,
// with the two warpgroups computing S for alternate tiles (KVCORE_MLA_DECODE_WIDE=seesaw; an A/B
// variant of mla_decode_wgmma_kernel, written in session 9; timed slower in session 10).
//
// Why (bench/NOTES.md, session 9): in mla_decode_wgmma_kernel warpgroup 0 computes every S and
// softmax while warpgroup 1 waits, so the tensor pipe idles through each softmax and hand-off;
// ncu counts 0.37 eligible warps of 2 per scheduler, and a tile takes ~6,000 cycles against
// ~2,200 of tensor work. Here the tiles go in pairs (a = 2k on warpgroup 0, b = 2k + 1 on
// warpgroup 1), each warpgroup computes its tile's S = Q K^T, and the softmax of one overlaps
// the other's wgmma (FlashMLA's schedule):
//   wg0: S_a; m_a = max(m, rowmax S_a), P_a = exp2(S_a - m_a); hand P_a and m_a to wg1 (A_READY);
//        O_L = O_L * exp2(m - m_a) + P_a V_a[L]; wait B_READY; O_L = O_L * exp2(m_a - m_b) + P_b V_b[L]
//   wg1: S_b; wait A_READY; m_b = max(m_a, rowmax S_b), P_b = exp2(S_b - m_b); hand P_b and m_b to
//        wg0 (B_READY); O_R = O_R * exp2(m - m_a) + P_a V_a[R]; O_R = O_R * exp2(m_a - m_b) + P_b V_b[R]
// Both warpgroups keep the same running max (each derives the other's rescale factor from the
// exchanged maxima with the same expression, so the factors match bit for bit) and their own
// partial row sums l, added at the end. O is split by columns as in mla_decode_wgmma_kernel:
// warpgroup w holds columns [256 w, 256 w + 256) of every head.
//
// Shared memory: Q (72 KB) and two 64-token tile stages (2 x 72 KB) fill it, so a tile's P
// (64 heads x 64 tokens, 8 KB, the same 64-row 128-byte-swizzled shape as one column chunk) is
// written into the tile's own k_pe chunk (columns 512-575, chunk DV / 64), which nothing reads
// after that tile's S: V is columns 0 .. DV - 1. Stage s holds the tiles of warpgroup s, and
// warpgroup s loads them (the same cp.async roles as the wgmma kernel's loader warpgroup).
// Known cost, to measure: a stage is refilled only once both warpgroups' P V of its tile are done,
// so the next pair's loads have less time to land than in the wgmma kernel (one tile of slack
// there).
//
// Synchronisation (all mbarriers, so compute-sanitizer's racecheck can judge the kernel):
//   full[s]  (128 arrivals): warpgroup s's copies of its tile into stage s landed
//   empty[s] (256 arrivals): both warpgroups are done reading stage s (P V, and P for the other)
//   A_READY  (128 arrivals, warpgroup 0): P_a in stage 0's k_pe chunk and m_a in sMa
//   B_READY  (128 arrivals, warpgroup 1): P_b in stage 1's k_pe chunk and m_b in sMb
// Each completes once per pair, so pair k waits on parity k & 1. Neither warpgroup can run two
// pairs ahead: warpgroup 0 waits B_READY(k) before it arrives A_READY(k + 1), and warpgroup 1
// waits A_READY(k + 1) before it arrives B_READY(k + 1).
#pragma once

#include "kvcore/mla_decode_wgmma.cuh"

namespace kvcore {

template <int DK_, int DV_>
struct MlaDecodeSeesawConfig : MlaWgmmaShape<DK_, DV_> {
  using Shape = MlaWgmmaShape<DK_, DV_>;
  static constexpr int P_CHUNK = DV_ / 64;  // the first column chunk V never reads: P goes there
  static constexpr size_t SMEM_ROWF = 5 * Shape::ROWS * 4;  // m_a, m_b, warpgroup 1's l, 1/l, lse
  static constexpr size_t SMEM_BAR = (2 * Shape::STAGES + 2) * 8;  // full[], empty[], A_READY, B_READY
  static constexpr size_t SMEM_BYTES =
      Shape::SMEM_ALIGN + Shape::SMEM_Q + Shape::STAGES * Shape::SMEM_TILE + SMEM_ROWF + SMEM_BAR;
  static_assert(DK_ >= DV_ + 64, "seesaw MLA decode: P needs a column chunk past V (the k_pe chunk)");
  static_assert(Shape::ROWS == Shape::TILE, "P (ROWS x TILE) must have the shape of one column chunk (TILE x 64)");
  static_assert(Shape::STAGES == 2, "one stage per warpgroup");
  static_assert(SMEM_BYTES <= 227 * 1024 - 64, "seesaw MLA decode: shared memory over the sm_90 limit");
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, 1) mla_decode_seesaw_kernel(const MlaDecodeParams p) {
#if KVCORE_SM90A
  using namespace mla_wgmma;
  constexpr int DK = Cfg::DK, TILE = Cfg::TILE, ROWS = Cfg::ROWS, KSTEPS = Cfg::KSTEPS;
  constexpr int VCHUNKS = Cfg::VCHUNKS, STAGES = Cfg::STAGES;
  unsigned char* const smem = aligned_smem<Cfg>();
  T* const sQ = reinterpret_cast<T*>(smem);
  T* const sTile = reinterpret_cast<T*>(smem + Cfg::SMEM_Q);
  float* const sMa = reinterpret_cast<float*>(smem + Cfg::SMEM_Q + STAGES * Cfg::SMEM_TILE);
  float* const sMb = sMa + ROWS;
  float* const sL1 = sMb + ROWS;
  float* const sInv = sL1 + ROWS;
  float* const sLse = sInv + ROWS;
  uint64_t* const full = reinterpret_cast<uint64_t*>(sLse + ROWS);
  uint64_t* const empty = full + STAGES;
  uint64_t* const a_ready = empty + STAGES;
  uint64_t* const b_ready = a_ready + 1;

  const int hb = blockIdx.x, split = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, wg = tid >> 7, wtid = tid & 127, warp = wtid >> 5, lane = tid & 31;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbarrier_init(full + s, 128);
      mbarrier_init(empty + s, 256);
    }
    mbarrier_init(a_ready, 128);
    mbarrier_init(b_ready, 128);
  }

  // This CTA's KV range; each warpgroup loads its own tiles into its own stage.
  TileStream<T, Cfg> ts(p, b, split, wtid, wg);  // (tile wg's pages fetched)
  const int start = ts.start, end = ts.end, num_tiles = ts.num_tiles;

  const int h0 = hb * ROWS;
  stage_q_sw128<Cfg>(p, b, h0, sQ);
  cp_async_wait<0>();
  fence_proxy_async_smem();  // Q, written through the generic proxy, before wgmma reads it
  __syncthreads();           // Q and the barrier initialisation are visible to all

  // Each warpgroup loads its first tile and fetches the pages of its next.
  if (wg < num_tiles) ts.issue_tile(p, wg, sTile, full);
  ts.fetch_pages(p, wg + STAGES);

  // D fragment roles: rows r0 and r0 + 8, columns 8 i + cpair (+1), in both warpgroups.
  const int r0 = warp * 16 + (lane >> 2), cpair = (lane & 3) * 2;
  float o[VCHUNKS][32];
  zero_out_acc(o);
  const uint32_t kSbo = 1024, kChunkBytes = TILE * 128, kStageBytes = TILE * DK * 2;
  const uint64_t dQ = smem_desc_sw128(sQ, 16, kSbo);
  const uint64_t dK0 = smem_desc_sw128(sTile, 16, kSbo);
  const int vchunk0 = wg * VCHUNKS;  // this warpgroup's first 64-column chunk of V and O
  const uint64_t dV0 = smem_desc_sw128(sTile + vchunk0 * TILE * 64, kChunkBytes, kSbo);
  // P of the tile in stage s goes into its k_pe column chunk (p_tile below).
  float m[2] = {-INFINITY, -INFINITY};  // the running row maxima (log2 domain), the same in both warpgroups
  float l[2] = {0.f, 0.f};              // this warpgroup's share of the row sums (this lane's tokens)
  const float s_scale = p.scale * kLog2e;

  auto p_tile = [&](int s) { return sTile + s * TILE * DK + Cfg::P_CHUNK * TILE * 64; };
  auto stage_k = [&](int s) { return desc_advance(dK0, uint32_t(s) * kStageBytes); };
  auto stage_v = [&](int s) { return desc_advance(dV0, uint32_t(s) * kStageBytes); };
  // P into stage s's P chunk and this thread's rows' new maxima into sm, for the other warpgroup.
  auto publish = [&](int s, const uint32_t (&pk)[TILE / 16][4], float* sm) {
    store_p<ROWS, TILE>(p_tile(s), pk, r0, cpair);
    if ((lane & 3) == 0) {
      sm[r0] = m[0];
      sm[r0 + 8] = m[1];
    }
  };
  // The running maxima move to the other warpgroup's (read from sm): returns the factors that
  // rescale this warpgroup's O and l, and rescales l.
  // O rescaled by f, then O += P V of the tile in stage s, waited; this warpgroup is then done
  // with that stage.
  auto pv_and_release = [&](int s, const uint32_t (&pk)[TILE / 16][4], const float (&f)[2]) {
    rescale_o(o, f[0], f[1]);
    issue_pv<T, TILE>(o, pk, stage_v(s));
    wait_pv(o);
    mbarrier_arrive(empty + s);
  };
  auto adopt_max = [&](const float* sm, float (&f)[2]) {
    const float n0 = sm[r0], n1 = sm[r0 + 8];
    f[0] = rescale_factor(m[0], n0);
    f[1] = rescale_factor(m[1], n1);
    m[0] = n0;
    m[1] = n1;
    l[0] *= f[0];
    l[1] *= f[1];
  };

  const int num_pairs = (num_tiles + 1) / 2;
  for (int k = 0; k < num_pairs; ++k) {
    const int ta = 2 * k, tb = 2 * k + 1;
    const bool has_b = tb < num_tiles;
    const uint32_t phase = k & 1;
    uint32_t pa[TILE / 16][4], pb[TILE / 16][4];
    float sv[TILE / 2], fa[2], fb[2];
    if (wg == 0) {
      mbarrier_wait(full + 0, phase);
      fence_proxy_async_smem();
      tile_scores<T, KSTEPS, ROWS, TILE>(sv, dQ, stage_k(0), s_scale, start + ta * TILE, end, cpair);
      tile_softmax<T, TILE>(sv, m, l, fa, pa);
      publish(0, pa, sMa);
      mbarrier_arrive(a_ready);
      rescale_o(o, fa[0], fa[1]);
      issue_pv<T, TILE>(o, pa, stage_v(0));
      if (has_b) {
        mbarrier_wait(b_ready, phase);
        adopt_max(sMb, fb);
        wait_pv(o);  // before P_b's fragments load: P_a's and P_b's together do not fit the registers
        mbarrier_arrive(empty + 0);
        load_p<ROWS, TILE>(p_tile(1), pb, warp, lane);
        pv_and_release(1, pb, fb);
      } else {
        wait_pv(o);
        mbarrier_arrive(empty + 0);
      }
      if (ta + STAGES < num_tiles) {
        mbarrier_wait(empty + 0, phase);  // warpgroup 1 is done with stage 0 too
        ts.issue_tile(p, ta + STAGES, sTile, full);
        ts.fetch_pages(p, ta + 2 * STAGES);
      }
    } else {
      if (has_b) {
        mbarrier_wait(full + 1, phase);
        fence_proxy_async_smem();
        tile_scores<T, KSTEPS, ROWS, TILE>(sv, dQ, stage_k(1), s_scale, start + tb * TILE, end, cpair);
      }
      mbarrier_wait(a_ready, phase);
      adopt_max(sMa, fa);
      if (has_b) {
        tile_softmax<T, TILE>(sv, m, l, fb, pb);
        publish(1, pb, sMb);
        mbarrier_arrive(b_ready);
      }
      load_p<ROWS, TILE>(p_tile(0), pa, warp, lane);
      pv_and_release(0, pa, fa);
      if (has_b) pv_and_release(1, pb, fb);
      if (tb + STAGES < num_tiles) {
        mbarrier_wait(empty + 1, phase);  // warpgroup 0 is done with stage 1 too
        ts.issue_tile(p, tb + STAGES, sTile, full);
        ts.fetch_pages(p, tb + 2 * STAGES);
      }
    }
  }

  // ---- final row statistics: both warpgroups' sums, then both halves of O ---------------------
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  if (wg == 1 && (lane & 3) == 0) {
    sL1[r0] = l[0];
    sL1[r0 + 8] = l[1];
  }
  __syncthreads();
  if (wg == 0 && (lane & 3) == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = r0 + 8 * r;
      const float lsum = l[r] + sL1[row];
      // lsum == 0: nothing attended (out 0, lse -inf). A NaN stays NaN in both.
      sInv[row] = lsum == 0.f ? 0.f : 1.f / lsum;
      sLse[row] = lsum == 0.f ? -INFINITY : m[r] + log2f(lsum);
    }
  }
  __syncthreads();

  store_out<T, ROWS, Cfg::THREADS>(p, o, sInv, sLse, b, hb, split, wg, r0, cpair, lane, reinterpret_cast<float*>(sTile));
#else
  // Built without sm_90a: the launcher never selects this kernel there (it checks the device and
  // the wgmma kernel's image, built alike); a launch anyway fails loudly.
  __trap();
#endif
}

}  // namespace kvcore
