// CPU kernel of kvcore::mla_decode: absorbed MLA decode over a paged latent cache.
//
// MLA decode is multi-query attention with one shared KV head whose key is the whole latent
// row (Dk = 576) and whose value is the row's first Dv (512) columns, so it follows
// gqa_decode_cpu with group = H: one task per (sequence, part of its key range); a task reads
// each latent row once, converts it to fp32 once and uses it for the logits of every head and
// then, as the value, for every head's accumulator. An online softmax runs per head over chunks
// of kChunk keys. Parts of one sequence (split so that small batches still use every thread)
// write a normalised partial output and its log-sum-exp, merged at the end in part order, so
// results are deterministic at a fixed thread count.
//
// num_splits > 0 forces the part count (capped at one part per kChunk keys of the longest
// sequence and at kMaxKvSplits, which bound the scratch), so the parts, their chunk boundaries and the merge order no longer depend on the
// thread count: results are then bitwise identical across calls and thread counts
// (tests/test_determinism.py). num_splits = 0 picks the count from the thread count as before.
//
// Safety without validation: seq_len is clamped to [0, max_pages * page_size] and each page
// index to [0, num_pages); bad index contents give wrong numbers, never an out-of-bounds read.
// `workspace` only matters to the CUDA split-KV path and is ignored here.
//
// The kernels themselves are in mla/mla_decode_cpu_kernels.h, compiled once per instruction set
// (baseline, AVX2, AVX-512: common/cpu_isa.h); the op below runs the copy that KVCORE_CPU_ISA
// picked. Under KVCORE_CPU_ISA=avx512bf16, bf16 inputs take the AVX-512 copy's mla_bf16 path
// (AVX512_BF16 dot products, the softmax weights rounded to bf16 before P V).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/split_limits.h"
#include "common/cpu_isa.h"

namespace kvcore {
namespace {

constexpr int64_t kChunk = 32;           // keys per online-softmax step
// A sequence is cut into parts of at least this many multiply-adds (and kChunk keys): a key costs
// H (Dk + Dv), so 256 keys at H16, 32 at H128. (A fixed 256 keys left B1 H128 S256 on one thread:
// 0.28 ms against torch's 0.14 on two; session 26.)
constexpr int64_t kMinPartMacs = int64_t(1) << 22;

}  // namespace
}  // namespace kvcore

#define KVCORE_CPU_KERNELS "mla/mla_decode_cpu_kernels.h"
#include "common/cpu_isa_kernels.h"
#undef KVCORE_CPU_KERNELS

namespace kvcore {
namespace {

void mla_decode_cpu(const at::Tensor& q, const at::Tensor& latent_cache, const at::Tensor& block_table,
                    const at::Tensor& seq_lens, double scale, at::Tensor& out, const c10::optional<at::Tensor>& lse,
                    const c10::optional<at::Tensor>& workspace, int64_t num_splits, int64_t plan_total_keys,
                    int64_t plan_max_keys) {
  (void)workspace;  // and the plan hint: the CPU parts follow num_splits and the thread count
  const MlaDecodeShape s = check_mla_decode(q, latent_cache, block_table, seq_lens, scale, out, lse, num_splits);
  check_plan_keys(plan_total_keys, plan_max_keys);
  if (s.batch == 0 || s.num_heads == 0) return;
  float* lse_ptr = lse.has_value() ? lse->mutable_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mla_decode_cpu", [&] {
    const auto decode = KVCORE_CPU_PICK(mla_decode_tasks<scalar_t>);
    decode(s, q.const_data_ptr<scalar_t>(), q.stride(0), q.stride(1), latent_cache.const_data_ptr<scalar_t>(),
           latent_cache.stride(0), block_table.const_data_ptr<int32_t>(), seq_lens.const_data_ptr<int32_t>(),
           static_cast<float>(scale), num_splits, cpu_bf16_dot(), cpu_amx(), out.mutable_data_ptr<scalar_t>(),
           lse_ptr);
  });
}

}  // namespace
}  // namespace kvcore

TORCH_LIBRARY_IMPL(kvcore, CPU, m) { m.impl("mla_decode", &kvcore::mla_decode_cpu); }
