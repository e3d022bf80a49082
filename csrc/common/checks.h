// Host-side input validation shared by the CPU and CUDA launchers of every op.
// Every check names the argument and what was expected, so bad input is a Python RuntimeError
// with a message, never a crash. Index *contents* (page numbers, seq_lens) live in device memory
// and are checked by the Python wrappers when validation is on (kvcore.set_validation).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>

namespace kvcore {

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == rank, name, " must be ", rank, "-D ", layout, ", got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  if (t.is_cuda()) {
    TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf, name, " must be bfloat16 or float16 on CUDA, got ", dt);
  } else {
    TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, name,
                " must be bfloat16, float16 or float32 on CPU, got ", dt);
  }
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides(), " for shape ",
              t.sizes());
}

// The innermost `inner` dims of t must be densely packed (t may still be strided in the outer
// dims, e.g. a page-strided view of a combined K/V allocation). A tensor without elements has no
// layout to get wrong (its strides are arbitrary, and nothing is read).
inline void check_inner_dense(const at::Tensor& t, int64_t inner, const char* name) {
  if (t.numel() == 0) return;
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= t.dim() - inner; --d) {
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) == expected, name, " must be densely packed in its last ", inner,
                " dims, got strides ", t.strides(), " for shape ", t.sizes());
    expected *= t.size(d);
  }
}

// A cache an op writes in place: its pages must not overlap (a page stride below a page's
// elements, or 0 for an expanded cache, would make writes to one page land in another and the
// result depend on their order). Caches that are only read may overlap.
inline void check_pages_distinct(const at::Tensor& cache, const char* name) {
  if (cache.numel() == 0 || cache.size(0) <= 1) return;
  const int64_t page_elems = cache.numel() / cache.size(0);
  TORCH_CHECK(cache.stride(0) >= page_elems, name, "'s pages overlap: page stride ", cache.stride(0), " < ",
              page_elems, " elements a page; an op that writes the cache needs distinct pages");
}

// Two caches an op writes must not be one memory (V would overwrite K).
inline void check_not_same_memory(const at::Tensor& a, const at::Tensor& b, const char* a_name, const char* b_name) {
  TORCH_CHECK(a.numel() == 0 || a.data_ptr() != b.data_ptr(), a_name, " and ", b_name,
              " are the same memory; pass separate caches (or two halves of one allocation)");
}

// A tensor argument and its name, for the overlap checks below (t null: an optional not given).
struct NamedTensor {
  const at::Tensor* t;
  const char* name;
};
inline NamedTensor named(const at::Tensor& t, const char* name) { return {&t, name}; }
inline NamedTensor named(const c10::optional<at::Tensor>& t, const char* name) {
  return {t.has_value() ? &*t : nullptr, name};
}

// A tensor an op writes must share no byte with another of its tensor arguments: the kernels read
// their inputs while they write their outputs, in an order no caller may rely on, so an output
// over an input (or over another output) gives wrong numbers without an error. For two tensors
// without gaps (is_non_overlapping_and_dense: contiguous ones, whatever their dtype, so an lse
// viewed out of out's bytes is caught) it compares their byte ranges, which also catches aliases
// from outside torch's views (DLPack, from_blob: other storages over the same bytes, which ATen's
// overlap test passes). Where either has gaps (the two interleaved halves of one [pages, 2, ...]
// cache, an expanded q) it cannot tell cheaply, and then only a shared first byte counts.
// may_be_same: the op allows exactly the other tensor's memory (merge's out = out_a). Only the
// const pointer accessors are used: the mutable one would copy a copy-on-write input.
inline void check_apart(const NamedTensor& written, const NamedTensor& other, bool may_be_same = false) {
  if (written.t == nullptr || other.t == nullptr || !written.t->defined() || !other.t->defined()) return;
  const at::Tensor& w = *written.t;
  const at::Tensor& o = *other.t;
  if (w.numel() == 0 || o.numel() == 0) return;
  const char* w0 = static_cast<const char*>(w.const_data_ptr());
  const char* o0 = static_cast<const char*>(o.const_data_ptr());
  bool same = w0 == o0;
  if (w.is_non_overlapping_and_dense() && o.is_non_overlapping_and_dense()) {
    const char* w1 = w0 + w.numel() * w.element_size();
    const char* o1 = o0 + o.numel() * o.element_size();
    if (w1 <= o0 || o1 <= w0) return;
    same = same && w1 == o1;
    if (same && may_be_same && w.scalar_type() == o.scalar_type() &&
        (w.strides() == o.strides() || (w.is_contiguous() && o.is_contiguous())))
      return;
  } else if (!same) {
    return;
  }
  TORCH_CHECK(false, written.name, " and ", other.name, " share memory (",
              same ? "the same memory" : "their bytes overlap", "); ", written.name, " is written while ", other.name,
              " is in use: pass tensors that share no memory");
}

// Each written tensor apart from the written ones after it and from every read one.
inline void check_writes_apart(std::initializer_list<NamedTensor> written, std::initializer_list<NamedTensor> read) {
  for (auto w = written.begin(); w != written.end(); ++w) {
    for (auto o = w + 1; o != written.end(); ++o) check_apart(*w, *o);
    for (const NamedTensor& r : read) check_apart(*w, r);
  }
}

// A paged call's block_table [batch, max_pages] and seq_lens [batch]: int32, contiguous, on
// ref's device.
inline void check_table_and_lens(const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t batch,
                                 const at::Tensor& ref, const char* ref_name) {
  check_rank(block_table, 2, "block_table", "[batch, max_pages]");
  check_rank(seq_lens, 1, "seq_lens", "[batch]");
  check_same_device(block_table, ref, "block_table", ref_name);
  check_same_device(seq_lens, ref, "seq_lens", ref_name);
  check_dtype(block_table, at::kInt, "block_table");
  check_dtype(seq_lens, at::kInt, "seq_lens");
  TORCH_CHECK(block_table.size(0) == batch, "block_table must have batch (", batch, ") rows, got shape ",
              block_table.sizes());
  TORCH_CHECK(seq_lens.size(0) == batch, "seq_lens must have shape [", batch, "], got ", seq_lens.sizes());
  check_contiguous(block_table, "block_table");
  check_contiguous(seq_lens, "seq_lens");
}

// The attention ops that return an lse (gqa_decode, block_sparse_decode, token_decoder_attention,
// merge_attention_states) take heads of at least one dimension: a zero head_dim is an error (their
// kernels used to return early and hand back an lse they never wrote).
inline void check_head_dim(int64_t head_dim, const char* name) {
  TORCH_CHECK(head_dim > 0, name, "'s head_dim (last dim) must be positive, got ", head_dim);
}

// The query heads per KV head; num_q_heads must be a multiple of a positive num_kv_heads.
inline int64_t kv_group(int64_t num_q_heads, int64_t num_kv_heads) {
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, "num_q_heads (", num_q_heads,
              ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  return num_q_heads / num_kv_heads;
}

// An optional lse output: fp32, contiguous, on q's device, of the given shape.
inline void check_optional_lse(const c10::optional<at::Tensor>& lse, const at::Tensor& q,
                               std::initializer_list<int64_t> shape) {
  if (!lse.has_value()) return;
  check_same_device(*lse, q, "lse", "q");
  check_dtype(*lse, at::kFloat, "lse");
  TORCH_CHECK(lse->sizes() == at::IntArrayRef(shape), "lse must have shape ", at::IntArrayRef(shape), ", got ",
              lse->sizes());
  check_contiguous(*lse, "lse");
}

// Shapes of a paged-cache decode call, validated once and shared by both backends.
struct PagedDecodeShape {
  int64_t batch, num_q_heads, num_kv_heads, head_dim, group, num_pages, page_size, max_pages;
};

inline PagedDecodeShape check_paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                           const at::Tensor& block_table, const at::Tensor& seq_lens,
                                           const at::Tensor& out, const c10::optional<at::Tensor>& lse) {
  check_rank(q, 3, "q", "[batch, num_q_heads, head_dim]");
  check_rank(k_cache, 4, "k_cache", "[num_pages, page_size, num_kv_heads, head_dim]");
  check_rank(v_cache, 4, "v_cache", "[num_pages, page_size, num_kv_heads, head_dim]");
  check_rank(out, 3, "out", "[batch, num_q_heads, head_dim]");
  check_table_and_lens(block_table, seq_lens, q.size(0), q, "q");
  for (auto [t, n] : {std::pair{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&out, "out"}})
    check_same_device(*t, q, n, "q");
  check_float_dtype(q, "q");
  check_dtype(k_cache, q.scalar_type(), "k_cache");
  check_dtype(v_cache, q.scalar_type(), "v_cache");
  check_dtype(out, q.scalar_type(), "out");

  PagedDecodeShape s{};
  s.batch = q.size(0);
  s.num_q_heads = q.size(1);
  s.head_dim = q.size(2);
  s.num_pages = k_cache.size(0);
  s.page_size = k_cache.size(1);
  s.num_kv_heads = k_cache.size(2);
  s.max_pages = block_table.size(1);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(3) == s.head_dim, "k_cache head_dim (", k_cache.size(3), ") must equal q head_dim (",
              s.head_dim, ")");
  check_head_dim(s.head_dim, "q");
  s.group = kv_group(s.num_q_heads, s.num_kv_heads);
  TORCH_CHECK(s.page_size > 0, "k_cache page_size must be positive, got ", s.page_size);
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  check_contiguous(out, "out");
  TORCH_CHECK(q.stride(2) == 1, "q must be contiguous in its last dim, got strides ", c10::str(q.strides()));
  check_inner_dense(k_cache, 3, "k_cache");
  check_inner_dense(v_cache, 3, "v_cache");
  check_optional_lse(lse, q, {s.batch, s.num_q_heads});
  check_writes_apart({named(out, "out"), named(lse, "lse")},
                     {named(q, "q"), named(k_cache, "k_cache"), named(v_cache, "v_cache"),
                      named(block_table, "block_table"), named(seq_lens, "seq_lens")});
  return s;
}

// The kernels take their scalars as float: a finite double past float's range would become inf
// there (a scale of 1e39 made every output NaN), and a positive one below float's smallest normal
// value becomes 0 or a denormal that flushes to 0 (a logit_soft_cap of 1e-300 turned the cap off,
// an eps of 1e-300 made an all-zero row NaN), so positive scalars are checked against float's
// normal range.
inline bool positive_float32(double x) {
  return std::isfinite(x) && x >= double(std::numeric_limits<float>::min()) &&
         x <= double(std::numeric_limits<float>::max());
}

// A softmax scale: positive, finite, within float's range.
inline void check_scale(double scale) {
  TORCH_CHECK(positive_float32(scale), "scale must be a positive finite float (within float32's range), got ", scale);
}

// Scalar arguments of gqa_decode, checked by the op itself (C++ callers bypass ops.py).
inline void check_decode_scalars(double scale, int64_t window_left, double logit_soft_cap, int64_t num_splits) {
  check_scale(scale);
  TORCH_CHECK(window_left >= -1, "window_left must be -1 (no window) or >= 0, got ", window_left);
  TORCH_CHECK(logit_soft_cap == 0.0 || positive_float32(logit_soft_cap),
              "logit_soft_cap must be 0 (off) or a positive finite float (within float32's range), got ", logit_soft_cap);
  TORCH_CHECK(num_splits >= 0, "num_splits must be 0 (automatic) or positive, got ", num_splits);
}

// gqa_decode's and mla_decode's split-plan hint: the batch's attended keys in all and in its
// longest sequence, as the caller counted them on the host (0, 0: none).
inline void check_plan_keys(int64_t plan_total_keys, int64_t plan_max_keys) {
  TORCH_CHECK(plan_total_keys >= 0, "plan_total_keys must be >= 0, got ", plan_total_keys);
  TORCH_CHECK(plan_max_keys >= 0, "plan_max_keys must be >= 0, got ", plan_max_keys);
  TORCH_CHECK(plan_max_keys > 0 || plan_total_keys == 0, "plan_total_keys must be 0 when plan_max_keys is 0, got ",
              plan_total_keys);
}

// gqa_decode's optional H2O score buffer: [B, Hkv, S] fp32 contiguous on q's device, with
// S >= max_pages * page_size (every position the block table can address has a slot).
inline void check_decode_score(const at::Tensor& score, const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& block_table, const at::Tensor& seq_lens,
                               const at::Tensor& out, const c10::optional<at::Tensor>& lse,
                               const PagedDecodeShape& s) {
  check_same_device(score, q, "score", "q");
  check_dtype(score, at::kFloat, "score");
  TORCH_CHECK(score.dim() == 3 && score.size(0) == s.batch && score.size(1) == s.num_kv_heads &&
                  score.size(2) >= s.max_pages * s.page_size,
              "score must have shape [", s.batch, ", ", s.num_kv_heads, ", S] with S >= max_pages * page_size = ",
              s.max_pages * s.page_size, ", got ", score.sizes());
  check_contiguous(score, "score");
  check_writes_apart({named(score, "score")}, {named(q, "q"), named(k_cache, "k_cache"), named(v_cache, "v_cache"),
                                              named(block_table, "block_table"), named(seq_lens, "seq_lens"),
                                              named(out, "out"), named(lse, "lse")});
}

struct AppendShape {
  int64_t tokens, num_kv_heads, head_dim, num_slots;
};

inline AppendShape check_append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  check_rank(k, 3, "k", "[tokens, num_kv_heads, head_dim]");
  check_rank(v, 3, "v", "[tokens, num_kv_heads, head_dim]");
  check_rank(k_cache, 4, "k_cache", "[num_pages, page_size, num_kv_heads, head_dim]");
  check_rank(v_cache, 4, "v_cache", "[num_pages, page_size, num_kv_heads, head_dim]");
  check_rank(slot_mapping, 1, "slot_mapping", "[tokens]");
  for (auto [t, n] : {std::pair{&v, "v"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&slot_mapping, "slot_mapping"}})
    check_same_device(*t, k, n, "k");
  check_float_dtype(k_cache, "k_cache");
  check_dtype(v_cache, k_cache.scalar_type(), "v_cache");
  check_dtype(k, k_cache.scalar_type(), "k");
  check_dtype(v, k_cache.scalar_type(), "v");
  check_dtype(slot_mapping, at::kLong, "slot_mapping");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3), "k must be [tokens, ", k_cache.size(2),
              ", ", k_cache.size(3), "] to match k_cache, got ", k.sizes());
  TORCH_CHECK(slot_mapping.size(0) == k.size(0), "slot_mapping must have shape [", k.size(0), "] (one slot per token), got ",
              slot_mapping.sizes());
  check_inner_dense(k, 2, "k");
  check_inner_dense(v, 2, "v");
  check_inner_dense(k_cache, 3, "k_cache");
  check_inner_dense(v_cache, 3, "v_cache");
  check_pages_distinct(k_cache, "k_cache");
  check_pages_distinct(v_cache, "v_cache");
  check_not_same_memory(k_cache, v_cache, "k_cache", "v_cache");
  check_contiguous(slot_mapping, "slot_mapping");
  check_writes_apart({named(k_cache, "k_cache"), named(v_cache, "v_cache")},
                     {named(k, "k"), named(v, "v"), named(slot_mapping, "slot_mapping")});
  return {k.size(0), k.size(1), k.size(2), k_cache.size(0) * k_cache.size(1)};
}

struct MergeShape {
  int64_t rows, heads, head_dim;
};

inline MergeShape check_merge(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                              const at::Tensor& lse_b, const at::Tensor& out, const at::Tensor& lse) {
  check_rank(out_a, 3, "out_a", "[N, H, D]");
  check_float_dtype(out_a, "out_a");
  check_head_dim(out_a.size(2), "out_a");
  for (auto [t, n] : {std::pair{&out_b, "out_b"}, {&out, "out"}}) {
    TORCH_CHECK(t->sizes() == out_a.sizes(), n, " must have the shape of out_a ", out_a.sizes(), ", got ",
                t->sizes());
    check_dtype(*t, out_a.scalar_type(), n);
  }
  for (auto [t, n] : {std::pair{&lse_a, "lse_a"}, {&lse_b, "lse_b"}, {&lse, "lse"}}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == out_a.size(0) && t->size(1) == out_a.size(1), n, " must have shape [",
                out_a.size(0), ", ", out_a.size(1), "], got ", t->sizes());
    check_dtype(*t, at::kFloat, n);
  }
  for (auto [t, n] : {std::pair{&lse_a, "lse_a"}, {&out_b, "out_b"}, {&lse_b, "lse_b"}, {&out, "out"}, {&lse, "lse"}})
    check_same_device(*t, out_a, n, "out_a");
  for (auto [t, n] : {std::pair{&out_a, "out_a"}, {&lse_a, "lse_a"}, {&out_b, "out_b"}, {&lse_b, "lse_b"}, {&out, "out"},
                      {&lse, "lse"}})
    check_contiguous(*t, n);
  // out may be out_a or out_b itself and lse lse_a or lse_b (in-place accumulation: each row's
  // inputs are read before its outputs are written); any other sharing is refused.
  const NamedTensor o{&out, "out"}, l{&lse, "lse"};
  check_apart(o, l);
  for (auto [t, n] : {std::pair{&out_a, "out_a"}, {&out_b, "out_b"}}) {
    check_apart(o, {t, n}, /*may_be_same=*/true);
    check_apart(l, {t, n});
  }
  for (auto [t, n] : {std::pair{&lse_a, "lse_a"}, {&lse_b, "lse_b"}}) {
    check_apart(o, {t, n});
    check_apart(l, {t, n}, /*may_be_same=*/true);
  }
  return {out_a.size(0), out_a.size(1), out_a.size(2)};
}

// Shapes of a block_sparse_decode call: the paged-decode shapes plus the selection's width.
struct BlockSparseDecodeShape {
  PagedDecodeShape paged;
  int64_t max_sel;
};

// The paged-decode checks, then the selection: sel_pages [batch, num_kv_heads, max_sel] int32
// (logical page numbers) and sel_counts [batch, num_kv_heads] int32, contiguous, on q's device.
// max_sel may be 0 (every selection empty). Their *contents* are checked by the Python wrapper.
inline BlockSparseDecodeShape check_block_sparse_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                                        const at::Tensor& v_cache, const at::Tensor& block_table,
                                                        const at::Tensor& seq_lens, const at::Tensor& sel_pages,
                                                        const at::Tensor& sel_counts, const at::Tensor& out,
                                                        const c10::optional<at::Tensor>& lse) {
  BlockSparseDecodeShape s{};
  s.paged = check_paged_decode(q, k_cache, v_cache, block_table, seq_lens, out, lse);
  check_rank(sel_pages, 3, "sel_pages", "[batch, num_kv_heads, max_sel]");
  check_rank(sel_counts, 2, "sel_counts", "[batch, num_kv_heads]");
  check_same_device(sel_pages, q, "sel_pages", "q");
  check_same_device(sel_counts, q, "sel_counts", "q");
  check_dtype(sel_pages, at::kInt, "sel_pages");
  check_dtype(sel_counts, at::kInt, "sel_counts");
  TORCH_CHECK(sel_pages.size(0) == s.paged.batch && sel_pages.size(1) == s.paged.num_kv_heads,
              "sel_pages must have shape [batch, num_kv_heads, max_sel] = [", s.paged.batch, ", ",
              s.paged.num_kv_heads, ", max_sel], got ", sel_pages.sizes());
  TORCH_CHECK(sel_counts.size(0) == s.paged.batch && sel_counts.size(1) == s.paged.num_kv_heads,
              "sel_counts must have shape [batch, num_kv_heads] = [", s.paged.batch, ", ", s.paged.num_kv_heads,
              "], got ", sel_counts.sizes());
  check_contiguous(sel_pages, "sel_pages");
  check_contiguous(sel_counts, "sel_counts");
  check_writes_apart({named(out, "out"), named(lse, "lse")},
                     {named(sel_pages, "sel_pages"), named(sel_counts, "sel_counts")});
  s.max_sel = sel_pages.size(2);
  return s;
}

}  // namespace kvcore

// ---- token_decoder_attention (Block Transformer token decoder, prefill) ----------------------
namespace kvcore {

// Shapes of a token_decoder_attention call, validated once and shared by both backends.
struct TokenDecoderShape {
  int64_t blocks;        // N
  int64_t block_length;  // L: query rows (tokens) per block
  int64_t prefix;        // P: prefix slots before the tokens in k/v (k.size(1) - L)
  int64_t num_q_heads, num_kv_heads, head_dim, group;
};

inline TokenDecoderShape check_token_decoder(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const c10::optional<at::Tensor>& block_lens, const at::Tensor& out,
                                             const c10::optional<at::Tensor>& lse) {
  check_rank(q, 4, "q", "[blocks, block_length, num_q_heads, head_dim]");
  check_rank(k, 4, "k", "[blocks, prefix + block_length, num_kv_heads, head_dim]");
  check_rank(v, 4, "v", "[blocks, prefix + block_length, num_kv_heads, head_dim]");
  check_rank(out, 4, "out", "[blocks, block_length, num_q_heads, head_dim]");
  for (auto [t, n] : {std::pair{&k, "k"}, {&v, "v"}, {&out, "out"}}) check_same_device(*t, q, n, "q");
  check_float_dtype(q, "q");
  check_dtype(k, q.scalar_type(), "k");
  check_dtype(v, q.scalar_type(), "v");
  check_dtype(out, q.scalar_type(), "out");

  TokenDecoderShape s{};
  s.blocks = q.size(0);
  s.block_length = q.size(1);
  s.num_q_heads = q.size(2);
  s.head_dim = q.size(3);
  s.num_kv_heads = k.size(2);
  TORCH_CHECK(k.size(0) == s.blocks, "k must have blocks = ", s.blocks, " (q's first dim) in dim 0, got shape ",
              k.sizes());
  TORCH_CHECK(k.size(1) >= s.block_length, "k must have prefix + block_length >= block_length = ", s.block_length,
              " rows per block (q's dim 1), got shape ", k.sizes());
  s.prefix = k.size(1) - s.block_length;
  TORCH_CHECK(k.size(3) == s.head_dim, "k head_dim (", k.size(3), ") must equal q head_dim (", s.head_dim, ")");
  check_head_dim(s.head_dim, "q");
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  s.group = kv_group(s.num_q_heads, s.num_kv_heads);
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  check_contiguous(out, "out");
  // Each block's rows must be one dense slab ([L, Hq, D] of q, [P + L, Hkv, D] of k and v);
  // the blocks themselves may be strided (e.g. k[:, :P] of a larger [N, P + L, ...] tensor).
  check_inner_dense(q, 3, "q");
  check_inner_dense(k, 3, "k");
  check_inner_dense(v, 3, "v");
  if (block_lens.has_value()) {
    check_rank(*block_lens, 1, "block_lens", "[blocks]");
    check_same_device(*block_lens, q, "block_lens", "q");
    check_dtype(*block_lens, at::kInt, "block_lens");
    TORCH_CHECK(block_lens->size(0) == s.blocks, "block_lens must have shape [", s.blocks, "] (one length per block), got ",
                block_lens->sizes());
    check_contiguous(*block_lens, "block_lens");
  }
  check_optional_lse(lse, q, {s.blocks, s.block_length, s.num_q_heads});
  check_writes_apart({named(out, "out"), named(lse, "lse")},
                     {named(q, "q"), named(k, "k"), named(v, "v"), named(block_lens, "block_lens")});
  return s;
}

// ---- MLA ---------------------------------------------------------------------------------

// Shapes of an mla_latent_project call. R = kv_lora_rank (norm_weight's length), P = rope dim
// (cos_sin's width), latent width R + P (w_dkv's columns and latent_cache's last dim).
struct MlaProjectShape {
  int64_t tokens, d_model, rank, rope_dim, max_pos, num_pages, page_size;
};

inline MlaProjectShape check_mla_latent_project(const at::Tensor& hidden, const at::Tensor& w_dkv,
                                                const at::Tensor& norm_weight, double eps,
                                                const at::Tensor& cos_sin, const at::Tensor& positions,
                                                const at::Tensor& latent_cache, const at::Tensor& slot_mapping,
                                                const c10::optional<at::Tensor>& c_kv_out,
                                                const c10::optional<at::Tensor>& k_pe_out) {
  check_rank(hidden, 2, "hidden", "[tokens, d_model]");
  check_rank(w_dkv, 2, "w_dkv", "[d_model, kv_lora_rank + rope_dim]");
  check_rank(norm_weight, 1, "norm_weight", "[kv_lora_rank]");
  check_rank(cos_sin, 2, "cos_sin", "[max_position, rope_dim]");
  check_rank(positions, 1, "positions", "[tokens]");
  check_rank(latent_cache, 3, "latent_cache", "[num_pages, page_size, kv_lora_rank + rope_dim]");
  check_rank(slot_mapping, 1, "slot_mapping", "[tokens]");
  for (auto [t, n] : {std::pair{&w_dkv, "w_dkv"}, {&norm_weight, "norm_weight"}, {&cos_sin, "cos_sin"},
                      {&positions, "positions"}, {&latent_cache, "latent_cache"}, {&slot_mapping, "slot_mapping"}})
    check_same_device(*t, hidden, n, "hidden");
  check_float_dtype(hidden, "hidden");
  check_dtype(w_dkv, hidden.scalar_type(), "w_dkv");
  check_dtype(norm_weight, hidden.scalar_type(), "norm_weight");
  check_dtype(latent_cache, hidden.scalar_type(), "latent_cache");
  check_dtype(cos_sin, at::kFloat, "cos_sin");
  check_dtype(positions, at::kLong, "positions");
  check_dtype(slot_mapping, at::kLong, "slot_mapping");
  TORCH_CHECK(positive_float32(eps), "eps must be a positive finite float (within float32's range), got ", eps);

  MlaProjectShape s{};
  s.tokens = hidden.size(0);
  s.d_model = hidden.size(1);
  s.rank = norm_weight.size(0);
  s.rope_dim = cos_sin.size(1);
  s.max_pos = cos_sin.size(0);
  s.num_pages = latent_cache.size(0);
  s.page_size = latent_cache.size(1);
  const int64_t width = s.rank + s.rope_dim;
  TORCH_CHECK(s.rope_dim > 0 && s.rope_dim % 2 == 0, "cos_sin must have an even, positive rope_dim columns, got shape ",
              cos_sin.sizes());
  TORCH_CHECK(s.max_pos > 0, "cos_sin must have at least one position row, got shape ", cos_sin.sizes());
  TORCH_CHECK(s.rank > 0, "norm_weight must have kv_lora_rank > 0 entries, got shape ", norm_weight.sizes());
  TORCH_CHECK(w_dkv.size(0) == s.d_model && w_dkv.size(1) == width, "w_dkv must have shape [", s.d_model, ", ", width,
              "] (d_model, kv_lora_rank + rope_dim from norm_weight and cos_sin), got ", w_dkv.sizes());
  TORCH_CHECK(latent_cache.size(2) == width, "latent_cache must have last dim kv_lora_rank + rope_dim = ", width,
              ", got shape ", latent_cache.sizes());
  TORCH_CHECK(positions.size(0) == s.tokens, "positions must have shape [", s.tokens, "] (one per token), got ",
              positions.sizes());
  TORCH_CHECK(slot_mapping.size(0) == s.tokens, "slot_mapping must have shape [", s.tokens,
              "] (one slot per token), got ", slot_mapping.sizes());
  TORCH_CHECK(hidden.size(1) == 0 || hidden.stride(1) == 1, "hidden must be contiguous in its last dim, got strides ",
              hidden.strides());
  check_contiguous(w_dkv, "w_dkv");
  check_contiguous(norm_weight, "norm_weight");
  check_contiguous(cos_sin, "cos_sin");
  check_contiguous(positions, "positions");
  check_contiguous(slot_mapping, "slot_mapping");
  check_inner_dense(latent_cache, 2, "latent_cache");
  check_pages_distinct(latent_cache, "latent_cache");
  for (auto [o, n, cols] : {std::tuple{&c_kv_out, "c_kv_out", s.rank}, {&k_pe_out, "k_pe_out", s.rope_dim}}) {
    if (!o->has_value()) continue;
    const at::Tensor& t = o->value();
    check_same_device(t, hidden, n, "hidden");
    check_dtype(t, hidden.scalar_type(), n);
    TORCH_CHECK(t.dim() == 2 && t.size(0) == s.tokens && t.size(1) == cols, n, " must have shape [", s.tokens, ", ",
                cols, "], got ", t.sizes());
    check_contiguous(t, n);
  }
  check_writes_apart({named(latent_cache, "latent_cache"), named(c_kv_out, "c_kv_out"), named(k_pe_out, "k_pe_out")},
                     {named(hidden, "hidden"), named(w_dkv, "w_dkv"), named(norm_weight, "norm_weight"),
                      named(cos_sin, "cos_sin"), named(positions, "positions"), named(slot_mapping, "slot_mapping")});
  return s;
}

// Shapes of an mla_decode call: Dk = latent width (q's and latent_cache's last dim), Dv = out's.
struct MlaDecodeShape {
  int64_t batch, num_heads, dk, dv, num_pages, page_size, max_pages;
};

inline MlaDecodeShape check_mla_decode(const at::Tensor& q, const at::Tensor& latent_cache,
                                       const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                                       const at::Tensor& out, const c10::optional<at::Tensor>& lse,
                                       int64_t num_splits) {
  check_rank(q, 3, "q", "[batch, num_heads, kv_lora_rank + rope_dim]");
  check_rank(latent_cache, 3, "latent_cache", "[num_pages, page_size, kv_lora_rank + rope_dim]");
  check_rank(out, 3, "out", "[batch, num_heads, kv_lora_rank]");
  check_table_and_lens(block_table, seq_lens, q.size(0), q, "q");
  check_same_device(latent_cache, q, "latent_cache", "q");
  check_same_device(out, q, "out", "q");
  check_float_dtype(q, "q");
  check_dtype(latent_cache, q.scalar_type(), "latent_cache");
  check_dtype(out, q.scalar_type(), "out");
  check_scale(scale);
  TORCH_CHECK(num_splits >= 0, "num_splits must be 0 (automatic) or positive, got ", num_splits);

  MlaDecodeShape s{};
  s.batch = q.size(0);
  s.num_heads = q.size(1);
  s.dk = q.size(2);
  s.dv = out.size(2);
  s.num_pages = latent_cache.size(0);
  s.page_size = latent_cache.size(1);
  s.max_pages = block_table.size(1);
  TORCH_CHECK(latent_cache.size(2) == s.dk, "latent_cache last dim (", latent_cache.size(2),
              ") must equal q's last dim (", s.dk, ")");
  TORCH_CHECK(s.page_size > 0, "latent_cache page_size must be positive, got ", s.page_size);
  TORCH_CHECK(out.size(0) == s.batch && out.size(1) == s.num_heads && s.dv > 0 && s.dv <= s.dk, "out must have shape [",
              s.batch, ", ", s.num_heads, ", Dv] with 0 < Dv <= ", s.dk, " (q's last dim), got ", out.sizes());
  check_contiguous(out, "out");
  TORCH_CHECK(q.stride(2) == 1, "q must be contiguous in its last dim, got strides ", c10::str(q.strides()));
  check_inner_dense(latent_cache, 2, "latent_cache");
  check_optional_lse(lse, q, {s.batch, s.num_heads});
  check_writes_apart({named(out, "out"), named(lse, "lse")},
                     {named(q, "q"), named(latent_cache, "latent_cache"), named(block_table, "block_table"),
                      named(seq_lens, "seq_lens")});
  return s;
}

// ---- eviction: attention_scores and compact_kv ----------------------------------------------

// Shapes of an attention_scores call.
struct AttentionScoresShape {
  int64_t batch, window, num_q_heads, num_kv_heads, head_dim, group, num_pages, page_size, max_pages, max_len;
};

// q [B, w, Hq, D] (last dim contiguous), k_cache [pages, page_size, Hkv, D] (inner 3 dims dense),
// block_table [B, max_pages] int32, seq_lens [B] int32, optional lse [B, w, Hq] fp32 (contiguous),
// out [B, Hkv, S] fp32 contiguous; everything on q's device. Reductions and pooling are checked by
// check_attention_scores_scalars.
inline AttentionScoresShape check_attention_scores(const at::Tensor& q, const at::Tensor& k_cache,
                                                   const at::Tensor& block_table, const at::Tensor& seq_lens,
                                                   const c10::optional<at::Tensor>& lse, const at::Tensor& out) {
  check_rank(q, 4, "q", "[batch, window, num_q_heads, head_dim]");
  check_rank(k_cache, 4, "k_cache", "[num_pages, page_size, num_kv_heads, head_dim]");
  check_rank(out, 3, "out", "[batch, num_kv_heads, max_len]");
  check_table_and_lens(block_table, seq_lens, q.size(0), q, "q");
  check_same_device(k_cache, q, "k_cache", "q");
  check_same_device(out, q, "out", "q");
  check_float_dtype(q, "q");
  check_dtype(k_cache, q.scalar_type(), "k_cache");
  check_dtype(out, at::kFloat, "out");

  AttentionScoresShape s{};
  s.batch = q.size(0);
  s.window = q.size(1);
  s.num_q_heads = q.size(2);
  s.head_dim = q.size(3);
  s.num_pages = k_cache.size(0);
  s.page_size = k_cache.size(1);
  s.num_kv_heads = k_cache.size(2);
  s.max_pages = block_table.size(1);
  s.max_len = out.size(2);
  TORCH_CHECK(s.window >= 1, "q must hold at least one window query (dim 1), got shape ", q.sizes());
  TORCH_CHECK(k_cache.size(3) == s.head_dim, "k_cache head_dim (", k_cache.size(3), ") must equal q head_dim (",
              s.head_dim, ")");
  s.group = kv_group(s.num_q_heads, s.num_kv_heads);
  TORCH_CHECK(s.page_size > 0, "k_cache page_size must be positive, got ", s.page_size);
  TORCH_CHECK(out.size(0) == s.batch && out.size(1) == s.num_kv_heads, "out must have shape [", s.batch, ", ",
              s.num_kv_heads, ", max_len], got ", out.sizes());
  check_contiguous(out, "out");
  TORCH_CHECK(q.stride(3) == 1, "q must be contiguous in its last dim, got strides ", c10::str(q.strides()));
  // The kernels' scratch grows with the query rows (batch x window x heads); an expanded q
  // (a zero stride) could claim millions of rows in no memory of its own.
  for (int64_t d = 0; d < 3; ++d)
    TORCH_CHECK(q.size(d) <= 1 || q.stride(d) != 0, "q must not be an expanded view (stride 0 in dim ", d,
                "), got strides ", c10::str(q.strides()), " for shape ", c10::str(q.sizes()));
  check_inner_dense(k_cache, 3, "k_cache");
  check_optional_lse(lse, q, {s.batch, s.window, s.num_q_heads});
  check_writes_apart({named(out, "out")}, {named(q, "q"), named(k_cache, "k_cache"), named(block_table, "block_table"),
                                          named(seq_lens, "seq_lens"), named(lse, "lse")});
  return s;
}

enum class ScoreReduction { kSum, kMean, kMax };
enum class ScorePooling { kNone, kAvg, kMax };

struct AttentionScoresOptions {
  ScoreReduction reduction;
  ScorePooling pooling;
  int64_t pool_kernel;
};

inline AttentionScoresOptions check_attention_scores_scalars(double scale, const std::string& reduction,
                                                             const std::string& pooling, int64_t pool_kernel) {
  check_scale(scale);
  AttentionScoresOptions o{};
  if (reduction == "sum") o.reduction = ScoreReduction::kSum;
  else if (reduction == "mean") o.reduction = ScoreReduction::kMean;
  else if (reduction == "max") o.reduction = ScoreReduction::kMax;
  else TORCH_CHECK(false, "reduction must be 'sum', 'mean' or 'max', got '", reduction, "'");
  if (pooling == "none") o.pooling = ScorePooling::kNone;
  else if (pooling == "avg") o.pooling = ScorePooling::kAvg;
  else if (pooling == "max") o.pooling = ScorePooling::kMax;
  else TORCH_CHECK(false, "pooling must be 'none', 'avg' or 'max', got '", pooling, "'");
  if (o.pooling != ScorePooling::kNone)
    TORCH_CHECK(pool_kernel == 5 || pool_kernel == 7, "pool_kernel must be 5 or 7 when pooling is on, got ",
                pool_kernel);
  o.pool_kernel = o.pooling == ScorePooling::kNone ? 1 : pool_kernel;
  return o;
}

// Shapes of a compact_kv call: the caches, block table and seq_lens as for decode, plus
// kept [B, Hkv, K] int64 (contiguous) and kept_lens [B] int32 (contiguous).
struct CompactShape {
  int64_t batch, num_kv_heads, head_dim, num_pages, page_size, max_pages, max_kept;
};

inline CompactShape check_compact_kv(const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const at::Tensor& block_table, const at::Tensor& seq_lens,
                                     const at::Tensor& kept, const at::Tensor& kept_lens) {
  check_rank(k_cache, 4, "k_cache", "[num_pages, page_size, num_kv_heads, head_dim]");
  check_rank(v_cache, 4, "v_cache", "[num_pages, page_size, num_kv_heads, head_dim]");
  check_rank(block_table, 2, "block_table", "[batch, max_pages]");
  check_rank(seq_lens, 1, "seq_lens", "[batch]");
  check_rank(kept, 3, "kept", "[batch, num_kv_heads, max_kept]");
  check_rank(kept_lens, 1, "kept_lens", "[batch]");
  for (auto [t, n] : {std::pair{&v_cache, "v_cache"}, {&block_table, "block_table"}, {&seq_lens, "seq_lens"},
                      {&kept, "kept"}, {&kept_lens, "kept_lens"}})
    check_same_device(*t, k_cache, n, "k_cache");
  {
    // A pure copy: float32 caches compact on CUDA too (the CUDA kernel moves bytes).
    const auto dt = k_cache.scalar_type();
    TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat,
                "k_cache must be bfloat16, float16 or float32, got ", dt);
  }
  check_dtype(v_cache, k_cache.scalar_type(), "v_cache");
  check_dtype(block_table, at::kInt, "block_table");
  check_dtype(seq_lens, at::kInt, "seq_lens");
  check_dtype(kept, at::kLong, "kept");
  check_dtype(kept_lens, at::kInt, "kept_lens");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  CompactShape s{};
  s.num_pages = k_cache.size(0);
  s.page_size = k_cache.size(1);
  s.num_kv_heads = k_cache.size(2);
  s.head_dim = k_cache.size(3);
  s.batch = block_table.size(0);
  s.max_pages = block_table.size(1);
  s.max_kept = kept.size(2);
  TORCH_CHECK(s.page_size > 0, "k_cache page_size must be positive, got ", s.page_size);
  TORCH_CHECK(seq_lens.size(0) == s.batch, "seq_lens must have shape [", s.batch, "] (block_table rows), got ",
              seq_lens.sizes());
  TORCH_CHECK(kept.size(0) == s.batch && kept.size(1) == s.num_kv_heads, "kept must have shape [", s.batch, ", ",
              s.num_kv_heads, ", max_kept], got ", kept.sizes());
  TORCH_CHECK(kept_lens.size(0) == s.batch, "kept_lens must have shape [", s.batch, "], got ", kept_lens.sizes());
  for (auto [t, n] : {std::pair{&block_table, "block_table"}, {&seq_lens, "seq_lens"}, {&kept, "kept"},
                      {&kept_lens, "kept_lens"}})
    check_contiguous(*t, n);
  check_inner_dense(k_cache, 3, "k_cache");
  check_inner_dense(v_cache, 3, "v_cache");
  check_pages_distinct(k_cache, "k_cache");
  check_pages_distinct(v_cache, "v_cache");
  check_not_same_memory(k_cache, v_cache, "k_cache", "v_cache");
  check_writes_apart({named(k_cache, "k_cache"), named(v_cache, "v_cache"), named(seq_lens, "seq_lens")},
                     {named(block_table, "block_table"), named(kept, "kept"), named(kept_lens, "kept_lens")});
  return s;
}


}  // namespace kvcore
