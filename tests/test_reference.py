"""kvcore.reference against independent naive computations (CPU, float64, small sizes).

The naive versions below walk tokens one at a time with explicit page lookups and Python-level
softmax, so they share no code path with the vectorised reference they check.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcore import reference

# ------------------------------------------------------------------------------------ helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _paged_setup(gen, lens, page_size, num_kv_heads, head_dim, *, extra_pages=3, dtype=torch.float64):
    """Random caches (every slot random, including unused ones) and a shuffled block table."""
    pages_per_seq = [math.ceil(n / page_size) for n in lens]
    max_pages = max(1, max(pages_per_seq)) + 1  # one spare column of padding
    num_pages = sum(pages_per_seq) + extra_pages
    k_cache = _randn(gen, num_pages, page_size, num_kv_heads, head_dim, dtype=dtype)
    v_cache = _randn(gen, num_pages, page_size, num_kv_heads, head_dim, dtype=dtype)
    perm = torch.randperm(num_pages, generator=gen).tolist()
    # Padding entries hold junk (-1, out-of-range and real page ids) that must never be read.
    block_table = torch.randint(-1, num_pages + 5, (len(lens), max_pages), generator=gen, dtype=torch.int32)
    for b, n_pages in enumerate(pages_per_seq):
        block_table[b, :n_pages] = torch.tensor(perm[:n_pages], dtype=torch.int32)
        perm = perm[n_pages:]
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return k_cache, v_cache, block_table, seq_lens


def _naive_decode(q, k_cache, v_cache, block_table, seq_lens, scale=None, window_left=-1, cap=0.0):
    """Token-by-token paged decode with explicit page lookups; returns float64 (out, lse)."""
    batch, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros(batch, num_q_heads, head_dim, dtype=torch.float64)
    lse = torch.full((batch, num_q_heads), -math.inf, dtype=torch.float64)
    for b in range(batch):
        length = int(seq_lens[b])
        first = 0 if window_left < 0 else max(0, length - 1 - window_left)
        for h in range(num_q_heads):
            kv_head = h // group
            logits, values = [], []
            for p in range(first, length):
                page = int(block_table[b, p // page_size])
                key = k_cache[page, p % page_size, kv_head].double()
                logit = scale * float((q[b, h].double() * key).sum())
                if cap > 0:
                    logit = cap * math.tanh(logit / cap)
                logits.append(logit)
                values.append(v_cache[page, p % page_size, kv_head].double())
            if not logits:
                continue
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            total = sum(weights)
            lse[b, h] = top + math.log(total)
            acc = torch.zeros(head_dim, dtype=torch.float64)
            for w, val in zip(weights, values):
                acc += (w / total) * val
            out[b, h] = acc
    return out, lse


def _assert_matches_naive(q, k_cache, v_cache, block_table, seq_lens, **kwargs):
    out, lse = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, **kwargs)
    naive_kwargs = {
        "scale": kwargs.get("scale"),
        "window_left": kwargs.get("window_left", -1),
        "cap": kwargs.get("logit_soft_cap", 0.0),
    }
    want_out, want_lse = _naive_decode(q, k_cache, v_cache, block_table, seq_lens, **naive_kwargs)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- gqa_decode


@pytest.mark.parametrize("page_size", [1, 4, 5, 16])
def test_paging_gathers_the_right_tokens(page_size):
    gen = _gen(page_size)
    # Lengths that do and do not divide the page size, one page exactly, a single token.
    lens = [1, page_size, 2 * page_size + 3, 37]
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, lens, page_size, 2, 8)
    q = _randn(gen, len(lens), 4, 8)
    _assert_matches_naive(q, k_cache, v_cache, block_table, seq_lens)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (6, 1), (16, 1)])
def test_gqa_head_mapping(num_q_heads, num_kv_heads):
    gen = _gen(100 + num_q_heads * 7 + num_kv_heads)
    lens = [9, 20]
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, lens, 4, num_kv_heads, 8)
    q = _randn(gen, len(lens), num_q_heads, 8)
    _assert_matches_naive(q, k_cache, v_cache, block_table, seq_lens)


def test_gqa_mapping_is_consecutive_not_interleaved():
    # With 4 query heads over 2 KV heads, heads 0,1 read KV head 0 and heads 2,3 read KV head 1.
    gen = _gen(7)
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, [6], 2, 2, 8)
    q = _randn(gen, 1, 1, 8).expand(1, 4, 8).contiguous()  # same query in every head
    out, lse = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens)
    torch.testing.assert_close(out[0, 0], out[0, 1])
    torch.testing.assert_close(out[0, 2], out[0, 3])
    assert not torch.allclose(out[0, 1], out[0, 2])
    torch.testing.assert_close(lse[0, 0], lse[0, 1])


@pytest.mark.parametrize("window_left", [0, 1, 6, 40, 1000])
def test_sliding_window(window_left):
    gen = _gen(200 + window_left)
    lens = [1, 7, 23, 40]
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, lens, 4, 2, 8)
    q = _randn(gen, len(lens), 4, 8)
    _assert_matches_naive(q, k_cache, v_cache, block_table, seq_lens, window_left=window_left)


def test_window_zero_is_the_last_value():
    gen = _gen(3)
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, [11], 4, 1, 8)
    q = _randn(gen, 1, 2, 8)
    out, lse = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, window_left=0)
    last = v_cache[int(block_table[0, 10 // 4]), 10 % 4, 0]
    torch.testing.assert_close(out[0], last.float().expand(2, 8))


@pytest.mark.parametrize("cap", [0.5, 2.0, 30.0])
def test_logit_soft_cap(cap):
    gen = _gen(300 + int(cap * 10))
    lens = [5, 18]
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, lens, 4, 2, 8)
    q = 3.0 * _randn(gen, len(lens), 4, 8)  # large logits so that the cap matters
    _assert_matches_naive(q, k_cache, v_cache, block_table, seq_lens, scale=1.0, logit_soft_cap=cap)
    # The cap really changes the result (the logits are well above it).
    if cap < 5:
        capped, _ = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, scale=1.0, logit_soft_cap=cap)
        plain, _ = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, scale=1.0)
        assert not torch.allclose(capped, plain, atol=1e-3)


def test_window_and_soft_cap_together():
    gen = _gen(11)
    lens = [3, 17, 30]
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, lens, 8, 2, 16)
    q = _randn(gen, len(lens), 8, 16)
    _assert_matches_naive(
        q, k_cache, v_cache, block_table, seq_lens, scale=0.4, window_left=9, logit_soft_cap=1.5
    )


def test_default_scale_is_inverse_sqrt_head_dim():
    gen = _gen(12)
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, [13], 4, 2, 32)
    q = _randn(gen, 1, 4, 32)
    a = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens)
    b = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, scale=1 / math.sqrt(32))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_sequences_give_zero_out_and_neg_inf_lse():
    gen = _gen(13)
    lens = [0, 9, 0]
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, lens, 4, 2, 8)
    q = _randn(gen, len(lens), 4, 8)
    for window_left in (-1, 0, 3):
        out, lse = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, window_left=window_left)
        for b in (0, 2):
            assert torch.equal(out[b], torch.zeros(4, 8))
            assert torch.isneginf(lse[b]).all()
        assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()
    _assert_matches_naive(q, k_cache, v_cache, block_table, seq_lens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_are_computed_in_fp64(dtype):
    gen = _gen(14)
    lens = [7, 21]
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, lens, 4, 2, 8, dtype=dtype)
    q = _randn(gen, len(lens), 4, 8, dtype=dtype)
    _assert_matches_naive(q, k_cache, v_cache, block_table, seq_lens)


def test_matches_torch_sdpa():
    # An independent dense implementation: torch's own attention, on gathered contiguous keys.
    gen = _gen(15)
    lens = [12, 31]
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, lens, 4, 2, 16)
    q = _randn(gen, len(lens), 8, 16)
    out, _ = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, scale=0.3)
    for b, length in enumerate(lens):
        pos = torch.arange(length)
        pages = block_table[b].long()[pos // 4]
        k = k_cache[pages, pos % 4].transpose(0, 1)  # [Hkv, L, D]
        v = v_cache[pages, pos % 4].transpose(0, 1)
        k = k.repeat_interleave(4, dim=0)
        v = v.repeat_interleave(4, dim=0)
        want = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], k, v, scale=0.3)[:, 0]
        torch.testing.assert_close(out[b].double(), want, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    lens=st.lists(st.integers(0, 24), min_size=1, max_size=3),
    page_size=st.sampled_from([1, 2, 3, 8]),
    group=st.sampled_from([1, 2, 3]),
    num_kv_heads=st.sampled_from([1, 2]),
    window_left=st.sampled_from([-1, 0, 2, 10]),
    cap=st.sampled_from([0.0, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_naive(lens, page_size, group, num_kv_heads, window_left, cap, seed):
    gen = _gen(seed)
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, lens, page_size, num_kv_heads, 4)
    q = _randn(gen, len(lens), group * num_kv_heads, 4)
    _assert_matches_naive(
        q, k_cache, v_cache, block_table, seq_lens, window_left=window_left, logit_soft_cap=cap
    )


def test_gqa_decode_bad_arguments():
    gen = _gen(16)
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, [5, 6], 4, 2, 8)
    q = _randn(gen, 2, 4, 8)
    with pytest.raises(ValueError, match="q"):
        reference.gqa_decode(q[0], k_cache, v_cache, block_table, seq_lens)
    with pytest.raises(ValueError, match="multiple"):
        reference.gqa_decode(_randn(gen, 2, 3, 8), k_cache, v_cache, block_table, seq_lens)
    with pytest.raises(ValueError, match="head_dim"):
        reference.gqa_decode(_randn(gen, 2, 4, 4), k_cache, v_cache, block_table, seq_lens)
    with pytest.raises(ValueError, match="v_cache"):
        reference.gqa_decode(q, k_cache, v_cache[:-1], block_table, seq_lens)
    with pytest.raises(ValueError, match="block_table"):
        reference.gqa_decode(q, k_cache, v_cache, block_table[:1], seq_lens)
    with pytest.raises(ValueError, match="seq_lens"):
        reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens[:1])
    too_long = torch.tensor([5, block_table.shape[1] * 4 + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="seq_lens"):
        reference.gqa_decode(q, k_cache, v_cache, block_table, too_long)
    bad_table = block_table.clone()
    bad_table[1, 0] = k_cache.shape[0]
    with pytest.raises(ValueError, match="block_table"):
        reference.gqa_decode(q, k_cache, v_cache, bad_table, seq_lens)


# ------------------------------------------------------------------------- append_paged_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_paged_kv_writes_slots_and_skips(dtype):
    gen = _gen(20)
    num_pages, page_size, heads, dim = 5, 4, 2, 8
    k_cache = _randn(gen, num_pages, page_size, heads, dim, dtype=dtype)
    v_cache = _randn(gen, num_pages, page_size, heads, dim, dtype=dtype)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([7, -1, 0, 19, 12, -1], dtype=torch.int64)
    k = _randn(gen, len(slots), heads, dim, dtype=torch.float32)
    v = _randn(gen, len(slots), heads, dim, dtype=torch.float32)

    new_k, new_v = reference.append_paged_kv(k, v, k_cache, v_cache, slots)

    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)  # functional
    assert new_k.dtype == dtype and new_v.dtype == dtype
    want_k, want_v = before_k.clone(), before_v.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        want_k[slot // page_size, slot % page_size] = k[t].to(dtype)
        want_v[slot // page_size, slot % page_size] = v[t].to(dtype)
    assert torch.equal(new_k, want_k) and torch.equal(new_v, want_v)


def test_append_then_decode_equals_dense_attention():
    # Write a sequence token by token through the paged layout, then attend to it.
    gen = _gen(21)
    page_size, heads, dim, length = 4, 2, 8, 14
    k_cache = _randn(gen, 6, page_size, heads, dim)
    v_cache = _randn(gen, 6, page_size, heads, dim)
    pages = [4, 1, 5, 0]
    slots = torch.tensor([pages[p // page_size] * page_size + p % page_size for p in range(length)])
    k = _randn(gen, length, heads, dim)
    v = _randn(gen, length, heads, dim)
    k_cache, v_cache = reference.append_paged_kv(k, v, k_cache, v_cache, slots)
    q = _randn(gen, 1, 4, dim)
    block_table = torch.tensor([pages], dtype=torch.int32)
    out, lse = reference.gqa_decode(q, k_cache, v_cache, block_table, torch.tensor([length], dtype=torch.int32))
    want_out, want_lse = reference.dense_attention(q[0], k, v)
    torch.testing.assert_close(out[0].double(), want_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse[0].double(), want_lse, rtol=1e-6, atol=1e-6)


def test_append_paged_kv_bad_arguments():
    gen = _gen(22)
    k_cache = _randn(gen, 2, 4, 2, 8)
    v_cache = _randn(gen, 2, 4, 2, 8)
    k = _randn(gen, 3, 2, 8)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="slot_mapping"):
        reference.append_paged_kv(k, k, k_cache, v_cache, torch.tensor([0, 1, 8]))
    with pytest.raises(ValueError, match="slot_mapping"):
        reference.append_paged_kv(k, k, k_cache, v_cache, torch.tensor([0, -2, 1]))
    with pytest.raises(ValueError, match="slot_mapping"):
        reference.append_paged_kv(k, k, k_cache, v_cache, slots.int())
    with pytest.raises(ValueError, match="slot_mapping"):
        reference.append_paged_kv(k, k, k_cache, v_cache, slots[:2])
    with pytest.raises(ValueError, match="k must be"):
        reference.append_paged_kv(_randn(gen, 3, 1, 8), k, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="v must"):
        reference.append_paged_kv(k, k[:2], k_cache, v_cache, slots)


# ------------------------------------------------------------------ merge_attention_states


def _random_split(gen, length):
    mask = torch.rand(length, generator=gen) < 0.5
    return mask.nonzero()[:, 0], (~mask).nonzero()[:, 0]


@pytest.mark.parametrize("cap", [0.0, 2.0])
def test_merge_equals_attention_over_the_union(cap):
    gen = _gen(30 + int(cap))
    num_q_heads, num_kv_heads, dim, length = 8, 2, 16, 29
    rows_out, rows_lse, want_out, want_lse = [], [], [], []
    parts = {"a": ([], []), "b": ([], [])}
    for row in range(5):
        q = _randn(gen, num_q_heads, dim)
        k = _randn(gen, length, num_kv_heads, dim)
        v = _randn(gen, length, num_kv_heads, dim)
        if row == 0:  # contiguous split (prefix / suffix), as a split-KV kernel does
            idx_a, idx_b = torch.arange(0, 11), torch.arange(11, length)
        else:  # any disjoint split (e.g. retrieved blocks + local window)
            idx_a, idx_b = _random_split(gen, length)
        for name, idx in (("a", idx_a), ("b", idx_b)):
            o, s = reference.dense_attention(q, k[idx], v[idx], scale=0.5, logit_soft_cap=cap)
            parts[name][0].append(o)
            parts[name][1].append(s)
        o, s = reference.dense_attention(q, k, v, scale=0.5, logit_soft_cap=cap)
        want_out.append(o)
        want_lse.append(s)
    out, lse = reference.merge_attention_states(
        torch.stack(parts["a"][0]), torch.stack(parts["a"][1]), torch.stack(parts["b"][0]), torch.stack(parts["b"][1])
    )
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), torch.stack(want_out), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), torch.stack(want_lse), rtol=1e-5, atol=1e-6)


def test_merge_of_paged_window_split():
    # A sequence's keys split into [0, L-W) and the last W positions through gqa_decode itself:
    # the window part is gqa_decode with window_left = W-1; the rest is computed densely.
    gen = _gen(33)
    lens = [20, 35]
    k_cache, v_cache, block_table, seq_lens = _paged_setup(gen, lens, 4, 2, 8)
    q = _randn(gen, len(lens), 4, 8)
    window = 6
    local_out, local_lse = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, window_left=window - 1)
    head_out, head_lse = [], []
    for b, length in enumerate(lens):
        pos = torch.arange(0, length - window)
        k = reference.gather_paged(k_cache, block_table[b], pos)
        v = reference.gather_paged(v_cache, block_table[b], pos)
        o, s = reference.dense_attention(q[b], k, v)
        head_out.append(o)
        head_lse.append(s)
    out, lse = reference.merge_attention_states(torch.stack(head_out), torch.stack(head_lse), local_out, local_lse)
    full_out, full_lse = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens)
    torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-6)


def test_merge_with_neg_inf_rows():
    gen = _gen(34)
    n, h, d = 4, 3, 8
    out_a = _randn(gen, n, h, d, dtype=torch.float32)
    out_b = _randn(gen, n, h, d, dtype=torch.float32)
    lse_a = _randn(gen, n, h, dtype=torch.float32)
    lse_b = _randn(gen, n, h, dtype=torch.float32)
    ninf = -math.inf
    lse_a[0] = ninf  # row 0: only b
    lse_b[1] = ninf  # row 1: only a
    lse_a[2] = ninf  # row 2: neither
    lse_b[2] = ninf
    lse_a[3, 1] = ninf  # row 3: mixed per head
    # An empty part's out is never read, so it may be anything (a kernel may leave it poisoned).
    out_a[0] = math.nan
    out_b[1] = math.inf
    out_a[2] = math.nan
    out_b[2] = math.nan

    out, lse = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)

    assert torch.equal(out[0], out_b[0]) and torch.equal(lse[0], lse_b[0])
    assert torch.equal(out[1], out_a[1]) and torch.equal(lse[1], lse_a[1])
    assert torch.equal(out[2], torch.zeros(h, d)) and torch.isneginf(lse[2]).all()
    assert torch.equal(out[3, 1], out_b[3, 1]) and torch.equal(lse[3, 1], lse_b[3, 1])
    # Finite rows: the closed form, computed naively.
    for head in (0, 2):
        la, lb = float(lse_a[3, head]), float(lse_b[3, head])
        wa, wb = math.exp(la), math.exp(lb)
        want = (wa * out_a[3, head].double() + wb * out_b[3, head].double()) / (wa + wb)
        torch.testing.assert_close(out[3, head].double(), want, rtol=1e-6, atol=1e-6)
        assert math.isclose(float(lse[3, head]), math.log(wa + wb), rel_tol=1e-6)


def test_merge_is_stable_for_large_lse():
    gen = _gen(35)
    out_a = _randn(gen, 2, 2, 4, dtype=torch.float32)
    out_b = _randn(gen, 2, 2, 4, dtype=torch.float32)
    lse_a = torch.tensor([[1000.0, -1000.0], [800.0, 50.0]])
    lse_b = torch.tensor([[1000.0, -1000.0], [800.0 + math.log(3.0), 50.0 - 200.0]])
    out, lse = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out[0], (out_a[0] + out_b[0]) / 2)
    torch.testing.assert_close(lse[0], lse_a[0] + math.log(2.0))
    torch.testing.assert_close(out[1, 0], 0.25 * out_a[1, 0] + 0.75 * out_b[1, 0])
    torch.testing.assert_close(out[1, 1], out_a[1, 1])


def test_merge_is_symmetric():
    gen = _gen(36)
    out_a, out_b = _randn(gen, 3, 2, 8), _randn(gen, 3, 2, 8)
    lse_a, lse_b = _randn(gen, 3, 2), _randn(gen, 3, 2)
    ab = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    ba = reference.merge_attention_states(out_b, lse_b, out_a, lse_a)
    torch.testing.assert_close(ab, ba)


def test_merge_bad_arguments():
    gen = _gen(37)
    out, lse = _randn(gen, 2, 3, 4), _randn(gen, 2, 3)
    with pytest.raises(ValueError, match="out_b"):
        reference.merge_attention_states(out, lse, out[:1], lse)
    with pytest.raises(ValueError, match="lse_b"):
        reference.merge_attention_states(out, lse, out, lse[:, :2])
    with pytest.raises(ValueError, match="lse_a"):
        reference.merge_attention_states(out, lse[0], out, lse)


# ------------------------------------------------------------------------- dense_attention


def test_dense_attention_empty_keys():
    gen = _gen(40)
    q = _randn(gen, 4, 8)
    empty = torch.empty(0, 2, 8, dtype=torch.float64)
    out, lse = reference.dense_attention(q, empty, empty)
    assert torch.equal(out, torch.zeros(4, 8, dtype=torch.float64))
    assert torch.isneginf(lse).all()


# ------------------------------------------------------------------- token_decoder_attention


@pytest.mark.parametrize("blocks,prefix", [(3, 2), (3, 0), (0, 2)])
@pytest.mark.parametrize("with_lens", [False, True])
def test_token_decoder_attention_empty_block_length(blocks, prefix, with_lens):
    """L = 0 (no tokens per block): empty out [N, 0, Hq, D] and lse [N, 0, Hq], float32 like every
    result of the reference (the op returns the same shapes)."""
    gen = _gen(41)
    q = _randn(gen, blocks, 0, 4, 16)
    k, v = _randn(gen, blocks, prefix, 2, 16), _randn(gen, blocks, prefix, 2, 16)
    lens = torch.zeros(blocks, dtype=torch.int32) if with_lens else None
    out, lse = reference.token_decoder_attention(q, k, v, lens)
    assert out.shape == (blocks, 0, 4, 16) and out.dtype == torch.float32
    assert lse.shape == (blocks, 0, 4) and lse.dtype == torch.float32
    # One token more still works and is the dense attention over the prefix and the token.
    q1 = _randn(gen, blocks, 1, 4, 16)
    k1, v1 = _randn(gen, blocks, prefix + 1, 2, 16), _randn(gen, blocks, prefix + 1, 2, 16)
    out1, lse1 = reference.token_decoder_attention(q1, k1, v1)
    for n in range(blocks):
        want, want_lse = reference.dense_attention(q1[n, 0], k1[n], v1[n])
        torch.testing.assert_close(out1[n, 0].double(), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse1[n, 0].double(), want_lse, rtol=1e-6, atol=1e-6)
