"""NaN in, NaN out, for that row only.

What the kernels guarantee (checked here on CPU and CUDA, against ``kvcore.reference``):

gqa_decode
    * NaN anywhere in ``q[b, h]`` (with ``seq_lens[b] > 0``): ``out[b, h, :]`` is all NaN and
      ``lse[b, h]`` is NaN. Every other (sequence, query head), including the other heads of the
      same KV group, matches the reference exactly as without the NaN. With ``seq_lens[b] == 0``
      q is never used: ``out[b, h] = 0``, ``lse[b, h] = -inf``.
    * NaN in ``k_cache`` at a position that sequence ``b`` attends to, KV head ``j``: every query
      head of group ``j`` of sequence ``b`` gets an all-NaN ``out`` row and a NaN ``lse``; other
      groups and sequences are unaffected.
    * NaN in ``v_cache`` at element ``d`` of an attended position, KV head ``j``: ``out[b, h, d]``
      is NaN for the query heads ``h`` of group ``j`` (that element only), ``lse`` stays finite.
    * NaN in the caches anywhere a sequence does not attend to (past ``seq_len`` in its last
      page, before its sliding window, pages its block table does not name, pages named by the
      block table's padding entries) never reaches any output.
    The CUDA split-KV path gives the same guarantees for every split count.

merge_attention_states
    * NaN in ``out_a[n, h, d]`` with a finite ``lse_a[n, h]``: ``out[n, h, d]`` is NaN, nothing
      else changes (``lse`` is computed from the lse inputs only).
    * NaN in ``out_a[n, h, :]`` with ``lse_a[n, h] = -inf`` (an empty part): ignored.
    * NaN in ``lse_a[n, h]``: ``out[n, h, :]`` and ``lse[n, h]`` are NaN.

append_paged_kv
    * NaN in ``k``/``v`` is stored as is, in its slot only.

block_sparse_decode
    * gqa_decode's guarantees per (sequence, KV head) selection, for every split count (CPU and
      CUDA); cache rows a pair does not select are never read, and an empty selection never
      reads q (out 0, lse -inf). Stated in full above its tests below.

token_decoder_attention
    * NaN in ``q[n, i, h]`` poisons that row; NaN in an attended K row (prefix slot or token
      ``j <= i``) the group's rows ``i >= j``; NaN in an attended V element that element of those
      rows. Later tokens, tokens past ``block_lens`` and other blocks never leak. Stated in full
      above its tests below.

mla_decode, mla_latent_project, attention_scores, compact_kv, infllm_unit_scores, topk_rows
    * Stated in full above their tests at the end of this file (CPU and CUDA; the CUDA cases skip
      where an op's CUDA kernel is not built).
"""

from __future__ import annotations

import math

import pytest
import torch

import kvcore
from conftest import HAS_CUDA, LSE_TOL, OUT_TOL, make_paged_kv, poison, randn
from kvcore import reference
from test_eviction import _window_lse_ref

_DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# CUDA split counts exercised: 1 (no split), a forced split, and the automatic choice.
SPLITS = {"cpu": (0,), "cuda": (1, 3, 0)}


def _splits_params():
    params = []
    for dev in ("cpu", "cuda"):
        marks = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")] if dev == "cuda" else []
        for dt in (torch.bfloat16, torch.float16) + ((torch.float32,) if dev == "cpu" else ()):
            for n in SPLITS[dev]:
                params.append(pytest.param(dev, dt, n, marks=marks, id=f"{dev}-{_DTYPE_IDS[dt]}-splits{n}"))
    return params


def _decode(q, kv, device, num_splits, window_left=-1):
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(q.shape[:2], dtype=torch.float32, device=device))
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse,
                      window_left=window_left, num_splits=num_splits)
    return out, lse


def _check_rows(out, lse, ref_out, ref_lse, nan_rows: torch.Tensor, dtype):
    """``nan_rows`` [B, Hq] bool: those rows are all NaN (out and lse); the rest match the reference."""
    nan_rows = nan_rows.to(out.device)
    assert bool(torch.isnan(out[nan_rows]).all()), "a row that saw NaN input has a non-NaN output element"
    assert bool(torch.isnan(lse[nan_rows]).all()), "a row that saw NaN input has a non-NaN lse"
    keep = ~nan_rows
    assert not bool(torch.isnan(out[keep]).any()), "NaN leaked into a row that never saw one"
    assert not bool(torch.isnan(lse[keep]).any()), "NaN leaked into the lse of a row that never saw one"
    torch.testing.assert_close(out[keep].float(), ref_out[keep], **OUT_TOL[dtype])
    torch.testing.assert_close(lse[keep], ref_lse[keep], **LSE_TOL)


# Sequences 0 and 2 are long (several pages, several CUDA splits), 1 is empty, 3 is short.
LENS = [700, 0, 1100, 9]
HQ, HKV, D, PAGE = 8, 2, 64, 16  # group 4


@pytest.mark.parametrize("device, dtype, num_splits", _splits_params())
def test_decode_nan_in_q_poisons_that_head_only(device, dtype, num_splits, gen):
    kv = make_paged_kv(LENS, PAGE, HKV, D, gen=gen, dtype=dtype, device=device)
    q = randn(len(LENS), HQ, D, gen=gen, dtype=dtype, device=device)
    q[0, 5, 17] = math.nan  # one element of one head of a long sequence (group 1, not its first head)
    q[2, 0, :] = math.nan  # a whole head of another sequence (group 0)
    q[1, 3, 0] = math.nan  # an empty sequence: q is never used
    out, lse = _decode(q, kv, device, num_splits)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    nan_rows = torch.zeros(len(LENS), HQ, dtype=torch.bool)
    nan_rows[0, 5] = nan_rows[2, 0] = True
    _check_rows(out, lse, ref_out, ref_lse, nan_rows, dtype)
    assert bool((out[1] == 0).all()) and bool(torch.isneginf(lse[1]).all())


def _slot_tensor(kv, b: int, pos: int):
    page = int(kv.block_table[b, pos // kv.page_size])
    return page, pos % kv.page_size


@pytest.mark.parametrize("device, dtype, num_splits", _splits_params())
def test_decode_nan_in_attended_k_poisons_that_group_only(device, dtype, num_splits, gen):
    kv = make_paged_kv(LENS, PAGE, HKV, D, gen=gen, dtype=dtype, device=device)
    q = randn(len(LENS), HQ, D, gen=gen, dtype=dtype, device=device)
    page, off = _slot_tensor(kv, 2, 1033)  # sequence 2, late position (a late split on CUDA)
    kv.k_cache[page, off, 1, 40] = math.nan  # KV head 1 -> query heads 4..7
    out, lse = _decode(q, kv, device, num_splits)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    nan_rows = torch.zeros(len(LENS), HQ, dtype=torch.bool)
    nan_rows[2, 4:8] = True
    _check_rows(out, lse, ref_out, ref_lse, nan_rows, dtype)


@pytest.mark.parametrize("device, dtype, num_splits", _splits_params())
def test_decode_nan_in_attended_v_poisons_that_element_only(device, dtype, num_splits, gen):
    kv = make_paged_kv(LENS, PAGE, HKV, D, gen=gen, dtype=dtype, device=device)
    q = randn(len(LENS), HQ, D, gen=gen, dtype=dtype, device=device)
    page, off = _slot_tensor(kv, 0, 3)  # sequence 0, an early position (the first split on CUDA)
    kv.v_cache[page, off, 0, 9] = math.nan  # KV head 0 -> query heads 0..3, element 9
    out, lse = _decode(q, kv, device, num_splits)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    nan_elems = torch.zeros(len(LENS), HQ, D, dtype=torch.bool)
    nan_elems[0, 0:4, 9] = True
    nan_elems = nan_elems.to(device)
    assert bool(torch.isnan(out[nan_elems]).all())
    assert not bool(torch.isnan(out[~nan_elems]).any()), "NaN in one V element leaked into other elements"
    assert bool(torch.isfinite(lse[torch.tensor(LENS, device=device) > 0]).all()), "NaN in V must not reach lse"
    torch.testing.assert_close(out.float().nan_to_num(), ref_out.nan_to_num(), **OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


@pytest.mark.parametrize("window_left", [-1, 200], ids=["nowindow", "window200"])
@pytest.mark.parametrize("device, dtype, num_splits", _splits_params())
def test_decode_nan_outside_attended_positions_does_not_leak(device, dtype, num_splits, window_left, gen):
    lens = [700, 0, 1100, 9, 16]
    kv = make_paged_kv(lens, PAGE, HKV, D, gen=gen, dtype=dtype, device=device, spare_pages=4, extra_table_cols=3)
    attended = torch.zeros(kv.num_pages, PAGE, dtype=torch.bool)
    for b, n in enumerate(lens):
        start = 0 if window_left < 0 else max(0, n - 1 - window_left)
        for pos in range(start, n):
            page, off = _slot_tensor(kv, b, pos)
            attended[page, off] = True
    # Every K/V element nobody attends to becomes NaN: page tails past seq_len, positions before a
    # window, and the spare pages.
    poisoned = (~attended).to(device)
    kv.k_cache[poisoned] = math.nan
    kv.v_cache[poisoned] = math.nan
    # The block table's padding entries name an all-NaN page instead of junk ids.
    spare = int(torch.nonzero(~attended.any(1))[0])
    for b, n in enumerate(lens):
        kv.block_table[b, (n + PAGE - 1) // PAGE :] = spare
    assert bool(poisoned.any())
    q = randn(len(lens), HQ, D, gen=gen, dtype=dtype, device=device)
    out, lse = _decode(q, kv, device, num_splits, window_left=window_left)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                            window_left=window_left)
    _check_rows(out, lse, ref_out, ref_lse, torch.zeros(len(lens), HQ, dtype=torch.bool), dtype)


@pytest.mark.parametrize("inplace", [False, True], ids=["outofplace", "inplace"])
def test_merge_nan_rows(device, dtype, inplace, gen):
    n, h, d = 4, 3, 64
    out_a = randn(n, h, d, gen=gen, dtype=dtype, device=device)
    out_b = randn(n, h, d, gen=gen, dtype=dtype, device=device)
    lse_a = randn(n, h, gen=gen, device=device)
    lse_b = randn(n, h, gen=gen, device=device)
    out_a[1, 2, 7] = math.nan  # finite lse: poisons element (1, 2, 7) only
    out_a[2, 0, :] = math.nan  # empty part (lse -inf): ignored
    lse_a[2, 0] = -math.inf
    lse_a[3, 1] = math.nan  # NaN lse: row (3, 1) NaN, out and lse
    ref_out, ref_lse = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    if inplace:
        out, lse = kvcore.merge_attention_states(out_a, lse_a, out_b, lse_b, out=out_a, lse=lse_a)
    else:
        out, lse = kvcore.merge_attention_states(out_a, lse_a, out_b, lse_b,
                                                 out=poison(torch.empty_like(out_a)), lse=poison(torch.empty_like(lse_a)))
    nan_out = torch.zeros(n, h, d, dtype=torch.bool)
    nan_out[1, 2, 7] = True
    nan_out[3, 1, :] = True
    nan_lse = torch.zeros(n, h, dtype=torch.bool)
    nan_lse[3, 1] = True
    nan_out, nan_lse = nan_out.to(device), nan_lse.to(device)
    assert torch.equal(torch.isnan(out), nan_out), "NaN in merge output exactly where a NaN input reaches it"
    assert torch.equal(torch.isnan(lse), nan_lse)
    assert torch.equal(torch.isnan(ref_out), nan_out)  # the reference says the same
    torch.testing.assert_close(out.float().nan_to_num(), ref_out.nan_to_num(), **OUT_TOL[dtype])
    torch.testing.assert_close(lse.nan_to_num(), ref_lse.nan_to_num(), **LSE_TOL)


def test_append_nan_stored_in_its_slot_only(device, dtype, gen):
    k_cache = randn(3, 4, 2, 64, gen=gen, dtype=dtype, device=device)
    v_cache = randn(3, 4, 2, 64, gen=gen, dtype=dtype, device=device)
    k = randn(3, 2, 64, gen=gen, dtype=dtype, device=device)
    v = randn(3, 2, 64, gen=gen, dtype=dtype, device=device)
    k[1, 0, 5] = math.nan
    v[2, 1, :] = math.nan
    slots = torch.tensor([6, 1, 11], dtype=torch.int64, device=device)
    ref_k, ref_v = reference.append_paged_kv(k, v, k_cache, v_cache, slots)
    kvcore.append_paged_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(torch.isnan(k_cache), torch.isnan(ref_k)) and torch.equal(torch.isnan(v_cache), torch.isnan(ref_v))
    assert int(torch.isnan(k_cache).sum()) == 1 and int(torch.isnan(v_cache).sum()) == 64
    assert torch.equal(k_cache.nan_to_num(), ref_k.nan_to_num()) and torch.equal(v_cache.nan_to_num(), ref_v.nan_to_num())


# ============================================================================================
# block_sparse_decode
# ============================================================================================
# The guarantee is gqa_decode's, per (sequence, KV head) selection: NaN in q[b, h] (with a
# non-empty selection for h's group) makes that row NaN; NaN in a selected K row poisons the
# group's rows of that sequence; NaN in a selected V element that element only; NaN anywhere a
# pair does not select (pages left out of its list, pages only the *other* KV head selects, the
# unfilled tail of a selected last page, spare pages, block-table padding, pages named by the
# junk past a list's count) never reaches an output. An empty selection never reads q.

# CPU parts are forced by num_splits too (0 = from the thread count), so both paths run there.
SPARSE_SPLITS = {"cpu": (0, 3), "cuda": (1, 3, 0)}


def _sparse_splits_params():
    params = []
    for dev in ("cpu", "cuda"):
        marks = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")] if dev == "cuda" else []
        for dt in (torch.bfloat16, torch.float16) + ((torch.float32,) if dev == "cpu" else ()):
            for n in SPARSE_SPLITS[dev]:
                params.append(pytest.param(dev, dt, n, marks=marks, id=f"{dev}-{_DTYPE_IDS[dt]}-splits{n}"))
    return params


# Sequence 0 and 2 long, 1 empty, 3 one partial page; group 4 as above.
SPARSE_LENS = [700, 0, 1100, 9]
# Logical pages each (sequence, KV head) must select (the rest of its list is random), and lists
# that must stay empty: sequence 3's KV head 1 selects nothing.
MUST_SELECT = {(0, 0): [0, 43], (0, 1): [5, 20], (2, 0): [0, 30], (2, 1): [64, 68], (3, 0): [0]}
EMPTY_LISTS = {(1, 0), (1, 1), (3, 1)}


def _sparse_selection(lens, gen, device, junk_from_unselected: bool = False):
    """``sel_pages [B, HKV, max_sel]``, ``sel_counts [B, HKV]``: MUST_SELECT plus about a third of
    the other pages, shuffled. Past each count: junk (-1, huge ids), or with
    ``junk_from_unselected`` real pages of the sequence that the list left out."""
    used = [(n + PAGE - 1) // PAGE for n in lens]
    max_sel = max(used) + 4
    pages = torch.randint(10**5, 10**6, (len(lens), HKV, max_sel), generator=gen, dtype=torch.int32)
    pages[..., ::2] = -1
    counts = torch.zeros(len(lens), HKV, dtype=torch.int32)
    for b, n in enumerate(used):
        for h in range(HKV):
            if (b, h) in EMPTY_LISTS:
                left_out = list(range(n))
                chosen = []
            else:
                must = MUST_SELECT[(b, h)]
                rest = [x for x in range(n) if x not in must]
                keep = torch.rand(len(rest), generator=gen) < 0.35
                chosen = must + [x for x, k in zip(rest, keep.tolist()) if k]
                left_out = [x for x, k in zip(rest, keep.tolist()) if not k]
            order = torch.randperm(len(chosen), generator=gen).tolist()
            chosen = [chosen[i] for i in order]
            pages[b, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            counts[b, h] = len(chosen)
            if junk_from_unselected and left_out:
                junk = left_out[: max_sel - len(chosen)]
                pages[b, h, len(chosen) : len(chosen) + len(junk)] = torch.tensor(junk, dtype=torch.int32)
    return pages.to(device), counts.to(device)


def _sparse_decode(q, kv, sel_pages, sel_counts, device, num_splits):
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(q.shape[:2], dtype=torch.float32, device=device))
    kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts,
                               out=out, lse=lse, num_splits=num_splits)
    return out, lse


def _sparse_ref(q, kv, sel_pages, sel_counts):
    return reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts)


def _empty_rows(sel_counts) -> torch.Tensor:
    """[B, HQ] bool: query heads whose KV group selected nothing."""
    return (sel_counts.cpu() == 0).repeat_interleave(HQ // HKV, dim=1)


@pytest.mark.parametrize("device, dtype, num_splits", _sparse_splits_params())
def test_block_sparse_nan_in_q_poisons_that_head_only(device, dtype, num_splits, gen):
    kv = make_paged_kv(SPARSE_LENS, PAGE, HKV, D, gen=gen, dtype=dtype, device=device)
    sel_pages, sel_counts = _sparse_selection(SPARSE_LENS, gen, device)
    q = randn(len(SPARSE_LENS), HQ, D, gen=gen, dtype=dtype, device=device)
    q[0, 5, 17] = math.nan  # one element of one head (group 1) of a long sequence
    q[2, 0, :] = math.nan  # a whole head (group 0) of another
    q[1, 3, 0] = math.nan  # an empty sequence: q is never used
    q[3, 6, :] = math.nan  # sequence 3, group 1: an empty selection, q is never used
    out, lse = _sparse_decode(q, kv, sel_pages, sel_counts, device, num_splits)
    ref_out, ref_lse = _sparse_ref(q, kv, sel_pages, sel_counts)
    nan_rows = torch.zeros(len(SPARSE_LENS), HQ, dtype=torch.bool)
    nan_rows[0, 5] = nan_rows[2, 0] = True
    _check_rows(out, lse, ref_out, ref_lse, nan_rows, dtype)
    empty = _empty_rows(sel_counts).to(device)
    assert bool(empty[1].all()) and bool(empty[3, 4:].all())
    assert bool((out[empty] == 0).all()) and bool(torch.isneginf(lse[empty]).all())


@pytest.mark.parametrize("device, dtype, num_splits", _sparse_splits_params())
def test_block_sparse_nan_in_selected_k_poisons_that_group_only(device, dtype, num_splits, gen):
    kv = make_paged_kv(SPARSE_LENS, PAGE, HKV, D, gen=gen, dtype=dtype, device=device)
    sel_pages, sel_counts = _sparse_selection(SPARSE_LENS, gen, device)
    q = randn(len(SPARSE_LENS), HQ, D, gen=gen, dtype=dtype, device=device)
    page, off = _slot_tensor(kv, 2, 1033)  # sequence 2, logical page 64 (selected by KV head 1)
    kv.k_cache[page, off, 1, 40] = math.nan  # -> query heads 4..7 of sequence 2
    page, off = _slot_tensor(kv, 3, 8)  # sequence 3's last token, KV head 0 -> query heads 0..3
    kv.k_cache[page, off, 0, 0] = math.nan
    out, lse = _sparse_decode(q, kv, sel_pages, sel_counts, device, num_splits)
    ref_out, ref_lse = _sparse_ref(q, kv, sel_pages, sel_counts)
    nan_rows = torch.zeros(len(SPARSE_LENS), HQ, dtype=torch.bool)
    nan_rows[2, 4:8] = True
    nan_rows[3, 0:4] = True
    _check_rows(out, lse, ref_out, ref_lse, nan_rows, dtype)


@pytest.mark.parametrize("device, dtype, num_splits", _sparse_splits_params())
def test_block_sparse_nan_in_selected_v_poisons_that_element_only(device, dtype, num_splits, gen):
    kv = make_paged_kv(SPARSE_LENS, PAGE, HKV, D, gen=gen, dtype=dtype, device=device)
    sel_pages, sel_counts = _sparse_selection(SPARSE_LENS, gen, device)
    q = randn(len(SPARSE_LENS), HQ, D, gen=gen, dtype=dtype, device=device)
    page, off = _slot_tensor(kv, 0, 43 * PAGE + 3)  # sequence 0, its last page (KV head 0 selects it)
    kv.v_cache[page, off, 0, 9] = math.nan  # -> query heads 0..3, element 9
    out, lse = _sparse_decode(q, kv, sel_pages, sel_counts, device, num_splits)
    ref_out, ref_lse = _sparse_ref(q, kv, sel_pages, sel_counts)
    nan_elems = torch.zeros(len(SPARSE_LENS), HQ, D, dtype=torch.bool)
    nan_elems[0, 0:4, 9] = True
    nan_elems = nan_elems.to(device)
    assert bool(torch.isnan(out[nan_elems]).all())
    assert not bool(torch.isnan(out[~nan_elems]).any()), "NaN in one V element leaked into other elements"
    assert not bool(torch.isnan(lse).any()), "NaN in V must not reach lse"
    assert torch.equal(torch.isnan(ref_out).cpu(), nan_elems.cpu())  # the reference says the same
    torch.testing.assert_close(out.float().nan_to_num(), ref_out.nan_to_num(), **OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


@pytest.mark.parametrize("device, dtype, num_splits", _sparse_splits_params())
def test_block_sparse_nan_outside_selection_does_not_leak(device, dtype, num_splits, gen):
    lens = SPARSE_LENS
    kv = make_paged_kv(lens, PAGE, HKV, D, gen=gen, dtype=dtype, device=device, spare_pages=4, extra_table_cols=3)
    sel_pages, sel_counts = _sparse_selection(lens, gen, device, junk_from_unselected=True)
    # attended[page, offset, kv_head]: some (sequence, KV head) list selects that token's page.
    attended = torch.zeros(kv.num_pages, PAGE, HKV, dtype=torch.bool)
    sp, sc = sel_pages.cpu(), sel_counts.cpu()
    for b, n in enumerate(lens):
        for h in range(HKV):
            for logical in sp[b, h, : int(sc[b, h])].tolist():
                for pos in range(logical * PAGE, min((logical + 1) * PAGE, n)):
                    page, off = _slot_tensor(kv, b, pos)
                    attended[page, off, h] = True
    # Every K/V row nobody selects becomes NaN, per KV head: pages a list leaves out (including
    # those only the other KV head selects, and those named by the junk past its count), the tail
    # of sequence 3's only page, and the spare pages.
    poisoned = (~attended).to(device)
    kv.k_cache[poisoned] = math.nan
    kv.v_cache[poisoned] = math.nan
    # The block table's padding entries name an all-NaN spare page instead of junk ids.
    spare = int(torch.nonzero(~attended.flatten(1).any(1))[0])
    for b, n in enumerate(lens):
        kv.block_table[b, (n + PAGE - 1) // PAGE :] = spare
    assert bool(poisoned.any()) and bool(poisoned[..., 0].any()) and bool(poisoned[..., 1].any())
    assert bool((attended[..., 0] != attended[..., 1]).any()), "no page selected by one KV head only"
    q = randn(len(lens), HQ, D, gen=gen, dtype=dtype, device=device)
    out, lse = _sparse_decode(q, kv, sel_pages, sel_counts, device, num_splits)
    ref_out, ref_lse = _sparse_ref(q, kv, sel_pages, sel_counts)
    _check_rows(out, lse, ref_out, ref_lse, torch.zeros(len(lens), HQ, dtype=torch.bool), dtype)


# ============================================================================================
# token_decoder_attention
# ============================================================================================
# Row (n, i, h) attends to block n's P prefix slots and its tokens 0..i (KV head h // G). NaN in
# q[n, i, h] (i < block_lens[n]) makes that row's out and lse NaN; NaN in an attended K row (a
# prefix slot, or token j <= i) poisons every row of the group that attends to it, i.e. rows
# i >= j only; NaN in an attended V element that element only, of those rows. NaN in a later
# token of the block (j > i), in the tokens past block_lens[n], in q of padding rows and in
# other blocks never reaches the row. Padding rows stay exactly 0 / -inf.
#
# The expected values come from reference.token_decoder_attention on the inputs *without* the
# NaN: the reference computes softmax @ V over the whole block with zero weights on masked keys,
# and 0 * NaN = NaN there, so it would show NaN from a masked V row that the op never reads.

TD_N, TD_L, TD_P, TD_HQ, TD_HKV, TD_D = 4, 8, 3, 8, 2, 64  # group 4; D 64 runs on CUDA too
TD_LENS = [8, 5, 0, 1]


def _td_params():
    params = []
    for dev in ("cpu", "cuda"):
        marks = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")] if dev == "cuda" else []
        for dt in (torch.bfloat16, torch.float16) + ((torch.float32,) if dev == "cpu" else ()):
            params.append(pytest.param(dev, dt, marks=marks, id=f"{dev}-{_DTYPE_IDS[dt]}"))
    return params


def _td_inputs(gen, dtype, device):
    q = randn(TD_N, TD_L, TD_HQ, TD_D, gen=gen, dtype=dtype, device=device)
    k = randn(TD_N, TD_P + TD_L, TD_HKV, TD_D, gen=gen, dtype=dtype, device=device)
    v = randn(TD_N, TD_P + TD_L, TD_HKV, TD_D, gen=gen, dtype=dtype, device=device)
    lens = torch.tensor(TD_LENS, dtype=torch.int32, device=device)
    return q, k, v, lens


def _td_call(q, k, v, lens, device):
    out = poison(torch.empty(q.shape, dtype=q.dtype, device=device))
    lse = poison(torch.empty(q.shape[:3], dtype=torch.float32, device=device))
    kvcore.token_decoder_attention(q, k, v, lens, out=out, lse=lse)
    return out, lse


def _td_padding_rows(device) -> torch.Tensor:
    """[N, L] bool: rows past block_lens."""
    return torch.arange(TD_L)[None, :] >= torch.tensor(TD_LENS)[:, None]


def _td_check(out, lse, ref_out, ref_lse, nan_out: torch.Tensor, nan_lse: torch.Tensor, dtype):
    """NaN exactly at ``nan_out`` [N, L, Hq, D] / ``nan_lse`` [N, L, Hq]; everything else matches
    the (NaN-free) reference; padding rows exactly 0 / -inf."""
    nan_out, nan_lse = nan_out.to(out.device), nan_lse.to(out.device)
    assert torch.equal(torch.isnan(out), nan_out), (
        f"NaN in out where none should be: {torch.nonzero(torch.isnan(out) & ~nan_out)[:4].tolist()}; "
        f"missing: {torch.nonzero(~torch.isnan(out) & nan_out)[:4].tolist()}")
    assert torch.equal(torch.isnan(lse), nan_lse), (
        f"NaN in lse where none should be: {torch.nonzero(torch.isnan(lse) & ~nan_lse)[:4].tolist()}; "
        f"missing: {torch.nonzero(~torch.isnan(lse) & nan_lse)[:4].tolist()}")
    torch.testing.assert_close(out.float()[~nan_out], ref_out.to(out.device)[~nan_out], **OUT_TOL[dtype])
    torch.testing.assert_close(lse[~nan_lse], ref_lse.to(out.device)[~nan_lse], **LSE_TOL)
    pad = _td_padding_rows(out.device).to(out.device)
    assert bool((out[pad] == 0).all()) and bool(torch.isneginf(lse[pad]).all())


@pytest.mark.parametrize("device, dtype", _td_params())
def test_token_decoder_nan_in_q_poisons_that_row_only(device, dtype, gen):
    q, k, v, lens = _td_inputs(gen, dtype, device)
    ref_out, ref_lse = reference.token_decoder_attention(q, k, v, lens)
    q[0, 3, 5, 17] = math.nan  # one element of a row of a full block (group 1)
    q[3, 0, 2, :] = math.nan  # the only valid row of block 3 (group 0)
    q[1, 6, 0, 0] = math.nan  # a padding row of block 1 (block_lens 5): q is never used
    q[2, :, :, :] = math.nan  # block 2 is empty (block_lens 0): nothing is used
    out, lse = _td_call(q, k, v, lens, device)
    nan_lse = torch.zeros(TD_N, TD_L, TD_HQ, dtype=torch.bool)
    nan_lse[0, 3, 5] = nan_lse[3, 0, 2] = True
    nan_out = nan_lse[..., None].expand(-1, -1, -1, TD_D).clone()
    _td_check(out, lse, ref_out, ref_lse, nan_out, nan_lse, dtype)


@pytest.mark.parametrize("device, dtype", _td_params())
def test_token_decoder_nan_in_attended_k_poisons_later_rows_of_that_group(device, dtype, gen):
    q, k, v, lens = _td_inputs(gen, dtype, device)
    ref_out, ref_lse = reference.token_decoder_attention(q, k, v, lens)
    k[0, TD_P + 2, 1, 40] = math.nan  # block 0, token 2, KV head 1: rows 2..7 of heads 4..7
    k[1, 1, 0, 3] = math.nan  # block 1, prefix slot 1, KV head 0: every valid row (0..4), heads 0..3
    k[3, TD_P + 1, 0, :] = math.nan  # block 3, token 1: past block_lens (1), never attended
    out, lse = _td_call(q, k, v, lens, device)
    nan_lse = torch.zeros(TD_N, TD_L, TD_HQ, dtype=torch.bool)
    nan_lse[0, 2:, 4:8] = True
    nan_lse[1, :5, 0:4] = True
    nan_out = nan_lse[..., None].expand(-1, -1, -1, TD_D).clone()
    _td_check(out, lse, ref_out, ref_lse, nan_out, nan_lse, dtype)


@pytest.mark.parametrize("device, dtype", _td_params())
def test_token_decoder_nan_in_attended_v_poisons_that_element_of_later_rows(device, dtype, gen):
    q, k, v, lens = _td_inputs(gen, dtype, device)
    ref_out, ref_lse = reference.token_decoder_attention(q, k, v, lens)
    v[0, TD_P + 4, 0, 9] = math.nan  # block 0, token 4, KV head 0: element 9 of rows 4..7, heads 0..3
    v[1, 0, 1, 63] = math.nan  # block 1, prefix slot 0, KV head 1: element 63 of rows 0..4, heads 4..7
    out, lse = _td_call(q, k, v, lens, device)
    nan_out = torch.zeros(TD_N, TD_L, TD_HQ, TD_D, dtype=torch.bool)
    nan_out[0, 4:, 0:4, 9] = True
    nan_out[1, :5, 4:8, 63] = True
    _td_check(out, lse, ref_out, ref_lse, nan_out, torch.zeros(TD_N, TD_L, TD_HQ, dtype=torch.bool), dtype)


@pytest.mark.parametrize("device, dtype", _td_params())
def test_token_decoder_nan_outside_attended_keys_does_not_leak(device, dtype, gen):
    q, k, v, lens = _td_inputs(gen, dtype, device)
    ref_out, ref_lse = reference.token_decoder_attention(q, k, v, lens)
    # Tokens past block_lens (K, V and q): every valid row of the block sees them as future tokens.
    for n, blen in enumerate(TD_LENS):
        k[n, TD_P + blen :] = math.nan
        v[n, TD_P + blen :] = math.nan
        q[n, blen:] = math.nan
    # Within full block 0: row i never sees token j > i. Poison the last token's K and V (only
    # row 7 attends to it) and check rows 0..6 stay clean while row 7 turns NaN, as it must.
    k[0, TD_P + TD_L - 1, 0, 5] = math.nan
    v[0, TD_P + TD_L - 1, 1, :] = math.nan
    out, lse = _td_call(q, k, v, lens, device)
    nan_lse = torch.zeros(TD_N, TD_L, TD_HQ, dtype=torch.bool)
    nan_lse[0, TD_L - 1, 0:4] = True  # the NaN key: heads of KV group 0, out and lse
    nan_out = nan_lse[..., None].expand(-1, -1, -1, TD_D).clone()
    nan_out[0, TD_L - 1, 4:8, :] = True  # the NaN value row: every element of group 1, lse finite
    _td_check(out, lse, ref_out, ref_lse, nan_out, nan_lse, dtype)


# ============================================================================================
# MLA: mla_decode and mla_latent_project
# ============================================================================================
# mla_decode is multi-query attention whose single key is the whole latent row c_p (c_KV and
# k_pe columns) and whose value is its first Dv columns, so:
#   * NaN anywhere in q[b, h] (seq_lens[b] > 0): out[b, h, :] and lse[b, h] are NaN; every other
#     (sequence, head) matches the reference. An empty sequence never reads q (out 0, lse -inf).
#   * NaN anywhere in an attended latent row of sequence b (a c_KV or a k_pe column): it is every
#     head's key, so every head of sequence b is NaN (out and lse); other sequences unaffected.
#   * NaN in latent rows a sequence does not attend to (page tails past seq_len, spare pages,
#     pages named by the block table's padding entries) never reaches any output.
# The CPU kernel gives these for the automatic part count and a forced one (num_splits), the
# CUDA kernel (once built) for every split count.
# mla_latent_project: NaN in hidden[t] makes token t's projected row NaN (every column of its
# c_KV and k_pe, through the projection) and nothing else: that token's slot (none for slot -1)
# and its rows of the optional outputs; other tokens' slots and untouched slots are unchanged.


def _kernel_marks(op: str) -> list:
    """CUDA cases of an op that may not have a CUDA kernel yet (as tests/test_mla.py gates them)."""
    built = torch._C._dispatch_has_kernel_for_dispatch_key(f"kvcore::{op}", "CUDA")
    return [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),
            pytest.mark.skipif(not built, reason=f"the CUDA kernel of kvcore::{op} is not built yet")]


def _mla_params():
    params = []
    for dev, splits in (("cpu", (0, 3)), ("cuda", (1, 3, 0))):
        marks = _kernel_marks("mla_decode") if dev == "cuda" else []
        for dt in (torch.bfloat16, torch.float16) + ((torch.float32,) if dev == "cpu" else ()):
            for n in splits:
                params.append(pytest.param(dev, dt, n, marks=marks, id=f"{dev}-{_DTYPE_IDS[dt]}-splits{n}"))
    return params


MLA_LENS = [300, 0, 450, 9]
MLA_H, MLA_DK, MLA_DV, MLA_PAGE = 8, 80, 64, 16


def _mla_cache(lens, gen, dtype, device, **kw):
    kv = make_paged_kv(lens, MLA_PAGE, 1, MLA_DK, gen=gen, dtype=dtype, device=device, **kw)
    return kv, kv.k_cache[:, :, 0]


def _mla_decode(q, cache, kv, num_splits):
    out = poison(torch.empty(q.shape[0], q.shape[1], MLA_DV, dtype=q.dtype, device=q.device))
    lse = poison(torch.empty(q.shape[:2], dtype=torch.float32, device=q.device))
    kvcore.mla_decode(q, cache, kv.block_table, kv.seq_lens, scale=0.1, out=out, lse=lse, num_splits=num_splits)
    return out, lse


@pytest.mark.parametrize("device, dtype, num_splits", _mla_params())
def test_mla_decode_nan_in_q_poisons_that_head_only(device, dtype, num_splits, gen):
    kv, cache = _mla_cache(MLA_LENS, gen, dtype, device)
    q = randn(len(MLA_LENS), MLA_H, MLA_DK, gen=gen, dtype=dtype, device=device)
    q[0, 5, 70] = math.nan  # a k_pe column of one head
    q[2, 0, :] = math.nan  # a whole head of another sequence
    q[1, 3, 0] = math.nan  # an empty sequence: q is never used
    out, lse = _mla_decode(q, cache, kv, num_splits)
    ref_out, ref_lse = reference.mla_decode(q, cache, kv.block_table, kv.seq_lens, 0.1, MLA_DV)
    nan_rows = torch.zeros(len(MLA_LENS), MLA_H, dtype=torch.bool)
    nan_rows[0, 5] = nan_rows[2, 0] = True
    _check_rows(out, lse, ref_out, ref_lse, nan_rows, dtype)
    assert bool((out[1] == 0).all()) and bool(torch.isneginf(lse[1]).all())


@pytest.mark.parametrize("device, dtype, num_splits", _mla_params())
def test_mla_decode_nan_in_attended_latent_poisons_that_sequence(device, dtype, num_splits, gen):
    kv, cache = _mla_cache(MLA_LENS, gen, dtype, device)
    q = randn(len(MLA_LENS), MLA_H, MLA_DK, gen=gen, dtype=dtype, device=device)
    page, off = _slot_tensor(kv, 2, 431)  # sequence 2, a late position (a late part)
    cache[page, off, 10] = math.nan  # a c_KV column (also a value column)
    page, off = _slot_tensor(kv, 3, 0)  # sequence 3, its first position
    cache[page, off, MLA_DK - 1] = math.nan  # a k_pe column (key only)
    out, lse = _mla_decode(q, cache, kv, num_splits)
    ref_out, ref_lse = reference.mla_decode(q, cache, kv.block_table, kv.seq_lens, 0.1, MLA_DV)
    nan_rows = torch.zeros(len(MLA_LENS), MLA_H, dtype=torch.bool)
    nan_rows[2] = nan_rows[3] = True
    _check_rows(out, lse, ref_out, ref_lse, nan_rows, dtype)


@pytest.mark.parametrize("device, dtype, num_splits", _mla_params())
def test_mla_decode_nan_outside_attended_positions_does_not_leak(device, dtype, num_splits, gen):
    lens = MLA_LENS + [MLA_PAGE]
    kv, cache = _mla_cache(lens, gen, dtype, device, spare_pages=3, extra_table_cols=2)
    attended = torch.zeros(kv.num_pages, MLA_PAGE, dtype=torch.bool)
    for b, n in enumerate(lens):
        for pos in range(n):
            attended[_slot_tensor(kv, b, pos)] = True
    cache[(~attended).to(device)] = math.nan  # page tails and spare pages
    spare = int(torch.nonzero(~attended.any(1))[0])
    for b, n in enumerate(lens):  # the padding entries name an all-NaN page
        kv.block_table[b, (n + MLA_PAGE - 1) // MLA_PAGE:] = spare
    q = randn(len(lens), MLA_H, MLA_DK, gen=gen, dtype=dtype, device=device)
    out, lse = _mla_decode(q, cache, kv, num_splits)
    ref_out, ref_lse = reference.mla_decode(q, cache, kv.block_table, kv.seq_lens, 0.1, MLA_DV)
    _check_rows(out, lse, ref_out, ref_lse, torch.zeros(len(lens), MLA_H, dtype=torch.bool), dtype)


def _proj_params():
    cpu = [pytest.param("cpu", dt, id=f"cpu-{_DTYPE_IDS[dt]}") for dt in (torch.float32, torch.bfloat16, torch.float16)]
    return cpu + [pytest.param("cuda", dt, marks=_kernel_marks("mla_latent_project"), id=f"cuda-{_DTYPE_IDS[dt]}")
                  for dt in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("device, dtype", _proj_params())
def test_mla_latent_project_nan_in_hidden_poisons_that_token_only(device, dtype, gen):
    tokens, d_model, rank, rope, page = 6, 48, 32, 16, 4
    cache = randn(5, page, rank + rope, gen=gen, dtype=dtype, device=device)  # random, not NaN: NaN must be written
    before = cache.clone()
    hidden = randn(tokens, d_model, gen=gen, dtype=dtype, device=device)
    hidden[2, 7] = math.nan  # a written token
    hidden[1, 0] = math.nan  # a padding token (slot -1): its cache slot does not exist
    w = randn(d_model, rank + rope, gen=gen, dtype=dtype, device=device, scale=d_model**-0.5)
    norm_weight = (1.0 + 0.2 * randn(rank, gen=gen)).to(device=device, dtype=dtype)
    cos_sin = reference.rope_cos_sin(64, rope).to(device)
    positions = torch.randint(0, 64, (tokens,), generator=gen).to(device)
    slots = torch.tensor([13, -1, 2, 19, 7, 0], dtype=torch.int64, device=device)
    c_kv, k_pe = kvcore.mla_latent_project(hidden, w, norm_weight, cos_sin, positions, cache, slots,
                                           return_outputs=True)
    ref_cache, ref_c, ref_pe = reference.mla_latent_project(hidden, w, norm_weight, 1e-6, cos_sin, positions, before,
                                                            slots, True)
    flat, ref_flat = cache.reshape(-1, rank + rope), ref_cache.reshape(-1, rank + rope)
    nan_slots = torch.zeros(flat.shape[0], dtype=torch.bool, device=device)
    nan_slots[2] = True
    assert bool(torch.isnan(flat[nan_slots]).all()), "token 2's latent row must be all NaN"
    assert not bool(torch.isnan(flat[~nan_slots]).any()), "NaN leaked into another slot"
    torch.testing.assert_close(flat[~nan_slots].float(), ref_flat[~nan_slots].float(), **OUT_TOL[dtype])
    untouched = torch.ones(flat.shape[0], dtype=torch.bool, device=device)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(flat[untouched], before.reshape(-1, rank + rope)[untouched]), "an unnamed slot changed"
    nan_tokens = torch.tensor([False, True, True, False, False, False], device=device)
    for got, ref in ((c_kv, ref_c), (k_pe, ref_pe)):
        assert bool(torch.isnan(got[nan_tokens]).all()) and not bool(torch.isnan(got[~nan_tokens]).any())
        torch.testing.assert_close(got[~nan_tokens].float(), ref[~nan_tokens], **OUT_TOL[dtype])


# ============================================================================================
# Eviction: attention_scores and compact_kv
# ============================================================================================
# attention_scores, for a sequence b of length n, window w, KV head h = hq // G, and query i at
# position t_i = n - w + i (it sees the keys p <= t_i):
#   * NaN in q[b, i, hq] with t_i >= 0: that row's logits, lse and probabilities are NaN, so the
#     scores out[b, h, p] of every key it sees (p <= t_i) are NaN, for every reduction and
#     pooling (pooling reads only prefix keys p < n - w, all of which that row sees). Keys
#     p > t_i keep their finite scores; other KV heads and sequences are unaffected. With
#     t_i < 0 (a query before the sequence start) or n = 0, q is never read.
#   * NaN in an attended key k[b, p, h] (p < n), without a caller lse: every row of group h that
#     sees p gets a NaN lse; the last window row sees every key, so out[b, h, :n] is all NaN
#     (scores past n stay 0). With the caller's (finite) lse nothing is renormalised: only key
#     p's score is NaN, and with pooling the pooled prefix scores whose window covers p.
#   * NaN in keys a sequence does not attend to (page tails past n, spare pages, padding entries
#     of the block table) or in q rows that see no key never reaches any score.
# compact_kv moves elements as bits: a NaN at a kept position arrives at its new position, NaN at
# dropped or untouched positions stays where it was, and no NaN appears anywhere else.

SCORE_LENS = [40, 0, 25, 3]
S_W, S_HQ, S_HKV, S_D, S_PAGE = 4, 4, 2, 64, 8


def _score_params():
    cpu = [pytest.param("cpu", dt, id=f"cpu-{_DTYPE_IDS[dt]}") for dt in (torch.float32, torch.bfloat16)]
    return cpu + [pytest.param("cuda", dt, marks=_kernel_marks("attention_scores"), id=f"cuda-{_DTYPE_IDS[dt]}")
                  for dt in (torch.bfloat16, torch.float16)]


def _scores(q, kv, lse, reduction, pooling, max_len):
    out = poison(torch.empty(q.shape[0], kv.k_cache.shape[2], max_len, device=q.device))
    kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, lse=lse, reduction=reduction,
                            pooling=pooling, pool_kernel=5, out=out)
    ref = reference.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, lse=lse, reduction=reduction,
                                     pooling=pooling, pool_kernel=5, max_len=max_len)
    return out, ref


def _check_scores(out, ref, nan_mask, dtype):
    nan_mask = nan_mask.to(out.device)
    assert torch.equal(torch.isnan(ref), nan_mask), "the reference disagrees with the stated NaN rule"
    assert bool(torch.isnan(out[nan_mask]).all()), "a score that saw NaN input is not NaN"
    assert not bool(torch.isnan(out[~nan_mask]).any()), "NaN leaked into a score that never saw one"
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}[dtype] * 2 * S_W * S_HQ
    torch.testing.assert_close(out[~nan_mask].double(), ref[~nan_mask], atol=tol, rtol=1e-3)


SCORE_MODES = [("sum", "none", False), ("max", "max", False), ("mean", "avg", True)]


@pytest.mark.parametrize("reduction, pooling, with_lse", SCORE_MODES, ids=lambda x: str(x))
@pytest.mark.parametrize("device, dtype", _score_params())
def test_attention_scores_nan_in_q_poisons_the_keys_that_row_sees(device, dtype, reduction, pooling, with_lse, gen):
    kv = make_paged_kv(SCORE_LENS, S_PAGE, S_HKV, S_D, gen=gen, dtype=dtype, device=device)
    q = randn(len(SCORE_LENS), S_W, S_HQ, S_D, gen=gen, dtype=dtype, device=device)
    lse = _window_lse_ref(q, kv, SCORE_LENS) if with_lse else None
    q[0, 1, 3, 5] = math.nan  # sequence 0, query 1 (t = 37), query head 3 -> KV head 1
    q[3, 0, 0, :] = math.nan  # sequence 3 (n = 3 < w): query 0 sits at t = -1 and sees nothing
    q[1, 2, 1, 0] = math.nan  # an empty sequence: never read
    out, ref = _scores(q, kv, lse, reduction, pooling, 44)
    nan_mask = torch.zeros_like(ref, dtype=torch.bool)
    nan_mask[0, 1, :38] = True
    _check_scores(out, ref, nan_mask, dtype)
    assert bool((out[0, 1, 40:] == 0).all()) and bool((out[1] == 0).all())


@pytest.mark.parametrize("reduction, pooling, with_lse", SCORE_MODES, ids=lambda x: str(x))
@pytest.mark.parametrize("device, dtype", _score_params())
def test_attention_scores_nan_in_attended_key(device, dtype, reduction, pooling, with_lse, gen):
    kv = make_paged_kv(SCORE_LENS, S_PAGE, S_HKV, S_D, gen=gen, dtype=dtype, device=device)
    q = randn(len(SCORE_LENS), S_W, S_HQ, S_D, gen=gen, dtype=dtype, device=device)
    lse = _window_lse_ref(q, kv, SCORE_LENS) if with_lse else None  # from the clean keys
    page, off = _slot_tensor(kv, 0, 10)  # sequence 0, a prefix key (10 < 40 - 4)
    kv.k_cache[page, off, 0, 3] = math.nan  # KV head 0
    page, off = _slot_tensor(kv, 2, 23)  # sequence 2, a window key (seen by queries 2 and 3 only)
    kv.k_cache[page, off, 1, 60] = math.nan  # KV head 1
    out, ref = _scores(q, kv, lse, reduction, pooling, 44)
    nan_mask = torch.zeros_like(ref, dtype=torch.bool)
    if with_lse:  # no renormalisation: that key only, spread by pooling over the prefix
        nan_mask[0, 0, 10] = nan_mask[2, 1, 23] = True
        if pooling != "none":
            nan_mask[0, 0, 8:13] = True
    else:
        nan_mask[0, 0, :40] = nan_mask[2, 1, :25] = True
    _check_scores(out, ref, nan_mask, dtype)


@pytest.mark.parametrize("reduction, pooling, with_lse", SCORE_MODES, ids=lambda x: str(x))
@pytest.mark.parametrize("device, dtype", _score_params())
def test_attention_scores_nan_outside_attended_keys_does_not_leak(device, dtype, reduction, pooling, with_lse, gen):
    lens = SCORE_LENS + [S_PAGE]
    kv = make_paged_kv(lens, S_PAGE, S_HKV, S_D, gen=gen, dtype=dtype, device=device, extra_table_cols=2)
    q = randn(len(lens), S_W, S_HQ, S_D, gen=gen, dtype=dtype, device=device)
    lse = _window_lse_ref(q, kv, lens) if with_lse else None
    attended = torch.zeros(kv.num_pages, S_PAGE, dtype=torch.bool)
    for b, n in enumerate(lens):
        for pos in range(n):
            attended[_slot_tensor(kv, b, pos)] = True
    kv.k_cache[(~attended).to(device)] = math.nan
    spare = int(torch.nonzero(~attended.any(1))[0])
    for b, n in enumerate(lens):
        kv.block_table[b, (n + S_PAGE - 1) // S_PAGE:] = spare
    q[3, 0] = math.nan  # sees no key (t = -1)
    q[1] = math.nan  # empty sequence
    out, ref = _scores(q, kv, lse, reduction, pooling, 48)
    _check_scores(out, ref, torch.zeros_like(ref, dtype=torch.bool), dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _compact_params():
    cpu = [pytest.param("cpu", dt, id=f"cpu-{_DTYPE_IDS[dt]}") for dt in (torch.float32, torch.bfloat16, torch.float16)]
    return cpu + [pytest.param("cuda", dt, marks=_kernel_marks("compact_kv"), id=f"cuda-{_DTYPE_IDS[dt]}")
                  for dt in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("device, dtype", _compact_params())
def test_compact_kv_moves_nan_as_data(device, dtype, gen):
    lens = [30, 12]
    kv = make_paged_kv(lens, 8, 2, 16, gen=gen, dtype=dtype, device=device)
    kept = torch.tensor([[[0, 4, 9, 17, 29], [1, 2, 3, 20, 21]], [[0, 5, 6, 11, 11], [3, 4, 7, 8, 10]]],
                        dtype=torch.int64, device=device)
    kept_lens = torch.tensor([5, 4], dtype=torch.int32, device=device)
    marks = [(0, 9, 0, 2), (0, 17, 1, 7), (0, 20, 1, 0), (1, 7, 1, 15), (0, 13, 0, 0), (1, 9, 0, 4)]
    for b, pos, h, d in marks:  # kept (seq 0 head 0 pos 9, head 1 pos 20; seq 1 head 1 pos 7) and dropped
        page, off = _slot_tensor(kv, b, pos)
        kv.k_cache[page, off, h, d] = math.nan
        kv.v_cache[page, off, h, 15 - d] = math.nan
    ref_k, ref_v, ref_lens = reference.compact_kv(kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, kept,
                                                  kept_lens)
    nan_before = int(torch.isnan(kv.k_cache).sum())
    kvcore.compact_kv(kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, kept, kept_lens)
    assert torch.equal(_bits(kv.k_cache), _bits(ref_k)) and torch.equal(_bits(kv.v_cache), _bits(ref_v))
    assert torch.equal(kv.seq_lens.cpu(), ref_lens.cpu())
    # The kept NaN rows arrived at their new positions (9 -> 2, 20 -> 3, 7 -> 2)...
    for b, pos, h, d in [(0, 2, 0, 2), (0, 3, 1, 0), (1, 2, 1, 15)]:
        page, off = _slot_tensor(kv, b, pos)
        assert bool(torch.isnan(kv.k_cache[page, off, h, d])) and bool(torch.isnan(kv.v_cache[page, off, h, 15 - d]))
    # ...and no NaN was invented: at most the moved copies are added to the ones left in place.
    assert int(torch.isnan(kv.k_cache).sum()) <= nan_before + 3


# ---- infllm_unit_scores, topk_rows ------------------------------------------------------------
# infllm_unit_scores: a NaN in q[b, hq] makes every unit's score of KV head hq // G of sequence b
# NaN (the group's query sum is NaN) and so, summed over heads, every score of sequence b; a NaN in
# repr_keys[b, u, h] makes s[b, h, u] (and the summed score[b, u]) NaN and nothing else: not the
# next unit (which may share a warp on CUDA), not the unit's other KV heads, not other sequences.
# topk_rows: NaN ranks below every number, -inf included, so a NaN column is returned only once
# every non-NaN column of its row is, and NaN columns among themselves by ascending column.


def _retrieval_params():
    cpu = [pytest.param("cpu", dt, id=f"cpu-{_DTYPE_IDS[dt]}") for dt in (torch.float32, torch.bfloat16, torch.float16)]
    return cpu + [pytest.param("cuda", dt, marks=_kernel_marks("infllm_unit_scores"), id=f"cuda-{_DTYPE_IDS[dt]}")
                  for dt in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("per_kv_head", [False, True], ids=["summed", "per_kv_head"])
@pytest.mark.parametrize("device, dtype", _retrieval_params())
def test_infllm_unit_scores_nan_stays_in_its_group_and_unit(device, dtype, per_kv_head, gen):
    # Hkv 3 x D 32 = 12 vectors a unit: on CUDA two units share a warp (16-lane groups).
    b_, hq, hkv, d, units = 3, 6, 3, 32, 12
    q = randn(b_, hq, d, gen=gen, dtype=dtype, device=device)
    keys = randn(b_, units, hkv, d, gen=gen, dtype=dtype, device=device)
    q[0, 1, 5] = math.nan  # sequence 0, KV head 0 (query heads 0, 1)
    keys[1, 4, 2, 7] = math.nan  # sequence 1, unit 4, KV head 2
    keys[2, 11, 0, :] = math.nan  # sequence 2, its last unit, KV head 0
    nan = torch.zeros(b_, hkv, units, dtype=torch.bool)
    nan[0, 0, :] = nan[1, 2, 4] = nan[2, 0, 11] = True
    if not per_kv_head:
        nan = nan.any(dim=1)
    out = poison(torch.empty(tuple(nan.shape), device=device))
    kvcore.infllm_unit_scores(q, keys, per_kv_head=per_kv_head, out=out)
    ref = reference.infllm_unit_scores(q, keys, per_kv_head=per_kv_head)
    assert torch.equal(torch.isnan(out).cpu(), nan)
    assert torch.equal(torch.isnan(ref).cpu(), nan)  # the definition agrees
    torch.testing.assert_close(out.double()[~nan.to(device)], ref[~nan.to(ref.device)].to(device), atol=1e-3,
                               rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_kernel_marks("topk_rows"))])
def test_topk_rows_ranks_nan_below_every_number(device):
    nan, inf = math.nan, math.inf
    scores = torch.tensor([
        [nan, 0.5, -inf, nan, 2.0, -inf, nan, -1.0, nan, nan],  # 3 numbers, 2 x -inf, 5 NaN
        [nan] * 10,  # all NaN: the first k columns, values NaN
        [1.0, nan, 1.0, inf, nan, -0.0, 0.0, nan, 3.0, -inf],
    ], device=device)
    values, indices = kvcore.topk_rows(scores, 8, values=poison(torch.empty(3, 8, device=device)))
    want_i = torch.tensor([[4, 1, 7, 2, 5, 0, 3, 6], [0, 1, 2, 3, 4, 5, 6, 7], [3, 8, 0, 2, 5, 6, 9, 1]])
    assert torch.equal(indices.cpu(), want_i)
    assert torch.equal(indices.cpu(), reference.topk_rows(scores, 8)[1].cpu())
    torch.testing.assert_close(values.cpu(), scores.cpu().gather(1, want_i), atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("device, dtype, num_splits", [p for p in _mla_params() if p.values[0] == "cpu"])
def test_mla_decode_nan_in_q_poisons_that_head_only_partial_head_block(device, dtype, num_splits, gen):
    heads = 6  # register blocks of 4 + 2 heads
    kv, cache = _mla_cache(MLA_LENS, gen, dtype, device)
    q = randn(len(MLA_LENS), heads, MLA_DK, gen=gen, dtype=dtype, device=device)
    q[0, 5, 70] = math.nan  # last head of the partial block
    q[2, 4, :] = math.nan  # first head of the partial block
    q[3, 1, 3] = math.nan  # a head of the full block
    out, lse = _mla_decode(q, cache, kv, num_splits)
    ref_out, ref_lse = reference.mla_decode(q, cache, kv.block_table, kv.seq_lens, 0.1, MLA_DV)
    nan_rows = torch.zeros(len(MLA_LENS), heads, dtype=torch.bool)
    nan_rows[0, 5] = nan_rows[2, 4] = nan_rows[3, 1] = True
    _check_rows(out, lse, ref_out, ref_lse, nan_rows, dtype)
