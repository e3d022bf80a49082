"""DeepSeek-V2/V3 multi-head latent attention (MLA): a layer's inference path on kvcore's ops.

MLA (DeepSeek-AI 2024) caches one latent row per token and layer, ``R + P`` wide (``R =
kv_lora_rank`` normalised c_KV columns, then ``P = qk_rope_head_dim`` roped k_pe columns: 512 +
64 for DeepSeek), instead of per-head K and V. Per head ``h``, with ``W_UK[h]``
``[qk_nope, R]`` and ``W_UV[h]`` ``[v_head, R]`` the two halves of ``kv_b_proj``:

    k_h = [W_UK[h] c_kv, k_pe],  v_h = W_UV[h] c_kv,  logits = scale * (q_nope . k_nope + q_pe . k_pe)

Pieces:

* :class:`MLAConfig`: dimensions (DeepSeek-V2 defaults; ``deepseek_v2_lite()``, ``deepseek_v3()``).
* :class:`MLALatentCache`: the paged latent cache ``[num_pages, page_size, R + P]`` per layer,
  with the page allocator and sequence bookkeeping of :class:`kvcore.PagedKVCache`;
  :meth:`MLALatentCache.step` reserves a step's tokens once for all layers.
* :class:`MLAAttention`: the layer (``nn.Module``, Hugging Face DeepSeek parameter names):
  query path (``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``, or ``q_proj`` without a query
  LoRA; RoPE on the rope part), the latent projection into the cache
  (:func:`kvcore.mla_latent_project`), and

  - **decode** (one new token per sequence), the *absorbed* form: ``q_nope`` is multiplied by
    ``W_UK`` into the latent space (``[H, R]``), concatenated with ``q_pe`` and attended over the
    cached latents by :func:`kvcore.mla_decode`; the ``[H, R]`` result goes through ``W_UV``
    and ``o_proj``. The absorbed weights (``W_UK`` ``[H, qk_nope, R]`` and ``W_UV^T``
    ``[H, R, v_head]``) are precomputed from ``kv_b_proj`` and refreshed when it changes.
  - **prefill** (several new tokens per sequence), the *non-absorbed* form: the sequence's
    latents (prefix and new tokens, read back from the cache after the projection wrote them)
    are up-projected to explicit per-head K (``[H, L, qk_nope + P]``) and V (``[H, L, v_head]``)
    and attended with ``torch.nn.functional.scaled_dot_product_attention`` under a causal mask
    offset by the prefix length. With many new tokens this costs less than the absorbed form,
    whose per-token work is ``R + P = 576`` wide instead of ``qk_nope + P = 192``.

Not covered: YaRN rope scaling and its softmax mscale (pass a custom ``cos_sin`` table and
``softmax_scale`` to reproduce them), tensor parallelism, and FP8 weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .cache import PagedKVCache
from .reference import rope_cos_sin

__all__ = ["MLAAttention", "MLAConfig", "MLALatentCache", "MLAStep", "apply_rope"]


@dataclass(frozen=True)
class MLAConfig:
    """Dimensions of one MLA layer (defaults: DeepSeek-V2).

    Attributes:
        hidden_size: model width ``d_model``.
        num_heads: attention heads ``H``.
        q_lora_rank: rank of the query down-projection (``None``: a plain ``q_proj``, as in
            DeepSeek-V2-Lite).
        kv_lora_rank: ``R``, width of the normalised c_KV latent.
        qk_nope_head_dim: per-head query/key width without RoPE.
        qk_rope_head_dim: ``P``, per-head RoPE width (the shared k_pe's width).
        v_head_dim: per-head value width.
        rope_theta: RoPE base.
        max_position: rows of the RoPE table (positions must stay below it).
        rms_norm_eps: epsilon of the two RMSNorms.
        interleaved_rope: DeepSeek's pairwise-interleaved RoPE (True) or GPT-NeoX's half split.
        softmax_scale: default ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5``.
    """

    hidden_size: int = 5120
    num_heads: int = 128
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    max_position: int = 4096
    rms_norm_eps: float = 1e-6
    interleaved_rope: bool = True
    softmax_scale: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"q_lora_rank must be None or a positive int, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.v_head_dim > self.kv_lora_rank + self.qk_rope_head_dim:
            raise ValueError("v_head_dim must not exceed kv_lora_rank + qk_rope_head_dim")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps must be a positive finite float, got {self.rms_norm_eps}")
        if self.softmax_scale is not None and not (math.isfinite(self.softmax_scale) and self.softmax_scale > 0):
            raise ValueError(f"softmax_scale must be None or a positive finite float, got {self.softmax_scale}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of a cached latent row, ``kv_lora_rank + qk_rope_head_dim`` (576 for DeepSeek)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else self.qk_head_dim**-0.5

    @classmethod
    def deepseek_v2(cls, **overrides) -> "MLAConfig":
        """DeepSeek-V2 (236B): d_model 5120, 128 heads, q LoRA 1536."""
        return cls(**overrides)

    @classmethod
    def deepseek_v2_lite(cls, **overrides) -> "MLAConfig":
        """DeepSeek-V2-Lite: d_model 2048, 16 heads, no query LoRA."""
        return cls(**{"hidden_size": 2048, "num_heads": 16, "q_lora_rank": None, **overrides})

    @classmethod
    def deepseek_v3(cls, **overrides) -> "MLAConfig":
        """DeepSeek-V3: d_model 7168, 128 heads, q LoRA 1536."""
        return cls(**{"hidden_size": 7168, "num_heads": 128, **overrides})


@dataclass
class MLAStep:
    """Where one forward step's new tokens go, shared by every layer of the step.

    ``num_tokens[i]`` new tokens of sequence ``i`` (concatenated in that order in the hidden
    states); ``positions`` / ``slot_mapping`` ``[T]`` int64; ``block_table`` ``[B, max_pages]``
    int32 and ``seq_lens`` ``[B]`` int32 (lengths including the new tokens); ``host_seq_lens``
    optionally the same lengths as host ints, which the decode path passes to
    :func:`kvcore.mla_decode` as ``plan_seq_lens`` (:meth:`MLALatentCache.step` fills it; a CUDA
    graph captured around the decode keeps the capture step's plan).
    """

    num_tokens: list[int]
    positions: Tensor
    slot_mapping: Tensor
    block_table: Tensor
    seq_lens: Tensor
    host_seq_lens: Optional[list[int]] = None
    # Set by MLALatentCache.step: (its block_table, its seq_lens, the cache's num_pages, page_size).
    # A decode whose step still holds exactly those tensors, against a latent cache with at least
    # those pages of that size, skips re-checking their contents (a device->host sync a layer on
    # a GPU). A step built by hand, copied with dataclasses.replace (not an init field, so the copy
    # has none) or given other tables keeps the checks.
    _issued: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def _trusted_for(self, latent_cache: Tensor) -> bool:
        issued = self._issued
        return (issued is not None and self.block_table is issued[0] and self.seq_lens is issued[1]
                and latent_cache.dim() == 3 and latent_cache.shape[0] >= issued[2]
                and latent_cache.shape[1] == issued[3])

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (the absorbed decode path applies)."""
        return all(n == 1 for n in self.num_tokens)


class MLALatentCache:
    """Paged MLA latent cache: ``[num_pages, page_size, kv_lora_rank + rope_dim]`` per layer.

    The page allocator and sequence bookkeeping are those of :class:`kvcore.PagedKVCache`
    (``add_sequence``, ``free``, ``seq_len``, ``pages_of``, ``reserve``, ``block_table``,
    ``seq_lens``, ``used_pages``, ``free_pages`` behave the same); it is used with one KV head of
    width 1, so its own K/V storage is ``1 / (kv_lora_rank + rope_dim)`` of one latent layer.

    Args:
        num_layers: layers (one latent tensor each).
        num_pages, page_size: pages per layer and tokens per page (64 is DeepSeek's choice).
        kv_lora_rank, rope_dim: latent layout (512 + 64).
        dtype, device: of the latent storage (the layer's dtype).
    """

    def __init__(
        self,
        num_layers: int,
        *,
        num_pages: int,
        page_size: int = 64,
        kv_lora_rank: int = 512,
        rope_dim: int = 64,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        self._alloc = PagedKVCache(1, 1, 1, num_pages=num_pages, page_size=page_size, dtype=dtype, device=device)
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        for name, value in (("kv_lora_rank", kv_lora_rank), ("rope_dim", rope_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_layers = num_layers
        self.num_pages = self._alloc.num_pages
        self.page_size = self._alloc.page_size
        self.kv_lora_rank = kv_lora_rank
        self.rope_dim = rope_dim
        self.dtype = dtype
        self.device = self._alloc.device
        shape = (self.num_pages, self.page_size, kv_lora_rank + rope_dim)
        # torch.empty on purpose: a slot is only read after it was written.
        self._latent = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    def latent(self, layer: int) -> Tensor:
        """The latent tensor of ``layer`` ``[num_pages, page_size, kv_lora_rank + rope_dim]``."""
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return self._latent[layer]

    # Allocator and bookkeeping: delegated.
    def add_sequence(self) -> int:
        return self._alloc.add_sequence()

    def free(self, seq_id: int) -> None:
        self._alloc.free(seq_id)

    def seq_len(self, seq_id: int) -> int:
        return self._alloc.seq_len(seq_id)

    def pages_of(self, seq_id: int) -> list[int]:
        return self._alloc.pages_of(seq_id)

    def reserve(self, seq_ids: Sequence[int], num_tokens: Sequence[int]) -> Tensor:
        return self._alloc.reserve(seq_ids, num_tokens)

    def block_table(self, seq_ids: Sequence[int]) -> Tensor:
        return self._alloc.block_table(seq_ids)

    def seq_lens(self, seq_ids: Sequence[int]) -> Tensor:
        return self._alloc.seq_lens(seq_ids)

    @property
    def used_pages(self) -> int:
        return self._alloc.used_pages

    @property
    def free_pages(self) -> int:
        return self._alloc.free_pages

    def step(self, seq_ids: Sequence[int], num_tokens: Sequence[int]) -> MLAStep:
        """Reserve ``num_tokens[i]`` new tokens for each sequence and describe where they go.

        Call once per forward step, before the layers run; every layer then writes its latents
        at the same slots. Raises like :meth:`kvcore.PagedKVCache.reserve` (nothing changes).
        """
        seq_ids = list(seq_ids)
        starts = [self.seq_len(s) for s in seq_ids]
        slots = self.reserve(seq_ids, num_tokens)
        counts = [int(n) for n in num_tokens]
        positions = torch.cat(
            [torch.arange(s, s + n, dtype=torch.int64) for s, n in zip(starts, counts)]
            or [torch.zeros(0, dtype=torch.int64)]
        )
        lens = [self.seq_len(s) for s in seq_ids]  # after the reservation: including the new tokens
        step = MLAStep(counts, self._alloc._upload(positions), slots, self.block_table(seq_ids),
                       self.seq_lens(seq_ids), lens)
        step._issued = (step.block_table, step.seq_lens, self.num_pages, self.page_size)
        return step

    def memory_report(self) -> dict:
        """Bytes of latent storage and per token (all layers)."""
        per_token = self.num_layers * (self.kv_lora_rank + self.rope_dim) * self._latent[0].element_size()
        return {"allocated_bytes": per_token * self.num_pages * self.page_size, "bytes_per_token": per_token}


def apply_rope(x: Tensor, positions: Tensor, cos_sin: Tensor, interleaved: bool) -> Tensor:
    """RoPE of ``x`` ``[T, ..., P]`` at ``positions`` ``[T]`` (fp32 math, x's dtype out).

    Same rotation as the latent projection's k_pe (see :func:`kvcore.reference.rope`): pairs
    ``(2i, 2i+1)`` when ``interleaved``, else ``(i, i + P/2)``; ``cos_sin`` ``[max_pos, P]``.
    """
    half = x.shape[-1] // 2
    table = cos_sin[positions.long()]  # [T, P]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    c, s = table[:, :half].reshape(shape), table[:, half:].reshape(shape)
    xf = x.float()
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
        return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2).to(x.dtype)
    a, b = xf[..., :half], xf[..., half:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1).to(x.dtype)


class MLAAttention(nn.Module):
    """One MLA attention layer, inference only (see the module docstring for the two paths).

    Parameters follow Hugging Face's DeepSeek-V2 names and ``nn.Linear`` layout ``[out, in]``:
    ``q_a_proj``, ``q_a_layernorm``, ``q_b_proj`` (or ``q_proj``), ``kv_a_proj_with_mqa``
    (``[R + P, d_model]``), ``kv_a_layernorm``, ``kv_b_proj`` (``[H * (qk_nope + v_head), R]``),
    ``o_proj``. With ``interleaved_rope`` the rope columns are in DeepSeek's interleaved order
    (as in the released checkpoints).

    Args:
        config: the dimensions.
        dtype, device: of the parameters (the latent cache must use the same dtype).
        cos_sin: optional ``[max_position, P]`` float32 RoPE table (default: plain RoPE from
            ``rope_theta``; see :func:`kvcore.reference.rope_cos_sin`).
    """

    def __init__(
        self,
        config: MLAConfig,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        cos_sin: Optional[Tensor] = None,
    ) -> None:
        super().__init__()
        c = self.config = config
        kw = {"bias": False, "dtype": dtype, "device": device}
        h = c.num_heads
        if c.q_lora_rank is not None:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, **kw)
            self.q_a_layernorm = nn.RMSNorm(c.q_lora_rank, eps=c.rms_norm_eps, dtype=dtype, device=device)
            self.q_b_proj = nn.Linear(c.q_lora_rank, h * c.qk_head_dim, **kw)
        else:
            self.q_proj = nn.Linear(c.hidden_size, h * c.qk_head_dim, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.latent_dim, **kw)
        self.kv_a_layernorm = nn.RMSNorm(c.kv_lora_rank, eps=c.rms_norm_eps, dtype=dtype, device=device)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), **kw)
        self.o_proj = nn.Linear(h * c.v_head_dim, c.hidden_size, **kw)
        if cos_sin is None:
            cos_sin = rope_cos_sin(c.max_position, c.qk_rope_head_dim, c.rope_theta)
        if cos_sin.dim() != 2 or cos_sin.shape[1] != c.qk_rope_head_dim:
            raise ValueError(f"cos_sin must be [max_position, {c.qk_rope_head_dim}], got {tuple(cos_sin.shape)}")
        self.register_buffer("cos_sin", cos_sin.to(device=device, dtype=torch.float32).contiguous(), persistent=False)
        self._absorbed_key: Optional[tuple] = None

    # ---------------------------------------------------------------- weights

    def _absorbed(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(w_dkv [d_model, R + P], w_uk [H, qk_nope, R], w_uv_t [H, R, v_head])``, rebuilt
        whenever ``kv_a_proj_with_mqa`` or ``kv_b_proj`` changed (in place or replaced)."""
        wa, wb = self.kv_a_proj_with_mqa.weight, self.kv_b_proj.weight
        key = (wa.data_ptr(), wa._version, wb.data_ptr(), wb._version)
        if key != self._absorbed_key:
            c = self.config
            with torch.no_grad():
                w_dkv = wa.detach().t().contiguous()
                wkv_b = wb.detach().view(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
                w_uk = wkv_b[:, : c.qk_nope_head_dim].contiguous()
                w_uv_t = wkv_b[:, c.qk_nope_head_dim :].transpose(1, 2).contiguous()
            self._absorbed_cache = (w_dkv, w_uk, w_uv_t)
            self._absorbed_key = key
        return self._absorbed_cache

    # ---------------------------------------------------------------- pieces

    def query(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(q_nope [T, H, qk_nope], q_pe [T, H, P] roped)`` of ``hidden`` ``[T, d_model]``."""
        c = self.config
        if c.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        else:
            q = self.q_proj(hidden)
        q = q.view(hidden.shape[0], c.num_heads, c.qk_head_dim)
        q_pe = apply_rope(q[..., c.qk_nope_head_dim :], positions, self.cos_sin, c.interleaved_rope)
        return q[..., : c.qk_nope_head_dim], q_pe

    def project_latents(self, hidden: Tensor, latent_cache: Tensor, step: MLAStep) -> None:
        """Write the step's latents (``kvcore.mla_latent_project``) into ``latent_cache``."""
        w_dkv = self._absorbed()[0]
        ops.mla_latent_project(
            hidden, w_dkv, self.kv_a_layernorm.weight.detach(), self.cos_sin, step.positions, latent_cache,
            step.slot_mapping, eps=self.config.rms_norm_eps, interleaved_rope=self.config.interleaved_rope,
        )

    # ---------------------------------------------------------------- forward paths

    @torch.no_grad()
    def forward(self, hidden: Tensor, latent_cache: Tensor, step: MLAStep) -> Tensor:
        """``hidden`` ``[T, d_model]`` (the step's new tokens, sequence by sequence) -> ``[T, d_model]``.

        Uses :meth:`decode` when every sequence adds one token, else :meth:`prefill`.
        """
        return self.decode(hidden, latent_cache, step) if step.is_decode else self.prefill(hidden, latent_cache, step)

    def _check(self, hidden: Tensor, latent_cache: Tensor, step: MLAStep) -> None:
        c = self.config
        if hidden.dim() != 2 or hidden.shape[1] != c.hidden_size:
            raise ValueError(f"hidden must be [tokens, {c.hidden_size}], got {tuple(hidden.shape)}")
        if hidden.shape[0] != sum(step.num_tokens):
            raise ValueError(f"hidden has {hidden.shape[0]} tokens but the step adds {sum(step.num_tokens)}")
        if latent_cache.dim() != 3 or latent_cache.shape[2] != c.latent_dim:
            raise ValueError(f"latent_cache must be [num_pages, page_size, {c.latent_dim}], got {tuple(latent_cache.shape)}")

    @torch.no_grad()
    def decode(self, hidden: Tensor, latent_cache: Tensor, step: MLAStep) -> Tensor:
        """Absorbed decode: ``hidden`` ``[B, d_model]``, one new token per sequence -> ``[B, d_model]``."""
        self._check(hidden, latent_cache, step)
        if not step.is_decode:
            raise ValueError(f"decode needs one new token per sequence, got num_tokens {step.num_tokens}")
        c = self.config
        _, w_uk, w_uv_t = self._absorbed()
        self.project_latents(hidden, latent_cache, step)
        q_nope, q_pe = self.query(hidden, step.positions)
        q_abs = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, R]: W_UK folded into q
        q = torch.cat([q_abs, q_pe], dim=-1).contiguous()  # [B, H, R + P]
        with ops._trusted_indices() if step._trusted_for(latent_cache) else contextlib.nullcontext():
            o_lat = ops.mla_decode(q, latent_cache, step.block_table, step.seq_lens, scale=c.scale,
                                   v_dim=c.kv_lora_rank, plan_seq_lens=step.host_seq_lens)
        o = torch.bmm(o_lat.transpose(0, 1), w_uv_t).transpose(0, 1)  # [B, H, v_head]: W_UV on the output
        return self.o_proj(o.reshape(hidden.shape[0], c.num_heads * c.v_head_dim))

    @torch.no_grad()
    def prefill(self, hidden: Tensor, latent_cache: Tensor, step: MLAStep) -> Tensor:
        """Non-absorbed prefill (explicit per-head K/V, SDPA): ``hidden`` ``[T, d_model]`` -> ``[T, d_model]``.

        Sequence ``i``'s ``num_tokens[i]`` new tokens attend causally to its whole cached
        history (earlier chunks included), read back from ``latent_cache``.
        """
        self._check(hidden, latent_cache, step)
        c = self.config
        _, w_uk, w_uv_t = self._absorbed()
        self.project_latents(hidden, latent_cache, step)
        q_nope, q_pe = self.query(hidden, step.positions)
        q_all = torch.cat([q_nope, q_pe], dim=-1)  # [T, H, qk_head]
        page_size = latent_cache.shape[1]
        lens = step.seq_lens.tolist()
        outs, t0 = [], 0
        for b, n in enumerate(step.num_tokens):
            if n == 0:
                continue
            length = int(lens[b])
            pos = torch.arange(length, device=latent_cache.device)
            rows = latent_cache[step.block_table[b].long()[pos // page_size], pos % page_size]  # [L, R + P]
            c_kv, k_pe = rows[:, : c.kv_lora_rank], rows[:, c.kv_lora_rank :]
            k_nope = torch.einsum("lr,hdr->hld", c_kv, w_uk)  # [H, L, qk_nope]
            v = torch.einsum("lr,hrd->hld", c_kv, w_uv_t)  # [H, L, v_head]
            k = torch.cat([k_nope, k_pe.unsqueeze(0).expand(c.num_heads, -1, -1)], dim=-1)
            q = q_all[t0 : t0 + n].transpose(0, 1)  # [H, n, qk_head]
            # Query i sits at position length - n + i and sees keys 0 .. length - n + i.
            mask = pos.unsqueeze(0) <= (length - n + torch.arange(n, device=pos.device)).unsqueeze(1)
            o = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                               scale=c.scale)[0]
            outs.append(o.transpose(0, 1).reshape(n, c.num_heads * c.v_head_dim))
            t0 += n
        o = torch.cat(outs) if outs else hidden.new_zeros(0, c.num_heads * c.v_head_dim)
        return self.o_proj(o)
