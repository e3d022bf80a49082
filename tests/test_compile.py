"""torch.compile(fullgraph=True) of a decode step (append + gqa_decode) that uses kvcore's ops, of one
with gqa_decode's plan_seq_lens hint, and of InfLLM's retrieval step (infllm_unit_scores + topk_rows).

fullgraph=True fails on any graph break, so this checks that the wrappers trace (validation is
skipped under compile) and that the ops' schemas and fakes let the compiler handle the
in-place outputs; the compiled step must match the reference.
"""

from __future__ import annotations

import torch

import kvcore
from conftest import make_paged_kv, poison, randn
from kvcore import reference


def _step(q, k_new, v_new, k_cache, v_cache, slots, block_table, seq_lens, out, lse):
    kvcore.append_paged_kv(k_new, v_new, k_cache, v_cache, slots)
    kvcore.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, out=out, lse=lse)
    return out.float() * 2.0  # something after the op, so the compiled graph reads its result


def test_decode_step_compiles_fullgraph(device, gen):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [100, 37, 1]
    kv = make_paged_kv(lens, 16, 2, 64, gen=gen, dtype=dtype, device=device)
    q = randn(3, 8, 64, gen=gen, dtype=dtype, device=device)
    k_new = randn(3, 2, 64, gen=gen, dtype=dtype, device=device)
    v_new = randn(3, 2, 64, gen=gen, dtype=dtype, device=device)
    # the new token of each sequence is its last one
    last = torch.tensor(lens) - 1
    pages = kv.block_table.cpu().long().gather(1, (last // 16).unsqueeze(1)).squeeze(1)
    slots = (pages * 16 + last % 16).to(device)
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(3, 8, device=device))

    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True)
    result = compiled(q, k_new, v_new, kv.k_cache, kv.v_cache, slots, kv.block_table, kv.seq_lens, out, lse)

    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    tol = dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result / 2.0, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)
    assert torch.equal(kv.k_cache[pages[0], last[0] % 16].cpu(), k_new[0].cpu())


def _hinted_step(q, k_cache, v_cache, block_table, seq_lens, out, hint):
    kvcore.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, out=out, plan_seq_lens=hint)
    return out.float() * 2.0


def test_decode_with_plan_seq_lens_compiles_once(device, gen):
    """plan_seq_lens (a list or a CPU tensor of host lengths) is not read under compile: the step
    traces with fullgraph=True and new lengths every step cause no recompile (reading them would
    specialise the graph on each batch's values, past dynamo's recompile limit within ~8 steps)."""
    import torch._dynamo.utils as dynamo_utils

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lens = [100, 37, 1]
    kv = make_paged_kv(lens, 16, 2, 64, gen=gen, dtype=dtype, device=device)
    q = randn(3, 8, 64, gen=gen, dtype=dtype, device=device)
    out = poison(torch.empty_like(q))
    ref_out, _ = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    tol = dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    for as_tensor in (False, True):
        torch._dynamo.reset()
        dynamo_utils.counters.clear()
        compiled = torch.compile(_hinted_step, fullgraph=True)
        for i in range(12):
            hint = [100 - i, 37 + i, 1 + i]
            result = compiled(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out,
                              torch.tensor(hint) if as_tensor else hint)
            torch.testing.assert_close(result / 2.0, ref_out, **tol)
        assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


def _retrieve(q, repr_keys, k, per_kv_head):
    scores = kvcore.infllm_unit_scores(q, repr_keys, per_kv_head=per_kv_head)  # allocates its output
    values, indices = kvcore.topk_rows(scores.reshape(-1, scores.shape[-1]), k)
    return values * 1.0, indices  # something after the op, so the compiled graph reads its result


def test_retrieval_step_compiles_fullgraph(device, gen):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = randn(2, 8, 64, gen=gen, dtype=dtype, device=device)
    keys = randn(2, 40, 2, 64, gen=gen, dtype=dtype, device=device)[:, :37]  # the live units of a larger buffer
    torch._dynamo.reset()
    compiled = torch.compile(_retrieve, fullgraph=True)
    for per_kv_head in (False, True):
        values, indices = compiled(q, keys, 5, per_kv_head)
        want_v, want_i = _retrieve(q, keys, 5, per_kv_head)  # eager: the same kernels, so exactly equal
        assert torch.equal(indices, want_i) and torch.equal(values, want_v)
        ref_v, _ = reference.topk_rows(reference.infllm_unit_scores(q, keys, per_kv_head=per_kv_head)
                                       .reshape(-1, 37).float(), 5)
        torch.testing.assert_close(values.cpu(), ref_v.cpu(), atol=1e-3, rtol=1e-4)
