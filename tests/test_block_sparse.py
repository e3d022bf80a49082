"""Tests of block_sparse_decode and kvcore.block_sparse.build_selection, on CPU and (when present)
CUDA, against kvcore.reference.

Outputs are poisoned with NaN before each call; inputs are random normals with shuffled pages,
ragged lengths (0, 1, partial last pages) and junk in the unused block-table entries (conftest).
Selections are random subsets of each sequence's pages, listed in random order, with junk
(negative, huge and repeated page numbers) past each list's count.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

import kvcore
from conftest import (HAS_CUDA, LSE_TOL, NO_CUDA_REASON, OUT_TOL, assert_out_lse_close, assert_written_and_close,
                      make_paged_kv, op_workspace, opcheck_dtype, poison, ragged_lens, randn, run_tests_with_env)
from decode_cases import PagedDecodeCase
from kvcore import reference
from kvcore.block_sparse import build_selection
from test_ops import OPCHECK_UTILS, BadCase, _decode_args, _other_device, _set, _set_item, _set_kw

cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]


# ============================================================================================
# Selections
# ============================================================================================


def random_selection(
    lens: list[int],
    page_size: int,
    num_kv_heads: int,
    gen: torch.Generator,
    *,
    density: str = "random",
    max_sel: Optional[int] = None,
    device="cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A selection per (sequence, KV head): ``density`` "random" (a random subset, possibly empty
    or complete, in random order), "all" (every page, shuffled) or "none". Entries past each
    count hold junk: -1, huge ids, and copies of listed pages."""
    used = [(n + page_size - 1) // page_size for n in lens]
    if max_sel is None:
        max_sel = max(used + [0]) + 2  # room for junk in every list
    pages = torch.randint(-5, 10**6, (len(lens), num_kv_heads, max_sel), generator=gen, dtype=torch.int32)
    pages[..., ::3] = -1
    counts = torch.zeros(len(lens), num_kv_heads, dtype=torch.int32)
    for b, n in enumerate(used):
        for h in range(num_kv_heads):
            if density == "all":
                c = n
            elif density == "none" or n == 0:
                c = 0
            else:
                c = int(torch.randint(0, n + 1, (1,), generator=gen))
            c = min(c, max_sel)
            chosen = torch.randperm(n, generator=gen)[:c].to(torch.int32)
            pages[b, h, :c] = chosen
            if c and c < max_sel:
                pages[b, h, c] = chosen[0]  # a duplicate past the count is junk, not a duplicate
            counts[b, h] = c
    return pages.to(device), counts.to(device)


def selected_positions_by_hand(pages: list[int], seq_len: int, page_size: int) -> list[int]:
    """The positions a list covers, written out independently of reference.block_sparse_positions."""
    return sorted(p for p in range(seq_len) if p // page_size in set(pages))


# ============================================================================================
# block_sparse_decode vs reference
# ============================================================================================


@dataclass(frozen=True)
class SparseCase(PagedDecodeCase):
    num_splits: int = 0
    density: str = "random"

    def id(self) -> str:
        parts = self.shape_parts() + self.option_parts()
        if self.num_splits:
            parts.append(f"split{self.num_splits}")
        if self.density != "random":
            parts.append(self.density)
        return "-".join(parts)


# A covering set: group sizes 1, 2, 3, 4, 8, 16; head dims 64/128/256; page sizes 1, 5, 7, 16, 64,
# 256; soft cap; lse on/off; q and cache layouts; forced splits; all/none densities.
SPARSE_CASES = [
    SparseCase(4, 8, 8, 64, 16, 100),
    SparseCase(3, 8, 4, 128, 1, 40, with_lse=False, q_layout="slice"),
    SparseCase(3, 6, 2, 64, 5, 60, soft_cap=30.0),
    SparseCase(5, 16, 4, 128, 16, 200, strided_cache=True, num_splits=3),
    SparseCase(3, 16, 2, 256, 64, 300, soft_cap=30.0, scale=1.0),
    SparseCase(3, 16, 1, 64, 256, 600, q_layout="transposed"),
    SparseCase(2, 32, 2, 128, 7, 90, num_splits=5),
    SparseCase(2, 3, 3, 256, 16, 50, density="all"),
    SparseCase(4, 24, 3, 128, 256, 513, q_layout="slice", num_splits=2),
    SparseCase(3, 4, 1, 64, 1, 17, soft_cap=30.0, strided_cache=True, scale=1.0),
    SparseCase(2, 16, 16, 64, 16, (0, 0)),
    SparseCase(3, 8, 2, 64, 16, 80, density="none"),
    SparseCase(1, 2, 1, 128, 64, (1,)),
    SparseCase(2, 12, 4, 64, 16, (33, 47), num_splits=64),
]


def _paged_inputs(lens, page_size, num_kv_heads, num_q_heads, head_dim, gen, dtype=torch.float32, device="cpu",
                  **selection):
    """A paged cache holding ``lens``, a random q and a ``random_selection`` (``selection``: its
    keyword arguments), drawn in that order from ``gen``."""
    kv = make_paged_kv(lens, page_size, num_kv_heads, head_dim, gen=gen, dtype=dtype, device=device)
    q = randn(len(lens), num_q_heads, head_dim, gen=gen, dtype=dtype, device=device)
    sel_pages, sel_counts = random_selection(lens, page_size, num_kv_heads, gen, device=device, **selection)
    return kv, q, sel_pages, sel_counts


def _outputs(batch: int, heads: int, dim: int, dtype, device, with_lse: bool = True):
    out = poison(torch.empty(batch, heads, dim, dtype=dtype, device=device))
    lse = poison(torch.empty(batch, heads, dtype=torch.float32, device=device)) if with_lse else None
    return out, lse


def _check(out, lse, ref_out, ref_lse, dtype):
    assert_written_and_close("block_sparse_decode", out, lse, ref_out, ref_lse, dtype)


def _check_heads_against_dense(out, lse, q, kv, b, h, group, pos, dtype):
    """The query heads of sequence ``b``'s KV head ``h`` against dense attention over the tokens at
    positions ``pos`` (gathered through the block table)."""
    k = reference.gather_paged(kv.k_cache, kv.block_table[b], pos)[:, h : h + 1]
    v = reference.gather_paged(kv.v_cache, kv.block_table[b], pos)[:, h : h + 1]
    heads = slice(h * group, (h + 1) * group)
    o, s = reference.dense_attention(q[b, heads], k, v)
    assert_out_lse_close(out[b, heads], lse[b, heads], o.float(), s.float(), dtype)


def _check_empty_lists(out, lse, counts, group):
    """Heads whose KV group selected nothing: exactly 0 and -inf."""
    for b, h in (counts.cpu() == 0).nonzero().tolist():
        heads = slice(h * group, (h + 1) * group)
        assert bool((out[b, heads] == 0).all())
        if lse is not None:
            assert bool(torch.isneginf(lse[b, heads]).all())


@pytest.mark.parametrize("case", SPARSE_CASES, ids=SparseCase.id)
def test_block_sparse_decode_matches_reference(device, dtype, case, gen):
    lens = case.draw_lens(gen)
    kv = make_paged_kv(lens, case.page_size, case.num_kv_heads, case.head_dim, gen=gen, dtype=dtype, device=device,
                       strided_cache=case.strided_cache)
    sel_pages, sel_counts = random_selection(lens, case.page_size, case.num_kv_heads, gen, density=case.density,
                                             device=device)
    q = case.make_q(gen, dtype, device)
    before = [t.clone() for t in (q, kv.k_cache, kv.v_cache, kv.block_table, sel_pages, sel_counts)]
    out, lse = _outputs(case.batch, case.num_q_heads, case.head_dim, dtype, device, case.with_lse)

    result = kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts,
                                        scale=case.scale, logit_soft_cap=case.soft_cap, out=out, lse=lse,
                                        num_splits=case.num_splits)
    if case.with_lse:
        assert isinstance(result, tuple) and result[0] is out and result[1] is lse
    else:
        assert result is out

    ref_out, ref_lse = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                                     sel_pages, sel_counts, scale=case.scale,
                                                     logit_soft_cap=case.soft_cap)
    _check(out, lse, ref_out, ref_lse, dtype)
    _check_empty_lists(out, lse, sel_counts, case.num_q_heads // case.num_kv_heads)
    after = (q, kv.k_cache, kv.v_cache, kv.block_table, sel_pages, sel_counts)
    assert all(torch.equal(x, y) for x, y in zip(before, after)), "an input was modified"


def test_reference_is_dense_attention_over_the_selected_tokens(gen):
    """The reference itself, against attention over tokens gathered by hand, per (b, KV head)."""
    lens, ps, hkv, group, d = [37, 16, 0, 5], 8, 2, 3, 64
    kv = make_paged_kv(lens, ps, hkv, d, gen=gen, dtype=torch.float64)
    sel_pages, sel_counts = random_selection(lens, ps, hkv, gen)
    q = randn(len(lens), hkv * group, d, gen=gen, dtype=torch.float64)
    out, lse = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages,
                                             sel_counts)
    for b, n in enumerate(lens):
        for h in range(hkv):
            listed = sel_pages[b, h, : int(sel_counts[b, h])].tolist()
            pos = selected_positions_by_hand(listed, n, ps)
            assert reference.block_sparse_positions(listed, n, ps).tolist() == pos
            rows = [(int(kv.block_table[b, p // ps]), p % ps) for p in pos]
            k = torch.stack([kv.k_cache[pg, off, h] for pg, off in rows]) if rows else torch.zeros(0, d, dtype=torch.float64)
            v = torch.stack([kv.v_cache[pg, off, h] for pg, off in rows]) if rows else torch.zeros(0, d, dtype=torch.float64)
            for g in range(group):
                hq = h * group + g
                if not pos:
                    assert bool((out[b, hq] == 0).all()) and math.isinf(float(lse[b, hq]))
                    continue
                logits = (k @ q[b, hq]) / math.sqrt(d)
                torch.testing.assert_close(lse[b, hq].double(), torch.logsumexp(logits, 0), atol=1e-5, rtol=1e-6)
                torch.testing.assert_close(out[b, hq].double(), torch.softmax(logits, 0) @ v, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("page_size, max_len", [(1, 30), (16, 150), (256, 700)], ids=["ps1", "ps16", "ps256"])
def test_every_page_selected_equals_gqa_decode(device, dtype, page_size, max_len, gen):
    lens = ragged_lens(4, max_len, page_size, gen)
    kv, q, sel_pages, sel_counts = _paged_inputs(lens, page_size, 2, 8, 128, gen, dtype, device, density="all")
    out, lse = _outputs(4, 8, 128, dtype, device)
    kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts,
                               out=out, lse=lse)
    dense_out, dense_lse = kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, return_lse=True)
    assert_out_lse_close(out, lse, dense_out.float(), dense_lse, dtype)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    _check(out, lse, ref_out, ref_lse, dtype)


def test_partial_last_page(device, dtype, gen):
    """Only the last, partially filled page: attention over exactly its seq_len % page_size tokens."""
    ps, lens, hkv, group, d = 16, [37, 20, 1, 47], 2, 4, 64
    kv = make_paged_kv(lens, ps, hkv, d, gen=gen, dtype=dtype, device=device)
    q = randn(len(lens), hkv * group, d, gen=gen, dtype=dtype, device=device)
    last = [(n - 1) // ps for n in lens]
    sel_pages = torch.tensor([[[x, 0]] * hkv for x in last], dtype=torch.int32, device=device)
    sel_counts = torch.ones(len(lens), hkv, dtype=torch.int32, device=device)
    out, lse = _outputs(len(lens), hkv * group, d, dtype, device)
    kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts,
                               out=out, lse=lse)
    for b, n in enumerate(lens):
        page = int(kv.block_table[b, last[b]])
        tokens = n - last[b] * ps  # 5, 4, 1, 15 tokens of the last page
        k = kv.k_cache[page, :tokens].double()  # [tokens, Hkv, D]
        v = kv.v_cache[page, :tokens].double()
        o, s = reference.dense_attention(q[b], k, v)
        assert_out_lse_close(out[b], lse[b], o.float(), s.float(), dtype)


def test_empty_selections(device, dtype, gen):
    """Empty lists next to non-empty ones, a zero-length sequence, and max_sel = 0."""
    lens, ps, hkv, group, d = [40, 0, 25], 8, 3, 2, 64
    kv = make_paged_kv(lens, ps, hkv, d, gen=gen, dtype=dtype, device=device)
    q = randn(3, hkv * group, d, gen=gen, dtype=dtype, device=device)
    sel_pages = torch.tensor(
        [[[4, 1], [7, 7], [0, 2]], [[-1, 9], [3, 3], [0, 0]], [[3, 0], [2, -4], [1, 1]]], dtype=torch.int32,
        device=device)
    sel_counts = torch.tensor([[2, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.int32, device=device)
    out, lse = _outputs(3, hkv * group, d, dtype, device)
    kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts,
                               out=out, lse=lse)
    ref_out, ref_lse = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                                     sel_pages, sel_counts)
    _check(out, lse, ref_out, ref_lse, dtype)
    _check_empty_lists(out, lse, sel_counts, group)
    assert int((sel_counts == 0).sum()) == 6

    none_pages = torch.zeros(3, hkv, 0, dtype=torch.int32, device=device)
    none_counts = torch.zeros(3, hkv, dtype=torch.int32, device=device)
    out, lse = _outputs(3, hkv * group, d, dtype, device)
    kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, none_pages, none_counts,
                               out=out, lse=lse)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())


def test_junk_past_counts_is_ignored(device, dtype, gen):
    """Two selections that differ only past the counts give bitwise the same result."""
    lens, ps, hkv = [70, 33, 128], 16, 2
    kv, q, sel_pages, sel_counts = _paged_inputs(lens, ps, hkv, 8, 64, gen, dtype, device, max_sel=12)
    live = torch.arange(12, device=device).view(1, 1, -1) < sel_counts.unsqueeze(-1)
    junk_kinds = [
        torch.full_like(sel_pages, -1),
        torch.full_like(sel_pages, 2**31 - 1),
        sel_pages.roll(1, dims=-1),  # copies of listed pages: duplicates only if they were read
        torch.randint(-(2**31), 2**31 - 1, sel_pages.shape, generator=gen, dtype=torch.int32).to(device),
    ]
    results = []
    for junk in junk_kinds:
        pages = torch.where(live, sel_pages, junk)
        out, lse = _outputs(3, 8, 64, dtype, device)
        kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, pages, sel_counts,
                                   out=out, lse=lse, num_splits=2)
        results.append((out, lse))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    ref_out, ref_lse = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                                     sel_pages, sel_counts)
    _check(*results[0], ref_out, ref_lse, dtype)


def test_listed_order_does_not_matter(device, gen):
    lens, ps, hkv = [90, 64], 8, 2
    dtype = torch.float32 if device == "cpu" else torch.bfloat16  # CUDA kernels take 16-bit floats
    kv, q, sel_pages, sel_counts = _paged_inputs(lens, ps, hkv, 4, 64, gen, dtype, device, density="all")
    a = kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts,
                                   return_lse=True)
    live = torch.arange(sel_pages.shape[2], device=device).view(1, 1, -1) < sel_counts.unsqueeze(-1)
    big = torch.iinfo(torch.int32).max
    ordered = torch.where(live, sel_pages, torch.full_like(sel_pages, big)).sort(dim=-1).values
    ordered = torch.where(ordered == big, torch.full_like(ordered, -1), ordered)
    b = kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, ordered, sel_counts,
                                   return_lse=True)
    torch.testing.assert_close(a[0], b[0], **OUT_TOL[dtype])
    torch.testing.assert_close(a[1], b[1], **LSE_TOL)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 8, 16])
def test_group_sizes(device, group, gen):
    dtype = torch.bfloat16
    lens, ps, hkv = [200, 45], 16, 2
    kv, q, sel_pages, sel_counts = _paged_inputs(lens, ps, hkv, hkv * group, 128, gen, dtype, device)
    out, lse = _outputs(2, hkv * group, 128, dtype, device)
    kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts,
                               out=out, lse=lse)
    ref = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts)
    _check(out, lse, *ref, dtype)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("page_size", [1, 2, 16, 64, 256])
def test_head_dims_and_page_sizes(device, head_dim, page_size, gen):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [3 * page_size + 1, 2 * page_size - 1 if page_size > 1 else 7]
    kv, q, sel_pages, sel_counts = _paged_inputs(lens, page_size, 2, 8, head_dim, gen, dtype, device)
    sel_counts[0, 0] = 0  # one empty list, one full one
    sel_pages[0, 1, :4] = torch.tensor([3, 0, 2, 1], dtype=torch.int32)
    sel_counts[0, 1] = 4
    out, lse = _outputs(2, 8, head_dim, dtype, device)
    kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts,
                               out=out, lse=lse)
    ref = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts)
    _check(out, lse, *ref, dtype)
    _check_empty_lists(out, lse, sel_counts, 4)


def test_allocates_outputs(device, dtype, gen):
    lens = [0, 1, 45, 9]
    kv, q, sel_pages, sel_counts = _paged_inputs(lens, 8, 2, 8, 64, gen, dtype, device)
    out = kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == q.shape
    out2, lse = kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages,
                                           sel_counts, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (4, 8)
    ref_out, ref_lse = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                                     sel_pages, sel_counts)
    _check(out, None, ref_out, ref_lse, dtype)
    _check(out2, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_forced_splits_are_deterministic(device, num_splits, gen):
    dtype = torch.bfloat16
    lens = ragged_lens(3, 3000, 16, gen)
    kv, q, sel_pages, sel_counts = _paged_inputs(lens, 16, 2, 8, 128, gen, dtype, device)
    results = []
    for _ in range(2):
        out, lse = _outputs(3, 8, 128, dtype, device)
        kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts,
                                   out=out, lse=lse, num_splits=num_splits)
        results.append((out, lse))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    ref = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts)
    _check(*results[0], *ref, dtype)


def test_workspace_ignored_on_cpu(gen):
    lens = [3, 70, 0]
    kv, q, sel_pages, sel_counts = _paged_inputs(lens, 16, 2, 4, 64, gen, density="all")
    args = (q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts)
    base = kvcore.block_sparse_decode(*args, return_lse=True, num_splits=3)
    for ws in (None, torch.zeros(16, dtype=torch.uint8), torch.empty(0)):
        out, lse = kvcore.block_sparse_decode(*args, return_lse=True, workspace=ws, num_splits=3)
        assert torch.equal(out, base[0]) and torch.equal(lse, base[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_issue_shape_long_selection_cuda(device, dtype, gen):
    """The issue's shape at a small batch: Hq32/Hkv8/D128, 37 selected pages of 128 tokens out of
    a 20000-token sequence (automatic split), and page 16 with 8 pages per block."""
    for page_size, per_block in [(128, 1), (16, 8)]:
        lens = [20000, 9000]
        kv = make_paged_kv(lens, page_size, 8, 128, gen=gen, dtype=dtype, device=device)
        q = randn(2, 32, 128, gen=gen, dtype=dtype, device=device)
        blocks = [(n + 127) // 128 for n in lens]
        pages = torch.full((2, 8, 37 * per_block), -1, dtype=torch.int32)
        for b, nb in enumerate(blocks):
            for h in range(8):
                chosen = torch.randperm(nb, generator=gen)[:37]
                ids = (chosen.view(-1, 1) * per_block + torch.arange(per_block)).flatten()
                ids = ids[ids < (lens[b] + page_size - 1) // page_size]
                pages[b, h, : ids.numel()] = ids.to(torch.int32)
        counts = (pages >= 0).sum(-1).to(torch.int32)
        pages, counts = pages.to(device), counts.to(device)
        out, lse = _outputs(2, 32, 128, dtype, device)
        kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, pages, counts, out=out,
                                   lse=lse)
        ref = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, pages, counts)
        _check(out, lse, *ref, dtype)


@pytest.mark.parametrize("num_splits", [0, 7])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_short_lists_in_a_wide_selection_cuda(device, num_splits, gen):
    """Selections much shorter than max_sel (the split count is made for max_sel's pages): each
    list's splits share its own pages' positions (split_range.h's split_chunk): random subsets,
    then every page of each sequence (5000 tokens the longest), empty lists for the empty
    sequence. Against the reference."""
    lens, ps = [5000, 300, 0, 2000, 17], 16
    for density in ("random", "all"):
        kv, q, sel_pages, sel_counts = _paged_inputs(lens, ps, 2, 8, 128, gen, torch.bfloat16, device, max_sel=1000,
                                                     density=density)
        out, lse = _outputs(len(lens), 8, 128, torch.bfloat16, device)
        kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts,
                                   out=out, lse=lse, num_splits=num_splits)
        ref = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages,
                                            sel_counts)
        _check(out, lse, *ref, torch.bfloat16)


# ============================================================================================
# Sinks + local window, and merging with other attention
# ============================================================================================


def test_sinks_local_and_chosen_via_build_selection(device, dtype, gen):
    ps, hkv, group, d = 8, 2, 4, 64
    lens = [100, 5, 0, 33, 64]
    kv = make_paged_kv(lens, ps, hkv, d, gen=gen, dtype=dtype, device=device)
    q = randn(len(lens), hkv * group, d, gen=gen, dtype=dtype, device=device)
    used = [(n + ps - 1) // ps for n in lens]
    chosen = torch.full((len(lens), hkv, 3), -1, dtype=torch.int64)
    for b, n in enumerate(used):
        for h in range(hkv):
            k = min(n, 3)
            chosen[b, h, :k] = torch.randint(0, max(n, 1), (k,), generator=gen)  # repeats allowed
    sel_pages, sel_counts = build_selection(kv.seq_lens, ps, chosen_pages=chosen.to(device), n_sink_pages=1,
                                            n_local_pages=2)
    out, lse = _outputs(len(lens), hkv * group, d, dtype, device)
    kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts,
                               out=out, lse=lse)
    # The same attention, from positions written out by hand: sink page, last two pages, chosen.
    for b, n in enumerate(lens):
        for h in range(hkv):
            pages = {0} if used[b] else set()
            pages |= set(range(max(0, used[b] - 2), used[b]))
            pages |= {int(x) for x in chosen[b, h] if x >= 0}
            pos = torch.tensor(selected_positions_by_hand(sorted(pages), n, ps), dtype=torch.long)
            _check_heads_against_dense(out, lse, q, kv, b, h, group, pos, dtype)


def test_merges_with_other_parts(device, dtype, gen):
    """A selection cut in two disjoint halves, merged with merge_attention_states, equals the whole;
    and retrieved pages before a sliding window (gqa_decode) merge into attention over both."""
    ps, hkv, group, d = 16, 2, 4, 128
    lens = [300, 97, 160]
    kv, q, sel_pages, sel_counts = _paged_inputs(lens, ps, hkv, hkv * group, d, gen, dtype, device, density="all")
    args = (q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)

    half = sel_counts // 2
    first_pages = sel_pages
    second_pages = torch.zeros_like(sel_pages)
    for b in range(3):
        for h in range(hkv):
            c, m = int(sel_counts[b, h]), int(half[b, h])
            second_pages[b, h, : c - m] = sel_pages[b, h, m:c]
    part_a = kvcore.block_sparse_decode(*args, first_pages, half, return_lse=True)
    part_b = kvcore.block_sparse_decode(*args, second_pages, sel_counts - half, return_lse=True)
    merged_out, merged_lse = kvcore.merge_attention_states(*part_a, *part_b)
    ref_out, ref_lse = reference.block_sparse_decode(*args, sel_pages, sel_counts)
    _check(merged_out, merged_lse, ref_out, ref_lse, dtype)

    # Retrieved pages entirely before the window of the last `window` tokens, plus the window.
    window = 40
    retrieved = torch.full((3, hkv, 4), -1, dtype=torch.int32)
    counts = torch.zeros(3, hkv, dtype=torch.int32)
    for b, n in enumerate(lens):
        before = (n - window) // ps  # pages ending at or before the window's start
        for h in range(hkv):
            pick = torch.randperm(before, generator=gen)[: min(before, 3 + h)]
            retrieved[b, h, : pick.numel()] = pick.to(torch.int32)
            counts[b, h] = pick.numel()
    retrieved, counts = retrieved.to(device), counts.to(device)
    sparse = kvcore.block_sparse_decode(*args, retrieved, counts, return_lse=True)
    local = kvcore.gqa_decode(*args, window_left=window - 1, return_lse=True)
    out, lse = kvcore.merge_attention_states(*sparse, *local)
    for b, n in enumerate(lens):
        for h in range(hkv):
            listed = retrieved[b, h, : int(counts[b, h])].tolist()
            pos = torch.tensor(selected_positions_by_hand(listed, n, ps) + list(range(n - window, n)))
            _check_heads_against_dense(out, lse, q, kv, b, h, group, pos, dtype)


def test_compiles_fullgraph(device, gen):
    """torch.compile(fullgraph=True) through the wrapper (validation is skipped under compile)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [100, 37, 1]
    kv, q, sel_pages, sel_counts = _paged_inputs(lens, 16, 2, 8, 64, gen, dtype, device)
    out, lse = _outputs(3, 8, 64, dtype, device)

    def step(q, k_cache, v_cache, block_table, seq_lens, sel_pages, sel_counts, out, lse):
        kvcore.block_sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel_pages, sel_counts, out=out, lse=lse)
        return out.float() * 2.0

    torch._dynamo.reset()
    result = torch.compile(step, fullgraph=True)(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages,
                                                 sel_counts, out, lse)
    ref_out, ref_lse = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                                     sel_pages, sel_counts)
    _check(result / 2.0, lse, ref_out, ref_lse, dtype)


# ============================================================================================
# build_selection
# ============================================================================================


def _selection_by_hand(lens, ps, chosen, n_sink, n_local):
    lists = []
    for b, n in enumerate(lens):
        used = (n + ps - 1) // ps
        row = []
        for h in range(chosen.shape[1]):
            pages = set(range(min(n_sink, used))) | set(range(max(0, used - n_local), used))
            pages |= {int(x) for x in chosen[b, h] if x >= 0}
            row.append(sorted(pages))
        lists.append(row)
    return lists


@pytest.mark.parametrize("n_sink, n_local", [(0, 0), (1, 0), (0, 3), (2, 2), (10, 10)])
def test_build_selection_matches_sets(device, n_sink, n_local, gen):
    ps = 4
    lens = [0, 1, 4, 5, 37, 64]
    used = [(n + ps - 1) // ps for n in lens]
    chosen = torch.full((len(lens), 3, 5), -1, dtype=torch.int64)
    for b, n in enumerate(used):
        if n:
            chosen[b] = torch.randint(-2, n, (3, 5), generator=gen)  # repeats and padding
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    sel_pages, sel_counts = build_selection(seq_lens, ps, chosen_pages=chosen.to(device), n_sink_pages=n_sink,
                                            n_local_pages=n_local)
    expected = _selection_by_hand(lens, ps, chosen, n_sink, n_local)
    width = max(len(x) for row in expected for x in row)
    assert sel_pages.shape == (len(lens), 3, width) and sel_pages.dtype == torch.int32
    assert sel_counts.dtype == torch.int32 and sel_pages.device == seq_lens.device
    for b in range(len(lens)):
        for h in range(3):
            c = int(sel_counts[b, h])
            assert sel_pages[b, h, :c].tolist() == expected[b][h]
            assert bool((sel_pages[b, h, c:] == -1).all())


def test_build_selection_without_chosen_and_fixed_shapes(device):
    seq_lens = torch.tensor([50, 3, 0], dtype=torch.int32, device=device)
    sel_pages, sel_counts = build_selection(seq_lens, 16, num_kv_heads=2, n_sink_pages=1, n_local_pages=1,
                                            max_pages=8, max_sel=5)
    assert sel_pages.shape == (3, 2, 5)
    assert sel_counts.tolist() == [[2, 2], [1, 1], [0, 0]]
    assert sel_pages[0, 0].tolist() == [0, 3, -1, -1, -1]
    assert sel_pages[1, 1].tolist() == [0, -1, -1, -1, -1]
    # max_sel wider than max_pages still pads with -1.
    wide, _ = build_selection(seq_lens, 16, num_kv_heads=1, n_local_pages=4, max_pages=4, max_sel=6)
    assert wide[0, 0].tolist() == [0, 1, 2, 3, -1, -1]


def test_build_selection_errors(device, no_validation):
    seq_lens = torch.tensor([20, 9], dtype=torch.int32, device=device)
    chosen = torch.tensor([[[0, 5]], [[2, 1]]], device=device)  # 5 is past sequence 0's 3 pages of 8
    # Validation off: the page past the end is dropped, an overlong list is cut to max_sel.
    pages, counts = build_selection(seq_lens, 8, chosen_pages=chosen)
    assert counts.tolist() == [[1], [1]] and pages[:, 0, 0].tolist() == [0, 1]
    pages, counts = build_selection(seq_lens, 8, num_kv_heads=1, n_local_pages=3, max_sel=2)
    assert counts.tolist() == [[2], [2]] and pages[0, 0].tolist() == [0, 1]
    kvcore.set_validation(True)
    with pytest.raises(ValueError, match=r"chosen_pages\[0, 0, 1\] = 5"):
        build_selection(seq_lens, 8, chosen_pages=chosen)
    with pytest.raises(ValueError, match="max_sel"):
        build_selection(seq_lens, 8, num_kv_heads=1, n_local_pages=3, max_sel=2)
    with pytest.raises(ValueError, match="max_pages"):
        build_selection(seq_lens, 8, num_kv_heads=1, max_pages=2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_selection(seq_lens, 8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_selection(seq_lens, 8, num_kv_heads=2, chosen_pages=chosen)
    with pytest.raises(ValueError, match="n_sink_pages"):
        build_selection(seq_lens, 8, num_kv_heads=1, n_sink_pages=-1)
    with pytest.raises(ValueError, match="page_size"):
        build_selection(seq_lens, 0, num_kv_heads=1)
    with pytest.raises(ValueError, match="chosen_pages must be"):
        build_selection(seq_lens, 8, chosen_pages=chosen[0])
    with pytest.raises(ValueError, match="seq_lens"):
        build_selection(seq_lens.float(), 8, num_kv_heads=1)


# ============================================================================================
# opcheck
# ============================================================================================


def test_opcheck_block_sparse_decode(device, gen):
    dtype = opcheck_dtype(device)
    lens = [5, 0, 19]
    kv, q, sel_pages, sel_counts = _paged_inputs(lens, 8, 2, 4, 64, gen, dtype, device)
    out = torch.empty_like(q)
    lse = torch.empty(3, 4, dtype=torch.float32, device=device)
    workspace = op_workspace(device)
    for cap, num_splits, with_lse in [(0.0, 0, True), (30.0, 2, False)]:
        args = (q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts, 0.125, cap, out,
                lse if with_lse else None, workspace, num_splits)
        torch.library.opcheck(torch.ops.kvcore.block_sparse_decode.default, args, test_utils=OPCHECK_UTILS)


# ============================================================================================
# Bad input: the right error, naming the argument, and nothing written
# ============================================================================================


def _sparse_args(device: str, gen) -> SimpleNamespace:
    """gqa_decode's bad-input arguments (page size 8; sequence 2 has 20 tokens = pages 0..2) and a
    valid selection with junk past its counts: sequence 0's lists empty, sequence 1's one page,
    sequence 2's two and one."""
    a = _decode_args(device, gen)
    a.sel_pages = torch.tensor([[[5, -1, 9], [0, 0, 0]], [[0, 7, 7], [0, -3, 100]], [[2, 0, 2], [1, 99, -1]]],
                               dtype=torch.int32, device=device)
    a.sel_counts = torch.tensor([[0, 0], [1, 1], [2, 1]], dtype=torch.int32, device=device)
    return a


BAD_SPARSE = [
    # selection contents (validation on)
    BadCase("sel_page_past_seq_len", _set_item("sel_pages", (2, 0, 1), lambda a: 3), ValueError,
            r"sel_pages\[2, 0, 1\] = 3 is not a page of sequence 2"),
    BadCase("sel_page_on_empty_sequence", _set_item("sel_counts", (0, 1), lambda a: 1), ValueError,
            r"sel_pages\[0, 1, 0\] = 0 is not a page of sequence 0"),
    BadCase("sel_page_negative", _set_item("sel_pages", (1, 1, 0), lambda a: -1), ValueError, r"sel_pages\[1, 1, 0\]"),
    BadCase("sel_page_duplicate", _set_item("sel_counts", (2, 0), lambda a: 3), ValueError,
            r"sel_pages\[2, 0\] lists page 2 more than once"),
    BadCase("sel_count_over_max_sel", _set_item("sel_counts", (2, 1), lambda a: 4), ValueError,
            r"sel_counts\[2, 1\] = 4 must be in \[0, max_sel = 3\]"),
    BadCase("sel_count_negative", _set_item("sel_counts", (1, 0), lambda a: -1), ValueError, r"sel_counts\[1, 0\]"),
    # selection dtypes, shapes, layouts
    BadCase("sel_pages_int64", _set("sel_pages", lambda t, a, d: t.long()), RuntimeError, r"sel_pages must have dtype"),
    BadCase("sel_counts_int64", _set("sel_counts", lambda t, a, d: t.long()), RuntimeError,
            r"sel_counts must have dtype"),
    BadCase("sel_pages_rank", _set("sel_pages", lambda t, a, d: t[..., 0]), RuntimeError, r"sel_pages must be 3-D"),
    BadCase("sel_counts_rank", _set("sel_counts", lambda t, a, d: t.flatten()), RuntimeError,
            r"sel_counts must be 2-D"),
    BadCase("sel_pages_heads", _set("sel_pages", lambda t, a, d: torch.cat([t, t[:, :1]], dim=1)), RuntimeError,
            r"sel_pages must have shape"),
    BadCase("sel_counts_batch", _set("sel_counts", lambda t, a, d: t[:2].contiguous()), RuntimeError,
            r"sel_counts must have shape"),
    BadCase("sel_pages_not_contiguous", _set("sel_pages", lambda t, a, d: t.transpose(0, 1).contiguous().transpose(0, 1)),
            RuntimeError, r"sel_pages must be contiguous"),
    # the decode arguments shared with gqa_decode
    BadCase("q_rank", _set("q", lambda t, a, d: t[0]), ValueError, r"\bq must be 3-D"),
    BadCase("q_fp16_cache_bf16", _set("q", lambda t, a, d: t.half()), RuntimeError, r"k_cache must have dtype"),
    BadCase("out_shape", _set("out", lambda t, a, d: t[:, :, :32].contiguous()), RuntimeError, r"\bout must have the shape"),
    BadCase("lse_dtype", _set("lse", lambda t, a, d: poison(t.bfloat16())), RuntimeError, r"\blse must have dtype"),
    BadCase("heads_not_dividing", lambda a, d: (setattr(a, "q", a.q[:, :3]), setattr(a, "out", a.out[:, :3].contiguous())),
            RuntimeError, r"num_q_heads \(3\) must be a multiple of num_kv_heads \(2\)"),
    BadCase("page_out_of_range", _set_item("block_table", (2, 2), lambda a: a.num_pages), ValueError, r"block_table"),
    BadCase("seq_len_past_capacity", _set_item("seq_lens", 1, lambda a: 33), ValueError, r"seq_lens"),
    BadCase("scale_zero", _set_kw("scale", 0.0), ValueError, r"scale"),
    BadCase("soft_cap_negative", _set_kw("logit_soft_cap", -1.0), ValueError, r"logit_soft_cap"),
    BadCase("num_splits_negative", _set_kw("num_splits", -1), ValueError, r"num_splits"),
    BadCase("scale_past_float32", _set_kw("scale", 1e39), ValueError, r"scale must be .*float32's range"),
    # devices
    BadCase("sel_pages_other_device", _set("sel_pages", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"sel_pages must be on the same device", cuda_only=True),
    BadCase("sel_counts_other_device", _set("sel_counts", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"sel_counts must be on the same device", cuda_only=True),
    BadCase("k_cache_other_device", _set("k_cache", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"k_cache must be on the same device", cuda_only=True),
    # more cells of the bad-input matrix (docs/bad_input.md): the shared decode checks, once more
    # through this op, and the CUDA kernel's limits
    BadCase("q_fp64", _set("q", lambda t, a, d: t.double()), RuntimeError, r"\bq must be"),
    BadCase("out_dtype", _set("out", lambda t, a, d: poison(t.float())), RuntimeError, r"\bout must have dtype"),
    BadCase("block_table_int64", _set("block_table", lambda t, a, d: t.long()), RuntimeError,
            r"block_table must have dtype"),
    BadCase("seq_lens_int64", _set("seq_lens", lambda t, a, d: t.long()), RuntimeError, r"seq_lens must have dtype"),
    BadCase("k_cache_rank", _set("k_cache", lambda t, a, d: t[0]), RuntimeError, r"k_cache must be 4-D"),
    BadCase("seq_lens_rank", _set("seq_lens", lambda t, a, d: t.view(3, 1)), RuntimeError, r"seq_lens must be 1-D"),
    BadCase("out_rank", _set("out", lambda t, a, d: t[0]), RuntimeError, r"\bout must be 3-D"),
    BadCase("v_cache_shape", _set("v_cache", lambda t, a, d: t[:-1]), RuntimeError, r"v_cache must have the shape"),
    BadCase("head_dim_mismatch", lambda a, d: (setattr(a, "q", a.q[..., :32]), setattr(a, "out", a.out[..., :32].contiguous())),
            RuntimeError, r"head_dim"),
    BadCase("lse_shape", _set("lse", lambda t, a, d: t[:, :3].contiguous()), RuntimeError, r"\blse must have shape"),
    BadCase("block_table_rows", _set("block_table", lambda t, a, d: t[:2].contiguous()), RuntimeError, r"block_table"),
    BadCase("out_not_contiguous", _set("out", lambda t, a, d: poison(torch.empty(3, 4, 128, dtype=t.dtype, device=d))[..., :64]),
            RuntimeError, r"\bout must be contiguous"),
    BadCase("q_last_dim_strided", _set("q", lambda t, a, d: torch.repeat_interleave(t, 2, dim=2)[..., ::2]),
            RuntimeError, r"\bq must be contiguous in its last dim"),
    BadCase("k_cache_inner_strided", _set("k_cache", lambda t, a, d: torch.repeat_interleave(t, 2, dim=3)[..., ::2]),
            RuntimeError, r"k_cache must be densely packed"),
    BadCase("sel_counts_not_contiguous", _set("sel_counts", lambda t, a, d: torch.stack([t, t], dim=2)[..., 0]),
            RuntimeError, r"sel_counts must be contiguous"),
    BadCase("page_negative", _set_item("block_table", (2, 0), lambda a: -3), ValueError, r"block_table"),
    BadCase("seq_len_negative", _set_item("seq_lens", 0, lambda a: -1), ValueError, r"seq_lens"),
    BadCase("scale_nan", _set_kw("scale", math.nan), ValueError, r"scale"),
    BadCase("soft_cap_inf", _set_kw("logit_soft_cap", math.inf), ValueError, r"logit_soft_cap"),
    BadCase("block_table_other_device", _set("block_table", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"block_table must be on the same device", cuda_only=True),
    BadCase("seq_lens_other_device", _set("seq_lens", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"seq_lens must be on the same device", cuda_only=True),
    BadCase("out_other_device", _set("out", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"\bout must be on the same device", cuda_only=True),
    BadCase("q_fp32_on_cuda", lambda a, d: [setattr(a, n, getattr(a, n).float()) for n in ("q", "k_cache", "v_cache", "out")],
            RuntimeError, r"\bq must be bfloat16 or float16 on CUDA", cuda_only=True, kernel_limit=True),
    BadCase("head_dim_32_cuda", lambda a, d: [setattr(a, n, getattr(a, n)[..., :32].contiguous())
                                              for n in ("q", "k_cache", "v_cache", "out")],
            RuntimeError, r"head_dim must be 64, 128 or 256", cuda_only=True, kernel_limit=True),
    BadCase("head_dim_zero", lambda a, d: [setattr(a, n, getattr(a, n)[..., :0].contiguous())
                                           for n in ("q", "k_cache", "v_cache", "out")],
            RuntimeError, r"q's head_dim \(last dim\) must be positive, got 0"),
    BadCase("group_17_cuda", lambda a, d: (setattr(a, "q", torch.cat([a.q] * 9, dim=1)[:, :34].contiguous()),
                                           setattr(a, "out", poison(torch.empty(3, 34, 64, dtype=a.out.dtype, device=d))),
                                           setattr(a, "lse", poison(torch.empty(3, 34, device=d)))),
            RuntimeError, r"num_q_heads / num_kv_heads must be 1..16", cuda_only=True, kernel_limit=True),
]


def test_bad_input_base_case_is_valid(device, gen):
    """The unmutated arguments of the bad-input cases run, so each case fails for its own reason."""
    a = _sparse_args(device, gen)
    kvcore.block_sparse_decode(a.q, a.k_cache, a.v_cache, a.block_table, a.seq_lens, a.sel_pages, a.sel_counts,
                               out=a.out, lse=a.lse)
    ref = reference.block_sparse_decode(a.q, a.k_cache, a.v_cache, a.block_table, a.seq_lens, a.sel_pages,
                                        a.sel_counts)
    _check(a.out, a.lse, *ref, torch.bfloat16)


@pytest.mark.parametrize("bad", [c.param() for c in BAD_SPARSE])
def test_block_sparse_decode_bad_input(device, bad, gen):
    bad.skip_unless_applies(device)
    a = _sparse_args(device, gen)
    bad.mutate(a, device)
    caches_before = (a.k_cache.clone(), a.v_cache.clone())
    with pytest.raises(bad.error, match=bad.match):
        kvcore.block_sparse_decode(a.q, a.k_cache, a.v_cache, a.block_table, a.seq_lens, a.sel_pages, a.sel_counts,
                                   out=a.out, lse=a.lse, **a.kw)
    assert bool(torch.isnan(a.out).all()), "out was written by a call that failed"
    assert bool(torch.isnan(a.lse).all()), "lse was written by a call that failed"
    assert torch.equal(a.k_cache, caches_before[0]) and torch.equal(a.v_cache, caches_before[1])


@pytest.mark.parametrize(
    "scale, cap, num_splits, match",
    [(0.0, 0.0, 0, "scale"), (math.nan, 0.0, 0, "scale"), (0.125, -1.0, 0, "logit_soft_cap"),
     (0.125, math.inf, 0, "logit_soft_cap"), (0.125, 0.0, -1, "num_splits")],
    ids=["scale0", "scalenan", "capneg", "capinf", "splitsneg"],
)
def test_op_rejects_bad_scalars(device, scale, cap, num_splits, match, gen):
    """The op itself (not only the wrapper) rejects bad scalars: C++ callers bypass ops.py."""
    a = _sparse_args(device, gen)
    ws = op_workspace(device)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.kvcore.block_sparse_decode(a.q, a.k_cache, a.v_cache, a.block_table, a.seq_lens, a.sel_pages,
                                             a.sel_counts, scale, cap, a.out, a.lse, ws, num_splits)
    assert bool(torch.isnan(a.out).all()) and bool(torch.isnan(a.lse).all())


def test_forced_splits_past_256_are_256(device, gen):
    """num_splits above 256 is taken as 256 on both devices (the CPU kernel sized its scratch from
    it, capped only at a part per 32 keys: 2^40 splits once asked for gigabytes of partials)."""
    dtype = torch.bfloat16
    kv = make_paged_kv([8300, 40], 16, 2, 64, gen=gen, dtype=dtype, device=device)  # 8300 keys: 260 parts of 32
    q = randn(2, 4, 64, gen=gen, dtype=dtype, device=device)
    pages = (8300 + 15) // 16
    sel_pages = torch.arange(pages, dtype=torch.int32, device=device).expand(2, 2, pages).contiguous()
    sel_counts = torch.tensor([[pages, pages], [3, 3]], dtype=torch.int32, device=device)
    args = (q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts)
    capped = kvcore.block_sparse_decode(*args, num_splits=256, return_lse=True)
    huge = kvcore.block_sparse_decode(*args, num_splits=2**40, return_lse=True)
    assert torch.equal(huge[0], capped[0]) and torch.equal(huge[1], capped[1])
    # ... and 256 splits (more than any other test forces) give the attention (outputs ~S^-1/2:
    # the tolerance follows their size).
    ref_out, ref_lse = reference.block_sparse_decode(*args)
    torch.testing.assert_close(capped[0].double(), ref_out.double(), atol=1e-2 * ref_out.abs().max().item(), rtol=2e-2)
    torch.testing.assert_close(capped[1].double(), ref_lse.double(), **LSE_TOL)


def test_bad_indices_without_validation(device, no_validation, gen):
    """Validation off: out-of-range and duplicate pages, bad counts, bad block-table entries and
    seq_lens give wrong numbers but never a crash, an error or an unwritten output."""
    assert not kvcore.validation_enabled()
    a = _sparse_args(device, gen)
    cap = a.block_table.shape[1] * 8
    a.sel_pages[2, 0] = torch.tensor([10**6, -(10**6), 2], dtype=torch.int32)
    a.sel_pages[2, 1] = torch.tensor([1, 1, 1], dtype=torch.int32)  # duplicates
    a.sel_counts[2] = torch.tensor([3, 3], dtype=torch.int32)
    a.sel_counts[1] = torch.tensor([-4, 10**6], dtype=torch.int32)  # negative and past max_sel
    a.sel_counts[0] = torch.tensor([3, 3], dtype=torch.int32)  # pages of an "empty" sequence (made long below)
    a.block_table[0, :2] = torch.tensor([10**6, -7], dtype=torch.int32)
    seq_lens = torch.tensor([3 * cap, 10**6, 20], dtype=torch.int32, device=device)
    kvcore.block_sparse_decode(a.q, a.k_cache, a.v_cache, a.block_table, seq_lens, a.sel_pages, a.sel_counts,
                               out=a.out, lse=a.lse)
    if device == "cuda":
        torch.cuda.synchronize()
    assert not bool(torch.isnan(a.out).any()) and bool(torch.isfinite(a.out).all())
    assert not bool(torch.isnan(a.lse).any()) and not bool(torch.isposinf(a.lse).any())
    # A negative count is an empty list: 0 and -inf (heads 0-1 of sequence 1).
    assert bool((a.out[1, :2] == 0).all()) and bool(torch.isneginf(a.lse[1, :2]).all())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.skipif(os.environ.get("KVCORE_SPARSE_PAGE_DEDUP") == "off", reason="this process already runs it")
def test_without_page_dedup_in_subprocess():
    """KVCORE_SPARSE_PAGE_DEDUP=off (read once per process) makes each thread look up every copy
    slot's page itself, as page sizes the dedup does not fit always do: this file's CUDA cases
    (page sizes 1 to 256, head dims 64 to 256) and the retrieval tests once more in a fresh process
    with it set."""
    run_tests_with_env("KVCORE_SPARSE_PAGE_DEDUP", "off", ["tests/test_block_sparse.py", "tests/test_retrieval.py"],
                       "not in_subprocess", 1, "-m", "cuda")
