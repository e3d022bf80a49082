"""gqa_decode's optional H2O score accumulation (``score=``) against kvcore.reference.gqa_decode_score,
on CPU and CUDA: shapes, windows, soft caps, forced splits, accumulation over calls, out/lse unchanged,
bad input, opcheck, and an H2O decode loop that keeps the same tokens as the CPU path.

The score buffer starts from random values (never zeros), so only the attended keys may change and
each by the step's summed probabilities; positions past each sequence (or before its window) must
stay bit-for-bit what they were.
"""

from __future__ import annotations

import math

import pytest
import torch

import kvcore
from conftest import (HAS_CUDA, LSE_TOL, NO_CUDA_REASON, OUT_TOL, assert_switch_value_rejected, capture_graph,
                      make_paged_kv, poison, ragged_lens, randn, run_script_with_env, run_tests_with_env)
from kvcore import policies, reference

cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# Tolerance on each step's increment (probabilities O(1/L)..1 summed over G heads): the logits come
# from bf16/fp16 data converted exactly, so the error is the fp32 dot product's, the exp's and the
# lse's (a logit error d is a relative probability error d). On CUDA the unnormalised
# probabilities pass through fp16 scratch (values in [0, 1]: a relative error <= 2^-11 ~ 4.9e-4,
# or an absolute one <= 2^-25 below fp16's normal range), inside rtol. A soft cap goes through
# tanhf, whose error the plain decode tests bound by lse within 1e-3.
SCORE_TOL = dict(atol=1e-5, rtol=2e-3)
CAP_SCORE_TOL = dict(atol=1e-5, rtol=1e-2)


def _device_dtypes():
    cpu = [pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}") for dt in (torch.float32, torch.bfloat16)]
    cuda = [pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=cuda_only) for dt in (torch.bfloat16, torch.float16)]
    return cpu + cuda


def _score_buffer(batch, hkv, length, gen, device):
    return (randn(batch, hkv, length, gen=gen, device=device).abs() + 0.5).contiguous()


def _check_step(before, after, lens, add, window_left=-1, tol=SCORE_TOL):
    """after == before + add on the attended keys, bit-identical elsewhere."""
    assert not torch.isnan(after).any()
    torch.testing.assert_close((after.double() - before.double()).cpu(), add.cpu(), **tol)
    for b, n in enumerate(lens):
        start = 0 if window_left < 0 else max(0, n - 1 - window_left)
        assert torch.equal(after[b, :, :start], before[b, :, :start])
        assert torch.equal(after[b, :, n:], before[b, :, n:])


# (batch, Hq, Hkv, D, page_size, max_len, window_left, soft_cap)
CASES = [
    (4, 8, 8, 64, 16, 300, -1, 0.0),     # G1
    (5, 16, 4, 128, 16, 700, -1, 0.0),   # G4
    (3, 32, 4, 64, 64, 1000, -1, 0.0),   # G8
    (4, 16, 4, 128, 64, 500, 100, 0.0),  # sliding window
    (3, 8, 2, 128, 16, 400, -1, 30.0),   # soft cap
    (2, 16, 2, 64, 16, 260, 37, 20.0),   # both
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}Hq{c[1]}Hkv{c[2]}D{c[3]}ps{c[4]}w{c[6]}cap{int(c[7])}")
@pytest.mark.parametrize("device,dtype", _device_dtypes())
def test_gqa_decode_score_matches_reference(device, dtype, case, gen):
    batch, hq, hkv, d, ps, max_len, window_left, cap = case
    lens = ragged_lens(batch, max_len, ps, gen)  # includes 0 and 1
    kv = make_paged_kv(lens, ps, hkv, d, gen=gen, dtype=dtype, device=device)
    q = randn(batch, hq, d, gen=gen, dtype=dtype, device=device)
    cap_len = kv.block_table.shape[1] * ps
    score = _score_buffer(batch, hkv, cap_len + 5, gen, device)
    before = score.clone()
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(batch, hq, dtype=torch.float32, device=device))
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, window_left=window_left,
                      logit_soft_cap=cap, out=out, lse=lse, score=score)
    add = reference.gqa_decode_score(q, kv.k_cache, kv.block_table, kv.seq_lens, window_left=window_left,
                                     logit_soft_cap=cap, score_len=cap_len + 5)
    _check_step(before, score, lens, add, window_left, CAP_SCORE_TOL if cap > 0 else SCORE_TOL)
    # Each attending head's probabilities sum to 1, so a group adds G per non-empty sequence.
    for b, n in enumerate(lens):
        if n > 0:
            torch.testing.assert_close((score[b] - before[b]).double().sum(-1).cpu(),
                                       torch.full((hkv,), float(hq // hkv), dtype=torch.float64), atol=1e-3, rtol=1e-4)
    # out and lse are the plain decode's.
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                            window_left=window_left, logit_soft_cap=cap)
    torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


@pytest.mark.parametrize("num_splits", [1, 4, 0])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_score_splits_cuda(device, dtype, group, num_splits, gen):
    """Forced 1 and 4 splits (and automatic): score right, out/lse bitwise those of plain decode."""
    hkv, d, ps = 2, 128, 16
    lens = ragged_lens(5, 3000, ps, gen)
    kv = make_paged_kv(lens, ps, hkv, d, gen=gen, dtype=dtype, device=device)
    q = randn(5, hkv * group, d, gen=gen, dtype=dtype, device=device)
    score = _score_buffer(5, hkv, kv.block_table.shape[1] * ps, gen, device)
    before = score.clone()
    out, lse = kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, return_lse=True,
                                 num_splits=num_splits, score=score)
    plain_out, plain_lse = kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                             return_lse=True, num_splits=num_splits)
    if num_splits > 0:  # the same split, the same code for out/lse: bitwise equal
        assert torch.equal(out, plain_out) and torch.equal(lse, plain_lse)
    else:
        torch.testing.assert_close(out, plain_out, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(lse, plain_lse, **LSE_TOL)
    add = reference.gqa_decode_score(q, kv.k_cache, kv.block_table, kv.seq_lens, score_len=score.shape[2])
    _check_step(before, score, lens, add)


# The CUDA scratch path: fp16 P per 16-key block and head plus the block's base, read back by the
# decode kernel's fused epilogue (each CTA its own keys) or by the epilogue kernel
# (csrc/include/kvcore/decode_score.cuh, 1024 keys per CTA, 4 per thread; the narrow and wide
# subprocess tests below run these cases through it). The grid covers the head-loop bounds
# (groups 1, 2, 3, 5, 8, 12, 16: rows 8..15 of the mma tile from 9 up), single- and multi-split
# pairs, windows (the window start is not a multiple of 16 or 4), page sizes (power of two or
# not) and lengths at every block / CTA edge.
# (Hkv, group, D, page_size, lens, window_left, num_splits, q_scale)
SCRATCH_CASES = [
    (2, 1, 128, 16, [0, 1, 15, 16, 17, 1023, 1024, 1025], -1, 1, 1.0),
    (2, 2, 64, 16, [2049, 0, 33, 1], -1, 3, 1.0),
    (1, 3, 128, 24, [1000, 1, 47, 2100], -1, 0, 1.0),
    (2, 4, 128, 16, [4100, 17, 0, 1024], -1, 0, 1.0),
    (3, 5, 256, 16, [700, 1, 64, 65], 37, 2, 1.0),
    (2, 8, 64, 64, [3000, 2, 0, 1111], 1100, 0, 1.0),
    (2, 12, 128, 16, [513, 1, 1040], -1, 4, 1.0),
    (1, 16, 128, 32, [1500, 16, 3], 900, 1, 1.0),
    (2, 16, 64, 16, [2500, 1, 31], -1, 0, 1.0),
    # Peaked probabilities (logits of std ~8): the running max moves across tiles, many P are far
    # below 1 (fp16 subnormal or 0), a few keys hold most of the mass.
    (2, 4, 128, 16, [3000, 5, 1030], -1, 0, 8.0),
    (2, 8, 64, 16, [2000, 129], 300, 1, 8.0),
]


def _scratch_poisoned_workspace(batch, hq, max_pages, page_size, window_left, device):
    """The workspace the call needs, counters zero and everything after them NaN (0xFF bytes are a
    NaN in fp16 and fp32): a read of a scratch element the decode kernel did not write shows."""
    need = kvcore.ops.decode_score_workspace_bytes(batch, hq, max_pages, page_size, window_left)
    ws = torch.full((need,), 0xFF, dtype=torch.uint8, device=device)
    ws[: 1 << 20] = 0
    return ws


@pytest.mark.parametrize("case", SCRATCH_CASES,
                         ids=lambda c: f"Hkv{c[0]}G{c[1]}D{c[2]}ps{c[3]}w{c[5]}s{c[6]}x{int(c[7])}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_score_scratch_grid_cuda(device, dtype, case, gen):
    hkv, group, d, ps, lens, window_left, num_splits, q_scale = case
    batch, hq = len(lens), hkv * group
    kv = make_paged_kv(lens, ps, hkv, d, gen=gen, dtype=dtype, device=device)
    q = randn(batch, hq, d, gen=gen, dtype=dtype, device=device, scale=q_scale)
    max_pages = kv.block_table.shape[1]
    score = _score_buffer(batch, hkv, max_pages * ps + 3, gen, device)
    before = score.clone()
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(batch, hq, dtype=torch.float32, device=device))
    ws = _scratch_poisoned_workspace(batch, hq, max_pages, ps, window_left, device)
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, window_left=window_left, out=out,
                      lse=lse, workspace=ws, num_splits=num_splits, score=score)
    add = reference.gqa_decode_score(q, kv.k_cache, kv.block_table, kv.seq_lens, window_left=window_left,
                                     score_len=score.shape[2])
    _check_step(before, score, lens, add, window_left)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                            window_left=window_left)
    torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)
    # The counters are back to zero for the next call: a second call on the same workspace adds
    # the same increment again.
    ws[1 << 20:] = 0xFF
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, window_left=window_left,
                      workspace=ws, num_splits=num_splits, score=score)
    _check_step(before, score, lens, 2 * add, window_left)


@pytest.mark.parametrize("num_splits", [16, 0])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_score_fused_and_fallback_grids_cuda(device, num_splits, gen):
    """By default the decode kernel finishes the score itself when its grid is one wave (its CTAs
    wait for their pair's other splits); 16 forced splits of 64 pairs (1024 CTAs, past one wave on
    any GPU kvcore supports) fall back to the epilogue kernel, the automatic split count stays in
    one wave. Both: score right, two calls on one workspace (the counters reset), out/lse those of
    plain decode."""
    batch, hkv, group, d, ps = 8, 8, 4, 128, 16
    lens = ragged_lens(batch, 2100, ps, gen)
    kv = make_paged_kv(lens, ps, hkv, d, gen=gen, dtype=torch.bfloat16, device=device)
    q = randn(batch, hkv * group, d, gen=gen, dtype=torch.bfloat16, device=device)
    max_pages = kv.block_table.shape[1]
    score = _score_buffer(batch, hkv, max_pages * ps, gen, device)
    before = score.clone()
    ws = _scratch_poisoned_workspace(batch, hkv * group, max_pages, ps, -1, device)
    add = reference.gqa_decode_score(q, kv.k_cache, kv.block_table, kv.seq_lens, score_len=score.shape[2])
    for step in (1, 2):
        out, lse = kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, return_lse=True,
                                     workspace=ws, num_splits=num_splits, score=score)
        _check_step(before, score, lens, step * add)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[torch.bfloat16])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


@pytest.mark.parametrize("window_left, num_splits", [(-1, 0), (-1, 5), (1500, 0)])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_score_wide_block_table_cuda(device, window_left, num_splits, gen):
    """A block table much wider than the sequences (none fills it): each sequence's splits share
    its own keys (split_range.h), so a CTA's first key is no longer split x split_tokens; the
    score scratch (numbered from the window start) and the fused epilogue's staging must follow.
    Score, out and lse against the reference, twice on one poisoned workspace."""
    hkv, group, d, ps, capacity = 2, 4, 128, 16, 30000
    lens = [0, 1, 17, 1100, 2000, 5003]  # (1100: shorter than the window of 1500 and than the table)
    kv = make_paged_kv(lens, ps, hkv, d, gen=gen, dtype=torch.bfloat16, device=device,
                       extra_table_cols=capacity // ps - -(-max(lens) // ps))
    batch, hq, max_pages = len(lens), hkv * group, kv.block_table.shape[1]
    q = randn(batch, hq, d, gen=gen, dtype=torch.bfloat16, device=device)
    score = _score_buffer(batch, hkv, max_pages * ps, gen, device)
    before = score.clone()
    ws = _scratch_poisoned_workspace(batch, hq, max_pages, ps, window_left, device)
    add = reference.gqa_decode_score(q, kv.k_cache, kv.block_table, kv.seq_lens, window_left=window_left,
                                     score_len=score.shape[2])
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                            window_left=window_left)
    for step in (1, 2):
        out = poison(torch.empty_like(q))
        lse = poison(torch.empty(batch, hq, dtype=torch.float32, device=device))
        kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, window_left=window_left,
                          out=out, lse=lse, workspace=ws, num_splits=num_splits, score=score)
        _check_step(before, score, lens, step * add, window_left)
        torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[torch.bfloat16])
        torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_score_empty_block_table(device, gen):
    """A block table with no columns: nothing attended, the score (of width 0 or more) unchanged."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = randn(2, 4, 64, gen=gen, dtype=dtype, device=device)
    k = randn(3, 16, 2, 64, gen=gen, dtype=dtype, device=device)
    bt = torch.zeros(2, 0, dtype=torch.int32, device=device)
    sl = torch.zeros(2, dtype=torch.int32, device=device)
    score = _score_buffer(2, 2, 5, gen, device)
    before = score.clone()
    out, lse = kvcore.gqa_decode(q, k, k, bt, sl, return_lse=True, score=score)
    assert torch.equal(score, before)
    assert not out.float().abs().any() and bool((lse == -math.inf).all())


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_score_graph_replay_cuda(device, gen):
    """gqa_decode(score=) captured once in a CUDA graph (out, lse and workspace given: no
    allocation, no host sync) and replayed for new q, block tables and lengths."""
    batch, hq, hkv, d, ps, max_pages = 3, 16, 4, 128, 16, 80
    num_pages = batch * max_pages
    dt = torch.bfloat16
    k_cache = randn(num_pages, ps, hkv, d, gen=gen, dtype=dt, device=device)
    v_cache = randn(num_pages, ps, hkv, d, gen=gen, dtype=dt, device=device)
    q = torch.empty(batch, hq, d, dtype=dt, device=device)
    block_table = torch.empty(batch, max_pages, dtype=torch.int32, device=device)
    seq_lens = torch.empty(batch, dtype=torch.int32, device=device)
    out = torch.empty(batch, hq, d, dtype=dt, device=device)
    lse = torch.empty(batch, hq, dtype=torch.float32, device=device)
    score = torch.empty(batch, hkv, max_pages * ps, dtype=torch.float32, device=device)
    workspace = torch.zeros(kvcore.ops.decode_score_workspace_bytes(batch, hq, max_pages, ps),
                            dtype=torch.uint8, device=device)

    def fill(lens):
        perm = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages)
        block_table.copy_(perm.int())
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(randn(*q.shape, gen=gen, dtype=dt))
        score.copy_(_score_buffer(batch, hkv, max_pages * ps, gen, "cpu"))

    def step():
        kvcore.gqa_decode(q, k_cache, v_cache, block_table, seq_lens, out=out, lse=lse, workspace=workspace,
                          score=score)

    fill([600, 1, 37])
    graph = capture_graph(step)  # warm-up, then capture
    for lens in ([1280, 5, 100], [1, 0, 1279], [320, 1024, 1025]):
        fill(lens)
        before = score.clone()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        add = reference.gqa_decode_score(q, k_cache, block_table, seq_lens, score_len=score.shape[2])
        _check_step(before, score, lens, add)
        ref_out, _ = reference.gqa_decode(q, k_cache, v_cache, block_table, seq_lens)
        torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("device,dtype", _device_dtypes())
def test_gqa_decode_score_accumulates_over_calls(device, dtype, gen):
    lens = [130, 0, 47]
    kv = make_paged_kv(lens, 16, 2, 64, gen=gen, dtype=dtype, device=device)
    score = _score_buffer(3, 2, kv.block_table.shape[1] * 16, gen, device)
    before = score.clone()
    total = torch.zeros(score.shape, dtype=torch.float64)
    for _ in range(2):
        q = randn(3, 8, 64, gen=gen, dtype=dtype, device=device)
        kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, score=score)
        total += reference.gqa_decode_score(q, kv.k_cache, kv.block_table, kv.seq_lens, score_len=score.shape[2]).cpu()
    _check_step(before, score, lens, total)


@pytest.mark.parametrize("cap", [0.0, 30.0], ids=["nocap", "cap30"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gqa_decode_score_bitwise_one_key_cpu(dtype, cap, gen):
    """With one attended key (window_left=0) its probability is exactly 1, so each group adds
    exactly G, if the score pass recomputes the very logit the decode stored (an FMA fusing the
    soft cap's product into the subtraction of lse left it unrounded: 3.999995 instead of 4)."""
    lens = [37, 5, 16]
    kv = make_paged_kv(lens, 16, 2, 64, gen=gen, dtype=dtype, device="cpu")
    # Logits of tens (not ~1), where a float's last bit moves exp(x - lse) off 1.
    q = (30 * randn(3, 8, 64, gen=gen, device="cpu")).to(dtype)
    score = torch.zeros(3, 2, kv.block_table.shape[1] * 16)
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, window_left=0, logit_soft_cap=cap,
                      score=score)
    expected = torch.zeros_like(score)
    for b, n in enumerate(lens):
        expected[b, :, n - 1] = 4.0
    assert torch.equal(score, expected), (score - expected).abs().max()


def test_gqa_decode_score_cpu_matches_attention_scores(gen):
    """On CPU the decode-time score equals attention_scores with a one-query window (H2O's rule)."""
    lens = [90, 33, 1]
    kv = make_paged_kv(lens, 8, 2, 64, gen=gen)
    q = randn(3, 8, 64, gen=gen)
    score = torch.zeros(3, 2, kv.block_table.shape[1] * 8)
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, score=score)
    ref = kvcore.attention_scores(q.unsqueeze(1), kv.k_cache, kv.block_table, kv.seq_lens, max_len=score.shape[2])
    torch.testing.assert_close(score, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_score_nan_q_stays_in_its_group(device, gen):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lens = [40, 40]
    kv = make_paged_kv(lens, 8, 2, 64, gen=gen, dtype=dtype, device=device)
    q = randn(2, 4, 64, gen=gen, dtype=dtype, device=device)
    q[0, 1] = math.nan  # KV group 0 of sequence 0
    score = _score_buffer(2, 2, kv.block_table.shape[1] * 8, gen, device)
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, score=score)
    assert bool(torch.isnan(score[0, 0, :40]).all())
    assert not torch.isnan(score[0, 1]).any() and not torch.isnan(score[1]).any()
    assert not torch.isnan(score[0, 0, 40:]).any()


# ---- bad input ----------------------------------------------------------------------------------


def _bad_score_cases(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    cases = [
        ("dtype", lambda s: s.double(), r"score must have dtype"),
        ("rank", lambda s: s[0], r"score must have shape"),
        ("heads", lambda s: s[:, :1].contiguous(), r"score must have shape"),
        ("batch", lambda s: s[:1].contiguous(), r"score must have shape"),
        ("too_short", lambda s: s[..., :-1].contiguous(), r"score must have shape"),
        ("not_contiguous", lambda s: torch.cat([s, s], -1)[..., ::2], r"score must be contiguous"),
    ]
    if device == "cuda":
        cases.append(("other_device", lambda s: s.cpu(), r"score must be on the same device"))
    return dtype, cases


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_score_bad_input(device, gen):
    dtype, cases = _bad_score_cases(device)
    kv = make_paged_kv([20, 7], 8, 2, 64, gen=gen, dtype=dtype, device=device)
    q = randn(2, 4, 64, gen=gen, dtype=dtype, device=device)
    good = torch.zeros(2, 2, kv.block_table.shape[1] * 8, device=device)
    for name, mutate, match in cases:
        bad = mutate(good.clone())
        before = bad.clone()
        out = poison(torch.empty_like(q))
        with pytest.raises(RuntimeError, match=match):
            kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, score=bad)
        assert bool(torch.isnan(out).all()), f"{name}: out written by a failed call"
        assert torch.equal(bad.cpu().nan_to_num(), before.cpu().nan_to_num()), f"{name}: score written by a failed call"


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_score_small_workspace_cuda(device, gen):
    kv = make_paged_kv([200, 7], 16, 2, 64, gen=gen, dtype=torch.bfloat16, device=device)
    q = randn(2, 4, 64, gen=gen, dtype=torch.bfloat16, device=device)
    score = torch.zeros(2, 2, kv.block_table.shape[1] * 16, device=device)
    small = torch.zeros(1 << 20, dtype=torch.uint8, device=device)  # the counters only
    with pytest.raises(RuntimeError, match=r"score accumulation needs a workspace"):
        kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, workspace=small, score=score)
    need = kvcore.ops.decode_score_workspace_bytes(2, 4, kv.block_table.shape[1], 16)
    ws = torch.zeros(need, dtype=torch.uint8, device=device)
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, workspace=ws, score=score)
    add = reference.gqa_decode_score(q, kv.k_cache, kv.block_table, kv.seq_lens, score_len=score.shape[2])
    torch.testing.assert_close(score.double().cpu(), add.cpu(), **SCORE_TOL)  # started from zeros


# ---- opcheck -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_opcheck_gqa_decode_score(device, gen):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kv = make_paged_kv([5, 0, 19], 8, 2, 64, gen=gen, dtype=dtype, device=device)
    q = randn(3, 4, 64, gen=gen, dtype=dtype, device=device)
    out = torch.empty_like(q)
    lse = torch.empty(3, 4, dtype=torch.float32, device=device)
    score = torch.zeros(3, 2, kv.block_table.shape[1] * 8, device=device)
    workspace = None
    if device == "cuda":
        workspace = torch.zeros(kvcore.ops.decode_score_workspace_bytes(3, 4, kv.block_table.shape[1], 8),
                                dtype=torch.uint8, device=device)
    for window_left, cap, num_splits in [(-1, 0.0, 0), (7, 30.0, 2)]:
        args = (q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, 0.125, window_left, cap, out, lse,
                workspace, num_splits, score)
        torch.library.opcheck(torch.ops.kvcore.gqa_decode.default, args, test_utils=OPCHECK_UTILS)


# ---- an H2O decode loop ------------------------------------------------------------------------


def _h2o_loop(device, dtype, gen_seed, steps=6, budget=48):
    """Prefill scores (attention_scores), then decode steps that append a token and accumulate
    through gqa_decode(score=...), then one H2O selection. Returns (kept, kept_lens, scores)."""
    g = torch.Generator()
    g.manual_seed(gen_seed)
    lens = [150, 97]
    hq, hkv, d, ps = 8, 2, 64, 16
    kv = make_paged_kv(lens, ps, hkv, d, gen=g, dtype=dtype, device=device, extra_table_cols=2)
    cap_len = kv.block_table.shape[1] * ps
    q_prefill = randn(2, 4, hq, d, gen=g, dtype=dtype, device=device)
    # Prefill scores on the CPU (the same for both paths; attention_scores' CUDA kernel is not
    # what this test is about), then kept on the device.
    scores = policies.h2o_scores(q_prefill.cpu(), kv.k_cache.cpu(), kv.block_table.cpu(), kv.seq_lens.cpu()).to(device)
    assert scores.shape[2] == cap_len
    seq_lens = kv.seq_lens.clone()
    for _ in range(steps):
        k_new = randn(2, hkv, d, gen=g, dtype=dtype, device=device)
        v_new = randn(2, hkv, d, gen=g, dtype=dtype, device=device)
        q = randn(2, hq, d, gen=g, dtype=dtype, device=device)
        pos = seq_lens.long()
        slots = kv.block_table.long().gather(1, (pos // ps).view(-1, 1)).view(-1) * ps + pos % ps
        kvcore.append_paged_kv(k_new, v_new, kv.k_cache, kv.v_cache, slots)
        seq_lens += 1
        kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, seq_lens, score=scores)
    kept, kept_lens = policies.h2o(scores, seq_lens, budget)
    return kept, kept_lens, scores, seq_lens


def _assert_same_selection(sel_a, sel_b, scores_ref, lens, tol):
    """Same kept sets, except swaps between keys whose reference scores are within tol (ties)."""
    (ka, la), (kb, lb) = sel_a, sel_b
    assert torch.equal(la.cpu(), lb.cpu())
    for b, n in enumerate(lens):
        m = int(la[b])
        for h in range(ka.shape[1]):
            a = set(ka[b, h, :m].tolist())
            c = set(kb[b, h, :m].tolist())
            diff = a ^ c
            if diff:
                s = scores_ref[b, h].double().cpu()
                vals = sorted(float(s[p]) for p in diff)
                assert vals[-1] - vals[0] <= tol, f"sequence {b} head {h}: different kept tokens {sorted(diff)}"


def test_h2o_decode_loop_cpu_matches_attention_scores_accumulation():
    """CPU: accumulating through gqa_decode(score=) keeps the same tokens as accumulating each step
    with attention_scores (the policy's documented decode rule)."""
    kept, kept_lens, scores, seq_lens = _h2o_loop("cpu", torch.float32, 7)
    # The same loop with attention_scores(w=1) accumulation.
    g = torch.Generator()
    g.manual_seed(7)
    lens = [150, 97]
    hq, hkv, d, ps = 8, 2, 64, 16
    kv = make_paged_kv(lens, ps, hkv, d, gen=g, extra_table_cols=2)
    q_prefill = randn(2, 4, hq, d, gen=g)
    ref = policies.h2o_scores(q_prefill, kv.k_cache, kv.block_table, kv.seq_lens)
    sl = kv.seq_lens.clone()
    for _ in range(6):
        k_new, v_new, q = randn(2, hkv, d, gen=g), randn(2, hkv, d, gen=g), randn(2, hq, d, gen=g)
        pos = sl.long()
        slots = kv.block_table.long().gather(1, (pos // ps).view(-1, 1)).view(-1) * ps + pos % ps
        kvcore.append_paged_kv(k_new, v_new, kv.k_cache, kv.v_cache, slots)
        sl += 1
        ref += kvcore.attention_scores(q.unsqueeze(1), kv.k_cache, kv.block_table, sl, max_len=ref.shape[2])
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)
    _assert_same_selection((kept, kept_lens), policies.h2o(ref, sl, 48), ref, sl.tolist(), 1e-5)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_h2o_decode_loop_cuda_matches_cpu(device):
    """bf16 on CUDA vs bf16 on CPU, same seeded inputs: the same tokens kept (up to near-ties)."""
    cuda = _h2o_loop("cuda", torch.bfloat16, 11)
    cpu = _h2o_loop("cpu", torch.bfloat16, 11)
    torch.testing.assert_close(cuda[2].cpu(), cpu[2], atol=1e-4, rtol=1e-3)
    _assert_same_selection(cuda[:2], cpu[:2], cpu[2], cpu[3].tolist(), 2e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_gqa_decode_score_wide_epilogue_in_subprocess():
    """KVCORE_SCORE_EPILOGUE=wide (8 keys per epilogue thread: 16-byte P loads, float4 score accesses
    where aligned; read once per process): this file's CUDA tests, in a fresh process. The cases'
    score lengths and windows give both aligned (vector) and unaligned (scalar) threads."""
    run_tests_with_env("KVCORE_SCORE_EPILOGUE", "wide", ["tests/test_decode_score.py"],
                       "not in_subprocess and not misspelt", 40, "-m", "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_gqa_decode_score_epilogue_kernel_in_subprocess():
    """KVCORE_SCORE_EPILOGUE=narrow (the epilogue kernel for every launch, 4 keys per thread; the
    default fuses the epilogue into the decode kernel where it can): this file's CUDA tests, in a
    fresh process."""
    run_tests_with_env("KVCORE_SCORE_EPILOGUE", "narrow", ["tests/test_decode_score.py"],
                       "not in_subprocess and not misspelt", 40, "-m", "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_gqa_decode_score_with_8_warps_in_subprocess():
    """KVCORE_DECODE_WARPS=8 (read once per process) now also runs the score path on the 8-warp
    kernel (head_dim 128; 200 KB launches whose fused epilogue stages past the merge area): this
    file's CUDA tests, in a fresh process, including the forced splits' bitwise equality with
    plain decode (which runs the same kernel under the switch)."""
    run_tests_with_env("KVCORE_DECODE_WARPS", "8", ["tests/test_decode_score.py"],
                       "not in_subprocess and not misspelt", 40, "-m", "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_gqa_decode_score_p_scratch_in_subprocess():
    """KVCORE_SCORE_P=scratch (read once per process): the fused epilogue's P and bases go through
    the workspace scratch and are read back at the end, as before session 38, instead of staying
    in the CTA's shared memory: this file's CUDA tests, in a fresh process."""
    run_tests_with_env("KVCORE_SCORE_P", "scratch", ["tests/test_decode_score.py"],
                       "not in_subprocess and not misspelt", 40, "-m", "cuda")


_SCORE_P_SCRIPT = """
import sys
import torch
import kvcore

torch.manual_seed(5)
sms = torch.cuda.get_device_properties("cuda").multi_processor_count
results = {}
# (batch, Hq, Hkv, D, seq_len): about one pair per SM unsplit (the 8-warp kernel on Hopper), one
# long sequence in fused splits, a group of 8 at head_dim 64, and a window.
for name, (batch, hq, hkv, d, n, window) in {
    "pair-per-sm": (max(1, sms // 8), 32, 8, 128, 8192, -1),
    "b1-splits": (1, 32, 8, 128, 32768, -1),
    "group8-d64": (3, 16, 2, 64, 3000, -1),
    "window": (4, 32, 8, 128, 5000, 999),
}.items():
    ps = 16
    pages = (n + ps - 1) // ps
    perm = torch.randperm(batch * pages, device="cuda", dtype=torch.int64).to(torch.int32)
    block_table = perm.view(batch, pages)
    k = torch.randn(batch * pages, ps, hkv, d, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device="cuda")
    seq_lens = torch.full((batch,), n, dtype=torch.int32, device="cuda")
    seq_lens[-1] = n - 21
    score = torch.rand(batch, hkv, pages * ps, device="cuda")
    out, lse = kvcore.gqa_decode(q, k, v, block_table, seq_lens, score=score, return_lse=True, window_left=window)
    results[name] = (out.cpu(), lse.cpu(), score.cpu())
torch.save(results, sys.argv[1])
"""


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_gqa_decode_score_p_local_matches_scratch_bitwise_in_subprocess(tmp_path):
    """The fused score epilogue with P kept in shared memory (the default) gives the same bits as
    with P through the scratch (KVCORE_SCORE_P=scratch): the same fp16 P and bases are summed in
    the same order, only their place differs. Shapes: one unsplit pair per SM, a long sequence in
    fused splits, group 8 at head_dim 64, a sliding window."""
    local = run_script_with_env("KVCORE_SCORE_P", None, _SCORE_P_SCRIPT, tmp_path)
    scratch = run_script_with_env("KVCORE_SCORE_P", "scratch", _SCORE_P_SCRIPT, tmp_path)
    assert local.keys() == scratch.keys()
    for name in local:
        for a, b in zip(local[name], scratch[name]):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("seq_len", [1000, 8192, 16384], ids=["fused", "fused-b16", "epilogue-kernel"])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_only)])
def test_gqa_decode_score_one_pair_per_sm_cuda(device, seq_len, gen):
    """About one (sequence, KV head) pair per SM with an automatic split count, where plain decode
    and (since session 37) the score path take the 8-warp kernel on Hopper: out, lse and score
    against the reference. Lengths: a short one and the bench's B16 S8192 (staged past the merge
    area in the fused epilogue), and S16384, whose 208 KB of staging takes the epilogue kernel.
    (Not bitwise plain decode's: plain decode visits a split's pages in cache order, the score
    path in the table's; the KVCORE_DECODE_WARPS=8 run of this file checks forced splits bitwise.)"""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    hkv, group, d, ps = 8, 4, 128, 16
    batch = max(1, sms // hkv)  # B16 on a 132-SM GPU: 128 pairs
    lens = [seq_len] * batch
    lens[1] = seq_len - 37  # not all equal: a partial last page
    kv = make_paged_kv(lens, ps, hkv, d, gen=gen, dtype=torch.bfloat16, device=device)
    q = randn(batch, hkv * group, d, gen=gen, dtype=torch.bfloat16, device=device)
    score = _score_buffer(batch, hkv, kv.block_table.shape[1] * ps, gen, device)
    before = score.clone()
    out, lse = poison(torch.empty_like(q)), poison(torch.empty(batch, hkv * group, device=device))
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse, score=score)
    plain_out, plain_lse = kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens,
                                             return_lse=True)
    torch.testing.assert_close(out, plain_out, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(lse, plain_lse, **LSE_TOL)
    ref_out, ref_lse = reference.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    torch.testing.assert_close(out.float(), ref_out.to(out.device), **OUT_TOL[torch.bfloat16])
    torch.testing.assert_close(lse, ref_lse.to(lse.device), **LSE_TOL)
    add = reference.gqa_decode_score(q, kv.k_cache, kv.block_table, kv.seq_lens, score_len=score.shape[2])
    _check_step(before, score, lens, add)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("switch,value", [("KVCORE_SCORE_EPILOGUE", "wid"), ("KVCORE_SCORE_P", "locl")])
def test_gqa_decode_score_misspelt_switch_is_an_error(switch, value):
    """A misspelt KVCORE_SCORE_EPILOGUE or KVCORE_SCORE_P fails a score call instead of silently
    timing the default."""
    assert_switch_value_rejected(
        switch, value,
        """
        q = torch.randn(1, 8, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(4, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
        bt = torch.arange(4, dtype=torch.int32, device="cuda").view(1, 4)
        sl = torch.tensor([40], dtype=torch.int32, device="cuda")
        score = torch.zeros(1, 2, 64, device="cuda")
        """,
        "kvcore.gqa_decode(q, k, k, bt, sl, score=score)")
