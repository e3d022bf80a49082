"""The Python wrappers' behaviour at the edges of their input: autograd, tensors without data
(meta), integer-like and tensor scalars, and arguments that disagree.

These are wrapper behaviours, the same code path on every device, so they run on CPU (the
errors raised before an op runs are also BadCase rows of the op tests, which run on both devices).
Inputs are fresh random values; results are compared with ``kvcore.reference`` or, where the point
is that two spellings of one argument agree, bit for bit with each other.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import kvcore
from conftest import make_paged_kv, poison, randn
from kvcore import reference

GQA = dict(lens=[9, 0, 23], page_size=8, hq=4, hkv=2, d=16)


def _decode_inputs(gen, dtype=torch.float32):
    kv = make_paged_kv(GQA["lens"], GQA["page_size"], GQA["hkv"], GQA["d"], gen=gen, dtype=dtype)
    q = randn(len(GQA["lens"]), GQA["hq"], GQA["d"], gen=gen, dtype=dtype)
    return q, kv


def _latent_inputs(gen, dk=40):
    kv = make_paged_kv([5, 12], 4, 1, dk, gen=gen)
    return randn(2, 3, dk, gen=gen), kv.k_cache[:, :, 0], kv.block_table, kv.seq_lens


# ---- autograd: the ops have no backward, and a backward through them must say so ------------------

def _op_inputs(gen) -> SimpleNamespace:
    """Fresh random inputs of a valid CPU call of each op (shared by the autograd and the
    argument-check tests below)."""
    q, kv = _decode_inputs(gen)
    mq, mcache, mtable, mlens = _latent_inputs(gen)
    return SimpleNamespace(
        q=q, kv=kv, paged=(kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens),
        sel_pages=torch.zeros(3, 2, 1, dtype=torch.int32),
        sel_counts=(kv.seq_lens > 0).to(torch.int32).view(3, 1).expand(3, 2).contiguous(),
        tq=randn(2, 3, 4, 16, gen=gen), tk=randn(2, 5, 2, 16, gen=gen), tv=randn(2, 5, 2, 16, gen=gen),
        oa=randn(3, 4, 16, gen=gen), la=randn(3, 4, gen=gen), ob=randn(3, 4, 16, gen=gen), lb=randn(3, 4, gen=gen),
        mq=mq, mcache=mcache, mtable=mtable, mlens=mlens,
        wq=randn(3, 2, 4, 16, gen=gen), rk=randn(3, 6, 2, 16, gen=gen), scores=randn(3, 12, gen=gen))


def _grad_calls(gen):
    """(op name, call(x) -> tuple of results, x): ``x`` is one floating input of the op."""
    a = _op_inputs(gen)
    kv, paged = a.kv, a.paged
    return [
        ("gqa_decode", lambda x: kvcore.gqa_decode(x, *paged, return_lse=True), a.q),
        ("block_sparse_decode",
         lambda x: kvcore.block_sparse_decode(x, *paged, a.sel_pages, a.sel_counts, return_lse=True), a.q),
        ("token_decoder_attention", lambda x: kvcore.token_decoder_attention(a.tq, x, a.tv, return_lse=True), a.tk),
        ("merge_attention_states", lambda x: kvcore.merge_attention_states(a.oa, x, a.ob, a.lb), a.la),
        ("mla_decode",
         lambda x: kvcore.mla_decode(x, a.mcache, a.mtable, a.mlens, scale=0.2, v_dim=32, return_lse=True), a.mq),
        ("attention_scores", lambda x: (kvcore.attention_scores(x, kv.k_cache, kv.block_table, kv.seq_lens),), a.wq),
        ("infllm_unit_scores", lambda x: (kvcore.infllm_unit_scores(a.q, x),), a.rk),
        ("topk_rows", lambda x: kvcore.topk_rows(x, 4)[:1], a.scores),
    ]


@pytest.mark.parametrize("index", range(8), ids=lambda i: ["gqa_decode", "block_sparse_decode", "token_decoder_attention",
                                                             "merge_attention_states", "mla_decode", "attention_scores",
                                                             "infllm_unit_scores", "topk_rows"][i])
def test_backward_through_an_op_raises(index, gen):
    op, call, x = _grad_calls(gen)[index]
    with torch.no_grad():
        plain = call(x)
    assert all(not r.requires_grad for r in plain)
    xg = x.clone().requires_grad_()
    results = call(xg)
    # The forward values are the op's, unchanged; the results are tied to x ...
    for got, want in zip(results, plain):
        assert got.requires_grad and torch.equal(got.detach(), want)
    # ... so a backward that reaches them raises, naming the op, even beside a differentiable path
    # (a residual: before, that backward succeeded and attention's share of the gradient was 0).
    loss = sum(r.float().sum() for r in results) + xg.sum()
    with pytest.raises(RuntimeError, match=rf"kvcore\.{op} has no backward"):
        loss.backward()


def test_mla_latent_project_outputs_are_tied_and_the_cache_refuses_grad(gen):
    t, d, r, p = 3, 24, 16, 8
    hidden, w = randn(t, d, gen=gen), randn(d, r + p, gen=gen, scale=0.2)
    norm, cos_sin = randn(r, gen=gen), reference.rope_cos_sin(16, p)
    pos, slots = torch.tensor([0, 5, 9]), torch.tensor([2, -1, 7])
    cache = poison(torch.empty(4, 4, r + p))
    c_kv, k_pe = kvcore.mla_latent_project(hidden, w.requires_grad_(), norm, cos_sin, pos, cache, slots,
                                           return_outputs=True)
    assert c_kv.requires_grad and k_pe.requires_grad
    with pytest.raises(RuntimeError, match=r"kvcore\.mla_latent_project has no backward"):
        (c_kv.sum() + k_pe.sum()).backward()
    before = cache.clone()
    with pytest.raises(RuntimeError, match=r"writes latent_cache in place, which requires grad"):
        kvcore.mla_latent_project(hidden, w, norm, cos_sin, pos, cache.requires_grad_(), slots)
    assert torch.equal(cache.detach().nan_to_num(), before.nan_to_num()), "the cache was written by a refused call"


@pytest.mark.parametrize("op", ["append_paged_kv", "compact_kv"])
def test_in_place_ops_refuse_a_cache_that_requires_grad(op, gen):
    q, kv = _decode_inputs(gen)
    k_cache = kv.k_cache.clone().requires_grad_()
    before = k_cache.detach().clone()
    with pytest.raises(RuntimeError, match=rf"kvcore\.{op} writes k_cache in place, which requires grad"):
        if op == "append_paged_kv":
            new = randn(2, 2, 16, gen=gen)
            kvcore.append_paged_kv(new, new, k_cache, kv.v_cache, torch.tensor([0, 3]))
        else:
            kept = torch.tensor([[[0, 2], [1, 3]]] * 3)
            kvcore.compact_kv(k_cache, kv.v_cache, kv.block_table, kv.seq_lens.clamp(min=4), kept)
    assert torch.equal(k_cache.detach(), before)
    with torch.no_grad():  # under no_grad the write is an ordinary in-place update
        new = randn(1, 2, 16, gen=gen)
        kvcore.append_paged_kv(new, new, k_cache, kv.v_cache, torch.tensor([1]))
    assert torch.equal(k_cache.detach()[0, 1], new[0])


# ---- tensors without data: validation skips the content checks, the fakes give the shapes ---------

def test_meta_tensors_give_shapes_with_validation_on(gen):
    assert kvcore.validation_enabled()
    q, kv = _decode_inputs(gen)
    m = lambda t: t.to("meta")  # noqa: E731
    out, lse = kvcore.gqa_decode(m(q), m(kv.k_cache), m(kv.v_cache), m(kv.block_table), m(kv.seq_lens),
                                 return_lse=True)
    assert out.device.type == "meta" and out.shape == q.shape and lse.shape == q.shape[:2]
    sel = torch.zeros(3, 2, 1, dtype=torch.int32)
    out = kvcore.block_sparse_decode(m(q), m(kv.k_cache), m(kv.v_cache), m(kv.block_table), m(kv.seq_lens), m(sel),
                                     m(sel[..., 0]))
    assert out.shape == q.shape
    scores = kvcore.attention_scores(m(randn(3, 2, 4, 16, gen=gen)), m(kv.k_cache), m(kv.block_table), m(kv.seq_lens))
    assert scores.shape == (3, 2, kv.block_table.shape[1] * GQA["page_size"])
    mq, mcache, mtable, mlens = _latent_inputs(gen)
    assert kvcore.mla_decode(m(mq), m(mcache), m(mtable), m(mlens), scale=0.2, v_dim=32).shape == (2, 3, 32)
    new = m(randn(2, 2, 16, gen=gen))
    kvcore.append_paged_kv(new, new, m(kv.k_cache), m(kv.v_cache), m(torch.tensor([0, 3])))
    kvcore.compact_kv(m(kv.k_cache), m(kv.v_cache), m(kv.block_table), m(kv.seq_lens), m(torch.zeros(3, 2, 1,
                                                                                                      dtype=torch.int64)))


# ---- one meta tensor among CPU ones, a non-tensor argument: an error naming it, nothing written -----

def _op_calls(gen) -> dict:
    """op name -> (its tensor arguments by name, call(args)): a valid CPU call of each wrapper,
    whose outputs are poisoned buffers the call is given."""
    a = _op_inputs(gen)
    q, kv = a.q, a.kv
    paged = dict(q=q, k_cache=kv.k_cache, v_cache=kv.v_cache, block_table=kv.block_table, seq_lens=kv.seq_lens)
    new = randn(2, 2, 16, gen=gen)
    width = kv.block_table.shape[1] * GQA["page_size"]
    out_like = lambda t: poison(torch.empty_like(t))  # noqa: E731
    return {
        "append_paged_kv": (
            dict(k=new, v=new.clone(), k_cache=kv.k_cache.clone(), v_cache=kv.v_cache.clone(),
                 slot_mapping=torch.tensor([0, 3])),
            lambda a: kvcore.append_paged_kv(a["k"], a["v"], a["k_cache"], a["v_cache"], a["slot_mapping"])),
        "gqa_decode": (
            dict(paged, out=out_like(q), lse=poison(torch.empty(3, 4)), score=torch.zeros(3, 2, width)),
            lambda a: kvcore.gqa_decode(a["q"], a["k_cache"], a["v_cache"], a["block_table"], a["seq_lens"],
                                        out=a["out"], lse=a["lse"], score=a["score"])),
        "block_sparse_decode": (
            dict(paged, sel_pages=a.sel_pages, sel_counts=a.sel_counts, out=out_like(q), lse=poison(torch.empty(3, 4))),
            lambda a: kvcore.block_sparse_decode(a["q"], a["k_cache"], a["v_cache"], a["block_table"], a["seq_lens"],
                                                 a["sel_pages"], a["sel_counts"], out=a["out"], lse=a["lse"])),
        "merge_attention_states": (
            dict(out_a=a.oa, lse_a=a.la, out_b=a.ob, lse_b=a.lb, out=out_like(a.oa), lse=out_like(a.la)),
            lambda a: kvcore.merge_attention_states(a["out_a"], a["lse_a"], a["out_b"], a["lse_b"], out=a["out"],
                                                    lse=a["lse"])),
        "token_decoder_attention": (
            dict(q=a.tq, k=a.tk, v=a.tv, out=out_like(a.tq), lse=poison(torch.empty(2, 3, 4))),
            lambda a: kvcore.token_decoder_attention(a["q"], a["k"], a["v"], out=a["out"], lse=a["lse"])),
        "attention_scores": (
            dict(q=a.wq, k_cache=kv.k_cache, block_table=kv.block_table, seq_lens=kv.seq_lens,
                 out=poison(torch.empty(3, 2, width))),
            lambda a: kvcore.attention_scores(a["q"], a["k_cache"], a["block_table"], a["seq_lens"], out=a["out"])),
        "compact_kv": (
            dict(k_cache=kv.k_cache.clone(), v_cache=kv.v_cache.clone(), block_table=kv.block_table,
                 seq_lens=kv.seq_lens.clone(), kept=torch.tensor([[[0, 2], [1, 3]]] * 3),
                 kept_lens=torch.tensor([2, 0, 2], dtype=torch.int32)),  # (sequence 1 is empty)
            lambda a: kvcore.compact_kv(a["k_cache"], a["v_cache"], a["block_table"], a["seq_lens"], a["kept"],
                                        a["kept_lens"])),
        "infllm_unit_scores": (
            dict(q=q, repr_keys=a.rk, out=poison(torch.empty(3, 6))),
            lambda a: kvcore.infllm_unit_scores(a["q"], a["repr_keys"], out=a["out"])),
        "topk_rows": (
            dict(scores=a.scores, values=poison(torch.empty(3, 4)),
                 indices=torch.full((3, 4), -7, dtype=torch.int64)),
            lambda a: kvcore.topk_rows(a["scores"], 4, values=a["values"], indices=a["indices"])),
        "mla_decode": (
            dict(q=a.mq, latent_cache=a.mcache, block_table=a.mtable, seq_lens=a.mlens,
                 out=poison(torch.empty(2, 3, 32)), lse=poison(torch.empty(2, 3))),
            lambda a: kvcore.mla_decode(a["q"], a["latent_cache"], a["block_table"], a["seq_lens"], scale=0.2,
                                        out=a["out"], lse=a["lse"])),
    }


_OPS = ["append_paged_kv", "gqa_decode", "block_sparse_decode", "merge_attention_states", "token_decoder_attention",
        "attention_scores", "compact_kv", "infllm_unit_scores", "topk_rows", "mla_decode"]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.nan_to_num(nan=123.0), b.nan_to_num(nan=123.0)) if a.is_floating_point() else torch.equal(a, b)


@pytest.mark.parametrize("op", _OPS)
def test_one_meta_tensor_among_cpu_ones_is_named(op, gen):
    """A meta tensor among CPU ones used to send the call to the op's fake implementation: no
    error, an uninitialised result and nothing written. Each argument in turn on meta: an error
    naming it (or, for the first, the argument compared with it), and no buffer written."""
    args, call = _op_calls(gen)[op]
    names = list(args)
    for name in names:
        moved = dict(args, **{name: args[name].to("meta")})
        before = {n: t.clone() for n, t in args.items()}
        want = rf"{op}: {name} must be on the same device as" if name != names[0] else rf"{op}: \w+ must be on the same device as {names[0]}"
        with pytest.raises(RuntimeError, match=want):
            call(moved)
        for n, t in args.items():
            assert _same(t, before[n]), f"{op} wrote {n} in a refused call"
    call(args)  # the same call on CPU alone runs
    assert not any(t.device.type == "meta" for t in args.values())


@pytest.mark.parametrize("op", _OPS)
def test_a_non_tensor_argument_is_named(op, gen):
    """A list or None where a tensor goes: a TypeError naming the argument (before, the wrappers
    failed first with an AttributeError that named none)."""
    args, call = _op_calls(gen)[op]
    first, second = list(args)[:2]
    # (None is a valid value of an optional argument, such as topk_rows' values: only the first,
    # which every op requires, gets it)
    for name, bad in ((first, args[first].tolist()), (first, None), (second, args[second].tolist())):
        with pytest.raises(TypeError, match=rf"{op}: {name} must be a torch\.Tensor, got {type(bad).__name__}"):
            call(dict(args, **{name: bad}))


@pytest.mark.parametrize("op", ["append_paged_kv", "compact_kv"])
def test_caches_that_partly_overlap_are_refused(op, gen):
    """k_cache and v_cache that share bytes without starting at the same place (one a page past the
    other in one buffer): V would silently overwrite K. Refused, nothing written; two halves of one
    [pages, 2, ...] allocation (interleaved, not overlapping) still work."""
    args, call = _op_calls(gen)[op]
    kc = args["k_cache"]
    page = kc[0].numel()
    base = randn((kc.shape[0] + 1) * page, gen=gen)
    before = base.clone()
    overlapping = dict(args, k_cache=base[:kc.numel()].view(kc.shape), v_cache=base[page:page + kc.numel()].view(kc.shape))
    with pytest.raises(ValueError, match=rf"{op}: k_cache and v_cache overlap in memory"):
        call(overlapping)
    assert torch.equal(base, before)
    fresh = lambda: {n: t.clone() for n, t in args.items()}  # noqa: E731 (compact_kv also writes seq_lens)
    both = torch.stack([args["k_cache"], args["v_cache"]], dim=1)  # [pages, 2, page_size, heads, dim]
    want = fresh()
    call(dict(fresh(), k_cache=both[:, 0], v_cache=both[:, 1]))
    call(want)
    assert torch.equal(both[:, 0], want["k_cache"]) and torch.equal(both[:, 1], want["v_cache"])


# ---- an output that shares bytes with another argument: an error naming both, nothing written ------

# The arguments each op writes (the schema's Tensor(a!)).
_WRITTEN = {"append_paged_kv": ["k_cache", "v_cache"], "gqa_decode": ["out", "lse", "score"],
            "block_sparse_decode": ["out", "lse"], "merge_attention_states": ["out", "lse"],
            "token_decoder_attention": ["out", "lse"], "attention_scores": ["out"],
            "compact_kv": ["k_cache", "v_cache", "seq_lens"], "infllm_unit_scores": ["out"],
            "topk_rows": ["values", "indices"], "mla_decode": ["out", "lse"],
            "mla_latent_project": ["latent_cache", "c_kv_out", "k_pe_out"]}


def _overlapping(written: torch.Tensor, other: torch.Tensor) -> tuple:
    """(buffer, written', other'): copies of the two in one byte buffer, written' starting one of
    its elements after other' starts, so the two share bytes without being the same tensor.
    other' is filled last: it keeps its values, written' keeps its own only where it does not
    overlap other'."""
    off, n_other, n_written = written.element_size(), other.numel() * other.element_size(), written.numel() * written.element_size()
    assert n_other > off
    buf = torch.zeros(max(n_other, off + n_written), dtype=torch.uint8)
    w = buf[off:off + n_written].view(written.dtype).view(written.shape)
    o = buf[:n_other].view(other.dtype).view(other.shape)
    w.copy_(written)
    o.copy_(other)
    return buf, w, o


def _projection_call(gen) -> tuple:
    """mla_latent_project's tensor arguments by name and a call of it (the shape of _op_calls)."""
    t, d, r, p = 3, 24, 16, 8
    args = dict(hidden=randn(t, d, gen=gen), w_dkv=randn(d, r + p, gen=gen, scale=0.2), norm_weight=randn(r, gen=gen),
                cos_sin=reference.rope_cos_sin(16, p), positions=torch.tensor([0, 5, 9]),
                latent_cache=poison(torch.empty(4, 4, r + p)), slot_mapping=torch.tensor([2, -1, 7]),
                c_kv_out=poison(torch.empty(t, r)), k_pe_out=poison(torch.empty(t, p)))
    return args, lambda a: kvcore.mla_latent_project(*(a[n] for n in list(args)[:7]), c_kv_out=a["c_kv_out"],
                                                     k_pe_out=a["k_pe_out"])


@pytest.mark.parametrize("op", _OPS + ["mla_latent_project"])
def test_an_output_sharing_bytes_with_another_argument_is_refused(op, gen):
    """Each written argument in turn laid over each other tensor argument (partly: one element
    off): before, the kernels read the input while writing the output and returned wrong numbers
    without an error. Now the C++ checks of both backends refuse it, naming both, before anything
    is written. Validation is off so that the wrappers' checks of index contents (which the
    overlap may have changed) leave the call to the C++ checks. The caches of the in-place ops
    against each other are the wrappers' own check (test_caches_that_partly_overlap_are_refused)."""
    args, call = _projection_call(gen) if op == "mla_latent_project" else _op_calls(gen)[op]
    pairs = [(w, o) for w in _WRITTEN[op] for o in args if o != w and not {w, o} <= {"k_cache", "v_cache"}]
    assert pairs
    was = kvcore.set_validation(False)
    try:
        for w, o in pairs:
            buf, wt, ot = _overlapping(args[w], args[o])
            before = buf.clone()
            with pytest.raises(RuntimeError, match=rf"({w} and {o}|{o} and {w}) share memory \(their bytes overlap\)"):
                call(dict({n: t.clone() for n, t in args.items()}, **{w: wt, o: ot}))
            assert torch.equal(buf, before), f"{op} wrote {w} or {o} in a refused call"
    finally:
        kvcore.set_validation(was)
    call(args)  # the same call with separate tensors runs


def test_outputs_over_inputs_named_in_the_docs_are_refused(gen):
    """The cases docs/bad_input.md listed as unchecked before: out as q itself, out and lse in one
    buffer, an out shifted one row over out_a, topk_rows writing into its scores."""
    q, kv = _decode_inputs(gen)
    paged = (kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    with pytest.raises(RuntimeError, match=r"out and q share memory \(the same memory\)"):
        kvcore.gqa_decode(q, *paged, out=q)
    # the same bytes through another storage (a DLPack round trip), which torch's views do not link
    with pytest.raises(RuntimeError, match=r"out and q share memory \(the same memory\)"):
        kvcore.gqa_decode(q, *paged, out=torch.from_dlpack(q.__dlpack__()))
    buf = poison(torch.empty(q.numel() + q.shape[0] * q.shape[1]))
    out, lse = buf[:q.numel()].view(q.shape), buf[q.numel() - 1:-1].view(q.shape[:2])
    with pytest.raises(RuntimeError, match=r"out and lse share memory \(their bytes overlap\)"):
        kvcore.gqa_decode(q, *paged, out=out, lse=lse)
    a = _op_inputs(gen)
    rows = torch.cat([a.oa, a.oa[:1]])
    with pytest.raises(RuntimeError, match=r"out and out_a share memory"):
        kvcore.merge_attention_states(rows[:-1], a.la, a.ob, a.lb, out=rows[1:])
    scores = a.scores.clone()
    with pytest.raises(RuntimeError, match=r"values and scores share memory"):
        kvcore.topk_rows(scores, 4, values=scores.view(-1)[1:13].view(3, 4))
    assert torch.equal(scores, a.scores)


@pytest.mark.skipif(not hasattr(torch, "_lazy_clone"), reason="this torch has no copy-on-write tensors")
def test_the_overlap_check_leaves_copy_on_write_inputs_alone(gen):
    """The check reads pointers through the const accessors: a copy-on-write input an op only
    reads stays copy-on-write (the mutable accessor would copy it)."""
    a = _op_inputs(gen)
    lazy = [torch._lazy_clone(t) for t in (a.oa, a.la, a.ob, a.lb)]
    kvcore.merge_attention_states(*lazy)
    scores = torch._lazy_clone(a.scores)
    kvcore.topk_rows(scores, 4)
    assert all(torch._C._is_cow_tensor(t) for t in lazy + [scores])


def test_merge_may_accumulate_into_either_input(gen):
    """merge_attention_states' out may be out_a or out_b itself and its lse lse_a or lse_b (each
    row's inputs are read before its outputs are written): the results equal a separate call's."""
    a = _op_inputs(gen)
    want_out, want_lse = kvcore.merge_attention_states(a.oa, a.la, a.ob, a.lb)
    for side in ("a", "b"):
        o, l = (a.oa.clone(), a.la.clone()) if side == "a" else (a.ob.clone(), a.lb.clone())
        args = (o, l, a.ob, a.lb) if side == "a" else (a.oa, a.la, o, l)
        kvcore.merge_attention_states(*args, out=o, lse=l)
        assert torch.equal(o, want_out) and torch.equal(l, want_lse)
    # out_a's own bytes under other strides of a size-1 dim (still contiguous) count as out_a
    oa, la, ob, lb = (t[:, :1].contiguous() for t in (a.oa, a.la, a.ob, a.lb))
    want_out, want_lse = kvcore.merge_attention_states(oa, la, ob, lb)
    out = oa.as_strided(oa.shape, (oa.shape[2], 5, 1))
    assert out.is_contiguous() and out.stride() != oa.stride()
    kvcore.merge_attention_states(oa, la, ob, lb, out=out, lse=la)
    assert torch.equal(oa, want_out) and torch.equal(la, want_lse)


@pytest.mark.parametrize("name, value", [("scale", 1e-300), ("scale", 1e-39), ("logit_soft_cap", 1e-300)])
def test_scalars_that_vanish_in_float32_are_refused(name, value, gen):
    """A positive scale or soft cap below float32's smallest normal value passed the double-precision
    checks and became 0 (or a denormal) in the kernels: a soft cap of 1e-300 silently turned the cap
    off. Refused by the wrapper and by the op itself."""
    q, kv = _decode_inputs(gen)
    out = poison(torch.empty_like(q))
    with pytest.raises(ValueError, match=rf"{name} must be .*float32's range"):
        kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, **{name: value})
    scale, cap = (value, 0.0) if name == "scale" else (0.25, value)
    with pytest.raises(RuntimeError, match=rf"{name} must be"):
        torch.ops.kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, scale, -1, cap, out, None,
                                    None, 0, None, 0, 0)
    assert bool(torch.isnan(out).all())
    kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, **{name: 1e-30})  # normal: runs


def test_mla_latent_project_eps_must_survive_float32(gen):
    """eps = 1e-300 became 0 in float32 (an all-zero hidden row then normalised to NaN), 1e39 inf
    (every c_KV 0): both refused, by the wrapper and by the op."""
    t, d, r, p = 2, 24, 16, 8
    hidden, w = randn(t, d, gen=gen), randn(d, r + p, gen=gen, scale=0.2)
    norm, cos_sin = randn(r, gen=gen), reference.rope_cos_sin(16, p)
    pos, slots = torch.tensor([0, 5]), torch.tensor([2, 7])
    cache = poison(torch.empty(4, 4, r + p))
    for eps in (1e-300, 1e39):
        with pytest.raises(ValueError, match=r"eps must be .*float32's range"):
            kvcore.mla_latent_project(hidden, w, norm, cos_sin, pos, cache, slots, eps=eps)
        with pytest.raises(RuntimeError, match=r"eps must be"):
            torch.ops.kvcore.mla_latent_project(hidden, w, norm, eps, cos_sin, pos, cache, slots, False, None, None)
    assert bool(torch.isnan(cache).all())


# ---- integer-like and tensor scalars: the same result as the plain Python number --------------------

def test_integer_likes_and_tensor_scales_match_plain_numbers(gen):
    q, kv = _decode_inputs(gen)
    args = (q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens)
    plain = kvcore.gqa_decode(*args, window_left=5, scale=0.3, return_lse=True)
    for window, scale in ((np.int64(5), np.float32(0.3)), (torch.tensor(5), torch.tensor(0.3, dtype=torch.float64))):
        got = kvcore.gqa_decode(*args, window_left=window, scale=scale, return_lse=True)
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    ref_out, ref_lse = reference.gqa_decode(*args, scale=0.3, window_left=5)
    torch.testing.assert_close(plain[0].double(), ref_out.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(plain[1].double(), ref_lse.double(), atol=1e-4, rtol=1e-4)

    mq, mcache, mtable, mlens = _latent_inputs(gen)
    a = kvcore.mla_decode(mq, mcache, mtable, mlens, scale=0.2, v_dim=32)
    b = kvcore.mla_decode(mq, mcache, mtable, mlens, scale=torch.tensor(0.2, dtype=torch.float64), v_dim=np.int32(32))
    assert torch.equal(a, b)

    scores = randn(4, 30, gen=gen)
    v1, i1 = kvcore.topk_rows(scores, 5)
    v2, i2 = kvcore.topk_rows(scores, np.int64(5))
    assert torch.equal(v1, v2) and torch.equal(i1, i2)
    rv, ri = reference.topk_rows(scores, 5)
    assert torch.equal(i1, ri) and torch.equal(v1, rv.to(v1.dtype))


@pytest.mark.parametrize("value", [True, 2.0, "3"], ids=["bool", "float", "str"])
def test_integer_arguments_refuse_non_integers(value, gen):
    q, kv = _decode_inputs(gen)
    with pytest.raises(ValueError, match=r"num_splits must be 0 \(automatic\) or a positive int"):
        kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, num_splits=value)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 256\]"):
        kvcore.topk_rows(randn(2, 8, gen=gen), value)


# ---- arguments that disagree, and defaults that do not apply --------------------------------------

def test_mla_decode_default_v_dim_needs_a_wide_enough_q(gen):
    mq, mcache, mtable, mlens = _latent_inputs(gen, dk=48)
    with pytest.raises(ValueError, match=r"v_dim defaults to q's last dim - 64 .* which is -16 .* pass v_dim"):
        kvcore.mla_decode(mq, mcache, mtable, mlens, scale=0.2)
    out = kvcore.mla_decode(mq, mcache, mtable, mlens, scale=0.2, v_dim=40)
    ref = reference.mla_decode(mq, mcache, mtable, mlens, scale=0.2, v_dim=40)
    torch.testing.assert_close(out.double(), ref[0].double(), atol=1e-4, rtol=1e-4)


def test_attention_scores_max_len_must_agree_with_out(gen):
    _, kv = _decode_inputs(gen)
    wq = randn(3, 2, 4, 16, gen=gen)
    out = poison(torch.empty(3, 2, 40))
    with pytest.raises(ValueError, match=r"max_len = 25 disagrees with out's key dimension \(40\)"):
        kvcore.attention_scores(wq, kv.k_cache, kv.block_table, kv.seq_lens, max_len=25, out=out)
    assert bool(torch.isnan(out).all())
    got = kvcore.attention_scores(wq, kv.k_cache, kv.block_table, kv.seq_lens, max_len=np.int64(40), out=out)
    want = reference.attention_scores(wq, kv.k_cache, kv.block_table, kv.seq_lens, max_len=40)
    torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)
