"""A decode step (append + gqa_decode, append + block_sparse_decode) and token_decoder_attention
captured once in a CUDA graph and replayed.

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


# ---- block-sparse decode step ----------------------------------------------------------------


@pytest.mark.parametrize("num_splits", [0, 1, 4], ids=lambda n: f"splits{n}")
def test_block_sparse_decode_step_graph_replay(num_splits, gen):
    """append + block_sparse_decode captured once; each replay gets new seq_lens, block tables,
    selections (rewritten in place, counts included) and q/k/v, and must give exactly what the
    same call gives eagerly (and the reference, within tolerance)."""
    batch, hq, hkv, d, page, max_pages, max_sel = 3, 16, 4, 128, 16, 40, 24
    num_pages = batch * max_pages
    dev, dt = "cuda", torch.bfloat16
    k_cache = randn(num_pages, page, hkv, d, gen=gen, dtype=dt, device=dev)
    v_cache = randn(num_pages, page, hkv, d, gen=gen, dtype=dt, device=dev)
    q = torch.empty(batch, hq, d, dtype=dt, device=dev)
    k_new = torch.empty(batch, hkv, d, dtype=dt, device=dev)
    v_new = torch.empty_like(k_new)
    slots = torch.empty(batch, dtype=torch.int64, device=dev)
    block_table = torch.empty(batch, max_pages, dtype=torch.int32, device=dev)
    seq_lens = torch.empty(batch, dtype=torch.int32, device=dev)
    sel_pages = torch.empty(batch, hkv, max_sel, dtype=torch.int32, device=dev)
    sel_counts = torch.empty(batch, hkv, dtype=torch.int32, device=dev)
    out = torch.empty(batch, hq, d, dtype=dt, device=dev)
    lse = torch.empty(batch, hq, dtype=torch.float32, device=dev)
    workspace = torch.zeros(kvcore.ops.DECODE_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)

    def fill(lens, empty_pair=None):
        perm = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages)
        block_table.copy_(perm.int())
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        last = torch.tensor(lens) - 1  # the token appended this step is the last one of each sequence
        slots.copy_((perm.gather(1, (last // page).unsqueeze(1)).squeeze(1) * page + last % page).long())
        for t in (q, k_new, v_new):
            t.copy_(randn(*t.shape, gen=gen, dtype=dt))
        # Each list: the last page (so the token just appended is attended) and a random subset
        # of the others, in random order; junk past the count. One pair may be left empty.
        pages = torch.randint(-1, 10**6, (batch, hkv, max_sel), generator=gen, dtype=torch.int32)
        counts = torch.zeros(batch, hkv, dtype=torch.int32)
        for b, n in enumerate(lens):
            used = (n + page - 1) // page
            for h in range(hkv):
                if (b, h) == empty_pair:
                    continue
                others = torch.randperm(used - 1, generator=gen)[: int(torch.randint(0, max_sel, (1,), generator=gen))]
                chosen = torch.cat([torch.tensor([used - 1]), others])[: max_sel]
                chosen = chosen[torch.randperm(chosen.numel(), generator=gen)]
                pages[b, h, : chosen.numel()] = chosen.to(torch.int32)
                counts[b, h] = chosen.numel()
        sel_pages.copy_(pages)
        sel_counts.copy_(counts)

    def step():
        kvcore.append_paged_kv(k_new, v_new, k_cache, v_cache, slots)
        kvcore.block_sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel_pages, sel_counts, out=out,
                                   lse=lse, workspace=workspace, num_splits=num_splits)

    fill([600, 1, 37])
    step()  # warm-up outside the capture (validates the selection, kernel attributes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for lens, empty_pair in (([640, 5, 100], None), ([1, 600, 2], (1, 2)), ([320, 320, 320], (0, 0)),
                             ([640, 640, 640], None)):
        fill(lens, empty_pair)
        k_ref, v_ref = reference.append_paged_kv(k_new, v_new, k_cache, v_cache, slots)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        # Eagerly, on the appended cache (appending the same rows again changes nothing).
        eager_out, eager_lse = kvcore.block_sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel_pages,
                                                          sel_counts, return_lse=True, workspace=workspace,
                                                          num_splits=num_splits)
        assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse), f"replay differs from eager for {lens}"
        ref_out, ref_lse = reference.block_sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel_pages,
                                                         sel_counts)
        torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)
        if empty_pair is not None:
            b, h = empty_pair
            heads = slice(h * (hq // hkv), (h + 1) * (hq // hkv))
            assert bool((out[b, heads] == 0).all()) and bool(torch.isneginf(lse[b, heads]).all())


# ---- token decoder attention -----------------------------------------------------------------


def test_token_decoder_attention_graph_replay_equals_eager(gen):
    """token_decoder_attention on block-strided views, GQA and a prefix, captured once; each
    replay gets new q/k/v contents and new block_lens (0, partial and full blocks) and must give
    exactly what the same call gives eagerly (and the reference, within tolerance)."""
    blocks, length, prefix, hq, hkv, d = 96, 8, 2, 16, 4, 128
    dev, dt = "cuda", torch.bfloat16
    q_store = torch.empty(blocks, length + 1, hq, d, dtype=dt, device=dev)
    kv_store = torch.empty(blocks, 2, prefix + length, hkv, d, dtype=dt, device=dev)
    q = q_store[:, 1:]  # each block densely packed, blocks strided
    k, v = kv_store[:, 0], kv_store[:, 1]
    block_lens = torch.empty(blocks, dtype=torch.int32, device=dev)
    out = torch.empty(blocks, length, hq, d, dtype=dt, device=dev)
    lse = torch.empty(blocks, length, hq, dtype=torch.float32, device=dev)

    def fill(special):
        q_store.copy_(randn(*q_store.shape, gen=gen, dtype=dt))
        kv_store.copy_(randn(*kv_store.shape, gen=gen, dtype=dt))
        lens = torch.randint(0, length + 1, (blocks,), generator=gen, dtype=torch.int32)
        lens[: len(special)] = torch.tensor(special, dtype=torch.int32)
        block_lens.copy_(lens)

    fill([length])
    kvcore.token_decoder_attention(q, k, v, block_lens, out=out, lse=lse)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kvcore.token_decoder_attention(q, k, v, block_lens, out=out, lse=lse)

    for special in ([0, length, 1], [length] * blocks, [0] * blocks, [3, 0, length - 1]):
        fill(special)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager_out, eager_lse = kvcore.token_decoder_attention(q, k, v, block_lens, return_lse=True)
        assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse), f"replay differs from eager ({special[:3]})"
        ref_out, ref_lse = reference.token_decoder_attention(q, k, v, block_lens)
        torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)
        pad = torch.arange(length, device=dev)[None, :] >= block_lens.long()[:, None]
        assert bool((out[pad] == 0).all()) and bool(torch.isneginf(lse[pad]).all())


def test_decode_step_with_h2o_score_graph_replay(gen):
    """append + gqa_decode(score=...) captured once: every replay adds that step's probabilities
    (the reference's) to the score buffer, with the workspace and score preallocated."""
    batch, hq, hkv, d, page, max_pages = 3, 16, 4, 128, 16, 40
    num_pages = batch * max_pages
    dev, dt = "cuda", torch.bfloat16
    k_cache = randn(num_pages, page, hkv, d, gen=gen, dtype=dt, device=dev)
    v_cache = randn(num_pages, page, hkv, d, gen=gen, dtype=dt, device=dev)
    q = torch.empty(batch, hq, d, dtype=dt, device=dev)
    k_new = torch.empty(batch, hkv, d, dtype=dt, device=dev)
    v_new = torch.empty_like(k_new)
    slots = torch.empty(batch, dtype=torch.int64, device=dev)
    block_table = torch.empty(batch, max_pages, dtype=torch.int32, device=dev)
    seq_lens = torch.empty(batch, dtype=torch.int32, device=dev)
    out = torch.empty(batch, hq, d, dtype=dt, device=dev)
    score = torch.zeros(batch, hkv, max_pages * page, dtype=torch.float32, device=dev)
    workspace = torch.zeros(kvcore.ops.decode_score_workspace_bytes(batch, hq, max_pages, page), dtype=torch.uint8,
                            device=dev)

    def fill(lens):
        perm = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages)
        block_table.copy_(perm.int())
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        last = torch.tensor(lens) - 1
        slots.copy_((perm.gather(1, (last // page).unsqueeze(1)).squeeze(1) * page + last % page).long())
        for t in (q, k_new, v_new):
            t.copy_(randn(*t.shape, gen=gen, dtype=dt))

    def step():
        kvcore.append_paged_kv(k_new, v_new, k_cache, v_cache, slots)
        kvcore.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, out=out, workspace=workspace, score=score)

    fill([600, 1, 37])
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    for lens in ([640, 5, 100], [1, 600, 2], [320, 320, 320]):
        fill(lens)
        before = score.clone()
        graph.replay()
        torch.cuda.synchronize()
        add = reference.gqa_decode_score(q, k_cache, block_table, seq_lens, score_len=score.shape[2])
        torch.testing.assert_close(score.double() - before.double(), add, atol=1e-5, rtol=2e-3)
        ref_out, _ = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens)
        torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=1e-2)
