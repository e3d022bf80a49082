"""Run-to-run bitwise reproducibility of gqa_decode.

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

import pytest
import torch

import kvcore
from conftest import HAS_CUDA, NO_CUDA_REASON, OUT_TOL, LSE_TOL, make_paged_kv, poison, ragged_lens, randn
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
