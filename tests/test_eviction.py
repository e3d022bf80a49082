"""Eviction (issue 6): attention_scores and compact_kv against kvcore.reference, the policies against
their plain-torch forms (same kept set on the same seeded inputs), opcheck, bad input, page freeing.

Outputs are poisoned (NaN) before each op call; inputs are random normals with shuffled pages,
ragged lengths and junk past each sequence's pages in the block table.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import kvcore
from conftest import assert_switch_value_rejected, make_paged_kv, poison, randn, run_tests_with_env
from kvcore import policies, reference
from kvcore.policies import torch_forms
from test_ops import BadCase, _other_device, _set, _set_item, _set_kw

HAS_CUDA_SCORES = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "kvcore::attention_scores", "CUDA")
cuda_scores = pytest.mark.skipif(not HAS_CUDA_SCORES, reason="no CUDA kernel registered for kvcore::attention_scores")
HAS_CUDA_COMPACT = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "kvcore::compact_kv", "CUDA")
cuda_compact = pytest.mark.skipif(not HAS_CUDA_COMPACT, reason="no CUDA kernel registered for kvcore::compact_kv")

SCORE_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}


def _device_params(skip_cuda) -> list:
    """(device, dtype) params: the CPU dtypes, and CUDA's marked `cuda` (so the GPU runs' `-m cuda`
    selects them; they lacked the mark and no GPU run selected them before session 22) and skipped
    without the op's CUDA kernel (``skip_cuda``: cuda_scores or cuda_compact)."""
    cpu = [("cpu", dt) for dt in (torch.float32, torch.bfloat16, torch.float16)]
    cuda = [pytest.param("cuda", dt, marks=[pytest.mark.cuda, skip_cuda]) for dt in (torch.bfloat16, torch.float16)]
    return cpu + cuda


def _window_lse_ref(q, kv, lens, scale=None):
    """Each window query's fp64 log-sum-exp over the keys it sees (-inf when it sees none), as fp32."""
    batch, w, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lse = torch.full((batch, w, hq), -math.inf, dtype=torch.float32, device=q.device)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        keys = reference.gather_paged(kv.k_cache, kv.block_table[b], torch.arange(n)).double()
        keys = keys.repeat_interleave(hq // kv.k_cache.shape[2], dim=1)
        lg = scale * torch.einsum("ihd,lhd->ihl", q[b].double(), keys)
        t = n - w + torch.arange(w, device=q.device)
        lg = lg.masked_fill(torch.arange(n, device=q.device).view(1, 1, -1) > t.view(-1, 1, 1), -math.inf)
        lse[b] = torch.logsumexp(lg, dim=-1).float()
    return lse


def _check_scores(out, q, kv, lens, dtype, *, max_len, **opts):
    """attention_scores' NaN-poisoned ``out`` against the reference with the same options
    (``opts``: lse, reduction, pooling, pool_kernel): every element written, within
    ``SCORE_TOL[dtype]`` (times the w * G rows a "sum" adds up), and exactly 0 past each length."""
    ref = reference.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, max_len=max_len, **opts)
    assert not torch.isnan(out).any(), "attention_scores left unwritten (NaN) elements"
    w, hq, hkv = q.shape[1], q.shape[2], kv.k_cache.shape[2]
    scale = w * hq // hkv if opts["reduction"] == "sum" else 1.0
    torch.testing.assert_close(out.double(), ref, atol=SCORE_TOL[dtype] * scale, rtol=1e-3)
    for b, n in enumerate(lens):
        assert bool((out[b, :, n:] == 0).all())


# (batch, w, Hq, Hkv, D, page_size, lens, reduction, pooling, kernel, with_lse)
SCORE_CASES = [
    (3, 4, 8, 2, 64, 16, (40, 4, 2), "sum", "none", 5, False),
    (2, 8, 4, 4, 64, 5, (57, 30), "mean", "avg", 5, False),
    (2, 6, 16, 2, 128, 7, (90, 0), "max", "max", 7, False),
    (3, 5, 6, 3, 64, 16, (77, 12, 33), "sum", "avg", 7, True),
    (1, 32, 8, 1, 64, 64, (600,), "sum", "avg", 5, False),
    (2, 3, 4, 2, 64, 1, (25, 9), "mean", "max", 5, True),
]


@pytest.mark.parametrize("case", SCORE_CASES, ids=lambda c: f"B{c[0]}w{c[1]}Hq{c[2]}Hkv{c[3]}ps{c[5]}-{c[7]}-{c[8]}{c[9]}"
                         + ("-lse" if c[10] else ""))
@pytest.mark.parametrize("device,dtype", _device_params(cuda_scores), ids=lambda x: str(x).replace("torch.", ""))
def test_attention_scores_matches_reference(device, dtype, case, gen):
    batch, w, hq, hkv, d, ps, lens, reduction, pooling, kernel, with_lse = case
    kv = make_paged_kv(list(lens), ps, hkv, d, gen=gen, dtype=dtype, device=device)
    q = randn(batch, w, hq, d, gen=gen, dtype=dtype, device=device)
    max_len = max(lens) + 3
    opts = dict(lse=_window_lse_ref(q, kv, lens) if with_lse else None, reduction=reduction, pooling=pooling,
                pool_kernel=kernel)
    out = poison(torch.empty(batch, hkv, max_len, dtype=torch.float32, device=device))
    k_before = kv.k_cache.clone()
    res = kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, out=out, **opts)
    assert res is out
    _check_scores(out, q, kv, lens, dtype, max_len=max_len, **opts)
    assert torch.equal(kv.k_cache, k_before)


def test_attention_scores_sum_is_window_count(gen):
    """Without pooling, sum-reduced probabilities of one KV head add up to w * G per sequence."""
    kv = make_paged_kv([50, 9], 8, 2, 64, gen=gen)
    q = randn(2, 6, 8, 64, gen=gen)
    out = kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens)
    torch.testing.assert_close(out.sum(dim=-1), torch.full((2, 2), 6.0 * 4), atol=1e-4, rtol=1e-5)


# ---- CUDA kernel: the grid of shapes it is built for ---------------------------------------------
# The CUDA kernel holds 256 query rows per block (128 at D = 256) and cuts keys into splits of
# 64-key tiles; pooling runs in segments of 1024 keys. The cases cross each of those boundaries:
# several row blocks (w * G > 256), many splits, sequences shorter than the window, empty and
# one-token sequences, lengths at and around a pooling-segment end, page sizes 1 .. 256.
# (batch, w, Hq, Hkv, D, page_size, lens, reduction, pooling, kernel, with_lse, dtype)
CUDA_SCORE_CASES = [
    (2, 64, 32, 8, 128, 16, (3000, 700), "sum", "avg", 7, False, torch.bfloat16),  # SnapKV-like
    (2, 64, 32, 8, 128, 16, (3000, 700), "sum", "avg", 5, True, torch.float16),
    (2, 128, 16, 1, 256, 256, (1500, 90), "mean", "max", 5, False, torch.bfloat16),  # 16 row blocks, L < w
    (3, 1, 16, 1, 64, 1, (300, 1, 0), "max", "none", 5, False, torch.float16),  # TOVA-like, page 1
    (2, 16, 12, 4, 64, 32, (2100, 17), "sum", "avg", 5, True, torch.bfloat16),  # G = 3
    (1, 33, 10, 5, 128, 8, (1200,), "max", "avg", 7, True, torch.float16),
    (3, 8, 8, 8, 256, 64, (1030, 1025, 1024), "sum", "max", 7, False, torch.bfloat16),  # G = 1, segment ends
    (1, 100, 4, 1, 128, 128, (5000,), "mean", "none", 5, False, torch.float16),  # 2 row blocks (R = 400)
    (4, 4, 64, 4, 64, 2, (129, 64, 63, 2), "sum", "max", 5, False, torch.float16),  # G = 16
    (2, 20, 40, 8, 128, 4, (333, 20), "max", "none", 5, True, torch.bfloat16),  # G = 5, L == w
]


@cuda_scores
@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_SCORE_CASES,
                         ids=lambda c: f"B{c[0]}w{c[1]}Hq{c[2]}Hkv{c[3]}D{c[4]}ps{c[5]}-{c[7]}-{c[8]}{c[9]}"
                         + ("-lse" if c[10] else "") + ("-bf16" if c[11] == torch.bfloat16 else "-fp16"))
def test_attention_scores_cuda_grid(case, gen):
    batch, w, hq, hkv, d, ps, lens, reduction, pooling, kernel, with_lse, dtype = case
    kv = make_paged_kv(list(lens), ps, hkv, d, gen=gen, dtype=dtype, device="cuda")
    q = randn(batch, w, hq, d, gen=gen, dtype=dtype, device="cuda")
    lse = _window_lse_ref(q, kv, lens) if with_lse else None
    max_len = max(lens) + 70  # past the block table's capacity too: those keys score 0
    out = poison(torch.empty(batch, hkv, max_len, dtype=torch.float32, device="cuda"))
    opts = dict(lse=lse, reduction=reduction, pooling=pooling, pool_kernel=kernel)
    kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, out=out, **opts)
    _check_scores(out, q, kv, lens, dtype, max_len=max_len, **opts)
    # The CPU kernel on the same 16-bit inputs agrees far more tightly: both take the logits in
    # fp32 from the same values, so only summation order and exp / log rounding differ.
    cpu = kvcore.attention_scores(q.cpu(), kv.k_cache.cpu(), kv.block_table.cpu(), kv.seq_lens.cpu(),
                                  lse=None if lse is None else lse.cpu(), reduction=reduction, pooling=pooling,
                                  pool_kernel=kernel, max_len=max_len)
    torch.testing.assert_close(out.cpu(), cpu, atol=1e-5, rtol=1e-4)


@cuda_scores
@pytest.mark.cuda
def test_attention_scores_cuda_deterministic_and_strided_q(gen):
    """Two calls give the same bits (fixed reduction order, no atomics); a q view with odd strides
    (copied by the launcher) and a page-strided cache give the contiguous inputs' result."""
    lens = [2500, 333]
    kv = make_paged_kv(lens, 16, 4, 128, gen=gen, dtype=torch.bfloat16, device="cuda", strided_cache=True)
    big = randn(2, 40, 17, 128, gen=gen, dtype=torch.bfloat16, device="cuda")
    q = big[:, 8:, :16]  # [2, 32, 16, 128], strides (87040, 2176, 128, 1)
    q_odd = torch.empty(2, 32, 16, 129, dtype=torch.bfloat16, device="cuda")[..., 1:]
    q_odd.copy_(q)  # element offset 1 of 129-wide rows: 2-byte aligned rows, odd strides
    a = kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, pooling="avg", pool_kernel=7)
    b = kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, pooling="avg", pool_kernel=7)
    c = kvcore.attention_scores(q_odd, kv.k_cache, kv.block_table, kv.seq_lens, pooling="avg", pool_kernel=7)
    d = kvcore.attention_scores(q.contiguous(), kv.k_cache.contiguous(), kv.block_table, kv.seq_lens, pooling="avg",
                                pool_kernel=7)
    # A contiguous q one element past a 4-byte boundary: contiguous() would hand it back as it is
    # (a misaligned-address fault in the kernel's 4-byte loads); the launcher copies it.
    q_shift = torch.empty(q.numel() + 1, dtype=torch.bfloat16, device="cuda")[1:].view(q.shape)
    q_shift.copy_(q)
    assert q_shift.is_contiguous() and q_shift.data_ptr() % 4 == 2
    e = kvcore.attention_scores(q_shift, kv.k_cache, kv.block_table, kv.seq_lens, pooling="avg", pool_kernel=7)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d) and torch.equal(a, e)
    ref = reference.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, pooling="avg", pool_kernel=7,
                                     max_len=a.shape[2])
    torch.testing.assert_close(a.double(), ref, atol=2e-3 * 32 * 4, rtol=1e-3)


@cuda_scores
@pytest.mark.cuda
def test_attention_scores_cuda_clamps_bad_contents_without_validation(gen, no_validation):
    """With validation off, out-of-range pages and lengths never fault on the GPU (clamped)."""
    kv = make_paged_kv([20, 7, 9], 8, 2, 64, gen=gen, dtype=torch.bfloat16, device="cuda")
    table = kv.block_table.clone()
    table[0, 0] = 10**6
    table[2, 0] = -5
    lens = torch.tensor([10**5, -3, 9], dtype=torch.int32, device="cuda")
    q = randn(3, 4, 4, 64, gen=gen, dtype=torch.bfloat16, device="cuda")
    for lse in (None, torch.zeros(3, 4, 4, device="cuda")):
        out = kvcore.attention_scores(q, kv.k_cache, table, lens, lse=lse, pooling="avg", max_len=24)
        torch.cuda.synchronize()
        assert out.shape == (3, 2, 24) and bool((out[1] == 0).all())
    empty = kv.k_cache[:0]  # no pages: every sequence reads as empty
    out = kvcore.attention_scores(q, empty, kv.block_table, kv.seq_lens, max_len=24)
    torch.cuda.synchronize()
    assert bool((out == 0).all())


@cuda_scores
@pytest.mark.cuda
def test_attention_scores_cuda_limits(gen):
    """The CUDA kernel's own limits: head dims 64 / 128 / 256 and 16-bit floats, named in the message."""
    kv = make_paged_kv([20, 7], 8, 2, 32, gen=gen, dtype=torch.bfloat16, device="cuda")
    q = randn(2, 4, 4, 32, gen=gen, dtype=torch.bfloat16, device="cuda")
    out = poison(torch.empty(2, 2, 24, device="cuda"))
    with pytest.raises(RuntimeError, match="head_dim must be 64, 128 or 256"):
        kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, out=out)
    kv = make_paged_kv([20, 7], 8, 2, 64, gen=gen, dtype=torch.float32, device="cuda")
    q = randn(2, 4, 4, 64, gen=gen, dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match=r"\bq must be bfloat16 or float16 on CUDA"):
        kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, out=out)
    assert bool(torch.isnan(out).all())


@cuda_scores
@pytest.mark.cuda
def test_opcheck_attention_scores_cuda(gen):
    kv = make_paged_kv([200, 7], 16, 2, 128, gen=gen, dtype=torch.bfloat16, device="cuda")
    q = randn(2, 8, 8, 128, gen=gen, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(2, 2, 224, device="cuda")
    lse = randn(2, 8, 8, gen=gen, device="cuda") + 5.0
    for args in [(None, "sum", "avg", 5), (lse, "max", "max", 7), (None, "mean", "none", 5)]:
        torch.library.opcheck(torch.ops.kvcore.attention_scores.default,
                              (q, kv.k_cache, kv.block_table, kv.seq_lens, args[0], 0.09, *args[1:], out),
                              test_utils=OPCHECK_UTILS)


def _cuda_copy(kv):
    return SimpleNamespace(k_cache=kv.k_cache.cuda(), v_cache=kv.v_cache.cuda(), block_table=kv.block_table.cuda(),
                           seq_lens=kv.seq_lens.cuda())


def _assert_same_selection(cuda_sel, cpu_sel, cpu_scores, lens):
    """The CUDA run keeps the CPU run's set for every (sequence, head), ties aside: a key kept by
    only one run must score (in the CPU run's ranking scores) within 1e-5 of the other run's
    swapped key, i.e. the two runs only ordered a near-tie differently."""
    (kc, nc), (kp, np_) = cuda_sel, cpu_sel
    assert torch.equal(nc.cpu(), np_.cpu()), f"kept counts differ: {nc.tolist()} vs {np_.tolist()}"
    s = cpu_scores.double().cpu()
    for b in range(len(lens)):
        m = int(np_[b])
        for h in range(kc.shape[1]):
            a, c = set(kc[b, h, :m].tolist()), set(kp[b, h, :m].tolist())
            only_cuda, only_cpu = sorted(a - c), sorted(c - a)
            if not only_cuda:
                continue
            got = sorted(float(s[b, h, x]) for x in only_cuda)
            want = sorted(float(s[b, h, x]) for x in only_cpu)
            assert all(abs(g - w) <= 1e-5 * max(1.0, abs(w)) for g, w in zip(got, want)), (
                f"sequence {b} head {h}: CUDA keeps {only_cuda} (scores {got}), CPU keeps {only_cpu} (scores {want})")


POLICY_LENS = (900, 300, 77)


@cuda_scores
@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "tova", "corm", "h2o"])
def test_policies_same_kept_set_on_cuda_and_cpu(policy, gen, monkeypatch):
    dtype = torch.bfloat16
    w = {"snapkv": 32, "pyramidkv": 16, "tova": 1, "corm": 4, "h2o": 77}[policy]
    kv = make_paged_kv(list(POLICY_LENS), 16, 2, 128, gen=gen, dtype=dtype)
    q = randn(len(POLICY_LENS), w, 8, 128, gen=gen, dtype=dtype, scale=3.0 if policy == "corm" else 1.0)
    runs, ranked = [], []
    select_top = policies.eviction._select_top

    def recording_select_top(scores, *args, **kwargs):
        ranked.append(scores)
        return select_top(scores, *args, **kwargs)

    monkeypatch.setattr(policies.eviction, "_select_top", recording_select_top)
    for dev in ("cpu", "cuda"):
        c = kv if dev == "cpu" else _cuda_copy(kv)
        qd = q.to(dev)
        if policy == "snapkv":
            sel = policies.snapkv(qd, c.k_cache, c.block_table, c.seq_lens, 96)
        elif policy == "pyramidkv":
            sel = policies.pyramidkv(qd, c.k_cache, c.block_table, c.seq_lens, 64, layer=1, num_layers=4)
        elif policy == "tova":
            sel = policies.tova(qd, c.k_cache, c.block_table, c.seq_lens, 50)
        elif policy == "corm":
            if dev == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("kvcore::gqa_decode", "CUDA"):
                pytest.skip("CORM needs the CUDA gqa_decode kernel")
            sel = policies.corm(qd, c.k_cache, c.v_cache, c.block_table, c.seq_lens)
        else:  # H2O at prefill: every prompt query of the shortest sequence's length
            scores = policies.h2o_scores(qd, c.k_cache, c.block_table, c.seq_lens)
            sel = policies.h2o(scores, c.seq_lens, 40)
        runs.append(sel)
    _assert_same_selection(runs[1], runs[0], ranked[0], POLICY_LENS)


# (lens, Hkv, page_size, max_kept, kept_lens or None)
COMPACT_CASES = [
    ((40, 17, 5), 2, 8, 6, None),
    ((100, 3), 4, 16, 20, (20, 3)),
    ((33,), 1, 1, 33, None),
    ((64, 0, 12), 2, 64, 10, (10, 0, 4)),
]


@pytest.mark.parametrize("case", COMPACT_CASES, ids=lambda c: f"L{'_'.join(map(str, c[0]))}Hkv{c[1]}ps{c[2]}K{c[3]}")
@pytest.mark.parametrize("device,dtype", _device_params(cuda_compact), ids=lambda x: str(x).replace("torch.", ""))
def test_compact_kv_matches_reference(device, dtype, case, gen):
    if device == "cuda" and not HAS_CUDA_COMPACT:
        pytest.skip("no CUDA kernel registered for kvcore::compact_kv")
    lens, hkv, ps, max_kept, kept_lens = case
    kv = make_paged_kv(list(lens), ps, hkv, 64, gen=gen, dtype=dtype, device=device, strided_cache=(ps == 8))
    counts = [min(n, max_kept) for n in lens] if kept_lens is None else list(kept_lens)
    kept = torch.zeros(len(lens), hkv, max_kept, dtype=torch.int64)
    for b, n in enumerate(lens):
        for h in range(hkv):
            kept[b, h, : counts[b]] = torch.randperm(n, generator=gen)[: counts[b]].sort().values
            kept[b, h, counts[b]:] = 10**6  # ignored entries: junk
    kept = kept.to(device)
    kl = torch.tensor(counts, dtype=torch.int32, device=device)
    ref_k, ref_v, ref_lens = reference.compact_kv(kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, kept, kl)
    seq_lens = kv.seq_lens.clone()
    default_lens = all(c == max_kept for c in counts)  # the wrapper's default kept_lens is max_kept
    res = kvcore.compact_kv(kv.k_cache, kv.v_cache, kv.block_table, seq_lens, kept, None if default_lens else kl)
    assert res is seq_lens
    assert torch.equal(seq_lens.cpu(), ref_lens.cpu())
    assert torch.equal(kv.k_cache, ref_k) and torch.equal(kv.v_cache, ref_v)


def _make_window(gen, lens, w, hq, hkv, d, ps, device="cpu"):
    kv = make_paged_kv(list(lens), ps, hkv, d, gen=gen, device=device)
    q = randn(len(lens), w, hq, d, gen=gen, device=device)
    return kv, q, torch_forms.dense_keys(kv.k_cache, kv.block_table, kv.seq_lens)


def _assert_same_kept(selection, oracle: list[torch.Tensor], lens):
    kept, kept_lens = selection
    for b, n in enumerate(lens):
        m = int(kept_lens[b])
        assert m == oracle[b].shape[1], f"sequence {b}: kept {m} tokens, the torch form keeps {oracle[b].shape[1]}"
        assert torch.equal(kept[b, :, :m].cpu(), oracle[b].cpu()), f"sequence {b}: different kept sets"


LENS = (90, 40, 17)


def test_streaming_llm_matches_torch():
    sel = policies.streaming_llm(torch.tensor(LENS, dtype=torch.int32), 2, 24, num_sinks=4)
    _assert_same_kept(sel, torch_forms.streaming_llm_torch(torch.tensor(LENS), 2, 24, 4), LENS)
    assert sel[0][0, 0, :4].tolist() == [0, 1, 2, 3] and int(sel[0][0, 0, 23]) == 89


def test_h2o_matches_torch(gen):
    kv, q, keys = _make_window(gen, LENS, 90, 8, 2, 64, 16)  # w = longest prompt: every query
    scores = policies.h2o_scores(q, kv.k_cache, kv.block_table, kv.seq_lens)
    sel = policies.h2o(scores, kv.seq_lens, 30)
    _assert_same_kept(sel, torch_forms.h2o_torch(q, keys, kv.seq_lens, 30), LENS)


@pytest.mark.parametrize("pooling,kernel", [("avg", 5), ("avg", 7)])
def test_snapkv_matches_torch(gen, pooling, kernel):
    kv, q, keys = _make_window(gen, LENS, 8, 8, 2, 64, 16)
    sel = policies.snapkv(q, kv.k_cache, kv.block_table, kv.seq_lens, 32, pooling=pooling, kernel_size=kernel)
    _assert_same_kept(sel, torch_forms.snapkv_torch(q, keys, kv.seq_lens, 32, kernel, pooling), LENS)


def test_pyramidkv_budget_schedule():
    # c = 56, lo = 2, hi = 110 (< 1000 - 8), step = 108 // 3 = 36: layers keep 110, 74, 38, 2 (+ window).
    assert [policies.pyramidkv_budget(layer, 4, 1000, 64, 8) for layer in range(4)] == [118, 82, 46, 10]
    assert policies.pyramidkv_budget(0, 4, 50, 64, 8) == 50  # shorter than the budget: keep all
    assert policies.pyramidkv_budget(3, 4, 100, 64, 8) == 64  # shorter than 2c: uniform SnapKV
    # hi capped by the prompt: seq 115 -> hi = 107, lo = 112 - 107 = 5, step = 102 // 3 = 34.
    assert policies.pyramidkv_budget(1, 4, 115, 64, 8) == 107 - 34 + 8
    with pytest.raises(ValueError, match="layer"):
        policies.pyramidkv_budget(4, 4, 1000, 64, 8)


@pytest.mark.parametrize("layer", [0, 3])
def test_pyramidkv_matches_torch(gen, layer):
    lens = (200, 70, 100)
    kv, q, keys = _make_window(gen, lens, 8, 4, 2, 64, 16)
    sel = policies.pyramidkv(q, kv.k_cache, kv.block_table, kv.seq_lens, 40, layer=layer, num_layers=4)
    _assert_same_kept(sel, torch_forms.pyramidkv_torch(q, keys, kv.seq_lens, 40, layer, 4), lens)


def test_adakv_matches_torch_and_pad_rule(gen):
    kv, q, keys = _make_window(gen, LENS, 8, 8, 4, 64, 16)
    sel = policies.adakv(q, kv.k_cache, kv.block_table, kv.seq_lens, 24)
    _assert_same_kept(sel, torch_forms.adakv_torch(q, keys, kv.seq_lens, 24), LENS)
    scores = kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, pooling="avg")
    alloc = policies.eviction.adakv_allocation(scores, kv.seq_lens, 24, 8)
    assert int(alloc[0].sum()) == 4 * 16  # the layer's budget before the window, shared by the heads
    assert bool((alloc[0] >= 3).all())  # floor(0.2 * 16)
    if bool((alloc[0] != alloc[0, 0]).any()):
        with pytest.raises(ValueError, match="pad=True"):
            policies.adakv(q, kv.k_cache, kv.block_table, kv.seq_lens, 24, pad=False)


@pytest.mark.parametrize("floor_alpha", [0.0, 1.0, 0.5])
def test_adakv_floor_alpha_edges_match_torch(gen, floor_alpha):
    kv, q, keys = _make_window(gen, LENS, 8, 8, 4, 64, 16)
    sel = policies.adakv(q, kv.k_cache, kv.block_table, kv.seq_lens, 24, floor_alpha=floor_alpha)
    _assert_same_kept(sel, torch_forms.adakv_torch(q, keys, kv.seq_lens, 24, floor_alpha=floor_alpha), LENS)
    scores = kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, pooling="avg")
    alloc = policies.eviction.adakv_allocation(scores, kv.seq_lens, 24, 8, floor_alpha=floor_alpha)
    assert int(alloc[0].sum()) == 4 * 16 and bool((alloc[0] >= math.floor(floor_alpha * 16)).all())


@pytest.mark.parametrize("floor_alpha", [-0.5, 1.5, 2.0, math.nan, math.inf, -math.inf, True, "0.2", None])
def test_adakv_rejects_floor_alpha_outside_unit_interval(gen, floor_alpha):
    kv, q, keys = _make_window(gen, LENS, 8, 8, 4, 64, 16)
    with pytest.raises(ValueError, match=r"floor_alpha must be in \[0, 1\], got"):
        policies.adakv(q, kv.k_cache, kv.block_table, kv.seq_lens, 24, floor_alpha=floor_alpha)
    scores = kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, pooling="avg")
    with pytest.raises(ValueError, match=r"floor_alpha must be in \[0, 1\], got"):
        policies.eviction.adakv_allocation(scores, kv.seq_lens, 24, 8, floor_alpha=floor_alpha)


def test_policies_accept_integer_like_arguments(gen):
    """budget / num_kv_heads / num_sinks / recent / kernel_size / layer ... as numpy integers or 0-d
    integer tensors: the same selection as with plain ints (itself checked against the torch forms)."""
    kv, q, keys = _make_window(gen, LENS, 8, 8, 2, 64, 16)
    args = (kv.k_cache, kv.block_table, kv.seq_lens)
    scores = policies.h2o_scores(q, *args)
    for like in (np.int64, np.int32, torch.tensor):
        calls = {
            "streaming_llm": lambda i: policies.streaming_llm(kv.seq_lens, i(2), i(24), num_sinks=i(4)),
            "h2o": lambda i: policies.h2o(scores, kv.seq_lens, i(30), recent=i(10)),
            "snapkv": lambda i: policies.snapkv(q, *args, i(32), kernel_size=i(7)),
            "pyramidkv": lambda i: policies.pyramidkv(q, *args, i(40), layer=i(1), num_layers=i(4), beta=i(10)),
            "adakv": lambda i: policies.adakv(q, *args, i(24)),
            "tova": lambda i: policies.tova(q[:, -1:], *args, i(20)),
            "corm": lambda i: policies.corm(q[:, -2:], kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                            budget=i(12), fill=True),
            "knorm": lambda i: policies.knorm(*args, i(12)),
        }
        for name, call in calls.items():
            want, got = call(int), call(like)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"{name} with {like}"
    assert policies.pyramidkv_budget(np.int64(1), np.int32(4), torch.tensor(1000), np.int64(64), np.int16(8)) == 82
    _assert_same_kept(policies.snapkv(q, *args, np.int64(32)), torch_forms.snapkv_torch(q, keys, kv.seq_lens, 32), LENS)


@pytest.mark.parametrize("bad", [0, -3, 10.0, np.float64(10.0), True, "10", torch.tensor(10.0)])
def test_policies_reject_bad_budget(gen, bad):
    kv, q, _ = _make_window(gen, LENS, 8, 8, 2, 64, 16)
    args = (kv.k_cache, kv.block_table, kv.seq_lens)
    for call in (lambda: policies.streaming_llm(kv.seq_lens, 2, bad), lambda: policies.snapkv(q, *args, bad),
                 lambda: policies.tova(q[:, -1:], *args, bad), lambda: policies.knorm(*args, bad),
                 lambda: policies.corm(q[:, -2:], kv.k_cache, kv.v_cache, *args[1:], budget=bad)):
        with pytest.raises(ValueError, match=r"budget must be an int >= 1, got"):
            call()


def test_policies_reject_bad_integer_arguments(gen):
    kv, q, _ = _make_window(gen, LENS, 8, 8, 2, 64, 16)
    args = (kv.k_cache, kv.block_table, kv.seq_lens)
    for heads in (-1, 0, 2.0, True):
        with pytest.raises(ValueError, match=r"num_kv_heads must be an int >= 1, got"):
            policies.streaming_llm(kv.seq_lens, heads, 8)
    for sinks in (-1, 9, 4.0):
        with pytest.raises(ValueError, match=r"num_sinks must be an int in \[0, budget = 8\], got"):
            policies.streaming_llm(kv.seq_lens, 2, 8, num_sinks=sinks)
    scores = policies.h2o_scores(q, *args)
    for recent in (-1, 31, 4.0):
        with pytest.raises(ValueError, match=r"recent must be an int in \[0, budget = 30\], got"):
            policies.h2o(scores, kv.seq_lens, 30, recent=recent)
    for kernel in (3, 5.0, None):
        with pytest.raises(ValueError, match=r"kernel_size must be 5 or 7 when pooling is on, got"):
            policies.snapkv(q, *args, 32, kernel_size=kernel)
        with pytest.raises(ValueError, match=r"kernel_size must be 5 or 7"):
            policies.adakv(q, *args, 32, kernel_size=kernel)
    empty = kv.seq_lens[:0]  # no sequence: the arguments are still checked
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 4\), got"):
        policies.pyramidkv(q[:0], kv.k_cache, kv.block_table[:0], empty, 40, layer=4, num_layers=4)
    with pytest.raises(ValueError, match=r"num_layers must be an int >= 2, got"):
        policies.pyramidkv(q, *args, 40, layer=0, num_layers=1)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 4\), got"):
        policies.pyramidkv_budget(1.0, 4, 1000, 64, 8)


def test_tova_matches_torch(gen):
    kv, q, keys = _make_window(gen, LENS, 1, 8, 2, 64, 16)
    sel = policies.tova(q, kv.k_cache, kv.block_table, kv.seq_lens, 20)
    _assert_same_kept(sel, torch_forms.tova_torch(q, keys, kv.seq_lens, 20), LENS)
    assert torch.equal(sel[0][0, 0], sel[0][0, 1])  # one set for the whole layer


def test_corm_matches_torch(gen):
    # Peaked attention (q scaled by 4, 2 recent queries, group 1) so that CORM drops most keys;
    # with plain random inputs nearly every key gets a vote and the test would say little.
    kv = make_paged_kv(list(LENS), 16, 2, 64, gen=gen)
    q = randn(len(LENS), 2, 2, 64, gen=gen, scale=4.0)
    keys = torch_forms.dense_keys(kv.k_cache, kv.block_table, kv.seq_lens)
    sel = policies.corm(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    assert int(sel[1][0]) < LENS[0] // 2
    oracle, votes = torch_forms.corm_torch(q, keys, kv.seq_lens)
    _assert_same_kept(sel, oracle, LENS)
    for b, n in enumerate(LENS):  # every key CORM votes for is kept (padding only adds)
        kept = sel[0][b, :, : int(sel[1][b])]
        for h in range(2):
            assert set(votes[b][h].nonzero().flatten().tolist()) <= set(kept[h].tolist())
    # An empty sequence beside the others: the torch form handles it too (it once failed to infer a
    # reshape of 0 keys).
    kv0 = make_paged_kv([LENS[0], 0], 16, 2, 64, gen=gen)
    keys0 = torch_forms.dense_keys(kv0.k_cache, kv0.block_table, kv0.seq_lens)
    _assert_same_kept(policies.corm(q[:2], kv0.k_cache, kv0.v_cache, kv0.block_table, kv0.seq_lens),
                      torch_forms.corm_torch(q[:2], keys0, kv0.seq_lens)[0], (LENS[0], 0))
    capped = policies.corm(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, budget=8)
    _assert_same_kept(capped, torch_forms.corm_torch(q, keys, kv.seq_lens, budget=8)[0], LENS)
    # fill: exactly min(budget, len) per sequence, the voted keys first (here fewer than the budget).
    budget = LENS[0] // 2
    filled = policies.corm(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, budget=budget, fill=True)
    assert filled[1].tolist() == [min(budget, n) for n in LENS]
    for b in range(len(LENS)):
        kept = filled[0][b, :, : int(filled[1][b])]
        for h in range(2):
            voted = set(votes[b][h].nonzero().flatten().tolist())
            if len(voted) <= budget:
                assert voted <= set(kept[h].tolist())
    with pytest.raises(ValueError, match="fill=True needs a budget"):
        policies.corm(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, fill=True)


def test_knorm_matches_torch(gen):
    kv, _, keys = _make_window(gen, LENS, 1, 2, 2, 64, 16)
    sel = policies.knorm(kv.k_cache, kv.block_table, kv.seq_lens, 12)
    _assert_same_kept(sel, torch_forms.knorm_torch(keys, kv.seq_lens, 12), LENS)


def test_snapkv_end_to_end_with_page_freeing(gen):
    """Prefill into a PagedKVCache, SnapKV-select, compact, truncate: decode equals attention over
    the kept tokens, and the freed pages are back on the free list."""
    cache = kvcore.PagedKVCache(1, 2, 64, num_pages=20, page_size=8, dtype=torch.float32)
    sid = cache.add_sequence()
    n, w, budget = 100, 8, 30
    slots = cache.reserve([sid], [n])
    k = randn(n, 2, 64, gen=gen)
    v = randn(n, 2, 64, gen=gen)
    cache.append(0, k, v, slots)
    k_cache, v_cache = cache.kv(0)
    table, lens = cache.block_table([sid]), cache.seq_lens([sid])
    q_win = randn(1, w, 4, 64, gen=gen)
    kept, kept_lens = policies.snapkv(q_win, k_cache, table, lens, budget)
    policies.apply((kept, kept_lens), k_cache, v_cache, table, lens)
    assert int(lens[0]) == budget
    freed = cache.truncate(sid, budget)
    assert freed == math.ceil(n / 8) - math.ceil(budget / 8) and cache.used_pages == math.ceil(budget / 8)
    q = randn(1, 4, 64, gen=gen)
    out = cache.decode(0, q, [sid])
    for h in range(2):
        sel = kept[0, h]
        ref, _ = reference.dense_attention(q[0, 2 * h: 2 * h + 2], k[sel, h: h + 1], v[sel, h: h + 1])
        torch.testing.assert_close(out[0, 2 * h: 2 * h + 2].double(), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="new_len"):
        cache.truncate(sid, budget + 1)


# ---- opcheck -----------------------------------------------------------------------------------

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck_attention_scores(gen):
    kv = make_paged_kv([20, 7], 8, 2, 64, gen=gen)
    q = randn(2, 4, 4, 64, gen=gen)
    out = torch.empty(2, 2, 24)
    lse = randn(2, 4, 4, gen=gen) + 5.0
    for args in [(None, "sum", "none", 5), (lse, "max", "avg", 7)]:
        torch.library.opcheck(torch.ops.kvcore.attention_scores.default,
                              (q, kv.k_cache, kv.block_table, kv.seq_lens, args[0], 0.125, *args[1:], out),
                              test_utils=OPCHECK_UTILS)


def test_opcheck_compact_kv(gen):
    kv = make_paged_kv([20, 7], 8, 2, 64, gen=gen)
    kept = torch.tensor([[[0, 3, 5, 19], [1, 2, 3, 4]], [[0, 1, 2, 6], [2, 4, 5, 6]]], dtype=torch.int64)
    kl = torch.tensor([4, 3], dtype=torch.int32)
    torch.library.opcheck(torch.ops.kvcore.compact_kv.default,
                          (kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens.clone(), kept, kl),
                          test_utils=OPCHECK_UTILS)


# ---- bad input -----------------------------------------------------------------------------------


# Each case is a row of docs/bad_input.md (tests/test_bad_input_doc.py checks the two agree): the
# call raises the error, its message names the argument, and nothing is written (scores stay
# NaN-poisoned; caches and seq_lens unchanged). Device cases need a second device and a CUDA
# kernel to dispatch to: they run on the GPU host once the op's CUDA kernel is registered.
_CUDA_BAD = {
    "attention_scores": [pytest.mark.cuda, cuda_scores],
    "compact_kv": [pytest.mark.cuda, cuda_compact],
}


def _bad_params(op: str, cases: list) -> list:
    return [pytest.param(b, id=b.name, marks=_CUDA_BAD[op] if b.cuda_only else []) for b in cases]


def _bad_devices(op: str) -> list:
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=_CUDA_BAD[op])]


def _score_args(device: str, gen) -> SimpleNamespace:
    # Sequence 0 uses 3 pages of 8 (20 tokens), sequence 1 one page; table capacity 4 x 8 = 32.
    # CUDA takes bf16/fp16 only: its dtype check would otherwise answer every other case first.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kv = make_paged_kv([20, 7], 8, 2, 64, gen=gen, dtype=dtype, device=device)
    return SimpleNamespace(q=randn(2, 4, 4, 64, gen=gen, dtype=dtype, device=device), k_cache=kv.k_cache,
                           block_table=kv.block_table, seq_lens=kv.seq_lens.clone(),
                           out=poison(torch.empty(2, 2, 24, device=device)), kw={})


def _poisoned(shape, dtype=torch.float32):
    return lambda t, a, d: poison(torch.empty(*shape, dtype=dtype, device=d))


BAD_SCORES = [
    BadCase("q_fp64", _set("q", lambda t, a, d: t.double()), RuntimeError, r"\bq must be"),
    BadCase("k_cache_dtype", _set("k_cache", lambda t, a, d: t.half()), RuntimeError, r"k_cache must have dtype"),
    BadCase("block_table_int64", _set("block_table", lambda t, a, d: t.long()), RuntimeError,
            r"block_table must have dtype"),
    BadCase("seq_lens_int64", _set("seq_lens", lambda t, a, d: t.long()), RuntimeError, r"seq_lens must have dtype"),
    BadCase("out_dtype", _set("out", _poisoned((2, 2, 24), torch.float64)), RuntimeError, r"\bout must have dtype"),
    BadCase("lse_dtype", _set_kw("lse", "bf16"), RuntimeError, r"\blse must have dtype"),
    BadCase("q_rank", _set("q", lambda t, a, d: t[0]), ValueError, r"\bq must be 4-D"),
    BadCase("k_cache_rank", _set("k_cache", lambda t, a, d: t[0]), RuntimeError, r"k_cache must be 4-D"),
    BadCase("block_table_rank", _set("block_table", lambda t, a, d: t[0]), RuntimeError, r"block_table must be 2-D"),
    BadCase("seq_lens_rank", _set("seq_lens", lambda t, a, d: t[:, None]), RuntimeError, r"seq_lens must be 1-D"),
    BadCase("out_rank", _set("out", _poisoned((2, 48))), RuntimeError, r"\bout must be 3-D"),
    BadCase("head_dim_mismatch", _set("k_cache", lambda t, a, d: t[..., :32]), RuntimeError, r"k_cache head_dim"),
    BadCase("heads_not_dividing", _set("q", lambda t, a, d: t[:, :, :3]), RuntimeError,
            r"num_q_heads \(3\) must be a multiple of num_kv_heads \(2\)"),
    BadCase("window_zero", _set("q", lambda t, a, d: t[:, :0]), RuntimeError, r"\bq must hold at least one window"),
    BadCase("block_table_rows", _set("block_table", lambda t, a, d: t[:1]), RuntimeError,
            r"block_table must have batch"),
    BadCase("seq_lens_shape", _set("seq_lens", lambda t, a, d: t[:1]), RuntimeError, r"seq_lens must have shape"),
    BadCase("out_heads", _set("out", _poisoned((2, 3, 24))), RuntimeError, r"\bout must have shape"),
    BadCase("lse_shape", _set_kw("lse", "shape"), RuntimeError, r"\blse must have shape"),
    BadCase("out_not_contiguous", _set("out", lambda t, a, d: poison(torch.empty(2, 24, 2, device=d)).transpose(1, 2)),
            RuntimeError, r"\bout must be contiguous"),
    BadCase("q_last_dim_strided", _set("q", lambda t, a, d: t.transpose(2, 3).contiguous().transpose(2, 3)),
            RuntimeError, r"\bq must be contiguous in its last dim"),
    # (the kernels' scratch grows with the query rows, which an expanded q claims in no memory)
    BadCase("q_expanded", _set("q", lambda t, a, d: t[:, :1].expand(-1, 4, -1, -1)), RuntimeError,
            r"\bq must not be an expanded view \(stride 0 in dim 1\)"),
    BadCase("k_cache_inner_strided", _set("k_cache", lambda t, a, d: t.transpose(2, 3).contiguous().transpose(2, 3)),
            RuntimeError, r"k_cache must be densely packed"),
    BadCase("block_table_not_contiguous", _set("block_table", lambda t, a, d: t.t().contiguous().t()), RuntimeError,
            r"block_table must be contiguous"),
    BadCase("lse_not_contiguous", _set_kw("lse", "strided"), RuntimeError, r"\blse must be contiguous"),
    BadCase("page_out_of_range", _set_item("block_table", (0, 1), lambda a: a.k_cache.shape[0]), ValueError,
            r"block_table\[0, 1\]"),
    BadCase("page_negative", _set_item("block_table", (1, 0), lambda a: -1), ValueError, r"block_table\[1, 0\]"),
    BadCase("seq_len_past_capacity", _set_item("seq_lens", 1, lambda a: 1000), ValueError, r"seq_lens\[1\] = 1000"),
    BadCase("seq_len_negative", _set_item("seq_lens", 0, lambda a: -2), ValueError, r"seq_lens must be >= 0"),
    BadCase("seq_len_past_max_len", _set("out", _poisoned((2, 2, 10))), ValueError, r"seq_lens\[0\] = 20 exceeds"),
    BadCase("reduction_unknown", _set_kw("reduction", "median"), ValueError, r"reduction must be"),
    BadCase("pooling_unknown", _set_kw("pooling", "min"), ValueError, r"pooling must be"),
    BadCase("pool_kernel_3", lambda a, d: a.kw.update(pooling="avg", pool_kernel=3), ValueError,
            r"pool_kernel must be 5 or 7"),
    BadCase("scale_negative", _set_kw("scale", -1.0), ValueError, r"scale must be"),
    BadCase("scale_nan", _set_kw("scale", math.nan), ValueError, r"scale must be"),
    BadCase("scale_past_float32", _set_kw("scale", 1e39), ValueError, r"scale must be .*float32's range"),
    BadCase("max_len_disagrees_with_out", _set_kw("max_len", 20), ValueError,
            r"max_len = 20 disagrees with out's key dimension \(24\)"),
    BadCase("k_cache_other_device", _set("k_cache", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"k_cache must be on the same device", cuda_only=True),
    BadCase("out_other_device", _set("out", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"\bout must be on the same device", cuda_only=True),
]


def _score_lse(a: SimpleNamespace, how: str, device: str) -> torch.Tensor:
    """A caller lse that is wrong in one way: ``bf16``, ``shape`` or ``strided``."""
    b, w, hq = a.q.shape[:3]
    if how == "bf16":
        return torch.zeros(b, w, hq, dtype=torch.bfloat16, device=device)
    if how == "shape":
        return torch.zeros(b, w - 1, hq, device=device)
    return torch.zeros(b, hq, w, device=device).transpose(1, 2)


@pytest.mark.parametrize("bad", _bad_params("attention_scores", BAD_SCORES))
@pytest.mark.parametrize("device", _bad_devices("attention_scores"))
def test_attention_scores_bad_input(device, bad, gen):
    a = _score_args(device, gen)
    bad.mutate(a, device)
    if isinstance(a.kw.get("lse"), str):
        a.kw["lse"] = _score_lse(a, a.kw["lse"], device)
    k_before = a.k_cache.clone()
    with pytest.raises(bad.error, match=bad.match):
        kvcore.attention_scores(a.q, a.k_cache, a.block_table, a.seq_lens, out=a.out, **a.kw)
    assert bool(torch.isnan(a.out).all()), "scores written by a failed call"
    assert torch.equal(a.k_cache, k_before)


def _compact_args(device: str, gen) -> SimpleNamespace:
    # Table capacity 4 pages x 8 = 32 tokens; sequence 0 holds 20, sequence 1 holds 7.
    kv = make_paged_kv([20, 7], 8, 2, 64, gen=gen, device=device)
    return SimpleNamespace(k_cache=kv.k_cache, v_cache=kv.v_cache, block_table=kv.block_table,
                           seq_lens=kv.seq_lens.clone(),
                           kept=torch.tensor([[[0, 3, 5], [1, 2, 3]], [[0, 1, 2], [2, 4, 5]]], device=device),
                           kept_lens=torch.tensor([3, 3], dtype=torch.int32, device=device))


BAD_COMPACT = [
    BadCase("k_cache_fp64", _set("k_cache", lambda t, a, d: t.double()), RuntimeError, r"k_cache must be"),
    BadCase("v_cache_dtype", _set("v_cache", lambda t, a, d: t.half()), RuntimeError, r"v_cache must have dtype"),
    BadCase("block_table_int64", _set("block_table", lambda t, a, d: t.long()), RuntimeError,
            r"block_table must have dtype"),
    BadCase("seq_lens_int64", _set("seq_lens", lambda t, a, d: t.long()), RuntimeError, r"seq_lens must have dtype"),
    BadCase("kept_int32", _set("kept", lambda t, a, d: t.int()), RuntimeError, r"kept must have dtype"),
    BadCase("kept_lens_int64", _set("kept_lens", lambda t, a, d: t.long()), RuntimeError,
            r"kept_lens must have dtype"),
    BadCase("k_cache_rank", _set("k_cache", lambda t, a, d: t[0]), RuntimeError, r"k_cache must be 4-D"),
    BadCase("kept_rank", _set("kept", lambda t, a, d: t[0]), RuntimeError, r"kept must be 3-D"),
    BadCase("kept_lens_rank", _set("kept_lens", lambda t, a, d: t[:, None]), RuntimeError, r"kept_lens must be 1-D"),
    BadCase("v_cache_shape", _set("v_cache", lambda t, a, d: t[:1]), RuntimeError, r"v_cache must have the shape"),
    BadCase("kept_heads", _set("kept", lambda t, a, d: t[:, :1]), RuntimeError, r"kept must have shape"),
    BadCase("kept_lens_shape", _set("kept_lens", lambda t, a, d: t[:1]), RuntimeError, r"kept_lens must have shape"),
    BadCase("seq_lens_shape", _set("seq_lens", lambda t, a, d: t[:1]), RuntimeError, r"seq_lens must have shape"),
    BadCase("kept_not_contiguous", _set("kept", lambda t, a, d: t.transpose(1, 2).contiguous().transpose(1, 2)),
            RuntimeError, r"kept must be contiguous"),
    BadCase("seq_lens_not_contiguous", _set("seq_lens", lambda t, a, d: torch.stack([t, t], 1)[:, 0]), RuntimeError,
            r"seq_lens must be contiguous"),
    BadCase("k_cache_inner_strided", _set("k_cache", lambda t, a, d: t.transpose(2, 3).contiguous().transpose(2, 3)),
            RuntimeError, r"k_cache must be densely packed"),
    BadCase("page_out_of_range", _set_item("block_table", (0, 2), lambda a: a.k_cache.shape[0]), ValueError,
            r"block_table\[0, 2\]"),
    BadCase("page_negative", _set_item("block_table", (1, 0), lambda a: -4), ValueError, r"block_table\[1, 0\]"),
    BadCase("seq_len_past_capacity", _set_item("seq_lens", 0, lambda a: 33), ValueError, r"seq_lens\[0\] = 33"),
    BadCase("kept_len_past_seq_len", _set_item("kept_lens", 1, lambda a: 9), ValueError, r"kept_lens\[1\] = 9"),
    BadCase("kept_len_negative", _set_item("kept_lens", 0, lambda a: -1), ValueError, r"kept_lens\[0\] = -1"),
    BadCase("kept_unsorted", _set_item("kept", (0, 1, 1), lambda a: 0), ValueError, r"kept\[0, 1\] must be strictly"),
    BadCase("kept_past_seq_len", _set_item("kept", (0, 0, 2), lambda a: 25), ValueError, r"kept\[0, 0, 2\] = 25"),
    BadCase("kept_negative", _set_item("kept", (1, 1, 0), lambda a: -3), ValueError, r"kept\[1, 1, 0\] = -3"),
    BadCase("caches_same_memory", lambda a, d: setattr(a, "v_cache", a.k_cache), ValueError,
            r"k_cache and v_cache are the same memory"),
    BadCase("cache_pages_overlap", lambda a, d: [setattr(a, n, getattr(a, n)[:1].expand(a.k_cache.shape[0], -1, -1, -1))
                                                 for n in ("k_cache", "v_cache")],
            RuntimeError, r"k_cache's pages overlap: page stride 0 < 1024 elements"),
    BadCase("kept_other_device", _set("kept", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"kept must be on the same device", cuda_only=True),
    BadCase("v_cache_other_device", _set("v_cache", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"v_cache must be on the same device", cuda_only=True),
]


@pytest.mark.parametrize("bad", _bad_params("compact_kv", BAD_COMPACT))
@pytest.mark.parametrize("device", _bad_devices("compact_kv"))
def test_compact_kv_bad_input(device, bad, gen):
    a = _compact_args(device, gen)
    bad.mutate(a, device)
    k_before, v_before, lens_before = a.k_cache.clone(), a.v_cache.clone(), a.seq_lens.clone()
    with pytest.raises(bad.error, match=bad.match):
        kvcore.compact_kv(a.k_cache, a.v_cache, a.block_table, a.seq_lens, a.kept, a.kept_lens)
    assert torch.equal(a.k_cache, k_before) and torch.equal(a.v_cache, v_before)
    assert torch.equal(a.seq_lens, lens_before)


@pytest.mark.parametrize("device", _bad_devices("compact_kv"))
def test_compact_kv_op_rejects_one_memory_for_both_caches(device, gen):
    # The op itself, not only the wrapper: C++ callers and direct torch.ops users bypass ops.py.
    a = _compact_args(device, gen)
    k_before, lens_before = a.k_cache.clone(), a.seq_lens.clone()
    with pytest.raises(RuntimeError, match=r"k_cache and v_cache are the same memory"):
        torch.ops.kvcore.compact_kv(a.k_cache, a.k_cache, a.block_table, a.seq_lens, a.kept, a.kept_lens)
    assert torch.equal(a.k_cache, k_before) and torch.equal(a.seq_lens, lens_before)


def test_ops_clamp_bad_contents_without_validation(gen, no_validation):
    """With validation off, out-of-range pages, lengths and kept positions never crash (clamped)."""
    kv = make_paged_kv([20, 7], 8, 2, 64, gen=gen)
    table = kv.block_table.clone()
    table[0, 0] = 10**6
    lens = torch.tensor([10**5, -3], dtype=torch.int32)
    q = randn(2, 4, 4, 64, gen=gen)
    out = kvcore.attention_scores(q, kv.k_cache, table, lens, pooling="avg", max_len=24)
    assert out.shape == (2, 2, 24)
    kept = torch.tensor([[[5, 10**9, -7], [3, 2, 1]], [[0, 0, 0], [1, 1, 1]]])
    kvcore.compact_kv(kv.k_cache, kv.v_cache, table, lens, kept, torch.tensor([3, 50], dtype=torch.int32))
    assert lens.tolist() == [3, 0]


# ---- compact_kv on CUDA: the multi-CTA in-place kernel against the reference and the CPU op -------
# Caches hold random data everywhere (spare pages and the rows past each sequence too), so a move
# to or from the wrong place, or a write past the new length, changes something the reference
# leaves unchanged (the in-place op has no output buffer to poison: the cache is its own poison).
# Long heads span many chunks (64 rows at D128 bf16, 16 at D256 fp32), so the cross-chunk
# read-before-write ordering is exercised by the dense, streaming and shift patterns ("shift":
# every chunk's destinations are the next chunk's first source, so every chunk waits for a flag).
# Odd head dims take the narrower copy widths (8, 4 and 2 bytes; 2 bytes is the non-cp.async path).

cuda_compact_only = [pytest.mark.cuda, cuda_compact]


def _kept_pattern(kind: str, n: int, count: int, gen) -> torch.Tensor:
    """Strictly increasing positions in [0, n): ``count`` of them (``kind`` decides which)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    if kind == "prefix":  # kept == arange: nothing moves
        return torch.arange(count)
    if kind == "all":
        return torch.arange(n)[:count]
    if kind == "streaming":  # 4 sinks + the most recent tokens
        sinks = min(4, count)
        return torch.cat([torch.arange(sinks), torch.arange(n - (count - sinks), n)]).unique()[:count]
    if kind == "last":  # every source far from its destination
        return torch.arange(n - count, n)
    if kind == "shift":  # drop the first token: each row comes from the next one (maximal overlap)
        return torch.arange(1, count + 1)
    return torch.randperm(n, generator=gen)[:count].sort().values  # "random": dense or sparse by count


def _compact_inputs(lens, counts, kind, hkv, d, ps, dtype, gen, max_kept=None, strided=False):
    kv = make_paged_kv(list(lens), ps, hkv, d, gen=gen, dtype=dtype, strided_cache=strided)
    max_kept = max(list(counts) + [1]) if max_kept is None else max_kept
    kept = torch.full((len(lens), hkv, max_kept), 10**6, dtype=torch.int64)  # junk past each count
    for b, (n, c) in enumerate(zip(lens, counts)):
        for h in range(hkv):
            kept[b, h, :c] = _kept_pattern(kind, n, c, gen)
    return kv, kept, torch.tensor(list(counts), dtype=torch.int32)


def _run_compact_cuda(kv, kept, kl):
    """compact_kv on CUDA (copies of the inputs) vs the reference and the CPU op; returns nothing."""
    dev = "cuda"
    ref_k, ref_v, ref_lens = reference.compact_kv(kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, kept, kl)
    k_c, v_c = kv.k_cache.clone(), kv.v_cache.clone()
    lens_c = kv.seq_lens.clone()
    kvcore.compact_kv(k_c, v_c, kv.block_table, lens_c, kept, kl)
    k_g, v_g = kv.k_cache.to(dev), kv.v_cache.to(dev)
    lens_g = kv.seq_lens.to(dev)
    res = kvcore.compact_kv(k_g, v_g, kv.block_table.to(dev), lens_g, kept.to(dev), kl.to(dev))
    assert res is lens_g
    torch.cuda.synchronize()
    assert torch.equal(lens_g.cpu(), ref_lens.cpu())
    assert torch.equal(k_g.cpu(), ref_k) and torch.equal(v_g.cpu(), ref_v), "CUDA compact_kv differs from the reference"
    assert torch.equal(k_g.cpu(), k_c) and torch.equal(v_g.cpu(), v_c), "CUDA and CPU compact_kv differ"


@pytest.mark.parametrize("kind", ["random", "streaming", "all", "prefix", "last", "shift"])
@pytest.mark.parametrize("d,ps", [(64, 16), (128, 1), (128, 16), (128, 64), (128, 128), (256, 256), (128, 5),
                                  (36, 16), (34, 8), (33, 16)], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_patterns(device, dtype, d, ps, kind, gen):
    # Ragged: a long sequence (many chunks per head), a short one, an empty one, one keeping 0.
    lens = (1500, 37, 0, 300)
    if kind in ("all", "prefix"):
        counts = (1500 if kind == "all" else 700, 37 if kind == "all" else 20, 0, 0)
    else:
        counts = (750, 9, 0, 0)
    kv, kept, kl = _compact_inputs(lens, counts, kind, 4, d, ps, dtype, gen, strided=(ps == 64))
    _run_compact_cuda(kv, kept, kl)


@pytest.mark.parametrize("frac", [0.02, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_long_dense_and_sparse(device, frac, gen):
    """B2 Hkv8 D128 bf16, 12000 tokens: sparse (SnapKV-like scattered) to dense keeps, many chunks."""
    lens = (12000, 8191)
    counts = tuple(max(1, int(n * frac)) for n in lens)
    kv, kept, kl = _compact_inputs(lens, counts, "random", 8, 128, 16, torch.bfloat16, gen)
    _run_compact_cuda(kv, kept, kl)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_default_lens_and_repeat(device, gen):
    """kept_lens defaulting to max_kept, then a second compaction of the compacted cache."""
    lens = (900, 600)
    kv, kept, kl = _compact_inputs(lens, (400, 400), "random", 2, 64, 16, torch.float16, gen, max_kept=400)
    k_g, v_g, bt_g, lens_g = kv.k_cache.cuda(), kv.v_cache.cuda(), kv.block_table.cuda(), kv.seq_lens.cuda()
    ref = reference.compact_kv(kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, kept, kl)
    kvcore.compact_kv(k_g, v_g, bt_g, lens_g, kept.cuda())
    assert lens_g.tolist() == [400, 400]
    assert torch.equal(k_g.cpu(), ref[0]) and torch.equal(v_g.cpu(), ref[1])
    kept2 = torch.stack([torch.stack([torch.randperm(400, generator=gen)[:150].sort().values for _ in range(2)])
                         for _ in range(2)])
    kl2 = torch.tensor([150, 150], dtype=torch.int32)
    ref2 = reference.compact_kv(ref[0], ref[1], kv.block_table, ref[2], kept2, kl2)
    kvcore.compact_kv(k_g, v_g, bt_g, lens_g, kept2.cuda(), kl2.cuda())
    assert lens_g.tolist() == [150, 150]
    assert torch.equal(k_g.cpu(), ref2[0]) and torch.equal(v_g.cpu(), ref2[1])


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_scratch_reuse(device, gen):
    """The kernel's scratch persists per stream and each launch leaves it reusable (counters back to
    zero, a new mark for its flags): calls that shrink and grow the chunk count, on the default
    stream and on a side stream in turn, each match the reference (a stale flag or counter would
    move rows early, skip a wait or drop a CTA's ticket)."""
    side = torch.cuda.Stream()
    plan = [((3000, 40), (1500, 20), "random", None), ((60,), (30,), "shift", None),
            ((5000, 2000), (4000, 900), "streaming", side), ((5000, 2000), (4000, 900), "random", None),
            ((700, 700), (350, 100), "last", side), ((9000,), (6000,), "random", side),
            ((300, 20), (150, 5), "random", None)]
    for lens, counts, kind, stream in plan:
        kv, kept, kl = _compact_inputs(lens, counts, kind, 4, 64, 16, torch.bfloat16, gen)
        ref_k, ref_v, ref_lens = reference.compact_kv(kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, kept, kl)
        args = [t.cuda() for t in (kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, kept, kl)]
        torch.cuda.synchronize()
        with torch.cuda.stream(stream if stream is not None else torch.cuda.current_stream()):
            kvcore.compact_kv(*args)
        torch.cuda.synchronize()
        assert args[3].tolist() == ref_lens.tolist(), (lens, counts, kind)
        assert torch.equal(args[0].cpu(), ref_k) and torch.equal(args[1].cpu(), ref_v), (lens, counts, kind)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_memset_scratch_in_subprocess(device):
    """KVCORE_COMPACT_SCRATCH=memset (read once per process: every call gets a fresh scratch
    zeroed by a memset node, the form graph-captured calls always use): the CUDA compact_kv tests."""
    run_tests_with_env("KVCORE_COMPACT_SCRATCH", "memset", ["tests/test_eviction.py"],
                       "compact_kv_cuda and not in_subprocess and not misspelt", 40, "-m", "cuda")


# Inputs for the misspelt-switch tests (run in a fresh process).
_COMPACT_SWITCH_SETUP = """
k = torch.randn(2, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
v = torch.randn(2, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
bt = torch.tensor([[0, 1]], dtype=torch.int32, device="cuda")
sl = torch.tensor([20], dtype=torch.int32, device="cuda")
kept = torch.arange(10, device="cuda").view(1, 1, 10).expand(1, 2, 10).contiguous()
"""


@pytest.mark.parametrize("kernel", ["pipelined", "chunk"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_each_kernel_in_subprocess(device, kernel):
    """KVCORE_COMPACT_KERNEL=pipelined / chunk (read once per process; the default `auto` takes the
    pipelined kernel only for calls with more chunks than resident CTAs, which few cases here
    have): the CUDA compact_kv tests through each kernel alone."""
    run_tests_with_env("KVCORE_COMPACT_KERNEL", kernel, ["tests/test_eviction.py"],
                       "compact_kv_cuda and not in_subprocess and not misspelt", 40, "-m", "cuda")


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_misspelt_kernel_switch_is_an_error(device):
    """A misspelt KVCORE_COMPACT_KERNEL fails the call instead of silently timing the default."""
    assert_switch_value_rejected(
        "KVCORE_COMPACT_KERNEL", "pipelinde",
        _COMPACT_SWITCH_SETUP, "kvcore.compact_kv(k, v, bt, sl, kept)")


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_misspelt_scratch_switch_is_an_error(device):
    """A misspelt KVCORE_COMPACT_SCRATCH fails the call instead of silently timing the default."""
    assert_switch_value_rejected(
        "KVCORE_COMPACT_SCRATCH", "memsett",
        _COMPACT_SWITCH_SETUP, "kvcore.compact_kv(k, v, bt, sl, kept)")


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_edge_shapes(device, gen):
    """No kept column (max_kept 0), every sequence empty, one token, a page of one row."""
    for lens, counts, max_kept, ps in [((5, 3), (0, 0), 0, 4), ((0, 0), (0, 0), 3, 8), ((1,), (1,), 1, 1),
                                       ((2, 9), (1, 1), 4, 1)]:
        kv, kept, kl = _compact_inputs(lens, counts, "last", 2, 64, ps, torch.bfloat16, gen, max_kept=max_kept)
        _run_compact_cuda(kv, kept, kl)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_clamps_bad_contents(device, gen, no_validation):
    """Validation off: junk positions, lengths and pages never crash or hang the CUDA kernel."""
    kv = make_paged_kv([20, 7], 8, 2, 64, gen=gen, device="cuda")
    table = kv.block_table.clone()
    table[0, 0] = 10**6
    lens = torch.tensor([10**5, -3], dtype=torch.int32, device="cuda")
    kept = torch.tensor([[[5, 10**9, -7], [3, 2, 1]], [[0, 0, 0], [1, 1, 1]]], device="cuda")
    kvcore.compact_kv(kv.k_cache, kv.v_cache, table, lens, kept, torch.tensor([3, 50], dtype=torch.int32, device="cuda"))
    torch.cuda.synchronize()
    assert lens.tolist() == [3, 0]


@pytest.mark.parametrize("kind,count", [("random", 65536), ("random", 2048), ("last", 2048), ("streaming", 4096),
                                        ("shift", 131071)], ids=lambda x: str(x))
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_large_seq(device, kind, count, gen):
    """S 131072 (the bench's length; 1024-2048 chunks per head, two search rounds), page 16, bf16:
    scattered keeps (overlapping their destinations), far sources, sinks + window, a full shift."""
    kv, kept, kl = _compact_inputs((131072,), (count,), kind, 2, 128, 16, torch.bfloat16, gen, strided=True)
    _run_compact_cuda(kv, kept, kl)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_mixed_heads(device, gen):
    """Every head of a sequence keeps the same count (one seq_len per sequence) but its own positions:
    one head each of prefix (nothing moves), far sources, shift, scattered, sinks + window."""
    lens, counts, kinds = (3000, 513, 64, 7), (1200, 500, 63, 0), ["prefix", "last", "shift", "random", "streaming"]
    kv = make_paged_kv(list(lens), 16, len(kinds), 128, gen=gen, dtype=torch.float16)
    kept = torch.full((len(lens), len(kinds), max(counts)), -(10**6), dtype=torch.int64)
    for b, (n, c) in enumerate(zip(lens, counts)):
        for h, kind in enumerate(kinds):
            kept[b, h, :c] = _kept_pattern(kind, n, c, gen)
    _run_compact_cuda(kv, kept, torch.tensor(counts, dtype=torch.int32))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_graph_replay(device, gen):
    """Captured once in a CUDA graph (the scratch comes from the graph's pool, zeroed by a memset
    node), replayed on new cache contents, positions and lengths: each replay matches the reference."""
    lens0, hkv, d, ps, max_kept = (2000, 700), 4, 128, 16, 900
    kv = make_paged_kv(list(lens0), ps, hkv, d, gen=gen, dtype=torch.bfloat16)
    k_g, v_g, bt_g = kv.k_cache.cuda(), kv.v_cache.cuda(), kv.block_table.cuda()
    lens_g = torch.empty(2, dtype=torch.int32, device="cuda")
    kept_g = torch.empty(2, hkv, max_kept, dtype=torch.int64, device="cuda")
    kl_g = torch.empty(2, dtype=torch.int32, device="cuda")

    def fill(lens, counts, kind):
        k_g.copy_(randn(*k_g.shape, gen=gen, dtype=torch.bfloat16))
        v_g.copy_(randn(*v_g.shape, gen=gen, dtype=torch.bfloat16))
        kept = torch.full((2, hkv, max_kept), 10**6, dtype=torch.int64)
        for b, (n, c) in enumerate(zip(lens, counts)):
            for h in range(hkv):
                kept[b, h, :c] = _kept_pattern(kind, n, c, gen)
        kept_g.copy_(kept)
        lens_g.copy_(torch.tensor(lens, dtype=torch.int32))
        kl_g.copy_(torch.tensor(counts, dtype=torch.int32))
        return reference.compact_kv(k_g.cpu(), v_g.cpu(), kv.block_table, lens_g.cpu(), kept, kl_g.cpu())

    fill(lens0, (900, 300), "random")
    kvcore.compact_kv(k_g, v_g, bt_g, lens_g, kept_g, kl_g)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kvcore.compact_kv(k_g, v_g, bt_g, lens_g, kept_g, kl_g)
    for lens, counts, kind in [((2000, 700), (900, 300), "random"), ((1500, 20), (900, 19), "shift"),
                               ((2000, 0), (100, 0), "last"), ((900, 700), (900, 600), "streaming")]:
        ref_k, ref_v, ref_lens = fill(lens, counts, kind)
        graph.replay()
        torch.cuda.synchronize()
        assert lens_g.tolist() == ref_lens.tolist()
        assert torch.equal(k_g.cpu(), ref_k) and torch.equal(v_g.cpu(), ref_v), f"replay {lens} {counts} {kind}"


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_compact_kv_cuda_junk_positions_long_never_hang(device, gen, no_validation):
    """Validation off, many chunks per head, positions unsorted, repeated and out of range: the
    chunk searches see a non-monotone kept; the kernel must still end (it only waits on smaller
    tickets) and write the clamped lengths."""
    kv = make_paged_kv([5000, 3000], 16, 2, 128, gen=gen, dtype=torch.bfloat16, device="cuda")
    kept = torch.randint(-100, 6000, (2, 2, 4000), generator=gen).to("cuda")
    kept[1, 0] = 7  # every row from one position
    lens = kv.seq_lens.clone()
    kvcore.compact_kv(kv.k_cache, kv.v_cache, kv.block_table, lens, kept,
                      torch.tensor([4000, 4000], dtype=torch.int32, device="cuda"))
    torch.cuda.synchronize()
    assert lens.tolist() == [4000, 3000]
    assert bool(torch.isfinite(kv.k_cache.float()).all())  # moved data only, never garbage bits


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_compact_only)])
def test_opcheck_compact_kv_cuda(device, gen):
    kv = make_paged_kv([20, 7], 8, 2, 64, gen=gen, dtype=torch.bfloat16, device="cuda")
    kept = torch.tensor([[[0, 3, 5, 19], [1, 2, 3, 4]], [[0, 1, 2, 6], [2, 4, 5, 6]]], dtype=torch.int64, device="cuda")
    kl = torch.tensor([4, 3], dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.kvcore.compact_kv.default,
                          (kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens.clone(), kept, kl),
                          test_utils=OPCHECK_UTILS)
