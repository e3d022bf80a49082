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
"""

from __future__ import annotations

import math

import pytest
import torch

import kvcore
from conftest import HAS_CUDA, LSE_TOL, OUT_TOL, make_paged_kv, poison, randn
from kvcore import reference

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
