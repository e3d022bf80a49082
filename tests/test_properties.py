"""Property tests (hypothesis, CPU): every op against the reference over random shapes.

Shapes, dtypes, page sizes, ragged lengths (0 included), windows and soft-caps are drawn at
random; inputs are fresh random tensors and outputs are NaN-poisoned before each call.
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
