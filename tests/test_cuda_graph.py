"""A decode step (append + gqa_decode, append + block_sparse_decode), token_decoder_attention and
H2O's per-step attention_scores, retrieval's scoring + top-k, mla_decode and an MLA decode step
(mla_latent_project + mla_decode) captured once in a CUDA graph and replayed.

With out, lse and workspace passed in, the ops neither allocate nor sync on the host, so the
capture succeeds; replays must follow new contents of seq_lens, block_table and slot_mapping.
"""

from __future__ import annotations

import pytest
import torch

import kvcore
from conftest import HAS_CUDA, NO_CUDA_REASON, assert_out_lse_close, capture_graph, poison, randn
from kvcore import reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]


def _fill_tables(block_table, seq_lens, lens, num_pages, page, gen, slots=None) -> torch.Tensor:
    """Rewrite a graph's static block table (a random permutation of the pages) and seq_lens in
    place for sequences of lengths ``lens``; with ``slots``, set each sequence's slot for its last
    token (the one appended this step). Returns the last tokens' positions."""
    batch, max_pages = block_table.shape
    perm = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages)
    block_table.copy_(perm.int())
    seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
    last = torch.tensor(lens) - 1
    if slots is not None:
        slots.copy_((perm.gather(1, (last // page).unsqueeze(1)).squeeze(1) * page + last % page).long())
    return last


def _fill_random(gen, *tensors) -> None:
    """Rewrite each static input in place with fresh random normals (drawn on the CPU)."""
    for t in tensors:
        t.copy_(randn(*t.shape, gen=gen, dtype=t.dtype))


def _replay(graph, *outputs) -> None:
    """Poison ``outputs`` with NaN (so an element the replay leaves unwritten shows), replay, sync."""
    for t in outputs:
        poison(t)
    graph.replay()
    torch.cuda.synchronize()


class AppendDecodeStep:
    """A decode step's paged K/V caches (random, batch * max_pages pages) and the static inputs a
    captured append + decode reads: q, each sequence's new K/V row, its slot, the block table and
    seq_lens; ``fill`` rewrites them in place between replays."""

    batch, hq, hkv, d, page, max_pages = 3, 16, 4, 128, 16, 40

    def __init__(self, gen: torch.Generator):
        dev, dt = "cuda", torch.bfloat16
        self.gen = gen
        self.num_pages = self.batch * self.max_pages
        self.k_cache = randn(self.num_pages, self.page, self.hkv, self.d, gen=gen, dtype=dt, device=dev)
        self.v_cache = randn(self.num_pages, self.page, self.hkv, self.d, gen=gen, dtype=dt, device=dev)
        self.q = torch.empty(self.batch, self.hq, self.d, dtype=dt, device=dev)
        self.k_new = torch.empty(self.batch, self.hkv, self.d, dtype=dt, device=dev)
        self.v_new = torch.empty_like(self.k_new)
        self.slots = torch.empty(self.batch, dtype=torch.int64, device=dev)
        self.block_table = torch.empty(self.batch, self.max_pages, dtype=torch.int32, device=dev)
        self.seq_lens = torch.empty(self.batch, dtype=torch.int32, device=dev)

    def fill(self, lens) -> None:
        _fill_tables(self.block_table, self.seq_lens, lens, self.num_pages, self.page, self.gen, self.slots)
        _fill_random(self.gen, self.q, self.k_new, self.v_new)

    def decode_args(self) -> tuple:
        """q, the caches, block table and seq_lens: a decode op's leading arguments."""
        return self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens

    def append(self) -> None:
        kvcore.append_paged_kv(self.k_new, self.v_new, self.k_cache, self.v_cache, self.slots)

    def reference_append(self):
        """The caches as the reference appends this step's rows to them (computed before a replay)."""
        return reference.append_paged_kv(self.k_new, self.v_new, self.k_cache, self.v_cache, self.slots)


def test_decode_step_graph_replay(gen):
    s = AppendDecodeStep(gen)
    out = torch.empty(s.batch, s.hq, s.d, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(s.batch, s.hq, dtype=torch.float32, device="cuda")
    workspace = torch.zeros(kvcore.ops.DECODE_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")

    def step():
        s.append()
        kvcore.gqa_decode(*s.decode_args(), out=out, lse=lse, workspace=workspace)

    s.fill([600, 1, 37])
    graph = capture_graph(step)  # warm-up, then capture

    for lens in ([640, 5, 100], [1, 600, 2], [320, 320, 320]):
        s.fill(lens)
        k_ref, v_ref = s.reference_append()
        _replay(graph, out, lse)
        assert torch.equal(s.k_cache, k_ref) and torch.equal(s.v_cache, v_ref)
        ref_out, ref_lse = reference.gqa_decode(*s.decode_args())
        assert_out_lse_close(out, lse, ref_out, ref_lse, torch.bfloat16)


# ---- H2O's per-step scores: attention_scores with w = 1 --------------------------------------


@pytest.mark.skipif(not torch._C._dispatch_has_kernel_for_dispatch_key("kvcore::attention_scores", "CUDA"),
                    reason="no CUDA kernel registered for kvcore::attention_scores")
def test_h2o_step_scores_graph_replay(gen):
    """attention_scores of the step's query (w = 1, the H2O accumulation step) captured once; the
    op sizes its key split from shapes alone and takes its workspace from the caching allocator
    (the graph's pool), so replays follow new seq_lens, block tables and queries."""
    batch, hq, hkv, d, page, max_pages = 3, 16, 4, 128, 16, 40
    num_pages = batch * max_pages
    dev, dt = "cuda", torch.bfloat16
    k_cache = randn(num_pages, page, hkv, d, gen=gen, dtype=dt, device=dev)
    q = torch.empty(batch, 1, hq, d, dtype=dt, device=dev)
    block_table = torch.empty(batch, max_pages, dtype=torch.int32, device=dev)
    seq_lens = torch.empty(batch, dtype=torch.int32, device=dev)
    scores = torch.empty(batch, hkv, max_pages * page, device=dev)
    acc = torch.zeros_like(scores)

    def fill(lens):
        _fill_tables(block_table, seq_lens, lens, num_pages, page, gen)
        _fill_random(gen, q)

    def step():
        kvcore.attention_scores(q, k_cache, block_table, seq_lens, reduction="sum", out=scores)
        acc.add_(scores)

    fill([600, 1, 37])
    graph = capture_graph(step)  # warm-up, then capture

    for lens in ([640, 5, 100], [1, 600, 0], [320, 320, 320]):
        fill(lens)
        acc.zero_()
        _replay(graph, scores)
        ref = reference.attention_scores(q, k_cache, block_table, seq_lens, reduction="sum",
                                         max_len=max_pages * page)
        torch.testing.assert_close(scores.double(), ref, atol=2e-3 * (hq // hkv), rtol=1e-3)
        torch.testing.assert_close(acc, scores)


# ---- block-sparse decode step ----------------------------------------------------------------


@pytest.mark.parametrize("num_splits", [0, 1, 4], ids=lambda n: f"splits{n}")
def test_block_sparse_decode_step_graph_replay(num_splits, gen):
    """append + block_sparse_decode captured once; each replay gets new seq_lens, block tables,
    selections (rewritten in place, counts included) and q/k/v, and must give exactly what the
    same call gives eagerly (and the reference, within tolerance)."""
    s = AppendDecodeStep(gen)
    batch, hq, hkv, page, max_sel = s.batch, s.hq, s.hkv, s.page, 24
    sel_pages = torch.empty(batch, hkv, max_sel, dtype=torch.int32, device="cuda")
    sel_counts = torch.empty(batch, hkv, dtype=torch.int32, device="cuda")
    out = torch.empty(batch, hq, s.d, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(batch, hq, dtype=torch.float32, device="cuda")
    workspace = torch.zeros(kvcore.ops.DECODE_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")

    def fill(lens, empty_pair=None):
        s.fill(lens)
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
        s.append()
        kvcore.block_sparse_decode(*s.decode_args(), sel_pages, sel_counts, out=out, lse=lse, workspace=workspace,
                                   num_splits=num_splits)

    fill([600, 1, 37])
    graph = capture_graph(step)  # warm-up, then capture

    for lens, empty_pair in (([640, 5, 100], None), ([1, 600, 2], (1, 2)), ([320, 320, 320], (0, 0)),
                             ([640, 640, 640], None)):
        fill(lens, empty_pair)
        k_ref, v_ref = s.reference_append()
        _replay(graph, out, lse)
        assert torch.equal(s.k_cache, k_ref) and torch.equal(s.v_cache, v_ref)
        # Eagerly, on the appended cache (appending the same rows again changes nothing).
        eager_out, eager_lse = kvcore.block_sparse_decode(*s.decode_args(), sel_pages, sel_counts, return_lse=True,
                                                          workspace=workspace, num_splits=num_splits)
        assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse), f"replay differs from eager for {lens}"
        ref_out, ref_lse = reference.block_sparse_decode(*s.decode_args(), sel_pages, sel_counts)
        assert_out_lse_close(out, lse, ref_out, ref_lse, torch.bfloat16)
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
        _fill_random(gen, q_store, kv_store)
        lens = torch.randint(0, length + 1, (blocks,), generator=gen, dtype=torch.int32)
        lens[: len(special)] = torch.tensor(special, dtype=torch.int32)
        block_lens.copy_(lens)

    fill([length])
    graph = capture_graph(lambda: kvcore.token_decoder_attention(q, k, v, block_lens, out=out, lse=lse))

    for special in ([0, length, 1], [length] * blocks, [0] * blocks, [3, 0, length - 1]):
        fill(special)
        _replay(graph, out, lse)
        eager_out, eager_lse = kvcore.token_decoder_attention(q, k, v, block_lens, return_lse=True)
        assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse), f"replay differs from eager ({special[:3]})"
        ref_out, ref_lse = reference.token_decoder_attention(q, k, v, block_lens)
        assert_out_lse_close(out, lse, ref_out, ref_lse, torch.bfloat16)
        pad = torch.arange(length, device=dev)[None, :] >= block_lens.long()[:, None]
        assert bool((out[pad] == 0).all()) and bool(torch.isneginf(lse[pad]).all())


def test_unit_scores_and_topk_graph_replay(gen):
    """InfLLM unit selection (infllm_unit_scores + topk_rows) captured once; each replay scores
    a new query against new representative keys and must equal the reference."""
    batch, hq, hkv, d, units, k = 2, 32, 8, 128, 3000, 16
    dev, dt = "cuda", torch.bfloat16
    q = torch.empty(batch, hq, d, dtype=dt, device=dev)
    keys = torch.empty(batch, units, hkv, d, dtype=dt, device=dev)
    scores = torch.empty(batch, units, dtype=torch.float32, device=dev)
    per_head = torch.empty(batch, hkv, units, dtype=torch.float32, device=dev)
    values = torch.empty(batch, k, dtype=torch.float32, device=dev)
    indices = torch.empty(batch, k, dtype=torch.int64, device=dev)
    head_values = torch.empty(batch * hkv, k, dtype=torch.float32, device=dev)
    head_indices = torch.empty(batch * hkv, k, dtype=torch.int32, device=dev)

    def step():
        kvcore.infllm_unit_scores(q, keys, out=scores)
        kvcore.topk_rows(scores, k, values=values, indices=indices)
        kvcore.infllm_unit_scores(q, keys, per_kv_head=True, out=per_head)
        kvcore.topk_rows(per_head.view(batch * hkv, units), k, values=head_values, indices=head_indices)

    _fill_random(gen, q, keys)
    graph = capture_graph(step)  # warm-up, then capture
    for _ in range(3):
        _fill_random(gen, q, keys)
        _replay(graph, scores, per_head, values, head_values)
        want = reference.infllm_unit_scores(q, keys, per_kv_head=True)
        torch.testing.assert_close(per_head.double(), want, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(scores.double(), want.sum(dim=1), atol=1e-3, rtol=1e-4)
        # the top-k is exact on the scores the kernel produced
        ref_v, ref_i = reference.topk_rows(scores, k)
        assert torch.equal(indices.cpu(), ref_i.cpu()) and torch.equal(values.cpu(), ref_v.cpu())
        ref_v, ref_i = reference.topk_rows(per_head.view(batch * hkv, units), k)
        assert torch.equal(head_indices.cpu().long(), ref_i.cpu()) and torch.equal(head_values.cpu(), ref_v.cpu())


# ---- MLA decode --------------------------------------------------------------------------------


@pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("kvcore::mla_decode", "CUDA"),
    reason="the mla_decode CUDA kernel is not built",
)
@pytest.mark.parametrize(("heads", "num_splits"), [(16, 0), (128, 0), (16, 5)], ids=["H16", "H128", "H16-splits5"])
def test_mla_decode_graph_replay_equals_eager(heads, num_splits, gen):
    """mla_decode captured once (the split count comes from shapes, never from seq_lens); each
    replay gets new seq_lens (0, 1, partial and full pages, the whole table), block tables and
    q, and must give exactly what the same call gives eagerly, and the reference within tolerance."""
    batch, dk, dv, page, max_pages = 4, 576, 512, 32, 40
    num_pages = batch * max_pages + 3
    dev, dt = "cuda", torch.bfloat16
    cache = randn(num_pages, page, dk, gen=gen, dtype=dt, device=dev)
    q = torch.empty(batch, heads, dk, dtype=dt, device=dev)
    block_table = torch.empty(batch, max_pages, dtype=torch.int32, device=dev)
    seq_lens = torch.empty(batch, dtype=torch.int32, device=dev)
    out = torch.empty(batch, heads, dv, dtype=dt, device=dev)
    lse = torch.empty(batch, heads, dtype=torch.float32, device=dev)
    workspace = torch.zeros(kvcore.ops.DECODE_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
    scale = 192**-0.5

    def fill(lens):
        _fill_tables(block_table, seq_lens, lens, num_pages, page, gen)
        _fill_random(gen, q)

    def step(o, l):
        kvcore.mla_decode(q, cache, block_table, seq_lens, scale=scale, out=o, lse=l, workspace=workspace,
                          num_splits=num_splits)

    fill([600, 1, 37, 0])
    graph = capture_graph(lambda: step(out, lse))  # warm-up, then capture

    for lens in ([640, 5, 100, 1], [1, max_pages * page, 0, 2], [320, 320, 33, 32], [0, 0, 0, 0]):
        fill(lens)
        _replay(graph, out, lse)
        eager_out = torch.full_like(out, float("nan"))
        eager_lse = torch.full_like(lse, float("nan"))
        step(eager_out, eager_lse)
        torch.cuda.synchronize()
        assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse), f"replay differs from eager ({lens})"
        ref_out, ref_lse = reference.mla_decode(q, cache, block_table, seq_lens, scale, dv)
        assert_out_lse_close(out, lse, ref_out, ref_lse, torch.bfloat16)


# ---- MLA decode step: latent projection (+ absorbed decode) ----------------------------------


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"kvcore::{op}", "CUDA")


@pytest.mark.skipif(not _has_cuda_kernel("mla_latent_project"), reason="mla_latent_project has no CUDA kernel yet")
@pytest.mark.parametrize("batch", [1, 6])
def test_mla_decode_step_graph_replay(batch, gen):
    """mla_latent_project of each sequence's new token into the latent cache, then mla_decode over
    it (when that op's CUDA kernel is built), captured once and replayed with new hidden states,
    positions, slots, block tables and seq_lens: each replay matches the reference of the same step."""
    d_model, rank, rope, heads, page, max_pages = 7168, 512, 64, 16, 16, 12
    width = rank + rope
    num_pages = batch * max_pages
    dev, dt = "cuda", torch.bfloat16
    w_dkv = randn(d_model, width, gen=gen, dtype=dt, device=dev, scale=d_model**-0.5)
    norm_weight = (1.0 + 0.2 * randn(rank, gen=gen)).to(device=dev, dtype=dt)
    cos_sin = reference.rope_cos_sin(max_pages * page, rope).to(dev)
    latent = randn(num_pages, page, width, gen=gen, dtype=dt, device=dev)
    # static buffers the graph reads; their contents change between replays
    hidden = torch.empty(batch, d_model, dtype=dt, device=dev)
    positions = torch.empty(batch, dtype=torch.int64, device=dev)
    slots = torch.empty(batch, dtype=torch.int64, device=dev)
    block_table = torch.empty(batch, max_pages, dtype=torch.int32, device=dev)
    seq_lens = torch.empty(batch, dtype=torch.int32, device=dev)
    q = torch.empty(batch, heads, width, dtype=dt, device=dev)
    c_kv = torch.empty(batch, rank, dtype=dt, device=dev)
    k_pe = torch.empty(batch, rope, dtype=dt, device=dev)
    out = torch.empty(batch, heads, rank, dtype=dt, device=dev)
    lse = torch.empty(batch, heads, dtype=torch.float32, device=dev)
    workspace = torch.zeros(kvcore.ops.DECODE_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
    with_decode = _has_cuda_kernel("mla_decode")
    scale = 192**-0.5

    def fill(lens):
        positions.copy_(_fill_tables(block_table, seq_lens, lens, num_pages, page, gen, slots))
        _fill_random(gen, hidden, q)

    def step():
        kvcore.mla_latent_project(hidden, w_dkv, norm_weight, cos_sin, positions, latent, slots, c_kv_out=c_kv,
                                  k_pe_out=k_pe)
        if with_decode:
            kvcore.mla_decode(q, latent, block_table, seq_lens, scale=scale, out=out, lse=lse, workspace=workspace)

    lens_list = [[150, 1, 37, 192, 16, 17][:batch], [1, 192, 2, 64, 100, 5][:batch], [96] * batch]
    fill(lens_list[0])
    graph = capture_graph(step)  # warm-up, then capture

    for lens in lens_list:
        fill(lens)
        ref_latent, ref_c, ref_pe = reference.mla_latent_project(hidden, w_dkv, norm_weight, 1e-6, cos_sin, positions,
                                                                 latent, slots, True)
        _replay(graph, c_kv, k_pe, out, lse)
        torch.testing.assert_close(latent.float(), ref_latent.float(), atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(c_kv.float(), ref_c, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(k_pe.float(), ref_pe, atol=2e-2, rtol=1e-2)
        if with_decode:
            ref_out, ref_lse = reference.mla_decode(q, latent, block_table, seq_lens, scale, rank)
            assert_out_lse_close(out, lse, ref_out, ref_lse, torch.bfloat16)


def test_decode_step_with_h2o_score_graph_replay(gen):
    """append + gqa_decode(score=...) captured once: every replay adds that step's probabilities
    (the reference's) to the score buffer, with the workspace and score preallocated."""
    s = AppendDecodeStep(gen)
    out = torch.empty(s.batch, s.hq, s.d, dtype=torch.bfloat16, device="cuda")
    score = torch.zeros(s.batch, s.hkv, s.max_pages * s.page, dtype=torch.float32, device="cuda")
    workspace = torch.zeros(kvcore.ops.decode_score_workspace_bytes(s.batch, s.hq, s.max_pages, s.page),
                            dtype=torch.uint8, device="cuda")

    def step():
        s.append()
        kvcore.gqa_decode(*s.decode_args(), out=out, workspace=workspace, score=score)

    s.fill([600, 1, 37])
    graph = capture_graph(step)  # warm-up, then capture

    for lens in ([640, 5, 100], [1, 600, 2], [320, 320, 320]):
        s.fill(lens)
        before = score.clone()
        _replay(graph, out)
        add = reference.gqa_decode_score(s.q, s.k_cache, s.block_table, s.seq_lens, score_len=score.shape[2])
        torch.testing.assert_close(score.double() - before.double(), add, atol=1e-5, rtol=2e-3)
        ref_out, _ = reference.gqa_decode(*s.decode_args())
        torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=1e-2)
