"""Kernel tests for the core ops, on CPU and (when present) CUDA, against kvcore.reference.

Every op output is poisoned with NaN before the call, so an element the kernel fails to write
fails the comparison. Inputs are random normals (never zeros) with shuffled pages, ragged
lengths (including 0 and 1) and junk in the unused block-table entries.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

import kvcore
from conftest import (HAS_CUDA, NO_CUDA_REASON, assert_out_lse_close, assert_switch_value_rejected,
                      assert_written_and_close, make_paged_kv, op_workspace, opcheck_dtype, poison, ragged_lens,
                      randn, record_op_calls, run_script_with_env, run_tests_with_env, widen_table)
from decode_cases import PagedDecodeCase
from kvcore import reference

cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]


# ============================================================================================
# gqa_decode vs reference
# ============================================================================================


@dataclass(frozen=True)
class DecodeCase(PagedDecodeCase):
    window_left: int = -1

    def id(self) -> str:
        window = [f"win{self.window_left}"] if self.window_left >= 0 else []
        return "-".join(self.shape_parts() + window + self.option_parts())


# A covering set rather than the cartesian product: each head dim, group size (1, 2, 3, 4, 8,
# 16 with Hkv 1..4), page size (1, 5, 7, 16, 64, 256), window (-1, 0, 7, 100), soft cap (0, 30),
# lse on/off, q layout and cache layout appears several times, in different combinations.
DECODE_CASES = [
    DecodeCase(4, 8, 8, 64, 16, 100),
    DecodeCase(4, 8, 4, 128, 16, 200, with_lse=False, q_layout="slice"),
    DecodeCase(3, 6, 2, 64, 5, 60),
    DecodeCase(5, 16, 4, 128, 1, 40, window_left=7, q_layout="slice"),
    DecodeCase(3, 16, 2, 256, 64, 300, soft_cap=30.0, strided_cache=True, scale=1.0),
    DecodeCase(3, 16, 1, 64, 256, 600, window_left=100, q_layout="transposed"),
    DecodeCase(4, 32, 2, 128, 16, 150, window_left=0),
    DecodeCase(4, 12, 4, 64, 64, 200, window_left=100, soft_cap=30.0, with_lse=False, q_layout="slice",
               strided_cache=True, scale=0.5),
    DecodeCase(2, 3, 3, 256, 5, 23),
    DecodeCase(4, 24, 3, 128, 256, 513, q_layout="slice"),
    DecodeCase(3, 4, 1, 64, 1, 17, window_left=100, soft_cap=30.0, strided_cache=True, scale=1.0),
    DecodeCase(5, 8, 2, 256, 16, 333, window_left=7, q_layout="transposed"),
    DecodeCase(2, 48, 3, 64, 16, 64),
    DecodeCase(6, 4, 4, 128, 5, 77, window_left=0, soft_cap=30.0, strided_cache=True, scale=2.0),
    DecodeCase(1, 2, 1, 128, 64, (1,)),
    DecodeCase(3, 64, 4, 64, 16, 120, q_layout="slice"),
    DecodeCase(4, 6, 2, 128, 7, 90, window_left=7, strided_cache=True),
    DecodeCase(2, 16, 16, 64, 16, (0, 0)),
    DecodeCase(3, 8, 1, 128, 16, (16, 32, 17), window_left=15, soft_cap=30.0, scale=1.0),
    # Group 6: the CPU kernel's register blocks of up to 4 query heads take a KV head's group as
    # 4 + 2, and 150 tokens end each 32-key chunk's 4-key blocks with a partial one.
    DecodeCase(3, 12, 2, 128, 16, 150, soft_cap=30.0),
    # Page sizes of the TMA loader's other segment shapes (8 and 32 rows per box; a box inside a
    # 128-token page), with partial last tiles.
    DecodeCase(3, 8, 2, 128, 8, 150),
    DecodeCase(2, 16, 4, 64, 32, 130, strided_cache=True, q_layout="slice"),
    DecodeCase(3, 8, 8, 256, 128, 400, soft_cap=30.0),
    # Shapes the page-major kernel serves under KVCORE_DECODE_KERNEL=page8 / page4 / page2 (head_dim
    # 128, pages of a multiple of 16 tokens, no window; test_gqa_decode_page_major_in_subprocess):
    # 8 KV heads with a soft cap and halves of one cache allocation, group 16 with 48-token pages
    # (not a power of two), 2 KV heads with an empty and a one-token sequence.
    DecodeCase(3, 32, 8, 128, 16, 700, soft_cap=30.0, strided_cache=True),
    DecodeCase(2, 128, 8, 128, 48, 500, q_layout="transposed"),
    DecodeCase(3, 16, 2, 128, 32, (0, 1, 300), with_lse=False, q_layout="slice"),
]


def _check_decode(out, lse, ref_out, ref_lse, dtype):
    assert_written_and_close("gqa_decode", out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("case", DECODE_CASES, ids=DecodeCase.id)
def test_gqa_decode_matches_reference(device, dtype, case, gen):
    lens = case.draw_lens(gen)
    kv = make_paged_kv(lens, case.page_size, case.num_kv_heads, case.head_dim, gen=gen, dtype=dtype, device=device,
                       strided_cache=case.strided_cache)
    q = case.make_q(gen, dtype, device)
    k_before, v_before, q_before = kv.k_cache.clone(), kv.v_cache.clone(), q.clone()
    out = poison(torch.empty(case.batch, case.num_q_heads, case.head_dim, dtype=dtype, device=device))
    lse = poison(torch.empty(case.batch, case.num_q_heads, dtype=torch.float32, device=device)) if case.with_lse else None

    result = kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, scale=case.scale,
                               window_left=case.window_left, logit_soft_cap=case.soft_cap, out=out, lse=lse)
    if case.with_lse:
        assert isinstance(result, tuple) and result[0] is out and result[1] is lse
    else:
        assert result is out

    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, scale=case.scale,
                                            window_left=case.window_left, logit_soft_cap=case.soft_cap)
    _check_decode(out, lse, ref_out, ref_lse, dtype)
    # Empty sequences: exactly 0 and -inf.
    for b, n in enumerate(lens):
        if n == 0:
            assert bool((out[b] == 0).all())
            if lse is not None:
                assert bool(torch.isneginf(lse[b]).all())
    # Inputs untouched.
    assert torch.equal(kv.k_cache, k_before) and torch.equal(kv.v_cache, v_before) and torch.equal(q, q_before)


def test_gqa_decode_allocates_outputs(device, dtype, gen):
    """Without out/lse the wrapper allocates them (q's dtype, fp32 lse) and return_lse returns both."""
    lens = [0, 1, 45, 9]
    kv = make_paged_kv(lens, 8, 2, 64, gen=gen, dtype=dtype, device=device)
    q = randn(4, 8, 64, gen=gen, dtype=dtype, device=device)
    out = kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == q.shape
    out2, lse = kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (4, 8)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    _check_decode(out, None, ref_out, ref_lse, dtype)
    _check_decode(out2, lse, ref_out, ref_lse, dtype)


def test_gqa_decode_workspace_and_splits_ignored_on_cpu(gen):
    """On CPU, workspace (None or any tensor) and num_splits do not change the result."""
    lens = [3, 70, 0]
    kv = make_paged_kv(lens, 16, 2, 64, gen=gen)
    q = randn(3, 4, 64, gen=gen)
    base, base_lse = kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, return_lse=True)
    for ws, n in [(None, 0), (torch.zeros(16, dtype=torch.uint8), 3), (torch.empty(0), 7)]:
        out, lse = kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, return_lse=True,
                                     workspace=ws, num_splits=n)
        assert torch.equal(out, base) and torch.equal(lse, base_lse)


# ---- CUDA split-KV ---------------------------------------------------------------------------


def _decode_matches_reference(kv, num_q_heads, dtype, device, gen, **kwargs):
    """One gqa_decode call on fresh random q into poisoned out/lse (kwargs: num_splits,
    workspace, window_left, plan_seq_lens), checked against the reference."""
    batch, head_dim = kv.seq_lens.shape[0], kv.k_cache.shape[-1]
    q = randn(batch, num_q_heads, head_dim, gen=gen, dtype=dtype, device=device)
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(batch, num_q_heads, dtype=torch.float32, device=device))
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse, **kwargs)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                            window_left=kwargs.get("window_left", -1))
    _check_decode(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("num_splits", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_forced_splits_cuda(device, dtype, num_splits, gen):
    lens = ragged_lens(5, 2000, 16, gen)
    kv = make_paged_kv(lens, 16, 2, 128, gen=gen, dtype=dtype, device=device)
    _decode_matches_reference(kv, 16, dtype, device, gen, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_auto_split_long_sequence_cuda(device, dtype, gen):
    """B1 with 20000 tokens: the automatic split must kick in and still match the reference."""
    lens = [20000]
    kv = make_paged_kv(lens, 16, 8, 128, gen=gen, dtype=dtype, device=device)
    _decode_matches_reference(kv, 32, dtype, device, gen)


@pytest.mark.parametrize("num_splits", [0, 7, 33])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_split_schedule_repeated_calls_cuda(device, num_splits, gen):
    """Ragged sequences (one of 1 token, one shorter than a split's share) over many splits, three
    calls on one workspace with fresh q and poisoned outputs, each against the reference: the
    arrival counters must be back at zero after every call, and splits past a sequence's end
    (empty partials) must not disturb the merge."""
    lens = [9000, 1, 700, 4097]
    kv = make_paged_kv(lens, 16, 2, 128, gen=gen, dtype=torch.bfloat16, device=device)
    workspace = kvcore.ops.decode_workspace(device)
    for _ in range(3):
        _decode_matches_reference(kv, 8, torch.bfloat16, device, gen, num_splits=num_splits, workspace=workspace)


@pytest.mark.parametrize("head_dim, group", [(64, 1), (64, 16), (128, 4), (128, 16), (256, 8)])
@pytest.mark.parametrize("num_splits", [40, 70])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_split_merge_batches_cuda(device, head_dim, group, num_splits, gen):
    """The last CTA's split merge keeps 16 (D 64) or 32 splits' partials in flight per thread
    and item, the first batch issued before the lse values are read: 40 and 70 splits take 2 to
    5 batches, groups of 16 give a thread several (head, 4 columns) items, and the short
    sequences leave most splits empty. Each against the reference, twice on one workspace."""
    lens = [5000, 3, 2300]
    kv = make_paged_kv(lens, 16, 2, head_dim, gen=gen, dtype=torch.bfloat16, device=device)
    workspace = kvcore.ops.decode_workspace(device)
    for _ in range(2):
        _decode_matches_reference(kv, 2 * group, torch.bfloat16, device, gen, num_splits=num_splits,
                                  workspace=workspace)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_decode_workspace_sharing_bytes_with_an_argument_is_refused_cuda(device, gen):
    """The split workspace (which only the CUDA kernels use) laid over out or q: the partials would
    overwrite them mid-call. Refused by the CUDA launchers of gqa_decode, block_sparse_decode and
    mla_decode, naming both, with nothing written; the same buffers apart run."""
    kv = make_paged_kv([300, 17], 16, 2, 128, gen=gen, dtype=torch.bfloat16, device=device)
    paged = (kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    sel = (torch.zeros(2, 2, 1, dtype=torch.int32, device=device), torch.ones(2, 2, dtype=torch.int32, device=device))
    latent = make_paged_kv([300, 17], 16, 1, 576, gen=gen, dtype=torch.bfloat16, device=device)
    mla_args = (latent.k_cache[:, :, 0], latent.block_table, latent.seq_lens)
    # op -> (q, out's shape, call(q, out, workspace))
    ops = {
        "gqa_decode": (randn(2, 8, 128, gen=gen, dtype=torch.bfloat16, device=device), (2, 8, 128),
                       lambda q, out, ws: kvcore.gqa_decode(q, *paged, out=out, workspace=ws, num_splits=4)),
        "block_sparse_decode": (randn(2, 8, 128, gen=gen, dtype=torch.bfloat16, device=device), (2, 8, 128),
                                lambda q, out, ws: kvcore.block_sparse_decode(q, *paged, *sel, out=out, workspace=ws,
                                                                              num_splits=2)),
        "mla_decode": (randn(2, 16, 576, gen=gen, dtype=torch.bfloat16, device=device), (2, 16, 512),
                       lambda q, out, ws: kvcore.mla_decode(q, *mla_args, scale=0.05, out=out, workspace=ws,
                                                            num_splits=2)),
    }
    for op, (q, out_shape, call) in ops.items():
        q_bytes, out_bytes = q.numel() * 2, math.prod(out_shape) * 2
        ws = torch.zeros(kvcore.ops.DECODE_WORKSPACE_BYTES + max(q_bytes, out_bytes), dtype=torch.uint8, device=device)
        tail = lambda n, shape: ws[-n:].view(torch.bfloat16).view(shape)  # noqa: E731 (the workspace's last bytes)
        for name in ("out", "q"):
            if name == "out":
                args = (q, tail(out_bytes, out_shape), ws)
            else:
                args = (tail(q_bytes, q.shape).copy_(q), poison(torch.empty(out_shape, dtype=q.dtype, device=device)), ws)
            before = ws.clone()
            with pytest.raises(RuntimeError, match=rf"workspace and {name} share memory \(their bytes overlap\)"):
                call(*args)
            assert torch.equal(ws, before), f"{op} wrote the workspace in a refused call"
        out = poison(torch.empty(out_shape, dtype=q.dtype, device=device))
        call(q, out, ws[: kvcore.ops.DECODE_WORKSPACE_BYTES])
        assert not out.isnan().any()


# (num_kv_heads, head_dim, group, page_size, window_left, num_splits, full) for the wide-table
# test: each head dim, pages that are and are not a power of two or a tile's divisor, windows
# (whose length sets the split count) with sequences shorter and longer than them, a forced split
# count beside the automatic one, batches with and without a sequence that fills the table, and
# 8 KV heads (which the page-major re-runs, page8 / page4, take).
WIDE_TABLE_CASES = [
    (2, 128, 4, 16, -1, 0, False),
    (2, 128, 4, 16, -1, 0, True),
    (2, 64, 8, 64, -1, 0, False),
    (2, 256, 2, 16, 6000, 0, True),
    (2, 128, 1, 5, -1, 0, True),
    (2, 128, 16, 16, 3000, 0, False),
    (2, 128, 4, 256, -1, 9, False),
    (8, 128, 4, 16, -1, 0, False),
]


@pytest.mark.parametrize("num_kv_heads, head_dim, group, page_size, window_left, num_splits, full", WIDE_TABLE_CASES,
                         ids=lambda v: str(v))
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_wide_block_table_cuda(device, num_kv_heads, head_dim, group, page_size, window_left, num_splits,
                                          full, gen):
    """A block table far wider than most of its sequences, as a serving engine's or a CUDA graph's
    table sized for the longest context: the split count is made for the table's width, and each
    sequence's splits share its own keys (split_range.h's split_chunk), from an empty sequence to
    one that fills the table. Three calls on one workspace with fresh q into poisoned outputs,
    each against the reference."""
    capacity = 40000
    lens = [0, 1, 300, 4097, 777] + ([capacity] if full else [])
    cols = -(-capacity // page_size)
    kv = make_paged_kv(lens, page_size, num_kv_heads, head_dim, gen=gen, dtype=torch.bfloat16, device=device,
                       extra_table_cols=cols - -(-max(lens) // page_size))
    assert kv.block_table.shape[1] == cols
    workspace = kvcore.ops.decode_workspace(device)
    hq = num_kv_heads * group
    for _ in range(3):
        q = randn(len(lens), hq, head_dim, gen=gen, dtype=torch.bfloat16, device=device)
        out = poison(torch.empty_like(q))
        lse = poison(torch.empty(len(lens), hq, dtype=torch.float32, device=device))
        kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, window_left=window_left,
                          out=out, lse=lse, workspace=workspace, num_splits=num_splits)
        ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                                window_left=window_left)
        _check_decode(out, lse, ref_out, ref_lse, torch.bfloat16)


@pytest.mark.parametrize("window_left", [-1, 2500])
@pytest.mark.parametrize("num_splits", [3, 7])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_fixed_splits_independent_of_table_width_cuda(device, num_splits, window_left, gen):
    """With num_splits fixed, widening the block table (junk columns no sequence reaches) leaves
    out and lse bitwise unchanged: each sequence's splits are cut from its own length
    (split_range.h's split_chunk), not from the table's width. (Cut from the width, as before
    session 24, a sequence shorter than the table kept its keys on its first splits, and the
    different partition shows in the low bits.)"""
    lens = [0, 1, 300, 4097, 777, 9000]
    kv = make_paged_kv(lens, 16, 2, 128, gen=gen, dtype=torch.bfloat16, device=device)
    wide = widen_table(kv.block_table, 40000 // 16, gen)
    q = randn(len(lens), 8, 128, gen=gen, dtype=torch.bfloat16, device=device)
    results = []
    for table in (kv.block_table, wide):
        out = poison(torch.empty_like(q))
        lse = poison(torch.empty(len(lens), 8, dtype=torch.float32, device=device))
        kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, table, kv.seq_lens, window_left=window_left, out=out, lse=lse,
                          num_splits=num_splits)
        results.append((out, lse))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                            window_left=window_left)
    _check_decode(*results[1], ref_out, ref_lse, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_pair_per_sm_cuda(device, dtype, gen):
    """About one (sequence, KV head) pair per SM at head_dim 128: the launcher's automatic choice
    is then the 8-warp kernel, one CTA a pair and no split merge (KVCORE_DECODE_WARPS=auto).
    Ragged lengths (0, 1, partial and whole tiles of 128, several pages), twice with fresh
    queries, against the reference."""
    batch = torch.cuda.get_device_properties(torch.device(device)).multi_processor_count  # 1 KV head: a pair per SM
    lens = [0, 1, 127, 128, 129, 700][: batch] + ragged_lens(max(batch - 6, 0), 700, 16, gen)
    kv = make_paged_kv(lens, 16, 1, 128, gen=gen, dtype=dtype, device=device)
    for _ in range(2):
        _decode_matches_reference(kv, 4, dtype, device, gen)


# plan_seq_lens: a host copy of seq_lens, or a stale / wrong one, which may only cost speed. Each
# plans differently on CUDA (B8 Hkv8, 264 slots: true lengths: the four-wave count for unequal
# lengths over many pairs, or choose_splits for the planned pairs; all ones: one split; one long
# and the rest empty: the most splits the longest allows; halves: fewer keys a pair).
PLAN_HINTS = {
    "true_list": lambda lens: list(lens),
    "true_cpu_tensor": lambda lens: torch.tensor(lens, dtype=torch.int32),
    "all_ones": lambda lens: [1] * len(lens),
    "one_long": lambda lens: [max(lens)] + [0] * (len(lens) - 1),
    "halves": lambda lens: [n // 2 for n in lens],
}


@pytest.mark.parametrize("hint", list(PLAN_HINTS))
@pytest.mark.parametrize("window_left", [-1, 1500])
@pytest.mark.parametrize("head_dim, group, num_kv_heads", [(128, 4, 8), (64, 8, 2), (256, 2, 2)])
def test_gqa_decode_plan_seq_lens(device, head_dim, group, num_kv_heads, window_left, hint, gen):
    """A batch of very unequal lengths (one long, short ones, 0 and 1) planned from a host copy of
    its lengths: true ones (which, on CUDA, split the long sequence across the GPU) and wrong
    ones, which may only cost speed. Twice on one workspace with fresh q into poisoned outputs,
    each against the reference; on CPU the hint changes nothing."""
    lens = [9000, 0, 1, 300, 1024, 777, 2049, 5]
    kv = make_paged_kv(lens, 16, num_kv_heads, head_dim, gen=gen, dtype=torch.bfloat16, device=device)
    workspace = kvcore.ops.decode_workspace(device) if device == "cuda" else None
    for _ in range(2):
        _decode_matches_reference(kv, num_kv_heads * group, torch.bfloat16, device, gen, window_left=window_left,
                                  plan_seq_lens=PLAN_HINTS[hint](lens), workspace=workspace)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_plan_seq_lens_wide_table_and_score_cuda(device, gen):
    """The hint with a block table far wider than its sequences (the plan then sizes splits by
    the longest sequence, not the width) and with the H2O score buffer (whose fused epilogue
    must keep its grid to one wave whatever the hint plans), against the reference."""
    lens = [30000, 3, 0, 800, 129]  # 10 pairs: the hint alone would split far past one wave
    kv = make_paged_kv(lens, 16, 2, 128, gen=gen, dtype=torch.bfloat16, device=device,
                       extra_table_cols=40000 // 16 - -(-30000 // 16))
    _decode_matches_reference(kv, 8, torch.bfloat16, device, gen, plan_seq_lens=lens)
    q = randn(len(lens), 8, 128, gen=gen, dtype=torch.bfloat16, device=device)
    capacity = kv.block_table.shape[1] * 16
    score0 = torch.rand(len(lens), 2, capacity, generator=gen).to(device)
    score = score0.clone()
    out = poison(torch.empty_like(q))
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, score=score, plan_seq_lens=lens)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    _check_decode(out, None, ref_out, ref_lse, torch.bfloat16)
    add = reference.gqa_decode_score(q, kv.k_cache, kv.block_table, kv.seq_lens, score_len=capacity)
    torch.testing.assert_close((score.double() - score0.double()).cpu(), add.cpu(), atol=1e-5, rtol=2e-3)
    for b, n in enumerate(lens):  # keys past each sequence untouched
        assert torch.equal(score[b, :, n:], score0[b, :, n:])


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_plan_seq_lens_full_hint_same_bits_cuda(device, gen):
    """Equal lengths that fill the block table: the hint says what the shapes say, so the split
    plan is the one without it, and at 6 sequences (far from the page-major kernel's one wave)
    so is the kernel: every bit of out and lse is that of a call without it."""
    lens = [4096] * 6
    kv = make_paged_kv(lens, 16, 8, 128, gen=gen, dtype=torch.bfloat16, device=device, extra_table_cols=0)
    assert kv.block_table.shape[1] * 16 == 4096
    q = randn(6, 32, 128, gen=gen, dtype=torch.bfloat16, device=device)
    results = []
    for hint in (None, lens, torch.tensor(lens)):
        out = poison(torch.empty_like(q))
        lse = poison(torch.empty(6, 32, dtype=torch.float32, device=device))
        kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse, plan_seq_lens=hint)
        results.append((out, lse))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


@pytest.mark.parametrize("window_left", [-1, 15])
def test_gqa_decode_plan_seq_lens_reaches_the_op(device, window_left, gen, monkeypatch):
    """The wrapper reduces plan_seq_lens to the op's plan_total_keys / plan_max_keys: each length
    clamped to the window and to the block table's capacity, then summed and maxed."""
    seen = record_op_calls(monkeypatch, "gqa_decode")
    a = _decode_args(device, gen)  # capacity 32, lens [0, 1, 20]
    for hint, want in [([0, 1, 20], (21, 20) if window_left < 0 else (17, 16)),
                       ([40, 5, 0], (37, 32) if window_left < 0 else (21, 16)),
                       (torch.tensor([3, 3, 3]), (9, 3)), (None, (0, 0)), ([0, 0, 0], (0, 0))]:
        kvcore.gqa_decode(a.q, a.k_cache, a.v_cache, a.block_table, a.seq_lens, window_left=window_left, out=a.out,
                          plan_seq_lens=hint)
        assert tuple(seen[-1][-2:]) == want, (hint, seen[-1][-2:])


def test_gqa_decode_op_rejects_bad_plan_keys(device, gen):
    """The op's own checks of the plan hint (torch.ops callers bypass ops.py)."""
    a = _decode_args(device, gen)
    ws = op_workspace(device)
    for total, most, match in BAD_PLAN_KEYS:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.kvcore.gqa_decode(a.q, a.k_cache, a.v_cache, a.block_table, a.seq_lens, 0.125, -1, 0.0,
                                        a.out, a.lse, ws, 0, None, total, most)
    assert bool(torch.isnan(a.out).all()) and bool(torch.isnan(a.lse).all())


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_forced_splits_deterministic_cuda(device, num_splits, gen):
    lens = ragged_lens(4, 5000, 16, gen)
    kv = make_paged_kv(lens, 16, 4, 128, gen=gen, dtype=torch.bfloat16, device=device)
    q = randn(4, 16, 128, gen=gen, dtype=torch.bfloat16, device=device)
    results = []
    for _ in range(2):
        out = poison(torch.empty_like(q))
        lse = poison(torch.empty(4, 16, dtype=torch.float32, device=device))
        kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse,
                          num_splits=num_splits)
        results.append((out, lse))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


# ============================================================================================
# append_paged_kv vs reference
# ============================================================================================


APPEND_CASES = [
    # (tokens, num_kv_heads, head_dim, page_size, num_pages, strided_cache, strided_k)
    (10, 2, 64, 16, 4, False, False),
    (37, 4, 128, 5, 11, True, False),
    (64, 1, 256, 1, 100, False, True),
    (300, 8, 64, 256, 3, True, True),
    (1, 3, 128, 64, 2, False, False),
    (0, 2, 64, 16, 2, False, False),
]


def _append_id(c) -> str:
    t, h, d, ps, pages, sc, sk = c
    return f"T{t}-Hkv{h}-D{d}-ps{ps}-P{pages}" + ("-kvstrided" if sc else "") + ("-kstrided" if sk else "")


def _random_slots(tokens: int, num_slots: int, gen, skip_every: int = 4) -> torch.Tensor:
    """Distinct random slots (so the result is defined), every ``skip_every``-th set to -1."""
    slots = torch.randperm(num_slots, generator=gen)[:tokens].to(torch.int64)
    slots[::skip_every] = -1
    return slots


@pytest.mark.parametrize("case", APPEND_CASES, ids=_append_id)
def test_append_paged_kv_matches_reference(device, dtype, case, gen):
    tokens, hkv, d, ps, pages, strided_cache, strided_k = case
    if strided_cache:
        # Three slabs per page: K, V and one that no one may touch.
        store = randn(pages, 3, ps, hkv, d, gen=gen, dtype=dtype, device=device)
        k_cache, v_cache = store[:, 0], store[:, 2]
    else:
        store = None
        k_cache = randn(pages, ps, hkv, d, gen=gen, dtype=dtype, device=device)
        v_cache = randn(pages, ps, hkv, d, gen=gen, dtype=dtype, device=device)
    if strided_k:
        k = randn(tokens, 2 * hkv, d, gen=gen, dtype=dtype, device=device)[:, hkv:]
        v = randn(tokens, hkv + 1, d, gen=gen, dtype=dtype, device=device)[:, :hkv]
        assert tokens <= 1 or not k.is_contiguous()
    else:
        k = randn(tokens, hkv, d, gen=gen, dtype=dtype, device=device)
        v = randn(tokens, hkv, d, gen=gen, dtype=dtype, device=device)
    slots = _random_slots(tokens, pages * ps, gen).to(device)
    untouched = store[:, 1].clone() if store is not None else None

    ref_k, ref_v = reference.append_paged_kv(k, v, k_cache.contiguous(), v_cache.contiguous(), slots)
    kvcore.append_paged_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k)  # whole caches: written slots and untouched ones
    assert torch.equal(v_cache, ref_v)
    if untouched is not None:
        assert torch.equal(store[:, 1], untouched)


def test_append_paged_kv_skip_only(device, dtype, gen):
    """All slots -1: nothing is written."""
    k_cache = randn(3, 4, 2, 64, gen=gen, dtype=dtype, device=device)
    v_cache = randn(3, 4, 2, 64, gen=gen, dtype=dtype, device=device)
    before = (k_cache.clone(), v_cache.clone())
    k = randn(5, 2, 64, gen=gen, dtype=dtype, device=device)
    kvcore.append_paged_kv(k, k.neg(), k_cache, v_cache, torch.full((5,), -1, dtype=torch.int64, device=device))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


# ============================================================================================
# merge_attention_states vs reference
# ============================================================================================


MERGE_CASES = [(7, 4, 64), (3, 8, 128), (5, 2, 256), (1, 32, 128)]


def _merge_inputs(n, h, d, gen, dtype, device):
    out_a = randn(n, h, d, gen=gen, dtype=dtype, device=device)
    out_b = randn(n, h, d, gen=gen, dtype=dtype, device=device)
    lse_a = randn(n, h, gen=gen, scale=3.0)
    lse_b = randn(n, h, gen=gen, scale=3.0)
    # Empty parts (-inf), whose out may hold anything (NaN here); both empty; far-apart lse.
    lse_a[0, 0] = -math.inf
    lse_b[0, h - 1] = -math.inf
    lse_a[n - 1, h // 2] = lse_b[n - 1, h // 2] = -math.inf
    if h > 2:
        lse_a[n // 2, 1], lse_b[n // 2, 1] = 80.0, -80.0
        lse_a[n // 2, 2], lse_b[n // 2, 2] = 40.0, 40.0 + 1e-3
    lse_a, lse_b = lse_a.to(device), lse_b.to(device)
    out_a[torch.isneginf(lse_a)] = math.nan
    out_b[torch.isneginf(lse_b)] = math.nan
    return out_a, lse_a, out_b, lse_b


@pytest.mark.parametrize("inplace", [False, True], ids=["outofplace", "inplace"])
@pytest.mark.parametrize("shape", MERGE_CASES, ids=lambda s: "N{}-H{}-D{}".format(*s))
def test_merge_attention_states_matches_reference(device, dtype, shape, inplace, gen):
    out_a, lse_a, out_b, lse_b = _merge_inputs(*shape, gen, dtype, device)
    ref_out, ref_lse = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    b_before = (out_b.clone(), lse_b.clone())
    if inplace:
        out, lse = kvcore.merge_attention_states(out_a, lse_a, out_b, lse_b, out=out_a, lse=lse_a)
        assert out is out_a and lse is lse_a
    else:
        a_before = (out_a.clone(), lse_a.clone())
        out = poison(torch.empty_like(out_a))
        lse = poison(torch.empty_like(lse_a))
        res = kvcore.merge_attention_states(out_a, lse_a, out_b, lse_b, out=out, lse=lse)
        assert res[0] is out and res[1] is lse
        assert torch.equal(out_a.nan_to_num(), a_before[0].nan_to_num()) and torch.equal(lse_a, a_before[1])
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_out_lse_close(out, lse, ref_out, ref_lse, dtype)
    both_empty = torch.isneginf(ref_lse)
    assert bool(both_empty.any()) and bool((out[both_empty] == 0).all())
    assert torch.equal(out_b.nan_to_num(), b_before[0].nan_to_num()) and torch.equal(lse_b, b_before[1])


def test_merge_attention_states_allocates_outputs(device, dtype, gen):
    out_a, lse_a, out_b, lse_b = _merge_inputs(4, 4, 64, gen, dtype, device)
    out, lse = kvcore.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert_out_lse_close(out, lse, ref_out, ref_lse, dtype)


# ============================================================================================
# opcheck: schema, autograd registration, fake tensor, AOT dispatch
# ============================================================================================

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck_gqa_decode(device, gen):
    dtype = opcheck_dtype(device)
    kv = make_paged_kv([5, 0, 19], 8, 2, 64, gen=gen, dtype=dtype, device=device)
    q = randn(3, 4, 64, gen=gen, dtype=dtype, device=device)
    out = torch.empty_like(q)
    lse = torch.empty(3, 4, dtype=torch.float32, device=device)
    workspace = op_workspace(device)
    for window_left, cap, num_splits, with_lse, plan in [(-1, 0.0, 0, True, ()), (7, 30.0, 2, False, ()),
                                                         (-1, 0.0, 0, True, (None, 24, 19))]:
        args = (q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, 0.125, window_left, cap, out,
                lse if with_lse else None, workspace, num_splits, *plan)
        torch.library.opcheck(torch.ops.kvcore.gqa_decode.default, args, test_utils=OPCHECK_UTILS)


def test_opcheck_append_paged_kv(device, gen):
    dtype = opcheck_dtype(device)
    k_cache = randn(3, 4, 2, 64, gen=gen, dtype=dtype, device=device)
    v_cache = randn(3, 4, 2, 64, gen=gen, dtype=dtype, device=device)
    k = randn(5, 2, 64, gen=gen, dtype=dtype, device=device)
    v = randn(5, 2, 64, gen=gen, dtype=dtype, device=device)
    slots = torch.tensor([3, -1, 11, 0, 7], dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.kvcore.append_paged_kv.default, (k, v, k_cache, v_cache, slots),
                          test_utils=OPCHECK_UTILS)


def test_opcheck_merge_attention_states(device, gen):
    dtype = opcheck_dtype(device)
    out_a = randn(3, 4, 64, gen=gen, dtype=dtype, device=device)
    out_b = randn(3, 4, 64, gen=gen, dtype=dtype, device=device)
    lse_a = randn(3, 4, gen=gen, device=device)
    lse_b = randn(3, 4, gen=gen, device=device)
    lse_b[1, 2] = -math.inf
    out, lse = torch.empty_like(out_a), torch.empty_like(lse_a)
    torch.library.opcheck(torch.ops.kvcore.merge_attention_states.default, (out_a, lse_a, out_b, lse_b, out, lse),
                          test_utils=OPCHECK_UTILS)


# ============================================================================================
# Bad input: the right error, naming the argument, and nothing written
# ============================================================================================

Mutator = Callable[[SimpleNamespace, str], None]


@dataclass(frozen=True)
class BadCase:
    name: str
    mutate: Mutator
    error: type
    match: str
    cuda_only: bool = False
    # A limit of the CUDA kernels (dtype, head dim, group size...) that the CPU kernels do not
    # have: the case runs with device="cuda" only.
    kernel_limit: bool = False

    def param(self):
        marks = cuda_only if self.cuda_only else []
        return pytest.param(self, id=self.name, marks=marks)

    def skip_unless_applies(self, device: str) -> None:
        if self.kernel_limit and device != "cuda":
            pytest.skip("a limit of the CUDA kernels; the CPU kernels accept this input")


def _other_device(device: str) -> str:
    return "cpu" if device == "cuda" else "cuda"


def _set(attr: str, fn) -> Mutator:
    def mutate(a: SimpleNamespace, device: str) -> None:
        setattr(a, attr, fn(getattr(a, attr), a, device))

    return mutate


def _set_kw(key: str, value) -> Mutator:
    def mutate(a: SimpleNamespace, device: str) -> None:
        a.kw[key] = value

    return mutate


def _set_item(attr: str, index, value_fn) -> Mutator:
    def mutate(a: SimpleNamespace, device: str) -> None:
        t = getattr(a, attr).clone()
        t[index] = value_fn(a)
        setattr(a, attr, t)

    return mutate


def _decode_args(device: str, gen) -> SimpleNamespace:
    # bf16 works on both devices. Sequence 2 uses 3 pages of 8 (20 tokens); capacity 4 x 8 = 32.
    lens = [0, 1, 20]
    kv = make_paged_kv(lens, 8, 2, 64, gen=gen, dtype=torch.bfloat16, device=device)
    return SimpleNamespace(
        q=randn(3, 4, 64, gen=gen, dtype=torch.bfloat16, device=device),
        k_cache=kv.k_cache,
        v_cache=kv.v_cache,
        block_table=kv.block_table,
        seq_lens=kv.seq_lens,
        out=poison(torch.empty(3, 4, 64, dtype=torch.bfloat16, device=device)),
        lse=poison(torch.empty(3, 4, dtype=torch.float32, device=device)),
        num_pages=kv.num_pages,
        kw={},
    )


def _score(fn) -> Mutator:
    """Pass ``score=fn(a good score buffer)``: zeros ``[B, Hkv, max_pages * page_size]`` float32."""
    def mutate(a: SimpleNamespace, device: str) -> None:
        shape = (a.q.shape[0], a.k_cache.shape[2], a.block_table.shape[1] * a.k_cache.shape[1])
        a.kw["score"] = fn(torch.zeros(shape, device=device))

    return mutate


# plan_seq_lens that the wrappers refuse (gqa_decode, mla_decode), for a batch of 3 sequences.
BAD_PLAN_SEQ_LENS = [
    BadCase("plan_seq_lens_length", _set_kw("plan_seq_lens", [1, 2]), ValueError,
            r"plan_seq_lens must have 3 entries"),
    BadCase("plan_seq_lens_negative", _set_kw("plan_seq_lens", [0, -1, 20]), ValueError, r"plan_seq_lens must be >= 0"),
    BadCase("plan_seq_lens_floats", _set_kw("plan_seq_lens", [0, 1.5, 20]), ValueError, r"plan_seq_lens must hold ints"),
    BadCase("plan_seq_lens_float_tensor", _set_kw("plan_seq_lens", torch.tensor([0.0, 1.0, 20.0])), ValueError,
            r"plan_seq_lens must be a 1-D dense integer tensor"),
    BadCase("plan_seq_lens_rank", _set_kw("plan_seq_lens", torch.zeros(3, 1, dtype=torch.int32)), ValueError,
            r"plan_seq_lens must be a 1-D dense integer tensor"),
    BadCase("plan_seq_lens_not_host", _set_kw("plan_seq_lens", torch.zeros(3, dtype=torch.int32, device="meta")),
            ValueError, r"plan_seq_lens must be on the CPU"),
    BadCase("plan_seq_lens_not_a_sequence", _set_kw("plan_seq_lens", 20), ValueError,
            r"plan_seq_lens must be a CPU tensor or a sequence of ints"),
]
# (plan_total_keys, plan_max_keys, the error) that the ops refuse when called directly.
BAD_PLAN_KEYS = [(-1, 5, "plan_total_keys must be >= 0"), (5, -1, "plan_max_keys must be >= 0"),
                 (5, 0, "plan_total_keys must be 0 when plan_max_keys is 0")]

BAD_DECODE = [
    # dtypes
    BadCase("q_fp16_cache_bf16", _set("q", lambda t, a, d: t.half()), RuntimeError, r"k_cache must have dtype"),
    BadCase("q_fp64", _set("q", lambda t, a, d: t.double()), RuntimeError, r"\bq must be"),
    BadCase("out_dtype", _set("out", lambda t, a, d: poison(t.float())), RuntimeError, r"\bout must have dtype"),
    BadCase("lse_dtype", _set("lse", lambda t, a, d: poison(t.bfloat16())), RuntimeError, r"\blse must have dtype"),
    BadCase("seq_lens_int64", _set("seq_lens", lambda t, a, d: t.long()), RuntimeError, r"seq_lens must have dtype"),
    BadCase("block_table_int64", _set("block_table", lambda t, a, d: t.long()), RuntimeError,
            r"block_table must have dtype"),
    # ranks and shapes
    BadCase("q_rank", _set("q", lambda t, a, d: t[0]), ValueError, r"\bq must be 3-D"),
    BadCase("k_cache_rank", _set("k_cache", lambda t, a, d: t[0]), RuntimeError, r"k_cache must be 4-D"),
    BadCase("block_table_rank", _set("block_table", lambda t, a, d: t[0]), RuntimeError, r"block_table must be 2-D"),
    BadCase("heads_not_dividing", lambda a, d: (setattr(a, "q", a.q[:, :3]), setattr(a, "out", a.out[:, :3].contiguous())),
            RuntimeError, r"num_q_heads \(3\) must be a multiple of num_kv_heads \(2\)"),
    BadCase("v_cache_shape", _set("v_cache", lambda t, a, d: t[:-1]), RuntimeError, r"v_cache must have the shape"),
    BadCase("head_dim_mismatch", lambda a, d: (setattr(a, "q", a.q[..., :32]), setattr(a, "out", a.out[..., :32].contiguous())),
            RuntimeError, r"head_dim"),
    BadCase("out_shape", _set("out", lambda t, a, d: t[:, :, :32].contiguous()), RuntimeError, r"\bout must have the shape"),
    BadCase("out_not_contiguous", _set("out", lambda t, a, d: poison(torch.empty(3, 4, 128, dtype=t.dtype, device=d))[..., :64]),
            RuntimeError, r"\bout must be contiguous"),
    BadCase("lse_shape", _set("lse", lambda t, a, d: t[:, :3].contiguous()), RuntimeError, r"\blse must have shape"),
    BadCase("block_table_rows", _set("block_table", lambda t, a, d: t[:2].contiguous()), RuntimeError, r"block_table"),
    BadCase("seq_lens_shape", _set("seq_lens", lambda t, a, d: t[:2].contiguous()), RuntimeError, r"seq_lens"),
    BadCase("q_last_dim_strided", _set("q", lambda t, a, d: torch.repeat_interleave(t, 2, dim=2)[..., ::2]),
            RuntimeError, r"\bq must be contiguous in its last dim"),
    # index contents (validation on)
    BadCase("page_out_of_range", _set_item("block_table", (2, 2), lambda a: a.num_pages), ValueError, r"block_table"),
    BadCase("page_negative", _set_item("block_table", (2, 0), lambda a: -3), ValueError, r"block_table"),
    BadCase("seq_len_past_capacity", _set_item("seq_lens", 1, lambda a: 33), ValueError, r"seq_lens"),
    BadCase("seq_len_negative", _set_item("seq_lens", 0, lambda a: -1), ValueError, r"seq_lens"),
    # scalars
    BadCase("window_left_below_minus_one", _set_kw("window_left", -2), ValueError, r"window_left"),
    BadCase("scale_zero", _set_kw("scale", 0.0), ValueError, r"scale"),
    BadCase("scale_negative", _set_kw("scale", -0.5), ValueError, r"scale"),
    BadCase("scale_nan", _set_kw("scale", math.nan), ValueError, r"scale"),
    BadCase("soft_cap_negative", _set_kw("logit_soft_cap", -1.0), ValueError, r"logit_soft_cap"),
    BadCase("num_splits_negative", _set_kw("num_splits", -1), ValueError, r"num_splits"),
    # scalars the kernels could not take: past float32's range (inf there, every output NaN),
    # not an integer (3.5 was truncated to 3), past int64 (the schema's int)
    BadCase("scale_past_float32", _set_kw("scale", 1e39), ValueError, r"scale must be .*float32's range"),
    BadCase("soft_cap_past_float32", _set_kw("logit_soft_cap", 1e39), ValueError,
            r"logit_soft_cap must be .*float32's range"),
    BadCase("window_left_not_int", _set_kw("window_left", 3.5), ValueError, r"window_left must be .* got 3\.5"),
    BadCase("num_splits_past_int64", _set_kw("num_splits", 2**64), ValueError, r"num_splits must be"),
    # the host-side plan hint
    *BAD_PLAN_SEQ_LENS,
    # devices
    BadCase("k_cache_other_device", _set("k_cache", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"k_cache must be on the same device", cuda_only=True),
    BadCase("block_table_other_device", _set("block_table", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"block_table must be on the same device", cuda_only=True),
    BadCase("out_other_device", _set("out", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"\bout must be on the same device", cuda_only=True),
    # more cells of the bad-input matrix (docs/bad_input.md)
    BadCase("q_fp32_on_cuda", lambda a, d: [setattr(a, n, getattr(a, n).float()) for n in ("q", "k_cache", "v_cache", "out")],
            RuntimeError, r"\bq must be bfloat16 or float16 on CUDA", cuda_only=True, kernel_limit=True),
    BadCase("seq_lens_other_device", _set("seq_lens", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"seq_lens must be on the same device", cuda_only=True),
    BadCase("lse_other_device", _set("lse", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"\blse must be on the same device", cuda_only=True),
    BadCase("seq_lens_rank", _set("seq_lens", lambda t, a, d: t.view(3, 1)), RuntimeError, r"seq_lens must be 1-D"),
    BadCase("out_rank", _set("out", lambda t, a, d: t[0]), RuntimeError, r"\bout must be 3-D"),
    BadCase("v_cache_rank", _set("v_cache", lambda t, a, d: t[0]), RuntimeError, r"v_cache must be 4-D"),
    BadCase("block_table_not_contiguous", _set("block_table", lambda t, a, d: torch.stack([t, t], dim=2)[..., 0]),
            RuntimeError, r"block_table must be contiguous"),
    BadCase("seq_lens_not_contiguous", _set("seq_lens", lambda t, a, d: torch.stack([t, t], dim=1)[:, 0]), RuntimeError,
            r"seq_lens must be contiguous"),
    BadCase("k_cache_inner_strided", _set("k_cache", lambda t, a, d: torch.repeat_interleave(t, 2, dim=3)[..., ::2]),
            RuntimeError, r"k_cache must be densely packed"),
    BadCase("lse_not_contiguous", _set("lse", lambda t, a, d: poison(torch.empty(4, 3, device=d)).t()), RuntimeError,
            r"\blse must be contiguous"),
    BadCase("head_dim_32_cuda", lambda a, d: [setattr(a, n, getattr(a, n)[..., :32].contiguous())
                                              for n in ("q", "k_cache", "v_cache", "out")],
            RuntimeError, r"head_dim", cuda_only=True, kernel_limit=True),
    BadCase("head_dim_zero", lambda a, d: [setattr(a, n, getattr(a, n)[..., :0].contiguous())
                                           for n in ("q", "k_cache", "v_cache", "out")],
            RuntimeError, r"q's head_dim \(last dim\) must be positive, got 0"),
    BadCase("group_17_cuda", lambda a, d: (setattr(a, "q", torch.cat([a.q] * 9, dim=1)[:, :34].contiguous()),
                                           setattr(a, "out", poison(torch.empty(3, 34, 64, dtype=a.out.dtype, device=d))),
                                           setattr(a, "lse", poison(torch.empty(3, 34, device=d)))),
            RuntimeError, r"num_q_heads", cuda_only=True, kernel_limit=True),
    # the optional H2O score buffer ([B, Hkv, S] float32, S >= max_pages * page_size = 32 here)
    BadCase("score_dtype", _score(lambda s: s.double()), RuntimeError, r"score must have dtype"),
    BadCase("score_rank", _score(lambda s: s[0]), RuntimeError, r"score must have shape"),
    BadCase("score_heads", _score(lambda s: s[:, :1].contiguous()), RuntimeError, r"score must have shape"),
    BadCase("score_batch", _score(lambda s: s[:2].contiguous()), RuntimeError, r"score must have shape"),
    BadCase("score_too_short", _score(lambda s: s[..., :31].contiguous()), RuntimeError,
            r"score must have shape \[3, 2, S\] with S >= max_pages \* page_size = 32"),
    BadCase("score_not_contiguous", _score(lambda s: torch.stack([s, s], dim=-1)[..., 0]), RuntimeError,
            r"score must be contiguous"),
    BadCase("score_other_device", _score(lambda s: s.to(_other_device(str(s.device.type)))), RuntimeError,
            r"score must be on the same device", cuda_only=True),
]


@pytest.mark.parametrize("bad", [c.param() for c in BAD_DECODE])
def test_gqa_decode_bad_input(device, bad, gen):
    bad.skip_unless_applies(device)
    a = _decode_args(device, gen)
    bad.mutate(a, device)
    caches_before = (a.k_cache.clone(), a.v_cache.clone())
    score = a.kw.get("score")
    score_before = None if score is None else score.clone()
    with pytest.raises(bad.error, match=bad.match):
        kvcore.gqa_decode(a.q, a.k_cache, a.v_cache, a.block_table, a.seq_lens, out=a.out, lse=a.lse, **a.kw)
    assert bool(torch.isnan(a.out).all()), "out was written by a call that failed"
    assert bool(torch.isnan(a.lse).all()), "lse was written by a call that failed"
    assert torch.equal(a.k_cache, caches_before[0]) and torch.equal(a.v_cache, caches_before[1])
    if score is not None:
        assert torch.equal(score, score_before), "score was written by a call that failed"


# The op itself (not only the Python wrapper) rejects bad scalars: C++ callers and direct
# torch.ops users bypass ops.py.
@pytest.mark.parametrize(
    "scale, window_left, cap, num_splits, match",
    [
        (0.0, -1, 0.0, 0, "scale"),
        (math.nan, -1, 0.0, 0, "scale"),
        (0.125, -2, 0.0, 0, "window_left"),
        (0.125, -1, -1.0, 0, "logit_soft_cap"),
        (0.125, -1, math.inf, 0, "logit_soft_cap"),
        (0.125, -1, 0.0, -1, "num_splits"),
        (1e39, -1, 0.0, 0, "scale .*float32"),
        (0.125, -1, 1e39, 0, "logit_soft_cap .*float32"),
    ],
    ids=["scale0", "scalenan", "window-2", "capneg", "capinf", "splitsneg", "scale1e39", "cap1e39"],
)
def test_gqa_decode_op_rejects_bad_scalars(device, scale, window_left, cap, num_splits, match, gen):
    a = _decode_args(device, gen)
    ws = op_workspace(device)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.kvcore.gqa_decode(a.q, a.k_cache, a.v_cache, a.block_table, a.seq_lens, scale, window_left, cap,
                                    a.out, a.lse, ws, num_splits)
    assert bool(torch.isnan(a.out).all()) and bool(torch.isnan(a.lse).all())


def _append_args(device: str, gen) -> SimpleNamespace:
    return SimpleNamespace(
        k=randn(4, 2, 64, gen=gen, dtype=torch.bfloat16, device=device),
        v=randn(4, 2, 64, gen=gen, dtype=torch.bfloat16, device=device),
        k_cache=randn(3, 4, 2, 64, gen=gen, dtype=torch.bfloat16, device=device),
        v_cache=randn(3, 4, 2, 64, gen=gen, dtype=torch.bfloat16, device=device),
        slot_mapping=torch.tensor([5, -1, 0, 11], dtype=torch.int64, device=device),
    )


BAD_APPEND = [
    BadCase("slot_past_end", _set_item("slot_mapping", 2, lambda a: 12), ValueError, r"slot_mapping"),
    BadCase("slot_below_minus_one", _set_item("slot_mapping", 0, lambda a: -2), ValueError, r"slot_mapping"),
    BadCase("slot_mapping_int32", _set("slot_mapping", lambda t, a, d: t.int()), RuntimeError,
            r"slot_mapping must have dtype"),
    # (uint8: the host range check once read every slot as < -1 and blamed a valid one)
    BadCase("slot_mapping_uint8", _set("slot_mapping", lambda t, a, d: t.clamp(min=0).to(torch.uint8)), RuntimeError,
            r"slot_mapping must have dtype"),
    BadCase("caches_same_memory", lambda a, d: setattr(a, "v_cache", a.k_cache), ValueError,
            r"k_cache and v_cache are the same memory"),
    # (an expanded cache: a write to one page would land in every page)
    BadCase("cache_pages_overlap", lambda a, d: [setattr(a, n, getattr(a, n)[:1].expand(3, -1, -1, -1))
                                                 for n in ("k_cache", "v_cache")],
            RuntimeError, r"k_cache's pages overlap: page stride 0 < 512 elements"),
    BadCase("slot_mapping_length", _set("slot_mapping", lambda t, a, d: t[:3].contiguous()), RuntimeError,
            r"slot_mapping must have shape"),
    BadCase("slot_mapping_rank", _set("slot_mapping", lambda t, a, d: t.view(2, 2)), RuntimeError,
            r"slot_mapping must be 1-D"),
    BadCase("k_dtype", _set("k", lambda t, a, d: t.half()), RuntimeError, r"\bk must have dtype"),
    BadCase("v_dtype", _set("v", lambda t, a, d: t.float()), RuntimeError, r"\bv must have dtype"),
    BadCase("cache_fp64", lambda a, d: (setattr(a, "k_cache", a.k_cache.double()), setattr(a, "v_cache", a.v_cache.double())),
            RuntimeError, r"k_cache must be"),
    BadCase("k_rank", _set("k", lambda t, a, d: t[0]), RuntimeError, r"\bk must be 3-D"),
    BadCase("k_cache_rank", _set("k_cache", lambda t, a, d: t[0]), RuntimeError, r"k_cache must be 4-D"),
    BadCase("k_heads_mismatch", lambda a, d: (setattr(a, "k", a.k[:, :1]), setattr(a, "v", a.v[:, :1])), RuntimeError,
            r"\bk must be \[tokens"),
    BadCase("v_shape", _set("v", lambda t, a, d: t[:, :, :32]), RuntimeError, r"\bv must have the shape of k"),
    BadCase("v_cache_shape", _set("v_cache", lambda t, a, d: t[:2]), RuntimeError, r"v_cache must have the shape"),
    BadCase("k_inner_strided", _set("k", lambda t, a, d: torch.repeat_interleave(t, 2, dim=2)[..., ::2]), RuntimeError,
            r"\bk must be densely packed"),
    BadCase("slot_mapping_other_device", _set("slot_mapping", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"slot_mapping must be on the same device", cuda_only=True),
    BadCase("k_cache_other_device", _set("k_cache", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"k_cache must be on the same device", cuda_only=True),
    # more cells of the bad-input matrix (docs/bad_input.md)
    BadCase("v_cache_dtype", _set("v_cache", lambda t, a, d: t.half()), RuntimeError, r"v_cache must have dtype"),
    BadCase("cache_fp32_cuda", lambda a, d: [setattr(a, n, getattr(a, n).float()) for n in ("k", "v", "k_cache", "v_cache")],
            RuntimeError, r"k_cache must be bfloat16 or float16 on CUDA", cuda_only=True, kernel_limit=True),
    BadCase("v_other_device", _set("v", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"\bv must be on the same device", cuda_only=True),
    BadCase("v_rank", _set("v", lambda t, a, d: t[0]), RuntimeError, r"\bv must be 3-D"),
    BadCase("slot_mapping_not_contiguous", _set("slot_mapping", lambda t, a, d: torch.stack([t, t], dim=1)[:, 0]),
            RuntimeError, r"slot_mapping must be contiguous"),
    BadCase("k_cache_inner_strided", _set("k_cache", lambda t, a, d: torch.repeat_interleave(t, 2, dim=3)[..., ::2]),
            RuntimeError, r"k_cache must be densely packed"),
    BadCase("row_bytes_not_16_cuda", lambda a, d: [setattr(a, n, getattr(a, n)[..., :1, :4].contiguous())
                                                   for n in ("k", "v", "k_cache", "v_cache")],
            RuntimeError, r"num_kv_heads \* head_dim", cuda_only=True, kernel_limit=True),
]


@pytest.mark.parametrize("bad", [c.param() for c in BAD_APPEND])
def test_append_paged_kv_bad_input(device, bad, gen):
    bad.skip_unless_applies(device)
    a = _append_args(device, gen)
    bad.mutate(a, device)
    before = (a.k_cache.clone(), a.v_cache.clone())
    with pytest.raises(bad.error, match=bad.match):
        kvcore.append_paged_kv(a.k, a.v, a.k_cache, a.v_cache, a.slot_mapping)
    assert torch.equal(a.k_cache, before[0]) and torch.equal(a.v_cache, before[1]), "cache written by a failed call"


def test_append_op_rejects_one_memory_for_both_caches(device, gen):
    # The op itself, not only the wrapper: C++ callers and direct torch.ops users bypass ops.py.
    a = _append_args(device, gen)
    before = a.k_cache.clone()
    with pytest.raises(RuntimeError, match=r"k_cache and v_cache are the same memory"):
        torch.ops.kvcore.append_paged_kv(a.k, a.v, a.k_cache, a.k_cache, a.slot_mapping)
    assert torch.equal(a.k_cache, before)


def _merge_args(device: str, gen) -> SimpleNamespace:
    out_a, lse_a, out_b, lse_b = (
        randn(3, 4, 64, gen=gen, dtype=torch.bfloat16, device=device),
        randn(3, 4, gen=gen, device=device),
        randn(3, 4, 64, gen=gen, dtype=torch.bfloat16, device=device),
        randn(3, 4, gen=gen, device=device),
    )
    return SimpleNamespace(
        out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b,
        out=poison(torch.empty_like(out_a)), lse=poison(torch.empty_like(lse_a)),
    )


BAD_MERGE = [
    BadCase("out_a_rank", lambda a, d: (setattr(a, "out_a", a.out_a[0]),), RuntimeError, r"out_a must be 3-D"),
    BadCase("out_a_fp64", _set("out_a", lambda t, a, d: t.double()), RuntimeError, r"out_a must be"),
    BadCase("out_b_shape", _set("out_b", lambda t, a, d: t[:2]), RuntimeError, r"out_b must have the shape"),
    BadCase("out_b_dtype", _set("out_b", lambda t, a, d: t.half()), RuntimeError, r"out_b must have dtype"),
    BadCase("out_dtype", _set("out", lambda t, a, d: poison(t.float())), RuntimeError, r"\bout must have dtype"),
    BadCase("lse_a_dtype", _set("lse_a", lambda t, a, d: t.bfloat16()), RuntimeError, r"lse_a must have dtype"),
    BadCase("lse_b_shape", _set("lse_b", lambda t, a, d: t[:, :3].contiguous()), RuntimeError, r"lse_b must have shape"),
    BadCase("lse_shape", _set("lse", lambda t, a, d: t[:2]), RuntimeError, r"\blse must have shape"),
    BadCase("out_b_not_contiguous", _set("out_b", lambda t, a, d: t.transpose(0, 1).contiguous().transpose(0, 1)),
            RuntimeError, r"out_b must be contiguous"),
    BadCase("lse_b_other_device", _set("lse_b", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"lse_b must be on the same device", cuda_only=True),
    # more cells of the bad-input matrix (docs/bad_input.md)
    BadCase("lse_b_fp64", _set("lse_b", lambda t, a, d: t.double()), RuntimeError, r"lse_b must have dtype"),
    BadCase("out_a_fp32_cuda", lambda a, d: [setattr(a, n, getattr(a, n).float()) for n in ("out_a", "out_b", "out")],
            RuntimeError, r"out_a must be bfloat16 or float16 on CUDA", cuda_only=True, kernel_limit=True),
    BadCase("out_other_device", _set("out", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"\bout must be on the same device", cuda_only=True),
    BadCase("lse_a_rank", _set("lse_a", lambda t, a, d: t[0]), RuntimeError, r"lse_a must have shape"),
    BadCase("lse_a_not_contiguous", _set("lse_a", lambda t, a, d: t.t().contiguous().t()), RuntimeError,
            r"lse_a must be contiguous"),
    BadCase("out_not_contiguous", _set("out", lambda t, a, d: poison(torch.empty(3, 4, 128, dtype=t.dtype, device=d))[..., :64]),
            RuntimeError, r"\bout must be contiguous"),
    BadCase("head_dim_not_multiple_of_8_cuda", lambda a, d: [setattr(a, n, getattr(a, n)[..., :12].contiguous())
                                                             for n in ("out_a", "out_b", "out")],
            RuntimeError, r"head_dim must be a multiple of 8", cuda_only=True, kernel_limit=True),
    BadCase("head_dim_zero", lambda a, d: [setattr(a, n, getattr(a, n)[..., :0].contiguous())
                                           for n in ("out_a", "out_b", "out")],
            RuntimeError, r"out_a's head_dim \(last dim\) must be positive, got 0"),
]


@pytest.mark.parametrize("bad", [c.param() for c in BAD_MERGE])
def test_merge_attention_states_bad_input(device, bad, gen):
    bad.skip_unless_applies(device)
    a = _merge_args(device, gen)
    bad.mutate(a, device)
    with pytest.raises(bad.error, match=bad.match):
        kvcore.merge_attention_states(a.out_a, a.lse_a, a.out_b, a.lse_b, out=a.out, lse=a.lse)
    assert bool(torch.isnan(a.out).all()) and bool(torch.isnan(a.lse).all()), "outputs written by a failed call"


# ============================================================================================
# Validation off: bad index contents give wrong numbers, never a crash or an error
# ============================================================================================


def test_validation_is_on_by_default():
    assert kvcore.validation_enabled()


def test_gqa_decode_bad_indices_without_validation(device, no_validation, gen):
    assert not kvcore.validation_enabled()
    a = _decode_args(device, gen)
    cap = a.block_table.shape[1] * 8
    a.block_table[2, 0] = 10**6  # page far out of range
    a.block_table[2, 1] = -7  # negative page
    a.block_table[1, 0] = a.num_pages  # just past the end
    seq_lens = torch.tensor([-5, 3 * cap, 10**6], dtype=torch.int32, device=device)  # negative and past capacity
    kvcore.gqa_decode(a.q, a.k_cache, a.v_cache, a.block_table, seq_lens, out=a.out, lse=a.lse)
    if device == "cuda":
        torch.cuda.synchronize()
    # Indices are clamped into range, so every read hits real (finite) cache data.
    assert bool(torch.isfinite(a.out).all())
    assert bool(torch.isfinite(a.lse[1:]).all())
    # A negative length clamps to 0: an empty sequence.
    assert bool((a.out[0] == 0).all()) and bool(torch.isneginf(a.lse[0]).all())


def test_append_paged_kv_bad_slots_without_validation(device, dtype, no_validation, gen):
    """Out-of-range slots are skipped (never written); the valid ones land as usual."""
    k_cache = randn(3, 4, 2, 64, gen=gen, dtype=dtype, device=device)
    v_cache = randn(3, 4, 2, 64, gen=gen, dtype=dtype, device=device)
    k = randn(6, 2, 64, gen=gen, dtype=dtype, device=device)
    v = randn(6, 2, 64, gen=gen, dtype=dtype, device=device)
    slots = torch.tensor([5, 12, -2, 10**12, -(10**9), 0], dtype=torch.int64, device=device)
    valid = torch.where((slots >= 0) & (slots < 12), slots, torch.full_like(slots, -1))
    ref_k, ref_v = reference.append_paged_kv(k, v, k_cache, v_cache, valid)
    kvcore.append_paged_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.skipif(os.environ.get("KVCORE_DECODE_PAGE_GROUPS") == "off", reason="this process already runs it")
def test_gqa_decode_without_page_groups_in_subprocess():
    """KVCORE_DECODE_PAGE_GROUPS=off (read once per process) makes each copy slot look its page up
    and compute its addresses itself, as page sizes or windows the groups do not fit always do:
    this file's and the score file's gqa_decode CUDA cases once more in a fresh process with it."""
    run_tests_with_env("KVCORE_DECODE_PAGE_GROUPS", "off", ["tests/test_ops.py", "tests/test_decode_score.py"],
                       "gqa_decode and not in_subprocess and not misspelt", 40, "-m", "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.skipif(os.environ.get("KVCORE_DECODE_LOADER") == "tma", reason="this process already runs it")
def test_gqa_decode_with_tma_loader_in_subprocess():
    """KVCORE_DECODE_LOADER=tma (read once per process): gqa_decode's K/V tiles come as TMA boxes
    issued by one warp where the page size and the call allow (sm_90a; elsewhere the cp.async
    loader runs). This file's gqa_decode CUDA cases, test_nan's decode cases and the graph-capture
    cases once more in a fresh process with it."""
    run_tests_with_env("KVCORE_DECODE_LOADER", "tma",
                       ["tests/test_ops.py", "tests/test_nan.py", "tests/test_cuda_graph.py"],
                       "(gqa_decode or decode_nan or graph) and not in_subprocess and not misspelt", 40, "-m", "cuda")


# What a gqa_decode kernel switch re-runs in a fresh process (run_tests_with_env's files, -k
# selection, least passed and pytest arguments): this file's gqa_decode CUDA cases, test_nan's
# decode cases, the graph-capture and determinism cases.
DECODE_KERNEL_RERUN = (
    ["tests/test_ops.py", "tests/test_nan.py", "tests/test_cuda_graph.py", "tests/test_determinism.py"],
    "(gqa_decode or decode_nan or graph or cuda_decode_bitwise or cuda_fixed_splits) and not in_subprocess and not misspelt",
    40, "-m", "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.skipif(os.environ.get("KVCORE_DECODE_WARPS") == "8", reason="this process already runs it")
def test_gqa_decode_with_8_warps_in_subprocess():
    """KVCORE_DECODE_WARPS=8 (read once per process): gqa_decode at head_dim 128 without a score
    buffer always runs the 8-warp kernel (128-token tiles, one CTA per SM), which the automatic
    choice takes only at about one pair per SM. This file's gqa_decode CUDA cases, test_nan's
    decode cases, the graph-capture and determinism cases once more in a fresh process with it."""
    run_tests_with_env("KVCORE_DECODE_WARPS", "8", *DECODE_KERNEL_RERUN)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("ring", ["3", "2"])
def test_gqa_decode_narrow_ring_in_subprocess(ring):
    """KVCORE_DECODE_NARROW_RING=3 / 2 (read once per process): gqa_decode's 4-warp kernel at head_dim
    128 (no score buffer) keeps a ring of that many tiles; `auto` takes 2 only on Hopper for a
    one-wave grid of splits of at least 4096 keys, which few cases here reach, so forcing each
    depth runs all of the suite's shapes on that ring (2: a kernel the default rarely runs here; 3:
    the ring other GPUs take). This file's gqa_decode CUDA cases, test_nan's decode cases, the
    graph-capture and determinism cases once more in a fresh process."""
    if os.environ.get("KVCORE_DECODE_NARROW_RING") == ring:
        pytest.skip("this process already runs it")
    run_tests_with_env("KVCORE_DECODE_NARROW_RING", ring, *DECODE_KERNEL_RERUN)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("kernel", ["page8", "page4", "page2"])
def test_gqa_decode_page_major_in_subprocess(kernel):
    """KVCORE_DECODE_KERNEL=page8 / page4 / page2 (read once per process): gqa_decode at head_dim
    128 (no window, no score buffer, automatic split count, pages of a multiple of 16 tokens, KV
    heads divisible by the block) runs the page-major kernel, a CTA per (sequence, split, block of
    8 / 4 / 2 KV heads). This file's gqa_decode CUDA cases, test_nan's decode cases, the
    graph-capture and determinism cases once more in a fresh process with it."""
    if os.environ.get("KVCORE_DECODE_KERNEL") == kernel:
        pytest.skip("this process already runs it")
    run_tests_with_env("KVCORE_DECODE_KERNEL", kernel, *DECODE_KERNEL_RERUN)


# Equal lengths with their host copy and a block of KV heads a CTA per SM: one wave of unsplit
# page-major CTAs, which gqa_decode's `auto` kernel choice runs (split_plan.h's
# page_major_fills_one_wave): "h8", a sequence per SM (one 8-KV-head block each), and "h4", a
# sequence per two SMs (two 4-KV-head blocks each, which 8-head blocks would not fill). The same
# call without the hint, or with a hint of unequal lengths, runs the head kernel. Two tables each:
# lengths one key short of the table's width (an active hint of fill 1) and lengths that fill it
# (the hint the split count ignores).
_PAGE_MAJOR_RULE_SCRIPT = textwrap.dedent(
    """
    import sys, torch, kvcore
    sys.path.insert(0, "tests")
    from conftest import make_paged_kv, poison, randn
    from kvcore import reference
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator().manual_seed(4321)
    res = {}
    for blocks, batch in (("h8", sms), ("h4", sms // 2)):
        for table, n in (("short", 2047), ("full", 2048)):
            lens = [n] * batch
            kv = make_paged_kv(lens, 16, 8, 128, gen=gen, dtype=torch.bfloat16, device="cuda", extra_table_cols=0)
            assert kv.block_table.shape[1] * 16 == 2048
            q = randn(batch, 32, 128, gen=gen, dtype=torch.bfloat16, device="cuda")
            # (a stale hint is allowed: it may only cost speed; this one says the lengths differ)
            for name, hint in (("none", None), ("hint", lens), ("unequal", lens[:-1] + [n - 1])):
                out = poison(torch.empty_like(q))
                lse = poison(torch.empty(batch, 32, dtype=torch.float32, device="cuda"))
                kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse,
                                  plan_seq_lens=hint)
                res[blocks, table, name] = (out.cpu(), lse.cpu())
            ref = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
            res[blocks, table, "ref"] = tuple(t.cpu() for t in ref)
            del kv, q
    torch.save(res, sys.argv[1])
    """
)

# The switches `auto` steps aside for; the test below needs them at their defaults.
_OTHER_DECODE_SWITCHES = ("KVCORE_DECODE_WARPS", "KVCORE_DECODE_NARROW_RING", "KVCORE_DECODE_LOADER",
                          "KVCORE_DECODE_PAGE_GROUPS")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_gqa_decode_equal_lengths_take_page_major_in_subprocess(tmp_path):
    """KVCORE_DECODE_KERNEL unset (`auto`): a host copy of equal lengths whose unsplit 8-KV-head
    blocks fill the SMs once runs the page-major kernel with 8 heads a CTA (bit for bit the page8
    switch's output), and where only 4-head blocks do, with 4 (the page4 switch's), whether or not
    the lengths fill the block table; the same call without a hint, or with one of unequal
    lengths, runs the head kernel (the `head` switch's output for the same call; that switch
    ignores a hint of equal lengths); all match the reference."""
    props = torch.cuda.get_device_properties(0)
    if getattr(props, "shared_memory_per_block_optin", 0) < 3 * 8 * 16 * 128 * 2 * 2:
        pytest.skip("the page-major kernel's 192 KB ring does not fit this GPU")
    if any(os.environ.get(name) for name in _OTHER_DECODE_SWITCHES):
        pytest.skip("another gqa_decode switch is set, which turns the `auto` rule off")
    runs = {v: run_script_with_env("KVCORE_DECODE_KERNEL", v, _PAGE_MAJOR_RULE_SCRIPT, tmp_path)
            for v in (None, "page8", "page4", "head")}
    same = lambda a, b: torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # noqa: E731
    auto, head = runs[None], runs["head"]
    for blocks, forced in (("h8", runs["page8"]), ("h4", runs["page4"])):
        for table in ("short", "full"):
            at = f"{blocks} {table}"
            a = {name: auto[blocks, table, name] for name in ("none", "hint", "unequal", "ref")}
            h = {name: head[blocks, table, name] for name in ("none", "hint", "unequal")}
            assert same(a["hint"], forced[blocks, table, "none"]), f"{at}: not the page-major kernel"
            assert same(a["none"], h["none"]), f"{at}: without the hint, not the head kernel"
            # (the head switch's same call: at h4's two waves of pairs the unequal hint moves the split count)
            assert same(a["unequal"], h["unequal"]), f"{at}: unequal lengths took the page-major kernel"
            assert same(h["hint"], h["none"]), f"{at}: KVCORE_DECODE_KERNEL=head took the hint"
            # the kernels differ in bits, so the checks above can tell them apart
            assert not torch.equal(a["hint"][0], a["none"][0])
            for name in ("none", "hint", "unequal"):
                _check_decode(*a[name], *a["ref"], torch.bfloat16)
    # 8- and 4-head blocks are told apart too: the h4 batch forced onto 8-head blocks gives other bits
    assert not torch.equal(runs["page8"]["h4", "full", "none"][0], auto["h4", "full", "hint"][0])


# The switches under which gqa_decode may not run the head kernel's ORDER instances (the table's
# order, the page-major kernels, the TMA loader, page groups off); KVCORE_DECODE_WARPS=8 keeps them.
_PAGE_ORDER_OFF_SWITCHES = ("KVCORE_DECODE_PAGE_ORDER", "KVCORE_DECODE_KERNEL", "KVCORE_DECODE_LOADER",
                            "KVCORE_DECODE_PAGE_GROUPS")


@pytest.mark.parametrize("head_dim, page_size", [(64, 32), (64, 64), (128, 16), (128, 32), (128, 64),
                                                 (256, 8), (256, 64)])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_page_order_cuda(device, head_dim, page_size, gen):
    """An automatic split count visits each split's pages in cache order (the ORDER kernels; the
    page sizes here take them at each head dim, unless a kernel switch of the process turns them
    off): ragged lengths with partial last pages, empty and one-token sequences and a random page
    table still match the reference, with and without a length hint, and agree to rounding with
    one forced split, which keeps the table's order. (Splits here hold at most 64 pages; the
    full-sort test below sorts 504.)"""
    lens = [0, 1, page_size - 1, 3 * page_size + 5, 2500, 4096, 1777]
    kv = make_paged_kv(lens, page_size, 2, head_dim, gen=gen, dtype=torch.bfloat16, device=device)
    _decode_matches_reference(kv, 8, torch.bfloat16, device, gen)
    _decode_matches_reference(kv, 8, torch.bfloat16, device, gen, plan_seq_lens=lens)
    q = randn(len(lens), 8, head_dim, gen=gen, dtype=torch.bfloat16, device=device)
    auto = kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, return_lse=True)
    forced = kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, return_lse=True, num_splits=1)
    torch.testing.assert_close(auto[0], forced[0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(auto[1], forced[1], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_page_order_full_sort_cuda(device, gen):
    """One 8192-token sequence among 131 one-token ones (page 16, a table exactly 512 pages wide):
    264 (sequence, KV head) pairs plan one split each on a 132-SM GPU, so the long sequence's CTAs
    sort 504 entries (every step of the sort: shuffles, both cross-warp buffers, register slots)
    and read its random pages in cache order. Matches the reference; where the automatic plan is
    one split (as on an H100), its bits also differ from the forced one split's (table order) for
    the long sequence only, which shows the ORDER kernel ran."""
    lens = [8192] + [1] * 131
    kv = make_paged_kv(lens, 16, 2, 128, gen=gen, dtype=torch.bfloat16, device=device, extra_table_cols=0)
    assert kv.block_table.shape[1] == 512
    _decode_matches_reference(kv, 8, torch.bfloat16, device, gen)
    q = randn(len(lens), 8, 128, gen=gen, dtype=torch.bfloat16, device=device)
    args = (q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    auto = kvcore.gqa_decode(*args, return_lse=True)
    forced = kvcore.gqa_decode(*args, return_lse=True, num_splits=1)
    ref_out, ref_lse = reference.gqa_decode(*args)
    _check_decode(auto[0], auto[1], ref_out, ref_lse, torch.bfloat16)
    props = torch.cuda.get_device_properties(device)
    order_on = not any(map(os.environ.get, _PAGE_ORDER_OFF_SWITCHES))
    if props.multi_processor_count == 132 and props.major == 9 and order_on:
        assert torch.equal(auto[0][1:], forced[0][1:]), "one-token sequences: one page, the same order"
        assert not torch.equal(auto[0][0], forced[0][0]), "the long sequence's pages were not reordered"


# Each table kind's pages, read by gqa_decode with an automatic split count: an in-order table
# (cache order is sequence order, so the ORDER kernel visits the pages as the plain one does) and
# a random one (orders differ, so do the rounding bits).
_PAGE_ORDER_SCRIPT = textwrap.dedent(
    """
    import sys, torch, kvcore
    sys.path.insert(0, "tests")
    from conftest import poison, randn
    from kvcore import reference
    gen = torch.Generator().manual_seed(99)
    lens, ps, hkv, d = [3000, 1, 4096, 2049, 0, 777], 16, 8, 128
    pages = [(n + ps - 1) // ps for n in lens]
    width = max(pages)
    k = randn(sum(pages) + 2, ps, hkv, d, gen=gen, dtype=torch.bfloat16, device="cuda")
    v = randn(sum(pages) + 2, ps, hkv, d, gen=gen, dtype=torch.bfloat16, device="cuda")
    q = randn(len(lens), 32, d, gen=gen, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    res = {}
    for kind in ("in_order", "random"):
        ids = torch.arange(sum(pages)) if kind == "in_order" else torch.randperm(sum(pages), generator=gen)
        table = torch.zeros(len(lens), width, dtype=torch.int32)
        at = 0
        for b, n in enumerate(pages):
            table[b, :n] = ids[at : at + n]
            at += n
        table = table.cuda()
        out = poison(torch.empty_like(q))
        lse = poison(torch.empty(len(lens), 32, dtype=torch.float32, device="cuda"))
        kvcore.gqa_decode(q, k, v, table, seq_lens, out=out, lse=lse)
        ref = reference.gqa_decode(q, k, v, table, seq_lens)
        res[kind] = (out.cpu(), lse.cpu(), ref[0].cpu(), ref[1].cpu())
    torch.save(res, sys.argv[1])
    """
)


def _check_page_order_runs(script: str, tmp_path) -> None:
    """``script`` (_PAGE_ORDER_SCRIPT's form) with KVCORE_DECODE_PAGE_ORDER unset and ``table``:
    on the in-order table both give the same bits, on the random one different bits (the pages
    were read in another order), and every output matches the reference."""
    runs = {v: run_script_with_env("KVCORE_DECODE_PAGE_ORDER", v, script, tmp_path) for v in (None, "table")}
    auto, table = runs[None], runs["table"]
    assert torch.equal(auto["in_order"][0], table["in_order"][0])
    assert torch.equal(auto["in_order"][1], table["in_order"][1])
    assert not torch.equal(auto["random"][0], table["random"][0]), "the random table's pages were not reordered"
    for run in (auto, table):
        for kind in ("in_order", "random"):
            _check_decode(*run[kind], torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_gqa_decode_page_order_switch_in_subprocess(tmp_path):
    """KVCORE_DECODE_PAGE_ORDER unset (`auto`) runs the ORDER kernel, `table` the plain one: on an
    in-order page table both visit the same pages in the same order (bit for bit the same output),
    on a random one they sum in different orders (different bits); all match the reference."""
    # (the subprocesses inherit this process's switches)
    if any(map(os.environ.get, _PAGE_ORDER_OFF_SWITCHES)):
        pytest.skip("a gqa_decode switch that turns the ORDER kernels off is set in this process")
    _check_page_order_runs(_PAGE_ORDER_SCRIPT, tmp_path)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_gqa_decode_page_order_unsorted_in_subprocess(tmp_path):
    """KVCORE_DECODE_PAGE_ORDER=unsorted (an A/B switch: the ORDER kernels without their sort,
    the list in the table's order) still matches the reference on both table kinds."""
    if any(map(os.environ.get, _PAGE_ORDER_OFF_SWITCHES)):
        pytest.skip("a gqa_decode switch that turns the ORDER kernels off is set in this process")
    run = run_script_with_env("KVCORE_DECODE_PAGE_ORDER", "unsorted", _PAGE_ORDER_SCRIPT, tmp_path)
    for kind in ("in_order", "random"):
        _check_decode(*run[kind], torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("kernel", ["page8", "page4", "page2"])
def test_gqa_decode_page_major_page_order_switch_in_subprocess(kernel, tmp_path):
    """The page-major kernel (KVCORE_DECODE_KERNEL set by the script before its first call) with
    KVCORE_DECODE_PAGE_ORDER unset (`auto`: its ORDER instance at 16-token pages) and `table`:
    bit for bit the same on an in-order page table, different bits on a random one (its pages
    visited in cache order), all matching the reference."""
    heads = int(kernel[len("page"):])
    props = torch.cuda.get_device_properties(0)
    if getattr(props, "shared_memory_per_block_optin", 0) < 3 * heads * 16 * 128 * 2 * 2 + 2048:
        pytest.skip(f"the {heads}-head page-major kernel's ring and its page list do not fit this GPU")
    script = f"import os\nos.environ['KVCORE_DECODE_KERNEL'] = {kernel!r}\n" + _PAGE_ORDER_SCRIPT
    _check_page_order_runs(script, tmp_path)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.skipif(os.environ.get("KVCORE_DECODE_PAGE_ORDER") == "table", reason="this process already runs it")
def test_gqa_decode_table_page_order_in_subprocess():
    """KVCORE_DECODE_PAGE_ORDER=table (read once per process): every split visits its pages in the
    block table's order, as before the ORDER kernels. This file's gqa_decode CUDA cases, test_nan's
    decode cases, the graph-capture and determinism cases once more in a fresh process with it."""
    run_tests_with_env("KVCORE_DECODE_PAGE_ORDER", "table", *DECODE_KERNEL_RERUN)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("name, bad", [("KVCORE_DECODE_PAGE_GROUPS", "of"), ("KVCORE_DECODE_LOADER", "tmaa"),
                                       ("KVCORE_DECODE_WARPS", "16"), ("KVCORE_DECODE_KERNEL", "page16"),
                                       ("KVCORE_DECODE_PAGE_ORDER", "sorted"), ("KVCORE_DECODE_NARROW_RING", "4")])
def test_gqa_decode_misspelt_switch_is_an_error(name, bad):
    """A misspelt gqa_decode switch fails the call instead of silently timing the default."""
    assert_switch_value_rejected(
        name, bad,
        """
        q = torch.randn(1, 8, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(4, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
        bt = torch.arange(4, dtype=torch.int32, device="cuda").view(1, 4)
        sl = torch.tensor([40], dtype=torch.int32, device="cuda")
        """,
        "kvcore.gqa_decode(q, k, k, bt, sl)")
