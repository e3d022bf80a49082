"""InfLLM retrieval (kvcore.retrieval): scoring pieces against reference.py, the cache against full
attention, offload / reload, the cache policies, Quest's bounds, and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import OUT_TOL, randn

from kvcore import reference as ref
from kvcore import retrieval as R

# Small geometry: sinks that end mid-page (n_init 5 < block 8), units of 8 tokens, a 16-token
# window, execution blocks of 12 (not a multiple of the block).
GEOM = dict(block_size=8, n_init=5, n_local=16, exc_block_size=12, repr_topk=3)
# D = 64: the CUDA decode kernels take head dims 64, 128 and 256.
B, HQ, HKV, D = 2, 4, 2, 64


def _tol(dtype):
    return OUT_TOL[dtype] if dtype != torch.float32 else dict(atol=2e-4, rtol=2e-4)


def _inputs(n, gen, dtype, device):
    q = randn(B, n, HQ, D, gen=gen, dtype=dtype, device=device)
    k = randn(B, n, HKV, D, gen=gen, dtype=dtype, device=device)
    v = randn(B, n, HKV, D, gen=gen, dtype=dtype, device=device)
    return q, k, v


def _full(q, k, v, upto, scale):
    """fp64 attention of query ``q [B, Hq, D]`` over tokens ``0 .. upto - 1`` of ``k, v``."""
    return torch.stack([ref.dense_attention(q[b], k[b, :upto], v[b, :upto], scale)[0] for b in range(q.shape[0])])


@pytest.mark.parametrize("per_kv_head,strategy,repr_score", [
    (False, "lru", "logit"), (True, "decay", "prob"),
])
def test_all_units_selected_equals_full_attention(device, dtype, gen, per_kv_head, strategy, repr_score):
    """topk >= units, all resident: prefill (chunked) and decode equal full causal attention
    over every token at its own (post-RoPE) position."""
    n_pre, n_dec = 61, 7
    q, k, v = _inputs(n_pre + n_dec, gen, dtype, device)
    cache = R.InfLLMCache(B, HQ, HKV, D, n_pre + n_dec, dtype=dtype, device=device, topk=16, max_cached_block=32,
                          per_kv_head=per_kv_head, cache_strategy=strategy, repr_score=repr_score, **GEOM)
    out = cache.prefill(q[:, :n_pre], k[:, :n_pre], v[:, :n_pre])
    assert cache.num_units >= 4  # retrieval is really exercised
    for t in (0, 4, 5, 17, 40, n_pre - 1):
        torch.testing.assert_close(out[:, t].double(), _full(q[:, t], k, v, t + 1, cache.scale), **_tol(dtype))
    for i in range(n_dec):
        t = n_pre + i
        o = cache.decode(q[:, t], k[:, t], v[:, t])
        assert o.dtype == dtype and o.shape == (B, HQ, D)
        torch.testing.assert_close(o.double(), _full(q[:, t], k, v, t + 1, cache.scale), **_tol(dtype))
    assert cache.length == n_pre + n_dec
    assert cache.n_local <= cache.num_recent < cache.n_local + cache.block_size


def test_decode_only_from_empty_equals_full_attention(device, gen):
    """Decode from the first token (sinks filling, window filling, units forming one by one)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    n = 45
    q, k, v = _inputs(n, gen, dtype, device)
    cache = R.InfLLMCache(B, HQ, HKV, D, n, dtype=dtype, device=device, topk=8, max_cached_block=8, **GEOM)
    for t in range(n):
        o = cache.decode(q[:, t], k[:, t], v[:, t])
        torch.testing.assert_close(o.double(), _full(q[:, t], k, v, t + 1, cache.scale), **_tol(dtype))
    assert cache.num_units == 3


@pytest.mark.parametrize("n_init", [5, 8])  # 8: whole sink pages, so the one-call (fused) step runs
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_topk_subset_attends_to_exactly_the_selected_units(device, gen, per_kv_head, n_init):
    """topk < units: the step equals attention over sinks + recent + the reference's top units."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    n = 90
    q, k, v = _inputs(n + 1, gen, dtype, device)
    cache = R.InfLLMCache(B, HQ, HKV, D, n + 1, dtype=dtype, device=device, topk=2,
                          max_cached_block=4, per_kv_head=per_kv_head, **{**GEOM, "n_init": n_init})
    cache.prefill(q[:, :n], k[:, :n], v[:, :n])
    units = cache.num_units
    assert units > 2
    s = ref.infllm_unit_scores(q[:, n], cache.repr_keys[:, :units], per_kv_head=True)  # [B, Hkv, U]
    if not per_kv_head:
        s = s.sum(dim=1, keepdim=True).expand(-1, HKV, -1)
    o = cache.decode(q[:, n], k[:, n], v[:, n])
    bs, n_init = cache.block_size, cache.n_init
    recent = range(n_init + units * bs, n + 1)
    for b in range(B):
        for h in range(HKV):
            top = s[b, h].topk(2).indices.tolist()
            pos = list(range(n_init)) + [n_init + u * bs + i for u in sorted(top) for i in range(bs)] + list(recent)
            pos = torch.tensor(pos)
            heads = slice(h * (HQ // HKV), (h + 1) * (HQ // HKV))
            want, _ = ref.dense_attention(q[b, n, heads], k[b, pos, h : h + 1], v[b, pos, h : h + 1], cache.scale)
            torch.testing.assert_close(o[b, heads].double(), want, **_tol(dtype))


def test_offload_and_reload_round_trip_exactly(device, gen):
    dtype = torch.bfloat16
    n = 69
    q, k, v = _inputs(n, gen, dtype, device)
    cache = R.InfLLMCache(B, HQ, HKV, D, n, dtype=dtype, device=device, topk=1, max_cached_block=2, **GEOM)
    cache.prefill(q, k, v)
    units = cache.num_units
    assert units >= 4
    bs, n_init = cache.block_size, cache.n_init
    for b in range(B):
        for u in [0, 1, 2, 3, 0, 2]:  # 0 and 2 are evicted and reloaded on the way
            (slot,) = cache.fetch(b, [u])
            cache.wait_loads()
            kk, vv = cache.slot_kv(b, slot)
            span = slice(n_init + u * bs, n_init + (u + 1) * bs)
            assert torch.equal(kk, k[b, span]) and torch.equal(vv, v[b, span])
            assert torch.equal(cache.store_k[b, u], k[b, span].cpu())


def _cache_with_units(device, gen, n_units, **kw):
    n = GEOM["n_init"] + GEOM["n_local"] + GEOM["block_size"] * n_units
    q, k, v = _inputs(n, gen, torch.float32 if device == "cpu" else torch.bfloat16, device)
    # One execution block for the whole prefill: no unit exists before it, so none is fetched.
    cache = R.InfLLMCache(B, HQ, HKV, D, n, dtype=q.dtype, device=device, **{**GEOM, "exc_block_size": n, **kw})
    cache.prefill(q, k, v)
    assert cache.num_units == n_units
    return cache


def test_lru_evicts_the_least_recently_used(device, gen):
    cache = _cache_with_units(device, gen, 5, topk=1, max_cached_block=3)
    assert cache.resident_units(0) == {} and cache.misses == 0  # one execution block: nothing fetched yet
    for u in (0, 1, 2, 0):
        cache.fetch(0, [u])
    cache.fetch(0, [3])  # 1 is the least recently used
    assert set(cache.resident_units(0)) == {0, 2, 3}
    cache.fetch(0, [4, 2])  # 0 is now oldest; 2 is needed by this step
    assert set(cache.resident_units(0)) == {2, 3, 4}
    assert cache.resident_units(1) == {}  # sequences have their own caches
    assert (cache.hits, cache.misses) == (2, 5)
    # A unit reused keeps its slot.
    slot = cache.resident_units(0)[3]
    assert cache.fetch(0, [3]) == [slot]


def test_decayed_score_keeps_frequently_used_units(device, gen):
    lru = _cache_with_units(device, gen, 4, topk=1, max_cached_block=3)
    dec = _cache_with_units(device, gen, 4, topk=1, max_cached_block=3, cache_strategy="decay", score_decay=0.9)
    for c in (lru, dec):
        for u in (0, 0, 0, 0, 0, 1, 2, 3):
            c.fetch(0, [u])
    # Scores before unit 3 arrives: 0 -> 3.317, 1 -> 0.9, 2 -> 1.0; decayed once more: 1 is lowest.
    assert set(lru.resident_units(0)) == {1, 2, 3}
    assert set(dec.resident_units(0)) == {0, 2, 3}


def test_representative_keys_accumulate_the_paper_score(device, gen):
    """repr_score "logit": a token's score is the mean of q . k (summed over its group's heads)
    over the queries that saw it before its unit formed, its own query included."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    n_init, bs, n_local = GEOM["n_init"], GEOM["block_size"], GEOM["n_local"]
    n = n_init + bs + n_local  # unit 0 forms after the last of these decode steps
    q, k, v = _inputs(n, gen, dtype, device)
    cache = R.InfLLMCache(B, HQ, HKV, D, n, dtype=dtype, device=device, topk=1, max_cached_block=2, **GEOM)
    for t in range(n):
        cache.decode(q[:, t], k[:, t], v[:, t])
    assert cache.num_units == 1
    g = HQ // HKV
    scores = torch.zeros(B, 1, bs, HKV, dtype=torch.float64)
    for i in range(bs):
        m = n_init + i
        qs = q[:, m:n].double().view(B, n - m, HKV, g, D).sum(dim=3)  # [B, P, Hkv, D]
        scores[:, 0, i] = torch.einsum("bphd,bhd->bph", qs.cpu(), k[:, m].double().cpu()).mean(dim=1)
    want = ref.infllm_representative_keys(k[:, None, n_init : n_init + bs].cpu(), scores, cache.repr_topk)
    torch.testing.assert_close(cache.repr_keys[:, 0].double().cpu(), want[:, 0], **_tol(dtype))


def test_representative_keys_and_unit_scores_match_reference(device, gen):
    keys = randn(2, 5, 8, 3, 16, gen=gen, device=device)
    scores = randn(2, 5, 8, 3, gen=gen, device=device)
    got = R.representative_keys(keys, scores, 4)
    torch.testing.assert_close(got.double(), ref.infllm_representative_keys(keys, scores, 4), atol=1e-6, rtol=1e-6)
    rk = randn(2, 37, 3, 16, gen=gen, device=device)
    for q in (randn(2, 6, 16, gen=gen, device=device), randn(2, 5, 6, 16, gen=gen, device=device)):
        for per in (False, True):
            got = R.unit_scores(q, rk, per_kv_head=per)
            want = ref.infllm_unit_scores(q, rk, per_kv_head=per)
            assert got.dtype == torch.float32 and got.shape == want.shape
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape,k", [((3, 2, 1000), 16), ((2, 65536), 64), ((1, 7), 7)])
def test_topk_units_returns_the_top_set(device, gen, shape, k):
    scores = randn(*shape, gen=gen, device=device)
    scores.view(-1, shape[-1])[:, :40] = 0.5  # ties across the cut in some rows
    values, idx = R.topk_units(scores, k)
    assert idx.shape == (*shape[:-1], k) and idx.dtype == torch.int64
    assert bool((values[..., 1:] <= values[..., :-1]).all())  # best first
    assert torch.equal(scores.gather(-1, idx), values)
    flat_scores = scores.reshape(-1, shape[-1]).double().cpu()
    for r, (row_idx, (above, kth)) in enumerate(zip(idx.reshape(-1, k).tolist(), ref.topk_set(scores, k))):
        assert above <= set(row_idx) and len(set(row_idx)) == k  # every strictly better unit
        assert all(float(flat_scores[r, i]) == kth for i in set(row_idx) - above)  # the rest tie the k-th


def test_quest_bounds_follow_appends(device, gen):
    num_pages, ps = 7, 4
    k_cache = randn(num_pages, ps, HKV, D, gen=gen, device=device)
    block_table = torch.tensor([[3, 0, 5, 1], [6, 2, 4, 1]], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([13, 9], dtype=torch.int32, device=device)
    stats = R.QuestPageStats(num_pages, ps, HKV, D, device=device)
    # Append in two rounds (as decode would), slot = page * ps + offset.
    for lo, hi in ((0, 6), (6, 13)):
        for b in range(2):
            pos = torch.arange(lo, min(hi, int(seq_lens[b])), device=device)
            if not pos.numel():
                continue
            slots = block_table[b].long()[pos // ps] * ps + pos % ps
            stats.update(k_cache.view(-1, HKV, D)[slots], slots)
    q = randn(2, HQ, D, gen=gen, device=device)
    got = R.quest_page_scores(q, stats.kmin, stats.kmax, block_table, seq_lens, ps)
    want = ref.quest_page_scores(q, k_cache, block_table, seq_lens)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got.double()[fin], want[fin], atol=1e-4, rtol=1e-5)
    # The bound holds for every key of a page.
    for b in range(2):
        for j in range(-(-int(seq_lens[b]) // ps)):
            pos = torch.arange(j * ps, min((j + 1) * ps, int(seq_lens[b])))
            keys = ref.gather_paged(k_cache, block_table[b], pos).double()
            dots = torch.einsum("hd,lhd->lh", q[b].double(), keys.repeat_interleave(HQ // HKV, dim=1))
            per_kv = dots.view(-1, HKV, HQ // HKV).sum(-1)
            assert bool((per_kv.max(dim=0).values <= got[b, :, j].double() + 1e-4).all())
    stats.reset(torch.tensor([3]))
    assert bool(torch.isinf(stats.kmin[3]).all()) and bool((stats.kmax[3] < 0).all())


def test_bad_inputs_name_the_argument(gen):
    keys = randn(1, 2, 8, 2, 4, gen=gen)
    with pytest.raises(ValueError, match="repr_topk"):
        R.representative_keys(keys, randn(1, 2, 8, 2, gen=gen), 9)
    with pytest.raises(ValueError, match="token_scores"):
        R.representative_keys(keys, randn(1, 2, 8, gen=gen), 2)
    with pytest.raises(ValueError, match="multiple"):
        R.unit_scores(randn(1, 3, 4, gen=gen), randn(1, 5, 2, 4, gen=gen))
    with pytest.raises(ValueError, match="repr_keys"):
        R.unit_scores(randn(1, 4, 4, gen=gen), randn(5, 2, 4, gen=gen))
    with pytest.raises(ValueError, match="k must"):
        R.topk_units(randn(2, 5, gen=gen), 6)
    with pytest.raises(ValueError, match="scores"):
        R.topk_units(torch.arange(5), 2)
    for bad, name in ((dict(n_local=0), "n_local"), (dict(repr_topk=9), "repr_topk"), (dict(n_init=-1), "n_init"),
                      (dict(cache_strategy="fifo"), "cache_strategy"), (dict(repr_score="x"), "repr_score"),
                      (dict(topk=4, max_cached_block=3), "max_cached_block"),
                      (dict(per_kv_head=True, topk=2, max_cached_block=3), "max_cached_block"),
                      (dict(score_decay=1.5), "score_decay")):
        with pytest.raises(ValueError, match=name):
            R.InfLLMCache(B, HQ, HKV, D, 64, dtype=torch.float32, **{**GEOM, **bad})
    with pytest.raises(ValueError, match="num_q_heads"):
        R.InfLLMCache(B, 3, HKV, D, 64, dtype=torch.float32, **GEOM)
    cache = R.InfLLMCache(B, HQ, HKV, D, 40, dtype=torch.float32, topk=1, max_cached_block=2, **GEOM)
    with pytest.raises(ValueError, match="q must"):
        cache.decode(randn(B, HQ + 1, D, gen=gen), randn(B, HKV, D, gen=gen), randn(B, HKV, D, gen=gen))
    with pytest.raises(ValueError, match="v must"):
        cache.decode(randn(B, HQ, D, gen=gen), randn(B, HKV, D, gen=gen), randn(B, HKV, D + 1, gen=gen))
    with pytest.raises(ValueError, match="max_tokens"):
        cache.prefill(*_inputs(41, gen, torch.float32, "cpu"))
    assert cache.length == 0  # a refused call changes nothing
    cache.prefill(*_inputs(40, gen, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="unit 7"):
        cache.fetch(0, [7])
    with pytest.raises(ValueError, match="max_cached_block"):
        cache.fetch(0, [0, 1, 2])
    with pytest.raises(ValueError, match="b must"):
        cache.fetch(2, [0])
    with pytest.raises(ValueError, match="max_tokens"):
        cache.decode(*(t[:, 0] for t in _inputs(1, gen, torch.float32, "cpu")))
    stats = R.QuestPageStats(4, 4, HKV, D)
    with pytest.raises(ValueError, match="slot_mapping"):
        stats.update(randn(3, HKV, D, gen=gen), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_pages"):
        R.QuestPageStats(0, 4, HKV, D)


def test_loaded_memory_attend_and_reload(device, gen):
    """load_memory + attend: full attention over sinks + all units + window; after evicting
    units the step reloads them (misses counted) and gives the same result."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    bs, n_init, n_local, units = GEOM["block_size"], GEOM["n_init"], GEOM["n_local"], 6
    r = n_local + 3
    n = n_init + units * bs + r
    q, k, v = _inputs(n, gen, dtype, device)
    cache = R.InfLLMCache(B, HQ, HKV, D, n, dtype=dtype, device=device, topk=units, max_cached_block=units, **GEOM)
    unit_k = k[:, n_init : n - r].reshape(B, units, bs, HKV, D)
    unit_v = v[:, n_init : n - r].reshape(B, units, bs, HKV, D)
    reprs = R.representative_keys(unit_k, randn(B, units, bs, HKV, gen=gen, device=device), 2)
    cache.load_memory(k[:, :n_init], v[:, :n_init], unit_k, unit_v, reprs, k[:, n - r :], v[:, n - r :])
    assert (cache.length, cache.num_units, cache.num_recent) == (n, units, r)
    want = _full(q[:, -1], k, v, n, cache.scale)
    out, lse = cache.attend(q[:, -1])
    torch.testing.assert_close(out.double(), want, **_tol(dtype))
    assert cache.misses == B * units and lse.shape == (B, HQ)
    cache.evict(0, [1, 4])
    assert set(cache.resident_units(0)) == {0, 2, 3, 5}
    out2, _ = cache.attend(q[:, -1])
    assert cache.misses == B * units + 2 and cache.hits == B * units - 2
    torch.testing.assert_close(out2.double(), want, **_tol(dtype))
    with pytest.raises(ValueError, match="empty cache"):
        cache.load_memory(k[:, :n_init], v[:, :n_init], unit_k, unit_v, reprs, k[:, n - r :], v[:, n - r :])
    fresh = R.InfLLMCache(B, HQ, HKV, D, n, dtype=dtype, device=device, topk=1, max_cached_block=2, **GEOM)
    with pytest.raises(ValueError, match="recent_k"):
        fresh.load_memory(k[:, :n_init], v[:, :n_init], unit_k, unit_v, reprs, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="cache is empty"):
        fresh.attend(q[:, 0])


def test_quest_selection_drives_block_sparse_decode(device, gen):
    """Quest end to end: bounds kept on append, top pages + sinks + local, block_sparse_decode
    equals attention over exactly the tokens of the selected pages."""
    import kvcore

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    ps, n_pages, lens = 4, 20, [37, 22]
    k_cache = randn(n_pages, ps, HKV, D, gen=gen, dtype=dtype, device=device)
    v_cache = randn(n_pages, ps, HKV, D, gen=gen, dtype=dtype, device=device)
    block_table = torch.randperm(n_pages, generator=gen)[:20].view(2, 10).to(torch.int32).to(device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    stats = R.QuestPageStats(n_pages, ps, HKV, D, device=device)
    for b, n in enumerate(lens):
        pos = torch.arange(n, device=device)
        slots = block_table[b].long()[pos // ps] * ps + pos % ps
        stats.update(k_cache.view(-1, HKV, D)[slots], slots)
    q = randn(2, HQ, D, gen=gen, dtype=dtype, device=device)
    sel_pages, sel_counts = R.quest_selection(q, stats, block_table, seq_lens, 3, n_sink_pages=1, n_local_pages=1)
    scores = ref.quest_page_scores(q, k_cache, block_table, seq_lens)
    out = kvcore.block_sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel_pages, sel_counts)
    for b, n in enumerate(lens):
        last = -(-n // ps) - 1
        for h in range(HKV):
            got = set(sel_pages[b, h, : int(sel_counts[b, h])].tolist())
            above, kth = ref.topk_set(scores[b, h], 3)[0]
            top = set(range(last + 1)) & {j for j in range(10) if float(scores[b, h, j]) >= kth}
            assert above | {0, last} <= got <= top | {0, last}
            pos = torch.tensor([p for j in sorted(got) for p in range(j * ps, min((j + 1) * ps, n))])
            keys = ref.gather_paged(k_cache, block_table[b], pos)[:, h : h + 1]
            vals = ref.gather_paged(v_cache, block_table[b], pos)[:, h : h + 1]
            heads = slice(h * (HQ // HKV), (h + 1) * (HQ // HKV))
            want, _ = ref.dense_attention(q[b, heads], keys, vals)
            torch.testing.assert_close(out[b, heads].double(), want, **_tol(dtype))
    with pytest.raises(ValueError, match="topk"):
        R.quest_selection(q, stats, block_table, seq_lens, 0)


# ============================================================================================
# The retrieval ops (infllm_unit_scores, topk_rows) and the device-side step (issue 5)
# ============================================================================================

import kvcore  # noqa: E402
from conftest import HAS_CUDA, NO_CUDA_REASON, capture_graph, poison  # noqa: E402

# (B, Hq, Hkv, D, U): the heads, G = 1, MQA with D 256, U = 1, a unit narrower than a
# warp (Hkv 3 x D 32 = 12 vectors: two units per warp), and enough units for many CTAs per row.
# The CUDA op's flat kernel takes units of 2^n >= 32 vectors: Hkv 3 x D 128 (48 vectors) runs the
# general one, Hkv 64 x D 256 (2048 vectors, one unit per chunk) the flat one at its widest.
SCORE_GRID = [(1, 32, 8, 128, 1000), (3, 8, 8, 64, 37), (2, 4, 1, 256, 5), (2, 16, 2, 128, 1), (1, 6, 3, 32, 70),
              (2, 8, 2, 128, 5000), (1, 6, 3, 128, 300), (1, 64, 64, 256, 9)]
SCORE_TOL = dict(atol=1e-3, rtol=1e-4)  # fp32 accumulation of exact (dtype-rounded) inputs vs fp64


@pytest.mark.parametrize("b,hq,hkv,d,u", SCORE_GRID)
@pytest.mark.parametrize("per_kv_head", [False, True])
def test_unit_scores_op_matches_reference(device, dtype, gen, b, hq, hkv, d, u, per_kv_head):
    q = randn(b, hq, d, gen=gen, dtype=dtype, device=device)
    buf = randn(b, u + 3, hkv, d, gen=gen, dtype=dtype, device=device)
    keys = buf[:, :u]  # a slice of a larger buffer (the cache's layout): batch stride != U * Hkv * D
    want = ref.infllm_unit_scores(q, keys, per_kv_head=per_kv_head)
    out = poison(torch.empty(tuple(want.shape), dtype=torch.float32, device=device))
    got = kvcore.infllm_unit_scores(q, keys, per_kv_head=per_kv_head, out=out)
    assert got is out
    torch.testing.assert_close(got.double(), want, **SCORE_TOL)
    qf = randn(b, hq, d, gen=gen, device=device)  # a float32 query (a chunk's mean)
    torch.testing.assert_close(kvcore.infllm_unit_scores(qf, keys, per_kv_head=per_kv_head).double(),
                               ref.infllm_unit_scores(qf, keys, per_kv_head=per_kv_head), **SCORE_TOL)
    # retrieval.unit_scores (which now calls the op) keeps its definition, 4-D queries included
    q4 = randn(b, 3, hq, d, gen=gen, dtype=dtype, device=device)
    torch.testing.assert_close(R.unit_scores(q4, keys, per_kv_head=per_kv_head).double(),
                               ref.infllm_unit_scores(q4, keys, per_kv_head=per_kv_head), **SCORE_TOL)


def _topk_inputs(gen):
    """(name, scores [N, U] float32, k): random rows, heavy ties, -inf masks, NaN and signed
    zeros, fewer units than k, the issue's limits and past them, the largest k."""
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    masked = r(3, 500)
    masked[:, ::3] = -math.inf
    masked[1] = -math.inf  # a row with nothing selectable: the lowest indices, value -inf
    special = r(2, 40)
    special[0, [3, 9, 20]] = math.nan
    special[0, [4, 5]] = torch.tensor([-0.0, 0.0])
    special[1] = 0.0
    special[1, [1, 7]] = -0.0
    special[1, 30] = math.inf
    denormal = torch.tensor([[0.0, 1e-40, -1e-40, -0.0, 1e-45, -1e-45, 0.0, 1e-40, 2e-38, -2e-38]])
    nan_row = torch.full((1, 20), math.nan)
    nan_row[0, 17] = -math.inf
    return [
        ("random", r(5, 1000), 16),
        ("ties", torch.randint(0, 4, (3, 300), generator=gen).float(), 64),
        ("ties_small_k", torch.randint(0, 2, (2, 5000), generator=gen).float(), 3),
        ("masked", masked, 64),
        ("special", special, 12),
        ("nan_row", nan_row, 4),
        ("denormal", denormal, 10),  # distinct from 0 on every backend (flush-to-zero builds too)
        ("units_lt_k", r(3, 7), 16),
        ("one_unit", r(4, 1), 1),
        ("issue_limits", r(2, 65536), 64),
        ("held_in_registers", r(2, 8192), 16),  # the CUDA kernel holds 8192 keys per row in registers
        ("one_past_registers", r(2, 8193), 16),
        ("ascending", torch.arange(10000).float().view(1, -1), 32),  # the best keys in the last warps

        ("past_limits", r(1, 100003), 8),
        ("k256", r(2, 3000), 256),
        ("k_eq_u", r(2, 64), 64),
    ]


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_topk_rows_matches_reference_exactly(device, gen, index_dtype):
    for name, scores, k in _topk_inputs(gen):
        want_v, want_i = ref.topk_rows(scores, k)
        wide = torch.cat([scores, torch.randn(scores.shape[0], 5, generator=gen)], dim=1)
        for s in (scores.to(device), wide.to(device)[:, : scores.shape[1]]):  # dense and row-strided
            values = poison(torch.empty(scores.shape[0], k, device=device))
            indices = torch.full((scores.shape[0], k), 12345, dtype=index_dtype, device=device)
            v, i = kvcore.topk_rows(s, k, values=values, indices=indices)
            assert v is values and i is indices
            assert torch.equal(i.cpu().long(), want_i), name
            torch.testing.assert_close(v.cpu(), want_v, atol=0, rtol=0, equal_nan=True, msg=name)


def test_topk_rows_agrees_with_torch_topk_on_distinct_scores(device, gen):
    scores = torch.randn(6, 2049, generator=gen).to(device)
    v, i = kvcore.topk_rows(scores, 33)
    tv, ti = scores.topk(33, dim=-1)
    assert torch.equal(i, ti) and torch.equal(v, tv)
    v, i = R.topk_units(scores.view(2, 3, 2049), 5)  # the retrieval wrapper keeps leading dims
    assert i.shape == (2, 3, 5) and torch.equal(i.view(6, 5), ti[:, :5])


def test_retrieval_ops_bad_inputs_name_the_argument(device, gen):
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    q = randn(2, 8, 64, gen=gen, dtype=dt, device=device)
    keys = randn(2, 10, 2, 64, gen=gen, dtype=dt, device=device)
    with pytest.raises(RuntimeError, match="num_q_heads"):
        kvcore.infllm_unit_scores(q[:, :7], keys)
    with pytest.raises(RuntimeError, match="out must be"):
        kvcore.infllm_unit_scores(q, keys, out=torch.empty(2, 9, device=device))
    with pytest.raises(RuntimeError, match="out must have dtype"):
        kvcore.infllm_unit_scores(q, keys, out=torch.empty(2, 10, dtype=torch.float16, device=device))
    with pytest.raises(RuntimeError, match="q must have repr_keys' dtype"):
        kvcore.infllm_unit_scores(q.half() if dt != torch.float16 else q.bfloat16(), keys)
    with pytest.raises(RuntimeError, match="repr_keys' head_dim"):
        kvcore.infllm_unit_scores(q, keys[..., :32].contiguous())
    with pytest.raises(RuntimeError, match="repr_keys must be densely packed"):
        kvcore.infllm_unit_scores(q, keys.transpose(1, 2))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="head_dim must be a power of two"):
            kvcore.infllm_unit_scores(q[..., :48].contiguous(), keys[..., :48].contiguous())
    scores = randn(3, 50, gen=gen, device=device)
    for k in (0, 257, 2.0):
        with pytest.raises(ValueError, match="k must be"):
            kvcore.topk_rows(scores, k)
    with pytest.raises(RuntimeError, match="scores must have dtype"):
        kvcore.topk_rows(scores.half(), 4)
    with pytest.raises(RuntimeError, match="scores must be 2-D"):
        kvcore.topk_rows(scores[0], 4)
    with pytest.raises(RuntimeError, match="indices must have dtype"):
        kvcore.topk_rows(scores, 4, indices=torch.empty(3, 4, device=device))
    with pytest.raises(RuntimeError, match="values must be"):
        kvcore.topk_rows(scores, 4, values=torch.empty(2, 4, device=device))
    with pytest.raises(RuntimeError, match="scores' last dim must be contiguous"):
        kvcore.topk_rows(scores.t().contiguous().t(), 4)


_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck_retrieval_ops(device, gen):
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    q = randn(2, 8, 64, gen=gen, dtype=dt, device=device)
    keys = randn(2, 30, 2, 64, gen=gen, dtype=dt, device=device)
    for out in (torch.empty(2, 30, device=device), torch.empty(2, 2, 30, device=device)):
        torch.library.opcheck(torch.ops.kvcore.infllm_unit_scores.default, (q, keys, out), test_utils=_OPCHECK_UTILS)
    # a float32 query (a chunk's mean) with the cache's keys, sliced to the live units (batch-strided)
    qf = randn(2, 8, 64, gen=gen, device=device)
    torch.library.opcheck(torch.ops.kvcore.infllm_unit_scores.default,
                          (qf, keys[:, :17], torch.empty(2, 2, 17, device=device)), test_utils=_OPCHECK_UTILS)
    scores = randn(3, 100, gen=gen, device=device)
    for idt in (torch.int32, torch.int64):
        values, indices = torch.empty(3, 7, device=device), torch.empty(3, 7, dtype=idt, device=device)
        torch.library.opcheck(torch.ops.kvcore.topk_rows.default, (scores, values, indices),
                              test_utils=_OPCHECK_UTILS)
    # row-strided scores with fewer units than k (the padded slots are written too)
    values, indices = torch.empty(3, 7, device=device), torch.empty(3, 7, dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.kvcore.topk_rows.default, (scores[:, :5], values, indices),
                          test_utils=_OPCHECK_UTILS)


@pytest.mark.parametrize("n_init", [8, 5])
def test_fused_and_split_steps_equal_full_attention(device, gen, n_init):
    """Decode from empty with every unit selected: the one-call step (units + sinks + window in
    one block_sparse_decode; n_init 8 fills whole sink pages) and the split step (window by
    gqa_decode, merged) both equal full attention, through sinks filling, units forming and
    units being loaded (max_cached_block < units part of the way)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    n = 70
    q, k, v = _inputs(n, gen, dtype, device)
    geom = {**GEOM, "n_init": n_init}
    caches = []
    for fuse in (True, False):
        c = R.InfLLMCache(B, HQ, HKV, D, n, dtype=dtype, device=device, topk=8, max_cached_block=8, **geom)
        c.fuse_attention = fuse
        caches.append(c)
    for t in range(n):
        want = _full(q[:, t], k, v, t + 1, caches[0].scale)
        for c in caches:
            o = c.decode(q[:, t], k[:, t], v[:, t])
            torch.testing.assert_close(o.double(), want, **_tol(dtype))
    assert caches[0].num_units >= 5


@pytest.mark.parametrize("n_init", [8, 5])
def test_resident_step_uses_the_device_table(device, gen, n_init):
    """Every unit resident, topk < units: the step (no host round trip) attends to exactly the
    reference's top units, read through unit_slot_table, whatever slots they sit in."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    bs, n_local, units = GEOM["block_size"], GEOM["n_local"], 7
    r = n_local + 5
    n = n_init + units * bs + r
    q, k, v = _inputs(n, gen, dtype, device)
    cache = R.InfLLMCache(B, HQ, HKV, D, n, dtype=dtype, device=device, topk=3, max_cached_block=units,
                          **{**GEOM, "n_init": n_init})
    unit_k = k[:, n_init : n - r].reshape(B, units, bs, HKV, D)
    unit_v = v[:, n_init : n - r].reshape(B, units, bs, HKV, D)
    reprs = randn(B, units, HKV, D, gen=gen, dtype=dtype, device=device)
    cache.load_memory(k[:, :n_init], v[:, :n_init], unit_k, unit_v, reprs, k[:, n - r :], v[:, n - r :])
    for b in range(B):
        cache.fetch(b, list(range(units))[::-1] if b else list(range(units)))  # slot != unit for b = 1
    cache.wait_loads()
    table = cache.unit_slot_table[:, :units].cpu()
    for b in range(B):
        assert {u: int(table[b, u]) for u in range(units)} == cache.resident_units(b)
    hits = cache.hits
    out, _ = cache.attend(q[:, -1])
    assert cache.hits == hits + B * 3 and cache.misses == B * units
    s = ref.infllm_unit_scores(q[:, -1], reprs)  # [B, U]
    for b in range(B):
        top = sorted(s[b].topk(3).indices.tolist())
        pos = list(range(n_init)) + [n_init + u * bs + i for u in top for i in range(bs)] + list(range(n - r, n))
        pos = torch.tensor(pos)
        want = torch.stack([ref.dense_attention(q[b, -1, h * (HQ // HKV):(h + 1) * (HQ // HKV)], k[b, pos, h:h + 1],
                                                v[b, pos, h:h + 1], cache.scale)[0] for h in range(HKV)])
        torch.testing.assert_close(out[b].double(), want.reshape(HQ, D), **_tol(dtype))


# The GPU-resident step's tests: B2, Hq32/Hkv8/D128 bf16, 40 units of 128 tokens, all resident,
# sinks + a window of 256 + 17 tokens not yet in a unit; topk 16.
_RES = dict(bs=128, n_local=256, units=40, hq=32, hkv=8, d=128)


def _resident_cuda_cache(gen, n_init: int):
    """(cache, randn keyword arguments) for the resident-step tests: every unit loaded and resident."""
    bs, n_local, units, hq, hkv, d = (_RES[k] for k in ("bs", "n_local", "units", "hq", "hkv", "d"))
    dev, dtype = "cuda", torch.bfloat16
    r = n_local + 17
    n = n_init + units * bs + r
    kw = dict(gen=gen, dtype=dtype, device=dev)
    cache = R.InfLLMCache(2, hq, hkv, d, n + 1, dtype=dtype, device=dev, topk=16, max_cached_block=units,
                          block_size=bs, n_init=n_init, n_local=n_local)
    unit_k, unit_v = randn(2, units, bs, hkv, d, **kw), randn(2, units, bs, hkv, d, **kw)
    cache.load_memory(randn(2, n_init, hkv, d, **kw), randn(2, n_init, hkv, d, **kw), unit_k, unit_v,
                      randn(2, units, hkv, d, **kw), randn(2, r, hkv, d, **kw), randn(2, r, hkv, d, **kw))
    for b in range(2):
        cache.fetch(b, list(range(units)))
    cache.wait_loads()
    return cache, kw


@pytest.mark.parametrize("n_init", [128, 5], ids=["fused", "split"])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_resident_step_has_no_host_sync(gen, n_init):
    """The GPU-resident step (every unit resident) never synchronises with the host: attend,
    and a whole decode step (append, attend, score accumulation) that forms no unit."""
    cache, kw = _resident_cuda_cache(gen, n_init)
    hq, hkv, d, units, r = _RES["hq"], _RES["hkv"], _RES["d"], _RES["units"], _RES["n_local"] + 17
    q = randn(2, hq, d, **kw)
    want, want_lse = cache.attend(q)  # warm-up (builds the cached step metadata)
    k_new, v_new = randn(2, hkv, d, **kw), randn(2, hkv, d, **kw)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = cache.attend(q)
        out_dec = cache.decode(q, k_new, v_new)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(out, want, **OUT_TOL[kw["dtype"]])  # (split counts may differ: not bitwise)
    torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-4)
    assert cache.num_units == units and cache.num_recent == r + 1
    # the decode step attended to the new token too: redo it on a copy of the state, as attend
    torch.testing.assert_close(out_dec, cache.attend(q)[0], **OUT_TOL[kw["dtype"]])


@pytest.mark.parametrize("n_init", [128, 5], ids=["fused", "split"])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_resident_step_graph_replay(gen, n_init):
    """The GPU-resident step (scoring, top-k, selection, attention) captured once in a CUDA graph
    (as the retrieval bench's kvcore-graph row runs it): each replay with a new query in the
    captured query tensor equals the eager step on that query, including which units it picks."""
    cache, kw = _resident_cuda_cache(gen, n_init)
    q = randn(2, _RES["hq"], _RES["d"], **kw)
    captured = {}

    def step():
        captured["out"], captured["lse"] = cache.attend(q)

    graph = capture_graph(step)
    for _ in range(3):
        q.copy_(randn(2, _RES["hq"], _RES["d"], **kw))
        captured["out"].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        out, lse = captured["out"].clone(), captured["lse"].clone()
        want, want_lse = cache.attend(q)
        assert torch.equal(out, want), "the replayed step differs from the eager step on the same query"
        assert torch.equal(lse, want_lse)


@pytest.mark.parametrize("per_kv_head", [False, True])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_gpu_step_equals_cpu_step(gen, per_kv_head):
    """The same bf16 inputs through a CPU cache and a CUDA cache (prefill, then decode steps that
    form and load units): the same selections, the same outputs up to rounding."""
    dtype, n_pre, n_dec = torch.bfloat16, 75, 20
    q, k, v = _inputs(n_pre + n_dec, gen, dtype, "cpu")
    geom = {**GEOM, "n_init": 8}
    caches = [R.InfLLMCache(B, HQ, HKV, D, n_pre + n_dec, dtype=dtype, device=dev, topk=2, max_cached_block=4,
                            per_kv_head=per_kv_head, **geom) for dev in ("cpu", "cuda")]
    outs = [c.prefill(q[:, :n_pre].to(c.device), k[:, :n_pre].to(c.device), v[:, :n_pre].to(c.device))
            for c in caches]
    torch.testing.assert_close(outs[1].cpu().float(), outs[0].float(), **OUT_TOL[dtype])
    for t in range(n_pre, n_pre + n_dec):
        o = [c.decode(q[:, t].to(c.device), k[:, t].to(c.device), v[:, t].to(c.device)) for c in caches]
        torch.testing.assert_close(o[1].cpu().float(), o[0].float(), **OUT_TOL[dtype])
    assert caches[0].num_units == caches[1].num_units >= 8
    assert (caches[0].hits, caches[0].misses) == (caches[1].hits, caches[1].misses)


# ============================================================================================
# Bad input of the retrieval ops: the right error, naming the argument, and nothing written
# (docs/bad_input.md lists every case; tests/test_bad_input_doc.py keeps the two in step)
# ============================================================================================

from types import SimpleNamespace  # noqa: E402

from test_ops import BadCase, _other_device, _set, _set_kw  # noqa: E402


def _has_cuda_kernel(op: str) -> bool:
    return HAS_CUDA and torch._C._dispatch_has_kernel_for_dispatch_key(f"kvcore::{op}", "CUDA")


_CUDA_BAD = {
    op: [pytest.mark.cuda, pytest.mark.skipif(not _has_cuda_kernel(op), reason=f"no CUDA kernel for kvcore::{op}")]
    for op in ("infllm_unit_scores", "topk_rows")
}


def _bad_params(op: str, cases: list) -> list:
    return [pytest.param(c, id=c.name, marks=_CUDA_BAD[op] if c.cuda_only else []) for c in cases]


def _bad_devices(op: str) -> list:
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=_CUDA_BAD[op])]


def _poisoned(*shape, dtype=torch.float32):
    return lambda t, a, d: poison(torch.empty(*shape, dtype=dtype, device=d))


def _unit_score_args(device: str, gen) -> SimpleNamespace:
    # bf16 on both devices: the CUDA kernel takes bf16/fp16 keys only, and its dtype check would
    # otherwise answer every other case first. q [B 2, Hq 4, D 64], 10 units of Hkv 2.
    return SimpleNamespace(q=randn(2, 4, 64, gen=gen, dtype=torch.bfloat16, device=device),
                           repr_keys=randn(2, 10, 2, 64, gen=gen, dtype=torch.bfloat16, device=device),
                           out=poison(torch.empty(2, 10, device=device)), kw={})


def _unit_scores_wide(a: SimpleNamespace, d: str) -> None:
    """Hkv 128 x D 256 = 32768 key elements per unit: past the CUDA kernel's shared-memory query."""
    gen = torch.Generator().manual_seed(5)
    a.q = randn(2, 128, 256, gen=gen, dtype=torch.bfloat16, device=d)
    a.repr_keys = randn(2, 3, 128, 256, gen=gen, dtype=torch.bfloat16, device=d)
    a.out = poison(torch.empty(2, 3, device=d))


def _unit_scores_big_batch(a: SimpleNamespace, d: str) -> None:
    """65536 sequences: one past the CUDA grid's y limit."""
    a.q = torch.ones(65536, 1, 8, dtype=torch.bfloat16, device=d)
    a.repr_keys = torch.ones(65536, 1, 1, 8, dtype=torch.bfloat16, device=d)
    a.out = poison(torch.empty(65536, 1, device=d))


def _misaligned(t: torch.Tensor, a, d: str) -> torch.Tensor:
    """t's values at a storage offset of 4 elements (8 bytes): densely packed, not 16-byte aligned."""
    buf = torch.empty(t.numel() + 4, dtype=t.dtype, device=d)
    buf[4:] = t.flatten()
    return buf[4:].view(t.shape)


def _odd_batch_stride(t: torch.Tensor, a, d: str) -> torch.Tensor:
    """t with a batch stride of U * Hkv * D + 4 elements (rows of every other batch misaligned)."""
    b, inner = t.shape[0], t[0].numel()
    buf = torch.zeros(b, inner + 4, dtype=t.dtype, device=d)
    buf[:, :inner] = t.reshape(b, inner)
    return buf[:, :inner].view(t.shape)


BAD_UNIT_SCORES = [
    # dtypes
    BadCase("q_fp16_keys_bf16", _set("q", lambda t, a, d: t.half()), RuntimeError, r"\bq must have repr_keys' dtype"),
    BadCase("repr_keys_fp64", _set("repr_keys", lambda t, a, d: t.double()), RuntimeError,
            r"repr_keys must be bfloat16"),
    BadCase("out_dtype", _set("out", _poisoned(2, 10, dtype=torch.float64)), RuntimeError, r"\bout must have dtype"),
    BadCase("fp32_on_cuda", lambda a, d: (setattr(a, "q", a.q.float()), setattr(a, "repr_keys", a.repr_keys.float())),
            RuntimeError, r"repr_keys must be bfloat16 or float16 on CUDA", cuda_only=True, kernel_limit=True),
    # devices
    BadCase("repr_keys_other_device", _set("repr_keys", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"repr_keys must be on the same device", cuda_only=True),
    BadCase("out_other_device", _set("out", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"\bout must be on the same device", cuda_only=True),
    # ranks
    BadCase("q_rank", _set("q", lambda t, a, d: t[0]), RuntimeError, r"\bq must be 3-D"),
    BadCase("repr_keys_rank", _set("repr_keys", lambda t, a, d: t[0]), RuntimeError, r"repr_keys must be 4-D"),
    BadCase("out_rank", _set("out", _poisoned(20)), ValueError, r"\bout must be \[B, U\] for per_kv_head=False"),
    # shapes
    BadCase("heads_not_dividing", _set("q", lambda t, a, d: t[:, :3]), RuntimeError,
            r"num_q_heads \(3\) must be a positive multiple of repr_keys' num_kv_heads \(2\)"),
    BadCase("head_dim_mismatch", _set("repr_keys", lambda t, a, d: t[..., :32].contiguous()), RuntimeError,
            r"repr_keys' head_dim must equal q's \(64\)"),
    BadCase("repr_keys_batch", _set("repr_keys", lambda t, a, d: t[:1]), RuntimeError,
            r"repr_keys must have q's batch \(2\)"),
    BadCase("out_units", _set("out", _poisoned(2, 9)), RuntimeError, r"\bout must be \[batch, units\]"),
    BadCase("out_heads_per_kv_head", lambda a, d: (a.kw.update(per_kv_head=True), setattr(a, "out", poison(
        torch.empty(2, 3, 10, device=d)))), RuntimeError, r"\bout must be \[batch, num_kv_heads, units\]"),
    # layouts
    BadCase("out_not_contiguous", _set("out", lambda t, a, d: poison(torch.empty(10, 2, device=d)).t()), RuntimeError,
            r"\bout must be contiguous"),
    BadCase("q_last_dim_strided", _set("q", lambda t, a, d: torch.repeat_interleave(t, 2, dim=2)[..., ::2]),
            RuntimeError, r"\bq's last dim must be contiguous"),
    BadCase("repr_keys_inner_strided", _set("repr_keys", lambda t, a, d: t.transpose(1, 2).contiguous().transpose(1, 2)),
            RuntimeError, r"repr_keys must be densely packed"),
    # limits of the CUDA kernel
    BadCase("head_dim_48_cuda", lambda a, d: (setattr(a, "q", a.q[..., :48].contiguous()),
                                              setattr(a, "repr_keys", a.repr_keys[..., :48].contiguous())),
            RuntimeError, r"head_dim must be a power of two in \[8, 256\]", cuda_only=True, kernel_limit=True),
    BadCase("kv_width_over_16384_cuda", _unit_scores_wide, RuntimeError,
            r"num_kv_heads x head_dim must be <= 16384", cuda_only=True, kernel_limit=True),
    BadCase("repr_keys_misaligned_cuda", _set("repr_keys", _misaligned), RuntimeError,
            r"repr_keys must start on a 16-byte boundary", cuda_only=True, kernel_limit=True),
    BadCase("repr_keys_batch_stride_cuda", _set("repr_keys", _odd_batch_stride), RuntimeError,
            r"repr_keys' batch stride must be a multiple of 8", cuda_only=True, kernel_limit=True),
    BadCase("batch_over_65535_cuda", _unit_scores_big_batch, RuntimeError, r"batch must be <= 65535",
            cuda_only=True, kernel_limit=True),
]


@pytest.mark.parametrize("bad", _bad_params("infllm_unit_scores", BAD_UNIT_SCORES))
@pytest.mark.parametrize("device", _bad_devices("infllm_unit_scores"))
def test_infllm_unit_scores_bad_input(device, bad, gen):
    bad.skip_unless_applies(device)
    a = _unit_score_args(device, gen)
    bad.mutate(a, device)
    q_before, keys_before = a.q.clone(), a.repr_keys.clone()
    with pytest.raises(bad.error, match=bad.match):
        kvcore.infllm_unit_scores(a.q, a.repr_keys, out=a.out, **a.kw)
    assert bool(torch.isnan(a.out).all()), "out written by a failed call"
    assert torch.equal(a.q, q_before) and torch.equal(a.repr_keys, keys_before)


_INDEX_SENTINEL = 12345  # integer outputs cannot hold NaN: a value no call would write


def _topk_args(device: str, gen) -> SimpleNamespace:
    # float32 scores on both devices (the only dtype the op takes); 3 rows of 50 columns, k = 8.
    return SimpleNamespace(scores=randn(3, 50, gen=gen, device=device), k=8,
                           values=poison(torch.empty(3, 8, device=device)),
                           indices=torch.full((3, 8), _INDEX_SENTINEL, dtype=torch.int64, device=device), kw={})


def _indices(*shape, dtype=torch.int64, transpose=False):
    def make(t, a, d):
        idx = torch.full(shape, _INDEX_SENTINEL, dtype=dtype, device=d)
        return idx.t() if transpose else idx

    return make


def _set_width(width: int):
    """values and indices of width ``width`` (the op takes k from them, bypassing the wrapper's k)."""
    def mutate(a: SimpleNamespace, d: str) -> None:
        a.values = poison(torch.empty(3, width, device=d))
        a.indices = torch.full((3, width), _INDEX_SENTINEL, dtype=torch.int64, device=d)

    return mutate


BAD_TOPK = [
    # dtypes
    BadCase("scores_bf16", _set("scores", lambda t, a, d: t.bfloat16()), RuntimeError, r"scores must have dtype"),
    BadCase("scores_fp64", _set("scores", lambda t, a, d: t.double()), RuntimeError, r"scores must have dtype"),
    BadCase("values_dtype", _set("values", _poisoned(3, 8, dtype=torch.float64)), RuntimeError,
            r"values must have dtype"),
    BadCase("indices_float", _set("indices", lambda t, a, d: t.float()), RuntimeError,
            r"indices must have dtype int32 or int64"),
    BadCase("index_dtype_int16", lambda a, d: (setattr(a, "indices", None), a.kw.update(index_dtype=torch.int16)),
            ValueError, r"index_dtype must be torch.int32 or torch.int64"),
    # devices
    BadCase("values_other_device", _set("values", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"values must be on the same device", cuda_only=True),
    BadCase("indices_other_device", _set("indices", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"indices must be on the same device", cuda_only=True),
    # ranks
    BadCase("scores_rank", _set("scores", lambda t, a, d: t[0]), RuntimeError, r"scores must be 2-D"),
    BadCase("values_rank", _set("values", lambda t, a, d: t[0]), RuntimeError, r"values must be 2-D"),
    BadCase("indices_rank", _set("indices", lambda t, a, d: t[0]), RuntimeError, r"indices must be 2-D"),
    # shapes
    BadCase("values_rows", _set("values", lambda t, a, d: t[:2]), RuntimeError,
            r"values must be \[rows, k\] with scores' rows \(3\)"),
    BadCase("indices_rows", _set("indices", lambda t, a, d: t[:2]), RuntimeError, r"indices must be \[rows, k\]"),
    BadCase("indices_width", _set("indices", lambda t, a, d: t[:, :5].contiguous()), ValueError,
            r"indices must be \[rows, k = 8\], got \(3, 5\)"),
    # layouts
    BadCase("scores_last_dim_strided", _set("scores", lambda t, a, d: t.t().contiguous().t()), RuntimeError,
            r"scores' last dim must be contiguous"),
    BadCase("values_not_contiguous", _set("values", lambda t, a, d: poison(torch.empty(8, 3, device=d)).t()),
            RuntimeError, r"values must be contiguous"),
    BadCase("indices_not_contiguous", _set("indices", _indices(8, 3, transpose=True)), RuntimeError,
            r"indices must be contiguous"),
    # k
    BadCase("k_zero", _set("k", lambda t, a, d: 0), ValueError, r"k must be an int in \[1, 256\]"),
    BadCase("k_past_max", _set("k", lambda t, a, d: 257), ValueError, r"k must be an int in \[1, 256\]"),
    BadCase("k_not_int", _set("k", lambda t, a, d: 8.0), ValueError, r"k must be an int in \[1, 256\]"),
    BadCase("outputs_width_zero", _set_width(0), ValueError, r"values must be \[rows, k = 8\], got \(3, 0\)"),
    BadCase("outputs_width_past_max", _set_width(257), ValueError, r"values must be \[rows, k = 8\], got \(3, 257\)"),
    BadCase("outputs_width_not_k", _set_width(5), ValueError, r"values must be \[rows, k = 8\], got \(3, 5\)"),
]


@pytest.mark.parametrize("bad", _bad_params("topk_rows", BAD_TOPK))
@pytest.mark.parametrize("device", _bad_devices("topk_rows"))
def test_topk_rows_bad_input(device, bad, gen):
    bad.skip_unless_applies(device)
    a = _topk_args(device, gen)
    bad.mutate(a, device)
    scores_before = a.scores.clone()
    idx_before = None if a.indices is None else a.indices.clone()
    with pytest.raises(bad.error, match=bad.match):
        kvcore.topk_rows(a.scores, a.k, values=a.values, indices=a.indices, **a.kw)
    assert bool(torch.isnan(a.values).all()), "values written by a failed call"
    if idx_before is not None:
        assert torch.equal(a.indices, idx_before), "indices written by a failed call"
    assert torch.equal(a.scores, scores_before)
