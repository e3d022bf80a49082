// CPU kernel of kvcore::token_decoder_attention: the Block Transformer token decoder's attention
// for many blocks at once. Token i of block n attends to the block's P prefix slots and to its
// tokens 0..i; blocks never see each other.
//
// One task per run of consecutive blocks, each block taken KV group by KV group: the group's K and
// V rows (fp32 read in place, other types converted to fp32 once) serve all its query heads and
// rows, whose logits and P V go through cpu_attention.h's register blocks (the kernels header says
// how). The per-row work is tiny (at most P + L keys), so a two-pass softmax over a scratch row of
// logits is enough.
//
// Safety without validation: block_lens[n] is clamped to [0, L], so a bad length gives rows of
// zeros or a full block, never a read outside the block.
//
// NaN: a NaN in q[n, i, h] or in a K row that row attends to makes its out and lse NaN; a NaN V
// element of an attended key only that element of out. Nothing past P + i (later tokens of the
// block) reaches row i: V rows past it are never read for the row, and K rows past it only into
// logits the row never uses (a block of 4 rows computes the logits of its last row's keys). Rows
// past block_lens[n] never read q, and K/V rows past P + block_lens[n] are never read.
//
// The kernel itself is in block_transformer/token_decoder_attention_cpu_kernels.h, compiled once
// per instruction set (baseline, AVX2, AVX-512: common/cpu_isa.h); the op below runs the copy
// KVCORE_CPU_ISA picked.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"

namespace kvcore {
namespace {

struct TokenDecoderCpuParams {
  int64_t blocks, rows, prefix, num_q_heads, num_kv_heads, head_dim, group;
  int64_t q_stride_n, k_stride_n, v_stride_n;  // elements between blocks (inner dims dense)
  float scale;
};

}  // namespace
}  // namespace kvcore

#define KVCORE_CPU_KERNELS "block_transformer/token_decoder_attention_cpu_kernels.h"
#include "common/cpu_isa_kernels.h"
#undef KVCORE_CPU_KERNELS

namespace kvcore {
namespace {

void token_decoder_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& block_lens, double scale, at::Tensor& out,
                                 const c10::optional<at::Tensor>& lse) {
  const TokenDecoderShape s = check_token_decoder(q, k, v, block_lens, out, lse);
  check_scale(scale);
  if (s.blocks == 0 || s.block_length == 0 || s.num_q_heads == 0) return;

  TokenDecoderCpuParams p{};
  p.blocks = s.blocks;
  p.rows = s.block_length;
  p.prefix = s.prefix;
  p.num_q_heads = s.num_q_heads;
  p.num_kv_heads = s.num_kv_heads;
  p.head_dim = s.head_dim;
  p.group = s.group;
  p.q_stride_n = q.stride(0);
  p.k_stride_n = k.stride(0);
  p.v_stride_n = v.stride(0);
  p.scale = static_cast<float>(scale);

  const int32_t* lens = block_lens.has_value() ? block_lens->const_data_ptr<int32_t>() : nullptr;
  float* lse_ptr = lse.has_value() ? lse->mutable_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "token_decoder_attention_cpu", [&] {
    const auto blocks = KVCORE_CPU_PICK(token_decoder_blocks<scalar_t>);
    blocks(p, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), lens,
           out.mutable_data_ptr<scalar_t>(), lse_ptr);
  });
}

}  // namespace
}  // namespace kvcore

TORCH_LIBRARY_IMPL(kvcore, CPU, m) { m.impl("token_decoder_attention", &kvcore::token_decoder_attention_cpu); }
