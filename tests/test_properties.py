"""Property tests (hypothesis, CPU): every op against the reference over random shapes.

Shapes, dtypes, page sizes, ragged lengths (0 included), windows and soft-caps are drawn at
random; inputs are fresh random tensors and outputs are NaN-poisoned before each call.
block_sparse_decode adds random selections (empty, partial and complete lists in random order,
junk past the counts), scales, forced split counts and strided q / caches; token_decoder_attention
draws blocks, block length L, prefix P, GQA groups, block_lens (or None), scales, block-strided
views and lse on/off. gqa_decode's H2O score accumulation, infllm_unit_scores (both outputs, float32
or half queries, sliced keys, zero units) and topk_rows (ties, -inf, NaN, signed zeros, fewer units
than k, no rows, strided rows; exact) close the file.
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kvcore  # noqa: E402
from conftest import OUT_TOL, LSE_TOL, assert_out_lse_close, make_paged_kv, poison, randn  # noqa: E402
from kvcore import reference  # noqa: E402

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
SEEDS = st.integers(0, 2**31 - 1)


def _draw_paged_shape(draw):
    """Batch, KV heads, GQA group, head dim, page size and ragged lengths (0 included) of a paged
    decode call, drawn with the calling strategy's ``draw`` (its later draws follow on unchanged)."""
    batch = draw(st.integers(1, 4))
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 6))
    head_dim = draw(st.sampled_from([8, 16, 40, 64]))
    page = draw(st.integers(1, 32))
    lens = draw(st.lists(st.integers(0, 300), min_size=batch, max_size=batch))
    return batch, hkv, group, head_dim, page, lens


@st.composite
def decode_inputs(draw):
    batch, hkv, group, head_dim, page, lens = _draw_paged_shape(draw)
    window = draw(st.one_of(st.just(-1), st.integers(0, 64)))
    cap = draw(st.one_of(st.just(0.0), st.floats(1.0, 50.0)))
    seed = draw(SEEDS)
    return batch, hkv, group, head_dim, page, lens, window, cap, seed, draw(DTYPES)


def _decode_call(args):
    """A ``decode_inputs`` example's seeded generator (drawn on after), paged cache, q and
    NaN-poisoned out and lse."""
    batch, hkv, group, head_dim, page, lens, _window, _cap, seed, dtype = args
    gen = torch.Generator().manual_seed(seed)
    kv = make_paged_kv(lens, page, hkv, head_dim, gen=gen, dtype=dtype)
    q = randn(batch, hkv * group, head_dim, gen=gen, dtype=dtype)
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(batch, hkv * group))
    return gen, kv, q, out, lse


def _assert_gqa_decode_reference(q, kv, out, lse, window, cap, dtype):
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                            window_left=window, logit_soft_cap=cap)
    assert_out_lse_close(out, lse, ref_out, ref_lse, dtype)


@SETTINGS
@given(decode_inputs())
def test_gqa_decode_property(args):
    *_, window, cap, _seed, dtype = args
    _, kv, q, out, lse = _decode_call(args)
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse,
                      window_left=window, logit_soft_cap=cap)
    _assert_gqa_decode_reference(q, kv, out, lse, window, cap, dtype)


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 3), st.sampled_from([8, 64]), st.integers(1, 16), SEEDS, DTYPES)
def test_append_paged_kv_property(tokens, hkv, head_dim, page, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    num_pages = (tokens + page - 1) // page + 2
    k_cache = randn(num_pages, page, hkv, head_dim, gen=gen, dtype=dtype)
    v_cache = randn(num_pages, page, hkv, head_dim, gen=gen, dtype=dtype)
    k = randn(tokens, hkv, head_dim, gen=gen, dtype=dtype)
    v = randn(tokens, hkv, head_dim, gen=gen, dtype=dtype)
    slots = torch.randperm(num_pages * page, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < 0.2] = -1  # some tokens are padding
    ref_k, ref_v = reference.append_paged_kv(k, v, k_cache, v_cache, slots)
    kvcore.append_paged_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 5), st.sampled_from([8, 64, 128]), SEEDS, DTYPES, st.floats(0.0, 1.0))
def test_merge_attention_states_property(rows, heads, head_dim, seed, dtype, empty_frac):
    gen = torch.Generator().manual_seed(seed)
    out_a = randn(rows, heads, head_dim, gen=gen, dtype=dtype)
    out_b = randn(rows, heads, head_dim, gen=gen, dtype=dtype)
    lse_a = randn(rows, heads, gen=gen, scale=5.0)
    lse_b = randn(rows, heads, gen=gen, scale=5.0)
    lse_a[torch.rand(rows, heads, generator=gen) < empty_frac / 2] = -math.inf
    lse_b[torch.rand(rows, heads, generator=gen) < empty_frac / 2] = -math.inf
    out, lse = kvcore.merge_attention_states(out_a, lse_a, out_b, lse_b,
                                             out=poison(torch.empty_like(out_a)), lse=poison(torch.empty_like(lse_a)))
    ref_out, ref_lse = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert_out_lse_close(out, lse, ref_out, ref_lse, dtype)


# ---- block_sparse_decode ---------------------------------------------------------------------


@st.composite
def block_sparse_inputs(draw):
    batch, hkv, group, head_dim, page, lens = _draw_paged_shape(draw)
    # Per (sequence, KV head): the fraction of its pages it selects (0 = empty list, 1 = all).
    density = draw(st.lists(st.sampled_from([0.0, 0.2, 0.5, 1.0]), min_size=batch * hkv, max_size=batch * hkv))
    extra_sel = draw(st.integers(0, 3))  # junk entries past the longest list
    cap = draw(st.one_of(st.just(0.0), st.floats(1.0, 50.0)))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    num_splits = draw(st.sampled_from([0, 1, 2, 5]))
    layout = draw(st.sampled_from(["contiguous", "q_slice", "cache_strided"]))
    seed = draw(SEEDS)
    return batch, hkv, group, head_dim, page, lens, density, extra_sel, cap, scale, num_splits, layout, seed, draw(DTYPES)


def _random_lists(lens, page, hkv, density, extra_sel, gen):
    """``sel_pages [B, hkv, max_sel]`` int32 and ``sel_counts [B, hkv]``: each list a random subset
    of its sequence's pages (about ``density`` of them) in random order, then junk (-1, ids far
    past the sequence, and a copy of a listed page) that the op must ignore."""
    used = [(n + page - 1) // page for n in lens]
    max_sel = max(used + [0]) + extra_sel
    pages = torch.randint(-3, 10**6, (len(lens), hkv, max(max_sel, 0)), generator=gen, dtype=torch.int32)
    counts = torch.zeros(len(lens), hkv, dtype=torch.int32)
    for b, n in enumerate(used):
        for h in range(hkv):
            keep = torch.rand(n, generator=gen) < density[b * hkv + h]
            chosen = torch.nonzero(keep).flatten().to(torch.int32)
            chosen = chosen[torch.randperm(chosen.numel(), generator=gen)]
            c = chosen.numel()
            pages[b, h, :c] = chosen
            if 0 < c < max_sel:
                pages[b, h, c] = chosen[0]  # past the count: not a duplicate, just ignored
            counts[b, h] = c
    return pages, counts


@SETTINGS
@given(block_sparse_inputs())
def test_block_sparse_decode_property(args):
    (batch, hkv, group, head_dim, page, lens, density, extra_sel, cap, scale, num_splits, layout, seed,
     dtype) = args
    gen = torch.Generator().manual_seed(seed)
    kv = make_paged_kv(lens, page, hkv, head_dim, gen=gen, dtype=dtype, strided_cache=layout == "cache_strided")
    sel_pages, sel_counts = _random_lists(lens, page, hkv, density, extra_sel, gen)
    if layout == "q_slice":
        q = randn(batch, hkv * group, 2 * head_dim, gen=gen, dtype=dtype)[..., head_dim:]
    else:
        q = randn(batch, hkv * group, head_dim, gen=gen, dtype=dtype)
    out = poison(torch.empty(q.shape, dtype=dtype))
    lse = poison(torch.empty(batch, hkv * group))
    kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts,
                               scale=scale, logit_soft_cap=cap, out=out, lse=lse, num_splits=num_splits)
    ref_out, ref_lse = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                                     sel_pages, sel_counts, scale=scale, logit_soft_cap=cap)
    assert_out_lse_close(out, lse, ref_out, ref_lse, dtype)


# ---- token_decoder_attention -----------------------------------------------------------------


@st.composite
def token_decoder_inputs(draw):
    blocks = draw(st.integers(1, 6))
    block_length = draw(st.integers(1, 12))
    prefix = draw(st.integers(0, 6))
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 6))
    head_dim = draw(st.sampled_from([8, 16, 40, 64]))
    lens = draw(st.one_of(st.none(), st.lists(st.integers(0, block_length), min_size=blocks, max_size=blocks)))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 1.0)))
    strided = draw(st.booleans())
    with_lse = draw(st.booleans())
    seed = draw(SEEDS)
    return blocks, block_length, prefix, hkv, group, head_dim, lens, scale, strided, with_lse, seed, draw(DTYPES)


@SETTINGS
@given(token_decoder_inputs())
def test_token_decoder_attention_property(args):
    blocks, block_length, prefix, hkv, group, head_dim, lens, scale, strided, with_lse, seed, dtype = args
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * group
    if strided:  # blocks of larger allocations: each block densely packed, blocks strided
        q = randn(blocks, block_length + 1, hq, head_dim, gen=gen, dtype=dtype)[:, 1:]
        kv = randn(blocks, 2, prefix + block_length, hkv, head_dim, gen=gen, dtype=dtype)
        k, v = kv[:, 0], kv[:, 1]
    else:
        q = randn(blocks, block_length, hq, head_dim, gen=gen, dtype=dtype)
        k = randn(blocks, prefix + block_length, hkv, head_dim, gen=gen, dtype=dtype)
        v = randn(blocks, prefix + block_length, hkv, head_dim, gen=gen, dtype=dtype)
    block_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    out = poison(torch.empty(q.shape, dtype=dtype))
    lse = poison(torch.empty(q.shape[:3])) if with_lse else None
    kvcore.token_decoder_attention(q, k, v, block_lens, scale=scale, out=out, lse=lse)
    ref_out, ref_lse = reference.token_decoder_attention(q, k, v, block_lens, scale=scale)
    torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[dtype])
    if with_lse:
        torch.testing.assert_close(lse, ref_lse, **LSE_TOL)
    if block_lens is not None:  # padding rows: exactly 0 (and -inf)
        pad = torch.arange(block_length)[None, :] >= block_lens[:, None]
        assert bool((out[pad] == 0).all())
        if with_lse:
            assert bool(torch.isneginf(lse[pad]).all())


# ---- MLA and eviction ops ----------------------------------------------------------------------
# Fewer examples than above: each draws several ops' worth of shapes, and the budget for the four
# together is a few seconds on 2 cores.
SMALL_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def mla_decode_inputs(draw):
    batch = draw(st.integers(1, 4))
    heads = draw(st.integers(1, 16))
    dk = draw(st.sampled_from([16, 48, 80, 576]))
    dv = draw(st.integers(1, dk))
    page = draw(st.sampled_from([1, 4, 16, 64]))
    lens = draw(st.lists(st.integers(0, 200), min_size=batch, max_size=batch))
    num_splits = draw(st.sampled_from([0, 1, 3, 8]))
    q_slice = draw(st.booleans())
    seed = draw(SEEDS)
    return batch, heads, dk, dv, page, lens, num_splits, q_slice, seed, draw(DTYPES)


@SMALL_SETTINGS
@given(mla_decode_inputs())
def test_mla_decode_property(args):
    batch, heads, dk, dv, page, lens, num_splits, q_slice, seed, dtype = args
    gen = torch.Generator().manual_seed(seed)
    kv = make_paged_kv(lens, page, 1, dk, gen=gen, dtype=dtype)
    cache = kv.k_cache[:, :, 0]
    q = randn(batch, heads, 2 * dk, gen=gen, dtype=dtype)[..., dk:] if q_slice else randn(batch, heads, dk, gen=gen,
                                                                                          dtype=dtype)
    scale = dk**-0.5
    out = poison(torch.empty(batch, heads, dv, dtype=dtype))
    lse = poison(torch.empty(batch, heads))
    kvcore.mla_decode(q, cache, kv.block_table, kv.seq_lens, scale=scale, out=out, lse=lse, num_splits=num_splits)
    ref_out, ref_lse = reference.mla_decode(q, cache, kv.block_table, kv.seq_lens, scale, dv)
    assert_out_lse_close(out, lse, ref_out, ref_lse, dtype)


@st.composite
def mla_project_inputs(draw):
    tokens = draw(st.integers(1, 12))
    d_model = draw(st.integers(1, 96))
    rank = draw(st.sampled_from([8, 32, 512]))
    rope = draw(st.sampled_from([2, 16, 64]))
    page = draw(st.sampled_from([1, 4, 16]))
    interleaved = draw(st.booleans())
    outputs = draw(st.booleans())
    pad_frac = draw(st.floats(0.0, 0.5))
    seed = draw(SEEDS)
    return tokens, d_model, rank, rope, page, interleaved, outputs, pad_frac, seed, draw(DTYPES)


@SMALL_SETTINGS
@given(mla_project_inputs())
def test_mla_latent_project_property(args):
    tokens, d_model, rank, rope, page, interleaved, outputs, pad_frac, seed, dtype = args
    gen = torch.Generator().manual_seed(seed)
    width = rank + rope
    num_pages = tokens // page + 2
    cache = poison(torch.empty(num_pages, page, width, dtype=dtype))
    before = cache.clone()
    slots = torch.randperm(num_pages * page, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < pad_frac] = -1
    hidden = randn(tokens, d_model, gen=gen, dtype=dtype)
    w = randn(d_model, width, gen=gen, dtype=dtype, scale=d_model**-0.5)
    norm_weight = (1.0 + 0.2 * randn(rank, gen=gen)).to(dtype)
    cos_sin = reference.rope_cos_sin(100, rope)
    positions = torch.randint(0, 100, (tokens,), generator=gen)
    res = kvcore.mla_latent_project(hidden, w, norm_weight, cos_sin, positions, cache, slots,
                                    interleaved_rope=interleaved, return_outputs=outputs)
    ref_cache, ref_c, ref_pe = reference.mla_latent_project(hidden, w, norm_weight, 1e-6, cos_sin, positions, before,
                                                            slots, interleaved)
    flat, ref_flat = cache.view(-1, width), ref_cache.view(-1, width)
    written = slots[slots >= 0]
    torch.testing.assert_close(flat[written].float(), ref_flat[written].float(), **OUT_TOL[dtype])
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[written] = False
    assert bool(torch.isnan(flat[untouched]).all()), "a slot outside slot_mapping was written"
    if outputs:
        torch.testing.assert_close(res[0].float(), ref_c, **OUT_TOL[dtype])
        torch.testing.assert_close(res[1].float(), ref_pe, **OUT_TOL[dtype])


@st.composite
def score_inputs(draw):
    batch = draw(st.integers(1, 3))
    window = draw(st.integers(1, 10))
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([8, 40, 64]))
    page = draw(st.integers(1, 32))
    lens = draw(st.lists(st.integers(0, 200), min_size=batch, max_size=batch))
    reduction = draw(st.sampled_from(["sum", "mean", "max"]))
    pooling = draw(st.sampled_from(["none", "avg", "max"]))
    kernel = draw(st.sampled_from([5, 7]))
    with_lse = draw(st.booleans())
    scale = draw(st.one_of(st.none(), st.floats(0.05, 1.0)))
    extra_len = draw(st.integers(0, 5))
    seed = draw(SEEDS)
    return (batch, window, hkv, group, head_dim, page, lens, reduction, pooling, kernel, with_lse, scale, extra_len,
            seed, draw(DTYPES))


@SMALL_SETTINGS
@given(score_inputs())
def test_attention_scores_property(args):
    (batch, window, hkv, group, head_dim, page, lens, reduction, pooling, kernel, with_lse, scale, extra_len, seed,
     dtype) = args
    gen = torch.Generator().manual_seed(seed)
    kv = make_paged_kv(lens, page, hkv, head_dim, gen=gen, dtype=dtype)
    q = randn(batch, window, hkv * group, head_dim, gen=gen, dtype=dtype)
    lse = None
    if with_lse:  # the caller's lse: exact, from the reference's own definition (sum of probs = 1)
        lse = torch.empty(batch, window, hkv * group)
        s = scale if scale is not None else head_dim**-0.5
        for b, n in enumerate(lens):
            keys = reference.gather_paged(kv.k_cache, kv.block_table[b], torch.arange(n)).double()
            lg = s * torch.einsum("ihd,lhd->ihl", q[b].double(), keys.repeat_interleave(group, dim=1))
            t = n - window + torch.arange(window)
            lg = lg.masked_fill(torch.arange(n).view(1, 1, -1) > t.view(-1, 1, 1), -math.inf)
            lse[b] = torch.logsumexp(lg, dim=-1).float() if n else -math.inf
    max_len = max(lens) + extra_len
    out = poison(torch.empty(batch, hkv, max_len))
    kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, lse=lse, scale=scale, reduction=reduction,
                            pooling=pooling, pool_kernel=kernel, out=out)
    ref = reference.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, lse=lse, scale=scale,
                                     reduction=reduction, pooling=pooling, pool_kernel=kernel, max_len=max_len)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}[dtype]
    tol *= window * group if reduction == "sum" else 1.0
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=1e-3)


@st.composite
def compact_inputs(draw):
    batch = draw(st.integers(1, 4))
    hkv = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([8, 64]))
    page = draw(st.integers(1, 16))
    lens = draw(st.lists(st.integers(0, 120), min_size=batch, max_size=batch))
    max_kept = draw(st.integers(1, 60))
    budgets = draw(st.lists(st.floats(0.0, 1.0), min_size=batch, max_size=batch))
    strided = draw(st.booleans())
    seed = draw(SEEDS)
    return batch, hkv, head_dim, page, lens, max_kept, budgets, strided, seed, draw(DTYPES)


@SMALL_SETTINGS
@given(compact_inputs())
def test_compact_kv_property(args):
    batch, hkv, head_dim, page, lens, max_kept, budgets, strided, seed, dtype = args
    gen = torch.Generator().manual_seed(seed)
    kv = make_paged_kv(lens, page, hkv, head_dim, gen=gen, dtype=dtype, strided_cache=strided)
    counts = [int(min(n, max_kept) * f) for n, f in zip(lens, budgets)]
    kept = torch.randint(-5, 10**6, (batch, hkv, max_kept), generator=gen)  # junk past each count
    for b, n in enumerate(lens):
        for h in range(hkv):
            kept[b, h, : counts[b]] = torch.randperm(n, generator=gen)[: counts[b]].sort().values
    kept_lens = torch.tensor(counts, dtype=torch.int32)
    ref_k, ref_v, ref_lens = reference.compact_kv(kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, kept,
                                                  kept_lens)
    seq_lens = kv.seq_lens.clone()
    kvcore.compact_kv(kv.k_cache, kv.v_cache, kv.block_table, seq_lens, kept, kept_lens)
    assert torch.equal(seq_lens, ref_lens)
    assert torch.equal(kv.k_cache, ref_k) and torch.equal(kv.v_cache, ref_v)


# ---- gqa_decode's H2O score, infllm_unit_scores, topk_rows --------------------------------------


@SETTINGS
@given(decode_inputs(), st.integers(0, 5))
def test_gqa_decode_score_property(args, extra_len):
    """score += the step's probabilities (summed over each KV group) on the attended keys, every
    other entry bit-identical; out and lse stay those of plain decode."""
    batch, hkv, _group, _head_dim, page, lens, window, cap, _seed, dtype = args
    gen, kv, q, out, lse = _decode_call(args)
    score_len = kv.block_table.shape[1] * page + extra_len
    score = randn(batch, hkv, score_len, gen=gen).abs() + 0.5  # never zeros: a write shows
    before = score.clone()
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse,
                      window_left=window, logit_soft_cap=cap, score=score)
    add = reference.gqa_decode_score(q, kv.k_cache, kv.block_table, kv.seq_lens, window_left=window,
                                     logit_soft_cap=cap, score_len=score_len)
    tol = dict(atol=1e-5, rtol=1e-2 if cap > 0 else 2e-3)
    torch.testing.assert_close(score.double() - before.double(), add, **tol)
    for b, n in enumerate(lens):
        start = 0 if window < 0 else max(0, n - 1 - window)
        assert torch.equal(score[b, :, :start], before[b, :, :start])
        assert torch.equal(score[b, :, n:], before[b, :, n:])
    _assert_gqa_decode_reference(q, kv, out, lse, window, cap, dtype)


@st.composite
def unit_score_inputs(draw):
    batch = draw(st.integers(1, 4))
    hkv = draw(st.integers(1, 4))
    group = draw(st.integers(1, 6))
    head_dim = draw(st.sampled_from([1, 8, 24, 64, 128]))
    units = draw(st.integers(0, 200))
    extra_units = draw(st.integers(0, 3))  # repr_keys a [:, :units] slice of a larger buffer
    per_kv_head = draw(st.booleans())
    q_fp32 = draw(st.booleans())  # a float32 query (a chunk's mean) with half-precision keys
    q_strided = draw(st.booleans())  # q a slice of a larger [B, Hq', D] buffer
    seed = draw(SEEDS)
    return batch, hkv, group, head_dim, units, extra_units, per_kv_head, q_fp32, q_strided, seed, draw(DTYPES)


@SETTINGS
@given(unit_score_inputs())
def test_infllm_unit_scores_property(args):
    batch, hkv, group, head_dim, units, extra_units, per_kv_head, q_fp32, q_strided, seed, dtype = args
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * group
    q_dtype = torch.float32 if q_fp32 else dtype
    q = randn(batch, hq + 3 if q_strided else hq, head_dim, gen=gen, dtype=q_dtype)[:, :hq]
    keys = randn(batch, units + extra_units, hkv, head_dim, gen=gen, dtype=dtype)[:, :units]
    shape = (batch, hkv, units) if per_kv_head else (batch, units)
    out = poison(torch.empty(shape))
    got = kvcore.infllm_unit_scores(q, keys, per_kv_head=per_kv_head, out=out)
    assert got is out
    ref = reference.infllm_unit_scores(q, keys, per_kv_head=per_kv_head)
    # fp32 accumulation of exactly converted inputs: the error grows with the dot products' length
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * head_dim * group * hkv, rtol=1e-4)


@st.composite
def topk_inputs(draw):
    rows = draw(st.integers(0, 6))
    units = draw(st.integers(0, 400))
    k = draw(st.one_of(st.integers(1, 16), st.integers(1, 256)))
    # Values from a small set (many ties), with -inf masks, NaN, signed zeros and +inf mixed in.
    pool = draw(st.sampled_from(["normal", "ties", "special"]))
    strided = draw(st.booleans())  # rows of a wider buffer
    index_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    seed = draw(SEEDS)
    return rows, units, k, pool, strided, index_dtype, seed


@SETTINGS
@given(topk_inputs())
def test_topk_rows_property(args):
    rows, units, k, pool, strided, index_dtype, seed = args
    gen = torch.Generator().manual_seed(seed)
    width = units + 7 if strided else units
    if pool == "normal":
        buf = torch.randn(rows, width, generator=gen)
    else:
        choices = torch.tensor([1.0, 0.5, -2.0] if pool == "ties" else
                               [1.0, -0.0, 0.0, -math.inf, math.inf, math.nan, 0.5, -math.inf, math.nan])
        buf = choices[torch.randint(0, choices.numel(), (rows, width), generator=gen)]
        buf[torch.rand(rows, width, generator=gen) < 0.3] = -math.inf  # masked units
    scores = buf[:, :units]
    values = poison(torch.empty(rows, k))
    indices = torch.full((rows, k), 12345, dtype=index_dtype)
    kvcore.topk_rows(scores, k, values=values, indices=indices)
    want_v, want_i = reference.topk_rows(scores, k)
    assert torch.equal(indices.long(), want_i)
    torch.testing.assert_close(values, want_v, atol=0, rtol=0, equal_nan=True)
    assert bool((indices[:, min(k, units):] == -1).all())  # k > units: the slots past the units
