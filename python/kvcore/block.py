"""Block Transformer inference on kvcore ops (Ho et al. 2024, "Block Transformer: Global-to-Local
Language Modeling for Fast Inference").

The model, as the paper describes it:

* **Embedder**: each block of ``block_length`` (``L``) tokens becomes one block embedding, the
  concatenation of the ``L`` token embeddings of size ``d_model / L`` (the paper's lookup-table
  embedder).
* **Block decoder** (lower layers, global): a causal transformer over block embeddings. Its
  output at block position ``b`` has seen blocks ``0 .. b-1`` and is the *context embedding* of
  block ``b``. Here position 0 holds a learned start embedding, so block 0 has a context too.
  Its KV cache holds one entry per block: ``L`` times fewer entries than a token-level cache.
* **Token decoder** (upper layers, local): for each block, the context embedding is expanded by
  a linear map into ``expansion_ratio`` (``P``) prefix vectors, followed by the block's token
  embeddings; causal attention runs only inside this ``P + L`` sequence. The output at the last
  prefix slot predicts the block's token 0, the output at token ``j`` predicts token ``j + 1``.
  No attention crosses blocks, so the token decoder keeps no global cache: only the current
  block's ``P + j`` entries.

Both halves are pre-norm transformer layers (RMSNorm, GQA attention, SwiGLU MLP) with learned
absolute position embeddings (block positions for the block decoder, slot positions
``0 .. P + L - 1`` for the token decoder).

Two implementations share one set of random weights (:class:`BlockTransformerWeights`):

* :class:`KvcoreBlockTransformer` runs inference on kvcore: block-decoder prefill with torch SDPA
  (ordinary causal attention over block embeddings, K/V written to a :class:`PagedKVCache` with
  one entry per block) and block-decoder decode with :func:`kvcore.gqa_decode` on that cache;
  token-decoder prefill with :func:`kvcore.token_decoder_attention` for all blocks at once, and
  token-decoder decode with :func:`kvcore.gqa_decode` on a cache of one page of ``P + L`` slots
  per sequence, emptied at every block boundary.
* :class:`TorchBlockTransformer` is the plain-torch form (explicit masked attention, full
  recomputation at each step), the test oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .cache import PagedKVCache

__all__ = [
    "BlockTransformerConfig",
    "BlockTransformerWeights",
    "KvcoreBlockTransformer",
    "TorchBlockTransformer",
]


@dataclass(frozen=True)
class BlockTransformerConfig:
    """Shape of a Block Transformer.

    Attributes:
        vocab_size: tokens in the vocabulary.
        d_model: hidden size of both decoders; a multiple of ``block_length``.
        num_heads, num_kv_heads, head_dim: attention heads (GQA: ``num_heads`` a multiple of
            ``num_kv_heads``) and their size, the same in both decoders.
        block_length: tokens per block (``L``).
        expansion_ratio: prefix slots made from a block's context embedding (``P`` >= 1).
        block_layers, token_layers: layers of the block decoder and of the token decoder.
        mlp_hidden: hidden size of the SwiGLU MLPs.
        max_blocks: longest context in blocks (block-decoder positions are learned).
        norm_eps: RMSNorm epsilon.
    """

    vocab_size: int = 97
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    block_length: int = 4
    expansion_ratio: int = 2
    block_layers: int = 2
    token_layers: int = 2
    mlp_hidden: int = 128
    max_blocks: int = 64
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "block_length",
                     "expansion_ratio", "block_layers", "token_layers", "mlp_hidden", "max_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.d_model % self.block_length:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of block_length ({self.block_length}): the embedder "
                "concatenates block_length token embeddings of size d_model / block_length"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def prefix(self) -> int:
        """``P``, the number of prefix slots (the expansion ratio)."""
        return self.expansion_ratio


def _layer_weights(cfg: BlockTransformerConfig, gen: torch.Generator) -> dict[str, Tensor]:
    d, hq, hkv, dh, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_hidden

    def lin(fan_in: int, fan_out: int) -> Tensor:
        return torch.randn(fan_in, fan_out, generator=gen) / math.sqrt(fan_in)

    return {
        "attn_norm": 1.0 + 0.1 * torch.randn(d, generator=gen),
        "wq": lin(d, hq * dh),
        "wk": lin(d, hkv * dh),
        "wv": lin(d, hkv * dh),
        "wo": lin(hq * dh, d),
        "mlp_norm": 1.0 + 0.1 * torch.randn(d, generator=gen),
        "w_gate": lin(d, f),
        "w_up": lin(d, f),
        "w_down": lin(f, d),
    }


@dataclass
class BlockTransformerWeights:
    """The parameters of a Block Transformer (plain tensors, row-major ``x @ W`` linear maps).

    Attributes:
        config: the shape.
        token_embed_block: ``[vocab, d_model / L]``, the embedder's lookup table.
        block_start: ``[d_model]``, the block decoder's input at position 0.
        block_pos: ``[max_blocks + 1, d_model]``, block-decoder position embeddings.
        block_layers: per-layer dicts (``attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down``).
        block_norm: ``[d_model]``, the block decoder's final RMSNorm.
        prefix_proj: ``[d_model, P * d_model]``, context embedding -> ``P`` prefix vectors.
        token_embed: ``[vocab, d_model]``, the token decoder's token embeddings.
        token_pos: ``[P + L, d_model]``, token-decoder slot position embeddings.
        token_layers: per-layer dicts, as ``block_layers``.
        token_norm: ``[d_model]``, final RMSNorm before the LM head.
        lm_head: ``[d_model, vocab]``.
    """

    config: BlockTransformerConfig
    token_embed_block: Tensor
    block_start: Tensor
    block_pos: Tensor
    block_layers: list[dict[str, Tensor]]
    block_norm: Tensor
    prefix_proj: Tensor
    token_embed: Tensor
    token_pos: Tensor
    token_layers: list[dict[str, Tensor]]
    token_norm: Tensor
    lm_head: Tensor

    @classmethod
    def random(
        cls,
        config: BlockTransformerConfig,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "BlockTransformerWeights":
        """Random weights (drawn on the CPU from ``seed``, then moved), scaled so activations stay O(1)."""
        gen = torch.Generator().manual_seed(seed)
        cfg = config
        d, p, length = cfg.d_model, cfg.prefix, cfg.block_length
        w = cls(
            config=cfg,
            token_embed_block=torch.randn(cfg.vocab_size, d // length, generator=gen),
            block_start=torch.randn(d, generator=gen),
            block_pos=0.5 * torch.randn(cfg.max_blocks + 1, d, generator=gen),
            block_layers=[_layer_weights(cfg, gen) for _ in range(cfg.block_layers)],
            block_norm=1.0 + 0.1 * torch.randn(d, generator=gen),
            prefix_proj=torch.randn(d, p * d, generator=gen) / math.sqrt(d),
            token_embed=torch.randn(cfg.vocab_size, d, generator=gen),
            token_pos=0.5 * torch.randn(p + length, d, generator=gen),
            token_layers=[_layer_weights(cfg, gen) for _ in range(cfg.token_layers)],
            token_norm=1.0 + 0.1 * torch.randn(d, generator=gen),
            lm_head=torch.randn(d, cfg.vocab_size, generator=gen) / math.sqrt(d),
        )
        return w.to(dtype=dtype, device=device)

    def to(self, *, dtype: Optional[torch.dtype] = None, device: torch.device | str | None = None) -> "BlockTransformerWeights":
        """A copy with every tensor converted (``dtype`` and/or ``device``)."""

        def conv(t: Tensor) -> Tensor:
            return t.to(dtype=dtype or t.dtype, device=device or t.device)

        return BlockTransformerWeights(
            config=self.config,
            token_embed_block=conv(self.token_embed_block),
            block_start=conv(self.block_start),
            block_pos=conv(self.block_pos),
            block_layers=[{k: conv(v) for k, v in layer.items()} for layer in self.block_layers],
            block_norm=conv(self.block_norm),
            prefix_proj=conv(self.prefix_proj),
            token_embed=conv(self.token_embed),
            token_pos=conv(self.token_pos),
            token_layers=[{k: conv(v) for k, v in layer.items()} for layer in self.token_layers],
            token_norm=conv(self.token_norm),
            lm_head=conv(self.lm_head),
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.device


# ---- pieces shared by both implementations (no attention in here) -----------------------------


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x  # statistics in fp32 or better
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _mlp(x: Tensor, layer: dict[str, Tensor], eps: float) -> Tensor:
    h = _rms_norm(x, layer["mlp_norm"], eps)
    return (F.silu(h @ layer["w_gate"]) * (h @ layer["w_up"])) @ layer["w_down"]


def _qkv(x: Tensor, layer: dict[str, Tensor], cfg: BlockTransformerConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Projections of ``x`` ``[..., d]`` to q ``[..., Hq, Dh]``, k, v ``[..., Hkv, Dh]``."""
    h = _rms_norm(x, layer["attn_norm"], cfg.norm_eps)
    lead = x.shape[:-1]
    q = (h @ layer["wq"]).view(*lead, cfg.num_heads, cfg.head_dim)
    k = (h @ layer["wk"]).view(*lead, cfg.num_kv_heads, cfg.head_dim)
    v = (h @ layer["wv"]).view(*lead, cfg.num_kv_heads, cfg.head_dim)
    return q, k, v


def _block_embeddings(w: BlockTransformerWeights, blocks: Tensor) -> Tensor:
    """Embedder: ``blocks`` ``[B, nb, L]`` token ids -> ``[B, nb, d_model]`` (concatenation)."""
    b, nb, length = blocks.shape
    return w.token_embed_block[blocks].reshape(b, nb, length * w.token_embed_block.shape[1])


def _prefix(w: BlockTransformerWeights, context: Tensor) -> Tensor:
    """Prefix expansion: context embeddings ``[..., d]`` -> ``[..., P, d]`` with slot positions."""
    cfg = w.config
    p = (context @ w.prefix_proj).view(*context.shape[:-1], cfg.prefix, cfg.d_model)
    return p + w.token_pos[: cfg.prefix]


def _check_tokens(tokens: Tensor, cfg: BlockTransformerConfig, name: str = "tokens") -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.shape[1] < 1:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be a [batch, length >= 1] tensor of token ids, got {shape}")
    if tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an integer tensor (int64 or int32), got {tokens.dtype}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
        raise ValueError(f"{name} must hold ids in [0, vocab_size = {cfg.vocab_size})")


# ---- the plain-torch form (the oracle) -----------------------------------------------------------


class TorchBlockTransformer:
    """The Block Transformer in plain torch: explicit masked attention, no cache, no kvcore ops.

    Every call recomputes from the full token sequence, so it is slow and obviously right; tests
    compare :class:`KvcoreBlockTransformer` against it. ``compute_dtype`` (default: the weights'
    dtype) is the precision it runs in, e.g. float64 for a tight oracle.
    """

    def __init__(self, weights: BlockTransformerWeights, compute_dtype: Optional[torch.dtype] = None) -> None:
        self.w = weights.to(dtype=compute_dtype) if compute_dtype is not None else weights
        self.config = weights.config

    def _attention(self, x: Tensor, layer: dict[str, Tensor], mask: Tensor) -> Tensor:
        """Attention of a batch of sequences ``x`` ``[B, S, d]`` under a boolean ``[S, S]`` mask."""
        cfg = self.config
        q, k, v = _qkv(x, layer, cfg)  # [B, S, H, Dh]
        group = cfg.num_heads // cfg.num_kv_heads
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(cfg.head_dim)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(*x.shape[:2], cfg.num_heads * cfg.head_dim)
        return out @ layer["wo"]

    def _stack(self, x: Tensor, layers: list[dict[str, Tensor]]) -> Tensor:
        s = x.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        for layer in layers:
            x = x + self._attention(x, layer, causal)
            x = x + _mlp(x, layer, self.config.norm_eps)
        return x

    @torch.no_grad()
    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits ``[B, T, vocab]`` (``logits[:, t]`` predicts token ``t + 1``) of ``tokens`` ``[B, T]``."""
        w, cfg = self.w, self.config
        _check_tokens(tokens, cfg)
        bsz, t_len = tokens.shape
        length, p = cfg.block_length, cfg.prefix
        full = t_len // length
        if full + 1 > cfg.max_blocks:
            raise ValueError(f"tokens ({t_len}) need {full + 1} blocks, more than max_blocks ({cfg.max_blocks})")
        tokens = tokens.long()
        # Block decoder over [start, block 0, ..., block full-1]: output b = context of block b.
        emb = _block_embeddings(w, tokens[:, : full * length].view(bsz, full, length))
        x = torch.cat([w.block_start.expand(bsz, 1, -1), emb], dim=1) + w.block_pos[: full + 1]
        context = _rms_norm(self._stack(x, w.block_layers), w.block_norm, cfg.norm_eps)  # [B, full + 1, d]
        # Token decoder, one block at a time: [P prefix vectors, the block's tokens so far].
        predictions = []  # predictions[m] predicts token m
        for b in range(full + 1):
            toks = tokens[:, b * length : min(t_len, (b + 1) * length)]
            seq = torch.cat([_prefix(w, context[:, b]), w.token_embed[toks] + w.token_pos[p : p + toks.shape[1]]], 1)
            y = _rms_norm(self._stack(seq, w.token_layers), w.token_norm, cfg.norm_eps) @ w.lm_head
            predictions.append(y[:, p - 1 : p - 1 + length])  # last prefix slot, then tokens 0..L-2
        flat = torch.cat(predictions, dim=1)
        return flat[:, 1 : t_len + 1]

    @torch.no_grad()
    def generate(self, tokens: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy decoding by full recomputation; returns the ``[B, max_new_tokens]`` new tokens."""
        seq = tokens.long()
        new = []
        for _ in range(max_new_tokens):
            nxt = self.forward(seq)[:, -1].argmax(-1)
            new.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        return torch.stack(new, dim=1) if new else seq[:, :0]


# ---- the kvcore form ---------------------------------------------------------------------------


class KvcoreBlockTransformer:
    """Block Transformer inference on kvcore ops, with a block-level global cache.

    Usage: ``logits = model.prefill(tokens)`` (``[B, T]`` prompt, all of one length), then
    ``model.decode_step(next_ids)`` per generated token, or ``model.generate(tokens, n)``.

    Caches (both :class:`kvcore.PagedKVCache`):

    * ``block_cache``: the block decoder's K/V, one entry per block (plus the start entry),
      ``block_layers`` layers, pages of ``block_page_size`` entries.
    * ``token_cache``: the token decoder's K/V of the *current* block only: one page of
      ``P + L`` slots per sequence, emptied whenever a block completes.

    Args:
        weights: the model (dtype bfloat16/float16 on CUDA; float32 too on CPU).
        max_batch: most sequences per ``prefill``.
        block_page_size: page size of the block cache.
    """

    def __init__(self, weights: BlockTransformerWeights, *, max_batch: int = 8, block_page_size: int = 16) -> None:
        cfg = weights.config
        self.w = weights
        self.config = cfg
        self.max_batch = max_batch
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        pages_per_seq = math.ceil((cfg.max_blocks + 1) / block_page_size)
        self.block_cache = PagedKVCache(
            cfg.block_layers, cfg.num_kv_heads, cfg.head_dim, num_pages=max_batch * pages_per_seq,
            page_size=block_page_size, dtype=weights.dtype, device=weights.device,
        )
        self.token_cache = PagedKVCache(
            cfg.token_layers, cfg.num_kv_heads, cfg.head_dim, num_pages=max_batch,
            page_size=cfg.prefix + cfg.block_length, dtype=weights.dtype, device=weights.device,
        )
        self._block_seqs: list[int] = []
        self._token_seqs: list[int] = []
        self._length = 0  # tokens seen so far (prompt + generated)
        self._block_tokens: Optional[Tensor] = None  # [B, j] tokens of the current block

    # -- cache bookkeeping ---------------------------------------------------------------------

    def _reset(self, batch: int) -> None:
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch must be in [1, max_batch = {self.max_batch}], got {batch}")
        for s in self._block_seqs:
            self.block_cache.free(s)
        for s in self._token_seqs:
            self.token_cache.free(s)
        self._block_seqs = [self.block_cache.add_sequence() for _ in range(batch)]
        self._token_seqs = []

    def _new_token_block(self) -> None:
        """Drop the finished block's token-decoder cache: only the current block is ever kept."""
        for s in self._token_seqs:
            self.token_cache.free(s)
        self._token_seqs = [self.token_cache.add_sequence() for _ in self._block_seqs]

    # -- layers --------------------------------------------------------------------------------

    def _out(self, attn: Tensor, layer: dict[str, Tensor]) -> Tensor:
        cfg = self.config
        return attn.reshape(*attn.shape[:-2], cfg.num_heads * cfg.head_dim) @ layer["wo"]

    def _block_decoder_prefill(self, x: Tensor) -> Tensor:
        """Causal attention over block embeddings ``x`` ``[B, nb, d]`` with torch SDPA, writing
        each layer's K/V to ``block_cache`` (one entry per block)."""
        cfg = self.config
        bsz, nb, _ = x.shape
        slots = self.block_cache.reserve(self._block_seqs, [nb] * bsz)
        for i, layer in enumerate(self.w.block_layers):
            q, k, v = _qkv(x, layer, cfg)  # [B, nb, H, Dh]
            self.block_cache._append_reserved(i, k.reshape(bsz * nb, cfg.num_kv_heads, cfg.head_dim),
                                             v.reshape(bsz * nb, cfg.num_kv_heads, cfg.head_dim), slots)
            attn = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale,
                enable_gqa=cfg.num_heads != cfg.num_kv_heads,
            ).transpose(1, 2)
            x = x + self._out(attn, layer)
            x = x + _mlp(x, layer, cfg.norm_eps)
        return _rms_norm(x, self.w.block_norm, cfg.norm_eps)

    def _block_decoder_step(self, x: Tensor) -> Tensor:
        """One new block embedding per sequence ``x`` ``[B, d]``: gqa_decode on ``block_cache``."""
        cfg = self.config
        slots = self.block_cache.reserve(self._block_seqs, [1] * x.shape[0])
        for i, layer in enumerate(self.w.block_layers):
            q, k, v = _qkv(x, layer, cfg)  # [B, H, Dh]
            self.block_cache._append_reserved(i, k, v, slots)
            attn = self.block_cache.decode(i, q.contiguous(), self._block_seqs, scale=self.scale)
            x = x + self._out(attn, layer)
            x = x + _mlp(x, layer, cfg.norm_eps)
        return _rms_norm(x, self.w.block_norm, cfg.norm_eps)

    def _token_decoder_prefill(self, xp: Tensor, xt: Tensor, block_lens: Tensor) -> tuple[Tensor, Tensor, list]:
        """Token decoder over N blocks at once with token_decoder_attention.

        ``xp`` ``[N, P, d]`` prefix vectors, ``xt`` ``[N, L, d]`` token embeddings, ``block_lens``
        ``[N]`` int32. Returns the final hidden states of both and each layer's ``(k, v)``
        ``[N, P + L, Hkv, Dh]``.
        """
        cfg = self.config
        p = cfg.prefix
        kvs = []
        for layer in self.w.token_layers:
            qp, kp, vp = _qkv(xp, layer, cfg)
            qt, kt, vt = _qkv(xt, layer, cfg)
            k = torch.cat([kp, kt], dim=1)  # [N, P + L, Hkv, Dh]: the block's P slots, then its L tokens
            v = torch.cat([vp, vt], dim=1)
            # Prefix rows: causal among the P slots (a "block" of P tokens with no prefix of its own).
            ap = ops.token_decoder_attention(qp.contiguous(), k[:, :p], v[:, :p], scale=self.scale)
            # Token rows: all P slots and the block's tokens so far.
            at = ops.token_decoder_attention(qt.contiguous(), k, v, block_lens, scale=self.scale)
            xp = xp + self._out(ap, layer)
            xt = xt + self._out(at, layer)
            xp = xp + _mlp(xp, layer, cfg.norm_eps)
            xt = xt + _mlp(xt, layer, cfg.norm_eps)
            kvs.append((k, v))
        return xp, xt, kvs

    def _start_block(self, context: Tensor) -> Tensor:
        """Begin a new block from its context embedding ``[B, d]``: run the token decoder over the
        P prefix slots, cache their K/V, and return the logits of the block's token 0 ``[B, V]``."""
        cfg = self.config
        self._new_token_block()
        xp = _prefix(self.w, context)  # [B, P, d]
        slots = self.token_cache.reserve(self._token_seqs, [cfg.prefix] * xp.shape[0])
        for i, layer in enumerate(self.w.token_layers):
            q, k, v = _qkv(xp, layer, cfg)  # [B, P, H, Dh]
            self.token_cache._append_reserved(i, k.reshape(-1, cfg.num_kv_heads, cfg.head_dim),
                                             v.reshape(-1, cfg.num_kv_heads, cfg.head_dim), slots)
            attn = ops.token_decoder_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=self.scale)
            xp = xp + self._out(attn, layer)
            xp = xp + _mlp(xp, layer, cfg.norm_eps)
        return _rms_norm(xp[:, -1], self.w.token_norm, cfg.norm_eps) @ self.w.lm_head

    def _token_step(self, ids: Tensor, index: int) -> Tensor:
        """Token ``index`` of the current block (ids ``[B]``) through the token decoder with
        gqa_decode over the one-page cache (P slots + tokens 0..index); logits ``[B, V]``."""
        cfg = self.config
        x = self.w.token_embed[ids] + self.w.token_pos[cfg.prefix + index]
        slots = self.token_cache.reserve(self._token_seqs, [1] * x.shape[0])
        for i, layer in enumerate(self.w.token_layers):
            q, k, v = _qkv(x, layer, cfg)  # [B, H, Dh]
            self.token_cache._append_reserved(i, k, v, slots)
            attn = self.token_cache.decode(i, q.contiguous(), self._token_seqs, scale=self.scale)
            x = x + self._out(attn, layer)
            x = x + _mlp(x, layer, cfg.norm_eps)
        return _rms_norm(x, self.w.token_norm, cfg.norm_eps) @ self.w.lm_head

    # -- public API ----------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, tokens: Tensor) -> Tensor:
        """Run the prompt ``tokens`` ``[B, T]`` (one length for the batch) and set up the caches.

        Returns next-token logits ``[B, T, vocab]`` (``logits[:, t]`` predicts token ``t + 1``;
        ``logits[:, -1]`` is the first generated token's). Any earlier state is discarded.
        """
        w, cfg = self.w, self.config
        _check_tokens(tokens, cfg)
        bsz, t_len = tokens.shape
        length, p = cfg.block_length, cfg.prefix
        full, rest = divmod(t_len, length)
        if full + 1 > cfg.max_blocks:
            raise ValueError(f"tokens ({t_len}) need {full + 1} blocks, more than max_blocks ({cfg.max_blocks})")
        self._reset(bsz)
        tokens = tokens.to(device=w.device, dtype=torch.long)

        # Block decoder: [start, block 0, ..., block full-1] -> contexts of blocks 0..full.
        emb = _block_embeddings(w, tokens[:, : full * length].view(bsz, full, length))
        x = torch.cat([w.block_start.expand(bsz, 1, -1), emb], dim=1) + w.block_pos[: full + 1]
        context = self._block_decoder_prefill(x)  # [B, full + 1, d]

        # Token decoder over every block, the current (last, partial: `rest` tokens) one included.
        nblk = full + 1
        padded = F.pad(tokens, (0, nblk * length - t_len)).view(bsz, nblk, length)
        xt = (w.token_embed[padded] + w.token_pos[p : p + length]).view(bsz * nblk, length, cfg.d_model)
        xp = _prefix(w, context).reshape(bsz * nblk, p, cfg.d_model)
        lens = torch.full((bsz, nblk), length, dtype=torch.int32)
        lens[:, -1] = rest
        xp, xt, kvs = self._token_decoder_prefill(xp, xt, lens.view(-1).to(w.device))
        yp = _rms_norm(xp[:, -1], w.token_norm, cfg.norm_eps) @ w.lm_head  # predicts token 0 of each block
        yt = _rms_norm(xt[:, :-1], w.token_norm, cfg.norm_eps) @ w.lm_head  # token j predicts j + 1
        flat = torch.cat([yp[:, None], yt], dim=1).view(bsz, nblk * length, cfg.vocab_size)

        # The current block's prefix slots and `rest` tokens go to the token cache; nothing else.
        self._new_token_block()
        slots = self.token_cache.reserve(self._token_seqs, [p + rest] * bsz)
        for i, (k, v) in enumerate(kvs):
            cur_k = k.view(bsz, nblk, p + length, cfg.num_kv_heads, cfg.head_dim)[:, -1, : p + rest]
            cur_v = v.view(bsz, nblk, p + length, cfg.num_kv_heads, cfg.head_dim)[:, -1, : p + rest]
            self.token_cache._append_reserved(i, cur_k.reshape(-1, cfg.num_kv_heads, cfg.head_dim),
                                             cur_v.reshape(-1, cfg.num_kv_heads, cfg.head_dim), slots)
        self._length = t_len
        self._block_tokens = tokens[:, full * length :]
        return flat[:, 1 : t_len + 1]

    @torch.no_grad()
    def decode_step(self, ids: Tensor) -> Tensor:
        """Append one token per sequence (``ids`` ``[B]``) and return the next-token logits ``[B, vocab]``.

        Inside a block the token goes through the token decoder (gqa_decode over the block's
        one-page cache). A token that completes its block is not run through the token decoder
        (its output would predict nothing inside the block); instead the finished block's
        embedding takes one block-decoder step (gqa_decode over the block cache) and the new
        block's prefix slots are computed, whose last output predicts the new block's token 0.
        """
        cfg = self.config
        if self._block_tokens is None:
            raise RuntimeError("decode_step before prefill: call prefill(tokens) first")
        bsz = len(self._block_seqs)
        if not isinstance(ids, Tensor) or ids.shape != (bsz,):
            shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be a [{bsz}] tensor (one token per sequence), got {shape}")
        ids = ids.to(device=self.w.device, dtype=torch.long)
        index = self._length % cfg.block_length  # position of this token in its block
        if index == cfg.block_length - 1 and (self._length + 1) // cfg.block_length + 1 > cfg.max_blocks:
            raise ValueError(f"the context has reached max_blocks ({cfg.max_blocks}) blocks of {cfg.block_length}")
        self._block_tokens = torch.cat([self._block_tokens, ids[:, None]], dim=1)
        self._length += 1
        if index < cfg.block_length - 1:
            return self._token_step(ids, index)
        blocks_done = self._length // cfg.block_length
        x = _block_embeddings(self.w, self._block_tokens[:, None])[:, 0] + self.w.block_pos[blocks_done]
        context = self._block_decoder_step(x)
        self._block_tokens = self._block_tokens[:, :0]
        return self._start_block(context)

    @torch.no_grad()
    def generate(self, tokens: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy decoding: prefill ``tokens`` ``[B, T]``, then one decode step per new token
        but the last (which is returned, not fed back).

        Returns the new tokens ``[B, max_new_tokens]`` (int64).
        """
        logits = self.prefill(tokens)[:, -1]
        new = []
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            new.append(nxt)
            if step + 1 < max_new_tokens:
                logits = self.decode_step(nxt)
        if not new:
            return torch.empty(tokens.shape[0], 0, dtype=torch.long, device=self.w.device)
        return torch.stack(new, dim=1)

    def cache_report(self) -> dict:
        """What the caches hold now, per sequence, against a token-level cache of the same model.

        Keys:
            ``context_tokens``: tokens seen so far (``T``).
            ``global_entries``: block-cache entries, ``1 + T // L`` (the start entry and one per
            complete block); ``global_bytes`` their K/V bytes over the block decoder's layers.
            ``token_level_entries`` / ``token_level_bytes``: the same layers caching every token
            (``T`` entries), as a token-level transformer would.
            ``block_entries_saving``: ``token_level_entries / (global_entries - 1)``, tokens per
            cached block entry, equal to ``block_length`` when ``T % L == 0``.
            ``token_cache_entries``: the token decoder's entries, ``P + T % L`` (the current block
            only), ``token_cache_capacity`` ``P + L`` whatever ``T``; ``token_cache_pages``:
            pages in use over the whole batch (one per sequence); ``token_cache_bytes``.
        """
        cfg = self.config
        if self._block_tokens is None:
            raise RuntimeError("cache_report before prefill: call prefill(tokens) first")
        seq_b, seq_t = self._block_seqs[0], self._token_seqs[0]
        entry_bytes = self.block_cache.memory_report()["bytes_per_token"]  # K+V over all block layers
        token_entry_bytes = self.token_cache.memory_report()["bytes_per_token"]
        global_entries = self.block_cache.seq_len(seq_b)
        t_len = self._length
        complete = global_entries - 1
        return {
            "context_tokens": t_len,
            "block_length": cfg.block_length,
            "global_entries": global_entries,
            "global_bytes": global_entries * entry_bytes,
            "token_level_entries": t_len,
            "token_level_bytes": t_len * entry_bytes,
            "block_entries_saving": (t_len / complete) if complete else None,
            "token_cache_entries": self.token_cache.seq_len(seq_t),
            "token_cache_capacity": self.token_cache.page_size,
            "token_cache_pages": self.token_cache.used_pages,
            "token_cache_bytes": self.token_cache.seq_len(seq_t) * token_entry_bytes,
        }
