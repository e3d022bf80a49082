"""A decode step (append + gqa_decode) captured once in a CUDA graph and replayed.

With out, lse and workspace passed in, the ops neither allocate nor sync on the host, so the
capture succeeds; replays must follow new contents of seq_lens, block_table and slot_mapping.
"""

from __future__ import annotations

import pytest
import torch

import kvcore
from conftest import HAS_CUDA, NO_CUDA_REASON, randn
from kvcore import reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]


def test_decode_step_graph_replay(gen):
    batch, hq, hkv, d, page, max_pages = 3, 16, 4, 128, 16, 40
    num_pages = batch * max_pages
    dev, dt = "cuda", torch.bfloat16
    k_cache = randn(num_pages, page, hkv, d, gen=gen, dtype=dt, device=dev)
    v_cache = randn(num_pages, page, hkv, d, gen=gen, dtype=dt, device=dev)
    # static buffers the graph reads; their contents change between replays
    q = torch.empty(batch, hq, d, dtype=dt, device=dev)
    k_new = torch.empty(batch, hkv, d, dtype=dt, device=dev)
    v_new = torch.empty_like(k_new)
    slots = torch.empty(batch, dtype=torch.int64, device=dev)
    block_table = torch.empty(batch, max_pages, dtype=torch.int32, device=dev)
    seq_lens = torch.empty(batch, dtype=torch.int32, device=dev)
    out = torch.empty(batch, hq, d, dtype=dt, device=dev)
    lse = torch.empty(batch, hq, dtype=torch.float32, device=dev)
    workspace = torch.zeros(kvcore.ops.DECODE_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)

    def fill(lens):
        perm = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages)
        block_table.copy_(perm.int())
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        last = torch.tensor(lens) - 1  # the token appended this step is the last one of each sequence
        slots.copy_((perm.gather(1, (last // page).unsqueeze(1)).squeeze(1) * page + last % page).long())
        for t in (q, k_new, v_new):
            t.copy_(randn(*t.shape, gen=gen, dtype=dt))

    def step():
        kvcore.append_paged_kv(k_new, v_new, k_cache, v_cache, slots)
        kvcore.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, out=out, lse=lse, workspace=workspace)

    fill([600, 1, 37])
    step()  # warm-up outside the capture (kernel attributes, occupancy cache)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for lens in ([640, 5, 100], [1, 600, 2], [320, 320, 320]):
        fill(lens)
        k_ref, v_ref = reference.append_paged_kv(k_new, v_new, k_cache, v_cache, slots)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        ref_out, ref_lse = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens)
        torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)
