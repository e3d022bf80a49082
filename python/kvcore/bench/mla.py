"""Benchmark group ``mla``: absorbed MLA decode and the fused latent projection, kvcore vs peers.

Decode cases (B, H, S), page 64, latent 576 = 512 c_KV + 64 k_pe, values its first 512 columns.
Bytes that must be moved: the latent rows touched (``B * S * 576 * itemsize``) plus q read and out
written (``B * H * (576 + 512) * itemsize``); FLOPs ``2 * B * H * S * (576 + 512)`` (QK^T and PV).
With 128 heads the op is compute-bound (about 2 * H FLOPs per latent byte), so rows also report
TFLOP/s against the run's GEMM yardstick.

* ``kvcore``: ``kvcore.mla_decode``, output preallocated, validation off while timed.
* ``flashinfer``: ``flashinfer.mla.BatchMLAPagedAttentionWrapper`` (plan outside the timing) on
  the c_KV and k_pe halves of the same latent cache (strided views; contiguous copies made once
  if the views are refused).
* ``torch``: the plain form on each sequence's latents gathered once outside the timing
  (``[B, S, 576]``): bmm, fp32 softmax, bmm with the first 512 columns.

Projection cases (T tokens, d_model 7168 on a GPU): bytes = the weight ``d_model * 576``
(dominant at decode-sized T, read cold) + hidden + the cache rows written; FLOPs
``2 * T * d_model * 576``.

* ``kvcore``: ``kvcore.mla_latent_project`` (one fused op).
* ``torch``: the unfused sequence: matmul, ``rms_norm`` of the c_KV part, RoPE of the k_pe
  part, and an ``index_put_`` into the cache.

Every output is checked against an fp32 evaluation before it is timed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from . import runner
from .harness import RunContext, dtype_suffix
from .peers import Prepared, Skip, _first_line, import_kvcore, validation_off_while_timed

GROUP = "mla"

RANK, ROPE, WIDTH = 512, 64, 576
# Max abs error against the fp32 reference before an implementation is timed. bf16 is looser than
# in the decode group: the plain-torch peer rounds its probabilities to bf16 before the 512-wide PV
# product (measured 0.022 on CPU at B1 H128 S256).
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}

GPU_IMPLS = ["kvcore", "flashinfer", "torch"]
CPU_IMPLS = ["kvcore", "torch"]


@dataclass(frozen=True)
class MlaDecodeCase:
    batch: int
    num_heads: int
    seq_len: int
    page_size: int = 64
    dtype: torch.dtype = torch.bfloat16

    @property
    def name(self) -> str:
        return f"decode B{self.batch} H{self.num_heads} S{self.seq_len} page{self.page_size}" + dtype_suffix(self.dtype)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return (self.batch * self.seq_len * WIDTH + self.batch * self.num_heads * (WIDTH + RANK)) * self.itemsize

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.num_heads * self.seq_len * (WIDTH + RANK)


@dataclass(frozen=True)
class MlaProjectCase:
    tokens: int
    d_model: int = 7168
    page_size: int = 64
    dtype: torch.dtype = torch.bfloat16

    @property
    def name(self) -> str:
        return f"project T{self.tokens} d{self.d_model}" + dtype_suffix(self.dtype)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return (self.d_model * WIDTH + self.tokens * self.d_model + self.tokens * WIDTH + RANK) * self.itemsize

    @property
    def flops(self) -> float:
        return 2.0 * self.tokens * self.d_model * WIDTH


Case = Union[MlaDecodeCase, MlaProjectCase]


def cases(device: torch.device, quick: bool) -> list:
    """The issue's grid on a GPU (smaller with ``quick``); a few small fp32/bf16 cases on CPU."""
    device = torch.device(device)
    if device.type == "cuda" and not quick:
        grid = [(1, 128, 32768), (32, 128, 4096), (64, 16, 8192), (128, 128, 1024), (132, 16, 4096)]
        return [MlaDecodeCase(b, h, s) for b, h, s in grid] + [MlaProjectCase(t) for t in (1, 2, 4, 8, 16, 32, 64)]
    if device.type == "cuda":
        return [MlaDecodeCase(4, 128, 4096), MlaDecodeCase(16, 16, 4096), MlaProjectCase(1), MlaProjectCase(16)]
    return [
        MlaDecodeCase(2, 16, 512, dtype=torch.float32),
        MlaDecodeCase(1, 128, 256, dtype=torch.bfloat16),
        MlaProjectCase(1, 512, dtype=torch.float32),
        MlaProjectCase(8, 512, dtype=torch.bfloat16),
    ]


def impls(device: torch.device) -> list:
    """Implementations run by default on this device, in report column order."""
    return list(GPU_IMPLS if torch.device(device).type == "cuda" else CPU_IMPLS)


def known_impls() -> list:
    return list(GPU_IMPLS)


# ---- decode ------------------------------------------------------------------------------------


@dataclass
class DecodeInputs:
    q: torch.Tensor  # [B, H, 576]
    latent: torch.Tensor  # [pages, page_size, 576]
    block_table: torch.Tensor  # [B, pages_per_seq] int32
    seq_lens: torch.Tensor  # [B] int32
    scale: float
    case: MlaDecodeCase

    def gathered(self) -> torch.Tensor:
        """Each sequence's latents in order, ``[B, S, 576]`` (a copy)."""
        b, s = self.case.batch, self.case.seq_len
        return self.latent[self.block_table.long()].reshape(b, -1, WIDTH)[:, :s].contiguous()


def make_decode_inputs(case: MlaDecodeCase, device: torch.device, seed: int = 0) -> DecodeInputs:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed + 1)
    pages_per_seq = math.ceil(case.seq_len / case.page_size)
    num_pages = case.batch * pages_per_seq
    kw = {"dtype": case.dtype, "device": device, "generator": gen}
    latent = torch.randn(num_pages, case.page_size, WIDTH, **kw)
    q = torch.randn(case.batch, case.num_heads, WIDTH, **kw)
    table = torch.randperm(num_pages, generator=cpu_gen).view(case.batch, pages_per_seq).to(torch.int32).to(device)
    lens = torch.full((case.batch,), case.seq_len, dtype=torch.int32, device=device)
    return DecodeInputs(q, latent, table, lens, scale=(128 + ROPE) ** -0.5, case=case)


def torch_mla_decode(q: torch.Tensor, kv: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain absorbed MLA decode: q ``[B, H, 576]``, kv ``[B, S, 576]`` -> ``[B, H, 512]`` (q's dtype)."""
    scores = torch.bmm(q, kv.transpose(1, 2)).float() * scale
    probs = torch.softmax(scores, dim=-1).to(kv.dtype)
    return torch.bmm(probs, kv[..., :RANK]).to(q.dtype)


def build_decode_kvcore(inputs: DecodeInputs) -> list:
    kvcore = import_kvcore("mla_decode")
    if inputs.q.is_cuda and not torch._C._dispatch_has_kernel_for_dispatch_key("kvcore::mla_decode", "CUDA"):
        raise Skip("this kvcore build has no MLA CUDA kernel")
    q, latent, bt, sl, scale = inputs.q, inputs.latent, inputs.block_table, inputs.seq_lens, inputs.scale
    out = torch.empty(q.shape[0], q.shape[1], RANK, dtype=q.dtype, device=q.device)
    workspace = kvcore.decode_workspace(q.device) if q.is_cuda else None

    def fn() -> torch.Tensor:
        kvcore.mla_decode(q, latent, bt, sl, scale=scale, out=out, workspace=workspace)
        return out

    before, after = validation_off_while_timed(kvcore)
    return [Prepared(fn=fn, out=out, before_timing=before, after_timing=after)]


def build_decode_torch(inputs: DecodeInputs) -> list:
    kv = inputs.gathered()
    q, scale = inputs.q, inputs.scale
    return [Prepared(fn=lambda: torch_mla_decode(q, kv, scale), notes="latents gathered outside the timing")]


def build_decode_flashinfer(inputs: DecodeInputs) -> list:
    if not inputs.q.is_cuda:
        raise Skip("flashinfer needs CUDA")
    try:
        from flashinfer.mla import BatchMLAPagedAttentionWrapper  # noqa: WPS433
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"flashinfer.mla.BatchMLAPagedAttentionWrapper unavailable: {_first_line(exc)}") from exc
    case, dev = inputs.case, inputs.q.device
    pages_per_seq = inputs.block_table.shape[1]
    qo_indptr = torch.arange(case.batch + 1, dtype=torch.int32, device=dev)
    kv_indptr = torch.arange(case.batch + 1, dtype=torch.int32, device=dev) * pages_per_seq
    kv_indices = inputs.block_table.reshape(-1).contiguous()
    kv_lens = inputs.seq_lens.to(torch.int32)
    q_nope = inputs.q[..., :RANK].contiguous()
    q_pe = inputs.q[..., RANK:].contiguous()
    variants, reasons = [], []
    layouts = [("views", inputs.latent[..., :RANK], inputs.latent[..., RANK:]),
               ("copies", inputs.latent[..., :RANK].contiguous(), inputs.latent[..., RANK:].contiguous())]
    for label, ckv, kpe in layouts:
        try:
            workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=dev)
            wrapper = BatchMLAPagedAttentionWrapper(workspace)
            wrapper.plan(qo_indptr, kv_indptr, kv_indices, kv_lens, case.num_heads, RANK, ROPE, case.page_size,
                         False, inputs.scale, inputs.q.dtype, inputs.latent.dtype)

            def fn(wrapper=wrapper, ckv=ckv, kpe=kpe) -> torch.Tensor:
                return wrapper.run(q_nope, q_pe, ckv, kpe)

            fn()
            variants.append(Prepared(fn=fn, notes=f"c_kv/k_pe as {label} of the latent cache; plan outside the timing"))
            break  # the views worked: no need for copies
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"{label}: {_first_line(exc)}")
    if not variants:
        raise Skip("; ".join(reasons))
    return variants


# ---- latent projection ---------------------------------------------------------------------------


@dataclass
class ProjectInputs:
    hidden: torch.Tensor
    w_dkv: torch.Tensor
    norm_weight: torch.Tensor
    cos_sin: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    num_pages: int
    case: MlaProjectCase


def make_project_inputs(case: MlaProjectCase, device: torch.device, seed: int = 0) -> ProjectInputs:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = {"dtype": case.dtype, "device": device, "generator": gen}
    hidden = torch.randn(case.tokens, case.d_model, **kw)
    w_dkv = torch.randn(case.d_model, WIDTH, **kw) * case.d_model**-0.5
    norm_weight = 1.0 + 0.1 * torch.randn(RANK, **kw)
    max_pos = 4096
    inv_freq = 10000.0 ** (-torch.arange(0, ROPE, 2, dtype=torch.float64) / ROPE)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None]
    cos_sin = torch.cat([angles.cos(), angles.sin()], 1).float().to(device)
    positions = torch.randint(0, max_pos, (case.tokens,), device=device, generator=gen)
    num_pages = math.ceil(case.tokens / case.page_size) + 1
    slots = torch.randperm(num_pages * case.page_size, device=device, generator=gen)[: case.tokens]
    return ProjectInputs(hidden, w_dkv, norm_weight, cos_sin, positions, slots, num_pages, case)


def torch_latent_project(x: ProjectInputs, cache: torch.Tensor, compute: Optional[torch.dtype] = None) -> torch.Tensor:
    """The unfused torch sequence (interleaved RoPE); returns the written rows ``[T, 576]``."""
    h, w = x.hidden, x.w_dkv
    if compute is not None:
        h, w = h.to(compute), w.to(compute)
    kv = h @ w
    c_kv = torch.nn.functional.rms_norm(kv[:, :RANK], (RANK,), x.norm_weight.to(kv.dtype), eps=1e-6)
    pe = kv[:, RANK:].float()
    table = x.cos_sin[x.positions]
    cos, sin = table[:, : ROPE // 2], table[:, ROPE // 2 :]
    a, b = pe[:, 0::2], pe[:, 1::2]
    k_pe = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(1).to(kv.dtype)
    rows = torch.cat([c_kv, k_pe], dim=1)
    cache.view(-1, WIDTH).index_put_((x.slots,), rows.to(cache.dtype))
    return rows


def build_project_kvcore(x: ProjectInputs) -> list:
    kvcore = import_kvcore("mla_latent_project")
    if x.hidden.is_cuda and not torch._C._dispatch_has_kernel_for_dispatch_key("kvcore::mla_latent_project", "CUDA"):
        raise Skip("this kvcore build has no MLA CUDA kernel")
    cache = torch.empty(x.num_pages, x.case.page_size, WIDTH, dtype=x.hidden.dtype, device=x.hidden.device)
    flat = cache.view(-1, WIDTH)
    # The check needs the written rows gathered in token order; that gather is a kernel of its own
    # (several microseconds against a few for the op), so it runs for the check only, not timed.
    gather = [True]

    def fn() -> torch.Tensor:
        kvcore.mla_latent_project(x.hidden, x.w_dkv, x.norm_weight, x.cos_sin, x.positions, cache, x.slots)
        return flat[x.slots] if gather[0] else cache

    no_validation, restore = validation_off_while_timed(kvcore)

    def before() -> None:
        gather[0] = False
        no_validation()

    def after() -> None:
        gather[0] = True
        restore()

    return [Prepared(fn=fn, out=cache, before_timing=before, after_timing=after)]


def build_project_torch(x: ProjectInputs) -> list:
    cache = torch.empty(x.num_pages, x.case.page_size, WIDTH, dtype=x.hidden.dtype, device=x.hidden.device)
    return [Prepared(fn=lambda: torch_latent_project(x, cache), out=cache, notes="matmul, rms_norm, rope, index_put_")]


# ---- running -----------------------------------------------------------------------------------

DECODE_BUILDERS = {"kvcore": build_decode_kvcore, "flashinfer": build_decode_flashinfer, "torch": build_decode_torch}
PROJECT_BUILDERS = {"kvcore": build_project_kvcore, "torch": build_project_torch}


def run(case: Case, impl_names: Sequence[str], ctx: RunContext) -> list:
    """Time each implementation on one case; one row per implementation (skips and errors too)."""
    if isinstance(case, MlaDecodeCase):
        inputs = make_decode_inputs(case, ctx.device, seed=ctx.seed)
        ref = torch_mla_decode(inputs.q.float(), inputs.gathered().float(), inputs.scale)
        builders = DECODE_BUILDERS
    else:
        inputs = make_project_inputs(case, ctx.device, seed=ctx.seed)
        scratch = torch.empty(inputs.num_pages, case.page_size, WIDTH, dtype=torch.float32, device=ctx.device)
        ref = torch_latent_project(inputs, scratch, compute=torch.float32)
        builders = PROJECT_BUILDERS
    try:
        return runner.time_all(GROUP, case, impl_names, ctx, lambda name: _builder(name, builders, inputs), ref,
                               TOLERANCE.get(case.dtype, 2e-2))
    finally:
        del inputs
        ctx.free_memory()


def _builder(name: str, builders: dict, inputs):
    def build():
        if name not in builders:
            raise Skip(f"{name} has no implementation of this op")
        return builders[name](inputs)

    return build


__all__ = ["GROUP", "MlaDecodeCase", "MlaProjectCase", "cases", "impls", "known_impls", "run", "torch_mla_decode",
           "torch_latent_project"]
