"""The ``retrieval`` group: one InfLLM retrieve-and-attend decode step (issue 5).

State: ``n_init`` sink tokens, ``units`` memory units of ``block`` tokens with their representative
keys, and a local window of ``n_local`` tokens; one query token per sequence. The step scores every
unit (dot product of the query with the representative keys, summed over heads), takes the top
``topk``, and attends to sinks + selected units + window. Implementations, on the same inputs and
checked against an fp32 evaluation of attention over exactly those tokens before they are timed:

* ``kvcore``: :meth:`kvcore.retrieval.InfLLMCache.attend` (``infllm_unit_scores`` +
  ``topk_rows`` on the device, the unit -> slot table, the selection built on the device). With
  every unit resident (``hit`` 100%) the step has no host sync and attends with one
  ``block_sparse_decode`` over sinks + units + window. At ``hit`` < 100% the cache first drops
  that share of the units the step will select, so the step syncs once for the selected ids and
  reloads them from pinned CPU memory on the side stream, overlapping ``gqa_decode`` over the
  window, then ``block_sparse_decode`` over units + sinks, merged.
* ``kvcore-graph`` (``hit`` 100% only): the same resident step captured once in a CUDA graph and
  replayed, as serving engines run decode steps; it shows the step without Python and launch gaps.
* ``torch``: the plain-torch InfLLM-style pipeline: score (einsum), ``torch.topk``, gather the
  selected units' K/V, concatenate with sinks and window, SDPA (``enable_gqa``), with every unit
  on the device in every case (it has no offload; at ``hit`` < 100% it is the resident yardstick).

Bytes that must be moved: the representative keys (scoring), the selected units', sinks' and
window's K and V, q and out. FLOPs: 2 * B * Hkv * units * D (scoring; the heads of a group are
summed first) + 4 * B * Hq * (n_init + topk * block + n_local) * D.

Case ``part="select"`` times unit selection alone (scoring + top-k, the issue's <= 30 us
target): ``kvcore`` is ``infllm_unit_scores`` + ``topk_rows``, ``torch`` is einsum + ``torch.topk``;
its bytes are the representative keys and q, and both must return the planted units.

The inputs plant ``topk`` clearly best units (their representative keys lean towards the query)
so every implementation must select the same set, whatever its rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import peers
from . import runner
from .decode import TOLERANCE
from .harness import RunContext, dtype_suffix

GROUP = "retrieval"


@dataclass(frozen=True)
class RetrievalCase:
    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    units: int
    block: int = 128
    topk: int = 16
    n_init: int = 128
    n_local: int = 4096
    hit: float = 1.0  # share of the selected units already on the device
    dtype: torch.dtype = torch.bfloat16
    part: str = "step"  # "step": the whole retrieve-and-attend step; "select": scoring + top-k only

    @property
    def name(self) -> str:
        s = (
            f"B{self.batch} Hq{self.num_q_heads} Hkv{self.num_kv_heads} D{self.head_dim} "
            f"mem{self.units}x{self.block} top{self.topk} local{self.n_local} hit{round(self.hit * 100)}%"
        )
        s += dtype_suffix(self.dtype)
        if self.part == "select":
            s = s.replace(f" local{self.n_local} hit{round(self.hit * 100)}%", "") + " select"
        return s

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def attended(self) -> int:
        """Tokens each query attends to."""
        return self.n_init + self.topk * self.block + self.n_local

    @property
    def nbytes(self) -> int:
        b, hkv, d, it = self.batch, self.num_kv_heads, self.head_dim, self.itemsize
        reprs = b * self.units * hkv * d * it
        if self.part == "select":
            return reprs + b * self.num_q_heads * d * it
        kv = b * self.attended * hkv * d * 2 * it
        return reprs + kv + 2 * b * self.num_q_heads * d * it

    @property
    def flops(self) -> int:
        b, d = self.batch, self.head_dim
        if self.part == "select":
            return 2 * b * self.num_kv_heads * self.units * d
        return 2 * b * self.num_kv_heads * self.units * d + 4 * b * self.num_q_heads * self.attended * d


def cases(device: torch.device, quick: bool) -> list:
    """The issue's shape on a GPU (B1, Hq32/Hkv8/D128, 8192 units of 128 = a 1M-token memory,
    topk 16, n_local 4096) at hit rates 100%, 90% and 50%; a smaller memory in quick mode; tiny
    cases on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        units = 1024 if quick else 8192
        return [RetrievalCase(1, 32, 8, 128, units, hit=h) for h in (1.0, 0.9, 0.5)] + [
            RetrievalCase(1, 32, 8, 128, units, part="select")]
    return [
        RetrievalCase(1, 8, 2, 64, 64, block=32, topk=4, n_init=32, n_local=256, dtype=torch.float32),
        RetrievalCase(2, 8, 2, 64, 48, block=32, topk=4, n_init=16, n_local=128, hit=0.5),
        RetrievalCase(2, 8, 2, 64, 300, block=32, topk=4, n_init=16, n_local=128, part="select"),
    ]


_IMPLS = ["kvcore", "kvcore-graph", "torch"]


def impls(device: torch.device) -> list:
    """Implementations run by default, in report column order."""
    return list(_IMPLS)


def known_impls() -> list:
    return list(BUILDERS)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class RetrievalInputs:
    case: RetrievalCase
    q: torch.Tensor  # [B, Hq, D]
    sink_k: torch.Tensor  # [B, n_init, Hkv, D]
    sink_v: torch.Tensor
    unit_k: torch.Tensor  # [B, U, block, Hkv, D], on the device
    unit_v: torch.Tensor
    repr_keys: torch.Tensor  # [B, U, Hkv, D]
    local_k: torch.Tensor  # [B, n_local, Hkv, D]
    local_v: torch.Tensor
    chosen: torch.Tensor  # [B, topk] the planted best units (sorted)
    scale: float


def make_inputs(case: RetrievalCase, device: torch.device, seed: int = 0) -> RetrievalInputs:
    """Random (never zero) K/V and query; ``topk`` planted units per sequence whose
    representative keys get a large component along the group-summed query."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed + 1)
    b, hq, hkv, d, u = case.batch, case.num_q_heads, case.num_kv_heads, case.head_dim, case.units
    kw = {"dtype": case.dtype, "device": device, "generator": gen}
    q = torch.randn(b, hq, d, **kw)
    sink_k, sink_v = torch.randn(b, case.n_init, hkv, d, **kw), torch.randn(b, case.n_init, hkv, d, **kw)
    blk = 0 if case.part == "select" else case.block  # selection reads no unit K/V
    unit_k = torch.randn(b, u, blk, hkv, d, **kw)
    unit_v = torch.randn(b, u, blk, hkv, d, **kw)
    local_k, local_v = torch.randn(b, case.n_local, hkv, d, **kw), torch.randn(b, case.n_local, hkv, d, **kw)
    repr_keys = (torch.randn(b, u, hkv, d, **kw) * 0.25).float()
    chosen = torch.stack([torch.randperm(u, generator=cpu_gen)[: case.topk] for _ in range(b)]).sort(dim=-1).values
    direction = q.float().view(b, hkv, hq // hkv, d).sum(dim=2)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    boost = torch.zeros(b, u, 1, 1, device=device)
    boost[torch.arange(b).view(-1, 1), chosen.to(device)] = 4.0
    repr_keys = (repr_keys + boost * direction.unsqueeze(1)).to(case.dtype)
    return RetrievalInputs(case, q, sink_k, sink_v, unit_k, unit_v, repr_keys, local_k, local_v,
                           chosen.to(device), d**-0.5)


def _selected_kv(inputs: RetrievalInputs, units: torch.Tensor) -> tuple:
    """Sinks + the given units ``[B, k]`` + window as ``[B, Hkv, S, D]`` K and V (a copy)."""
    b = inputs.q.shape[0]
    rows = torch.arange(b, device=units.device).view(-1, 1)

    def cat(sink, unit, local):
        picked = unit[rows, units].flatten(1, 2)  # [B, k * block, Hkv, D]
        return torch.cat([sink, picked, local], dim=1).transpose(1, 2)

    return (cat(inputs.sink_k, inputs.unit_k, inputs.local_k), cat(inputs.sink_v, inputs.unit_v, inputs.local_v))


def reference_output(inputs: RetrievalInputs) -> torch.Tensor:
    """fp32 attention over sinks + the planted units + window (the correctness yardstick); for
    ``part="select"`` the planted units themselves, sorted, as float."""
    if inputs.case.part == "select":
        return inputs.chosen.float()
    k, v = _selected_kv(inputs, inputs.chosen)
    return peers.grouped_attention(inputs.q.float(), k.float(), v.float(), inputs.scale)


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


def _resident_cache(kvcore, inputs: RetrievalInputs):
    """An InfLLMCache holding the case's memory with every unit on the device."""
    c, q = inputs.case, inputs.q
    for op in ("gqa_decode", "block_sparse_decode", "merge_attention_states"):
        if q.is_cuda and not torch._C._dispatch_has_kernel_for_dispatch_key(f"kvcore::{op}", "CUDA"):
            raise peers.Skip(f"this kvcore build has no CUDA kernel for {op}")
    cache = kvcore.retrieval.InfLLMCache(
        c.batch, c.num_q_heads, c.num_kv_heads, c.head_dim, c.n_init + c.units * c.block + c.n_local,
        dtype=c.dtype, device=q.device, block_size=c.block, topk=c.topk, n_init=c.n_init, n_local=c.n_local,
        max_cached_block=c.units, scale=inputs.scale,
    )
    cache.load_memory(inputs.sink_k, inputs.sink_v, inputs.unit_k, inputs.unit_v, inputs.repr_keys,
                      inputs.local_k, inputs.local_v)
    for b in range(c.batch):
        cache.fetch(b, list(range(c.units)))  # every unit resident
    cache.wait_loads()
    return cache


def build_kvcore(inputs: RetrievalInputs) -> list:
    kvcore = peers.import_kvcore()
    if getattr(kvcore, "retrieval", None) is None:
        raise peers.Skip("kvcore has no retrieval module")
    c, q = inputs.case, inputs.q
    if c.part == "select":
        return _build_kvcore_select(kvcore, inputs)
    cache = _resident_cache(kvcore, inputs)
    misses = round((1.0 - c.hit) * c.topk)
    dropped = inputs.chosen[:, :misses].tolist()

    def fn() -> torch.Tensor:
        for b in range(c.batch):
            cache.evict(b, dropped[b])  # host bookkeeping only: the step reloads them
        return cache.attend(q)[0]

    before, after = peers.validation_off_while_timed(kvcore)
    note = f"{misses} of {c.topk} units reloaded per step" if misses else "all units resident"
    return [peers.Prepared(fn=fn, notes=note, before_timing=before, after_timing=after)]


def build_kvcore_graph(inputs: RetrievalInputs) -> list:
    """The GPU-resident step captured once in a CUDA graph and replayed, as a serving engine runs
    its decode steps: the step has no host sync when every unit is resident, so the graph holds
    all of it (scoring, top-k, selection, attention) and replays without launch gaps."""
    kvcore = peers.import_kvcore()
    if getattr(kvcore, "retrieval", None) is None:
        raise peers.Skip("kvcore has no retrieval module")
    c, q = inputs.case, inputs.q
    if c.part == "select":
        raise peers.Skip("the select-only case is timed without a graph")
    if not q.is_cuda:
        raise peers.Skip("CUDA graphs need a GPU")
    if c.hit != 1.0:
        raise peers.Skip("only the resident step is capturable (an offloaded step syncs to fetch units)")
    cache = _resident_cache(kvcore, inputs)
    cache.attend(q)  # eagerly once: the step's cached tables, buffers and workspace exist before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cache.attend(q)[0]

    def fn() -> torch.Tensor:
        graph.replay()
        return out

    return [peers.Prepared(fn=fn, notes="all units resident; the step captured in a CUDA graph and replayed")]


def _build_kvcore_select(kvcore, inputs: RetrievalInputs) -> list:
    c, q = inputs.case, inputs.q
    for op in ("infllm_unit_scores", "topk_rows"):
        if not hasattr(kvcore, op):
            raise peers.Skip(f"this kvcore has no {op}")
        if q.is_cuda and not torch._C._dispatch_has_kernel_for_dispatch_key(f"kvcore::{op}", "CUDA"):
            raise peers.Skip(f"this kvcore build has no CUDA kernel for {op}")
    scores = torch.empty(c.batch, c.units, dtype=torch.float32, device=q.device)
    values = torch.empty(c.batch, c.topk, dtype=torch.float32, device=q.device)
    indices = torch.empty(c.batch, c.topk, dtype=torch.int64, device=q.device)

    def select() -> torch.Tensor:
        kvcore.infllm_unit_scores(q, inputs.repr_keys, out=scores)
        kvcore.topk_rows(scores, c.topk, values=values, indices=indices)
        return indices

    return [_select_variant(select, "infllm_unit_scores + topk_rows (2 launches)")]


def _select_variant(select: Callable[[], torch.Tensor], notes: str) -> "peers.Prepared":
    """A selection variant: checked as the sorted set of indices (the planted units), timed
    without that sort (the timing hooks switch it off)."""
    state = {"sort": True}

    def fn() -> torch.Tensor:
        idx = select()
        return idx.sort(dim=-1).values.float() if state["sort"] else idx

    return peers.Prepared(fn=fn, notes=notes, before_timing=lambda: state.update(sort=False),
                          after_timing=lambda: state.update(sort=True))


def build_torch(inputs: RetrievalInputs) -> list:
    c, q = inputs.case, inputs.q
    b, hq, d = q.shape
    hkv = c.num_kv_heads
    q4 = q.unsqueeze(2)
    if c.part == "select":
        def select() -> torch.Tensor:
            qg = q.float().view(b, hkv, hq // hkv, d).sum(dim=2)
            scores = torch.einsum("bhd,buhd->bu", qg, inputs.repr_keys.float())
            return scores.topk(c.topk, dim=-1).indices

        return [_select_variant(select, "einsum + topk")]

    def fn() -> torch.Tensor:
        qg = q.float().view(b, hkv, hq // hkv, d).sum(dim=2)
        scores = torch.einsum("bhd,buhd->bu", qg, inputs.repr_keys.float())
        units = scores.topk(c.topk, dim=-1).indices
        k, v = _selected_kv(inputs, units)
        return F.scaled_dot_product_attention(q4, k, v, scale=inputs.scale, enable_gqa=True).view(b, hq, d)

    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        raise peers.Skip(f"SDPA with enable_gqa failed: {peers._first_line(exc)}") from exc
    note = "einsum + topk + gather + SDPA" + ("" if c.hit == 1.0 else ", every unit on the device (no offload)")
    return [peers.Prepared(fn=fn, notes=note)]


# name -> builder, in the column order of the report.
BUILDERS: dict[str, Callable[[RetrievalInputs], list]] = {
    "kvcore": build_kvcore,
    "kvcore-graph": build_kvcore_graph,
    "torch": build_torch,
}


# --------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------


def run(case: RetrievalCase, impl_names: Sequence[str], ctx: RunContext) -> list:
    """Time each implementation on one case; one row per implementation (skips and errors too)."""
    return runner.run_case(GROUP, case, impl_names, ctx, BUILDERS, make_inputs, reference_output,
                           TOLERANCE.get(case.dtype, 2e-2))


__all__ = ["GROUP", "RetrievalCase", "RetrievalInputs", "cases", "impls", "known_impls", "make_inputs", "run"]
