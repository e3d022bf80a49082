"""MLA: kvcore.mla_latent_project and kvcore.mla_decode against kvcore.reference, and the
kvcore.mla layer (absorbed decode, non-absorbed prefill) against a naive non-absorbed MLA with
explicit per-head K/V, in fp32.

CUDA cases run only when the CUDA kernels they need are built (they skip until they land): the
mla_decode cases need only its kernel, the rest both ops'.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import kvcore
from conftest import (HAS_CUDA, LSE_TOL, NO_CUDA_REASON, OUT_TOL, assert_out_lse_close, make_paged_kv, op_workspace,
                      opcheck_dtype, poison, ragged_lens, randn, record_op_calls, assert_switch_value_rejected,
                      record_check_calls, run_tests_with_env)
from kvcore import reference
from kvcore.mla import MLAAttention, MLAConfig, MLALatentCache
from test_ops import (BAD_PLAN_KEYS, BAD_PLAN_SEQ_LENS, OPCHECK_UTILS, PLAN_HINTS, BadCase, _other_device, _set,
                      _set_item, _set_kw)

MLA_CUDA_BUILT = all(
    torch._C._dispatch_has_kernel_for_dispatch_key(f"kvcore::{op}", "CUDA") for op in ("mla_decode", "mla_latent_project")
)
_CUDA_MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON),
    pytest.mark.skipif(not MLA_CUDA_BUILT, reason="the MLA CUDA kernels are not built yet"),
]
_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DEVICE_DTYPES = [pytest.param("cpu", dt, id=f"cpu-{_IDS[dt]}") for dt in (torch.float32, torch.bfloat16, torch.float16)]
DEVICE_DTYPES += [pytest.param("cuda", dt, marks=_CUDA_MARKS, id=f"cuda-{_IDS[dt]}") for dt in (torch.bfloat16, torch.float16)]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=_CUDA_MARKS, id="cuda")]
# mla_decode's CUDA kernel is tested on its own (it may land before mla_latent_project's).
MLA_DECODE_CUDA_BUILT = torch._C._dispatch_has_kernel_for_dispatch_key("kvcore::mla_decode", "CUDA")
_DECODE_CUDA_MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON),
    pytest.mark.skipif(not MLA_DECODE_CUDA_BUILT, reason="the mla_decode CUDA kernel is not built"),
]


def mla_decode_cuda_only(test):
    """Decorate ``test`` with ``_DECODE_CUDA_MARKS``, in their order: CUDA-only, skipped without a
    GPU or until mla_decode's CUDA kernel is built."""
    for mark in reversed(_DECODE_CUDA_MARKS):
        test = mark(test)
    return test


DECODE_DEVICE_DTYPES = DEVICE_DTYPES[:3] + [
    pytest.param("cuda", dt, marks=_DECODE_CUDA_MARKS, id=f"cuda-{_IDS[dt]}") for dt in (torch.bfloat16, torch.float16)
]
DECODE_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=_DECODE_CUDA_MARKS, id="cuda")]
# mla_latent_project's CUDA cases need only its own kernel.
PROJECT_CUDA_BUILT = torch._C._dispatch_has_kernel_for_dispatch_key("kvcore::mla_latent_project", "CUDA")
_PROJECT_CUDA_MARKS = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON),
    pytest.mark.skipif(not PROJECT_CUDA_BUILT, reason="the mla_latent_project CUDA kernel is not built yet"),
]
PROJECT_DEVICE_DTYPES = [pytest.param("cpu", dt, id=f"cpu-{_IDS[dt]}") for dt in (torch.float32, torch.bfloat16, torch.float16)]
PROJECT_DEVICE_DTYPES += [pytest.param("cuda", dt, marks=_PROJECT_CUDA_MARKS, id=f"cuda-{_IDS[dt]}")
                          for dt in (torch.bfloat16, torch.float16)]
PROJECT_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=_PROJECT_CUDA_MARKS, id="cuda")]
PROJECT_CUDA_DTYPES = [pytest.param(dt, marks=_PROJECT_CUDA_MARKS, id=_IDS[dt]) for dt in (torch.bfloat16, torch.float16)]


# ============================================================================================
# RoPE reference
# ============================================================================================


def test_rope_layouts_are_the_same_rotation_on_permuted_columns(gen):
    """NeoX rotation of x == interleaved rotation of x with its halves interleaved (then undone),
    position 0 is the identity, and every rotated pair keeps its norm."""
    p = 16
    cos_sin = reference.rope_cos_sin(50, p)
    x = randn(7, p, gen=gen)
    pos = torch.tensor([0, 1, 5, 17, 33, 49, 2])
    perm = torch.stack([torch.arange(p // 2), torch.arange(p // 2) + p // 2], dim=1).flatten()  # 0, 8, 1, 9, ...
    inter = reference.rope(x[:, perm], pos, cos_sin, interleaved=True)
    neox = reference.rope(x, pos, cos_sin, interleaved=False)
    torch.testing.assert_close(inter[:, perm.argsort()], neox)
    torch.testing.assert_close(neox[0], x[0].double())
    pairs_in = x[:, : p // 2] ** 2 + x[:, p // 2 :] ** 2
    pairs_out = neox[:, : p // 2] ** 2 + neox[:, p // 2 :] ** 2
    torch.testing.assert_close(pairs_out, pairs_in.double())


# ============================================================================================
# mla_latent_project vs reference
# ============================================================================================


@dataclass(frozen=True)
class ProjCase:
    tokens: int
    d_model: int
    rank: int
    rope: int
    page_size: int
    interleaved: bool = True
    outputs: bool = True
    strided_cache: bool = False
    hidden_pad: int = 0  # hidden is big[:, pad:] of a [T, d_model + pad] tensor (row stride d_model + pad)

    def id(self) -> str:
        s = f"T{self.tokens}-d{self.d_model}-R{self.rank}-P{self.rope}-ps{self.page_size}"
        s += "-inter" if self.interleaved else "-neox"
        s += "" if self.outputs else "-noout"
        s += f"-hpad{self.hidden_pad}" if self.hidden_pad else ""
        return s + ("-strided" if self.strided_cache else "")


PROJ_CASES = [
    ProjCase(5, 64, 512, 64, 64),
    ProjCase(9, 96, 512, 64, 16, interleaved=False, strided_cache=True),
    ProjCase(1, 128, 512, 64, 64, outputs=False),
    ProjCase(13, 40, 32, 16, 4, interleaved=False, outputs=False),
    ProjCase(6, 33, 24, 8, 1, strided_cache=True),
    ProjCase(7, 64, 32, 16, 8, hidden_pad=3),
    ProjCase(20, 72, 64, 8, 16, interleaved=False, hidden_pad=8),
]


def _proj_inputs(case: ProjCase, gen, dtype, device, max_pos: int = 300):
    width = case.rank + case.rope
    num_pages = (2 * case.tokens) // case.page_size + 3
    if case.strided_cache:
        cache = poison(torch.empty(num_pages, 2, case.page_size, width, dtype=dtype, device=device))[:, 1]
    else:
        cache = poison(torch.empty(num_pages, case.page_size, width, dtype=dtype, device=device))
    num_slots = num_pages * case.page_size
    slots = torch.randperm(num_slots, generator=gen)[: case.tokens]
    if case.tokens > 2:
        slots[1] = -1  # a padding token
    hidden = randn(case.tokens, case.d_model + case.hidden_pad, gen=gen, dtype=dtype, device=device)
    return SimpleNamespace(
        hidden=hidden[:, case.hidden_pad :],
        w_dkv=randn(case.d_model, width, gen=gen, dtype=dtype, device=device, scale=case.d_model**-0.5),
        norm_weight=(1.0 + 0.2 * randn(case.rank, gen=gen)).to(device=device, dtype=dtype),
        cos_sin=reference.rope_cos_sin(max_pos, case.rope).to(device),
        positions=torch.randint(0, max_pos, (case.tokens,), generator=gen).to(device),
        cache=cache,
        slots=slots.to(device),
    )


@pytest.mark.parametrize("case", PROJ_CASES, ids=ProjCase.id)
@pytest.mark.parametrize(("device", "dtype"), PROJECT_DEVICE_DTYPES)
def test_mla_latent_project_matches_reference(device, dtype, case, gen):
    _check_project(case, device, dtype, gen)


def _check_project(case: ProjCase, device, dtype, gen, max_pos: int = 300) -> None:
    """One call on fresh inputs, cache NaN-poisoned: written slots and outputs match the reference,
    every other slot is still NaN."""
    a = _proj_inputs(case, gen, dtype, device, max_pos=max_pos)
    before = a.cache.clone()
    outs_in = {}
    if case.outputs:  # poisoned, so that an unwritten row fails
        outs_in = dict(c_kv_out=poison(torch.empty(case.tokens, case.rank, dtype=dtype, device=device)),
                       k_pe_out=poison(torch.empty(case.tokens, case.rope, dtype=dtype, device=device)))
    outs = kvcore.mla_latent_project(a.hidden, a.w_dkv, a.norm_weight, a.cos_sin, a.positions, a.cache, a.slots,
                                     eps=1e-6, interleaved_rope=case.interleaved, **outs_in)
    ref_cache, ref_c, ref_pe = reference.mla_latent_project(a.hidden, a.w_dkv, a.norm_weight, 1e-6, a.cos_sin,
                                                            a.positions, before, a.slots, case.interleaved)
    tol = OUT_TOL[dtype]
    written = a.slots[a.slots >= 0].cpu()
    flat, ref_flat = a.cache.reshape(-1, a.cache.shape[-1]), ref_cache.reshape(-1, a.cache.shape[-1])
    torch.testing.assert_close(flat[written.to(device)].float(), ref_flat[written.to(device)].float(), **tol)
    untouched = torch.ones(flat.shape[0], dtype=torch.bool)
    untouched[written] = False
    assert bool(torch.isnan(flat[untouched.to(device)]).all()), "slots outside slot_mapping were written"
    if case.outputs:
        c_kv, k_pe = outs
        assert c_kv is outs_in["c_kv_out"] and k_pe is outs_in["k_pe_out"]
        torch.testing.assert_close(c_kv.float(), ref_c, **tol)
        torch.testing.assert_close(k_pe.float(), ref_pe, **tol)
    else:
        assert outs is None


def test_mla_latent_project_preallocated_outputs(gen):
    a = _proj_inputs(ProjCase(4, 32, 16, 8, 4), gen, torch.float32, "cpu")
    c_kv, k_pe = poison(torch.empty(4, 16)), poison(torch.empty(4, 8))
    got = kvcore.mla_latent_project(a.hidden, a.w_dkv, a.norm_weight, a.cos_sin, a.positions, a.cache, a.slots,
                                    c_kv_out=c_kv, k_pe_out=k_pe)
    assert got[0] is c_kv and got[1] is k_pe and not torch.isnan(c_kv).any() and not torch.isnan(k_pe).any()


# ---- CUDA: the fused decode-sized kernel (T <= 64) and the cuBLAS + epilogue path (T > 64) -----

# T = 1, 3, 16 (one 16-token tile), 20 (two), 64 (four, the fused kernel's limit), 65 and 300
# (cuBLAS + epilogue); both RoPE layouts; outputs present and absent. _proj_inputs puts a -1
# (padding) slot at token 1 when T > 2.
PROJ_CUDA_GRID = [
    ProjCase(t, 256, 512, 64, 16, interleaved=inter, outputs=outs)
    for t in (1, 3, 16, 20, 64, 65, 300)
    for inter in (True, False)
    for outs in (True, False)
]
# DeepSeek's d_model: the weight split over every SM, partials summed at one and two levels.
PROJ_CUDA_GRID += [
    ProjCase(1, 7168, 512, 64, 64),
    ProjCase(2, 7168, 512, 64, 64, interleaved=False, outputs=False),
    ProjCase(16, 7168, 512, 64, 64, interleaved=False),
    ProjCase(64, 7168, 512, 64, 64, outputs=False, strided_cache=True),
    ProjCase(300, 7168, 512, 64, 64),
]
# Shapes off the usual path: d_model not a multiple of the 64-row chunk, R not a multiple of 64
# (a partial column tile), P = 128, an odd hidden stride (element loads), page size 1.
PROJ_CUDA_GRID += [
    ProjCase(5, 1000, 512, 64, 16, hidden_pad=1),
    ProjCase(33, 200, 448, 128, 32, interleaved=False, hidden_pad=8),
    ProjCase(9, 520, 96, 32, 1, strided_cache=True),
    ProjCase(70, 99, 160, 32, 8, hidden_pad=5),
]


@pytest.mark.parametrize("case", PROJ_CUDA_GRID, ids=ProjCase.id)
@pytest.mark.parametrize("dtype", PROJECT_CUDA_DTYPES)
def test_mla_latent_project_cuda_grid(dtype, case, gen):
    _check_project(case, "cuda", dtype, gen, max_pos=4096)


@pytest.mark.parametrize("dtype", PROJECT_CUDA_DTYPES)
def test_mla_latent_project_cuda_back_to_back_calls(dtype, gen):
    """Calls of different T (different grids and reduction levels) in a row, then a burst of
    unsynchronised decode calls: each matches the reference, so the kernel's arrival counters are
    back at zero after every call."""
    d = 7168
    for t in (1, 64, 3, 16, 1, 70, 2, 64):
        _check_project(ProjCase(t, d, 512, 64, 16, interleaved=bool(t % 2)), "cuda", dtype, gen, max_pos=4096)
    a = _proj_inputs(ProjCase(4, d, 512, 64, 16), gen, dtype, "cuda")
    caches = [poison(torch.empty_like(a.cache)) for _ in range(70)]  # more calls than counter sets
    hiddens = [randn(4, d, gen=gen, dtype=dtype, device="cuda") for _ in caches]
    for h, c in zip(hiddens, caches):
        torch.ops.kvcore.mla_latent_project(h, a.w_dkv, a.norm_weight, 1e-6, a.cos_sin, a.positions, c, a.slots,
                                            True, None, None)
    for h, c in zip(hiddens, caches):
        ref, _, _ = reference.mla_latent_project(h, a.w_dkv, a.norm_weight, 1e-6, a.cos_sin, a.positions,
                                                 poison(torch.empty_like(c)), a.slots, True)
        torch.testing.assert_close(c.float(), ref.float(), equal_nan=True, **OUT_TOL[dtype])


@pytest.mark.parametrize("tokens", [3, 100])
@pytest.mark.parametrize("dtype", PROJECT_CUDA_DTYPES)
def test_mla_latent_project_cuda_one_output_and_all_padding(dtype, tokens, gen):
    """The op with only c_kv_out, then only k_pe_out (the other None); and a call whose every slot
    is -1: the cache stays untouched while the outputs are written."""
    a = _proj_inputs(ProjCase(tokens, 256, 512, 64, 16), gen, dtype, "cuda")
    _, ref_c, ref_pe = reference.mla_latent_project(a.hidden, a.w_dkv, a.norm_weight, 1e-6, a.cos_sin, a.positions,
                                                    a.cache, a.slots, True)
    tol = OUT_TOL[dtype]
    for which in ("c_kv", "k_pe"):
        c_kv = poison(torch.empty(tokens, 512, dtype=dtype, device="cuda")) if which == "c_kv" else None
        k_pe = poison(torch.empty(tokens, 64, dtype=dtype, device="cuda")) if which == "k_pe" else None
        torch.ops.kvcore.mla_latent_project(a.hidden, a.w_dkv, a.norm_weight, 1e-6, a.cos_sin, a.positions, a.cache,
                                            a.slots, True, c_kv, k_pe)
        if c_kv is not None:
            torch.testing.assert_close(c_kv.float(), ref_c, **tol)
        else:
            torch.testing.assert_close(k_pe.float(), ref_pe, **tol)
    cache = poison(torch.empty_like(a.cache))
    c_kv, k_pe = kvcore.mla_latent_project(a.hidden, a.w_dkv, a.norm_weight, a.cos_sin, a.positions, cache,
                                           torch.full_like(a.slots, -1), return_outputs=True)
    assert bool(torch.isnan(cache).all()), "a -1 slot was written"
    torch.testing.assert_close(c_kv.float(), ref_c, **tol)
    torch.testing.assert_close(k_pe.float(), ref_pe, **tol)


@pytest.mark.parametrize("dtype", PROJECT_CUDA_DTYPES)
def test_mla_latent_project_cuda_no_tokens(dtype, gen):
    a = _proj_inputs(ProjCase(0, 256, 512, 64, 16), gen, dtype, "cuda")
    kvcore.mla_latent_project(a.hidden, a.w_dkv, a.norm_weight, a.cos_sin, a.positions, a.cache, a.slots)
    torch.cuda.synchronize()
    assert bool(torch.isnan(a.cache).all())




# ============================================================================================
# mla_decode vs reference
# ============================================================================================


@dataclass(frozen=True)
class MlaDecodeCase:
    batch: int
    heads: int
    dk: int
    dv: int
    page_size: int
    lens: object  # max length (ragged) or a tuple of exact lengths
    with_lse: bool = True
    q_slice: bool = False  # q is a slice of a wider tensor (strided in dims 0/1)

    def id(self) -> str:
        lens = self.lens if isinstance(self.lens, int) else "_".join(map(str, self.lens))
        s = f"B{self.batch}-H{self.heads}-Dk{self.dk}-Dv{self.dv}-ps{self.page_size}-L{lens}"
        return s + ("" if self.with_lse else "-nolse") + ("-qslice" if self.q_slice else "")


MLA_DECODE_CASES = [
    MlaDecodeCase(3, 16, 576, 512, 64, 300),
    MlaDecodeCase(4, 1, 576, 512, 16, 100, q_slice=True),
    MlaDecodeCase(2, 128, 576, 512, 64, 130, with_lse=False),
    MlaDecodeCase(5, 4, 48, 32, 1, 40),
    MlaDecodeCase(3, 8, 80, 64, 7, 600, q_slice=True),
    MlaDecodeCase(2, 2, 576, 512, 64, (0, 0)),
]
# CPU only (the CUDA kernels take widths of a multiple of 8): head counts that end in a partial
# block of the CPU kernel's 4-head register blocks, odd chunk lengths (every row count left after
# the logits' row blocks), and Dk / Dv that are not multiples of any vector width (the kernel's
# scalar tails); Dv 88 also leaves a single vector after the values' bands (AVX2, AVX-512).
MLA_DECODE_CPU_CASES = [
    MlaDecodeCase(3, 6, 83, 17, 16, (1, 33, 63)),
    MlaDecodeCase(2, 7, 579, 524, 64, (97, 300), q_slice=True),
    MlaDecodeCase(2, 13, 36, 36, 8, (5, 70)),
    MlaDecodeCase(4, 5, 7, 5, 3, (1, 2, 3, 31)),
    MlaDecodeCase(2, 9, 100, 88, 16, (45, 130)),
    # bf16 under KVCORE_CPU_ISA=amx (the tiles take widths of a multiple of 32): three 16-head
    # blocks (a pair, then one alone), lengths past one 256-key softmax step and not a multiple
    # of the 32-key tile steps; small widths of a multiple of 32 with a partial head block.
    MlaDecodeCase(2, 40, 576, 512, 16, (257, 600)),
    MlaDecodeCase(3, 20, 64, 32, 16, (1, 31, 513)),
]


def _mla_decode_params() -> list:
    params = [pytest.param(*dd.values, case, marks=dd.marks, id=f"{dd.id}-{case.id()}")
              for case in MLA_DECODE_CASES for dd in DECODE_DEVICE_DTYPES]
    return params + [pytest.param(*dd.values, case, marks=dd.marks, id=f"{dd.id}-{case.id()}")
                     for case in MLA_DECODE_CPU_CASES for dd in DEVICE_DTYPES[:3]]


def _latent_cache(lens, page_size, dk, gen, dtype, device, extra_table_cols=1):
    kv = make_paged_kv(lens, page_size, 1, dk, gen=gen, dtype=dtype, device=device, extra_table_cols=extra_table_cols)
    return kv.k_cache[:, :, 0], kv.block_table, kv.seq_lens


@pytest.mark.parametrize(("device", "dtype", "case"), _mla_decode_params())
def test_mla_decode_matches_reference(device, dtype, case, gen):
    lens = list(case.lens) if isinstance(case.lens, tuple) else ragged_lens(case.batch, case.lens, case.page_size, gen)
    cache, table, seq_lens = _latent_cache(lens, case.page_size, case.dk, gen, dtype, device)
    if case.q_slice:
        q = randn(case.batch, case.heads, case.dk + 16, gen=gen, dtype=dtype, device=device)[:, :, 16:]
    else:
        q = randn(case.batch, case.heads, case.dk, gen=gen, dtype=dtype, device=device)
    scale = 192**-0.5
    out = poison(torch.empty(case.batch, case.heads, case.dv, dtype=dtype, device=device))
    lse = poison(torch.empty(case.batch, case.heads, device=device)) if case.with_lse else None
    cache_before = cache.clone()
    res = kvcore.mla_decode(q, cache, table, seq_lens, scale=scale, out=out, lse=lse)
    ref_out, ref_lse = reference.mla_decode(q, cache, table, seq_lens, scale, case.dv)
    if case.with_lse:
        assert res[0] is out and res[1] is lse
        torch.testing.assert_close(lse, ref_lse, **LSE_TOL)
    else:
        assert res is out
    torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[dtype])
    for b, n in enumerate(lens):
        if n == 0:
            assert bool((out[b] == 0).all()) and (lse is None or bool(torch.isneginf(lse[b]).all()))
    assert torch.equal(cache, cache_before)


def test_mla_decode_default_v_dim_and_allocation(gen):
    cache, table, seq_lens = _latent_cache([5, 70], 16, 576, gen, torch.float32, "cpu")
    q = randn(2, 3, 576, gen=gen)
    out, lse = kvcore.mla_decode(q, cache, table, seq_lens, scale=0.1, return_lse=True)
    assert out.shape == (2, 3, 512) and lse.shape == (2, 3) and lse.dtype == torch.float32
    ref_out, _ = reference.mla_decode(q, cache, table, seq_lens, 0.1, 512)
    torch.testing.assert_close(out, ref_out, **OUT_TOL[torch.float32])


# plan_seq_lens: the hints of test_ops.py's PLAN_HINTS (true, stale and wrong), which may only
# cost speed; on CUDA each plans another split count.
@pytest.mark.parametrize("hint", list(PLAN_HINTS))
@pytest.mark.parametrize(("device", "heads"), [("cpu", 16), pytest.param("cuda", 16, marks=_DECODE_CUDA_MARKS),
                                               pytest.param("cuda", 32, marks=_DECODE_CUDA_MARKS),
                                               pytest.param("cuda", 128, marks=_DECODE_CUDA_MARKS)])
def test_mla_decode_plan_seq_lens(device, heads, hint, gen):
    """A batch of very unequal lengths (one long, short ones, 0 and 1) planned from a host copy of
    its lengths, true or wrong, twice on one workspace with fresh q into poisoned outputs, each
    against the reference (H16: the memory-bound kernel, which plans from the hint as gqa_decode;
    H32 and H128: the compute-bound kernels, which take the shapes' count, here too large to
    double)."""
    lens = [9000, 0, 1, 300, 1024, 777, 2049, 5]
    cache, table, seq_lens = _latent_cache(lens, 64, 576, gen, torch.bfloat16, device)
    ws = op_workspace(device)
    for _ in range(2):
        q = randn(len(lens), heads, 576, gen=gen, dtype=torch.bfloat16, device=device)
        out = poison(torch.empty(len(lens), heads, 512, dtype=torch.bfloat16, device=device))
        lse = poison(torch.empty(len(lens), heads, device=device))
        kvcore.mla_decode(q, cache, table, seq_lens, scale=192**-0.5, out=out, lse=lse, workspace=ws,
                          plan_seq_lens=PLAN_HINTS[hint](lens))
        ref_out, ref_lse = reference.mla_decode(q, cache, table, seq_lens, 192**-0.5, 512)
        torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[torch.bfloat16])
        torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=_DECODE_CUDA_MARKS)])
def test_mla_decode_plan_seq_lens_full_hint_same_bits_cuda(device, heads, gen):
    """Equal lengths that fill the block table: the hint says what the shapes say, so the plan
    and every bit of out and lse are those of a call without it."""
    lens = [4096] * 6
    cache, table, seq_lens = _latent_cache(lens, 64, 576, gen, torch.bfloat16, device, extra_table_cols=0)
    assert table.shape[1] * 64 == 4096
    q = randn(6, heads, 576, gen=gen, dtype=torch.bfloat16, device=device)
    results = []
    for hint in (None, lens, torch.tensor(lens)):
        out, lse = kvcore.mla_decode(q, cache, table, seq_lens, scale=0.1, return_lse=True, plan_seq_lens=hint)
        results.append((out, lse))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


def _wide_kernel_runs(device) -> bool:
    """Whether mla_decode above 32 heads runs a 64-head kernel (wgmma or seesaw): compute
    capability 9.0 without KVCORE_MLA_DECODE_WIDE=old (the 32-head mma.sync kernel, as elsewhere).
    Assumes a build with sm_90a code, as the default TORCH_CUDA_ARCH_LIST gives (a plain 9.0 build
    has no 64-head kernels), as the wgmma switch test's skip does."""
    return (torch.cuda.get_device_capability(device) == (9, 0)
            and os.environ.get("KVCORE_MLA_DECODE_WIDE", "wgmma") != "old")


@pytest.mark.parametrize("heads", [16, 32, 128])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=_DECODE_CUDA_MARKS)])
def test_mla_decode_plan_seq_lens_by_kernel_cuda(device, heads, gen):
    """A stale hint that every sequence holds one key reaches the launcher and caps the split count
    at one (bit for bit num_splits=1, not the shapes' many splits): at 16 heads (gqa_decode's rule)
    and on the 32-head kernel (32 heads, and 128 where no 64-head kernel runs: split_plan.h's
    choose_splits_dominant caps a hinted count at a split per 256 keys of the longest). The 64-head
    kernels (128 heads on compute capability 9.0) cap only from 16 (sequence, head block) pairs
    (kWideShortCapMinPairs), so 2 sequences plan from the shapes, bit for bit the call without
    the hint."""
    lens = [3000, 2900]  # a table of ~3000 keys: the shapes plan many splits for 2 sequences
    cache, table, seq_lens = _latent_cache(lens, 64, 576, gen, torch.bfloat16, device)
    q = randn(2, heads, 576, gen=gen, dtype=torch.bfloat16, device=device)

    def run(**kw):
        return kvcore.mla_decode(q, cache, table, seq_lens, scale=0.1, return_lse=True, **kw)

    stale, none, one = run(plan_seq_lens=[1, 1]), run(), run(num_splits=1)
    same = lambda a, b: torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # noqa: E731
    if heads > 32 and _wide_kernel_runs(device):
        assert same(stale, none)
    else:
        assert same(stale, one) and not torch.equal(stale[1], none[1])  # (lse: fp32, where split sums differ)
    ref_out, ref_lse = reference.mla_decode(q, cache, table, seq_lens, 0.1, 512)
    torch.testing.assert_close(stale[0].float(), ref_out, **OUT_TOL[torch.bfloat16])
    torch.testing.assert_close(stale[1], ref_lse, **LSE_TOL)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=_DECODE_CUDA_MARKS)])
def test_mla_decode_dominant_sequence_doubles_splits_cuda(device, gen):
    """At 128 heads (the 64-head kernels) a hint of one long sequence among short ones doubles the
    shapes' split count (split_plan.h's choose_splits_dominant); a hint of uniform-like lengths
    keeps it, and one of short lengths caps it at a split per 256 keys of the longest. Each call's
    bits are matched with a forced count's, so the test reads the plan back.
    The expected counts are those of a 132-SM Hopper (the rule's measured machine): 16 sequences x
    2 head blocks take 4 splits from the shapes (128 CTAs), and 8 fit two waves. Elsewhere the
    shapes' count, the doubling and tile rounding differ, so the test runs there only."""
    props = torch.cuda.get_device_properties(device)
    if (props.major, props.minor) != (9, 0) or props.multi_processor_count != 132:
        pytest.skip("the expected split counts are a 132-SM sm_90 GPU's")
    if not _wide_kernel_runs(device):  # KVCORE_MLA_DECODE_WIDE=old: four 32-head blocks a sequence
        pytest.skip("the expected split counts are the 64-head kernels'")
    long_one = [8192] + [512] * 15
    cache, table, seq_lens = _latent_cache(long_one, 64, 576, gen, torch.bfloat16, device, extra_table_cols=0)
    assert table.shape[1] * 64 == 8192
    q = randn(16, 128, 576, gen=gen, dtype=torch.bfloat16, device=device)
    ws = torch.zeros(160 << 20, dtype=torch.uint8, device=device)

    def run(**kw):
        return kvcore.mla_decode(q, cache, table, seq_lens, scale=0.1, return_lse=True, workspace=ws, **kw)

    forced = {n: run(num_splits=n) for n in range(1, 17)}

    def count_of(result) -> int:
        hits = [n for n, f in forced.items() if torch.equal(f[0], result[0]) and torch.equal(f[1], result[1])]
        assert hits, "no forced count reproduces the call's bits"
        return hits[0]

    shapes = count_of(run())
    assert shapes == 4
    dominant = run(plan_seq_lens=long_one)
    assert count_of(dominant) == 8
    assert count_of(run(plan_seq_lens=[8192, 4000, 6000, 7000, 5000, 3000, 8000, 2000] * 2)) == 4  # none dominates
    # all short: one split per kMinSplitTokens (256) of the longest, below the shapes' count
    assert count_of(run(plan_seq_lens=[256] * 16)) == 1
    assert count_of(run(plan_seq_lens=[600] + [100] * 15)) == 2
    ref_out, ref_lse = reference.mla_decode(q, cache, table, seq_lens, 0.1, 512)
    torch.testing.assert_close(dominant[0].float(), ref_out, **OUT_TOL[torch.bfloat16])
    torch.testing.assert_close(dominant[1], ref_lse, **LSE_TOL)


@pytest.mark.parametrize("device", DECODE_DEVICES)
def test_mla_decode_plan_seq_lens_reaches_the_op(device, gen, monkeypatch):
    """The wrapper reduces plan_seq_lens to the op's plan_total_keys / plan_max_keys: each length
    clamped to the block table's capacity, then summed and maxed."""
    seen = record_op_calls(monkeypatch, "mla_decode")
    a = _decode_args(device, gen)  # capacity 4 pages of 8: 32; lens [5, 17, 0]
    assert a.table.shape[1] * 8 == 32
    for hint, want in [([5, 17, 0], (22, 17)), ([40, 5, 0], (37, 32)), (torch.tensor([3, 3, 3]), (9, 3)),
                       (None, (0, 0)), ([0, 0, 0], (0, 0))]:
        kvcore.mla_decode(a.q, a.cache, a.table, a.seq_lens, out=a.out, plan_seq_lens=hint, **a.kw)
        assert tuple(seen[-1][-2:]) == want, (hint, seen[-1][-2:])


@pytest.mark.parametrize("device", DECODE_DEVICES)
def test_mla_op_rejects_bad_plan_keys(device, gen):
    """The op's own checks of the plan hint (torch.ops callers bypass ops.py)."""
    a = _decode_args(device, gen)
    ws = op_workspace(device)
    for total, most, match in BAD_PLAN_KEYS:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.kvcore.mla_decode(a.q, a.cache, a.table, a.seq_lens, 0.125, a.out, a.lse, ws, 0, total, most)
    assert bool(torch.isnan(a.out).all()) and bool(torch.isnan(a.lse).all())


# ============================================================================================
# opcheck
# ============================================================================================


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_mla_ops(device, gen):
    dtype = opcheck_dtype(device)
    a = _proj_inputs(ProjCase(5, 32, 32, 16, 4), gen, dtype, device)
    c_kv = torch.empty(5, 32, dtype=dtype, device=device)
    k_pe = torch.empty(5, 16, dtype=dtype, device=device)
    for outs in [(None, None), (c_kv, k_pe), (c_kv, None)]:
        args = (a.hidden, a.w_dkv, a.norm_weight, 1e-6, a.cos_sin, a.positions, a.cache, a.slots, True, *outs)
        torch.library.opcheck(torch.ops.kvcore.mla_latent_project.default, args, test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("device", DECODE_DEVICES)
def test_opcheck_mla_decode(device, gen):
    dtype = opcheck_dtype(device)
    ws = op_workspace(device)
    # Narrow widths (Dk 80 / Dv 64) and DeepSeek's (576 / 512), automatic and forced splits.
    for dk, dv, num_splits in ((80, 64, 0), (576, 512, 0), (576, 512, 3)):
        cache, table, seq_lens = _latent_cache([3, 0, 40], 16, dk, gen, dtype, device)
        q = randn(3, 4, dk, gen=gen, dtype=dtype, device=device)
        out = torch.empty(3, 4, dv, dtype=dtype, device=device)
        lse = torch.empty(3, 4, device=device)
        for with_lse in (True, False):
            args = (q, cache, table, seq_lens, 0.125, out, lse if with_lse else None, ws, num_splits)
            torch.library.opcheck(torch.ops.kvcore.mla_decode.default, args, test_utils=OPCHECK_UTILS)
        # with the plan hint (its keys: 43 in all, 40 at most)
        args = (q, cache, table, seq_lens, 0.125, out, lse, ws, num_splits, 43, 40)
        torch.library.opcheck(torch.ops.kvcore.mla_decode.default, args, test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("tokens", [5, 70], ids=["fused", "cublas"])
@pytest.mark.parametrize("dtype", PROJECT_CUDA_DTYPES)
def test_opcheck_mla_latent_project_cuda(dtype, tokens, gen):
    """opcheck of the CUDA kernel on both of its paths (the test above needs both MLA kernels)."""
    a = _proj_inputs(ProjCase(tokens, 96, 64, 16, 8), gen, dtype, "cuda")
    c_kv = torch.empty(tokens, 64, dtype=dtype, device="cuda")
    k_pe = torch.empty(tokens, 16, dtype=dtype, device="cuda")
    for outs in [(None, None), (c_kv, k_pe), (None, k_pe)]:
        args = (a.hidden, a.w_dkv, a.norm_weight, 1e-6, a.cos_sin, a.positions, a.cache, a.slots, False, *outs)
        torch.library.opcheck(torch.ops.kvcore.mla_latent_project.default, args, test_utils=OPCHECK_UTILS)


# ============================================================================================
# Bad input: the right error, naming the argument, and nothing written
# ============================================================================================


def _proj_args(device, gen) -> SimpleNamespace:
    a = _proj_inputs(ProjCase(4, 32, 32, 16, 4), gen, torch.bfloat16, device, max_pos=64)
    a.kw = {}
    return a


def _all_fp32(a, d):
    for name in ("hidden", "w_dkv", "norm_weight"):
        setattr(a, name, getattr(a, name).float())
    a.cache = poison(a.cache.float())


def _misaligned_copy(t):
    """A contiguous copy of ``t`` whose data starts 2 bytes past a 16-byte boundary."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)


def _misaligned_cache(a, d):
    n, ps, w = a.cache.shape
    return poison(torch.empty(n * ps * w + 1, dtype=a.cache.dtype, device=d))[1:].view(n, ps, w)


def _odd_page_stride_cache(a, d):
    n, ps, w = a.cache.shape
    return poison(torch.empty(n, ps * w + 4, dtype=a.cache.dtype, device=d))[:, : ps * w].view(n, ps, w)


def _width_not_multiple_of_8(a, d):
    # R = 30, P = 6: latent rows of 36 elements (72 bytes)
    n, ps, _ = a.cache.shape
    a.norm_weight = a.norm_weight[:30].contiguous()
    a.cos_sin = reference.rope_cos_sin(64, 6).to(d)
    a.w_dkv = a.w_dkv[:, :36].contiguous()
    return poison(torch.empty(n, ps, 36, dtype=a.cache.dtype, device=d))


BAD_PROJECT = [
    BadCase("hidden_fp64", _set("hidden", lambda t, a, d: t.double()), RuntimeError, r"\bhidden must be"),
    BadCase("w_dkv_dtype", _set("w_dkv", lambda t, a, d: t.half()), RuntimeError, r"w_dkv must have dtype"),
    BadCase("cos_sin_bf16", _set("cos_sin", lambda t, a, d: t.bfloat16()), RuntimeError, r"cos_sin must have dtype"),
    BadCase("positions_int32", _set("positions", lambda t, a, d: t.int()), RuntimeError, r"positions must have dtype"),
    BadCase("slots_int32", _set("slots", lambda t, a, d: t.int()), RuntimeError, r"slot_mapping must have dtype"),
    BadCase("hidden_rank", _set("hidden", lambda t, a, d: t[None]), RuntimeError, r"hidden must be 2-D"),
    BadCase("w_dkv_width", _set("w_dkv", lambda t, a, d: t[:, :-2].contiguous()), RuntimeError, r"w_dkv must have shape"),
    BadCase("cache_width", _set("cache", lambda t, a, d: t[..., :-2].contiguous()), RuntimeError,
            r"latent_cache must have last dim"),
    BadCase("odd_rope", _set("cos_sin", lambda t, a, d: t[:, :15].contiguous()), RuntimeError, r"cos_sin must have an even"),
    BadCase("slots_short", _set("slots", lambda t, a, d: t[:2]), RuntimeError, r"slot_mapping must have shape"),
    BadCase("w_dkv_noncontig", _set("w_dkv", lambda t, a, d: t.t().contiguous().t()), RuntimeError,
            r"w_dkv must be contiguous"),
    BadCase("cache_other_device", _set("cache", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"latent_cache must be on the same device", cuda_only=True),
    BadCase("slot_out_of_range", _set_item("slots", 0, lambda a: 10**6), ValueError, r"slot_mapping\[0\]"),
    BadCase("slot_below_minus_one", _set_item("slots", 2, lambda a: -2), ValueError, r"slot_mapping\[2\]"),
    BadCase("position_out_of_range", _set_item("positions", 3, lambda a: 64), ValueError, r"positions\[3\]"),
    BadCase("bad_eps", _set_kw("eps", 0.0), ValueError, r"eps must be"),
    BadCase("norm_weight_dtype", _set("norm_weight", lambda t, a, d: t.float()), RuntimeError,
            r"norm_weight must have dtype"),
    BadCase("cache_rank", _set("cache", lambda t, a, d: t[0]), RuntimeError, r"latent_cache must be 3-D"),
    BadCase("positions_rank", _set("positions", lambda t, a, d: t[:, None]), RuntimeError, r"positions must be 1-D"),
    BadCase("positions_short", _set("positions", lambda t, a, d: t[:3]), RuntimeError, r"positions must have shape"),
    BadCase("c_kv_out_shape", _set_kw("c_kv_out", "short"), RuntimeError, r"c_kv_out must have shape"),
    BadCase("hidden_last_dim_strided", _set("hidden", lambda t, a, d: t.t().contiguous().t()), RuntimeError,
            r"hidden must be contiguous in its last dim"),
    BadCase("cache_inner_strided", _set("cache", lambda t, a, d: t.transpose(1, 2).contiguous().transpose(1, 2)),
            RuntimeError, r"latent_cache must be densely packed"),
    BadCase("slots_other_device", _set("slots", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"slot_mapping must be on the same device", cuda_only=True),
    # Limits of the CUDA kernel (16-byte rows, 16-byte loads and stores); the CPU kernel takes these.
    BadCase("fp32_on_cuda", lambda a, d: _all_fp32(a, d), RuntimeError, r"hidden must be bfloat16 or float16 on CUDA", cuda_only=True,
            kernel_limit=True),
    BadCase("cache_misaligned", _set("cache", lambda t, a, d: _misaligned_cache(a, d)), RuntimeError,
            r"latent_cache must start on a 16-byte boundary", cuda_only=True, kernel_limit=True),
    BadCase("cache_page_stride", _set("cache", lambda t, a, d: _odd_page_stride_cache(a, d)), RuntimeError,
            r"latent_cache's page stride must be a multiple of 8", cuda_only=True, kernel_limit=True),
    BadCase("cache_pages_overlap", _set("cache", lambda t, a, d: t[:1].expand(t.shape[0], -1, -1)), RuntimeError,
            r"latent_cache's pages overlap: page stride 0"),
    BadCase("w_dkv_misaligned", _set("w_dkv", lambda t, a, d: _misaligned_copy(t)), RuntimeError,
            r"w_dkv must start on a 16-byte boundary", cuda_only=True, kernel_limit=True),
    BadCase("width_not_multiple_of_8", _set("cache", lambda t, a, d: _width_not_multiple_of_8(a, d)), RuntimeError,
            r"must be a multiple of 8 \(16-byte latent rows\)", cuda_only=True, kernel_limit=True),
]


@pytest.mark.parametrize("bad", [b.param() for b in BAD_PROJECT])
@pytest.mark.parametrize("device", PROJECT_DEVICES)
def test_mla_latent_project_bad_input(device, bad, gen):
    bad.skip_unless_applies(device)
    a = _proj_args(device, gen)
    bad.mutate(a, device)
    if a.kw.get("c_kv_out") == "short":  # a preallocated c_kv output one token short
        a.kw["c_kv_out"] = torch.empty(a.hidden.shape[0] - 1, a.norm_weight.shape[0], dtype=a.hidden.dtype,
                                       device=device)
    with pytest.raises(bad.error, match=bad.match):
        kvcore.mla_latent_project(a.hidden, a.w_dkv, a.norm_weight, a.cos_sin, a.positions, a.cache, a.slots, **a.kw)
    assert bool(torch.isnan(a.cache).all()), "latent_cache written by a failed call"


def _decode_args(device, gen) -> SimpleNamespace:
    cache, table, seq_lens = _latent_cache([5, 17, 0], 8, 80, gen, torch.bfloat16, device)
    return SimpleNamespace(
        q=randn(3, 4, 80, gen=gen, dtype=torch.bfloat16, device=device),
        cache=cache,
        table=table,
        seq_lens=seq_lens,
        out=poison(torch.empty(3, 4, 64, dtype=torch.bfloat16, device=device)),
        lse=poison(torch.empty(3, 4, device=device)),
        kw={"scale": 0.125},
    )


BAD_MLA_DECODE = [
    BadCase("q_fp64", _set("q", lambda t, a, d: t.double()), RuntimeError, r"\bq must be"),
    BadCase("cache_dtype", _set("cache", lambda t, a, d: t.half()), RuntimeError, r"latent_cache must have dtype"),
    BadCase("out_dtype", _set("out", lambda t, a, d: poison(t.float())), RuntimeError, r"\bout must have dtype"),
    BadCase("lse_dtype", _set("lse", lambda t, a, d: poison(t.bfloat16())), RuntimeError, r"\blse must have dtype"),
    BadCase("table_int64", _set("table", lambda t, a, d: t.long()), RuntimeError, r"block_table must have dtype"),
    BadCase("q_rank", _set("q", lambda t, a, d: t[0]), ValueError, r"\bq must be 3-D"),
    BadCase("cache_rank", _set("cache", lambda t, a, d: t[:, :, None]), RuntimeError, r"latent_cache must be 3-D"),
    BadCase("cache_width", _set("cache", lambda t, a, d: t[..., :-2].contiguous()), RuntimeError,
            r"latent_cache last dim"),
    BadCase("out_too_wide", _set("out", lambda t, a, d: poison(torch.empty(3, 4, 96, dtype=t.dtype, device=d))),
            ValueError, r"v_dim must be in"),
    BadCase("out_heads", _set("out", lambda t, a, d: poison(torch.empty(3, 2, 64, dtype=t.dtype, device=d))),
            RuntimeError, r"\bout must have shape"),
    BadCase("out_noncontig", _set("out", lambda t, a, d: poison(torch.empty(3, 64, 4, dtype=t.dtype, device=d)).transpose(1, 2)),
            RuntimeError, r"\bout must be contiguous"),
    BadCase("lse_shape", _set("lse", lambda t, a, d: poison(torch.empty(3, 3, device=d))), RuntimeError,
            r"\blse must have shape"),
    BadCase("seq_lens_batch", _set("seq_lens", lambda t, a, d: t[:2]), RuntimeError, r"seq_lens must have shape"),
    BadCase("q_other_device", _set("q", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"must be on the same device", cuda_only=True),
    BadCase("page_out_of_range", _set_item("table", (1, 0), lambda a: a.cache.shape[0]), ValueError, r"block_table\[1, 0\]"),
    BadCase("seq_len_over_capacity", _set_item("seq_lens", 0, lambda a: a.table.shape[1] * 8 + 1), ValueError,
            r"seq_lens\[0\]"),
    BadCase("scale_zero", _set_kw("scale", 0.0), ValueError, r"scale must be"),
    BadCase("num_splits_negative", _set_kw("num_splits", -1), ValueError, r"num_splits must be"),
    BadCase("seq_lens_int64", _set("seq_lens", lambda t, a, d: t.long()), RuntimeError, r"seq_lens must have dtype"),
    BadCase("table_rank", _set("table", lambda t, a, d: t[0]), RuntimeError, r"block_table must be 2-D"),
    BadCase("seq_lens_rank", _set("seq_lens", lambda t, a, d: t[:, None]), RuntimeError, r"seq_lens must be 1-D"),
    BadCase("table_rows", _set("table", lambda t, a, d: t[:2]), RuntimeError, r"block_table must have batch"),
    BadCase("q_last_dim_strided", _set("q", lambda t, a, d: t.transpose(1, 2).contiguous().transpose(1, 2)),
            RuntimeError, r"\bq must be contiguous in its last dim"),
    BadCase("cache_inner_strided", _set("cache", lambda t, a, d: t.transpose(1, 2).contiguous().transpose(1, 2)),
            RuntimeError, r"latent_cache must be densely packed"),
    BadCase("table_noncontig", _set("table", lambda t, a, d: t.t().contiguous().t()), RuntimeError,
            r"block_table must be contiguous"),
    BadCase("lse_noncontig", _set("lse", lambda t, a, d: poison(torch.empty(4, 3, device=d)).t()), RuntimeError,
            r"\blse must be contiguous"),
    BadCase("page_negative", _set_item("table", (1, 2), lambda a: -1), ValueError, r"block_table\[1, 2\]"),
    BadCase("seq_len_negative", _set_item("seq_lens", 1, lambda a: -1), ValueError, r"seq_lens must be >= 0"),
    BadCase("scale_nan", _set_kw("scale", math.nan), ValueError, r"scale must be"),
    BadCase("scale_past_float32", _set_kw("scale", 1e39), ValueError, r"scale must be .*float32's range"),
    BadCase("v_dim_not_int", _set_kw("v_dim", 8.5), ValueError, r"v_dim must be an int in \[1, 80\]"),
    BadCase("v_dim_disagrees_with_out", _set_kw("v_dim", 32), ValueError, r"v_dim = 32 disagrees with out's last dim"),
    BadCase("table_other_device", _set("table", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"block_table must be on the same device", cuda_only=True),
    BadCase("out_other_device", _set("out", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"\bout must be on the same device", cuda_only=True),
    *BAD_PLAN_SEQ_LENS,
]


@pytest.mark.parametrize("bad", [b.param() for b in BAD_MLA_DECODE])
@pytest.mark.parametrize("device", DECODE_DEVICES)
def test_mla_decode_bad_input(device, bad, gen):
    a = _decode_args(device, gen)
    bad.mutate(a, device)
    with pytest.raises(bad.error, match=bad.match):
        kvcore.mla_decode(a.q, a.cache, a.table, a.seq_lens, out=a.out, lse=a.lse, **a.kw)
    assert bool(torch.isnan(a.out).all()) and bool(torch.isnan(a.lse).all()), "outputs written by a failed call"


@pytest.mark.parametrize("device", DECODE_DEVICES)
def test_mla_decode_forced_splits_past_256_are_256(device, gen):
    """num_splits above 256 is taken as 256 on both devices (the CPU kernel sized its scratch from
    it, capped only at a part per 32 keys: 2^40 splits once asked for gigabytes of partials)."""
    cache, table, seq_lens = _latent_cache([8300, 0, 40], 8, 80, gen, torch.bfloat16, device)  # 260 parts of 32
    q = randn(3, 4, 80, gen=gen, dtype=torch.bfloat16, device=device)
    capped = kvcore.mla_decode(q, cache, table, seq_lens, scale=0.125, v_dim=64, num_splits=256, return_lse=True)
    huge = kvcore.mla_decode(q, cache, table, seq_lens, scale=0.125, v_dim=64, num_splits=2**40, return_lse=True)
    assert torch.equal(huge[0], capped[0]) and torch.equal(huge[1], capped[1])
    # ... and 256 splits (more than any other test forces) give the attention (outputs ~S^-1/2:
    # the tolerance follows their size).
    ref_out, ref_lse = reference.mla_decode(q, cache, table, seq_lens, 0.125, 64)
    torch.testing.assert_close(capped[0].double(), ref_out.double(), atol=1e-2 * ref_out.abs().max().item(), rtol=2e-2)
    torch.testing.assert_close(capped[1].double(), ref_lse.double(), **LSE_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_mla_op_rejects_bad_scalars_without_the_wrapper(device, gen):
    a = _decode_args(device, gen)
    for scale in (-1.0, 1e39):  # (1e39 is inf in the kernels' float32)
        with pytest.raises(RuntimeError, match=r"scale must be"):
            torch.ops.kvcore.mla_decode(a.q, a.cache, a.table, a.seq_lens, scale, a.out, a.lse, None, 0)
    p = _proj_args(device, gen)
    with pytest.raises(RuntimeError, match=r"eps must be"):
        torch.ops.kvcore.mla_latent_project(p.hidden, p.w_dkv, p.norm_weight, float("nan"), p.cos_sin, p.positions,
                                            p.cache, p.slots, True, None, None)


@pytest.mark.parametrize("device", DEVICES)
def test_mla_bad_indices_without_validation(device, no_validation, gen):
    """With validation off, bad indices give wrong numbers but no out-of-bounds access: slots out of
    range are skipped, positions clamped, pages clamped, seq_lens clamped to the table's capacity."""
    p = _proj_args(device, gen)
    p.slots[0], p.slots[2] = 10**9, -5
    p.positions[1] = 10**9
    kvcore.mla_latent_project(p.hidden, p.w_dkv, p.norm_weight, p.cos_sin, p.positions, p.cache, p.slots)
    flat = p.cache.reshape(-1, p.cache.shape[-1])
    written = flat[~torch.isnan(flat).all(dim=1)]
    assert written.shape[0] == int(((p.slots >= 0) & (p.slots < flat.shape[0])).sum())
    assert not torch.isnan(written).any()

    a = _decode_args(device, gen)
    a.table[1, 0] = 10**6
    a.table[1, 1] = -3
    a.seq_lens[2] = 10**6
    kvcore.mla_decode(a.q, a.cache, a.table, a.seq_lens, out=a.out, lse=a.lse, scale=0.125)
    if device == "cuda":
        torch.cuda.synchronize()
    assert not torch.isnan(a.out).any() and not torch.isnan(a.lse).any()


# ============================================================================================
# The layer against naive (non-absorbed) MLA
# ============================================================================================


def _randomise(layer: MLAAttention, gen) -> None:
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "layernorm" in name:
                param.copy_(1.0 + 0.2 * randn(*param.shape, gen=gen))
            else:
                param.copy_(randn(*param.shape, gen=gen, scale=param.shape[-1] ** -0.5))


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def naive_mla(layer: MLAAttention, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Plain MLA in float64 over one sequence's whole history ``hidden`` ``[L, d]`` (causal):
    explicit per-head keys ``[W_UK c_kv, k_pe]`` and values ``W_UV c_kv``, nothing absorbed."""
    c = layer.config
    w = {n: p.detach().double() for n, p in layer.named_parameters()}
    h = hidden.double()
    n = h.shape[0]
    if c.q_lora_rank is not None:
        q = _rms(h @ w["q_a_proj.weight"].T, w["q_a_layernorm.weight"], c.rms_norm_eps) @ w["q_b_proj.weight"].T
    else:
        q = h @ w["q_proj.weight"].T
    q = q.view(n, c.num_heads, c.qk_head_dim)
    q_pe = reference.rope(q[..., c.qk_nope_head_dim :].transpose(0, 1), positions, layer.cos_sin, c.interleaved_rope)
    q = torch.cat([q[..., : c.qk_nope_head_dim], q_pe.transpose(0, 1)], dim=-1)
    kv = h @ w["kv_a_proj_with_mqa.weight"].T
    c_kv = _rms(kv[:, : c.kv_lora_rank], w["kv_a_layernorm.weight"], c.rms_norm_eps)
    k_pe = reference.rope(kv[:, c.kv_lora_rank :], positions, layer.cos_sin, c.interleaved_rope)
    kvb = (c_kv @ w["kv_b_proj.weight"].T).view(n, c.num_heads, c.qk_nope_head_dim + c.v_head_dim)
    k = torch.cat([kvb[..., : c.qk_nope_head_dim], k_pe[:, None].expand(n, c.num_heads, -1)], dim=-1)
    v = kvb[..., c.qk_nope_head_dim :]
    scores = torch.einsum("qhd,khd->hqk", q, k) * c.scale
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, -1)
    return o @ w["o_proj.weight"].T


TINY = dict(hidden_size=64, num_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=24,
            max_position=256)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(MLAConfig(**TINY, q_lora_rank=32, interleaved_rope=True), id="qlora-interleaved"),
        pytest.param(MLAConfig(**TINY, q_lora_rank=None, interleaved_rope=False), id="noqlora-neox"),
        pytest.param(MLAConfig.deepseek_v2(hidden_size=64, num_heads=2, q_lora_rank=48, max_position=256),
                     id="deepseek-dims-H2"),
    ],
)
def test_layer_prefill_and_decode_match_naive_mla(config, gen):
    torch.manual_seed(0)
    layer = MLAAttention(config, dtype=torch.float32)
    _randomise(layer, gen)
    cache = MLALatentCache(1, num_pages=16, page_size=8, kv_lora_rank=config.kv_lora_rank,
                           rope_dim=config.qk_rope_head_dim, dtype=torch.float32)
    latent = cache.latent(0)
    seqs = [cache.add_sequence(), cache.add_sequence()]
    history = {s: [] for s in seqs}
    tol = dict(atol=1e-4, rtol=1e-3)

    def run_step(num_tokens: list[int]) -> None:
        step = cache.step(seqs, num_tokens)
        # the host copy of the lengths the decode path plans from (plan_seq_lens)
        assert step.host_seq_lens == step.seq_lens.tolist() == [cache.seq_len(s) for s in seqs]
        hidden = randn(sum(num_tokens), config.hidden_size, gen=gen)
        out = layer(hidden, latent, step)
        assert out.shape == hidden.shape
        t0 = 0
        for s, n in zip(seqs, num_tokens):
            history[s].append(hidden[t0 : t0 + n])
            full = torch.cat(history[s])
            if n:
                expect = naive_mla(layer, full, torch.arange(full.shape[0]))[-n:]
                torch.testing.assert_close(out[t0 : t0 + n].double(), expect, **tol)
            t0 += n

    run_step([5, 11])  # prefill, one sequence crossing a page
    run_step([0, 6])  # a second prefill chunk for one sequence (attends to its cached prefix)
    for _ in range(3):
        run_step([1, 1])  # absorbed decode
    assert cache.seq_len(seqs[0]) == 8 and cache.seq_len(seqs[1]) == 20


def test_layer_decode_equals_prefill_path_on_one_token(gen):
    """A one-token step through the non-absorbed prefill path and through the absorbed decode
    path give the same output (the absorption is exact up to rounding)."""
    config = MLAConfig(**TINY, q_lora_rank=32)
    layer = MLAAttention(config)
    _randomise(layer, gen)
    outs = []
    hist = randn(7, config.hidden_size, gen=gen)
    new = randn(1, config.hidden_size, gen=gen)
    for path in ("prefill", "decode"):
        cache = MLALatentCache(1, num_pages=4, page_size=4, kv_lora_rank=64, rope_dim=16, dtype=torch.float32)
        s = cache.add_sequence()
        layer.prefill(hist, cache.latent(0), cache.step([s], [7]))
        outs.append(getattr(layer, path)(new, cache.latent(0), cache.step([s], [1])))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_decode_of_a_cache_built_step_skips_the_index_checks(gen, monkeypatch):
    """MLALatentCache.step's tables come from its own allocator: the absorbed decode does not
    re-check their contents (a device->host sync a layer on a GPU) while the step holds exactly
    the cache's tensors and the latent has the cache's pages. A step built by hand, a
    dataclasses.replace copy, a step given another table, or a smaller latent is checked; all
    give the same output."""
    import dataclasses

    from kvcore.mla import MLAStep

    config = MLAConfig(**TINY, q_lora_rank=32)
    layer = MLAAttention(config)
    _randomise(layer, gen)
    cache = MLALatentCache(1, num_pages=4, page_size=4, kv_lora_rank=64, rope_dim=16, dtype=torch.float32)
    s = cache.add_sequence()
    layer.prefill(randn(7, config.hidden_size, gen=gen), cache.latent(0), cache.step([s], [7]))
    step = cache.step([s], [1])
    assert step._trusted_for(cache.latent(0)) and "_issued" not in repr(step)
    by_hand = MLAStep(step.num_tokens, step.positions, step.slot_mapping, step.block_table, step.seq_lens,
                      step.host_seq_lens)
    copied = dataclasses.replace(step)
    retabled = dataclasses.replace(step)
    retabled._issued = step._issued
    retabled.block_table = step.block_table.clone()
    assert not any(x._trusted_for(cache.latent(0)) for x in (by_hand, copied, retabled))
    assert not step._trusted_for(cache.latent(0)[:1])  # fewer pages than the table may name
    calls = record_check_calls(monkeypatch, "_check_block_table_contents")
    new = randn(1, config.hidden_size, gen=gen)
    latent = cache.latent(0).clone()
    got = layer.decode(new, cache.latent(0), step)
    assert calls == []
    for n, other in enumerate((by_hand, copied, retabled), start=1):
        cache.latent(0).copy_(latent)  # (the decode wrote the token's latent; the same again)
        assert torch.equal(layer.decode(new, cache.latent(0), other), got) and len(calls) == n


def test_layer_refreshes_absorbed_weights_and_checks_arguments(gen):
    config = MLAConfig(**TINY, q_lora_rank=None)
    layer = MLAAttention(config)
    _randomise(layer, gen)
    w_uk = layer._absorbed()[1].clone()
    with torch.no_grad():
        layer.kv_b_proj.weight.mul_(2.0)
    torch.testing.assert_close(layer._absorbed()[1], 2.0 * w_uk)
    cache = MLALatentCache(1, num_pages=4, page_size=4, kv_lora_rank=64, rope_dim=16, dtype=torch.float32)
    s = cache.add_sequence()
    with pytest.raises(ValueError, match="hidden must be"):
        layer(randn(2, 10, gen=gen), cache.latent(0), cache.step([s], [2]))
    with pytest.raises(ValueError, match="decode needs one new token"):
        layer.decode(randn(3, 64, gen=gen), cache.latent(0), cache.step([s], [3]))
    with pytest.raises(ValueError, match="qk_rope_head_dim must be even"):
        MLAConfig(**{**TINY, "qk_rope_head_dim": 15})
    with pytest.raises(ValueError, match="layer must be"):
        cache.latent(1)
    assert cache.memory_report()["bytes_per_token"] == 80 * 4


# ============================================================================================
# Benchmark group
# ============================================================================================


def test_mla_bench_group_cpu(tmp_path):
    """`python -m kvcore.bench --group mla` on CPU: every default impl checked and timed on every case."""
    import json

    from kvcore.bench.__main__ import main

    result = main(["--group", "mla", "--device", "cpu", "--out", str(tmp_path), "--no-plot"])
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert {r["impl"] for r in rows} == {"kvcore", "torch"}
    assert any(r["case"].startswith("decode") for r in rows) and any(r["case"].startswith("project") for r in rows)
    for r in rows:
        assert r["group"] == "mla" and "error" not in r, r
        assert r["ms"] > 0 and r["gbps"] > 0 and r["tflops"] > 0, r


# ============================================================================================
# mla_decode's CUDA kernel: the grid of shapes, splits, determinism, bad input
# ============================================================================================

CUDA_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def _cuda_decode_inputs(lens, heads, page_size, gen, dtype, dk=576, dv=512, scale=576**-0.5, extra_table_cols=1):
    cache, table, seq_lens = _latent_cache(lens, page_size, dk, gen, dtype, "cuda", extra_table_cols)
    q = randn(len(lens), heads, dk, gen=gen, dtype=dtype, device="cuda")
    out = poison(torch.empty(len(lens), heads, dv, dtype=dtype, device="cuda"))
    lse = poison(torch.empty(len(lens), heads, device="cuda"))
    return SimpleNamespace(q=q, cache=cache, table=table, seq_lens=seq_lens, out=out, lse=lse, scale=scale, dv=dv)


def _check_against_reference(a, lens, dtype):
    ref_out, ref_lse = reference.mla_decode(a.q, a.cache, a.table, a.seq_lens, a.scale, a.dv)
    assert_out_lse_close(a.out, a.lse, ref_out, ref_lse, dtype)
    for b, n in enumerate(lens):
        if n == 0:
            assert bool((a.out[b] == 0).all()) and bool(torch.isneginf(a.lse[b]).all())


def _decode_and_check(a, lens, dtype, **kwargs):
    """mla_decode of ``a``'s inputs into its poisoned outputs (``kwargs``: num_splits), checked
    against the reference."""
    kvcore.mla_decode(a.q, a.cache, a.table, a.seq_lens, scale=a.scale, out=a.out, lse=a.lse, **kwargs)
    _check_against_reference(a, lens, dtype)


def _grid_lens(batch: int, max_len: int, page_size: int, gen) -> list[int]:
    """Ragged lengths with 0, 1, max_len, a partial page, and page-boundary lengths (k pages
    exactly, one past, one short) when the batch has room for them."""
    boundary = [page_size, page_size + 1, 2 * page_size - 1, 4 * page_size, 31, 32, 33, 64]
    extra = [min(n, max_len) for n in boundary[: max(0, batch - 4)]]
    return ragged_lens(batch - len(extra), max_len, page_size, gen) + extra


@mla_decode_cuda_only
@pytest.mark.parametrize("batch", [1, 3, 33], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("page_size", [16, 32, 64], ids=lambda p: f"ps{p}")
@pytest.mark.parametrize("heads", [1, 8, 16, 22, 128], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_mla_decode_cuda_grid(dtype, heads, page_size, batch, gen):
    """Every head count (one m16 tile, padded tiles, one padded 32-head block, four blocks),
    page size and batch, ragged lengths with 0, 1 and page boundaries, automatic splits."""
    lens = _grid_lens(batch, 700, page_size, gen) if batch > 1 else [700]
    a = _cuda_decode_inputs(lens, heads, page_size, gen, dtype)
    _decode_and_check(a, lens, dtype)


@mla_decode_cuda_only
@pytest.mark.parametrize(
    ("page_size", "heads", "lens"),
    [
        pytest.param(1, 16, [0, 1, 2, 33, 300], id="ps1"),
        pytest.param(128, 16, [0, 1, 127, 128, 129, 600], id="ps128"),
        pytest.param(7, 22, [0, 1, 6, 7, 8, 250], id="ps7"),  # not a power of two
        pytest.param(256, 40, [1, 255, 256, 257, 513], id="ps256"),
    ],
)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_mla_decode_cuda_page_sizes(dtype, page_size, heads, lens, gen):
    a = _cuda_decode_inputs(lens, heads, page_size, gen, dtype)
    _decode_and_check(a, lens, dtype)


@mla_decode_cuda_only
@pytest.mark.parametrize(("heads", "lens"), [pytest.param(16, [40000, 1, 0], id="H16"),
                                             pytest.param(128, [40001], id="H128-B1")])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_mla_decode_cuda_long_sequence_splits(dtype, heads, lens, gen):
    """A long sequence with few CTAs: the automatic choice splits the KV range, and the last CTA
    of each (sequence, head block) merges the parts."""
    a = _cuda_decode_inputs(lens, heads, 64, gen, dtype)
    _decode_and_check(a, lens, dtype)


@mla_decode_cuda_only
@pytest.mark.parametrize(("heads", "lens"), [pytest.param(16, [0, 1, 63, 2000], id="H16"),
                                             pytest.param(22, [0, 700, 3000], id="H22"),
                                             pytest.param(128, [700], id="H128-B1"),
                                             pytest.param(64, [5000, 3, 40000], id="H64-full")])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_mla_decode_cuda_wide_block_table(dtype, heads, lens, gen):
    """A block table of 40000 tokens (sized for the longest context) over shorter sequences: the
    split count is made for the table's width and each sequence's splits share its own keys
    (split_range.h's split_chunk), for each kernel the head counts pick on this GPU (on Hopper:
    the H16 kernel, mla_decode_kernel at 22 heads, the wgmma kernel from 33). Twice, with fresh q."""
    cols = 40000 // 64
    for _ in range(2):
        a = _cuda_decode_inputs(lens, heads, 64, gen, dtype, extra_table_cols=cols - -(-max(lens) // 64))
        assert a.table.shape[1] == cols
        _decode_and_check(a, lens, dtype)


@mla_decode_cuda_only
@pytest.mark.parametrize("num_splits", [1, 2, 7], ids=lambda n: f"splits{n}")
@pytest.mark.parametrize("heads", [16, 128], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_mla_decode_cuda_forced_splits_deterministic(dtype, heads, num_splits, gen):
    """Forced split counts (more splits than some sequences have tiles: empty parts) match the
    reference, and a fixed count gives bitwise identical results call after call."""
    lens = [0, 1, 31, 32, 33, 1000, 3000]
    a = _cuda_decode_inputs(lens, heads, 32, gen, dtype)
    _decode_and_check(a, lens, dtype, num_splits=num_splits)
    first = (a.out.clone(), a.lse.clone())
    for _ in range(3):
        poison(a.out)
        poison(a.lse)
        kvcore.mla_decode(a.q, a.cache, a.table, a.seq_lens, scale=a.scale, out=a.out, lse=a.lse,
                          num_splits=num_splits)
        assert torch.equal(a.out, first[0]) and torch.equal(a.lse, first[1])


@mla_decode_cuda_only
@pytest.mark.parametrize(("dk", "dv"), [(576, 512), (576, 256), (512, 512), (128, 64), (48, 32), (200, 136)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("heads", [11, 20, 72], ids=lambda h: f"H{h}")
def test_mla_decode_cuda_other_widths(heads, dk, dv, gen):
    """Widths below DeepSeek's run on the same kernels with zero-padded columns (H <= 16:
    mla_decode_h16_kernel, whose warps then own partly or wholly empty column slices; H 20:
    mla_decode_kernel)."""
    lens = [0, 1, 77, 300]
    a = _cuda_decode_inputs(lens, heads, 16, gen, torch.bfloat16, dk=dk, dv=dv, scale=dk**-0.5)
    _decode_and_check(a, lens, torch.bfloat16, num_splits=2)


@mla_decode_cuda_only
def test_mla_decode_cuda_strided_q_and_cache(gen):
    """q a slice of a wider tensor and the cache one half of a [pages, 2, page_size, Dk] buffer."""
    lens = [5, 0, 260]
    cache2 = randn(len(lens) * 5 + 4, 2, 64, 576, gen=gen, dtype=torch.bfloat16, device="cuda")
    cache = cache2[:, 1]
    _, table, seq_lens = _latent_cache(lens, 64, 8, gen, torch.bfloat16, "cuda")
    q = randn(3, 24, 576 + 64, gen=gen, dtype=torch.bfloat16, device="cuda")[:, 4:20, 64:]
    out = poison(torch.empty(3, 16, 512, dtype=torch.bfloat16, device="cuda"))
    lse = poison(torch.empty(3, 16, device="cuda"))
    a = SimpleNamespace(q=q, cache=cache, table=table, seq_lens=seq_lens, out=out, lse=lse, scale=0.05, dv=512)
    _decode_and_check(a, lens, torch.bfloat16)


@mla_decode_cuda_only
def test_mla_decode_cuda_matches_naive_mla(gen):
    """The absorbed op, fed q_nope W_UK and the latents, equals plain MLA with explicit per-head
    keys [W_UK c, k_pe] and values W_UV c, once its output is projected by W_UV."""
    heads, rank, rope, nope, vdim, n = 16, 512, 64, 128, 128, 333
    g = lambda *s, sc=1.0: randn(*s, gen=gen, dtype=torch.float64, scale=sc)  # noqa: E731
    c_kv, k_pe = g(n, rank, sc=0.5), g(n, rope, sc=0.5)
    w_uk, w_uv = g(heads, nope, rank, sc=rank**-0.5), g(heads, rank, vdim, sc=rank**-0.5)
    q_nope, q_pe = g(heads, nope), g(heads, rope)
    scale = (nope + rope) ** -0.5
    k = torch.cat([torch.einsum("hdr,nr->hnd", w_uk, c_kv), k_pe.expand(heads, n, rope)], dim=-1)
    v = torch.einsum("nr,hrv->hnv", c_kv, w_uv)
    p = (torch.einsum("hd,hnd->hn", torch.cat([q_nope, q_pe], -1), k) * scale).softmax(-1)
    naive = torch.einsum("hn,hnv->hv", p, v)

    page = 32
    pages = (n + page - 1) // page
    cache = torch.zeros(pages, page, rank + rope, dtype=torch.float64)
    cache.view(-1, rank + rope)[:n] = torch.cat([c_kv, k_pe], -1)
    q_abs = torch.cat([torch.einsum("hd,hdr->hr", q_nope, w_uk), q_pe], -1)
    out = kvcore.mla_decode(q_abs[None].to("cuda", torch.bfloat16), cache.to("cuda", torch.bfloat16),
                            torch.arange(pages, dtype=torch.int32, device="cuda")[None],
                            torch.tensor([n], dtype=torch.int32, device="cuda"), scale=scale)
    absorbed = torch.einsum("hr,hrv->hv", out[0].double().cpu(), w_uv)
    err = (absorbed - naive).norm() / naive.norm()
    assert err < 2e-2, f"relative error {float(err):.3g}"


@mla_decode_cuda_only
def test_mla_decode_cuda_bad_indices_without_validation(no_validation, gen):
    """Bad pages and seq_lens are clamped in the kernel: wrong numbers, never a fault or NaN."""
    a = _cuda_decode_inputs([5, 70, 0, 300], 16, 16, gen, torch.bfloat16)
    a.table[1, 0] = 10**6
    a.table[1, 1] = -3
    a.seq_lens[2] = 10**6
    a.seq_lens[3] = -7
    kvcore.mla_decode(a.q, a.cache, a.table, a.seq_lens, scale=a.scale, out=a.out, lse=a.lse, num_splits=3)
    torch.cuda.synchronize()
    assert not torch.isnan(a.out).any() and not torch.isnan(a.lse).any()
    assert bool((a.out[3] == 0).all()) and bool(torch.isneginf(a.lse[3]).all())


@mla_decode_cuda_only
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_mla_decode_cuda_h16_many_tiles_and_pages(dtype, gen):
    """mla_decode_h16_kernel over many 16-token tiles (ring wrap-around many times), a page size
    below the tile (1 and 8: several pages per tile) and a non-power-of-two one (12), the
    automatic split and a forced uneven one."""
    for page_size, lens, splits in ((8, [0, 1, 15, 16, 17, 2049], 0), (1, [3, 160, 0], 3), (12, [1000, 5, 13], 5)):
        a = _cuda_decode_inputs(lens, 16, page_size, gen, dtype)
        _decode_and_check(a, lens, dtype, num_splits=splits)


# What the mla_decode kernel-switch tests re-run in a subprocess: every CUDA test that runs an
# mla_decode kernel (the grid, widths, splits, pages, NaN rules, graph replays), not the
# projection's tests nor the launcher's input checks, which no decode switch changes.
MLA_DECODE_KERNEL_TESTS = "mla_decode and not in_subprocess and not bad_input and not misspelt"
MLA_DECODE_TEST_FILES = ["tests/test_mla.py", "tests/test_nan.py", "tests/test_determinism.py", "tests/test_cuda_graph.py"]


def _rerun_mla_decode_tests_with(name: str, value: str) -> None:
    run_tests_with_env(name, value, MLA_DECODE_TEST_FILES, MLA_DECODE_KERNEL_TESTS, 1, "-m", "cuda")


@mla_decode_cuda_only
@pytest.mark.skipif(os.environ.get("KVCORE_MLA_DECODE_H16") == "old", reason="this process already runs the old path")
def test_mla_decode_cuda_h16_old_path_in_subprocess():
    """KVCORE_MLA_DECODE_H16=old (read once per process) puts H <= 16 back on mla_decode_kernel,
    the path before session 7 (this process runs the default, mla_decode_h16_kernel): the CUDA
    cases of this file and the MLA cases of the NaN, determinism and CUDA-graph tests once more in
    a fresh process with it set."""
    _rerun_mla_decode_tests_with("KVCORE_MLA_DECODE_H16", "old")


# The wgmma kernel's switches, each re-run with its non-default value: (variable, default, value).
WGMMA_SWITCHES = [
    # mla_decode_kernel (mma.sync, 32 heads per CTA) for more than 32 heads instead of the Hopper
    # default, so the kernel other GPUs run stays tested on this one too.
    ("KVCORE_MLA_DECODE_WIDE", "wgmma", "old"),
    # mla_decode_seesaw_kernel (both warpgroups compute S, for alternate tiles; session 9).
    ("KVCORE_MLA_DECODE_WIDE", "wgmma", "seesaw"),
    # P handed between the wgmma kernel's warpgroups on named barriers instead of the default
    # mbarriers (the form compute-sanitizer's racecheck can judge).
    ("KVCORE_MLA_WGMMA_HANDOFF", "mbarrier", "named"),
    # The latent tiles loaded by TMA boxes from one thread (mla_decode_wgmma_tma_kernel; session
    # 10) instead of warpgroup 1's cp.async; page sizes the boxes cannot tile keep cp.async.
    ("KVCORE_MLA_WGMMA_LOADER", "cp_async", "tma"),
]


@mla_decode_cuda_only
@pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_capability() != (9, 0),
                    reason="mla_decode_wgmma_kernel runs on compute capability 9.0 only")
@pytest.mark.parametrize("name,default,value", WGMMA_SWITCHES, ids=[v for _, _, v in WGMMA_SWITCHES])
def test_mla_decode_cuda_wgmma_switch_in_subprocess(name, default, value):
    """Each wgmma-kernel switch (read once per process) at its other value: the same selection as
    the H16 switch's test, in a fresh process."""
    if os.environ.get(name, default) != default:
        pytest.skip("this process already runs it")
    _rerun_mla_decode_tests_with(name, value)


@mla_decode_cuda_only
@pytest.mark.parametrize("name", ["KVCORE_MLA_DECODE_H16", "KVCORE_MLA_DECODE_WIDE", "KVCORE_MLA_WGMMA_HANDOFF",
                                  "KVCORE_MLA_WGMMA_LOADER"])
def test_mla_decode_cuda_misspelt_switch_is_an_error(name):
    """A misspelt value of any mla_decode kernel switch fails every call (here one with 4 heads,
    which none of the wide-head switches would route) instead of silently timing a default."""
    assert_switch_value_rejected(
        name, "bogus",
        """
        q = torch.randn(1, 4, 576, dtype=torch.bfloat16, device="cuda")
        cache = torch.randn(2, 64, 576, dtype=torch.bfloat16, device="cuda")
        table = torch.tensor([[0, 1]], dtype=torch.int32, device="cuda")
        seq_lens = torch.tensor([40], dtype=torch.int32, device="cuda")
        """,
        "kvcore.mla_decode(q, cache, table, seq_lens, scale=0.1, v_dim=512)")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.skipif(not PROJECT_CUDA_BUILT, reason="the mla_latent_project CUDA kernel is not built")
@pytest.mark.skipif(os.environ.get("KVCORE_MLA_PROJECT_FUSED_MAX", "1") != "1",
                    reason="this process already runs another boundary")
def test_mla_latent_project_cuda_fused_max_64_in_subprocess():
    """KVCORE_MLA_PROJECT_FUSED_MAX=64 (read once per process) sends every T <= 64 to the fused
    kernel instead of cuBLAS + the epilogue kernel (the default above T1): this file's projection
    cases once more in a fresh process with it set, so the grid's T 2 to 64 run the fused kernel
    too, in each of its three launch forms (up to 16, 32 and 64 tokens)."""
    run_tests_with_env("KVCORE_MLA_PROJECT_FUSED_MAX", "64", ["tests/test_mla.py"],
                       "latent_project and not in_subprocess", 1, "-m", "cuda")


def _cuda_bad_q_misaligned(a):
    wide = torch.empty(*a.q.shape[:2], a.q.shape[2] + 8, dtype=a.q.dtype, device="cuda")
    a.q = wide[..., 4 : 4 + a.q.shape[2]]  # 8-byte offset, strides still multiples of 8


BAD_MLA_DECODE_CUDA = [
    ("dk_not_multiple_of_8", lambda a: setattr(a, "q", a.q[..., :76].contiguous())
     or setattr(a, "cache", a.cache[..., :76].contiguous()),
     r"Dk\) must be a multiple of 8"),
    ("dk_too_wide", lambda a: setattr(a, "q", torch.zeros(*a.q.shape[:2], 640, dtype=a.q.dtype, device="cuda"))
     or setattr(a, "cache", torch.zeros(*a.cache.shape[:2], 640, dtype=a.q.dtype, device="cuda")),
     r"Dk\) must be a multiple of 8 and <= 576"),
    ("dv_not_multiple_of_8", lambda a: setattr(a, "out", poison(torch.empty(*a.out.shape[:2], 60, dtype=a.q.dtype,
                                                                          device="cuda"))),
     r"Dv\) must be a multiple of 8"),
    ("q_misaligned", _cuda_bad_q_misaligned, r"q must start on a 16-byte boundary"),
    ("q_stride", lambda a: setattr(a, "q", torch.zeros(a.q.shape[0], a.q.shape[1], 81, dtype=a.q.dtype,
                                                       device="cuda")[..., :80]),
     r"q strides must be multiples of 8"),
    ("small_workspace_forced_splits", lambda a: a.kw.update(num_splits=4, workspace=torch.zeros(
        1024, dtype=torch.uint8, device="cuda")), r"needs a workspace of"),
]


@mla_decode_cuda_only
@pytest.mark.parametrize(("mutate", "match"), [pytest.param(m, r, id=i) for i, m, r in BAD_MLA_DECODE_CUDA])
def test_mla_decode_cuda_bad_input(mutate, match, gen):
    """Limits of the CUDA kernel: a RuntimeError naming the argument, nothing written."""
    a = _decode_args("cuda", gen)
    mutate(a)
    with pytest.raises(RuntimeError, match=match):
        kvcore.mla_decode(a.q, a.cache, a.table, a.seq_lens, out=a.out, lse=a.lse, **a.kw)
    assert bool(torch.isnan(a.out).all()) and bool(torch.isnan(a.lse).all()), "outputs written by a failed call"
