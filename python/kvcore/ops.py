"""Typed Python wrappers over the compiled ``torch.ops.kvcore`` ops.

Each wrapper checks what cannot be checked cheaply in C++ (index *contents*: page numbers in
range, ``seq_lens`` within the block table's capacity, slots in range) when validation is on,
allocates outputs the caller did not pass, and calls the op. The ops themselves mutate outputs
passed in (``Tensor(a!)`` in the schema), so a caller that preallocates everything can capture a
decode step in a CUDA graph: with validation off (``set_validation(False)``, or automatically
during graph capture and under ``torch.compile``) the wrappers do no host synchronisation and,
given ``out`` (and ``lse``/``workspace``), no allocation.

Every op also has a ``register_fake`` implementation here, so it traces under ``torch.compile``.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Sequence
from typing import Optional, Union, overload

import torch

from ._args import as_index

try:
    from . import _C  # noqa: F401  (registers torch.ops.kvcore.*)
except ImportError as _err:  # say what to do, not only which symbol is missing
    raise ImportError(
        f"kvcore's compiled library (kvcore._C) could not be loaded: {_err}. Build it in the environment whose "
        f"torch ({torch.__version__}) will load it: `pip install --no-build-isolation .` (`-e .` in a checkout). "
        "An undefined symbol usually means it was compiled against another torch, e.g. by pip's default isolated "
        "build, which downloads its own torch to compile against."
    ) from _err

__all__ = [
    "append_paged_kv",
    "gqa_decode",
    "merge_attention_states",
    "set_validation",
    "validation_enabled",
    "decode_workspace",
    "DECODE_WORKSPACE_BYTES",
    "block_sparse_decode",
    "decode_score_workspace_bytes",
]

_ops = torch.ops.kvcore
_validation = True
# True while the calls of this thread (or asyncio task) pass index contents kvcore built itself.
_trust: contextvars.ContextVar[bool] = contextvars.ContextVar("kvcore_trusted_indices", default=False)


class _TrustedIndices:
    """``with _trusted_indices():`` the calls inside pass block tables, lengths and slots that
    kvcore built itself (PagedKVCache's allocator, the transformers adapters' step tables), so
    their contents are not checked again: validation exists for indices a caller made, and on a
    GPU each check is a device->host sync (two a layer in an adapter's eager decode step).
    A context variable, so per thread and per asyncio task; nests. A class, not a
    contextmanager generator: it runs once per op call."""

    __slots__ = ("token",)

    def __enter__(self) -> None:
        self.token = _trust.set(True)

    def __exit__(self, *exc) -> None:
        _trust.reset(self.token)


def _trusted_indices() -> _TrustedIndices:
    return _TrustedIndices()

#: Size of the per-device split-KV scratch buffer that ``gqa_decode`` uses when the caller passes
#: none. Partials take ``4 * (head_dim + 1)`` bytes per (query head, split); the split heuristic
#: keeps a few thousand CTAs at most, well under this.
DECODE_WORKSPACE_BYTES = 64 << 20
_workspaces: dict[torch.device, torch.Tensor] = {}


def set_validation(enabled: bool) -> bool:
    """Turn the index-content checks on or off for every kvcore op; returns the previous setting.

    On (the default), each call checks on the host that page numbers, ``seq_lens`` and slots are
    in range and raises ``ValueError`` naming the argument; on a GPU that costs a device->host
    sync. Off, nothing is checked and nothing syncs; the kernels still clamp every index, so bad
    contents give wrong numbers but never an out-of-bounds access. The checks are skipped
    automatically while a CUDA graph is being captured, under ``torch.compile``, and for the
    indices kvcore builds itself (``PagedKVCache.decode``'s table and lengths, the slots of its
    own appends in the Block Transformer and the transformers adapter, the adapter's step tables,
    an unmodified ``MLALatentCache.step``'s table and lengths)
    (:func:`validation_enabled` tells whether they run now; the returned value is the switch).
    """
    global _validation
    previous, _validation = _validation, bool(enabled)
    return previous


def validation_enabled() -> bool:
    """Whether index-content checks run on the next call (see :func:`set_validation`)."""
    if not _validation or torch.compiler.is_compiling() or _trust.get():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def cpu_isa() -> str:
    """The instruction set kvcore's CPU attention kernels run with in this process:
    ``"amx"`` (avx512bf16's, with bfloat16 :func:`mla_decode` on AMX tiles; Linux must grant the
    process the tile registers, which kvcore asks for),
    ``"avx512bf16"`` (avx512's, and AVX512_BF16's dot products for bfloat16 :func:`gqa_decode`,
    :func:`block_sparse_decode`, :func:`mla_decode` and :func:`attention_scores`),
    ``"avx512"`` (AVX-512 F, BW, DQ and VL on top of avx2's), ``"avx2"`` (AVX2 + FMA, and F16C for
    fp16 rows) or ``"baseline"`` (the build's own target, SSE2 on x86-64). Set by
    ``KVCORE_CPU_ISA`` (``auto``, the default, takes the widest the CPU and the build allow), read
    once per process; an invalid setting raises a RuntimeError naming the variable, here and at
    every CPU attention call."""
    return torch.ops.kvcore.cpu_isa()


def decode_workspace(device: Union[torch.device, str], min_bytes: int = 0) -> torch.Tensor:
    """The shared split-KV scratch buffer for ``device`` (allocated zero-filled on first use).

    Decode kernels keep per-(sequence, KV head) arrival counters in it and reset them before they
    finish, so one buffer serves any number of calls, but only one stream at a time: give
    concurrent streams their own buffer (``torch.zeros(DECODE_WORKSPACE_BYTES, dtype=torch.uint8,
    device=...)``). ``min_bytes`` grows it (a new zero-filled buffer) when a call needs more, as
    ``gqa_decode`` with a ``score`` buffer does (:func:`decode_score_workspace_bytes`).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ws = _workspaces.get(device)
    if ws is None or ws.numel() < min_bytes:
        ws = torch.zeros(max(DECODE_WORKSPACE_BYTES, int(min_bytes)), dtype=torch.uint8, device=device)
        _workspaces[device] = ws
    return ws


_COUNTER_BYTES = 1 << 20  # the workspace's leading counter region (csrc/decode/paged_decode_launch.h)


def decode_score_workspace_bytes(batch: int, num_q_heads: int, max_pages: int, page_size: int,
                                 window_left: int = -1) -> int:
    """Workspace bytes ``gqa_decode`` with ``score`` needs on CUDA, with the default room for
    split partials: the counters, each query head's final log-sum-exp and the step's logits
    (``4 * num_q_heads`` bytes per key position the block table can address, or per window
    position with a sliding window). Pass a workspace at least this large when you pass one."""
    capacity = max_pages * page_size
    kv_len = capacity if window_left < 0 or window_left >= capacity else min(capacity, window_left + 1)
    ld = (kv_len + 3) // 4 * 4
    rnd = lambda n: (n + 255) // 256 * 256  # noqa: E731
    return _COUNTER_BYTES + rnd(batch * num_q_heads * 4) + rnd(batch * num_q_heads * ld * 4) + (
        DECODE_WORKSPACE_BYTES - _COUNTER_BYTES)


_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32
_INT64_MAX = 2**63 - 1


def _positive_float32(name: str, value, what: str = "a positive finite float") -> float:
    """``value`` as a Python float for a kernel scalar that must be positive: finite, > 0 and
    within float32's normal range. The kernels compute in float32, where a larger double becomes
    inf (a scale of 1e39 made every output NaN) and a smaller one 0 or a denormal that may flush
    to 0 (a logit_soft_cap of 1e-300 silently turned the cap off). Numbers and one-element
    tensors are accepted."""
    try:
        x = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be {what}, got {value!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be {what}, got {x}")
    if not _FLOAT32_TINY <= x <= _FLOAT32_MAX:
        raise ValueError(f"{name} must be {what} within float32's range ([{_FLOAT32_TINY:.6g}, {_FLOAT32_MAX:.6g}]), "
                         f"got {x}")
    return x


def _resolve_scale(scale: Optional[float], head_dim: int) -> float:
    """The softmax scale an attention op uses: ``scale``, or ``1 / sqrt(head_dim)`` when None (1.0
    for an empty head_dim, whose logits are all 0 whatever the scale: the ops that take one,
    attention_scores, or reject it with their own error); a positive finite float32 either way."""
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    return _positive_float32("scale", scale)


def _int_arg(name: str, value, lo: int, what: str, hi: int = _INT64_MAX) -> int:
    """An integer argument in ``[lo, hi]``: an int or integer-like (numpy integer, 0-d integer
    tensor), never a bool or a float (``int(3.5)`` would silently be 3); the error says ``what``."""
    index = as_index(value)
    if index is None or not lo <= index <= hi:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return index


def _readable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether index contents can be read on the host: not for tensors without data (meta), whose
    shapes the ops' fake implementations handle."""
    return all(t is None or t.device.type != "meta" for t in tensors)


class _NoBackward(torch.autograd.Function):
    """Ties an op's result to the inputs that require grad, so that a backward pass through it
    raises instead of treating the op as a constant (the ops have no derivative; without this the
    result had no grad_fn and a backward through other paths silently left attention's share out)."""

    @staticmethod
    def forward(ctx, op: str, result: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.op = op
        return result.view_as(result)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"kvcore.{ctx.op} has no backward: kvcore's ops are for inference. Run it under torch.no_grad() "
            "(or torch.inference_mode()), or detach its inputs, if no gradient is meant to flow through it"
        )


def _guard_grad(op: str, results: tuple, *inputs: Optional[torch.Tensor]) -> tuple:
    """``results`` as they are when autograd is off or no input requires grad; else each one tied
    to those inputs by _NoBackward (the forward values are unchanged)."""
    if not torch.is_grad_enabled():
        return results
    needs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not needs:
        return results
    return tuple(None if r is None else _NoBackward.apply(op, r, *needs) for r in results)


def _refuse_grad_target(op: str, **written: torch.Tensor) -> None:
    """In-place ops write caches; like torch's own in-place ops, refuse a target that requires
    grad while autograd is on (the write would carry no history)."""
    if torch.is_grad_enabled():
        for name, t in written.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeError(f"kvcore.{op} writes {name} in place, which requires grad: kvcore's ops have "
                                   "no backward; detach it or run under torch.no_grad()")


def _check_tensor_args(op: str, required: dict, optional: Optional[dict] = None) -> None:
    """Every tensor argument of ``op`` is a torch.Tensor (``optional`` ones may be None), and none
    is a meta tensor unless all are. The dispatcher never reaches the op's C++ device checks when a
    meta tensor is among CPU or CUDA ones: it runs the op's fake implementation, which returns
    uninitialised outputs and writes nothing. (Other device mixes reach those checks, which name
    the argument; this runs on every call, so it stays cheap: ~1 us.) A list or None would fail in
    the wrapper with an AttributeError that names no argument."""
    tensors = list(required.items()) + [(name, t) for name, t in (optional or {}).items() if t is not None]
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    first_name, first = tensors[0]
    meta = first.is_meta
    for name, t in tensors[1:]:
        if t.is_meta != meta:
            raise RuntimeError(f"{op}: {name} must be on the same device as {first_name} ({first.device}), "
                               f"got {t.device}")


def _dense_extent(t: torch.Tensor) -> Optional[tuple[int, int]]:
    """The byte range ``[start, end)`` a contiguous tensor's elements fill; None for other layouts
    (strided views may interleave with another tensor's elements without touching them, as K and
    V halves of one ``[pages, 2, ...]`` allocation do, so their ranges say nothing)."""
    if not t.is_contiguous() or t.numel() == 0:
        return None
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def _check_distinct(op: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    """Two tensors an op writes must not share memory (V would silently overwrite K): not the
    same start, and, where both are contiguous, no overlap of their byte ranges (a cache one
    element or one page past the other). Not under torch.compile, which cannot trace a
    data-pointer comparison (the eager call checks it)."""
    if torch.compiler.is_compiling():
        return
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _readable(a, b) and a.numel()
            and b.numel()):
        return
    if a.data_ptr() == b.data_ptr():
        raise ValueError(f"{op}: {a_name} and {b_name} are the same memory; pass separate caches (or two halves "
                         "of one allocation)")
    ra, rb = _dense_extent(a), _dense_extent(b)
    if ra is not None and rb is not None and ra[0] < rb[1] and rb[0] < ra[1]:
        raise ValueError(f"{op}: {a_name} and {b_name} overlap in memory (bytes {ra[0]:#x}-{ra[1]:#x} and "
                         f"{rb[0]:#x}-{rb[1]:#x}); pass separate caches (or two halves of one allocation)")


def _check_block_table_contents(block_table: torch.Tensor, seq_lens: torch.Tensor, num_pages: int, page_size: int) -> None:
    capacity = block_table.shape[1] * page_size
    lens = seq_lens.to(device="cpu", dtype=torch.int64)
    if lens.numel() and int(lens.min()) < 0:
        raise ValueError(f"seq_lens must be >= 0, got {lens.tolist()}")
    if lens.numel() and int(lens.max()) > capacity:
        b = int(lens.argmax())
        raise ValueError(
            f"seq_lens[{b}] = {int(lens[b])} exceeds the block table's capacity "
            f"({block_table.shape[1]} pages x page_size {page_size} = {capacity} tokens)"
        )
    # Only the pages a sequence uses must be valid; the padding past them is never read.
    pages_used = (lens + page_size - 1) // page_size
    used = torch.arange(block_table.shape[1]).unsqueeze(0) < pages_used.unsqueeze(1)
    bt = block_table.to("cpu")
    bad = used & ((bt < 0) | (bt >= num_pages))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"block_table[{b}, {j}] = {int(bt[b, j])} is not a page of the cache (num_pages = {num_pages}); "
            f"sequence {b} uses its first {int(pages_used[b])} entries"
        )


def _validate_block_table(cache: torch.Tensor, cache_rank: int, block_table: torch.Tensor,
                          seq_lens: torch.Tensor) -> bool:
    """Checks the block table's contents against ``cache`` (``[num_pages, page_size, ...]`` of rank
    ``cache_rank``) when validation is on and the shapes and dtypes are the op's; otherwise the
    op's own checks name the culprit. Returns whether it checked, so op-specific index checks
    may follow."""
    checkable = (
        validation_enabled()
        and _readable(block_table, seq_lens)
        and cache.dim() == cache_rank
        and block_table.dim() == 2
        and seq_lens.dim() == 1
        and block_table.dtype == torch.int32
        and seq_lens.dtype == torch.int32
        and block_table.shape[0] == seq_lens.shape[0]
        and cache.shape[1] > 0
    )
    if checkable:
        _check_block_table_contents(block_table, seq_lens, cache.shape[0], cache.shape[1])
    return checkable


def _prepare_paged_decode(q, k_cache, block_table, seq_lens, logit_soft_cap, num_splits, out, lse, return_lse,
                          workspace):
    """What gqa_decode and block_sparse_decode share before the op: scalar checks, the outputs
    and workspace they allocate when not given, and (validation on) the block-table contents.
    Returns (out, lse, want_lse, workspace, checked); checked says the block table was validated,
    so op-specific index checks may follow."""
    if logit_soft_cap != 0:
        _positive_float32("logit_soft_cap", logit_soft_cap, "0 (off) or a positive finite float")
    _int_arg("num_splits", num_splits, 0, "0 (automatic) or a positive int")
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    want_lse = return_lse or lse is not None
    if return_lse and lse is None:
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    if workspace is None and q.is_cuda:
        workspace = decode_workspace(q.device)
    checked = _validate_block_table(k_cache, 4, block_table, seq_lens)
    return out, lse, want_lse, workspace, checked


def _plan_keys(plan_seq_lens, batch: int, block_table: torch.Tensor, cache: torch.Tensor, cache_dim: int,
               window_left: int = -1) -> tuple[int, int]:
    """gqa_decode's and mla_decode's split-plan hint from a host copy of seq_lens: (the keys
    attended in all, the most one sequence attends), each sequence's keys windowed and clamped
    to the block table's capacity (block_table's width x the page size, dim 1 of a cache of
    ``cache_dim`` dims) as the kernel clamps them; (0, 0) without one. Python builtins over a
    list: a serving engine passes the same lengths to every layer's call, so this runs per
    layer. Under torch.compile the hint is not read (the plan is then the shapes' alone):
    reducing host values would specialise the graph on every batch's lengths."""
    if plan_seq_lens is None or torch.compiler.is_compiling():
        return 0, 0
    if isinstance(plan_seq_lens, (str, bytes, bytearray)):
        raise ValueError(f"plan_seq_lens must be a CPU tensor or a sequence of ints, got {type(plan_seq_lens).__name__}")
    if isinstance(plan_seq_lens, torch.Tensor):
        if plan_seq_lens.device.type != "cpu":
            raise ValueError(
                f"plan_seq_lens must be on the CPU (a host copy of seq_lens), got a {plan_seq_lens.device.type} "
                "tensor: reading it would synchronise with the device")
        if plan_seq_lens.dim() != 1 or plan_seq_lens.layout != torch.strided or plan_seq_lens.dtype.is_floating_point \
                or plan_seq_lens.dtype.is_complex or plan_seq_lens.dtype == torch.bool:
            raise ValueError(f"plan_seq_lens must be a 1-D dense integer tensor, got {plan_seq_lens.dtype} "
                             f"{plan_seq_lens.layout} of shape {tuple(plan_seq_lens.shape)}")
        lens = plan_seq_lens.tolist()
    else:
        try:
            lens = list(plan_seq_lens)
        except TypeError:
            raise ValueError("plan_seq_lens must be a CPU tensor or a sequence of ints, got "
                             f"{type(plan_seq_lens).__name__}") from None
        if not all(type(v) is int for v in lens):
            lens = [as_index(v) for v in lens]
            if any(v is None for v in lens):
                raise ValueError("plan_seq_lens must hold ints")
    if len(lens) != batch:
        raise ValueError(f"plan_seq_lens must have {batch} entries (q's batch), got {len(lens)}")
    if not lens:
        return 0, 0
    if min(lens) < 0:
        raise ValueError(f"plan_seq_lens must be >= 0, got {min(lens)}")
    # (seq_lens are int32: a length past that is clamped like one past the table, keeping the
    # sum within the op's int64 even where bad shapes leave the capacity unknown here)
    cap = block_table.shape[1] * cache.shape[1] if block_table.dim() == 2 and cache.dim() == cache_dim else 2**31 - 1
    cap = min(cap, 2**31 - 1)
    if window_left >= 0:
        cap = min(cap, window_left + 1)
    longest = max(lens)
    if longest > cap:
        return sum(min(n, cap) for n in lens), cap
    return (sum(lens), longest) if longest > 0 else (0, 0)


def _check_slots(slot_mapping: torch.Tensor, num_pages: int, page_size: int) -> None:
    """Host check of a slot mapping (append_paged_kv, mla_latent_project): each slot -1 (skip) or
    inside the cache's num_pages x page_size rows."""
    num_slots = num_pages * page_size
    sm = slot_mapping.to("cpu")
    bad = (sm < -1) | (sm >= num_slots)
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"slot_mapping[{t}] = {int(sm[t])} is outside the cache's {num_slots} slots "
            f"({num_pages} pages x page_size {page_size}); use -1 to skip a token"
        )


def append_paged_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write new keys and values into a paged KV cache, in place.

    Args:
        k, v: ``[T, num_kv_heads, head_dim]``, the caches' dtype.
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``; modified in place.
        slot_mapping: ``[T]`` int64; token ``t`` goes to page ``slot // page_size``, row
            ``slot % page_size``. ``-1`` skips the token (padding). Slots must be distinct: two
            tokens written to one slot race (on CPU and CUDA alike), and the row may mix both.
    """
    _check_tensor_args("append_paged_kv", dict(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping))
    _refuse_grad_target("append_paged_kv", k_cache=k_cache, v_cache=v_cache)
    _check_distinct("append_paged_kv", "k_cache", k_cache, "v_cache", v_cache)
    # (Only int64 slots are read here; the op names any other dtype.)
    if (validation_enabled() and slot_mapping.dim() == 1 and slot_mapping.dtype == torch.int64
            and k_cache.dim() == 4 and _readable(slot_mapping)):
        _check_slots(slot_mapping, k_cache.shape[0], k_cache.shape[1])
    _ops.append_paged_kv(k, v, k_cache, v_cache, slot_mapping)


@overload
def gqa_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    *, scale: Optional[float] = ..., window_left: int = ..., logit_soft_cap: float = ..., out: Optional[torch.Tensor] = ...,
    lse: None = ..., return_lse: bool = ..., workspace: Optional[torch.Tensor] = ..., num_splits: int = ...,
    score: Optional[torch.Tensor] = ..., plan_seq_lens: Optional[Union[Sequence[int], torch.Tensor]] = ...,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]: ...
@overload
def gqa_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    *, scale: Optional[float] = ..., window_left: int = ..., logit_soft_cap: float = ..., out: Optional[torch.Tensor] = ...,
    lse: torch.Tensor, return_lse: bool = ..., workspace: Optional[torch.Tensor] = ..., num_splits: int = ...,
    score: Optional[torch.Tensor] = ..., plan_seq_lens: Optional[Union[Sequence[int], torch.Tensor]] = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def gqa_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: Optional[float] = None,
    window_left: int = -1,
    logit_soft_cap: float = 0.0,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    workspace: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    score: Optional[torch.Tensor] = None,
    plan_seq_lens: Optional[Union[Sequence[int], torch.Tensor]] = None,
):
    """Decode attention: one query token per sequence against a paged KV cache (GQA/MQA/MHA).

    Query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)``. All query heads of a
    KV group are computed together so each cached byte is read once; long sequences are split
    across the GPU (flash-decoding) and the partial results merged in the same launch.

    Args:
        q: ``[B, num_q_heads, head_dim]``, bfloat16/float16 (float32 too on CPU); the last dim
            must be contiguous.
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``, q's dtype.
        block_table: ``[B, max_pages]`` int32, the pages of each sequence in order. On CUDA
            its width, not ``seq_lens`` (no host sync), sets the automatic split count
            (with ``window_left >= 0`` the window, where shorter, takes the width's place);
            each sequence's splits then share its own keys evenly (in whole tiles of keys),
            so a table sized for the model's whole context (a CUDA graph's, a serving
            engine's) still spreads a shorter sequence over the GPU. Its cost is the split
            count itself: more partials to merge than the sequence needs, where one no wider
            than the batch needs (as :meth:`kvcore.PagedKVCache.block_table` gives) or a forced
            ``num_splits`` would make fewer.
        seq_lens: ``[B]`` int32, tokens in each sequence (0 allowed: out 0, lse -inf).
        scale: softmax scale, default ``head_dim ** -0.5``.
        window_left: ``>= 0`` attends only to the last ``window_left + 1`` tokens (sliding
            window); ``-1`` attends to all.
        logit_soft_cap: ``> 0`` applies ``cap * tanh(logit / cap)`` to the scaled logits.
        out: optional preallocated ``[B, num_q_heads, head_dim]`` output (q's dtype).
        lse: optional preallocated ``[B, num_q_heads]`` float32 log-sum-exp (natural log) of the
            logits; returned as well when given or when ``return_lse``.
        workspace: CUDA split-KV scratch (uint8, zero-filled before its first use, never used by
            two calls at once on different streams: its counters are not checked, and stale
            ones give wrong results or, with ``score``, a hang); default: a shared per-device
            buffer (:func:`decode_workspace`).
        num_splits: ``0`` chooses the KV split from the shapes; ``n > 0`` forces ``n`` splits (at most 256),
            which makes results bitwise reproducible for a given ``n`` (``1`` disables splitting).
            The automatic count plans as if every sequence filled ``block_table``'s width, so a
            batch of very unequal lengths can gain from a forced count: on an H100, B16 Hq32 Hkv8
            in an 8192-token table with one full sequence and 15 of 1024 tokens took 104 us
            automatically and 49 us at ``num_splits=8``; with equal lengths 184 and 189 us
            (``bench/experiments/ragged_decode.py``). ``plan_seq_lens`` makes that choice from
            the lengths instead. With ``0`` (no ``score``, no window, the per-KV-head kernel with
            its page groups on, a power-of-two page of 16-64 tokens at head_dim 128 (up to 128
            on its 8-warp kernel), 32-64 at 64, 8-64 at 256, and at most 512 pages a split as
            planned from the table's width)
            each CUDA block also reads its share of a sequence's pages in ascending cache order
            rather than the table's (attention does not depend on the keys' order), which
            closes most of what a fragmented cache costs (H100, decode_trace, B16 Hq32 Hkv8
            S8192 with pages scattered at random: 183.6 us in table order, 180.3 in cache order;
            179.0 for pages in order). Results are still deterministic, but differ in rounding
            from the table-order sum that a forced count gives (``KVCORE_DECODE_PAGE_ORDER=table``
            keeps the table's order).
        score: optional H2O accumulator ``[B, num_kv_heads, S]`` float32, contiguous, with
            ``S >= max_pages * page_size``, updated in place: ``score[b, h, p] +=`` the sum over
            the query heads of KV group ``h`` of their softmax probability of key ``p``, for every
            key attended this step (with ``window_left``, only the window's keys; with
            ``logit_soft_cap``, probabilities of the capped logits); other entries are unchanged.
            Definition: :func:`kvcore.reference.gqa_decode_score`. H2O keeps it across decode
            steps (:func:`kvcore.policies.h2o_scores` starts it at the end of prefill). On CUDA
            the step's unnormalised probabilities are normalised once each head's log-sum-exp
            is known: by the decode kernel itself when its grid fits the GPU in one wave (its
            CTAs then wait for each other: a cooperative launch), which keeps them in each
            CTA's shared memory where they fit (``KVCORE_SCORE_P=scratch`` sends them through
            the workspace), else by a second small kernel that reads them from the workspace
            (``KVCORE_SCORE_EPILOGUE=narrow`` asks for that one always). The workspace must
            hold :func:`decode_score_workspace_bytes` either way (the default one grows to it).
            With ``num_splits=0`` the split count keeps the grid to one wave. A NaN in
            ``q[b, hq]`` makes that group's attended scores NaN.
        plan_seq_lens: optional host copy of ``seq_lens`` (a CPU tensor or a sequence of ints,
            ``B`` entries), as a serving engine's scheduler holds it, for an automatic split
            count: it then sizes the grid for the keys the batch actually attends (the sum and
            the largest of each sequence's keys, windowed and clamped to the table) rather than
            as if every sequence filled ``block_table``. Never read by the kernel: each
            sequence's keys still come from ``seq_lens`` on the device, so stale or wrong values
            give correct results, only a slower plan. Equal lengths that fill the table plan the
            same split count as without it. Equal lengths (filling the table or not) may also
            pick the kernel: where blocks of 8 KV heads (``B x num_kv_heads / 8`` of them), or
            else of 4, a CTA each and unsplit, fill 90-100% of the SMs once (about one sequence
            per SM at Hkv8, as B128 on an H100, or one per two SMs, as B64), the page-major
            kernel, which reads every head of its block in a page at once, runs instead of a CTA
            per KV head; only at head_dim 128, with no window and
            no ``score``, pages of a multiple of 16 tokens, on a GPU with 192 KB of shared memory
            per block (Hopper), and with ``KVCORE_DECODE_KERNEL``, ``KVCORE_DECODE_WARPS``,
            ``KVCORE_DECODE_NARROW_RING``, ``KVCORE_DECODE_LOADER`` and
            ``KVCORE_DECODE_PAGE_GROUPS`` at their defaults
            (``KVCORE_DECODE_KERNEL=head`` turns it off). Its results are as deterministic, but
            not bitwise those of the call without the hint. Ignored with ``num_splits > 0`` and
            on CPU. A CUDA tensor is refused (reading it would synchronise with the GPU). Under
            CUDA graph capture the plan, kernel included, is fixed at capture like the rest of
            the launch: capture with a hint like the batches replayed (equal placeholder
            lengths at B128 would replay ragged batches on the page-major kernel, one CTA per
            sequence, or at B64 one per half sequence: correct, but up to ~2x slower), or none.
            Under ``torch.compile`` the hint is not read (the graph would specialise on every
            batch's lengths). H100, session 27:
            the B16 batch above 49 us with it (104 without); the decode bench's ragged B64 S4096
            row 166 us (178). It costs ~0.5 us of host time per call over 16-128 lengths.

    Determinism: on CUDA, a fixed ``num_splits = n > 0`` gives bitwise identical ``out``/``lse``
    on every call, whatever the workspace held before (earlier calls of any shape); ``0`` does
    too for the same shapes, the same ``plan_seq_lens`` (or none), the same ``block_table``
    values and the same GPU (the kernel and split count depend on nothing else; under
    ``torch.compile`` the hint is not read). With ``0`` the summation order follows the cache
    page numbers (see ``num_splits``), so the same keys in other pages (after ``compact_kv``, or
    another allocation history) may round differently; a fixed ``n`` or
    ``KVCORE_DECODE_PAGE_ORDER=table`` keeps results independent of where the pages lie. With a
    fixed ``n``, widening ``block_table`` (columns no sequence reaches) does not change a bit
    either: each sequence's splits are cut from its own length. On CPU ``num_splits`` is ignored
    and results are bitwise identical at a fixed ``torch.get_num_threads()``. Tested in
    ``tests/test_determinism.py`` and ``tests/test_ops.py``.

    NaN: a NaN in ``q[b, h]`` makes that row's ``out`` and ``lse`` NaN and touches no other row;
    a NaN in an attended K row of KV head ``g`` does so for every query head of group ``g``, and
    one in an attended V element only that element of those rows; NaN in cache entries a
    sequence does not attend to is never read (``tests/test_nan.py``).

    CPU arithmetic: float32, except that bfloat16 inputs on a CPU with AVX512_BF16
    (:func:`cpu_isa` ``"avx512bf16"``) multiply in bfloat16 pairs with float32 sums, as the CUDA
    kernels' tensor cores do: the logits from ``q`` and the keys as stored, the output from the
    softmax weights rounded to bfloat16 (bfloat16 subnormal inputs may count as zero there).

    Returns:
        ``out``, or ``(out, lse)`` when ``return_lse`` or ``lse`` is given.
    """
    _check_tensor_args("gqa_decode", dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                                          seq_lens=seq_lens),
                       dict(out=out, lse=lse, workspace=workspace, score=score))
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [batch, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    scale = _resolve_scale(scale, q.shape[-1])
    window_left = _int_arg("window_left", window_left, -1, "-1 (no window) or an int >= 0")
    if score is not None and workspace is None and q.is_cuda and k_cache.dim() == 4 and block_table.dim() == 2:
        workspace = decode_workspace(q.device, decode_score_workspace_bytes(
            q.shape[0], q.shape[1], block_table.shape[1], k_cache.shape[1], int(window_left)))
    plan_total, plan_max = _plan_keys(plan_seq_lens, q.shape[0], block_table, k_cache, 4, int(window_left))
    out, lse, want_lse, workspace, checked = _prepare_paged_decode(
        q, k_cache, block_table, seq_lens, logit_soft_cap, num_splits, out, lse, return_lse, workspace)
    _ops.gqa_decode(
        q, k_cache, v_cache, block_table, seq_lens, float(scale), int(window_left), float(logit_soft_cap),
        out, lse, workspace, int(num_splits), score, plan_total, plan_max,
    )
    out, lse = _guard_grad("gqa_decode", (out, lse), q, k_cache, v_cache)
    return (out, lse) if want_lse else out


def merge_attention_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention results computed over disjoint key sets into one.

    ``out = (e^lse_a * out_a + e^lse_b * out_b) / (e^lse_a + e^lse_b)`` and
    ``lse = log(e^lse_a + e^lse_b)``, computed stably; a part with ``lse = -inf`` (no keys)
    contributes nothing. Splits, sinks + local window + retrieved blocks, and cascades build on it.

    Args:
        out_a, out_b: ``[N, H, D]`` (bfloat16/float16, float32 on CPU).
        lse_a, lse_b: ``[N, H]`` float32 natural-log log-sum-exp of each part's logits.
        out, lse: optional outputs; ``out=out_a, lse=lse_a`` accumulates in place.

    Returns:
        ``(out, lse)``.
    """
    _check_tensor_args("merge_attention_states", dict(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b),
                       dict(out=out, lse=lse))
    if out is None:
        out = torch.empty_like(out_a, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.empty_like(lse_a, memory_format=torch.contiguous_format)
    _ops.merge_attention_states(out_a, lse_a, out_b, lse_b, out, lse)
    return _guard_grad("merge_attention_states", (out, lse), out_a, lse_a, out_b, lse_b)


# ---- fake (meta) implementations: shapes only, for torch.compile and opcheck -----------------
# The ops return nothing and write into tensors the caller passed, so the fakes have nothing to
# compute; the schema's (a!) annotations tell the compiler what is mutated.


@torch.library.register_fake("kvcore::append_paged_kv")
def _append_paged_kv_fake(k, v, k_cache, v_cache, slot_mapping) -> None:
    return None


@torch.library.register_fake("kvcore::gqa_decode")
def _gqa_decode_fake(q, k_cache, v_cache, block_table, seq_lens, scale, window_left, logit_soft_cap, out, lse,
                     workspace, num_splits, score=None, plan_total_keys=0, plan_max_keys=0) -> None:
    torch._check(out.shape == q.shape, lambda: "out must have q's shape")
    return None


@torch.library.register_fake("kvcore::merge_attention_states")
def _merge_attention_states_fake(out_a, lse_a, out_b, lse_b, out, lse) -> None:
    return None


# ---- block_sparse_decode ---------------------------------------------------------------------


def _check_selection_contents(sel_pages: torch.Tensor, sel_counts: torch.Tensor, seq_lens: torch.Tensor,
                              page_size: int) -> None:
    """Host check of a block-sparse selection: counts in range, pages in range, no duplicates."""
    max_sel = sel_pages.shape[2]
    counts = sel_counts.to(device="cpu", dtype=torch.int64)
    bad = (counts < 0) | (counts > max_sel)
    if bool(bad.any()):
        b, h = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"sel_counts[{b}, {h}] = {int(counts[b, h])} must be in [0, max_sel = {max_sel}]")
    pages = sel_pages.to(device="cpu", dtype=torch.int64)
    live = torch.arange(max_sel).view(1, 1, -1) < counts.unsqueeze(-1)  # entries that are read
    lens = seq_lens.to(device="cpu", dtype=torch.int64)
    used = ((lens + page_size - 1) // page_size).view(-1, 1, 1)
    bad = live & ((pages < 0) | (pages >= used))
    if bool(bad.any()):
        b, h, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"sel_pages[{b}, {h}, {j}] = {int(pages[b, h, j])} is not a page of sequence {b}: with "
            f"seq_lens[{b}] = {int(lens[b])} and page_size {page_size} the pages are [0, {int(used[b, 0, 0])})"
        )
    # Duplicates: give the ignored entries distinct negative values (the live ones are >= 0 now),
    # sort each list, and look for equal neighbours.
    filler = -1 - torch.arange(max_sel).view(1, 1, -1).expand_as(pages)
    ordered = torch.where(live, pages, filler).sort(dim=-1).values
    dup = ordered[..., 1:] == ordered[..., :-1]
    if bool(dup.any()):
        b, h, j = (int(x) for x in dup.nonzero()[0])
        raise ValueError(
            f"sel_pages[{b}, {h}] lists page {int(ordered[b, h, j])} more than once (its tokens would count twice)"
        )


@overload
def block_sparse_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    sel_pages: torch.Tensor, sel_counts: torch.Tensor, *, scale: Optional[float] = ..., logit_soft_cap: float = ...,
    out: Optional[torch.Tensor] = ..., lse: None = ..., return_lse: bool = ..., workspace: Optional[torch.Tensor] = ...,
    num_splits: int = ...,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]: ...
@overload
def block_sparse_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    sel_pages: torch.Tensor, sel_counts: torch.Tensor, *, scale: Optional[float] = ..., logit_soft_cap: float = ...,
    out: Optional[torch.Tensor] = ..., lse: torch.Tensor, return_lse: bool = ..., workspace: Optional[torch.Tensor] = ...,
    num_splits: int = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def block_sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sel_pages: torch.Tensor,
    sel_counts: torch.Tensor,
    *,
    scale: Optional[float] = None,
    logit_soft_cap: float = 0.0,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    workspace: Optional[torch.Tensor] = None,
    num_splits: int = 0,
):
    """Decode attention over selected pages: each (sequence, KV head) attends only to its list.

    The engine under retrieval attention (InfLLM, Quest) and StreamingLLM-style sinks + local
    window: sinks, retrieved blocks and the local window are all pages in one list, which
    :func:`kvcore.block_sparse.build_selection` builds. All query heads of a KV group share the
    group's selection, so each selected byte is read once per group. Equals attention over
    exactly the selected tokens (:func:`kvcore.reference.block_sparse_decode`); with ``lse`` the
    result merges with other attention through :func:`merge_attention_states`.

    Args:
        q: ``[B, num_q_heads, head_dim]``, bfloat16/float16 (float32 too on CPU); the last dim
            must be contiguous.
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``, q's dtype.
        block_table: ``[B, max_pages]`` int32, the pages of each sequence in order.
        seq_lens: ``[B]`` int32, tokens in each sequence.
        sel_pages: ``[B, num_kv_heads, max_sel]`` int32, *logical* page numbers (indices into the
            sequence's block-table row: page ``j`` holds positions ``j * page_size`` to
            ``(j + 1) * page_size - 1``). Order does not matter; entries past the count are
            ignored and may hold anything.
        sel_counts: ``[B, num_kv_heads]`` int32 in ``[0, max_sel]``, the length of each list.
            ``0`` (an empty selection) gives out 0 and lse -inf.
        scale: softmax scale, default ``head_dim ** -0.5``.
        logit_soft_cap: ``> 0`` applies ``cap * tanh(logit / cap)`` to the scaled logits.
        out: optional preallocated ``[B, num_q_heads, head_dim]`` output (q's dtype).
        lse: optional preallocated ``[B, num_q_heads]`` float32 log-sum-exp (natural log) of the
            logits; returned as well when given or when ``return_lse``.
        workspace: CUDA split-KV scratch (uint8, zero-filled once); default: the shared
            per-device buffer (:func:`decode_workspace`). Ignored on CPU.
        num_splits: ``0`` chooses how to split each selection from the shapes; ``n > 0`` forces
            ``n`` splits (at most 256 are taken; bitwise reproducible for a given ``n``). Any
            value gives the same attention up to rounding.

    CPU arithmetic: as :func:`gqa_decode`'s (bfloat16 pairs under ``"avx512bf16"``).

    Returns:
        ``out``, or ``(out, lse)`` when ``return_lse`` or ``lse`` is given.

    Raises:
        ValueError: bad scalars; with validation on (:func:`set_validation`) also ``seq_lens``
            or block-table pages out of range (as :func:`gqa_decode`), a count outside
            ``[0, max_sel]``, a listed page outside ``[0, ceil(seq_len / page_size))``, or a
            page listed twice in one list.
        RuntimeError: wrong shapes, dtypes, devices or layouts (from the op).
    """
    _check_tensor_args("block_sparse_decode", dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                                                   seq_lens=seq_lens, sel_pages=sel_pages, sel_counts=sel_counts),
                       dict(out=out, lse=lse, workspace=workspace))
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [batch, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    scale = _resolve_scale(scale, q.shape[-1])
    out, lse, want_lse, workspace, checked = _prepare_paged_decode(
        q, k_cache, block_table, seq_lens, logit_soft_cap, num_splits, out, lse, return_lse, workspace)
    if (
        checked
        and sel_pages.dim() == 3
        and sel_counts.dim() == 2
        and sel_pages.dtype == torch.int32
        and sel_counts.dtype == torch.int32
        and sel_pages.shape[:2] == sel_counts.shape
        and sel_counts.shape[0] == seq_lens.shape[0]
    ):
        _check_selection_contents(sel_pages, sel_counts, seq_lens, k_cache.shape[1])
    _ops.block_sparse_decode(
        q, k_cache, v_cache, block_table, seq_lens, sel_pages, sel_counts, float(scale), float(logit_soft_cap),
        out, lse, workspace, int(num_splits),
    )
    out, lse = _guard_grad("block_sparse_decode", (out, lse), q, k_cache, v_cache)
    return (out, lse) if want_lse else out


@torch.library.register_fake("kvcore::block_sparse_decode")
def _block_sparse_decode_fake(q, k_cache, v_cache, block_table, seq_lens, sel_pages, sel_counts, scale,
                              logit_soft_cap, out, lse, workspace, num_splits) -> None:
    torch._check(out.shape == q.shape, lambda: "out must have q's shape")
    return None


# ---- Block Transformer: token decoder attention ------------------------------------------------

__all__ += ["token_decoder_attention"]


@overload
def token_decoder_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_lens: Optional[torch.Tensor] = ...,
    *, scale: Optional[float] = ..., out: Optional[torch.Tensor] = ..., lse: None = ..., return_lse: bool = ...,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]: ...
@overload
def token_decoder_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_lens: Optional[torch.Tensor] = ...,
    *, scale: Optional[float] = ..., out: Optional[torch.Tensor] = ..., lse: torch.Tensor, return_lse: bool = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def token_decoder_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_lens: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    return_lse: bool = False,
):
    """Block Transformer token-decoder attention for many blocks at once (prefill).

    Each block is attended to on its own: token ``i`` of block ``n`` sees the block's ``P`` prefix
    slots (the block decoder's context for this block, expanded into ``P`` vectors) and the
    block's tokens ``0..i``, nothing else. Query head ``h`` uses KV head ``h // (Hq // Hkv)``.
    The definition is :func:`kvcore.reference.token_decoder_attention`.

    Args:
        q: ``[N, L, Hq, D]``, the queries of the ``L`` tokens of ``N`` blocks; bfloat16/float16
            (float32 too on CPU). Each block's ``[L, Hq, D]`` must be densely packed (blocks may
            be strided).
        k, v: ``[N, P + L, Hkv, D]``, q's dtype: each block's ``P`` prefix slots, then its ``L``
            tokens (``P = k.shape[1] - L >= 0``); per block densely packed.
        block_lens: optional ``[N]`` int32, valid tokens per block in ``[0, L]`` (a sequence's
            last block may be partial); rows past it get ``out = 0`` and ``lse = -inf``.
        scale: softmax scale, default ``D ** -0.5``.
        out: optional preallocated contiguous ``[N, L, Hq, D]`` output (q's dtype).
        lse: optional preallocated contiguous ``[N, L, Hq]`` float32 log-sum-exp (natural log).
        return_lse: also return ``lse`` (allocated when not given).

    Returns:
        ``out``, or ``(out, lse)`` when ``return_lse`` or ``lse`` is given.

    Raises:
        ValueError: ``q`` not 4-D, a bad ``scale``, or (validation on) a ``block_lens`` entry
            outside ``[0, L]``.
        RuntimeError: from the op, naming the argument: wrong dtype, rank, shape, device or
            layout. On CUDA: head_dim not 64/128/256, or a block too large for shared memory.
    """
    _check_tensor_args("token_decoder_attention", dict(q=q, k=k, v=v), dict(block_lens=block_lens, out=out, lse=lse))
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [blocks, block_length, num_q_heads, head_dim], got {tuple(q.shape)}")
    scale = _resolve_scale(scale, q.shape[-1])
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    want_lse = return_lse or lse is not None
    if return_lse and lse is None:
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if (
        validation_enabled()
        and block_lens is not None
        and _readable(block_lens)
        and block_lens.dim() == 1
        and block_lens.dtype == torch.int32
        and block_lens.numel() > 0
    ):
        lens = block_lens.to("cpu")
        bad = (lens < 0) | (lens > q.shape[1])
        if bool(bad.any()):
            n = int(bad.nonzero()[0, 0])
            raise ValueError(f"block_lens[{n}] = {int(lens[n])} must be in [0, block_length = {q.shape[1]}]")
    _ops.token_decoder_attention(q, k, v, block_lens, float(scale), out, lse)
    out, lse = _guard_grad("token_decoder_attention", (out, lse), q, k, v)
    return (out, lse) if want_lse else out


@torch.library.register_fake("kvcore::token_decoder_attention")
def _token_decoder_attention_fake(q, k, v, block_lens, scale, out, lse) -> None:
    torch._check(out.shape == q.shape, lambda: "out must have q's shape")
    return None


# ---- MLA: latent projection and absorbed decode ------------------------------------------------

__all__ += ["mla_decode", "mla_latent_project"]

#: DeepSeek-V2/V3's latent layout: 512 normalised c_KV columns, then 64 roped k_pe columns.
MLA_KV_LORA_RANK = 512
MLA_ROPE_DIM = 64


def _check_devices(op: str, first_name: str, first: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """Same-device check in Python, for ops whose CUDA kernel is not built yet: with a CUDA tensor
    among the arguments the dispatcher would pick the missing CUDA kernel and never reach the C++
    check that names the argument. (Its callers have run _check_tensor_args: the arguments are
    tensors or None.)"""
    for name, t in others.items():
        if t is not None and t.device != first.device:
            raise RuntimeError(f"{name} must be on the same device as {first_name} ({first.device}), got {t.device}")
    if first.device.type == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key(f"kvcore::{op}", "CUDA"):
        raise NotImplementedError(f"kvcore.{op} has no CUDA kernel in this release yet (CPU only); pass CPU tensors")



def mla_latent_project(
    hidden: torch.Tensor,
    w_dkv: torch.Tensor,
    norm_weight: torch.Tensor,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    latent_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    eps: float = 1e-6,
    interleaved_rope: bool = True,
    c_kv_out: Optional[torch.Tensor] = None,
    k_pe_out: Optional[torch.Tensor] = None,
    return_outputs: bool = False,
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """MLA's KV down-projection, fused: project, RMSNorm, RoPE, write into the latent cache.

    For each token ``t``: ``kv = hidden[t] @ w_dkv`` (fp32 accumulation); the first ``R``
    columns are RMS-normalised and scaled by ``norm_weight`` (c_KV), the last ``P`` are rotated
    at ``positions[t]`` (k_pe); the ``R + P`` row is stored at ``latent_cache`` slot
    ``slot_mapping[t]``. The definition is :func:`kvcore.reference.mla_latent_project`.

    Args:
        hidden: ``[T, d_model]`` bfloat16/float16 (float32 too on CPU); last dim contiguous.
        w_dkv: ``[d_model, R + P]`` contiguous, hidden's dtype (DeepSeek's ``wkv_a`` /
            ``kv_a_proj_with_mqa`` weight, transposed). DeepSeek: ``R = 512``, ``P = 64``.
        norm_weight: ``[R]`` hidden's dtype (``kv_a_layernorm`` weight).
        cos_sin: ``[max_position, P]`` float32: ``cos`` of the ``P/2`` angles, then their
            ``sin`` (:func:`kvcore.reference.rope_cos_sin` builds one).
        positions: ``[T]`` int64 token positions, in ``[0, max_position)``.
        latent_cache: ``[num_pages, page_size, R + P]`` hidden's dtype, modified in place
            (may be strided in dim 0).
        slot_mapping: ``[T]`` int64, ``page * page_size + offset``; ``-1`` skips a token.
            Slots must be distinct (two tokens written to one slot race and may mix).
        eps: RMSNorm epsilon (added to the mean square).
        interleaved_rope: rotate pairs ``(2i, 2i+1)`` (DeepSeek) if True, else
            ``(i, i + P/2)`` (GPT-NeoX).
        c_kv_out, k_pe_out: optional ``[T, R]`` / ``[T, P]`` outputs (hidden's dtype) receiving
            every token's c_KV / k_pe, skipped slots included (a prefill's keys).
        return_outputs: allocate and return ``(c_kv, k_pe)`` when not given.

    On CUDA (bfloat16/float16): ``R + P`` must be a multiple of 8 and at most 1024, ``w_dkv``
    and ``latent_cache`` must start on 16-byte boundaries and the cache's page stride must be a
    multiple of 8 elements. Up to 64 tokens run as one fused kernel (the weight read once, spread
    over every SM); more tokens use cuBLAS for the product, then one fused epilogue kernel.

    Returns:
        ``(c_kv, k_pe)`` when either output is given or ``return_outputs``, else ``None``.

    Raises:
        ValueError: bad ``eps``; with validation on, a slot outside ``[-1, num_slots)`` or a
            position outside ``[0, max_position)``.
        RuntimeError: from the op, naming the argument: wrong dtype, rank, shape, device, layout.
    """
    _check_tensor_args("mla_latent_project", dict(hidden=hidden, w_dkv=w_dkv, norm_weight=norm_weight, cos_sin=cos_sin,
                                                  positions=positions, latent_cache=latent_cache,
                                                  slot_mapping=slot_mapping),
                       dict(c_kv_out=c_kv_out, k_pe_out=k_pe_out))
    eps = _positive_float32("eps", eps)
    want = return_outputs or c_kv_out is not None or k_pe_out is not None
    if want and hidden.dim() == 2 and norm_weight.dim() == 1 and cos_sin.dim() == 2:
        if c_kv_out is None:
            c_kv_out = torch.empty(hidden.shape[0], norm_weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        if k_pe_out is None:
            k_pe_out = torch.empty(hidden.shape[0], cos_sin.shape[1], dtype=hidden.dtype, device=hidden.device)
    _check_devices("mla_latent_project", "hidden", hidden, w_dkv=w_dkv, norm_weight=norm_weight, cos_sin=cos_sin,
                   positions=positions, latent_cache=latent_cache, slot_mapping=slot_mapping, c_kv_out=c_kv_out,
                   k_pe_out=k_pe_out)
    _refuse_grad_target("mla_latent_project", latent_cache=latent_cache)
    if validation_enabled() and _readable(slot_mapping, positions):
        if slot_mapping.dim() == 1 and latent_cache.dim() == 3 and slot_mapping.dtype == torch.int64:
            _check_slots(slot_mapping, latent_cache.shape[0], latent_cache.shape[1])
        if positions.dim() == 1 and cos_sin.dim() == 2 and positions.dtype == torch.int64 and positions.numel():
            pos = positions.to("cpu")
            bad = (pos < 0) | (pos >= cos_sin.shape[0])
            if bool(bad.any()):
                t = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"positions[{t}] = {int(pos[t])} is outside the rope table's rows [0, {cos_sin.shape[0]}) (cos_sin)"
                )
    _ops.mla_latent_project(
        hidden, w_dkv, norm_weight, float(eps), cos_sin, positions, latent_cache, slot_mapping, bool(interleaved_rope),
        c_kv_out, k_pe_out,
    )
    if not want:
        return None
    return _guard_grad("mla_latent_project", (c_kv_out, k_pe_out), hidden, w_dkv, norm_weight, cos_sin)


@overload
def mla_decode(
    q: torch.Tensor, latent_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, *, scale: float,
    v_dim: Optional[int] = ..., out: Optional[torch.Tensor] = ..., lse: None = ..., return_lse: bool = ...,
    workspace: Optional[torch.Tensor] = ..., num_splits: int = ...,
    plan_seq_lens: Optional[Union[Sequence[int], torch.Tensor]] = ...,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]: ...
@overload
def mla_decode(
    q: torch.Tensor, latent_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, *, scale: float,
    v_dim: Optional[int] = ..., out: Optional[torch.Tensor] = ..., lse: torch.Tensor, return_lse: bool = ...,
    workspace: Optional[torch.Tensor] = ..., num_splits: int = ...,
    plan_seq_lens: Optional[Union[Sequence[int], torch.Tensor]] = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...
def mla_decode(
    q: torch.Tensor,
    latent_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    v_dim: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    workspace: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    plan_seq_lens: Optional[Union[Sequence[int], torch.Tensor]] = None,
):
    """Absorbed MLA decode: one query token per sequence over the paged latent cache.

    Every head attends to the sequence's latent rows (keys, ``Dk = R + P`` wide) and takes their
    first ``v_dim`` columns (c_KV) as values: multi-query attention with one shared head, where
    ``q``'s first ``R`` columns are ``q_nope`` already multiplied by ``W_UK`` and the last ``P``
    the roped ``q_pe`` (:class:`kvcore.mla.MLAAttention` builds them). The definition is
    :func:`kvcore.reference.mla_decode`.

    Args:
        q: ``[B, H, Dk]`` bfloat16/float16 (float32 too on CPU), last dim contiguous.
        latent_cache: ``[num_pages, page_size, Dk]``, q's dtype (may be strided in dim 0).
        block_table: ``[B, max_pages]`` int32; seq_lens: ``[B]`` int32 (0 gives out 0, lse -inf).
        scale: softmax scale (required: MLA's is ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``,
            which the shapes do not tell).
        v_dim: value width; default ``out.shape[2]`` when ``out`` is given, else ``Dk - 64``
            (DeepSeek's 512 of 576).
        out: optional preallocated contiguous ``[B, H, v_dim]`` output (q's dtype).
        lse: optional preallocated ``[B, H]`` float32 log-sum-exp (natural log); returned when
            given or when ``return_lse``.
        workspace: CUDA split-KV scratch (uint8, zero-filled once); default: the shared
            per-device buffer (:func:`decode_workspace`). Ignored on CPU.
        num_splits: ``0`` picks the KV split from the shapes (and ``plan_seq_lens``), ``n > 0``
            forces ``n`` (at most 256 are taken, on either device). On CPU, ``n > 0`` fixes the
            key-range parts too (bitwise identical across calls and thread counts); ``0`` cuts
            by the thread count (deterministic at a fixed thread count).
        plan_seq_lens: optional host copy of ``seq_lens`` (a CPU tensor or a sequence of ints,
            ``B`` entries), for an automatic split count on CUDA, as in :func:`gqa_decode`: the
            grid is then sized for the keys the batch attends rather than as if every sequence
            filled ``block_table`` (a batch of very unequal lengths gets its long sequences
            split across the GPU). With up to 16 heads it plans as there (H100, session 28, B64
            H16 in an 8192-token table with one full sequence and the rest at 1024 tokens: 82 us
            with it, 114 without); with more (compute-bound kernels, whose splits cost more) it
            only doubles the shapes' count (from a count of at most 4) where one long sequence
            dominates (at least 4x the mean length), twice the grid fits two waves and the
            longest sequence has 256 keys a split (session 29, B64 H32 with one 4096-token
            sequence among 512s: 64 us against 108), and takes at most one split per 256 keys
            of the longest sequence (session 30, B32 H128 with every sequence at 256 keys in a
            4096-token table: 23 us against 31; the 64-head kernels, above 32 heads on compute
            capability 9.0, only from 16 (sequence, 64-head block) pairs, since below that the
            shapes' short splits win: session 31, B1 H128, 18 us against 22). Never read by the
            kernel, so stale values cost only speed; equal lengths that fill the table plan as
            without it (the same bits). Ignored with ``num_splits > 0``, on CPU and under
            ``torch.compile``; fixed at capture in a CUDA graph. Refused as a CUDA tensor
            (reading it would synchronise).

    NaN: a NaN in ``q[b, h]`` makes that row's ``out`` and ``lse`` NaN and touches no other row; a
    NaN anywhere in an attended latent row (a key column, or a value column too) does so for
    every head of that sequence; latent entries a sequence does not attend to are never read
    (``tests/test_nan.py``).

    On CPU the arithmetic is float32, except that bfloat16 inputs on a CPU with AVX512_BF16
    (:func:`cpu_isa` ``"avx512bf16"`` or ``"amx"``) multiply in bfloat16 pairs with float32 sums,
    as the CUDA kernels' tensor cores do: the logits from q and the rows as stored, the output from
    the softmax weights rounded to bfloat16 (bfloat16 subnormal inputs may count as zero there).
    Under ``"amx"`` (and head widths of a multiple of 32) both products run on AMX tiles, the
    online softmax in steps of 256 keys.

    Returns:
        ``out``, or ``(out, lse)`` when ``return_lse`` or ``lse`` is given.

    Raises:
        ValueError: bad scalars; with validation on, ``seq_lens`` over the block table's capacity
            or a used block-table entry that is not a page of the cache.
        RuntimeError: from the op, naming the argument: wrong dtype, rank, shape, device, layout.
    """
    _check_tensor_args("mla_decode", dict(q=q, latent_cache=latent_cache, block_table=block_table, seq_lens=seq_lens),
                       dict(out=out, lse=lse, workspace=workspace))
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [batch, num_heads, kv_lora_rank + rope_dim], got {tuple(q.shape)}")
    scale = _positive_float32("scale", scale)
    _int_arg("num_splits", num_splits, 0, "0 (automatic) or a positive int")
    dk = q.shape[2]
    if v_dim is not None:
        v_dim = _int_arg("v_dim", v_dim, 1, f"an int in [1, {dk}] (q's last dim)", hi=max(dk, 1))
        if out is not None and out.dim() == 3 and out.shape[2] != v_dim:
            raise ValueError(f"v_dim = {v_dim} disagrees with out's last dim ({out.shape[2]}); give one or make them equal")
    elif out is not None and out.dim() == 3:
        v_dim = out.shape[2]
    else:
        v_dim = dk - MLA_ROPE_DIM
        if v_dim < 1:
            raise ValueError(f"v_dim defaults to q's last dim - {MLA_ROPE_DIM} (DeepSeek's c_KV width), which is "
                             f"{v_dim} for q's last dim {dk}: pass v_dim (an int in [1, {dk}])")
    if not 0 < v_dim <= dk:
        raise ValueError(f"v_dim must be in [1, {dk}] (q's last dim), got {v_dim}")
    if out is None:
        out = torch.empty(q.shape[0], q.shape[1], v_dim, dtype=q.dtype, device=q.device)
    want_lse = return_lse or lse is not None
    if return_lse and lse is None:
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    if workspace is None and q.is_cuda:
        workspace = decode_workspace(q.device)
    _check_devices("mla_decode", "q", q, latent_cache=latent_cache, block_table=block_table, seq_lens=seq_lens,
                   out=out, lse=lse, workspace=workspace)
    plan_total, plan_max = _plan_keys(plan_seq_lens, q.shape[0], block_table, latent_cache, 3)
    _validate_block_table(latent_cache, 3, block_table, seq_lens)
    _ops.mla_decode(q, latent_cache, block_table, seq_lens, float(scale), out, lse, workspace, int(num_splits),
                    plan_total, plan_max)
    out, lse = _guard_grad("mla_decode", (out, lse), q, latent_cache)
    return (out, lse) if want_lse else out


@torch.library.register_fake("kvcore::mla_latent_project")
def _mla_latent_project_fake(hidden, w_dkv, norm_weight, eps, cos_sin, positions, latent_cache, slot_mapping,
                             interleaved_rope, c_kv_out, k_pe_out) -> None:
    torch._check(latent_cache.shape[-1] == w_dkv.shape[-1], lambda: "latent_cache must be as wide as w_dkv")
    return None


@torch.library.register_fake("kvcore::mla_decode")
def _mla_decode_fake(q, latent_cache, block_table, seq_lens, scale, out, lse, workspace, num_splits,
                     plan_total_keys=0, plan_max_keys=0) -> None:
    torch._check(out.shape[:2] == q.shape[:2], lambda: "out must be [batch, num_heads, v_dim]")
    return None


# ---- eviction: attention_scores and compact_kv -------------------------------------------------

__all__ += ["attention_scores", "compact_kv"]

_SCORE_REDUCTIONS = ("sum", "mean", "max")
_SCORE_POOLINGS = ("none", "avg", "max")


def attention_scores(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    lse: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    reduction: str = "sum",
    pooling: str = "none",
    pool_kernel: int = 5,
    max_len: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-key eviction scores from the attention of a window of queries, without the score matrix.

    The ``w`` queries are the last ``w`` positions of each sequence: query ``i`` sits at
    position ``seq_lens[b] - w + i`` and sees the keys up to that position (causal inside the
    window). Each query's softmax probabilities over the keys it sees are reduced over the
    window and over the query heads of each KV group into one score per (sequence, KV head,
    key); optionally 1-D pooled over the keys before the window (SnapKV). The definition is
    :func:`kvcore.reference.attention_scores`. The CPU kernel holds at most a
    ``[G * w, 32]`` block of logits per thread; the CUDA kernel (head dims 64 / 128 / 256) computes
    the logits on tensor cores a 64-key tile at a time, in two passes over the keys (one when
    ``lse`` is given), with an fp32 workspace from the caching allocator of about
    ``max(B * Hkv, 8 * resident CTAs) * w * G`` floats (2 MiB for B1 Hkv8 G4 w64 on an H200);
    its results are deterministic run to run.

    Args:
        q: ``[B, w, Hq, D]``, bfloat16/float16 (float32 too on CPU), last dim contiguous.
        k_cache: ``[num_pages, page_size, Hkv, D]``, q's dtype (values are not read).
        block_table: ``[B, max_pages]`` int32; seq_lens: ``[B]`` int32 (keys per sequence,
            the window included; a sequence shorter than ``w`` has queries that see nothing).
        lse: optional ``[B, w, Hq]`` float32 natural-log log-sum-exp of each query's logits over
            the keys it sees (e.g. from the prefill attention); saves the first of two passes.
        scale: softmax scale, default ``D ** -0.5`` (must match ``lse`` when given).
        reduction: ``"sum"``, ``"mean"`` (sum / (w * G)) or ``"max"`` over (query, group head).
        pooling: ``"none"``, ``"avg"`` or ``"max"``; pool_kernel: 5 or 7 (stride 1, padding
            ``pool_kernel // 2``, over the keys ``p < seq_lens[b] - w`` only; avg counts padding).
        max_len: key dimension ``S`` of the result, default ``out.shape[2]`` or the block table's
            capacity ``max_pages * page_size`` (no host sync); must be >= every seq_len.
        out: optional preallocated contiguous ``[B, Hkv, S]`` float32.

    CPU arithmetic: float32; bfloat16 inputs on a CPU with AVX512_BF16 (:func:`cpu_isa`
    ``"avx512bf16"``) multiply in bfloat16 pairs with float32 sums (the products exact;
    bfloat16 subnormal inputs may count as zero).

    Returns:
        ``out`` ``[B, Hkv, S]`` float32; keys ``p >= seq_lens[b]`` score 0.

    Raises:
        ValueError: q not 4-D, bad scale / reduction / pooling / pool_kernel; with validation on,
            seq_lens or block-table pages out of range, or a seq_len above ``S``.
        RuntimeError: wrong shapes, dtypes, devices or layouts (from the op).
    """
    _check_tensor_args("attention_scores", dict(q=q, k_cache=k_cache, block_table=block_table, seq_lens=seq_lens),
                       dict(lse=lse, out=out))
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [batch, window, num_q_heads, head_dim], got {tuple(q.shape)}")
    scale = _resolve_scale(scale, q.shape[-1])
    if reduction not in _SCORE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {_SCORE_REDUCTIONS}, got {reduction!r}")
    if pooling not in _SCORE_POOLINGS:
        raise ValueError(f"pooling must be one of {_SCORE_POOLINGS}, got {pooling!r}")
    if pooling != "none" and pool_kernel not in (5, 7):
        raise ValueError(f"pool_kernel must be 5 or 7 when pooling is on, got {pool_kernel}")
    if max_len is not None:
        max_len = _int_arg("max_len", max_len, 0, "an int >= 0")
        if out is not None and out.dim() == 3 and out.shape[2] != max_len:
            raise ValueError(f"max_len = {max_len} disagrees with out's key dimension ({out.shape[2]}); give one or "
                             "make them equal")
    if out is None:
        if max_len is None:
            if block_table.dim() != 2 or k_cache.dim() != 4:
                raise ValueError("block_table must be 2-D and k_cache 4-D to size the output (or pass max_len)")
            max_len = block_table.shape[1] * k_cache.shape[1]
        num_kv_heads = k_cache.shape[2] if k_cache.dim() == 4 else 0
        out = torch.empty(q.shape[0], num_kv_heads, int(max_len), dtype=torch.float32, device=q.device)
    if out.dim() == 3 and _validate_block_table(k_cache, 4, block_table, seq_lens):
        lens = seq_lens.to("cpu")
        if lens.numel() and int(lens.max()) > out.shape[2]:
            b = int(lens.argmax())
            raise ValueError(f"seq_lens[{b}] = {int(lens[b])} exceeds the scores' key dimension (out.shape[2] / "
                             f"max_len = {out.shape[2]})")
    _ops.attention_scores(q, k_cache, block_table, seq_lens, lse, float(scale), reduction, pooling, int(pool_kernel),
                          out)
    (out,) = _guard_grad("attention_scores", (out,), q, k_cache, lse)
    return out


@torch.library.register_fake("kvcore::attention_scores")
def _attention_scores_fake(q, k_cache, block_table, seq_lens, lse, scale, reduction, pooling, pool_kernel,
                           out) -> None:
    torch._check(out.dim() == 3 and out.shape[0] == q.shape[0], lambda: "out must be [batch, num_kv_heads, max_len]")
    return None


def _check_kept_contents(kept: torch.Tensor, kept_lens: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Host check of compact_kv's selection: counts in range, positions strictly increasing and in range."""
    lens = seq_lens.to(device="cpu", dtype=torch.int64)
    counts = kept_lens.to(device="cpu", dtype=torch.int64)
    limit = torch.clamp(lens, max=kept.shape[2])
    bad = (counts < 0) | (counts > limit)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"kept_lens[{b}] = {int(counts[b])} must be in [0, min(seq_lens[{b}] = {int(lens[b])}, "
            f"max_kept = {kept.shape[2]})]"
        )
    pos = kept.to("cpu")
    live = torch.arange(kept.shape[2]).view(1, 1, -1) < counts.view(-1, 1, 1)
    bad = live & ((pos < 0) | (pos >= lens.view(-1, 1, 1)))
    if bool(bad.any()):
        b, h, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"kept[{b}, {h}, {j}] = {int(pos[b, h, j])} is not a position of sequence {b} "
                         f"(seq_lens[{b}] = {int(lens[b])})")
    unsorted = live[..., 1:] & (pos[..., 1:] <= pos[..., :-1])
    if bool(unsorted.any()):
        b, h, j = (int(x) for x in unsorted.nonzero()[0])
        raise ValueError(f"kept[{b}, {h}] must be strictly increasing: kept[{b}, {h}, {j + 1}] = "
                         f"{int(pos[b, h, j + 1])} follows {int(pos[b, h, j])}")


def compact_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    kept: torch.Tensor,
    kept_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Compact a paged KV cache in place after eviction; returns ``seq_lens``, updated in place.

    For each sequence ``b`` and KV head ``h`` the tokens at positions ``kept[b, h, :n]`` (with
    ``n = kept_lens[b]``) move, in order, to positions ``0 .. n - 1`` of that head, through the
    sequence's block table; then ``seq_lens[b] = n``. Pages past ``ceil(n / page_size)`` are no
    longer read and can be given back (:meth:`kvcore.PagedKVCache.truncate`). Definition:
    :func:`kvcore.reference.compact_kv`.

    Per-head budgets: kvcore's decode reads one ``seq_len`` per sequence, so every KV head of a
    sequence keeps the same number of tokens ``kept_lens[b]`` (the shape enforces it). A policy
    whose per-head budgets differ (AdaKV) pads each head up to the sequence's largest count
    with that head's next-best tokens, or refuses: see :mod:`kvcore.policies`.

    On CUDA the rows of each head are moved in chunks by many CTAs at once (a chunk is read whole
    before it is written, and waits only for the earlier chunks that still read its destinations),
    all in one launch. Their tickets and flags (4 bytes per chunk) live in a scratch buffer kept
    per (device, stream) and left reusable by each launch, so a call allocates and zeroes nothing
    (under CUDA graph capture each captured call gets its own buffer, zeroed by a memset node).
    float32 caches are accepted on CUDA too (the kernel moves bytes). Sequences must not
    share the pages a compaction writes (their writes would race, on CPU as on CUDA).

    Args:
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``; modified in place.
        block_table: ``[B, max_pages]`` int32; seq_lens: ``[B]`` int32, modified in place.
        kept: ``[B, Hkv, K]`` int64 positions, each row strictly increasing in ``[0, seq_lens[b])``
            over its first ``kept_lens[b]`` entries (the rest is ignored).
        kept_lens: ``[B]`` int32 in ``[0, min(seq_lens[b], K)]``; default ``K`` for every sequence.

    Raises:
        ValueError: with validation on, block-table pages or seq_lens out of range, a count
            outside its range, or a kept position out of range or out of order.
        RuntimeError: wrong shapes, dtypes, devices or layouts (from the op).
    """
    _check_tensor_args("compact_kv", dict(k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens,
                                          kept=kept), dict(kept_lens=kept_lens))
    _refuse_grad_target("compact_kv", k_cache=k_cache, v_cache=v_cache)
    _check_distinct("compact_kv", "k_cache", k_cache, "v_cache", v_cache)
    if kept_lens is None:
        if kept.dim() != 3:
            raise ValueError(f"kept must be 3-D [batch, num_kv_heads, max_kept], got shape {tuple(kept.shape)}")
        kept_lens = torch.full((kept.shape[0],), kept.shape[2], dtype=torch.int32, device=kept.device)
    if (
        _validate_block_table(k_cache, 4, block_table, seq_lens)
        and kept.dim() == 3
        and kept.dtype == torch.int64
        and kept.shape[0] == seq_lens.shape[0]
        and kept_lens.dim() == 1
        and kept_lens.shape[0] == seq_lens.shape[0]
        and _readable(kept, kept_lens)
    ):
        _check_kept_contents(kept, kept_lens, seq_lens)
    _ops.compact_kv(k_cache, v_cache, block_table, seq_lens, kept, kept_lens)
    return seq_lens


@torch.library.register_fake("kvcore::compact_kv")
def _compact_kv_fake(k_cache, v_cache, block_table, seq_lens, kept, kept_lens) -> None:
    return None


# ---- InfLLM retrieval: unit scoring and row top-k (issue 5) ---------------------------------------

__all__ += ["infllm_unit_scores", "topk_rows"]

#: Largest ``k`` :func:`topk_rows` accepts.
TOPK_MAX_K = 256


def infllm_unit_scores(q: torch.Tensor, repr_keys: torch.Tensor, *, per_kv_head: bool = False,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InfLLM's unit relevance: every representative key dotted with its KV group's queries.

    With ``G = num_q_heads / num_kv_heads``, in float32::

        s[b, h, u] = sum_{g < G} q[b, h * G + g] . repr_keys[b, u, h]

    and ``score[b, u] = sum_h s[b, h, u]`` (InfLLM: one set of units for all heads). Each key is
    read once (the op is memory-bound); no host sync, no allocation when ``out`` is given.
    Definition: :func:`kvcore.reference.infllm_unit_scores`.

    Args:
        q: ``[B, num_q_heads, head_dim]`` in ``repr_keys``' dtype or float32 (e.g. the float32
            mean of a chunk's queries); the last dim contiguous.
        repr_keys: ``[B, units, num_kv_heads, head_dim]`` bfloat16/float16 (float32 too on CPU),
            its last three dims densely packed (a ``[:, :units]`` slice of a larger buffer is
            fine). CUDA: head_dim a power of two in ``[8, 256]``, 16-byte aligned rows.
        per_kv_head: return ``s [B, num_kv_heads, units]`` instead of ``score [B, units]``.
        out: optional preallocated float32 output of that shape (contiguous).

    Returns:
        float32 ``[B, units]`` or ``[B, num_kv_heads, units]``.

    Raises:
        ValueError: without ``out``, q not 3-D or repr_keys not 4-D; an ``out`` whose rank does
            not match ``per_kv_head``.
        RuntimeError: wrong shapes, dtypes, devices or layouts (from the op).
    """
    _check_tensor_args("infllm_unit_scores", dict(q=q, repr_keys=repr_keys), dict(out=out))
    if out is None:
        if q.dim() != 3 or repr_keys.dim() != 4:
            raise ValueError(
                f"q must be [B, Hq, D] and repr_keys [B, U, Hkv, D], got {tuple(q.shape)} and {tuple(repr_keys.shape)}")
        b, u, hkv = q.shape[0], repr_keys.shape[1], repr_keys.shape[2]
        shape = (b, hkv, u) if per_kv_head else (b, u)
        out = torch.empty(shape, dtype=torch.float32, device=q.device)
    elif out.dim() != (3 if per_kv_head else 2):
        raise ValueError(f"out must be {'[B, Hkv, U]' if per_kv_head else '[B, U]'} for per_kv_head={per_kv_head}, "
                         f"got shape {tuple(out.shape)}")
    _ops.infllm_unit_scores(q, repr_keys, out)
    (out,) = _guard_grad("infllm_unit_scores", (out,), q, repr_keys)
    return out


def topk_rows(scores: torch.Tensor, k: int, *, index_dtype: torch.dtype = torch.int64,
              values: Optional[torch.Tensor] = None,
              indices: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best columns of every row, in one launch (one CTA per row on CUDA).

    The order is total, so the result is exact and the same on every backend: descending score,
    equal scores by ascending column (``-0.0 == +0.0``), NaN below every number (``-inf``
    included; mask a column with ``-inf``). When ``k > U`` the slots past ``U`` hold value
    ``-inf`` and index ``-1``. Definition: :func:`kvcore.reference.topk_rows`. On sm_90 the
    launch is programmatic (``KVCORE_NO_PDL=1`` turns that off): behind
    :func:`infllm_unit_scores` its CTA starts while the scores drain, and waits for them.

    Args:
        scores: ``[N, U]`` float32, columns contiguous (rows may be strided).
        k: ``1 <= k <= TOPK_MAX_K`` (256).
        index_dtype: ``torch.int64`` or ``torch.int32`` (when ``indices`` is not given).
        values, indices: optional preallocated ``[N, k]`` outputs (float32; int32/int64).

    Returns:
        ``(values [N, k]`` float32, ``indices [N, k])``, best first.

    Raises:
        ValueError: ``k`` not an int in range, ``index_dtype`` not int32/int64, or a given
            ``values`` / ``indices`` whose width is not ``k``.
        RuntimeError: wrong shapes, dtypes, devices or layouts (from the op).
    """
    _check_tensor_args("topk_rows", dict(scores=scores), dict(values=values, indices=indices))
    k = _int_arg("k", k, 1, f"an int in [1, {TOPK_MAX_K}]", hi=TOPK_MAX_K)
    if index_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
    rows = scores.shape[0] if scores.dim() >= 1 else 0
    if values is None:
        values = torch.empty(rows, k, dtype=torch.float32, device=scores.device)
    if indices is None:
        indices = torch.empty(rows, k, dtype=index_dtype, device=scores.device)
    # The kernel takes k from the outputs' width: a caller's buffers must agree with k.
    for name, t in (("values", values), ("indices", indices)):
        if t.dim() == 2 and t.shape[1] != k:
            raise ValueError(f"{name} must be [rows, k = {k}], got {tuple(t.shape)}")
    _ops.topk_rows(scores, values, indices)
    (values,) = _guard_grad("topk_rows", (values,), scores)
    return values, indices


@torch.library.register_fake("kvcore::infllm_unit_scores")
def _infllm_unit_scores_fake(q, repr_keys, out) -> None:
    torch._check(out.dtype == torch.float32, lambda: "out must be float32")
    return None


@torch.library.register_fake("kvcore::topk_rows")
def _topk_rows_fake(scores, values, indices) -> None:
    torch._check(values.shape == indices.shape, lambda: "values and indices must have one shape")
    return None
