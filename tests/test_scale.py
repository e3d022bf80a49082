"""Scale: sizes where 32-bit index arithmetic would break, and extreme batch compositions.

* one sequence of 1M tokens (CUDA): written by append_paged_kv, decoded with automatic, forced
  and no split, against an fp64 reference computed chunk by chunk and merged in fp64;
* caches whose element offset ``page * page_stride`` passes 2^31 (CUDA, 6-9 GiB of cache):
  pages near 100k with page_size 16, and 2.2M pages with page_size 1;
* batch 1024 (CUDA, and a smaller CPU variant);
* empty sequences mixed with long ones (CPU and CUDA).

The CUDA cases allocate up to ~10 GiB and take a few seconds each on an H100; they are skipped
without a GPU. The CPU cases stay small (CI has 2 cores).
"""

from __future__ import annotations

import math

import pytest
import torch

import kvcore
from conftest import HAS_CUDA, LSE_TOL, NO_CUDA_REASON, OUT_TOL, make_paged_kv, poison, ragged_lens, randn
from kvcore import reference

cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]
INT32_LIMIT = 1 << 31  # element offsets at or past this need 64-bit arithmetic


def _cuda_gen(seed: int = 20260) -> torch.Generator:
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    return g


def _chunked_reference(q: torch.Tensor, k_cache, v_cache, table_row, length: int, window_left: int = -1,
                       chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 reference of one sequence (``q`` [Hq, D]) over positions [start, length), computed
    ``chunk`` keys at a time with ``reference.dense_attention`` and merged in fp64 (the merge
    formula of ``reference.merge_attention_states`` without its final fp32 cast), so the
    reference of a 1M-token sequence never materialises [Hq, 1M, D] in fp64."""
    start = 0 if window_left < 0 else max(0, length - 1 - window_left)
    num_q_heads, head_dim = q.shape
    out = torch.zeros(num_q_heads, head_dim, dtype=torch.float64, device=q.device)
    lse = torch.full((num_q_heads,), -math.inf, dtype=torch.float64, device=q.device)
    for c0 in range(start, length, chunk):
        pos = torch.arange(c0, min(c0 + chunk, length), device=k_cache.device)
        o, s = reference.dense_attention(q, reference.gather_paged(k_cache, table_row, pos),
                                         reference.gather_paged(v_cache, table_row, pos))
        m = torch.maximum(lse, s)
        w_old, w_new = torch.exp(lse - m), torch.exp(s - m)
        out = (w_old[:, None] * out + w_new[:, None] * o) / (w_old + w_new)[:, None]
        lse = m + torch.log(w_old + w_new)
    return out, lse


# ============================================================================================
# 1M tokens in one sequence (CUDA)
# ============================================================================================

ONE_M = 1 << 20


@pytest.mark.parametrize(
    "length, window_left",
    [(ONE_M, -1), (ONE_M - 3, 300_000)],
    ids=["1M", "1M-3-window300k"],
)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_decode_one_million_tokens(device, length, window_left):
    gen = _cuda_gen()
    dtype, page, hkv, hq, d = torch.bfloat16, 16, 1, 8, 128
    pages_used = (ONE_M + page - 1) // page
    num_pages = pages_used + 3  # 3 spare pages, left NaN: never read
    perm = torch.randperm(num_pages, generator=gen, device=device)
    table = perm[:pages_used].to(torch.int32).unsqueeze(0).contiguous()  # capacity exactly 1M
    k_cache = poison(torch.empty(num_pages, page, hkv, d, dtype=dtype, device=device))
    v_cache = poison(torch.empty_like(k_cache))

    q = torch.randn(1, hq, d, generator=gen, device=device).to(dtype)
    k_new = torch.randn(ONE_M, hkv, d, generator=gen, device=device).to(dtype)
    v_new = torch.randn(ONE_M, hkv, d, generator=gen, device=device).to(dtype)
    # Needles: query head h finds a key equal to 2 * q[h] (logit ~ 2|q|^2 / sqrt(d) ~ 22 above the
    # rest), so each head's output is dominated by one value row at a far position: a kernel that
    # reads the wrong rows (or none) is off by O(1), not by the ~1e-3 of 1M averaged random rows.
    needles = [0, 15, 16, ONE_M // 16 - 1, ONE_M // 2, (3 * ONE_M) // 4 + 5, length - 2, length - 1]
    for h, pos in enumerate(needles):
        k_new[pos, 0] = (2 * q[0, h].float()).to(dtype)
        v_new[pos, 0] = (4 * torch.randn(d, generator=gen, device=device)).to(dtype)

    pos = torch.arange(ONE_M, device=device)
    slots = table[0].long()[pos // page] * page + pos % page
    kvcore.append_paged_kv(k_new, v_new, k_cache, v_cache, slots)
    assert torch.equal(reference.gather_paged(k_cache, table[0], pos), k_new)
    assert torch.equal(reference.gather_paged(v_cache, table[0], pos), v_new)
    del k_new, v_new, pos, slots

    seq_lens = torch.tensor([length], dtype=torch.int32, device=device)
    ref_out, ref_lse = _chunked_reference(q[0], k_cache, v_cache, table[0], length, window_left)
    assert ref_out.abs().max() > 0.5, "the needles must dominate the reference output"
    for num_splits in (0, 1, 37):
        out = poison(torch.empty_like(q))
        lse = poison(torch.empty(1, hq, dtype=torch.float32, device=device))
        kvcore.gqa_decode(q, k_cache, v_cache, table, seq_lens, out=out, lse=lse, window_left=window_left,
                          num_splits=num_splits)
        torch.testing.assert_close(out[0].float(), ref_out.float(), **OUT_TOL[dtype],
                                   msg=lambda m: f"num_splits={num_splits}: {m}")
        torch.testing.assert_close(lse[0], ref_lse.float(), **LSE_TOL, msg=lambda m: f"num_splits={num_splits}: {m}")


# ============================================================================================
# page * page_stride past 2^31 elements (CUDA)
# ============================================================================================

# (page_size, num_kv_heads, head_dim, num_pages, strided): elements per page stride x the highest
# page index pass 2^31 by ~50%; "strided" caches are the halves of one [pages, 2, ...] allocation
# (page stride 2 * page_size * Hkv * D).
BIG_CACHES = [
    (16, 8, 128, 100_000, True),  # stride 32768: pages >= 65536 are past 2^31; 6.1 GiB in all
    (1, 8, 128, 2_200_000, False),  # stride 1024: pages >= 2^21 are past 2^31; 2 x 4.2 GiB
]


def _big_id(c) -> str:
    ps, hkv, d, pages, strided = c
    return f"ps{ps}-Hkv{hkv}-D{d}-pages{pages}" + ("-kvstrided" if strided else "")


@pytest.mark.parametrize("case", BIG_CACHES, ids=_big_id)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_page_offsets_past_2_31_elements(device, case):
    page, hkv, d, num_pages, strided = case
    dtype, hq, gen = torch.bfloat16, 2 * hkv, _cuda_gen()
    if strided:
        store = torch.full((num_pages, 2, page, hkv, d), math.nan, dtype=dtype, device=device)
        k_cache, v_cache = store[:, 0], store[:, 1]
    else:
        k_cache = torch.full((num_pages, page, hkv, d), math.nan, dtype=dtype, device=device)
        v_cache = torch.full_like(k_cache, math.nan)
    stride = k_cache.stride(0)
    boundary = INT32_LIMIT // stride  # first page whose first element lies at or past 2^31
    assert (num_pages - 1) * stride > INT32_LIMIT and boundary < num_pages - 300 // page - 1

    # Sequence 0 reads the highest pages (backwards), 1 pages on both sides of the 2^31 boundary,
    # 2 low pages, 3 is empty. Everything else in the caches is NaN and must never be read.
    lens = [300, 200, 50, 0]
    n_pages = [(n + page - 1) // page for n in lens]
    starts = [num_pages - n_pages[0], boundary - n_pages[1] // 2, 0, 0]
    max_pages = max(n_pages) + 1
    table = torch.full((len(lens), max_pages), -1, dtype=torch.int32)
    for b, (s, n) in enumerate(zip(starts, n_pages)):
        ids = torch.arange(s, s + n, dtype=torch.int32)
        table[b, :n] = ids.flip(0) if b == 0 else ids
    table = table.to(device)

    k_new = torch.randn(sum(lens), hkv, d, generator=gen, device=device).to(dtype)
    v_new = torch.randn(sum(lens), hkv, d, generator=gen, device=device).to(dtype)
    slots = torch.cat([table[b].long()[torch.arange(n, device=device) // page] * page + torch.arange(n, device=device) % page
                       for b, n in enumerate(lens)])
    assert int(slots.max()) // page * stride > INT32_LIMIT, "the test must write and read past element 2^31"
    kvcore.append_paged_kv(k_new, v_new, k_cache, v_cache, slots)
    # Read back with torch's (64-bit) indexing: every token landed in its slot.
    pages_of, rows_of = slots // page, slots % page
    assert torch.equal(k_cache[pages_of, rows_of], k_new) and torch.equal(v_cache[pages_of, rows_of], v_new)
    for cache in (k_cache, v_cache):  # and nothing else was written
        assert int(torch.isnan(cache).sum()) == cache.numel() - k_new.numel(), "append wrote outside its slots"

    q = torch.randn(len(lens), hq, d, generator=gen, device=device).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    ref_out, ref_lse = reference.gqa_decode(q, k_cache, v_cache, table, seq_lens)
    for num_splits in (0, 1, 3):
        out = poison(torch.empty_like(q))
        lse = poison(torch.empty(len(lens), hq, dtype=torch.float32, device=device))
        kvcore.gqa_decode(q, k_cache, v_cache, table, seq_lens, out=out, lse=lse, num_splits=num_splits)
        assert not torch.isnan(out).any(), f"num_splits={num_splits}: NaN: a read hit the wrong (NaN) page"
        torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[dtype])
        torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


# ============================================================================================
# batch 1024
# ============================================================================================

# (device, batch, Hq, Hkv, D, page_size, max_len)
BATCH_CASES = [
    pytest.param("cpu", 1024, 2, 1, 64, 4, 12, id="cpu-B1024"),
    pytest.param("cuda", 1024, 16, 4, 128, 16, 300, id="cuda-B1024", marks=cuda_only),
]


@pytest.mark.parametrize("device, batch, hq, hkv, d, page, max_len", BATCH_CASES)
def test_batch_1024_append_then_decode(device, batch, hq, hkv, d, page, max_len, gen):
    dtype = torch.bfloat16
    lens = ragged_lens(batch, max_len, page, gen)  # includes 0, 1, max_len and a mid-page length
    lens = [max(n, 1) if i % 2 else n for i, n in enumerate(lens)]  # most sequences get a new token
    kv = make_paged_kv(lens, page, hkv, d, gen=gen, dtype=dtype, device=device)
    # One decode step: the last token of every non-empty sequence is (re)written by append, then
    # every sequence is decoded.
    k_new = randn(batch, hkv, d, gen=gen, dtype=dtype, device=device)
    v_new = randn(batch, hkv, d, gen=gen, dtype=dtype, device=device)
    slots = torch.full((batch,), -1, dtype=torch.int64)
    for b, n in enumerate(lens):
        if n > 0:
            slots[b] = int(kv.block_table[b, (n - 1) // page]) * page + (n - 1) % page
    slots = slots.to(device)
    ref_k, ref_v = reference.append_paged_kv(k_new, v_new, kv.k_cache, kv.v_cache, slots)
    kvcore.append_paged_kv(k_new, v_new, kv.k_cache, kv.v_cache, slots)
    assert torch.equal(kv.k_cache, ref_k) and torch.equal(kv.v_cache, ref_v)

    q = randn(batch, hq, d, gen=gen, dtype=dtype, device=device)
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(batch, hq, dtype=torch.float32, device=device))
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)

    # Merge the decode result of every row with itself over a second, disjoint "part": the
    # merge of 1024 x Hq rows must equal the reference merge.
    lse_b = randn(batch, hq, gen=gen, device=device)
    out_b = randn(batch, hq, d, gen=gen, dtype=dtype, device=device)
    m_out, m_lse = kvcore.merge_attention_states(out, lse, out_b, lse_b)
    r_out, r_lse = reference.merge_attention_states(out, lse, out_b, lse_b)
    torch.testing.assert_close(m_out.float(), r_out, **OUT_TOL[dtype])
    torch.testing.assert_close(m_lse, r_lse, **LSE_TOL)


# ============================================================================================
# empty sequences mixed with long ones
# ============================================================================================

EMPTY_MIX = [
    pytest.param("cpu", (0, 3000), (0,), id="cpu-0-3000"),  # 2 sequences: each is cut into parts on CPU
    pytest.param("cpu", (0, 2500, 0, 1, 0, 700, 0), (0,), id="cpu-mixed7"),
    pytest.param("cuda", (0, 40_000, 0, 1, 0, 25_000, 0), (0, 1, 5, 64), id="cuda-mixed7", marks=cuda_only),
    pytest.param("cuda", (0,) * 7 + (60_000,), (0, 9), id="cuda-7empty-1long", marks=cuda_only),
]


@pytest.mark.parametrize("device, lens, splits", EMPTY_MIX)
def test_empty_sequences_mixed_with_long(device, lens, splits, gen):
    dtype, hq, hkv, d, page = torch.bfloat16, 8, 2, 128, 16
    kv = make_paged_kv(list(lens), page, hkv, d, gen=gen, dtype=dtype, device=device)
    q = randn(len(lens), hq, d, gen=gen, dtype=dtype, device=device)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    empty = torch.tensor(lens, device=device) == 0
    for num_splits in splits:
        out = poison(torch.empty_like(q))
        lse = poison(torch.empty(len(lens), hq, dtype=torch.float32, device=device))
        kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse,
                          num_splits=num_splits)
        assert bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all()), f"num_splits={num_splits}"
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[dtype])
        torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


# ============================================================================================
# scalar arguments past int32
# ============================================================================================


@pytest.mark.parametrize("window_left", [2**31 - 1, 2**32 + 5, 2**62], ids=["2^31-1", "2^32+5", "2^62"])
def test_window_left_past_int32_means_no_window(device, window_left, gen):
    """A window wider than any sequence attends to everything: a kernel that narrows the int64
    argument to 32 bits (2^32 + 5 -> 5) would attend to 6 tokens instead."""
    dtype = torch.bfloat16
    lens = [300, 0, 77]
    kv = make_paged_kv(lens, 16, 2, 64, gen=gen, dtype=dtype, device=device)
    q = randn(3, 4, 64, gen=gen, dtype=dtype, device=device)
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(3, 4, dtype=torch.float32, device=device))
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse, window_left=window_left)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)  # no window
    torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)
