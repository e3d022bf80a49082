"""Run-to-run bitwise reproducibility of gqa_decode and block_sparse_decode (at the end).

CUDA: with ``num_splits = n > 0`` the output and lse are bitwise identical across repeated calls,
whatever the workspace held before (a fresh zeroed buffer, one used by earlier calls of other
shapes and split counts, the shared default buffer, a smaller buffer). With ``num_splits = 0``
the split count depends on the shapes and the GPU only, so repeated calls with the same shapes are
identical too. The split partials are merged in split order by one CTA, so arrival order (which
varies from run to run) never changes the sum.

CPU: ``num_splits`` is ignored; the key range is cut by the thread count, and parts are merged in
a fixed order, so results are bitwise identical across calls at a given ``torch.get_num_threads()``
(different thread counts may differ in the last bits, both within the usual tolerance of the
reference).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import kvcore
from conftest import (HAS_CUDA, NO_CUDA_REASON, OUT_TOL, LSE_TOL, make_paged_kv, poison, ragged_lens, randn,
                      widen_table)
from kvcore import reference

cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]


def _decode(q, kv, *, num_splits=0, workspace=None):
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(q.shape[:2], dtype=torch.float32, device=q.device))
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse,
                      num_splits=num_splits, workspace=workspace)
    return out, lse


def _assert_bitwise(a, b, what: str):
    # torch.equal is False for NaN == NaN; no output here is NaN (checked against the reference).
    assert torch.equal(a[0], b[0]), f"out differs: {what}"
    assert torch.equal(a[1], b[1]), f"lse differs: {what}"


def _other_calls(device, gen, workspace):
    """Decode calls of other shapes and split counts through ``workspace``: they leave their own
    partials (and, mid-call, counters) in it."""
    for batch, hq, hkv, d, length, splits in [(7, 32, 8, 64, 3000, 0), (1, 4, 1, 256, 9000, 40),
                                              (33, 8, 2, 128, 600, 3), (2, 16, 16, 128, 5000, 0)]:
        kv = make_paged_kv([length] * batch, 16, hkv, d, gen=gen, dtype=torch.bfloat16, device=device)
        q = randn(batch, hq, d, gen=gen, dtype=torch.bfloat16, device=device)
        _decode(q, kv, num_splits=splits, workspace=workspace)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16, 0], ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_cuda_decode_bitwise_reproducible(device, dtype, num_splits, gen):
    lens = ragged_lens(6, 4000, 16, gen)
    kv = make_paged_kv(lens, 16, 4, 128, gen=gen, dtype=dtype, device=device)
    q = randn(6, 16, 128, gen=gen, dtype=dtype, device=device)
    fresh = torch.zeros(kvcore.ops.DECODE_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    base = _decode(q, kv, num_splits=num_splits, workspace=fresh)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    torch.testing.assert_close(base[0].float(), ref_out, **OUT_TOL[dtype])
    torch.testing.assert_close(base[1], ref_lse, **LSE_TOL)

    for i in range(3):
        _assert_bitwise(base, _decode(q, kv, num_splits=num_splits, workspace=fresh), f"repeat {i}")

    used = torch.zeros_like(fresh)
    _other_calls(device, gen, used)
    _assert_bitwise(base, _decode(q, kv, num_splits=num_splits, workspace=used), "workspace used by other shapes")
    _other_calls(device, gen, fresh)
    _assert_bitwise(base, _decode(q, kv, num_splits=num_splits, workspace=fresh), "after other calls, same workspace")
    _assert_bitwise(base, _decode(q, kv, num_splits=num_splits, workspace=None), "shared default workspace")
    small = torch.zeros(8 << 20, dtype=torch.uint8, device=device)
    _assert_bitwise(base, _decode(q, kv, num_splits=num_splits, workspace=small), "8 MiB workspace")
    # Wrapper-allocated outputs: the same numbers.
    out, lse = kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, return_lse=True,
                                 num_splits=num_splits, workspace=fresh)
    _assert_bitwise(base, (out, lse), "wrapper-allocated outputs")


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_cuda_fixed_splits_independent_of_batch_neighbours(device, gen):
    """Batch invariance: with n fixed, a sequence's result does not depend on which other
    sequences share the call (each (sequence, KV head) is split at the same positions, computed
    and merged on its own), so batching requests differently never changes their tokens."""
    dtype = torch.bfloat16
    lens = [3000, 17, 0, 2500]
    kv = make_paged_kv(lens, 16, 2, 128, gen=gen, dtype=dtype, device=device)
    q = randn(4, 8, 128, gen=gen, dtype=dtype, device=device)
    for n in (1, 4):
        full = _decode(q, kv, num_splits=n)
        for b in range(4):
            one = kvcore.gqa_decode(q[b : b + 1], kv.k_cache, kv.v_cache, kv.block_table[b : b + 1].contiguous(),
                                    kv.seq_lens[b : b + 1].contiguous(), return_lse=True, num_splits=n)
            assert torch.equal(one[0][0], full[0][b]) and torch.equal(one[1][0], full[1][b]), f"n={n} b={b}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpu_decode_bitwise_reproducible(dtype, threads, gen):
    """CPU: bitwise identical across calls at a fixed thread count, with other calls in between."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lens = [700, 0, 1, 300]
        kv = make_paged_kv(lens, 16, 2, 64, gen=gen, dtype=dtype)
        q = randn(4, 8, 64, gen=gen, dtype=dtype)
        base = _decode(q, kv)
        ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
        torch.testing.assert_close(base[0].float(), ref_out, **OUT_TOL[dtype])
        torch.testing.assert_close(base[1], ref_lse, **LSE_TOL)
        for i in range(3):
            _assert_bitwise(base, _decode(q, kv), f"repeat {i}")
        other = make_paged_kv([2000, 5], 8, 4, 128, gen=gen, dtype=dtype)
        _decode(randn(2, 16, 128, gen=gen, dtype=dtype), other)
        _assert_bitwise(base, _decode(q, kv, num_splits=7), "after another call, num_splits ignored")
    finally:
        torch.set_num_threads(previous)


# ---- block_sparse_decode ---------------------------------------------------------------------
# The SPARSE form of the same kernel: a (sequence, KV head) list is split at fixed positions of
# the list (num_splits fixed: ceil(max_sel * page_size / n), rounded to whole tiles) and merged in
# split order, so the same guarantees hold.


def _sparse_inputs(lens, page, hkv, hq, d, gen, dtype, device):
    from test_block_sparse import random_selection  # a helper, not a test

    kv = make_paged_kv(lens, page, hkv, d, gen=gen, dtype=dtype, device=device)
    sel_pages, sel_counts = random_selection(lens, page, hkv, gen, device=device)
    q = randn(len(lens), hq, d, gen=gen, dtype=dtype, device=device)
    return q, kv, sel_pages, sel_counts


def _sparse(q, kv, sel_pages, sel_counts, *, num_splits=0, workspace=None):
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(q.shape[:2], dtype=torch.float32, device=q.device))
    kvcore.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, sel_pages, sel_counts,
                               out=out, lse=lse, num_splits=num_splits, workspace=workspace)
    return out, lse


def _other_sparse_calls(device, gen, workspace):
    """block_sparse_decode and gqa_decode calls of other shapes and split counts through ``workspace``."""
    for batch, hq, hkv, d, length, splits in [(5, 32, 8, 64, 3000, 0), (2, 16, 1, 256, 6000, 40),
                                              (9, 8, 2, 128, 900, 3)]:
        q, kv, sel_pages, sel_counts = _sparse_inputs([length] * batch, 16, hkv, hq, d, gen, torch.bfloat16, device)
        _sparse(q, kv, sel_pages, sel_counts, num_splits=splits, workspace=workspace)
    _other_calls(device, gen, workspace)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16, 0], ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_cuda_block_sparse_bitwise_reproducible(device, dtype, num_splits, gen):
    lens = ragged_lens(6, 4000, 16, gen)
    q, kv, sel_pages, sel_counts = _sparse_inputs(lens, 16, 4, 16, 128, gen, dtype, device)
    fresh = torch.zeros(kvcore.ops.DECODE_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    base = _sparse(q, kv, sel_pages, sel_counts, num_splits=num_splits, workspace=fresh)
    ref_out, ref_lse = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                                     sel_pages, sel_counts)
    torch.testing.assert_close(base[0].float(), ref_out, **OUT_TOL[dtype])
    torch.testing.assert_close(base[1], ref_lse, **LSE_TOL)

    for i in range(3):
        _assert_bitwise(base, _sparse(q, kv, sel_pages, sel_counts, num_splits=num_splits, workspace=fresh),
                        f"repeat {i}")
    used = torch.zeros_like(fresh)
    _other_sparse_calls(device, gen, used)
    _assert_bitwise(base, _sparse(q, kv, sel_pages, sel_counts, num_splits=num_splits, workspace=used),
                    "workspace used by other shapes")
    _other_sparse_calls(device, gen, fresh)
    _assert_bitwise(base, _sparse(q, kv, sel_pages, sel_counts, num_splits=num_splits, workspace=fresh),
                    "after other calls, same workspace")
    _assert_bitwise(base, _sparse(q, kv, sel_pages, sel_counts, num_splits=num_splits, workspace=None),
                    "shared default workspace")
    small = torch.zeros(8 << 20, dtype=torch.uint8, device=device)
    _assert_bitwise(base, _sparse(q, kv, sel_pages, sel_counts, num_splits=num_splits, workspace=small),
                    "8 MiB workspace")
    # Junk past the counts and the order of the lists' tails do not enter the result either.
    junk = sel_pages.clone()
    live = torch.arange(junk.shape[2], device=device)[None, None, :] < sel_counts[..., None]
    junk[~live] = -7
    _assert_bitwise(base, _sparse(q, kv, junk, sel_counts, num_splits=num_splits, workspace=fresh),
                    "other junk past the counts")


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_cuda_block_sparse_fixed_splits_independent_of_batch_neighbours(device, gen):
    """With n fixed, a sequence's result does not depend on the other sequences of the call: each
    list is split at positions that depend on n, max_sel and its own count only."""
    lens = [3000, 17, 0, 2500]
    q, kv, sel_pages, sel_counts = _sparse_inputs(lens, 16, 2, 8, 128, gen, torch.bfloat16, device)
    for n in (1, 4):
        full = _sparse(q, kv, sel_pages, sel_counts, num_splits=n)
        for b in range(len(lens)):
            one = _sparse(q[b : b + 1], SimpleNamespace(k_cache=kv.k_cache, v_cache=kv.v_cache,
                                                        block_table=kv.block_table[b : b + 1].contiguous(),
                                                        seq_lens=kv.seq_lens[b : b + 1].contiguous()),
                          sel_pages[b : b + 1].contiguous(), sel_counts[b : b + 1].contiguous(), num_splits=n)
            assert torch.equal(one[0][0], full[0][b]) and torch.equal(one[1][0], full[1][b]), f"n={n} b={b}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpu_block_sparse_fixed_splits_bitwise_across_calls_and_threads(dtype, gen):
    """CPU: with num_splits = n > 0 the parts are fixed by n (not by the thread count) and merged
    in order, so results are bitwise identical across calls and across thread counts."""
    previous = torch.get_num_threads()
    lens = [700, 0, 1, 300]
    q, kv, sel_pages, sel_counts = _sparse_inputs(lens, 16, 2, 8, 64, gen, dtype, "cpu")
    ref_out, ref_lse = reference.block_sparse_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                                     sel_pages, sel_counts)
    try:
        for n in (1, 3):
            torch.set_num_threads(1)
            base = _sparse(q, kv, sel_pages, sel_counts, num_splits=n)
            torch.testing.assert_close(base[0].float(), ref_out, **OUT_TOL[dtype])
            torch.testing.assert_close(base[1], ref_lse, **LSE_TOL)
            for threads in (1, 2, 1):
                torch.set_num_threads(threads)
                _assert_bitwise(base, _sparse(q, kv, sel_pages, sel_counts, num_splits=n), f"n={n} threads={threads}")
    finally:
        torch.set_num_threads(previous)


# ---- mla_decode ------------------------------------------------------------------------------
# CPU: num_splits = n > 0 fixes the key-range parts (one part per ceil(len / n) keys, capped at
# one per 32-key chunk of the longest sequence), merged in part order, so the thread count no
# longer enters the arithmetic. (The CUDA form of this test waits for the MLA CUDA kernel.)


def _mla(q, cache, table, seq_lens, num_splits):
    out = poison(torch.empty(q.shape[0], q.shape[1], 64, dtype=q.dtype))
    lse = poison(torch.empty(q.shape[:2], dtype=torch.float32))
    kvcore.mla_decode(q, cache, table, seq_lens, scale=0.1, out=out, lse=lse, num_splits=num_splits)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cpu_mla_decode_fixed_splits_bitwise_across_calls_and_threads(dtype, gen):
    previous = torch.get_num_threads()
    lens = [700, 0, 1, 300]
    kv = make_paged_kv(lens, 16, 1, 80, gen=gen, dtype=dtype)
    cache = kv.k_cache[:, :, 0]
    q = randn(4, 8, 80, gen=gen, dtype=dtype)
    ref_out, ref_lse = reference.mla_decode(q, cache, kv.block_table, kv.seq_lens, 0.1, 64)
    try:
        for n in (1, 3, 7):
            torch.set_num_threads(1)
            base = _mla(q, cache, kv.block_table, kv.seq_lens, n)
            torch.testing.assert_close(base[0].float(), ref_out, **OUT_TOL[dtype])
            torch.testing.assert_close(base[1], ref_lse, **LSE_TOL)
            for threads in (2, 1, 2):
                torch.set_num_threads(threads)
                # another call of other shapes in between leaves nothing behind
                other = make_paged_kv([900, 33], 8, 1, 80, gen=gen, dtype=dtype)
                _mla(randn(2, 16, 80, gen=gen, dtype=dtype), other.k_cache[:, :, 0], other.block_table,
                     other.seq_lens, n)
                _assert_bitwise(base, _mla(q, cache, kv.block_table, kv.seq_lens, n), f"n={n} threads={threads}")
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_cuda_fixed_splits_independent_of_table_width(device, gen):
    """With num_splits fixed, widening the block table (mla_decode) or the page lists
    (block_sparse_decode: max_sel) with junk no sequence reaches leaves out and lse bitwise
    unchanged: each sequence's (list's) splits are cut from its own length (split_range.h), not
    from the width. (tests/test_ops.py checks gqa_decode the same way.)"""
    lens = [3000, 17, 0, 2500, 700]
    q, kv, sel_pages, sel_counts = _sparse_inputs(lens, 16, 2, 8, 128, gen, torch.bfloat16, device)
    wide_sel = widen_table(sel_pages, 2000, gen)
    for n in (3, 8):
        _assert_bitwise(_sparse(q, kv, sel_pages, sel_counts, num_splits=n),
                        _sparse(q, kv, wide_sel, sel_counts, num_splits=n), f"block_sparse_decode, n={n}")
    mla_kv = make_paged_kv(lens, 64, 1, 576, gen=gen, dtype=torch.bfloat16, device=device)
    cache = mla_kv.k_cache[:, :, 0]
    wide_table = widen_table(mla_kv.block_table, 40000 // 64, gen)

    def mla(mq, table, n):
        out = poison(torch.empty(mq.shape[0], mq.shape[1], 512, dtype=mq.dtype, device=device))
        lse = poison(torch.empty(mq.shape[:2], dtype=torch.float32, device=device))
        kvcore.mla_decode(mq, cache, table, mla_kv.seq_lens, scale=576**-0.5, out=out, lse=lse, num_splits=n)
        return out, lse

    for heads in (16, 22, 64):  # on Hopper: the H16 kernel, mla_decode_kernel, the wgmma kernel
        mq = randn(len(lens), heads, 576, gen=gen, dtype=torch.bfloat16, device=device)
        for n in (3, 8):
            _assert_bitwise(mla(mq, mla_kv.block_table, n), mla(mq, wide_table, n), f"mla_decode H{heads}, n={n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("dk, dv", [(83, 17), (576, 512)], ids=["Dk83-Dv17", "Dk576-Dv512"])
def test_cpu_mla_decode_heads_bitwise_independent_of_head_blocks(dtype, dk, dv, gen):
    """Each head's out/lse is bitwise the same whichever 4-head register block it falls in."""
    kv = make_paged_kv([700, 1, 63], 16, 1, dk, gen=gen, dtype=dtype)
    cache = kv.k_cache[:, :, 0]
    q = randn(3, 7, dk, gen=gen, dtype=dtype)

    def run(mq):
        out = poison(torch.empty(3, mq.shape[1], dv, dtype=dtype))
        lse = poison(torch.empty(3, mq.shape[1]))
        kvcore.mla_decode(mq, cache, kv.block_table, kv.seq_lens, scale=dk**-0.5, out=out, lse=lse, num_splits=3)
        return out, lse

    out, lse = run(q)
    for h in range(7):
        o, l = run(q[:, h:h + 1].contiguous())
        _assert_bitwise((out[:, h:h + 1], lse[:, h:h + 1]), (o, l), f"head {h} alone")
    o, l = run(q[:, 1:].contiguous())
    _assert_bitwise((out[:, 1:], lse[:, 1:]), (o, l), "heads 1..6")
