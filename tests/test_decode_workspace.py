"""The CUDA split-KV workspace is shared by consecutive calls of different shapes.

Its arrival counters must read zero at the start of every call. Regression: the partials of a
call with few (sequence, KV head) pairs used to be placed where a later call with more pairs
keeps its counters, so that call's merges never ran and half its output stayed unwritten.
"""

from __future__ import annotations

import pytest
import torch

import kvcore
from conftest import HAS_CUDA, NO_CUDA_REASON, make_paged_kv, poison, randn
from kvcore import reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]


def _decode_and_check(batch, length, num_splits, gen, workspace):
    hq, hkv, d = 8, 2, 128
    kv = make_paged_kv([length] * batch, 16, hkv, d, gen=gen, dtype=torch.bfloat16, device="cuda")
    q = randn(batch, hq, d, gen=gen, dtype=torch.bfloat16, device="cuda")
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(batch, hq, device="cuda"))
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse,
                      workspace=workspace, num_splits=num_splits)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("shared", [True, False], ids=["default-workspace", "own-workspace"])
def test_workspace_reused_across_shapes(shared, gen):
    ws = None if shared else torch.zeros(kvcore.ops.DECODE_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    # few pairs, many splits; then many pairs, few splits; then few pairs again; auto and forced
    for batch, length, splits in [(1, 4000, 0), (1, 4000, 40), (64, 700, 2), (64, 700, 0), (3, 2000, 7), (1, 4000, 0)]:
        _decode_and_check(batch, length, splits, gen, ws)
    if ws is not None:
        assert int(ws[: 64 * 2 * 4].count_nonzero()) == 0, "arrival counters must be reset after each call"
