"""Property tests (hypothesis, CPU): every op against the reference over random shapes.

Shapes, dtypes, page sizes, ragged lengths (0 included), windows and soft-caps are drawn at
random; inputs are fresh random tensors and outputs are NaN-poisoned before each call.
block_sparse_decode adds random selections (empty, partial and complete lists in random order,
junk past the counts), scales, forced split counts and strided q / caches; token_decoder_attention
draws blocks, block length L, prefix P, GQA groups, block_lens (or None), scales, block-strided
views and lse on/off.
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import kvcore  # noqa: E402
from conftest import OUT_TOL, LSE_TOL, make_paged_kv, poison, randn  # noqa: E402
from kvcore import reference  # noqa: E402

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


@st.composite
def decode_inputs(draw):
    batch = draw(st.integers(1, 4))
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 6))
    head_dim = draw(st.sampled_from([8, 16, 40, 64]))
    page = draw(st.integers(1, 32))
    lens = draw(st.lists(st.integers(0, 300), min_size=batch, max_size=batch))
    window = draw(st.one_of(st.just(-1), st.integers(0, 64)))
    cap = draw(st.one_of(st.just(0.0), st.floats(1.0, 50.0)))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, hkv, group, head_dim, page, lens, window, cap, seed, draw(DTYPES)


@SETTINGS
@given(decode_inputs())
def test_gqa_decode_property(args):
    batch, hkv, group, head_dim, page, lens, window, cap, seed, dtype = args
    gen = torch.Generator().manual_seed(seed)
    kv = make_paged_kv(lens, page, hkv, head_dim, gen=gen, dtype=dtype)
    q = randn(batch, hkv * group, head_dim, gen=gen, dtype=dtype)
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(batch, hkv * group))
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse,
                      window_left=window, logit_soft_cap=cap)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                            window_left=window, logit_soft_cap=cap)
    torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 3), st.sampled_from([8, 64]), st.integers(1, 16), st.integers(0, 2**31 - 1),
       DTYPES)
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
@given(st.integers(1, 6), st.integers(1, 5), st.sampled_from([8, 64, 128]), st.integers(0, 2**31 - 1), DTYPES,
       st.floats(0.0, 1.0))
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
    torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


# ---- block_sparse_decode ---------------------------------------------------------------------


@st.composite
def block_sparse_inputs(draw):
    batch = draw(st.integers(1, 4))
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 6))
    head_dim = draw(st.sampled_from([8, 16, 40, 64]))
    page = draw(st.integers(1, 32))
    lens = draw(st.lists(st.integers(0, 300), min_size=batch, max_size=batch))
    # Per (sequence, KV head): the fraction of its pages it selects (0 = empty list, 1 = all).
    density = draw(st.lists(st.sampled_from([0.0, 0.2, 0.5, 1.0]), min_size=batch * hkv, max_size=batch * hkv))
    extra_sel = draw(st.integers(0, 3))  # junk entries past the longest list
    cap = draw(st.one_of(st.just(0.0), st.floats(1.0, 50.0)))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    num_splits = draw(st.sampled_from([0, 1, 2, 5]))
    layout = draw(st.sampled_from(["contiguous", "q_slice", "cache_strided"]))
    seed = draw(st.integers(0, 2**31 - 1))
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
    torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


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
    seed = draw(st.integers(0, 2**31 - 1))
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
