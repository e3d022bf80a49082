"""Benchmark group ``eviction`` (this module: the cache side): in-place compaction and H2O decode.

``compact`` cases: ``compact_kv`` of a paged cache (Hkv 8, D 128, bf16, page 16) to a kept set per
KV head: SnapKV-like scattered keeps (random sorted positions) of a fixed count or a fraction.
Bytes moved = read + write of the kept rows of K and V (``2 * 2 * B * Hkv * kept * D * itemsize``),
so ``pct_copy`` compares with a device copy of as many bytes.

* ``kvcore``: ``kvcore.compact_kv`` (validation off). The op shrinks ``seq_lens`` in place, so each
  timed call is preceded by restoring it (the harness's setup, outside the time) and moves the
  same rows again. The check compares K, V and the lengths with the reference.
* ``torch``: the gather/scatter form: flat slot indices from ``kept`` and the block table, then
  ``index`` + ``index_put_`` per cache (index computation included, as a caller would run it).

Both are checked once against ``kvcore.reference.compact_kv`` (the whole K cache after one call).

``h2o`` cases: ``gqa_decode`` with an H2O ``score`` buffer (``kvcore-score``) against plain
``gqa_decode`` (``kvcore``) on the same inputs; the score row's notes give its overhead over the
plain row. ``torch``: the plain form with the probabilities kept (matmul, fp32 softmax, matmul,
then ``score += probs`` summed over the group) on K/V gathered outside the timing. Bytes as in
the ``decode`` group (the K/V pages touched, q and out).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from . import decode, peers, runner
from .harness import RunContext
from .peers import Prepared, Skip, import_kvcore, validation_off_while_timed

GROUP = "eviction"

COMPACT_IMPLS = ["kvcore", "torch"]
H2O_IMPLS = ["kvcore", "kvcore-score", "torch"]


@dataclass(frozen=True)
class CompactCase:
    batch: int
    seq_len: int
    keep: int  # kept tokens per (sequence, KV head)
    label: str  # how the keep was chosen, for the case name
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    dtype: torch.dtype = torch.bfloat16

    @property
    def name(self) -> str:
        s = (f"compact B{self.batch} Hkv{self.num_kv_heads} D{self.head_dim} S{self.seq_len} keep {self.label} "
             f"page{self.page_size}")
        return s if self.dtype == torch.bfloat16 else s + " " + str(self.dtype).replace("torch.", "")

    @property
    def nbytes(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * 2 * self.batch * self.num_kv_heads * self.keep * self.head_dim * itemsize

    @property
    def flops(self) -> int:
        return 0


@dataclass(frozen=True)
class H2oCase:
    decode: decode.DecodeCase
    # The implementation keeps the H2O score (kvcore-score, torch): its bytes add the score's
    # fp32 read and write per attended key, [B, Hkv, S] (+1.6% at D 128 bf16). Not in the name:
    # rows with and without it are one case of the table.
    with_score: bool = False

    @property
    def name(self) -> str:
        return "h2o " + self.decode.name

    @property
    def nbytes(self) -> int:
        d = self.decode
        score = 2 * 4 * d.batch * d.num_kv_heads * d.seq_len if self.with_score else 0
        return d.nbytes + score

    @property
    def flops(self) -> int:
        return self.decode.flops


Case = Union[CompactCase, H2oCase]


def cases(device: torch.device, quick: bool) -> list:
    """The issue's grid on a GPU (smaller with ``quick``); tiny fp32/bf16 cases on CPU."""
    device = torch.device(device)
    if device.type == "cuda" and not quick:
        return [
            CompactCase(1, 131072, 2048, "2048"),
            CompactCase(1, 131072, 65536, "50%"),
            CompactCase(8, 32768, 8192, "25%"),
            H2oCase(decode.DecodeCase(1, 32, 8, 128, 32768)),
            H2oCase(decode.DecodeCase(16, 32, 8, 128, 8192)),
        ]
    if device.type == "cuda":
        return [CompactCase(1, 16384, 512, "512"), CompactCase(2, 8192, 2048, "25%"),
                H2oCase(decode.DecodeCase(2, 32, 8, 128, 4096))]
    return [
        CompactCase(1, 1024, 128, "128", num_kv_heads=2, head_dim=64, dtype=torch.float32),
        CompactCase(2, 512, 256, "50%", num_kv_heads=2, head_dim=64),
        H2oCase(decode.DecodeCase(2, 8, 2, 64, 512, dtype=torch.float32)),
    ]


def impls(device: torch.device) -> list:
    """Implementations run by default, in report column order (compact and h2o cases each use theirs)."""
    return ["kvcore", "kvcore-score", "torch"]


def known_impls() -> list:
    return ["kvcore", "kvcore-score", "torch"]


# ---- compaction --------------------------------------------------------------------------------


@dataclass
class CompactInputs:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens0: torch.Tensor  # the lengths before compaction (kept intact)
    kept: torch.Tensor  # [B, Hkv, keep] int64, sorted
    kept_lens: torch.Tensor
    case: CompactCase


def make_compact_inputs(case: CompactCase, device: torch.device, seed: int = 0) -> CompactInputs:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed + 1)
    pages_per_seq = math.ceil(case.seq_len / case.page_size)
    num_pages = case.batch * pages_per_seq
    kw = {"dtype": case.dtype, "device": device, "generator": gen}
    k_cache = torch.randn(num_pages, case.page_size, case.num_kv_heads, case.head_dim, **kw)
    v_cache = torch.randn(num_pages, case.page_size, case.num_kv_heads, case.head_dim, **kw)
    table = torch.randperm(num_pages, generator=cpu_gen).view(case.batch, pages_per_seq).to(torch.int32).to(device)
    lens = torch.full((case.batch,), case.seq_len, dtype=torch.int32, device=device)
    # SnapKV-like scattered keeps: per (sequence, head) a random sorted subset (random scores' top-k).
    scores = torch.rand(case.batch, case.num_kv_heads, case.seq_len, generator=gen, device=device)
    kept = scores.topk(case.keep, dim=-1).indices.sort(dim=-1).values.contiguous()
    kept_lens = torch.full((case.batch,), case.keep, dtype=torch.int32, device=device)
    return CompactInputs(k_cache, v_cache, table, lens, kept, kept_lens, case)


def build_compact_kvcore(inputs: CompactInputs) -> list:
    kvcore = import_kvcore("compact_kv")
    if inputs.k_cache.is_cuda and not torch._C._dispatch_has_kernel_for_dispatch_key("kvcore::compact_kv", "CUDA"):
        raise Skip("this kvcore build has no compact_kv CUDA kernel")
    k, v, bt, kept, kl = inputs.k_cache, inputs.v_cache, inputs.block_table, inputs.kept, inputs.kept_lens
    lens = inputs.seq_lens0.clone()

    def restore() -> None:  # compact_kv lowers seq_lens in place; the K/V rows it moves stay valid input
        lens.copy_(inputs.seq_lens0)

    def fn() -> torch.Tensor:
        kvcore.compact_kv(k, v, bt, lens, kept, kl)
        return k

    before, after = validation_off_while_timed(kvcore)
    return [Prepared(fn=fn, setup=restore, notes="seq_lens restored before each call (outside the time)",
                     before_timing=before, after_timing=after, result=lambda: (k, v, lens))]


def torch_compact(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, kept: torch.Tensor) -> None:
    """The gather/scatter form of compact_kv (every sequence keeps kept.shape[2] tokens), in place."""
    b, hkv, n = kept.shape
    ps = k_cache.shape[1]
    dst = torch.arange(n, device=kept.device).view(1, 1, n).expand(b, hkv, n)
    bt = block_table.long()

    def flat_rows(pos: torch.Tensor) -> torch.Tensor:
        pages = bt.gather(1, (pos // ps).reshape(b, -1)).view(b, hkv, n)
        return (pages * ps + pos % ps).reshape(-1)

    src_rows, dst_rows = flat_rows(kept), flat_rows(dst)
    heads = torch.arange(hkv, device=kept.device).view(1, hkv, 1).expand(b, hkv, n).reshape(-1)
    for cache in (k_cache, v_cache):
        flat = cache.view(-1, hkv, cache.shape[3])
        flat.index_put_((dst_rows, heads), flat[src_rows, heads])


def build_compact_torch(inputs: CompactInputs) -> list:
    k, v, bt, kept = inputs.k_cache, inputs.v_cache, inputs.block_table, inputs.kept

    def fn() -> torch.Tensor:
        torch_compact(k, v, bt, kept)
        return k

    return [Prepared(fn=fn, notes="index + index_put_ per cache; slot indices computed in the time",
                     result=lambda: (k, v))]


_COMPACT_BUILDERS = {"kvcore": build_compact_kvcore, "torch": build_compact_torch}


def _run_compact(case: CompactCase, impl_names: Sequence[str], ctx: RunContext) -> list:
    from .. import reference  # noqa: WPS433

    rows = []
    for name in impl_names:
        # Fresh inputs per implementation: each one's check compares its first call with the
        # reference of the same original cache.
        inputs = make_compact_inputs(case, ctx.device, seed=ctx.seed)
        try:
            k_ref, v_ref, lens_ref = reference.compact_kv(inputs.k_cache, inputs.v_cache, inputs.block_table,
                                                          inputs.seq_lens0, inputs.kept, inputs.kept_lens)
            # Both caches, and kvcore's lengths (the torch form does not keep any).
            ref = (k_ref.float(), v_ref.float()) + ((lens_ref.float(),) if name == "kvcore" else ())
            rows += runner.time_all(GROUP, case, [name], ctx,
                                    lambda n: runner.builder_for(_COMPACT_BUILDERS, n, inputs), ref, 1e-6)
        finally:
            del inputs
            ctx.free_memory()
    return rows


# ---- H2O decode --------------------------------------------------------------------------------


def build_h2o(inputs: peers.DecodeInputs, with_score: bool) -> list:
    kvcore = import_kvcore("gqa_decode")
    q, kc, vc, bt, sl, scale = inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table, inputs.seq_lens, inputs.scale
    if q.is_cuda and not torch._C._dispatch_has_kernel_for_dispatch_key("kvcore::gqa_decode", "CUDA"):
        raise Skip("this kvcore build has no CUDA kernels")
    out = torch.empty_like(q)
    score = None
    workspace = kvcore.decode_workspace(q.device) if q.is_cuda else None
    if with_score:
        score = torch.zeros(q.shape[0], kc.shape[2], bt.shape[1] * kc.shape[1], dtype=torch.float32, device=q.device)
        if q.is_cuda:
            need = kvcore.ops.decode_score_workspace_bytes(q.shape[0], q.shape[1], bt.shape[1], kc.shape[1])
            workspace = torch.zeros(need, dtype=torch.uint8, device=q.device)

    def fn() -> torch.Tensor:
        kvcore.gqa_decode(q, kc, vc, bt, sl, scale=scale, out=out, workspace=workspace, score=score)
        return out

    before, after = validation_off_while_timed(kvcore)
    # The check's first call starts from a zero score, so it holds one step's probabilities.
    return [Prepared(fn=fn, out=out, before_timing=before, after_timing=after,
                     notes="score [B, Hkv, S] fp32 accumulated" if with_score else None,
                     result=(lambda: (out, score)) if with_score else None)]


def build_h2o_torch(inputs: peers.DecodeInputs) -> list:
    k, v = inputs.contiguous_kv()  # [B, Hkv, S, D]
    q, scale = inputs.q, inputs.scale
    b, hq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    score = torch.zeros(b, hkv, s, dtype=torch.float32, device=q.device)
    last = {}

    def fn() -> torch.Tensor:
        qg = q.reshape(b, hkv, hq // hkv, d)
        probs = torch.softmax(torch.matmul(qg, k.transpose(-1, -2)).float() * scale, dim=-1)  # [B, Hkv, g, S]
        score.add_(probs.sum(dim=2))
        last["out"] = torch.matmul(probs.to(v.dtype), v).reshape(b, hq, d).to(q.dtype)
        return last["out"]

    return [Prepared(fn=fn, notes="K/V gathered outside the timing; score += probs summed over the group",
                     result=lambda: (last["out"], score))]


def _score_len(name: str, inputs: peers.DecodeInputs) -> int:
    """Keys of an implementation's score buffer: the block table's capacity for kvcore's, the
    gathered sequence for the torch peer's."""
    if name == "torch":
        return inputs.uniform_seq_len()
    return inputs.block_table.shape[1] * inputs.page_size


def _run_h2o(case: H2oCase, impl_names: Sequence[str], ctx: RunContext) -> list:
    from .. import reference  # noqa: WPS433
    inputs = decode.make_inputs(case.decode, ctx.device, seed=ctx.seed)
    builders = {"kvcore": lambda i: build_h2o(i, False), "kvcore-score": lambda i: build_h2o(i, True),
                "torch": build_h2o_torch}
    try:
        ref = peers.reference_output(inputs)
        i = inputs
        score_ref = reference.gqa_decode_score(i.q, i.k_cache, i.block_table, i.seq_lens, i.scale).float()
        tol = decode.TOLERANCE.get(case.decode.dtype, 2e-2)
        rows = []
        for name in impl_names:
            # kvcore's score spans the block table's capacity, the torch peer's the gathered keys.
            want = ref if name == "kvcore" else (ref, score_ref[..., : _score_len(name, inputs)])
            rows += runner.time_all(GROUP, dataclasses.replace(case, with_score=name != "kvcore"), [name], ctx,
                                    lambda n: runner.builder_for(builders, n, inputs), want, tol)
    finally:
        del inputs
        ctx.free_memory()
    plain = next((r for r in rows if r["impl"] == "kvcore" and r["ms"]), None)
    for r in rows:
        if r["impl"] == "kvcore-score" and r["ms"] and plain is not None:
            overhead = f"overhead {100.0 * (r['ms'] / plain['ms'] - 1.0):+.1f}% over plain gqa_decode"
            r["notes"] = "; ".join(filter(None, [r.get("notes"), overhead]))
    return rows


def run(case: Case, impl_names: Sequence[str], ctx: RunContext) -> list:
    """One row per implementation that applies to the case (compact: kvcore, torch; h2o: kvcore,
    kvcore-score, torch); names that do not apply to the case's kind are passed over."""
    if isinstance(case, CompactCase):
        names = [n for n in impl_names if n in COMPACT_IMPLS]
        rows = _run_compact(case, names, ctx)
    else:
        names = [n for n in impl_names if n in H2O_IMPLS]
        if "kvcore-score" in names and "kvcore" not in names:
            names = ["kvcore"] + names  # the overhead needs the plain row
        rows = _run_h2o(case, names, ctx)
    # The progress bar counts every selected name per case: account for the ones passed over.
    ctx.progress.update(max(0, len(impl_names) - len(names)))
    return rows
