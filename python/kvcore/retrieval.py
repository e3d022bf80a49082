"""InfLLM-style memory retrieval on kvcore's existing ops (issue 5, part 1).

InfLLM (Xiao et al., 2024) keeps the first ``n_init`` tokens (attention sinks) and the last
``n_local`` tokens (the local window) of a long context on the GPU, and cuts every token that
leaves the local window into *memory units* of ``block_size`` tokens. Each unit is represented by
a few of its keys (``repr_topk`` representative tokens); a query scores every unit by the dot
product with the unit's representative keys, and attends only to the ``topk`` best units plus the
sinks and the local window. Units live in CPU memory; a GPU cache of ``max_cached_block`` units
holds the recently used ones.

This module builds that pipeline in Python/torch on ops kvcore already has, so it runs on CPU and
CUDA today:

* :func:`representative_keys`, :func:`unit_scores`, :func:`topk_units`: the scoring pieces
  (definitions in :mod:`kvcore.reference`: ``infllm_representative_keys``,
  ``infllm_unit_scores``, ``topk_rows``); scoring and top-k run as the kvcore ops
  ``infllm_unit_scores`` (one pass over the representative keys) and ``topk_rows`` (one CTA per
  row, radix select);
* :class:`QuestPageStats` / :func:`quest_page_scores` / :func:`quest_selection`: Quest's
  upper-bound page selector, feeding ``block_sparse_decode``;
* :class:`InfLLMCache`: sinks + local window + offloaded memory units, with chunked prefill and a
  decode step whose selection is built on the device (a unit -> slot table maps the top units to
  pages of one paged store): one ``block_sparse_decode`` over sinks + units + window when every
  unit is resident (no host sync), else ``gqa_decode`` over the window (overlapping the unit
  loads) merged through the log-sum-exp with ``block_sparse_decode`` over units + sinks.

The representative-score accumulation (the decode kernel writing per-token probabilities) is
still torch ops.

Position rule for distant tokens
    InfLLM does not give retrieved units (or the sinks) their true distance to the current token:
    it treats every token outside the local window as if it sat at one fixed distance from the
    query, equal to the local window size (so the model never sees a relative distance it was not
    trained on). That needs keys cached *before* rotary embedding. kvcore's caches hold keys
    *after* RoPE, rotated at their absolute positions, so this implementation attends to every
    token at its true absolute position (the position at which the caller rotated it). With
    ``topk >=`` the number of units and every unit resident, a decode step therefore equals full
    attention over all tokens at their original positions (``tests/test_retrieval.py``). The
    fixed-distance rule would need a pre-RoPE copy of the unit keys and a second query rotated
    at the fixed distance; it is not implemented.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from . import ops as _kv_ops
from .ops import _ops, decode_workspace, infllm_unit_scores, topk_rows

__all__ = [
    "InfLLMCache",
    "QuestPageStats",
    "quest_page_scores",
    "quest_selection",
    "representative_keys",
    "topk_units",
    "unit_scores",
]

# InfLLM's published configurations (e.g. its Mistral / Llama-3 configs).
DEFAULT_BLOCK_SIZE = 128
DEFAULT_REPR_TOPK = 4
DEFAULT_TOPK = 16
DEFAULT_N_INIT = 128
DEFAULT_N_LOCAL = 4096
DEFAULT_MAX_CACHED_BLOCK = 32
DEFAULT_EXC_BLOCK_SIZE = 512

_REPR_SCORES = ("logit", "prob")
_CACHE_STRATEGIES = ("lru", "decay")


def _shape(t) -> object:
    return tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__


# --------------------------------------------------------------------------------------------
# Scoring pieces
# --------------------------------------------------------------------------------------------


def representative_keys(unit_keys: Tensor, token_scores: Tensor, repr_topk: int = DEFAULT_REPR_TOPK) -> Tensor:
    """Representative key of each memory unit, per KV head.

    For unit ``u`` and KV head ``h`` the ``repr_topk`` tokens with the highest
    ``token_scores[..., u, t, h]`` are chosen and their keys averaged (in float32). InfLLM's
    paper scores token ``m`` by the mean, over the queries that see it in the local window, of
    ``q . k_m``; its public code instead accumulates the softmax probabilities the token gets.
    :class:`InfLLMCache` accumulates either (``repr_score``); this function only ranks.

    Args:
        unit_keys: ``[B, U, block_size, Hkv, D]`` keys of ``U`` units (any float dtype).
        token_scores: ``[B, U, block_size, Hkv]`` float scores of each token.
        repr_topk: representative tokens per unit, in ``[1, block_size]``.

    Returns:
        ``[B, U, Hkv, D]`` in ``unit_keys``' dtype.

    Raises:
        ValueError: wrong ranks, mismatched shapes or ``repr_topk`` out of range.
    """
    if not isinstance(unit_keys, Tensor) or unit_keys.dim() != 5:
        raise ValueError(f"unit_keys must be [B, U, block_size, Hkv, D], got {_shape(unit_keys)}")
    if not isinstance(token_scores, Tensor) or tuple(token_scores.shape) != tuple(unit_keys.shape[:4]):
        raise ValueError(
            f"token_scores must be [B, U, block_size, Hkv] = {tuple(unit_keys.shape[:4])}, got {_shape(token_scores)}"
        )
    block = unit_keys.shape[2]
    if not 1 <= repr_topk <= block:
        raise ValueError(f"repr_topk must be in [1, block_size = {block}], got {repr_topk}")
    idx = token_scores.float().topk(repr_topk, dim=2).indices  # [B, U, r, Hkv]
    idx = idx.unsqueeze(-1).expand(*idx.shape, unit_keys.shape[4])
    chosen = unit_keys.gather(2, idx)  # [B, U, r, Hkv, D]
    return chosen.float().mean(dim=2).to(unit_keys.dtype)


def unit_scores(q: Tensor, repr_keys: Tensor, *, per_kv_head: bool = False) -> Tensor:
    """Relevance of every memory unit to the current query (InfLLM's unit score).

    ``q`` is one decode query ``[B, Hq, D]`` or an execution block ``[B, T, Hq, D]`` (InfLLM
    scores a prefill chunk by the mean of its queries). With ``G = Hq / Hkv`` and query head
    ``hq`` reading KV head ``hq // G``::

        s[b, h, u] = sum_{hq in group h} qbar[b, hq] . repr_keys[b, u, h]
        score[b, u] = sum_h s[b, h, u]         (InfLLM: one set of units for all heads)

    computed in float32.

    Args:
        q: ``[B, Hq, D]`` or ``[B, T, Hq, D]``.
        repr_keys: ``[B, U, Hkv, D]`` (:func:`representative_keys`).
        per_kv_head: return ``s [B, Hkv, U]`` (each KV head chooses its own units) instead of
            ``score [B, U]``.

    Returns:
        float32 ``[B, U]``, or ``[B, Hkv, U]`` with ``per_kv_head``.

    Raises:
        ValueError: wrong ranks, batch / head_dim mismatch, or ``Hq`` not a multiple of ``Hkv``.
    """
    if not isinstance(q, Tensor) or q.dim() not in (3, 4):
        raise ValueError(f"q must be [B, Hq, D] or [B, T, Hq, D], got {_shape(q)}")
    if not isinstance(repr_keys, Tensor) or repr_keys.dim() != 4:
        raise ValueError(f"repr_keys must be [B, U, Hkv, D], got {_shape(repr_keys)}")
    b, hq, d = q.shape[0], q.shape[-2], q.shape[-1]
    hkv = repr_keys.shape[2]
    if repr_keys.shape[0] != b or repr_keys.shape[3] != d:
        raise ValueError(f"repr_keys {tuple(repr_keys.shape)} does not match q {tuple(q.shape)} (batch, head_dim)")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q's {hq} heads must be a multiple of repr_keys' {hkv} KV heads")
    if _fused_scoring_ok(repr_keys, d):
        # kvcore.infllm_unit_scores: one pass over the keys, fp32 accumulation, no host sync.
        if q.dim() == 4:
            qbar = q.float().mean(dim=1)
        elif q.dtype in (repr_keys.dtype, torch.float32):
            qbar = q
        else:
            qbar = q.float()
        keys = repr_keys if repr_keys.stride(-1) == 1 and _inner_dense(repr_keys) else repr_keys.contiguous()
        return infllm_unit_scores(qbar, keys, per_kv_head=per_kv_head)
    qbar = q.float().mean(dim=1) if q.dim() == 4 else q.float()
    qg = qbar.view(b, hkv, hq // hkv, d).sum(dim=2)  # [B, Hkv, D]
    s = torch.einsum("bhd,buhd->bhu", qg, repr_keys.float())
    return s if per_kv_head else s.sum(dim=1)


def _inner_dense(t: Tensor) -> bool:
    """Whether the last three dims of a 4-D tensor are densely packed."""
    _, u, h, d = t.shape
    return (d <= 1 or t.stride(3) == 1) and (h <= 1 or t.stride(2) == d) and (u <= 1 or t.stride(1) == h * d)


def _fused_scoring_ok(repr_keys: Tensor, head_dim: int) -> bool:
    """Whether kvcore.infllm_unit_scores takes these keys (its CUDA kernel wants bf16/fp16 keys,
    a power-of-two head_dim in [8, 256] and 16-byte rows; the CPU kernel takes any)."""
    if repr_keys.device.type == "cpu":
        return repr_keys.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if repr_keys.device.type != "cuda" or repr_keys.dtype not in (torch.bfloat16, torch.float16):
        return False
    ok_dim = 8 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0
    return ok_dim and repr_keys.shape[2] * head_dim <= 16384 and repr_keys.stride(0) % 8 == 0 \
        and repr_keys.data_ptr() % 16 == 0


def topk_units(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best units per row, best first (:func:`kvcore.topk_rows`: one launch, no sync).

    Float32 scores and ``k <= 256`` go to ``kvcore.topk_rows`` (ties towards the lower index,
    NaN below every number); anything else to ``torch.topk``.

    Args:
        scores: ``[..., U]`` float scores (e.g. :func:`unit_scores`), ``U >= 1``.
        k: how many, ``1 <= k <= U``.

    Returns:
        ``(values, indices)``, each ``[..., k]``; indices int64, ordered by descending score.

    Raises:
        ValueError: ``scores`` not a floating tensor with a last dim, or ``k`` out of range.
    """
    if not isinstance(scores, Tensor) or scores.dim() == 0 or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating tensor [..., U], got {_shape(scores)}")
    n = scores.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, U = {n}], got {k}")
    if scores.dtype == torch.float32 and k <= _kv_ops.TOPK_MAX_K:
        rows = scores.reshape(-1, n)
        values, indices = topk_rows(rows, k)
        return values.view(*scores.shape[:-1], k), indices.view(*scores.shape[:-1], k)
    values, indices = scores.topk(k, dim=-1, largest=True, sorted=True)
    return values, indices


# --------------------------------------------------------------------------------------------
# Quest
# --------------------------------------------------------------------------------------------


class QuestPageStats:
    """Quest's per-page, per-channel key bounds, kept up to date as keys are appended.

    ``kmin[page, h, d]`` / ``kmax[page, h, d]`` (float32) are the smallest / largest key channel
    ``d`` of KV head ``h`` over the tokens written to physical ``page`` since its last
    :meth:`reset` (a page with no token has ``+inf`` / ``-inf``).

    Args:
        num_pages, page_size, num_kv_heads, head_dim: the paged cache's geometry.
        device: where the bounds live.
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str = "cpu") -> None:
        for name, val in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.page_size = page_size
        self.kmin = torch.full((num_pages, num_kv_heads, head_dim), math.inf, device=device)
        self.kmax = torch.full((num_pages, num_kv_heads, head_dim), -math.inf, device=device)

    def reset(self, pages: Tensor) -> None:
        """Forget the bounds of physical ``pages`` (1-D integer tensor), e.g. when reallocated."""
        pages = pages.to(device=self.kmin.device, dtype=torch.int64)
        self.kmin[pages] = math.inf
        self.kmax[pages] = -math.inf

    def update(self, k: Tensor, slot_mapping: Tensor) -> None:
        """Fold new keys in (call next to :func:`kvcore.append_paged_kv` with the same slots).

        Args:
            k: ``[N, Hkv, D]`` new keys.
            slot_mapping: ``[N]`` integer flat slots (``page * page_size + offset``); negative
                slots are skipped (as ``append_paged_kv``).

        Raises:
            ValueError: shapes that do not match the stats, or a slot past the last page.
        """
        if not isinstance(k, Tensor) or k.dim() != 3 or tuple(k.shape[1:]) != tuple(self.kmin.shape[1:]):
            raise ValueError(f"k must be [N, {self.kmin.shape[1]}, {self.kmin.shape[2]}], got {_shape(k)}")
        if not isinstance(slot_mapping, Tensor) or tuple(slot_mapping.shape) != (k.shape[0],):
            raise ValueError(f"slot_mapping must be [N = {k.shape[0]}], got {_shape(slot_mapping)}")
        slots = slot_mapping.to(device=self.kmin.device, dtype=torch.int64)
        keep = slots >= 0
        pages = slots[keep] // self.page_size
        if pages.numel() and int(pages.max()) >= self.kmin.shape[0]:
            raise ValueError(f"slot_mapping has a slot past page {self.kmin.shape[0] - 1}")
        kf = k.to(self.kmin.device).float()[keep]
        idx = pages.view(-1, 1, 1).expand_as(kf)
        self.kmin.scatter_reduce_(0, idx, kf, reduce="amin", include_self=True)
        self.kmax.scatter_reduce_(0, idx, kf, reduce="amax", include_self=True)


def quest_page_scores(q: Tensor, kmin: Tensor, kmax: Tensor, block_table: Tensor, seq_lens: Tensor,
                      page_size: int) -> Tensor:
    """Quest's upper bound on each page's attention logit, per (sequence, KV head).

    For query head ``hq`` and a page with bounds ``m, M``: ``sum_d max(q_d * m_d, q_d * M_d)``
    bounds ``q . k`` for every key of the page. Quest scores per query head; with GQA the KV
    group's heads share one selection here, so the bounds of the group's ``G`` heads are summed.

    Args:
        q: ``[B, Hq, D]``; kmin, kmax: ``[num_pages, Hkv, D]`` (:class:`QuestPageStats`).
        block_table: ``[B, max_pages]`` integer; seq_lens: ``[B]`` integer.
        page_size: tokens per page.

    Returns:
        float32 ``[B, Hkv, max_pages]`` indexed by *logical* page; pages at or past
        ``ceil(seq_lens[b] / page_size)`` get ``-inf``. Feed a top-k of it to
        :func:`kvcore.block_sparse.build_selection` as ``chosen_pages``.

    Raises:
        ValueError: wrong ranks or mismatched shapes.
    """
    if not isinstance(q, Tensor) or q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got {_shape(q)}")
    if not isinstance(kmin, Tensor) or not isinstance(kmax, Tensor) or kmin.dim() != 3 or kmin.shape != kmax.shape:
        raise ValueError(f"kmin and kmax must both be [num_pages, Hkv, D], got {_shape(kmin)} and {_shape(kmax)}")
    if not isinstance(block_table, Tensor) or block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table must be [B = {q.shape[0]}, max_pages], got {_shape(block_table)}")
    if not isinstance(seq_lens, Tensor) or tuple(seq_lens.shape) != (q.shape[0],):
        raise ValueError(f"seq_lens must be [B = {q.shape[0]}], got {_shape(seq_lens)}")
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    b, hq, d = q.shape
    hkv = kmin.shape[1]
    if kmin.shape[2] != d or hq % hkv:
        raise ValueError(f"kmin {tuple(kmin.shape)} does not match q {tuple(q.shape)}")
    phys = block_table.to(kmin.device, torch.int64).clamp(0, kmin.shape[0] - 1)  # [B, P]
    lo, hi = kmin[phys], kmax[phys]  # [B, P, Hkv, D]
    qg = q.float().view(b, 1, hkv, hq // hkv, d)
    bound = torch.maximum(qg * lo.unsqueeze(3), qg * hi.unsqueeze(3)).sum(dim=(3, 4))  # [B, P, Hkv]
    used = (seq_lens.to(kmin.device, torch.int64).clamp(min=0) + page_size - 1) // page_size
    live = torch.arange(phys.shape[1], device=kmin.device).view(1, -1) < used.view(-1, 1)
    bound = torch.where(live.unsqueeze(-1), bound, torch.full_like(bound, -math.inf))
    return bound.permute(0, 2, 1).contiguous()


def quest_selection(q: Tensor, stats: QuestPageStats, block_table: Tensor, seq_lens: Tensor, topk: int, *,
                    n_sink_pages: int = 0, n_local_pages: int = 0,
                    max_sel: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Quest's selection for :func:`kvcore.block_sparse_decode`: per (sequence, KV head) the
    ``topk`` logical pages with the highest :func:`quest_page_scores` bound, plus sink and local
    pages, as ``(sel_pages, sel_counts)`` (:func:`kvcore.block_sparse.build_selection`).

    Args:
        q: ``[B, Hq, D]``; stats: the cache's :class:`QuestPageStats`.
        block_table: ``[B, max_pages]`` int32; seq_lens: ``[B]`` int32.
        topk: pages chosen by score (``>= 1``; fewer when a sequence has fewer pages).
        n_sink_pages, n_local_pages, max_sel: as in ``build_selection``.

    Returns:
        ``sel_pages [B, Hkv, max_sel]`` int32 and ``sel_counts [B, Hkv]`` int32.

    Raises:
        ValueError: ``topk < 1`` or the errors of the functions it calls.
    """
    from .block_sparse import build_selection  # noqa: WPS433 (block_sparse imports ops, as we do)

    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    scores = quest_page_scores(q, stats.kmin, stats.kmax, block_table, seq_lens, stats.page_size)
    k = min(topk, scores.shape[2])
    if k == 0:
        chosen = None
    else:
        values, idx = topk_units(scores, k)
        chosen = torch.where(torch.isinf(values), torch.full_like(idx, -1), idx)  # pages past the end
    return build_selection(seq_lens, stats.page_size, num_kv_heads=stats.kmin.shape[1], chosen_pages=chosen,
                           n_sink_pages=n_sink_pages, n_local_pages=n_local_pages,
                           max_pages=block_table.shape[1], max_sel=max_sel)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


class InfLLMCache:
    """One attention layer's InfLLM context memory for a batch of equally long sequences.

    Token ``p`` of every sequence (post-RoPE K/V, appended in order) is

    * a *sink* if ``p < n_init`` (kept on the device, always attended);
    * *recent* while it is not yet in a unit: recent tokens are attended in full, and the oldest
      ``block_size`` of them become memory unit ``u`` (tokens ``n_init + u * block_size`` ..)
      as soon as they have all left the last ``n_local`` tokens. So the local part holds between
      ``n_local`` and ``n_local + block_size - 1`` tokens (InfLLM's window plus the tokens that
      have left it but do not fill a unit yet);
    * in *memory unit* ``u`` afterwards: its K/V in a CPU store (pinned on CUDA), its
      representative key on the device. Units are attended only when selected.

    Storage on ``device``: the recent tokens in a ring of pages of ``block_size`` tokens
    (``local_k/local_v``, read by ``gqa_decode`` through a rotating block table) and a unit pool
    (``pool_k/pool_v``) of ``max_cached_block`` unit slots per sequence followed by each
    sequence's sink pages, read by ``block_sparse_decode``. A unit selected but not resident is
    copied from the CPU store into a slot chosen by ``cache_strategy``:

    * ``"lru"``: the least recently used resident unit not needed by this step is replaced;
    * ``"decay"`` (InfLLM's score-based alternative; the formula is ours): each slot keeps
      ``score <- score_decay * score + (1 if used this step else 0)`` and the lowest score is
      replaced (ties: least recently used).

    On CUDA the copies run on a side stream and overlap the local-window attention; on CPU they
    are plain copies. While every unit is resident the step never leaves the device (see
    :meth:`attend`); otherwise it needs the selected unit ids on the host (one sync per step).
    A decode step that forms a unit also syncs (the unit's K/V go to the CPU store).

    Representative scores (``repr_score``): every query that attends to a recent token adds to
    it, per KV head, either ``q . k`` summed over the group's query heads (``"logit"``; the
    paper's definition is the mean over those queries, so the sum is divided by their count when
    the unit forms) or the softmax probability it received, summed over the group's heads
    (``"prob"``; InfLLM's public code). A token's own query counts.

    Args:
        batch, num_q_heads, num_kv_heads, head_dim: shapes (``num_q_heads % num_kv_heads == 0``).
        max_tokens: the longest context the cache will hold (sizes the CPU store).
        dtype: K/V dtype (bfloat16 / float16, float32 on CPU); device: where attention runs.
        block_size, repr_topk, topk, n_init, n_local, max_cached_block, exc_block_size:
            InfLLM's parameters (defaults from its published configs).
        per_kv_head: each KV head selects its own ``topk`` units (InfLLM: one set for all heads).
        cache_strategy: ``"lru"`` or ``"decay"``; score_decay: the decay in ``(0, 1)``.
        repr_score: ``"logit"`` or ``"prob"``.
        scale: softmax scale, default ``head_dim ** -0.5``.

    Raises:
        ValueError: any bad parameter, naming it.
    """

    def __init__(
        self,
        batch: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_tokens: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        block_size: int = DEFAULT_BLOCK_SIZE,
        repr_topk: int = DEFAULT_REPR_TOPK,
        topk: int = DEFAULT_TOPK,
        n_init: int = DEFAULT_N_INIT,
        n_local: int = DEFAULT_N_LOCAL,
        max_cached_block: int = DEFAULT_MAX_CACHED_BLOCK,
        exc_block_size: int = DEFAULT_EXC_BLOCK_SIZE,
        per_kv_head: bool = False,
        cache_strategy: str = "lru",
        score_decay: float = 0.9,
        repr_score: str = "logit",
        scale: Optional[float] = None,
    ) -> None:
        for name, val in (("batch", batch), ("num_q_heads", num_q_heads), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim), ("max_tokens", max_tokens), ("block_size", block_size),
                          ("topk", topk), ("n_local", n_local), ("max_cached_block", max_cached_block),
                          ("exc_block_size", exc_block_size)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if not isinstance(n_init, int) or n_init < 0:
            raise ValueError(f"n_init must be an int >= 0, got {n_init!r}")
        if not isinstance(repr_topk, int) or not 1 <= repr_topk <= block_size:
            raise ValueError(f"repr_topk must be in [1, block_size = {block_size}], got {repr_topk!r}")
        # Every unit one step selects must be resident at once (per KV head: up to Hkv * topk).
        need = topk * (num_kv_heads if per_kv_head else 1)
        if max_cached_block < need:
            raise ValueError(
                f"max_cached_block ({max_cached_block}) must hold one step's units: topk{' * num_kv_heads' if per_kv_head else ''} = {need}"
            )
        if cache_strategy not in _CACHE_STRATEGIES:
            raise ValueError(f"cache_strategy must be one of {_CACHE_STRATEGIES}, got {cache_strategy!r}")
        if not 0.0 < score_decay < 1.0:
            raise ValueError(f"score_decay must be in (0, 1), got {score_decay}")
        if repr_score not in _REPR_SCORES:
            raise ValueError(f"repr_score must be one of {_REPR_SCORES}, got {repr_score!r}")
        # The ops' own default and check, so that this cache and a direct gqa_decode call get the
        # same scale bits (head_dim ** -0.5 differs from 1 / sqrt(head_dim) in the last bit at 128).
        scale = _kv_ops._resolve_scale(scale, head_dim)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # Name the device by index: tensors report "cuda:0", never bare "cuda", and the step
            # inputs are compared against this.
            device = torch.device("cuda", torch.cuda.current_device())
        if device.type == "cpu" and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32/bfloat16/float16, got {dtype}")
        if device.type == "cuda" and dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be bfloat16/float16 on CUDA, got {dtype}")

        self.batch, self.num_q_heads, self.num_kv_heads, self.head_dim = batch, num_q_heads, num_kv_heads, head_dim
        self.group = num_q_heads // num_kv_heads
        self.max_tokens, self.dtype, self.device = max_tokens, dtype, device
        self.block_size, self.repr_topk, self.topk = block_size, repr_topk, topk
        self.n_init, self.n_local, self.max_cached_block = n_init, n_local, max_cached_block
        self.exc_block_size, self.per_kv_head = exc_block_size, per_kv_head
        self.cache_strategy, self.score_decay, self.repr_score = cache_strategy, score_decay, repr_score
        self.scale = float(scale)

        bs, hkv, d = block_size, num_kv_heads, head_dim
        kw = dict(dtype=dtype, device=device)
        # Sinks: the last pages of the unit pool, so one block_sparse_decode reads units + sinks.
        self.sink_pages = -(-n_init // bs)
        n_slots = batch * max_cached_block + batch * self.sink_pages
        # Recent tokens: at most n_local + bs - 1 before a chunk, plus a chunk of exc_block_size.
        self.ring_pages = -(-(n_local + bs - 1 + exc_block_size) // bs) + 1
        # One paged store holds the unit pool, the sinks and the ring (pool_k / local_k are views
        # of it), so a single block_sparse_decode with one block table can read all three.
        self.n_pool_pages = n_slots
        self.kv_k = torch.zeros(n_slots + batch * self.ring_pages, bs, hkv, d, **kw)
        self.kv_v = torch.zeros(n_slots + batch * self.ring_pages, bs, hkv, d, **kw)
        self.pool_k, self.pool_v = self.kv_k[:n_slots], self.kv_v[:n_slots]
        self.local_k, self.local_v = self.kv_k[n_slots:], self.kv_v[n_slots:]
        ring_tokens = self.ring_pages * bs
        self._acc = torch.zeros(batch, ring_tokens, hkv, dtype=torch.float32, device=device)
        self._acc_n = torch.zeros(ring_tokens, dtype=torch.float32, device=device)
        # Units: K/V on the host (pinned when it feeds a GPU), representative keys on the device.
        self.max_units = max(0, -(-(max_tokens - n_init) // bs))
        pin = device.type == "cuda"
        self.store_k = torch.zeros(batch, self.max_units, bs, hkv, d, dtype=dtype, pin_memory=pin)
        self.store_v = torch.zeros(batch, self.max_units, bs, hkv, d, dtype=dtype, pin_memory=pin)
        self.repr_keys = torch.zeros(batch, self.max_units, hkv, d, **kw)
        self._load_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._loads_pending = False  # copies queued on the load stream since the last wait_loads

        self.length = 0  # tokens appended per sequence
        self.num_units = 0
        self._slot_unit = [[-1] * max_cached_block for _ in range(batch)]  # slot -> unit (-1 free)
        self._unit_slot: list[dict] = [dict() for _ in range(batch)]  # unit -> slot
        self._lru: list[OrderedDict] = [OrderedDict() for _ in range(batch)]  # unit, oldest first
        # Free slots, lowest on top (so units fetched in order into an empty cache get slot == unit).
        self._free = [list(range(max_cached_block - 1, -1, -1)) for _ in range(batch)]
        self._slot_score = torch.zeros(batch, max_cached_block, dtype=torch.float64)
        # Device mirror of _unit_slot: unit -> slot (-1: not resident), kept up to date by fetch
        # and evict, so the step maps selected units to pages without leaving the device.
        self.unit_slot_table = torch.full((batch, max(1, self.max_units)), -1, dtype=torch.int32, device=device)
        self.hits = 0
        self.misses = 0
        #: Use one block_sparse_decode over units + sinks + window when the page layout allows it
        #: (the sinks fill whole pages, and no unit load is in flight); off: always the split form.
        self.fuse_attention = True
        self._step_cache: dict = {}

    # ---- bookkeeping ----------------------------------------------------------------------

    @property
    def recent_start(self) -> int:
        """Position of the oldest recent token (the first token of the next unit)."""
        return self.n_init + self.num_units * self.block_size

    @property
    def num_recent(self) -> int:
        return max(0, self.length - self.recent_start)

    def _ring_slot(self, pos: Tensor | int):
        """Flat token index in one sequence's ring for absolute position ``pos >= n_init``."""
        return (pos - self.n_init) % (self.ring_pages * self.block_size)

    def _local_block_table(self) -> Tensor:
        first = (self.recent_start - self.n_init) // self.block_size
        logical = (first + torch.arange(self.ring_pages, device=self.device)) % self.ring_pages
        rows = torch.arange(self.batch, device=self.device).view(-1, 1) * self.ring_pages
        return (rows + logical.view(1, -1)).to(torch.int32)

    def _sink_phys(self, b: int) -> list[int]:
        base = self.batch * self.max_cached_block + b * self.sink_pages
        return list(range(base, base + self.sink_pages))

    def resident_units(self, b: int) -> dict:
        """``{unit: slot}`` of sequence ``b``'s resident units (a copy)."""
        return dict(self._unit_slot[b])

    def slot_kv(self, b: int, slot: int) -> tuple[Tensor, Tensor]:
        """K and V ``[block_size, Hkv, D]`` held by sequence ``b``'s unit slot (views)."""
        phys = b * self.max_cached_block + slot
        return self.pool_k[phys], self.pool_v[phys]

    # ---- appending ------------------------------------------------------------------------

    def _write(self, k: Tensor, v: Tensor) -> None:
        """Write tokens ``length .. length + T - 1`` (``k, v [B, T, Hkv, D]``) to sinks / ring.

        The indices are built on the device from host integers (no host -> device copy, so a
        decode step that forms no unit never synchronises)."""
        t = k.shape[1]
        dev, bs = self.device, self.block_size
        n_sink = max(0, min(self.n_init, self.length + t) - self.length)  # sinks are a prefix of the T
        rows = torch.arange(self.batch, device=dev).view(-1, 1)
        if n_sink:
            p = torch.arange(self.length, self.length + n_sink, device=dev)
            phys = (self.batch * self.max_cached_block + rows * self.sink_pages) + (p // bs).view(1, -1)
            off = (p % bs).view(1, -1).expand_as(phys)
            self.pool_k[phys, off] = k[:, :n_sink].to(self.dtype)
            self.pool_v[phys, off] = v[:, :n_sink].to(self.dtype)
        if t > n_sink:
            p = torch.arange(self.length + n_sink, self.length + t, device=dev)
            ring = self._ring_slot(p)
            ph = rows * self.ring_pages + (ring // bs).view(1, -1)
            of = (ring % bs).view(1, -1).expand_as(ph)
            self.local_k[ph, of] = k[:, n_sink:].to(self.dtype)
            self.local_v[ph, of] = v[:, n_sink:].to(self.dtype)
            # index_fill_, not `x[:, ring] = 0.0`: assigning a Python scalar through a tensor
            # index copies it from the host and synchronises.
            self._acc.index_fill_(1, ring, 0.0)
            self._acc_n.index_fill_(0, ring, 0.0)
        self.length += t

    def _form_units(self) -> None:
        """Turn the oldest recent block into a unit while it lies wholly outside the window."""
        bs = self.block_size
        while self.num_recent - bs >= self.n_local:
            u = self.num_units
            if u >= self.max_units:
                raise ValueError(f"the context exceeds max_tokens = {self.max_tokens}")
            r0 = self._ring_slot(self.recent_start)
            page = r0 // bs
            rows = torch.arange(self.batch, device=self.device) * self.ring_pages + page
            k, v = self.local_k[rows], self.local_v[rows]  # [B, bs, Hkv, D]
            acc = self._acc[:, r0 : r0 + bs]
            if self.repr_score == "logit":
                acc = acc / self._acc_n[r0 : r0 + bs].clamp(min=1.0).view(1, -1, 1)
            self.repr_keys[:, u] = representative_keys(k.unsqueeze(1), acc.unsqueeze(1), self.repr_topk)[:, 0]
            self.store_k[:, u].copy_(k)
            self.store_v[:, u].copy_(v)
            self.num_units += 1

    def _accumulate(self, logits: Tensor, lse: Tensor, pos_q: Tensor) -> None:
        """Add the attention of queries at positions ``pos_q [T]`` to the recent tokens.

        ``logits [B, Hkv, G, T, R]`` are the scaled ``q . k`` over the recent tokens in position
        order, ``lse [B, Hkv, G, T]`` each query's log-sum-exp over everything it attends to.
        """
        r = logits.shape[-1]
        if r == 0:
            return
        pos_k = torch.arange(self.recent_start, self.recent_start + r, device=self.device)
        sees = pos_k.view(1, -1) <= pos_q.view(-1, 1)  # [T, R]
        if self.repr_score == "logit":
            contrib = torch.where(sees, logits / self.scale, torch.zeros_like(logits)).sum(dim=(2, 3))
        else:
            probs = torch.exp(logits - lse.unsqueeze(-1))
            contrib = torch.where(sees, probs, torch.zeros_like(probs)).sum(dim=(2, 3))
        ring = self._ring_slot(pos_k)
        self._acc[:, ring] += contrib.permute(0, 2, 1)
        self._acc_n[ring] += sees.sum(dim=0).float()

    def _recent_kv(self) -> tuple[Tensor, Tensor]:
        """The recent tokens' K and V ``[B, R, Hkv, D]`` in position order (a gather)."""
        r = self.num_recent
        pos = torch.arange(self.recent_start, self.recent_start + r, device=self.device)
        ring = self._ring_slot(pos)
        ph = torch.arange(self.batch, device=self.device).view(-1, 1) * self.ring_pages + (ring // self.block_size)
        of = (ring % self.block_size).view(1, -1).expand_as(ph)
        return self.local_k[ph, of], self.local_v[ph, of]

    # ---- selection and residency ----------------------------------------------------------

    def select_units(self, q: Tensor) -> Tensor:
        """Top ``min(topk, num_units)`` units for query ``q`` (``[B, Hq, D]`` or ``[B, T, Hq, D]``).

        Returns int64 ``[B, Hkv, k]`` (the same row for every head unless ``per_kv_head``),
        best first.
        """
        if self.num_units == 0:
            return torch.empty(self.batch, self.num_kv_heads, 0, dtype=torch.int64, device=self.device)
        return self._select(q).expand(-1, self.num_kv_heads, -1)

    def _select(self, q: Tensor, reuse: bool = False) -> Tensor:
        """Top units ``[B, Hsel, k]`` int64 on the device (``Hsel`` = Hkv with per_kv_head, else 1).

        ``reuse``: write into buffers kept per ``num_units`` (the decode step's hot path: no
        allocation, two op calls); the result is then overwritten by the next such call.
        """
        if reuse and q.dim() == 3:
            bufs = self._score_buffers(q)
            if bufs is not None:
                keys, scores, values, idx = bufs
                _ops.infllm_unit_scores(q, keys, scores)
                _ops.topk_rows(scores.view(values.shape[0], -1), values, idx)
                return idx.view(self.batch, -1, idx.shape[1])
        scores = unit_scores(q, self.repr_keys[:, : self.num_units], per_kv_head=self.per_kv_head)
        _, idx = topk_units(scores, min(self.topk, self.num_units))
        return idx if self.per_kv_head else idx.unsqueeze(1)

    def _score_buffers(self, q: Tensor):
        """(keys view, scores, values, indices) for the fused ops at this ``num_units``, or None
        when the ops do not take these shapes (then the general path runs)."""
        key = ("score", self.num_units, q.dtype)
        bufs = self._step_cache.get(key, False)
        if bufs is not False:
            return bufs
        for old in [c for c in self._step_cache if c[0] == "score"]:
            del self._step_cache[old]
        keys = self.repr_keys[:, : self.num_units]
        k = min(self.topk, self.num_units)
        bufs = None
        if (_fused_scoring_ok(keys, self.head_dim) and q.dtype in (keys.dtype, torch.float32)
                and 1 <= k <= _kv_ops.TOPK_MAX_K):
            b, hkv, u, dev = self.batch, self.num_kv_heads, self.num_units, self.device
            rows = b * hkv if self.per_kv_head else b
            scores = torch.empty((b, hkv, u) if self.per_kv_head else (b, u), dtype=torch.float32, device=dev)
            values = torch.empty(rows, k, dtype=torch.float32, device=dev)
            idx = torch.empty(rows, k, dtype=torch.int64, device=dev)
            bufs = (keys, scores, values, idx)
        self._step_cache[key] = bufs
        return bufs

    def fetch(self, b: int, units: list[int]) -> list[int]:
        """Make sequence ``b``'s ``units`` resident; returns their slots (same order).

        Hits refresh the unit's recency; misses take a free slot or evict per
        ``cache_strategy`` (never a unit of ``units``). The copies are queued on the load stream
        on CUDA; call :meth:`wait_loads` before reading the pool.

        Raises:
            ValueError: ``b`` out of range, a unit not formed yet, or more distinct units than
                ``max_cached_block``.
        """
        if not 0 <= b < self.batch:
            raise ValueError(f"b must be in [0, batch = {self.batch}), got {b}")
        wanted = list(dict.fromkeys(int(u) for u in units))
        if len(wanted) > self.max_cached_block:
            raise ValueError(f"{len(wanted)} distinct units requested, more than max_cached_block = {self.max_cached_block}")
        for u in wanted:
            if not 0 <= u < self.num_units:
                raise ValueError(f"unit {u} of units does not exist (num_units = {self.num_units})")
        lru, where, slots_of = self._lru[b], self._unit_slot[b], self._slot_unit[b]
        needed = set(wanted)
        score = self._slot_score[b]
        if self.cache_strategy == "decay":
            score.mul_(self.score_decay)
        loads, evicted_units = [], []
        for u in wanted:
            if u in where:
                self.hits += 1
            else:
                self.misses += 1
                slot = self._victim(b, needed)
                old = slots_of[slot]
                if old >= 0:
                    del where[old]
                    lru.pop(old, None)
                    evicted_units.append(old)
                slots_of[slot] = u
                where[u] = slot
                score[slot] = 0.0
                loads.append((u, slot))
            lru.pop(u, None)
            lru[u] = True  # most recent at the end
            if self.cache_strategy == "decay":
                score[where[u]] += 1.0
        self._load(b, loads)
        if loads:
            evicted = [u for u in evicted_units if u not in where]
            self._set_table(b, [u for u, _ in loads] + evicted, [s for _, s in loads] + [-1] * len(evicted))
        return [where[u] for u in units]

    def _set_table(self, b: int, units: list, slots: list) -> None:
        """Write ``unit_slot_table[b, units] = slots`` (stream-ordered; pinned staging on CUDA)."""
        idx = torch.tensor(units, dtype=torch.int64)
        val = torch.tensor(slots, dtype=torch.int32)
        if self.device.type == "cuda":
            idx = idx.pin_memory().to(self.device, non_blocking=True)
            val = val.pin_memory().to(self.device, non_blocking=True)
        self.unit_slot_table[b].index_put_((idx,), val)

    def _victim(self, b: int, needed: set) -> int:
        if self._free[b]:
            return self._free[b].pop()
        if self.cache_strategy == "lru":
            oldest = next(u for u in self._lru[b] if u not in needed)  # the LRU dict is oldest first
            return self._unit_slot[b][oldest]
        order = [u for u in self._lru[b] if u not in needed]
        rank = {u: i for i, u in enumerate(order)}
        best = min(order, key=lambda u: (float(self._slot_score[b, self._unit_slot[b][u]]), rank[u]))
        return self._unit_slot[b][best]

    def _load(self, b: int, loads: list) -> None:
        if not loads:
            return
        if self._load_stream is None:
            units = torch.tensor([u for u, _ in loads], dtype=torch.int64)
            phys = torch.tensor([b * self.max_cached_block + s for _, s in loads], dtype=torch.int64)
            self.pool_k[phys] = self.store_k[b, units]
            self.pool_v[phys] = self.store_v[b, units]
            return
        # The slots may still be read by the previous step's kernels on the compute stream.
        self._load_stream.wait_stream(torch.cuda.current_stream(self.device))
        self._loads_pending = True
        with torch.cuda.stream(self._load_stream):
            # One async copy per unit straight from the pinned store (a host-side gather would
            # make an unpinned, synchronous staging copy).
            for u, s in loads:
                phys = b * self.max_cached_block + s
                self.pool_k[phys].copy_(self.store_k[b, u], non_blocking=True)
                self.pool_v[phys].copy_(self.store_v[b, u], non_blocking=True)

    def wait_loads(self) -> None:
        """Make the compute stream wait for queued unit loads (no-op on CPU)."""
        if self._load_stream is not None and self._loads_pending:
            torch.cuda.current_stream(self.device).wait_stream(self._load_stream)
            self._loads_pending = False

    # ---- attention ------------------------------------------------------------------------

    def _check_step(self, name: str, t: Tensor, heads: int, rank: int) -> None:
        want = (self.batch, heads, self.head_dim) if rank == 3 else (self.batch, -1, heads, self.head_dim)
        ok = isinstance(t, Tensor) and t.dim() == rank and all(w in (-1, s) for w, s in zip(want, t.shape))
        if not ok:
            shape = "[B, H, D]" if rank == 3 else "[B, T, H, D]"
            raise ValueError(f"{name} must be {shape} = {tuple(w if w >= 0 else 'T' for w in want)}, got {_shape(t)}")
        if t.device != self.device:
            raise ValueError(f"{name} must be on {self.device}, got {t.device}")

    def decode(self, q: Tensor, k: Tensor, v: Tensor, *, accumulate: bool = True) -> Tensor:
        """Append one token per sequence and attend with its query.

        Attention is :meth:`attend`'s: with every unit resident, one ``block_sparse_decode`` over
        the selected units, the sinks and the recent tokens (the new one included); with units
        offloaded, ``gqa_decode`` over the recent tokens merged through the lse with
        ``block_sparse_decode`` over the selected units and the sinks.

        Args:
            q: ``[B, Hq, D]`` (post-RoPE); k, v: ``[B, Hkv, D]`` the new token's K/V.
            accumulate: add this query's attention to the recent tokens' representative scores
                (a torch pass over the window; turn off where nothing will form a unit).

        Returns:
            ``[B, Hq, D]`` in the cache's dtype.

        Raises:
            ValueError: shapes / devices that do not match the cache, or a full cache.
        """
        self._check_step("q", q, self.num_q_heads, 3)
        self._check_step("k", k, self.num_kv_heads, 3)
        self._check_step("v", v, self.num_kv_heads, 3)
        if self.length + 1 > self.max_tokens:
            raise ValueError(f"the context exceeds max_tokens = {self.max_tokens}")
        q = q.to(self.dtype)
        self._write(k.unsqueeze(1), v.unsqueeze(1))
        out, lse = self.attend(q)
        r = self.num_recent
        if accumulate and r:
            kr, _ = self._recent_kv()
            b, hkv, g, d = self.batch, self.num_kv_heads, self.group, self.head_dim
            logits = torch.einsum("bhgd,brhd->bhgr", q.float().view(b, hkv, g, d), kr.float()) * self.scale
            pos_q = torch.arange(self.length - 1, self.length, device=self.device)
            self._accumulate(logits.unsqueeze(3), lse.view(b, hkv, g, 1), pos_q)
        self._form_units()
        return out

    def attend(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """The retrieve-and-attend step for query ``q [B, Hq, D]`` over the cache as it is
        (nothing appended, no scores accumulated).

        Units are scored (:func:`kvcore.infllm_unit_scores`) and the top ``topk`` taken
        (:func:`kvcore.topk_rows`) on the device; the unit -> slot table
        (:attr:`unit_slot_table`) turns them into pages of the one paged store, and the
        selection (units + sinks + window, as logical pages) is built on the device too.

        * Every unit resident (the GPU-resident path): no host sync at all. Attention is one
          ``block_sparse_decode`` over units + sinks + window (when the sinks fill whole pages;
          else ``block_sparse_decode`` over units + sinks merged with ``gqa_decode`` over the
          window). Hits are counted as ``B * topk`` (per KV head: ``B * Hkv * topk``); the LRU
          order and decay scores are not refreshed by these steps.
        * Otherwise (offloaded units): the selected ids go to the host once (one sync per step)
          for the residency bookkeeping; missing units are copied on the side stream while
          ``gqa_decode`` over the window runs, then ``block_sparse_decode`` over units + sinks,
          merged through the lse.

        Returns:
            ``(out [B, Hq, D]`` in the cache's dtype, ``lse [B, Hq]`` float32).

        Raises:
            ValueError: ``q`` of the wrong shape / device, or an empty cache.
        """
        self._check_step("q", q, self.num_q_heads, 3)
        if self.length == 0:
            raise ValueError("the cache is empty: append a token before attending")
        q = q.to(self.dtype)
        b, mc, bs = self.batch, self.max_cached_block, self.block_size
        k = min(self.topk, self.num_units)
        idx = self._select(q, reuse=True) if k else None  # [B, Hsel, k] int64, on the device
        loading = False
        if k:
            if all(len(self._unit_slot[i]) == self.num_units for i in range(b)):
                self.hits += b * k * idx.shape[1]
            else:
                misses = self.misses
                sel_host = idx.cpu()  # the offloaded path's one sync: which units to fetch
                for i in range(b):
                    self.fetch(i, list(dict.fromkeys(sel_host[i].reshape(-1).tolist())))
                loading = self.misses > misses and self._load_stream is not None
        n_sink = min(self.length, self.n_init)
        r = self.num_recent
        fused = self.fuse_attention and not loading and (n_sink % bs == 0 or r == 0)
        bt_all, bt_units, bt_ring = self._block_tables()
        ws = decode_workspace(self.device) if self.device.type == "cuda" else None
        out = torch.empty(b, self.num_q_heads, self.head_dim, dtype=self.dtype, device=self.device)
        lse = torch.empty(b, self.num_q_heads, dtype=torch.float32, device=self.device)
        n_sink_pg = -(-n_sink // bs)
        if fused:
            self.wait_loads()  # loads queued by an earlier fetch() (a stream wait, not a host sync)
            sel_pages, sel_counts = self._selection(idx, n_sink_pg, -(-r // bs))
            seq_lens = self._lens(mc * bs + n_sink + r)
            _ops.block_sparse_decode(q, self.kv_k, self.kv_v, bt_all, seq_lens, sel_pages, sel_counts, self.scale,
                                     0.0, out, lse, ws, 0)
            return out, lse
        have_mem = bool(k) or n_sink > 0
        if r:
            _ops.gqa_decode(q, self.kv_k, self.kv_v, bt_ring, self._lens(r), self.scale, -1, 0.0, out, lse, ws, 0)
        if not have_mem:
            return out, lse
        self.wait_loads()
        sel_pages, sel_counts = self._selection(idx, n_sink_pg, 0)
        seq_lens = self._lens(mc * bs + n_sink)
        if not r:
            _ops.block_sparse_decode(q, self.kv_k, self.kv_v, bt_units, seq_lens, sel_pages, sel_counts, self.scale,
                                     0.0, out, lse, ws, 0)
            return out, lse
        out_m, lse_m = torch.empty_like(out), torch.empty_like(lse)
        _ops.block_sparse_decode(q, self.kv_k, self.kv_v, bt_units, seq_lens, sel_pages, sel_counts, self.scale, 0.0,
                                 out_m, lse_m, ws, 0)
        _ops.merge_attention_states(out, lse, out_m, lse_m, out, lse)
        return out, lse

    # ---- device-side step metadata (built with device factories only: no host sync) ---------

    def _block_tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """Block tables of the step over the one paged store (kv_k / kv_v), per sequence b:

        * ``bt_all [B, mc + sink_pages + ring_pages]``: b's unit slots (logical page = slot),
          then its sink pages, then its ring pages from the oldest recent token on;
        * ``bt_units``: the first ``mc + sink_pages`` columns; ``bt_ring``: the last
          ``ring_pages``.

        Rebuilt only when a unit forms (the ring's first page moves), from device aranges.
        """
        key = ("bt", self.num_units)
        hit = self._step_cache.get(key)
        if hit is not None:
            return hit
        for old in [c for c in self._step_cache if c[0] == "bt"]:
            del self._step_cache[old]
        dev, b, mc, sp, rp = self.device, self.batch, self.max_cached_block, self.sink_pages, self.ring_pages
        rows = torch.arange(b, device=dev).view(-1, 1)
        slots = rows * mc + torch.arange(mc, device=dev).view(1, -1)
        sinks = b * mc + rows * sp + torch.arange(sp, device=dev).view(1, -1)
        first = self.num_units % rp  # ring page of recent_start (units start page-aligned in the ring)
        ring = self.n_pool_pages + rows * rp + (first + torch.arange(rp, device=dev).view(1, -1)) % rp
        bt_all = torch.cat([slots, sinks, ring], dim=1).to(torch.int32).contiguous()
        bt_units = bt_all[:, : mc + sp].contiguous()
        bt_ring = bt_all[:, mc + sp :].contiguous()
        self._step_cache[key] = (bt_all, bt_units, bt_ring)
        return bt_all, bt_units, bt_ring

    def _selection(self, idx: Optional[Tensor], n_sink_pg: int, n_ring_pg: int) -> tuple[Tensor, Tensor]:
        """``sel_pages [B, Hkv, k + n_sink_pg + n_ring_pg]`` (logical pages of ``bt_all``: the slots
        of the selected units ``idx [B, Hsel, k]`` (a unit's logical page is its slot, the first
        ``mc`` pages), the sink pages ``mc ..``, the ring pages ``mc + sink_pages ..``) and
        ``sel_counts [B, Hkv]`` (all equal to that width).

        The buffer is kept per shape with its sink and ring columns written once; a step writes
        only the ``k`` unit columns, with one gather from ``unit_slot_table`` straight into them
        (a gather and a concatenation before: one launch less per step). The next step of the
        same shape overwrites it, in stream order like the step's other buffers."""
        b, hkv, mc = self.batch, self.num_kv_heads, self.max_cached_block
        k = 0 if idx is None else idx.shape[2]
        key = ("sel", k, n_sink_pg, n_ring_pg)
        sel = self._step_cache.get(key)
        if sel is None:
            self._trim_step_cache("sel", 8)
            base = mc + self.sink_pages
            tail = torch.cat([torch.arange(mc, mc + n_sink_pg), torch.arange(base, base + n_ring_pg)]).to(torch.int32)
            # Width >= 1 keeps the op's max_sel >= 1 (a count of 0 reads nothing).
            sel = torch.zeros(b, hkv, max(1, k + tail.numel()), dtype=torch.int32, device=self.device)
            sel[:, :, k : k + tail.numel()] = tail.to(self.device)
            self._step_cache[key] = sel
        if k:
            table = self.unit_slot_table.unsqueeze(1).expand(b, hkv, -1)
            torch.gather(table, 2, idx.expand(b, hkv, k), out=sel[:, :, :k])
        width = k + n_sink_pg + n_ring_pg
        ckey = ("cnt", width)
        counts = self._step_cache.get(ckey)
        if counts is None:
            counts = torch.full((b, hkv), width, dtype=torch.int32, device=self.device)
            self._step_cache[ckey] = counts
        return sel, counts

    def _trim_step_cache(self, kind: str, keep: int) -> None:
        """Before adding a ``kind`` entry: drop the oldest ones so at most ``keep`` remain after it."""
        cached = [c for c in self._step_cache if c[0] == kind]  # insertion order: oldest first
        for old in cached[: max(0, len(cached) - keep + 1)]:
            del self._step_cache[old]

    def _lens(self, n: int) -> Tensor:
        # One cached value per use site is enough: repeated attends at one length reuse it.
        hit = self._step_cache.get(("lens", n))
        if hit is None:
            self._trim_step_cache("lens", 4)
            hit = torch.full((self.batch,), n, dtype=torch.int32, device=self.device)
            self._step_cache[("lens", n)] = hit
        return hit

    def evict(self, b: int, units: list[int]) -> None:
        """Drop sequence ``b``'s ``units`` from the device cache (their CPU copies stay); units
        not resident are ignored. Used to measure steps at a given hit rate.

        Raises:
            ValueError: ``b`` out of range.
        """
        if not 0 <= b < self.batch:
            raise ValueError(f"b must be in [0, batch = {self.batch}), got {b}")
        for u in units:
            slot = self._unit_slot[b].pop(int(u), None)
            if slot is not None:
                self._slot_unit[b][slot] = -1
                self._free[b].append(slot)
                self._lru[b].pop(int(u), None)
                self._slot_score[b, slot] = 0.0
                self._set_table(b, [int(u)], [-1])

    def load_memory(self, sink_k: Tensor, sink_v: Tensor, unit_k: Tensor, unit_v: Tensor, repr_keys: Tensor,
                    recent_k: Tensor, recent_v: Tensor) -> None:
        """Fill an empty cache with memory formed elsewhere (a snapshot, or a benchmark's
        synthetic 1M-token memory) instead of prefilling it token by token.

        Args:
            sink_k, sink_v: ``[B, n_init, Hkv, D]``.
            unit_k, unit_v: ``[B, U, block_size, Hkv, D]`` the units' K/V (any device).
            repr_keys: ``[B, U, Hkv, D]`` their representative keys.
            recent_k, recent_v: ``[B, R, Hkv, D]`` with ``n_local <= R < n_local + block_size``.

        Raises:
            ValueError: a non-empty cache, or shapes that do not fit it.
        """
        if self.length:
            raise ValueError("load_memory needs an empty cache")
        bs, hkv, d, b = self.block_size, self.num_kv_heads, self.head_dim, self.batch
        checks = (("sink_k", sink_k, (b, self.n_init, hkv, d)), ("sink_v", sink_v, (b, self.n_init, hkv, d)),
                  ("unit_k", unit_k, (b, -1, bs, hkv, d)), ("unit_v", unit_v, (b, -1, bs, hkv, d)),
                  ("repr_keys", repr_keys, (b, -1, hkv, d)), ("recent_k", recent_k, (b, -1, hkv, d)),
                  ("recent_v", recent_v, (b, -1, hkv, d)))
        for name, t, want in checks:
            if not isinstance(t, Tensor) or t.dim() != len(want) or any(w not in (-1, s) for w, s in zip(want, t.shape)):
                raise ValueError(f"{name} must be {want} (-1: any), got {_shape(t)}")
        n_units, r = unit_k.shape[1], recent_k.shape[1]
        if unit_v.shape[1] != n_units or repr_keys.shape[1] != n_units or recent_v.shape[1] != r:
            raise ValueError("unit_k, unit_v and repr_keys must list the same units; recent_k and recent_v the same tokens")
        if not self.n_local <= r < self.n_local + bs:
            raise ValueError(f"recent_k must hold R in [n_local, n_local + block_size) tokens, got {r}")
        if self.n_init + n_units * bs + r > self.max_tokens:
            raise ValueError(f"the memory exceeds max_tokens = {self.max_tokens}")
        self._write(sink_k, sink_v)
        self.store_k[:, :n_units].copy_(unit_k)
        self.store_v[:, :n_units].copy_(unit_v)
        self.repr_keys[:, :n_units].copy_(repr_keys)
        self.num_units = n_units
        self.length = self.n_init + n_units * bs
        self._write(recent_k, recent_v)

    def prefill(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Append ``T`` tokens per sequence and attend with their queries, in chunks of
        ``exc_block_size`` (InfLLM's execution blocks).

        Each query of a chunk attends causally to the sinks, all recent tokens and the chunk,
        and to the ``topk`` units chosen by the mean of the chunk's queries (resident ones; the
        rest are loaded). Units then form from the tokens that left the window. The attention is
        torch math in float32 (a chunked-prefill kernel is planned).

        Args:
            q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]`` (post-RoPE).

        Returns:
            ``[B, T, Hq, D]`` in the cache's dtype.

        Raises:
            ValueError: shapes / devices that do not match, or ``T`` past ``max_tokens``.
        """
        self._check_step("q", q, self.num_q_heads, 4)
        self._check_step("k", k, self.num_kv_heads, 4)
        self._check_step("v", v, self.num_kv_heads, 4)
        t = q.shape[1]
        if k.shape[1] != t or v.shape[1] != t:
            raise ValueError(f"q, k and v must have the same T, got {q.shape[1]}, {k.shape[1]}, {v.shape[1]}")
        if self.length + t > self.max_tokens:
            raise ValueError(f"the context exceeds max_tokens = {self.max_tokens}")
        outs = [self._prefill_chunk(q[:, i : i + self.exc_block_size], k[:, i : i + self.exc_block_size],
                                    v[:, i : i + self.exc_block_size]) for i in range(0, t, self.exc_block_size)]
        return torch.cat(outs, dim=1) if outs else q.new_empty(q.shape).to(self.dtype)

    def _prefill_chunk(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, t, hq, d = q.shape
        hkv, g, bs = self.num_kv_heads, self.group, self.block_size
        start = self.length
        sel = self.select_units(q)  # [B, Hkv, k] from units formed before this chunk
        self._write(k, v)
        pos_q = torch.arange(start, start + t, device=self.device)
        keys, vals, kpos = [], [], []
        if sel.shape[2]:
            slots = torch.tensor([self.fetch(bi, sel[bi].reshape(-1).tolist()) for bi in range(b)],
                                 dtype=torch.int64).view(b, hkv, -1).to(self.device)
            self.wait_loads()
            phys = slots + (torch.arange(b, device=self.device) * self.max_cached_block).view(-1, 1, 1)
            heads = torch.arange(hkv, device=self.device).view(1, hkv, 1)
            # pool viewed [slot, Hkv, bs, D]: (slot, head) picks one head's unit rows
            uk = self.pool_k.permute(0, 2, 1, 3)[phys, heads].reshape(b, hkv, -1, d)
            uv = self.pool_v.permute(0, 2, 1, 3)[phys, heads].reshape(b, hkv, -1, d)
            keys.append(uk), vals.append(uv)
            kpos.append(torch.full((uk.shape[2],), -1, device=self.device))  # all in the past
        n_sink = min(self.length, self.n_init)
        if n_sink:
            sp = torch.tensor([self._sink_phys(bi) for bi in range(b)], dtype=torch.int64, device=self.device)
            sk = self.pool_k[sp].reshape(b, -1, hkv, d)[:, :n_sink].permute(0, 2, 1, 3)
            sv = self.pool_v[sp].reshape(b, -1, hkv, d)[:, :n_sink].permute(0, 2, 1, 3)
            keys.append(sk), vals.append(sv)
            kpos.append(torch.arange(n_sink, device=self.device))
        r = self.num_recent
        if r:
            rk, rv = self._recent_kv()
            keys.append(rk.permute(0, 2, 1, 3)), vals.append(rv.permute(0, 2, 1, 3))
            kpos.append(torch.arange(self.recent_start, self.recent_start + r, device=self.device))
        kall = torch.cat(keys, dim=2).float()  # [B, Hkv, S, D]
        vall = torch.cat(vals, dim=2).float()
        kp = torch.cat(kpos)
        qg = q.float().view(b, t, hkv, g, d).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
        logits = torch.matmul(qg, kall.transpose(-1, -2).unsqueeze(2)) * self.scale  # [B, Hkv, G, T, S]
        visible = kp.view(1, -1) <= pos_q.view(-1, 1)
        logits = logits.masked_fill(~visible, -math.inf)
        lse = torch.logsumexp(logits, dim=-1)
        out = torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), vall.unsqueeze(2))  # [B, Hkv, G, T, D]
        if r:
            self._accumulate(logits[..., -r:], lse, pos_q)
        self._form_units()
        return out.permute(0, 3, 1, 2, 4).reshape(b, t, hq, d).to(self.dtype)
