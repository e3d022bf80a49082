"""Implementations of paged GQA decode that the benchmark times: kvcore's and its peers'.

Every implementation is built by a function ``build_<name>(inputs)`` that does all setup outside
the timing (contiguous K/V copies, FlashInfer's plan(), preallocated outputs) and returns a list of
``Prepared`` variants (usually one). A variant's ``fn`` runs the op once and returns the output
``[B, Hq, D]``. An implementation that cannot run on these inputs raises ``Skip`` with a reason.

Peers see exactly the inputs kvcore sees: the same q, and K/V gathered from the same paged cache
(through the block table) once, before any timing.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F


class Skip(Exception):
    """This implementation cannot run these inputs here; str(exc) says why."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class DecodeInputs:
    """One decode problem: a paged cache plus the query, as kvcore takes them."""

    q: torch.Tensor  # [B, Hq, D]
    k_cache: torch.Tensor  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor  # [num_pages, page_size, Hkv, D]
    block_table: torch.Tensor  # [B, max_pages] int32
    seq_lens: torch.Tensor  # [B] int32
    scale: float
    # The [num_pages, 2, page_size, Hkv, D] buffer that k_cache and v_cache are the halves of, when
    # a page's K and V lie side by side (DecodeCase.pages_paired); FlashInfer takes it whole.
    kv_pairs: Optional[torch.Tensor] = None
    _contig: Optional[tuple] = field(default=None, repr=False)
    _expanded: Optional[tuple] = field(default=None, repr=False)
    _seq_lens_host: Optional[list] = field(default=None, repr=False)

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def num_q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def head_dim(self) -> int:
        return self.q.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.k_cache.shape[2]

    @property
    def page_size(self) -> int:
        return self.k_cache.shape[1]

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def seq_lens_host(self) -> list:
        if self._seq_lens_host is None:
            self._seq_lens_host = [int(s) for s in self.seq_lens.cpu().tolist()]
        return self._seq_lens_host

    def uniform_seq_len(self) -> int:
        lens = self.seq_lens_host()
        if any(s != lens[0] for s in lens):
            raise Skip("contiguous-K/V peers need one sequence length for the whole batch")
        return lens[0]

    def contiguous_kv(self) -> tuple:
        """K and V as dense ``[B, Hkv, S, D]`` tensors gathered from the paged cache (cached)."""
        if self._contig is None:
            s = self.uniform_seq_len()
            pages = math.ceil(s / self.page_size)
            idx = self.block_table[:, :pages].long()
            b, hkv, d = self.batch, self.num_kv_heads, self.head_dim

            def gather(cache: torch.Tensor) -> torch.Tensor:
                dense = cache[idx].reshape(b, pages * self.page_size, hkv, d)[:, :s]
                return dense.permute(0, 2, 1, 3).contiguous()

            self._contig = (gather(self.k_cache), gather(self.v_cache))
        return self._contig

    def expanded_kv(self) -> tuple:
        """K and V repeated to ``[B, Hq, S, D]`` (for backends that refuse GQA); cached."""
        if self._expanded is None:
            k, v = self.contiguous_kv()
            b, hkv, s, d = k.shape
            g = self.group

            def expand(t: torch.Tensor) -> torch.Tensor:
                return t.unsqueeze(2).expand(b, hkv, g, s, d).reshape(b, hkv * g, s, d)

            self._expanded = (expand(k), expand(v))
        return self._expanded

    def release(self) -> None:
        self._contig = None
        self._expanded = None


# --------------------------------------------------------------------------------------------
# The plain-torch form, also the correctness reference (run in fp32)
# --------------------------------------------------------------------------------------------


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Matmul-softmax GQA decode: q [B, Hq, D], k/v [B, Hkv, S, D] -> [B, Hq, D] (q's dtype).

    The query heads of one KV head are grouped (q viewed as [B, Hkv, g, D]) so K/V are read once
    per KV head; scores and softmax in fp32, P cast back to V's dtype for the second product.
    """
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, g, S]
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(v.dtype), v)  # [B, Hkv, g, D]
    return out.reshape(b, hq, d).to(q.dtype)


def reference_output(inputs: DecodeInputs) -> torch.Tensor:
    """fp32 result of the plain-torch form on the same paged inputs (the correctness yardstick);
    with unequal lengths, one sequence at a time over its own pages."""
    lens = inputs.seq_lens_host()
    if all(n == lens[0] for n in lens):
        k, v = inputs.contiguous_kv()
        return grouped_attention(inputs.q.float(), k.float(), v.float(), inputs.scale)
    out = torch.empty(inputs.q.shape, dtype=torch.float32, device=inputs.q.device)
    p = inputs.page_size
    for b, n in enumerate(lens):
        pages = inputs.block_table[b, : math.ceil(n / p)].long()

        def gather(cache: torch.Tensor) -> torch.Tensor:  # [1, Hkv, n, D]
            return cache[pages].reshape(-1, inputs.num_kv_heads, inputs.head_dim)[:n].permute(1, 0, 2)[None].float()

        out[b] = grouped_attention(inputs.q[b : b + 1].float(), gather(inputs.k_cache), gather(inputs.v_cache),
                                   inputs.scale)[0]
    return out


# --------------------------------------------------------------------------------------------
# Prepared implementations
# --------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A ready-to-time implementation: ``fn()`` runs it once and returns the output."""

    fn: Callable[[], torch.Tensor]
    notes: Optional[str] = None
    out: Optional[torch.Tensor] = None  # a preallocated output, NaN-poisoned before the check
    context: Callable[[], ContextManager] = contextlib.nullcontext
    before_timing: Callable[[], None] = lambda: None
    after_timing: Callable[[], None] = lambda: None
    setup: Optional[Callable[[], None]] = None  # before every timed call, outside the time (harness.Timer)
    # What the check compares after the first call, when more than fn's return (e.g. the caches and
    # lengths an in-place op changes, or a side output): a tensor or a tuple (runner.check_result).
    result: Optional[Callable[[], object]] = None


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    msg = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def import_kvcore(op: str = "gqa_decode"):
    """The kvcore module with its ``op`` (a Python-level name), or Skip with the reason."""
    try:
        import kvcore  # noqa: WPS433
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"import kvcore failed: {_first_line(exc)}") from exc
    if not hasattr(kvcore, op):
        raise Skip(f"kvcore has no {op} (package not built?)")
    return kvcore


def validation_off_while_timed(kvcore) -> tuple:
    """``(before_timing, after_timing)`` hooks for a ``Prepared``: kvcore's index validation is off
    while an implementation is timed, as a serving engine runs it (no host-syncing look at the
    index contents), and restored after. The correctness call runs before ``before_timing``, with
    validation as the caller left it (on by default), so bad indices raise there."""
    saved = []

    def before() -> None:
        saved.append(kvcore.set_validation(False))

    def after() -> None:
        if saved:
            kvcore.set_validation(saved.pop())

    return before, after


def build_kvcore(inputs: DecodeInputs) -> list:
    kvcore = import_kvcore()
    q, kc, vc, bt, sl, scale = (
        inputs.q,
        inputs.k_cache,
        inputs.v_cache,
        inputs.block_table,
        inputs.seq_lens,
        inputs.scale,
    )
    built = getattr(kvcore, "cuda_kernels_built", None)
    if q.is_cuda and built is not None and not built():
        raise Skip("this kvcore build has no CUDA kernels (built without nvcc?)")
    # Everything preallocated, as a serving engine (or a CUDA graph) calls it: the output and,
    # on CUDA, the split-KV workspace (kvcore's shared per-device buffer).
    out = torch.empty_like(q)
    workspace = None
    if q.is_cuda and hasattr(kvcore, "decode_workspace"):
        workspace = kvcore.decode_workspace(q.device)
    # The host copy of the lengths that FlashInfer's plan gets too, as a serving engine holds it
    # (it plans the split count; equal lengths plan the count as without it, but may pick the
    # page-major kernel, as the B128 row's do).
    plan = {"plan_seq_lens": inputs.seq_lens_host()} if q.is_cuda else {}

    def fn() -> torch.Tensor:
        kvcore.gqa_decode(q, kc, vc, bt, sl, scale=scale, out=out, workspace=workspace, **plan)
        return out

    before, after = validation_off_while_timed(kvcore)
    return [Prepared(fn=fn, out=out, before_timing=before, after_timing=after)]


def build_torch(inputs: DecodeInputs) -> list:
    k, v = inputs.contiguous_kv()
    q, scale = inputs.q, inputs.scale
    return [Prepared(fn=lambda: grouped_attention(q, k, v, scale))]


_SDPA_BACKENDS = {
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-math": "MATH",
}


def build_sdpa(inputs: DecodeInputs, name: str) -> list:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as exc:
        raise Skip(f"torch.nn.attention.sdpa_kernel unavailable: {_first_line(exc)}") from exc
    backend = getattr(SDPBackend, _SDPA_BACKENDS[name], None)
    if backend is None:
        raise Skip(f"SDPBackend.{_SDPA_BACKENDS[name]} not in this torch")
    b, hq, d = inputs.q.shape
    q4 = inputs.q.unsqueeze(2)  # [B, Hq, 1, D]
    scale = inputs.scale

    def ctx():
        return sdpa_kernel(backend)

    def attempt(k: torch.Tensor, v: torch.Tensor, gqa: bool) -> Callable[[], torch.Tensor]:
        kwargs = {"scale": scale}
        if gqa:
            kwargs["enable_gqa"] = True

        def fn() -> torch.Tensor:
            return F.scaled_dot_product_attention(q4, k, v, **kwargs).view(b, hq, d)

        with warnings.catch_warnings(record=True) as caught, ctx():
            warnings.simplefilter("always")
            try:
                fn()
                if q4.is_cuda:
                    torch.cuda.synchronize(q4.device)
            except Exception as exc:  # noqa: BLE001
                why = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
                detail = _first_line(exc) + (f" ({'; '.join(why[:2])})" if why else "")
                raise Skip(detail) from exc
        return fn

    k, v = inputs.contiguous_kv()
    if inputs.group == 1:
        return [Prepared(fn=attempt(k, v, gqa=False), context=ctx)]
    try:
        return [Prepared(fn=attempt(k, v, gqa=True), context=ctx)]
    except Skip as native:
        native_reason = str(native)
    try:
        ke, ve = inputs.expanded_kv()
        fn = attempt(ke, ve, gqa=False)
    except Skip as expanded:
        raise Skip(f"enable_gqa: {native_reason}; K/V expanded to Hq: {expanded}") from None
    note = (
        f"K/V expanded to Hq={inputs.num_q_heads} outside the timing (enable_gqa refused: "
        f"{native_reason}); bytes still counted at Hkv={inputs.num_kv_heads}"
    )
    return [Prepared(fn=fn, context=ctx, notes=note)]


def build_flashinfer(inputs: DecodeInputs) -> list:
    if not inputs.q.is_cuda:
        raise Skip("flashinfer needs CUDA")
    try:
        import flashinfer  # noqa: WPS433
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"import flashinfer failed: {_first_line(exc)}") from exc
    wrapper_cls = getattr(flashinfer, "BatchDecodeWithPagedKVCacheWrapper", None)
    if wrapper_cls is None:
        raise Skip("flashinfer has no BatchDecodeWithPagedKVCacheWrapper")

    dev = inputs.q.device
    page = inputs.page_size
    lens = inputs.seq_lens_host()
    pages_per_seq = [max(1, math.ceil(s / page)) for s in lens]
    indptr_host = [0]
    for n in pages_per_seq:
        indptr_host.append(indptr_host[-1] + n)
    indptr = torch.tensor(indptr_host, dtype=torch.int32, device=dev)
    bt = inputs.block_table
    indices = torch.cat([bt[i, :n] for i, n in enumerate(pages_per_seq)]).to(torch.int32).contiguous()
    last_page_len = torch.tensor(
        [s - (n - 1) * page for s, n in zip(lens, pages_per_seq)], dtype=torch.int32, device=dev
    )
    q = inputs.q
    kv = inputs.kv_pairs if inputs.kv_pairs is not None else (inputs.k_cache, inputs.v_cache)
    dtype = q.dtype

    variants = []
    reasons = []
    for tensor_cores in (False, True):
        try:
            workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=dev)
            wrapper = wrapper_cls(workspace, "NHD", use_tensor_cores=tensor_cores)
            wrapper.plan(
                indptr,
                indices,
                last_page_len,
                inputs.num_q_heads,
                inputs.num_kv_heads,
                inputs.head_dim,
                page,
                pos_encoding_mode="NONE",
                q_data_type=dtype,
                kv_data_type=dtype,
                sm_scale=inputs.scale,
            )
            out = torch.empty_like(q)

            def fn(wrapper=wrapper, out=out) -> torch.Tensor:
                return wrapper.run(q, kv, out=out)

            try:
                fn()
            except TypeError:  # a run() without out=: it allocates its output
                out = None

                def fn(wrapper=wrapper) -> torch.Tensor:
                    return wrapper.run(q, kv)

            variants.append(Prepared(fn=fn, out=out, notes=f"use_tensor_cores={tensor_cores}"))
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"use_tensor_cores={tensor_cores}: {_first_line(exc)}")
    if not variants:
        raise Skip("; ".join(reasons))
    return variants


# name -> builder, in the column order of the report.
BUILDERS = {
    "kvcore": build_kvcore,
    "flashinfer": build_flashinfer,
    "sdpa-cudnn": lambda inputs: build_sdpa(inputs, "sdpa-cudnn"),
    "sdpa-flash": lambda inputs: build_sdpa(inputs, "sdpa-flash"),
    "sdpa-math": lambda inputs: build_sdpa(inputs, "sdpa-math"),
    "torch": build_torch,
}

GPU_IMPLS = ["kvcore", "flashinfer", "sdpa-cudnn", "sdpa-flash", "torch"]
CPU_IMPLS = ["kvcore", "sdpa-math", "torch"]


def build(name: str, inputs: DecodeInputs) -> list:
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise Skip(f"unknown implementation {name!r}") from None
    return builder(inputs)
