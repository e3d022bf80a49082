// Every kvcore op schema, in one place. Implementations register per backend next to their
// kernels (TORCH_LIBRARY_IMPL(kvcore, CPU/CUDA) in csrc/<area>/). Outputs are passed in and
// marked mutated (Tensor(a!)) so callers can preallocate them and capture the ops in CUDA graphs.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// kvcore._C is imported for its side effect (registering the ops); it has no Python members.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(kvcore, m) {
  // Write T new tokens k/v [T, Hkv, D] into the paged caches [pages, page_size, Hkv, D] at
  // slot_mapping [T] int64 (slot = page * page_size + offset; -1 skips the token).
  m.def("append_paged_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");

  // One query token per sequence against the paged cache.
  //   q [B, Hq, D]; k_cache/v_cache [pages, page_size, Hkv, D]; block_table [B, max_pages] int32;
  //   seq_lens [B] int32; out [B, Hq, D] (q's dtype); lse [B, Hq] fp32, natural log (optional).
  //   window_left < 0: no sliding window, else keys in [seq_len - 1 - window_left, seq_len).
  //   logit_soft_cap > 0: logits = cap * tanh(scale * q.k / cap).
  //   workspace: uint8 scratch for split-KV partials (CUDA; zero-filled once, self-resetting);
  //   num_splits: 0 picks the split count from the shapes, n > 0 forces n (deterministic output).
  //   score (optional, H2O accumulation): [B, Hkv, S] fp32 contiguous, S >= max_pages * page_size;
  //   score[b, h, p] += sum over the query heads of KV group h of their softmax probability of
  //   key p, for the keys attended (the window's, with the soft cap applied); others unchanged.
  //   On CUDA it needs workspace room for the step's logits (see ops.gqa_decode).
  //   plan_total_keys, plan_max_keys (CUDA, automatic split count only): the keys the batch attends
  //   in all and in its longest sequence, each sequence's count already windowed and clamped to
  //   the table, counted on the host by the caller (0, 0: unknown); they size the split plan and
  //   (equal lengths: total = B x max) may pick the kernel, never what the kernel reads, so a
  //   wrong value only makes it slower.
  m.def(
      "gqa_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
      "float scale, int window_left, float logit_soft_cap, Tensor(a!) out, Tensor(b!)? lse, "
      "Tensor(c!)? workspace, int num_splits, Tensor(d!)? score=None, int plan_total_keys=0, "
      "int plan_max_keys=0) -> ()");

  // Merge two partial attention results over disjoint key sets:
  //   out = (exp(lse_a) * out_a + exp(lse_b) * out_b) / (exp(lse_a) + exp(lse_b)), lse = logaddexp.
  //   out_* [N, H, D], lse_* [N, H] fp32 (-inf marks an empty part). out and lse may be out_a
  //   and lse_a (in-place accumulate): each element is read before it is written.
  m.def(
      "merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b, "
      "Tensor(a!) out, Tensor(b!) lse) -> ()");

  // Block-sparse decode: like gqa_decode (same q, caches, block_table, seq_lens, out, lse,
  // workspace, num_splits), but each (sequence b, KV head h) attends only to the tokens of the
  // pages it selects, and all query heads of the KV group share that selection.
  //   sel_pages [B, Hkv, max_sel] int32: LOGICAL page numbers j (tokens j*page_size ..
  //   j*page_size + page_size - 1 of the sequence, read through block_table[b, j]);
  //   sel_counts [B, Hkv] int32 in [0, max_sel]: only sel_pages[b, h, :sel_counts[b, h]] are
  //   read, entries past the count may hold anything. The keys of (b, h) are the positions p
  //   with p // page_size in the listed pages and p < seq_lens[b] (a partial last page is cut at
  //   seq_len); listed order does not matter. A page must be listed at most once and lie in
  //   [0, ceil(seq_len / page_size)) (checked by the Python wrapper when validation is on; the
  //   kernels clamp every index and skip positions >= seq_len). An empty selection gives out 0,
  //   lse -inf. logit_soft_cap > 0: logits = cap * tanh(scale * q.k / cap). Sinks and a local
  //   window are pages in the list (kvcore.block_sparse.build_selection).
  m.def(
      "block_sparse_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
      "Tensor sel_pages, Tensor sel_counts, float scale, float logit_soft_cap, Tensor(a!) out, "
      "Tensor(b!)? lse, Tensor(c!)? workspace, int num_splits) -> ()");
  // Block Transformer token decoder, prefill of many blocks at once (Ho et al. 2024).
  //   q [N, L, Hq, D]: the L token queries of N blocks; k, v [N, P + L, Hkv, D]: each block's P
  //   prefix slots, then its L tokens. Token i of a block attends to the P prefix slots and to
  //   tokens 0..i of its own block (nothing outside the block). block_lens [N] int32 (optional):
  //   valid tokens per block, 0..L; rows i >= block_lens[n] get out 0 and lse -inf.
  //   out [N, L, Hq, D] (q's dtype); lse [N, L, Hq] fp32, natural log (optional).
  m.def(
      "token_decoder_attention(Tensor q, Tensor k, Tensor v, Tensor? block_lens, float scale, "
      "Tensor(a!) out, Tensor(b!)? lse) -> ()");

  // ---- MLA (DeepSeek-V2/V3 multi-head latent attention) ----
  // Latent projection of T new tokens into the paged latent cache [pages, page_size, R + P]
  // (R = kv_lora_rank, 512 for DeepSeek; P = qk_rope_head_dim, 64):
  //   kv = hidden [T, d_model] @ w_dkv [d_model, R + P]      (fp32 accumulation)
  //   c_kv = RMSNorm(kv[:, :R]) * norm_weight [R]            (eps added to the mean square)
  //   k_pe = RoPE(kv[:, R:], positions [T] int64)            (cos_sin [max_pos, P] fp32: columns
  //          0..P/2-1 cos(pos * f_i), columns P/2..P-1 sin(pos * f_i); interleaved_rope rotates
  //          pairs (2i, 2i+1) (DeepSeek), else pairs (i, i + P/2) (NeoX half split))
  //   latent_cache[slot // page_size, slot % page_size] = [c_kv, k_pe] at slot_mapping [T] int64
  //   (-1 skips the token); c_kv_out [T, R] and k_pe_out [T, P] (optional) receive every token.
  //   hidden, w_dkv, norm_weight, latent_cache and the outputs share one dtype.
  m.def(
      "mla_latent_project(Tensor hidden, Tensor w_dkv, Tensor norm_weight, float eps, Tensor cos_sin, "
      "Tensor positions, Tensor(a!) latent_cache, Tensor slot_mapping, bool interleaved_rope, "
      "Tensor(b!)? c_kv_out, Tensor(c!)? k_pe_out) -> ()");

  // Absorbed MLA decode: one query token per sequence against the paged latent cache.
  //   q [B, H, Dk] (Dk = R + P: q_nope absorbed through W_UK into R, then the roped q_pe);
  //   latent_cache [pages, page_size, Dk]; block_table [B, max_pages] int32; seq_lens [B] int32.
  //   Keys are the latents, values their first Dv = out.size(2) columns (c_KV, Dv = R):
  //   out [B, H, Dv] (q's dtype) = softmax(scale * q . latent) @ latent[:, :Dv];
  //   lse [B, H] fp32, natural log (optional). workspace / num_splits / plan_total_keys /
  //   plan_max_keys as in gqa_decode (the hint sizes the split plan only; above 16 heads it
  //   doubles or caps the shapes' count, see split_plan.h's choose_splits_dominant).
  m.def(
      "mla_decode(Tensor q, Tensor latent_cache, Tensor block_table, Tensor seq_lens, float scale, "
      "Tensor(a!) out, Tensor(b!)? lse, Tensor(c!)? workspace, int num_splits, int plan_total_keys=0, "
      "int plan_max_keys=0) -> ()");
  // Eviction scores (issue 6). The window's w queries q [B, w, Hq, D] are the last w positions
  // of each sequence: query i sits at position seq_lens[b] - w + i and sees keys 0..that
  // position. Per key p < seq_lens[b]:
  //   out[b, h, p] = reduce over (i, g) of softmax_p(scale * q[b, i, h*G+g] . k_p)
  //   reduction "sum" | "mean" (sum / (w * G)) | "max"; keys p >= seq_lens[b] get 0.
  //   lse [B, w, Hq] fp32 (optional): each row's log-sum-exp over the keys it sees, given by the
  //   caller (one pass instead of two). pooling "none" | "avg" | "max" with pool_kernel 5 or 7:
  //   1-D pooling, stride 1, padding pool_kernel // 2, of the scores of the prefix keys
  //   p < seq_lens[b] - w (window keys are not pooled); avg counts the zero padding.
  //   k_cache [pages, page_size, Hkv, D]; block_table [B, max_pages] int32; seq_lens [B] int32;
  //   out [B, Hkv, S] fp32 with S >= max seq_len.
  m.def(
      "attention_scores(Tensor q, Tensor k_cache, Tensor block_table, Tensor seq_lens, Tensor? lse, float scale, "
      "str reduction, str pooling, int pool_kernel, Tensor(a!) out) -> ()");
  // In-place compaction of a paged cache after eviction. For each sequence b and KV head h, the
  // tokens kept[b, h, :kept_lens[b]] (int64 positions, strictly increasing, < seq_lens[b]) move
  // to positions 0..kept_lens[b]-1 of that head, in order; then seq_lens[b] = kept_lens[b].
  // Every head of a sequence keeps the same count (decode reads one seq_len per sequence).
  m.def(
      "compact_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor block_table, Tensor(c!) seq_lens, Tensor kept, "
      "Tensor kept_lens) -> ()");
  // ---- InfLLM memory retrieval (issue 5) ----
  // Unit scores: q [B, Hq, D] (repr_keys' dtype, or float32), repr_keys [B, U, Hkv, D] (the last
  // three dims densely packed; the batch stride is free, so a [:, :U] slice of a larger buffer
  // works). With G = Hq / Hkv, in fp32:
  //   s[b, h, u] = sum_{g < G} q[b, h * G + g] . repr_keys[b, u, h]
  //   out fp32 [B, Hkv, U] receives s (each KV head ranks its own units); out fp32 [B, U]
  //   receives sum_h s (InfLLM: one set of units for all heads). out's rank picks the form.
  m.def("infllm_unit_scores(Tensor q, Tensor repr_keys, Tensor(a!) out) -> ()");
  // Row-wise top-k: scores [N, U] fp32 (last dim contiguous) -> values [N, k] fp32 and
  // indices [N, k] int32 or int64, k = values.size(1) in [1, 256], best first. The order is
  // total: descending score, equal scores by ascending index, -0.0 equal to +0.0, NaN below
  // everything (-inf included). Slots j >= U (k > U) get value -inf and index -1.
  m.def("topk_rows(Tensor scores, Tensor(a!) values, Tensor(b!) indices) -> ()");

  // The instruction set the CPU attention kernels run with in this process: "baseline", "avx2",
  // "avx512" or "avx512bf16" (KVCORE_CPU_ISA, read once; an invalid setting raises here too).
  m.def("cpu_isa() -> str");
}
