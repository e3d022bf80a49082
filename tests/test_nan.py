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
