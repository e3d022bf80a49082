// CUDA launcher of token_decoder_attention: checks, work-item sizing (heads per item, ring depth,
// column split), grid, dtype/head-dim dispatch, and the KVCORE_TOKEN_DECODER_VARIANT switch
// between the default kernel and the "lean" variant. The kernels are framework-free:
// csrc/include/kvcore/token_decoder_attention.cuh.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <utility>

#include "common/checks.h"
#include "common/cuda_occupancy.h"
#include "common/env_switch.h"
#include "common/cuda_dispatch.h"
#include "kvcore/token_decoder_attention.cuh"

namespace kvcore {
namespace {

// The kernel, from KVCORE_TOKEN_DECODER_VARIANT (read once per process): unset or "auto" (the
// default since session 8): token_decoder_attention_lean_kernel (table-driven copies, one V scan
// per item, O staged through shared memory; bench/NOTES.md "token_decoder_attention L16, session
// 6") or token_decoder_attention_kernel, whichever (with its ring depth) fits more CTAs per SM,
// lean on a tie (since session 14; see launch); "classic" or "lean" force one kernel (the A/B
// switch and the tests of each; "lean" uses the compact copy table where it fits, as auto
// does); "lean-wide" forces lean with the 8-byte table (the fallback of shapes whose offsets do
// not fit the compact one: its test switch). Session 8 timed
// both back to back: L16 D128 (2 CTAs per SM either way) lean 0.812 vs 0.951 ms; L4 D64 (lean's
// staging tiles and table leave 2 CTAs per SM instead of 3) lean 0.759 vs 0.708 ms. Any other
// value is an error on every call, so a misspelt name cannot silently time the default.
enum class TokenDecoderVariant { kAuto, kClassic, kLean, kLeanWide };

TokenDecoderVariant token_decoder_variant() {
  static const TokenDecoderVariant variant = TokenDecoderVariant(
      env_choice("KVCORE_TOKEN_DECODER_VARIANT", {"auto", "classic", "lean", "lean-wide"}, "token_decoder_attention (CUDA)"));
  return variant;
}

// KVCORE_TOKEN_DECODER_STAGES (read once per process): the ring depth. "auto" (the default):
// the depth that, with the kernel, fits the most CTAs per SM (see launch); "2" / "3" force one
// where it fits the block (an A/B switch: two stages fit more CTAs, i.e. more warps, per SM,
// for a kernel that bench/NOTES.md counts as issue-bound at 8 warps per SM).
int token_decoder_stages_forced() {
  static const int forced = env_choice("KVCORE_TOKEN_DECODER_STAGES", {"auto", "2", "3"}, "token_decoder_attention (CUDA)");
  return forced == 0 ? 0 : forced + 1;
}

template <typename T, int D>
void launch(TokenDecoderParams& p, const TokenDecoderShape& s, cudaStream_t stream) {
  using Cfg = TokenDecoderConfig<D>;
  // Chunk of KV heads per work item: the largest divisor of Hkv whose q + k + v bytes fit the
  // item target, so STAGES - 1 whole items are in flight per CTA; at least one KV head.
  const int64_t keys = s.prefix + s.block_length;
  const int64_t head_elems = (s.block_length * s.group + 2 * keys) * D;
  int hc = 1;
  for (int c = 1; c <= s.num_kv_heads; ++c)
    if (s.num_kv_heads % c == 0 && c * head_elems * 2 <= Cfg::ITEM_BYTES) hc = c;
  const int64_t stage_elems = hc * head_elems;
  // Head packing: when a KV head has at most 8 query rows (L G <= 8), HP heads share the 16
  // rows of an m-tile, each with its own 8 or 16 virtual keys (P + L rounded up to a power of
  // two), as long as a tile's keys stay within 32 (two key tiles of 16); never more heads than
  // the chunk fills.
  const int64_t lg = s.block_length * s.group;
  int hp = 1, nkp = 8;
  while (nkp < keys) nkp *= 2;
  if (lg <= 8) {
    int lgp = 1;
    while (lgp < lg) lgp *= 2;
    hp = 16 / lgp;
    while (hp > 1 && hp * nkp > 32) hp /= 2;
    while (hp > 1 && hp / 2 >= hc) hp /= 2;
  }
  auto log2i = [](int x) {
    int r = 0;
    while ((1 << r) < x) ++r;
    return r;
  };
  const int m_tiles = hp > 1 ? 1 : int((lg + 15) / 16);
  const int head_groups = (hc + hp - 1) / hp;
  // At most half as many (head group, m-tile) units as warps: split each unit's output columns
  // in two (the scores are then computed twice, which is cheap next to idle warps).
  const bool split_d = head_groups * m_tiles <= Cfg::WARPS / 2;
  // The lean variant adds two staged out tiles (q's size each) and its copy table (one entry per
  // 16-byte vector of q and of k: TdCopyEntry) to the ring. The table's entries are 4 bytes
  // (compact) where the block's offsets fit (token_decoder_lean_compact_fits), else 8 (wide). At
  // L16/D128 with two stages: 74,256 B per CTA with the compact table, 78,608 B with the wide
  // one, so three CTAs per SM (3 x (74,256 + 1,024 reserved) <= 233,472 B) where the wide table
  // allowed two. A block whose lean footprint exceeds the device's shared memory even with two
  // stages (one that only just fits the default kernel, e.g. L48 P16 D256) runs the default
  // kernel.
  const int64_t q_elems = s.block_length * hc * s.group * D;
  const int64_t table_entries = (s.block_length * hc * s.group + keys * hc) * (D / 8);
  const TokenDecoderVariant variant = token_decoder_variant();
  const bool compact_fits = variant != TokenDecoderVariant::kLeanWide &&
                            token_decoder_lean_compact_fits(s.block_length, keys, s.num_q_heads, s.num_kv_heads,
                                                            hc * s.group, hc, D);
  enum Kernel { kLeanCompact, kLeanWide, kClassic };
  auto kernel_for = [&](Kernel kind) {
    switch (kind) {
      case kLeanCompact:
        return split_d ? token_decoder_attention_lean_kernel<T, D, 2, true>
                       : token_decoder_attention_lean_kernel<T, D, 1, true>;
      case kLeanWide:
        return split_d ? token_decoder_attention_lean_kernel<T, D, 2, false>
                       : token_decoder_attention_lean_kernel<T, D, 1, false>;
      default:
        return split_d ? token_decoder_attention_kernel<T, D, 2> : token_decoder_attention_kernel<T, D, 1>;
    }
  };
  auto smem_for = [&](Kernel kind, int st) {
    return kind == kClassic ? token_decoder_smem_bytes(stage_elems, st, D)
                            : token_decoder_lean_smem_bytes(stage_elems, st, D, q_elems, table_entries,
                                                            kind == kLeanCompact);
  };
  // The configuration: kernel (lean or classic) and ring depth (3 stages: two items in flight
  // while one is computed; or 2). It takes the one with the most CTAs per SM, preferring lean,
  // then 3 stages, on ties: the kernels are issue-bound at 8 warps per SM (bench/NOTES.md,
  // token_decoder_attention), and more warps hide more of an item's dependent chain than a
  // deeper ring hides memory latency. Session 14 (H200, one process each): L4 D64 classic with 2
  // stages (4 CTAs per SM) 0.584 ms, lean 2 (3 CTAs) 0.598, classic 3 (3 CTAs, the old choice)
  // 0.708; L16 D128 classic 2 (3 CTAs, bound by registers) 0.779, lean 2 / lean 3 (2 CTAs, the
  // old choice) 0.811 / 0.816, classic 3 (2 CTAs) 0.951. With the compact table (session 15)
  // lean 2 at L16 D128 fits 3 CTAs too and wins the tie with classic 2: 0.660-0.666 ms against
  // 0.780 (H200, call 3; predicted 0.68-0.72 from lean's ~18% fewer instructions); at L4 D64 it stays at 3
  // CTAs (65,424 B; 4 would need <= 57,344 B), so classic 2 keeps that shape.
  // Lean is tried as compact (where it fits), then wide: both are candidates because their
  // register counts differ by instantiation (nvcc 13.0: lean<T, 64, 2> 110 registers compact,
  // 96 wide), so the compact table's smaller footprint does not always mean more CTAs; on a tie
  // the compact one wins (one instruction fewer per copy: 6 instead of 7 around each cp.async).
  // KVCORE_TOKEN_DECODER_VARIANT and KVCORE_TOKEN_DECODER_STAGES narrow the candidates (a forced
  // lean kernel whose footprint does not fit even with two stages, e.g. L48 P16 D256, still runs
  // the classic one; a forced depth that does not fit runs the other).
  const int forced_stages = token_decoder_stages_forced();
  const int64_t optin = int64_t(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  // The smallest lean footprint: compact where it fits.
  const bool lean_fits = variant != TokenDecoderVariant::kClassic &&
                         smem_for(compact_fits ? kLeanCompact : kLeanWide, 2) <= optin;
  const bool forced_lean = variant == TokenDecoderVariant::kLean || variant == TokenDecoderVariant::kLeanWide;
  Kernel kind = kClassic;
  int stages = 0, per_sm = 0;
  auto pick = [&](int only_stages) {
    for (const Kernel cand : {kLeanCompact, kLeanWide, kClassic}) {
      if (cand == kLeanCompact && !compact_fits) continue;
      if (cand != kClassic ? !lean_fits : (forced_lean && lean_fits)) continue;
      for (const int st : {3, 2}) {
        if (only_stages > 0 && st != only_stages) continue;
        const int64_t bytes = smem_for(cand, st);
        if (bytes > optin) continue;
        const int n = occupancy_per_sm(reinterpret_cast<const void*>(kernel_for(cand)), Cfg::THREADS, size_t(bytes));
        if (n > per_sm) {
          kind = cand;
          stages = st;
          per_sm = n;
        }
      }
    }
  };
  pick(forced_stages);
  // A forced depth that does not fit this block (three stages of a large block) runs the other,
  // as a forced lean kernel that does not fit runs the classic one.
  if (stages == 0 && forced_stages > 0) pick(0);
  if (stages == 0) stages = 2;  // nothing fits: the error below
  auto kernel = kernel_for(kind);  // (its limit covers smem_bytes: pick queried this footprint)
  const int64_t smem_bytes = smem_for(kind, stages);
  TORCH_CHECK(smem_bytes <= optin, "token_decoder_attention (CUDA): one KV head of a block (block_length ",
              s.block_length, ", prefix ", s.prefix, ", group ", s.group, ", head_dim ", D, ") needs ", smem_bytes,
              " bytes of shared memory, more than this GPU's ", optin, "; use shorter blocks");

  const int64_t chunks = s.num_kv_heads / hc;
  const int64_t items = s.blocks * chunks;
  TORCH_CHECK(items < (int64_t(1) << 31), "token_decoder_attention (CUDA): too many blocks (", s.blocks, ")");
  TORCH_CHECK(per_sm > 0, "token_decoder_attention (CUDA): the kernel does not fit on this GPU (", smem_bytes,
              " bytes of shared memory per CTA)");
  // One wave of CTAs, each walking a contiguous range of items (consecutive blocks).
  const int64_t slots = int64_t(per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_cta = (items + slots - 1) / slots;
  const int64_t grid = (items + per_cta - 1) / per_cta;

  p.num_items = int(items);
  p.items_per_cta = int(per_cta);
  p.stages = stages;
  p.keys = int(keys);
  p.group = int(s.group);
  p.chunk_kv_heads = hc;
  p.chunk_q_heads = hc * int(s.group);
  p.heads_per_tile = hp;
  p.row_shift = hp > 1 ? log2i(16 / hp) : 30;
  p.key_shift = hp > 1 ? log2i(nkp) : 30;
  p.head_groups = head_groups;
  p.m_tiles = m_tiles;
  p.stage_elems = int(stage_elems);
  p.chunks = make_fast_div(uint32_t(chunks));
  p.chunk_q = make_fast_div(uint32_t(hc * s.group));
  p.chunk_kv = make_fast_div(uint32_t(hc));
  p.group_div = make_fast_div(uint32_t(s.group));
  kernel<<<unsigned(grid), Cfg::THREADS, size_t(smem_bytes), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void token_decoder_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const c10::optional<at::Tensor>& block_lens, double scale, at::Tensor& out,
                                  const c10::optional<at::Tensor>& lse) {
  const TokenDecoderShape s = check_token_decoder(q, k, v, block_lens, out, lse);
  TORCH_CHECK(q.is_cuda(), "token_decoder_attention (CUDA): q must be a CUDA tensor");
  check_scale(scale);
  TORCH_CHECK(s.head_dim == 64 || s.head_dim == 128 || s.head_dim == 256,
              "token_decoder_attention (CUDA): head_dim must be 64, 128 or 256, got ", s.head_dim);
  TORCH_CHECK(q.stride(0) % 8 == 0 && k.stride(0) % 8 == 0 && v.stride(0) % 8 == 0,
              "token_decoder_attention (CUDA): q, k and v block strides (dim 0) must be multiples of 8 elements, got ",
              q.stride(0), ", ", k.stride(0), ", ", v.stride(0));
  check_aligned16(q, "q");
  check_aligned16(k, "k");
  check_aligned16(v, "v");
  check_aligned16(out, "out");
  token_decoder_variant();  // a bad KVCORE_TOKEN_DECODER_VARIANT fails every call, empty ones too
  if (s.blocks == 0 || s.block_length == 0 || s.num_q_heads == 0) return;
  TORCH_CHECK(s.num_q_heads * s.block_length * s.head_dim < (int64_t(1) << 31) &&
                  (s.prefix + s.block_length) * s.num_kv_heads * s.head_dim < (int64_t(1) << 31),
              "token_decoder_attention (CUDA): one block is too large");

  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  TokenDecoderParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.block_lens = block_lens.has_value() ? block_lens->data_ptr<int>() : nullptr;
  p.out = out.data_ptr();
  p.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  p.q_stride_n = q.stride(0);
  p.k_stride_n = k.stride(0);
  p.v_stride_n = v.stride(0);
  p.rows = int(s.block_length);
  p.prefix = int(s.prefix);
  p.num_q_heads = int(s.num_q_heads);
  p.num_kv_heads = int(s.num_kv_heads);
  p.scale_log2 = float(scale) * kLog2e;

  dispatch_half_types(q.scalar_type(), "token_decoder_attention", [&](auto tag) {
    using T = decltype(tag);
    switch (s.head_dim) {
      case 64: return launch<T, 64>(p, s, stream);
      case 128: return launch<T, 128>(p, s, stream);
      default: return launch<T, 256>(p, s, stream);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kvcore, CUDA, m) { m.impl("token_decoder_attention", &token_decoder_attention_cuda); }

}  // namespace kvcore
