"""Benchmark group ``block``, Block Transformer part: the token decoder's prefill attention
(``kvcore.token_decoder_attention``) against its peers.

A case is B sequences of S tokens cut into N = B * S / L blocks of L tokens, each block with P
prefix slots: q ``[N, L, Hq, D]``, k/v ``[N, P + L, Hkv, D]``. Token i of a block attends to the
block's P slots and its tokens 0..i.

Bytes that must be moved per call: q + k + v read, out written,
``(2 * N * L * Hq + 2 * N * (P + L) * Hkv) * D * itemsize``; FLOPs (the unmasked products only):
``4 * N * Hq * D * L * (P + (L + 1) / 2)``.

Implementations (each gets its inputs in the layout it wants, rearranged once before timing):

* ``kvcore``: ``token_decoder_attention`` on ``[N, L, Hq, D]`` / ``[N, P + L, Hkv, D]``, output
  preallocated, index validation off while timed (as a serving engine runs it).
* ``flex_attention``: torch's compiled flex_attention over each sequence flattened to S queries
  and ``S / L * (P + L)`` keys, with the equivalent mask (block-diagonal with prefix:
  ``q // L == kv // (P + L)`` and ``kv % (P + L) <= P + q % L``) as a block mask built outside
  the timing; its output stays in its own ``[B, Hq, S, D]`` layout.
* ``sdpa-tiny``: ``F.scaled_dot_product_attention`` with the N blocks as a batch of tiny
  sequences (``[N, H, L, D]`` against ``[N, H, P + L, D]``) and an explicit ``[L, P + L]`` mask.
* ``torch``: plain matmul, masked softmax (fp32), matmul, on the same tiny-sequence layout.

Every output is checked against an fp32 evaluation of the plain-torch form before it is timed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from . import runner
from .harness import RunContext, dtype_suffix
from .peers import Prepared, Skip, _first_line, import_kvcore, validation_off_while_timed

GROUP = "block"


# Max abs error against the fp32 reference that an output may have and still be timed.
# Max abs error allowed against the fp32 reference before a peer is timed. bf16 is looser than in
# the decode group: outputs here reach |4| (a block's few keys give peaky softmax rows), where one
# bf16 rounding is up to 1.6e-2, and the plain-torch peer rounds its probabilities to bf16 too
# (measured 0.023 on the H100 for both issue shapes).
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}

GPU_IMPLS = ["kvcore", "flex_attention", "sdpa-tiny", "torch"]
CPU_IMPLS = ["kvcore", "sdpa-tiny", "torch"]


@dataclass(frozen=True)
class TokenDecoderCase:
    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    seq_len: int  # S tokens per sequence, a multiple of block_length
    block_length: int  # L
    prefix: int  # P
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.seq_len % self.block_length:
            raise ValueError(f"seq_len ({self.seq_len}) must be a multiple of block_length ({self.block_length})")

    @property
    def name(self) -> str:
        heads = (f"H{self.num_q_heads}" if self.num_q_heads == self.num_kv_heads
                 else f"Hq{self.num_q_heads} Hkv{self.num_kv_heads}")
        s = (f"token-decoder B{self.batch} {heads} D{self.head_dim} S{self.seq_len} "
             f"L{self.block_length} P{self.prefix}")
        s += dtype_suffix(self.dtype)
        return s

    @property
    def blocks(self) -> int:
        return self.batch * self.seq_len // self.block_length

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """q + k + v read and out written."""
        n, length, p, d = self.blocks, self.block_length, self.prefix, self.head_dim
        return (2 * n * length * self.num_q_heads + 2 * n * (p + length) * self.num_kv_heads) * d * self.itemsize

    @property
    def flops(self) -> float:
        length, p = self.block_length, self.prefix
        return 4.0 * self.blocks * self.num_q_heads * self.head_dim * length * (p + (length + 1) / 2)


def cases(device: torch.device, quick: bool) -> list:
    """The issue's two shapes on a GPU (smaller ones with ``quick``); small fp32/bf16 ones on CPU."""
    device = torch.device(device)
    if device.type == "cuda" and not quick:
        return [TokenDecoderCase(32, 12, 12, 64, 8192, 4, 2), TokenDecoderCase(8, 16, 16, 128, 16384, 16, 2)]
    if device.type == "cuda":
        return [TokenDecoderCase(4, 12, 12, 64, 2048, 4, 2), TokenDecoderCase(2, 16, 16, 128, 4096, 16, 2)]
    return [
        TokenDecoderCase(2, 4, 4, 64, 256, 4, 2, dtype=torch.float32),
        TokenDecoderCase(1, 8, 2, 128, 256, 16, 2, dtype=torch.float32),
        TokenDecoderCase(2, 4, 4, 64, 256, 4, 2, dtype=torch.bfloat16),
    ]


def impls(device: torch.device) -> list:
    """Implementations run by default on this device, in report column order."""
    return list(GPU_IMPLS if torch.device(device).type == "cuda" else CPU_IMPLS)


def known_impls() -> list:
    return list(BUILDERS)


def token_decoder_mask(block_length: int, prefix: int, device: torch.device) -> torch.Tensor:
    """``[L, P + L]`` bool: token i of a block sees key j (P slots, then L tokens) iff j <= P + i.
    (The same as ``kvcore.reference.token_decoder_mask``; defined here so that this module does
    not need the compiled ops.)"""
    rows = torch.arange(block_length, device=device)[:, None]
    return torch.arange(prefix + block_length, device=device)[None, :] <= rows + prefix


@dataclass
class TokenDecoderInputs:
    q: torch.Tensor  # [N, L, Hq, D]
    k: torch.Tensor  # [N, P + L, Hkv, D]
    v: torch.Tensor
    case: TokenDecoderCase
    scale: float

    def tiny(self) -> tuple:
        """q ``[N, Hq, L, D]``, k/v ``[N, Hkv, P + L, D]`` (contiguous copies) and the ``[L, P + L]`` mask."""
        mask = token_decoder_mask(self.case.block_length, self.case.prefix, self.q.device)
        return (self.q.transpose(1, 2).contiguous(), self.k.transpose(1, 2).contiguous(),
                self.v.transpose(1, 2).contiguous(), mask)


def make_inputs(case: TokenDecoderCase, device: torch.device, seed: int = 0) -> TokenDecoderInputs:
    """Random (never zero) q, k, v of the case."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    kw = {"dtype": case.dtype, "device": device, "generator": gen}
    n, length, p, d = case.blocks, case.block_length, case.prefix, case.head_dim
    q = torch.randn(n, length, case.num_q_heads, d, **kw)
    k = torch.randn(n, p + length, case.num_kv_heads, d, **kw)
    v = torch.randn(n, p + length, case.num_kv_heads, d, **kw)
    return TokenDecoderInputs(q, k, v, case, scale=d**-0.5)


def tiny_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-torch masked attention of tiny sequences: q ``[N, Hq, L, D]``, k/v ``[N, Hkv, P + L, D]``,
    mask ``[L, P + L]`` -> ``[N, L, Hq, D]`` (q's dtype). The query heads of a KV head are
    stacked as extra rows so K/V are read once per KV head; scores and softmax in fp32."""
    n, hq, length, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.reshape(n, hkv, g * length, d)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [N, Hkv, G * L, P + L]
    scores = scores.masked_fill(~mask.repeat(g, 1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.to(v.dtype), v)  # [N, Hkv, G * L, D]
    return out.view(n, hq, length, d).transpose(1, 2).to(q.dtype)


def reference_output(inputs: TokenDecoderInputs) -> torch.Tensor:
    """fp32 result of the plain-torch form (the correctness yardstick), ``[N, L, Hq, D]``."""
    q, k, v, mask = inputs.tiny()
    return tiny_attention(q.float(), k.float(), v.float(), mask, inputs.scale).contiguous()


# ---- implementations ---------------------------------------------------------------------------


def build_kvcore(inputs: TokenDecoderInputs) -> list:
    kvcore = import_kvcore("token_decoder_attention")
    if inputs.q.is_cuda and not kvcore.cuda_kernels_built():
        raise Skip("this kvcore build has no CUDA kernels (built without nvcc?)")
    q, k, v, scale = inputs.q, inputs.k, inputs.v, inputs.scale
    out = torch.empty_like(q)

    def fn() -> torch.Tensor:
        kvcore.token_decoder_attention(q, k, v, scale=scale, out=out)
        return out

    before, after = validation_off_while_timed(kvcore)
    return [Prepared(fn=fn, out=out, before_timing=before, after_timing=after)]


def build_sdpa_tiny(inputs: TokenDecoderInputs) -> list:
    q, k, v, mask = inputs.tiny()
    gqa = q.shape[1] != k.shape[1]
    scale = inputs.scale

    def fn() -> torch.Tensor:
        kw = {"enable_gqa": True} if gqa else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw).transpose(1, 2)

    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        raise Skip(_first_line(exc)) from exc
    return [Prepared(fn=fn)]


def build_torch(inputs: TokenDecoderInputs) -> list:
    q, k, v, mask = inputs.tiny()
    scale = inputs.scale
    return [Prepared(fn=lambda: tiny_attention(q, k, v, mask, scale))]


def build_flex_attention(inputs: TokenDecoderInputs) -> list:
    if not inputs.q.is_cuda:
        raise Skip("flex_attention is benchmarked on CUDA only (its CPU path compiles slowly)")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise Skip(f"torch.nn.attention.flex_attention unavailable: {_first_line(exc)}") from exc
    case = inputs.case
    b, s, length, p = case.batch, case.seq_len, case.block_length, case.prefix
    nb = s // length
    hq, hkv, d = case.num_q_heads, case.num_kv_heads, case.head_dim
    # Each sequence flattened: S queries, nb * (P + L) keys (every block's slots and tokens).
    qf = inputs.q.view(b, nb * length, hq, d).transpose(1, 2).contiguous()
    kf = inputs.k.view(b, nb * (p + length), hkv, d).transpose(1, 2).contiguous()
    vf = inputs.v.view(b, nb * (p + length), hkv, d).transpose(1, 2).contiguous()

    def mask_mod(batch, head, q_idx, kv_idx):
        same_block = (q_idx // length) == (kv_idx // (p + length))
        return same_block & ((kv_idx % (p + length)) <= p + q_idx % length)

    try:
        block_mask = create_block_mask(mask_mod, None, None, nb * length, nb * (p + length), device=qf.device)
        compiled = torch.compile(flex_attention, dynamic=False)
        kw = {"enable_gqa": True} if hq != hkv else {}

        def fn() -> torch.Tensor:
            # [B, Hq, S, D], left in flex_attention's layout (the check compares it with the
            # reference in that layout, see _reference_in_layout), so no copy is timed.
            return compiled(qf, kf, vf, block_mask=block_mask, scale=inputs.scale, **kw)

        fn()
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"flex_attention failed: {_first_line(exc)}") from exc
    return [Prepared(fn=fn, notes="compiled; block mask built outside the timing")]


def _reference_in_layout(name: str, ref: torch.Tensor, case: TokenDecoderCase) -> torch.Tensor:
    """The reference ``[N, L, Hq, D]`` viewed in the layout implementation ``name`` returns."""
    if name == "flex_attention":  # [B, Hq, S, D]
        return ref.view(case.batch, case.seq_len, case.num_q_heads, case.head_dim).transpose(1, 2)
    return ref


BUILDERS = {
    "kvcore": build_kvcore,
    "flex_attention": build_flex_attention,
    "sdpa-tiny": build_sdpa_tiny,
    "torch": build_torch,
}


def run(case: TokenDecoderCase, impl_names: Sequence[str], ctx: RunContext) -> list:
    """Time each implementation on one case; one row per implementation (skips and errors too)."""
    return runner.run_case(GROUP, case, impl_names, ctx, BUILDERS, make_inputs, reference_output,
                           TOLERANCE.get(case.dtype, 2e-2),
                           ref_in_layout=lambda name, ref: _reference_in_layout(name, ref, case))


__all__ = [
    "GROUP",
    "TokenDecoderCase",
    "TokenDecoderInputs",
    "cases",
    "impls",
    "known_impls",
    "make_inputs",
    "reference_output",
    "run",
    "tiny_attention",
]
