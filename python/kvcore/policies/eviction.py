"""KV-cache eviction policies on the paged cache, built on ``attention_scores`` and ``compact_kv``.

Every policy here is a *selector*: it reads the paged cache (and the queries it needs) and returns
``(kept, kept_lens)``: ``kept`` ``[B, Hkv, K]`` int64 positions, each row sorted and strictly
increasing over its first ``kept_lens[b]`` entries, and ``kept_lens`` ``[B]`` int32. Hand them to
:func:`apply` (i.e. :func:`kvcore.compact_kv`) to compact the cache in place, then give the freed
pages back (:meth:`kvcore.PagedKVCache.truncate`). Selectors run at the end of prefill, and can be
run again every N decode steps on the grown cache (the budget rule is the same).

A sequence no longer than the budget keeps every token. Every KV head of a sequence keeps the same
number of tokens, because kvcore's decode reads one ``seq_len`` per sequence (see
:func:`kvcore.compact_kv`); the only policies whose heads want different counts (AdaKV, CORM)
pad the smaller heads with their next-best tokens, as their docstrings say.

Each policy also has a plain-torch form (``*_torch``) in :mod:`kvcore.policies.torch_forms`,
written the way kvpress / KVCache-Factory write them (materialising the attention matrix on dense
per-sequence tensors); tests check both pick the same kept set on the same inputs (ties aside).

GQA: scores are per KV head; a KV head's score for a key reduces over the query heads of its group
(sum for SnapKV / PyramidKV / H2O / AdaKV, max for CORM), as kvpress does for grouped heads.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch
from torch import Tensor

from .. import ops
from .._args import as_index as _index

__all__ = [
    "adakv",
    "apply",
    "corm",
    "h2o",
    "h2o_scores",
    "knorm",
    "pyramidkv",
    "pyramidkv_budget",
    "snapkv",
    "streaming_llm",
    "tova",
]


# ---------------------------------------------------------------------------------------------
# Shared pieces.
# ---------------------------------------------------------------------------------------------


def _check_budget(budget: int, name: str = "budget", minimum: int = 1) -> int:
    value = _index(budget)
    if value is None or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {budget!r}")
    return value


def _check_in_range(value: Any, name: str, low: int, high: int, what: str) -> int:
    """An integer-like ``value`` in ``[low, high]`` as an int; ValueError ``{name} must be an int in
    [{low}, {what}]`` otherwise."""
    index = _index(value)
    if index is None or not low <= index <= high:
        raise ValueError(f"{name} must be an int in [{low}, {what}], got {value!r}")
    return index


def _check_floor_alpha(floor_alpha: float) -> float:
    if (isinstance(floor_alpha, bool) or not isinstance(floor_alpha, numbers.Real)
            or not 0.0 <= float(floor_alpha) <= 1.0):
        raise ValueError(f"floor_alpha must be in [0, 1], got {floor_alpha!r}")
    return float(floor_alpha)


def _lens(seq_lens: Tensor) -> Tensor:
    if not isinstance(seq_lens, Tensor) or seq_lens.dim() != 1:
        raise ValueError(f"seq_lens must be a 1-D int32 tensor [batch], got {seq_lens!r}")
    return seq_lens.to(torch.int64)


def _select_top(scores: Tensor, seq_lens: Tensor, counts: Tensor, forced: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Keep, per (b, h), the ``counts[b]`` best keys of ``scores [B, H, S]`` among ``p < seq_lens[b]``;
    ``forced`` keys (bool ``[B, H, S]`` or broadcastable) are kept first. Returns sorted (kept, kept_lens)."""
    batch, heads, length = scores.shape
    lens = _lens(seq_lens).to(scores.device)
    pos = torch.arange(length, device=scores.device)
    valid = pos.view(1, 1, -1) < lens.view(-1, 1, 1)
    s = scores.to(torch.float64)
    if forced is not None:
        s = torch.where(forced & valid, math.inf, s)
    s = torch.where(valid, s, -math.inf)
    k = int(counts.max()) if counts.numel() else 0
    k = min(k, length)
    if k == 0:
        return torch.zeros(batch, heads, 0, dtype=torch.int64, device=scores.device), counts.to(torch.int32)
    idx = s.topk(k, dim=-1).indices
    # Only the first counts[b] of the top-k belong to sequence b; push the rest past every real
    # position before sorting so they land at the end (where kept_lens cuts them off).
    rank = torch.arange(k, device=scores.device).view(1, 1, -1)
    idx = torch.where(rank < counts.view(-1, 1, 1).to(scores.device), idx, length + rank)
    kept = idx.sort(dim=-1).values
    kept = torch.where(kept >= length, 0, kept)  # ignored entries: any in-range value
    return kept.contiguous(), counts.to(device=scores.device, dtype=torch.int32)


def apply(
    selection: tuple[Tensor, Tensor], k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor
) -> Tensor:
    """Compact the paged cache in place to a selection from one of the selectors; returns ``seq_lens``
    (updated in place to ``kept_lens``). See :func:`kvcore.compact_kv`."""
    kept, kept_lens = selection
    return ops.compact_kv(k_cache, v_cache, block_table, seq_lens, kept, kept_lens)


def _budget_counts(seq_lens: Tensor, budget: int) -> Tensor:
    return torch.clamp(_lens(seq_lens), max=budget)


# ---------------------------------------------------------------------------------------------
# StreamingLLM.
# ---------------------------------------------------------------------------------------------


def streaming_llm(seq_lens: Tensor, num_kv_heads: int, budget: int, *, num_sinks: int = 4) -> tuple[Tensor, Tensor]:
    """StreamingLLM (Xiao et al. 2023, "attention sinks"): keep the first ``num_sinks`` tokens and
    the most recent ``budget - num_sinks`` tokens, the same for every head; no scores needed.

    Defaults: 4 sink tokens (the paper's choice); ``budget`` is the whole kept size (sinks +
    recent window). Args: ``seq_lens`` ``[B]`` int32, ``num_kv_heads >= 1``, ``budget >= 1`` and
    ``num_sinks`` in ``[0, budget]`` (ints or integer-likes such as ``numpy.int64``).
    """
    num_kv_heads = _check_budget(num_kv_heads, "num_kv_heads")
    budget = _check_budget(budget)
    num_sinks = _check_in_range(num_sinks, "num_sinks", 0, budget, f"budget = {budget}")
    lens = _lens(seq_lens)
    length = int(lens.max()) if lens.numel() else 0
    pos = torch.arange(length, device=seq_lens.device).view(1, 1, -1)
    recent = (pos >= (lens.to(seq_lens.device) - (budget - num_sinks)).view(-1, 1, 1))
    forced = (pos < num_sinks) | recent
    scores = torch.zeros(lens.shape[0], num_kv_heads, length, device=seq_lens.device)
    return _select_top(scores, seq_lens, _budget_counts(seq_lens, budget), forced.expand_as(scores))


# ---------------------------------------------------------------------------------------------
# H2O.
# ---------------------------------------------------------------------------------------------


def h2o_scores(q: Tensor, k_cache: Tensor, block_table: Tensor, seq_lens: Tensor, *, scale: Optional[float] = None,
               lse: Optional[Tensor] = None) -> Tensor:
    """H2O's accumulated attention at the end of prefill: for each key, the sum over every query
    that sees it (all ``w = q.shape[1]`` last positions, normally the whole prompt) and over the
    query heads of the KV group of its softmax probability. ``[B, Hkv, max_pages * page_size]`` fp32.

    During decode, pass it to every step's attention as ``gqa_decode(..., score=scores)`` (or
    ``PagedKVCache.decode(..., score=scores)``): the decode adds that step's probabilities, summed
    over the group, in the same launch, at a few percent over plain decode. That equals adding
    ``attention_scores`` with ``w = 1`` each step (tests/test_decode_score.py). The block table
    must not grow past the buffer: allocate it for the largest ``max_pages`` the sequences will
    use (``S >= max_pages * page_size``). After :func:`apply` compacts the cache, compact the
    scores the same way (``scores.gather(2, kept)`` into the first ``kept_lens`` entries)."""
    return ops.attention_scores(q, k_cache, block_table, seq_lens, lse=lse, scale=scale, reduction="sum")


def h2o(scores: Tensor, seq_lens: Tensor, budget: int, *, recent: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """H2O (Zhang et al. 2023, heavy-hitter oracle): keep the ``recent`` most recent tokens plus the
    ``budget - recent`` other tokens with the largest accumulated attention score, per KV head.

    Defaults: ``recent = budget // 2`` (the paper splits the budget evenly between heavy hitters
    and recent tokens). ``scores`` ``[B, Hkv, S]``: the accumulated attention (:func:`h2o_scores`).
    """
    budget = _check_budget(budget)
    recent = _check_in_range(budget // 2 if recent is None else recent, "recent", 0, budget, f"budget = {budget}")
    lens = _lens(seq_lens).to(scores.device)
    pos = torch.arange(scores.shape[2], device=scores.device).view(1, 1, -1)
    forced = pos >= (lens - recent).view(-1, 1, 1)
    return _select_top(scores, seq_lens, _budget_counts(seq_lens, budget), forced.expand_as(scores))


# ---------------------------------------------------------------------------------------------
# SnapKV, PyramidKV, AdaKV.
# ---------------------------------------------------------------------------------------------


def _window_scores(q_window: Tensor, k_cache: Tensor, block_table: Tensor, seq_lens: Tensor, kernel_size: int,
                   pooling: str, scale: Optional[float], lse: Optional[Tensor]) -> Tensor:
    if pooling != "none" and _index(kernel_size) not in (5, 7):  # attention_scores' pool_kernel, named as here
        raise ValueError(f"kernel_size must be 5 or 7 when pooling is on, got {kernel_size!r}")
    return ops.attention_scores(q_window, k_cache, block_table, seq_lens, lse=lse, scale=scale, reduction="sum",
                                pooling=pooling, pool_kernel=kernel_size)


def _window_forced(scores: Tensor, seq_lens: Tensor, window: int) -> Tensor:
    lens = _lens(seq_lens).to(scores.device)
    pos = torch.arange(scores.shape[2], device=scores.device).view(1, 1, -1)
    return (pos >= (lens - window).view(-1, 1, 1)).expand_as(scores)


def snapkv(q_window: Tensor, k_cache: Tensor, block_table: Tensor, seq_lens: Tensor, budget: int, *,
           kernel_size: int = 5, pooling: str = "avg", scale: Optional[float] = None,
           lse: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """SnapKV (Li et al. 2024): the last ``w`` prompt queries (the observation window,
    ``q_window`` ``[B, w, Hq, D]``) vote for the earlier keys.

    Rule (as the SnapKV / KVCache-Factory reference): softmax of the window's queries over all keys
    they see (causal inside the window), summed over the window's queries (and here over the query
    heads of each KV group); the scores of the keys before the window are 1-D pooled (kernel 5,
    stride 1, padding 2, ``avg_pool1d`` counting the zero padding, or ``max_pool1d``); each KV head
    keeps its ``budget - w`` best-scoring keys before the window plus the whole window. A sequence
    no longer than ``budget`` keeps everything. Defaults: avg pooling, kernel 5; the reference's
    observation window is 32 tokens (``w``) and its budget ``max_capacity_prompt`` counts the window.
    """
    budget = _check_budget(budget)
    window = q_window.shape[1] if q_window.dim() == 4 else 0
    if budget < window:
        raise ValueError(f"budget ({budget}) must be at least the observation window w = {window}")
    scores = _window_scores(q_window, k_cache, block_table, seq_lens, kernel_size, pooling, scale, lse)
    return _select_top(scores, seq_lens, _budget_counts(seq_lens, budget), _window_forced(scores, seq_lens, window))


def pyramidkv_budget(layer: int, num_layers: int, seq_len: int, budget: int, window: int, *, beta: int = 20) -> int:
    """PyramidKV's kept size (window included) for ``layer`` of ``num_layers``, following the budget
    schedule of KVCache-Factory with average budget ``budget`` (its ``max_capacity_prompt``):

    with ``c = budget - window``: ``lo = c // beta``, ``hi = 2c - lo``; if ``hi >= seq_len - window``
    then ``hi = seq_len - window`` and ``lo = 2c - hi``; ``step = (hi - lo) // (num_layers - 1)``;
    layer ``l`` keeps ``hi - l * step`` tokens before the window (layer 0 the most), plus the window.
    A prompt shorter than ``budget`` keeps everything; one shorter than ``2c`` uses the uniform
    SnapKV budget ``budget`` on every layer (both as in the reference). Default ``beta = 20``.
    """
    num_layers = _check_budget(num_layers, "num_layers", 2)
    budget = _check_budget(budget)
    window = _check_budget(window, "window", 0)
    seq_len = _check_budget(seq_len, "seq_len", 0)
    beta = _check_budget(beta, "beta", 1)
    index = _index(layer)
    if index is None or not 0 <= index < num_layers:
        raise ValueError(f"layer must be an int in [0, {num_layers}), got {layer!r}")
    layer = index
    if budget <= window:
        raise ValueError(f"budget ({budget}) must exceed window ({window})")
    c = budget - window
    if seq_len < budget:
        return seq_len
    if seq_len < 2 * c:
        return budget
    lo = c // beta
    hi = 2 * c - lo
    if hi >= seq_len - window:
        hi = seq_len - window
        lo = 2 * c - hi
    step = (hi - lo) // (num_layers - 1)
    return hi - layer * step + window


def pyramidkv(q_window: Tensor, k_cache: Tensor, block_table: Tensor, seq_lens: Tensor, budget: int, *, layer: int,
              num_layers: int, beta: int = 20, kernel_size: int = 5, pooling: str = "avg",
              scale: Optional[float] = None, lse: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """PyramidKV (Cai et al. 2024): SnapKV's scores and selection with a per-layer kept size from
    :func:`pyramidkv_budget` (more tokens in lower layers, fewer in higher ones; ``beta = 20``),
    computed per sequence from its length. Defaults as KVCache-Factory: avg pooling, kernel 5."""
    budget = _check_budget(budget)
    window = q_window.shape[1] if q_window.dim() == 4 else 0
    pyramidkv_budget(layer, num_layers, 0, budget, window, beta=beta)  # checks the arguments (also for B = 0)
    counts = torch.tensor([pyramidkv_budget(layer, num_layers, int(n), budget, window, beta=beta)
                           for n in _lens(seq_lens).tolist()], dtype=torch.int64)
    scores = _window_scores(q_window, k_cache, block_table, seq_lens, kernel_size, pooling, scale, lse)
    return _select_top(scores, seq_lens, counts.to(scores.device), _window_forced(scores, seq_lens, window))


def adakv_allocation(scores: Tensor, seq_lens: Tensor, budget: int, window: int, *,
                     floor_alpha: float = 0.2) -> Tensor:
    """AdaKV's per-head counts of kept keys before the window, ``[B, Hkv]`` int64.

    Rule (Feng et al. 2024, "Ada-KV"): the layer's budget for the keys before the window,
    ``Hkv * (budget - window)`` per sequence, is shared by all heads: every head first gets
    ``floor(floor_alpha * (budget - window))`` (the safeguard floor; ``floor_alpha`` in ``[0, 1]``,
    default 0.2 as in the AdaKV scripts; ValueError otherwise), and the rest goes to the best
    scores over all heads together (softmax probabilities are comparable across heads: each
    query's row sums to 1).
    """
    floor_alpha = _check_floor_alpha(floor_alpha)
    batch, heads, _ = scores.shape
    lens = _lens(seq_lens).to(scores.device)
    prefix = torch.clamp(lens - window, min=0)
    c = budget - window
    floor = int(math.floor(floor_alpha * c))
    out = torch.zeros(batch, heads, dtype=torch.int64, device=scores.device)
    for b in range(batch):
        n = int(prefix[b])
        if n <= c:  # everything before the window fits
            out[b] = n
            continue
        s = scores[b, :, :n].to(torch.float64)
        base = min(floor, n)
        order = s.argsort(dim=-1, descending=True)
        taken = torch.zeros_like(s, dtype=torch.bool)
        taken.scatter_(1, order[:, :base], True)
        rest = heads * c - heads * base
        flat = torch.where(taken, -math.inf, s).flatten()
        extra = flat.topk(rest).indices // n
        out[b] = base + torch.bincount(extra, minlength=heads)
    return out


def adakv(q_window: Tensor, k_cache: Tensor, block_table: Tensor, seq_lens: Tensor, budget: int, *,
          floor_alpha: float = 0.2, kernel_size: int = 5, pooling: str = "avg", scale: Optional[float] = None,
          lse: Optional[Tensor] = None, pad: bool = True) -> tuple[Tensor, Tensor]:
    """Ada-SnapKV: SnapKV's scores, per-head budgets from :func:`adakv_allocation`, window kept.

    Per-head rule in kvcore: decode reads one ``seq_len`` per sequence, so with ``pad=True`` every
    head keeps as many tokens as the sequence's largest allocation: a head allocated fewer keeps
    its allocation *plus* its next-best keys up to that count (a superset of AdaKV's choice; memory
    is ``max allocation x Hkv``, not the average). ``pad=False`` raises ``ValueError`` when the
    allocations of a sequence's heads differ. ``floor_alpha`` in ``[0, 1]``: the share of each
    head's even budget it is guaranteed (:func:`adakv_allocation`).
    """
    _check_floor_alpha(floor_alpha)
    budget = _check_budget(budget)
    window = q_window.shape[1] if q_window.dim() == 4 else 0
    if budget < window:
        raise ValueError(f"budget ({budget}) must be at least the observation window w = {window}")
    scores = _window_scores(q_window, k_cache, block_table, seq_lens, kernel_size, pooling, scale, lse)
    alloc = adakv_allocation(scores, seq_lens, budget, window, floor_alpha=floor_alpha)
    if not pad and bool((alloc != alloc[:, :1]).any()):
        b = int((alloc != alloc[:, :1]).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"AdaKV allocated different per-head counts {alloc[b].tolist()} for sequence {b}; "
                         "kvcore's decode needs one length per sequence (use pad=True)")
    counts = alloc.max(dim=1).values + torch.clamp(_lens(seq_lens).to(alloc.device), max=window)
    return _select_top(scores, seq_lens, counts, _window_forced(scores, seq_lens, window))


# ---------------------------------------------------------------------------------------------
# TOVA, CORM, Knorm.
# ---------------------------------------------------------------------------------------------


def tova(q_last: Tensor, k_cache: Tensor, block_table: Tensor, seq_lens: Tensor, budget: int, *,
         scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """TOVA (Oren et al. 2024, "transformers are multi-state RNNs"): the current (last) query's
    softmax probabilities, averaged over all query heads of the layer, rank the tokens; the
    ``budget`` best are kept, the same set for every head. TOVA drops the lowest token each step
    once the cache is full; for one query that equals keeping its top ``budget`` at once (removing a
    key renormalises the others without changing their order). ``q_last`` ``[B, 1, Hq, D]``."""
    budget = _check_budget(budget)
    scores = ops.attention_scores(q_last, k_cache, block_table, seq_lens, scale=scale, reduction="mean")
    layer = scores.mean(dim=1, keepdim=True).expand_as(scores)  # mean over KV heads of group means
    return _select_top(layer, seq_lens, _budget_counts(seq_lens, budget))


def corm(q_recent: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, *,
         budget: Optional[int] = None, scale: Optional[float] = None, fill: bool = False) -> tuple[Tensor, Tensor]:
    """CORM (Dai et al. 2024): a key stays while any of the ``r`` most recent queries
    (``q_recent`` ``[B, r, Hq, D]``, the last ``r`` positions) gives it at least the uniform
    probability ``1 / n``, ``n`` = the number of keys that query sees; the ``r`` recent tokens stay.
    With GQA a key of a KV head stays if any query head of its group votes for it.

    Computed with one ``gqa_decode`` (for each recent query's log-sum-exp, ``lse_i``) and one
    ``attention_scores`` with reduction ``max`` and the shifted ``lse_i - log(n_i)``, so that a
    score ``>= 1`` means probability ``>= 1 / n_i``. Per-head counts differ: every head keeps the
    sequence's largest count, padding with its next-best keys (a superset of CORM's set). With
    ``budget`` given, at most ``budget`` tokens are kept (best scores first; recent tokens first).
    ``fill`` (with ``budget``): keep exactly ``min(budget, seq_len)`` tokens, CORM's voted keys
    first and then the next-best scores, for caches that hold one length per sequence for every
    layer (the transformers adapter).
    """
    if fill and budget is None:
        raise ValueError("corm: fill=True needs a budget")
    if budget is not None:
        budget = _check_budget(budget)
    if q_recent.dim() != 4:
        raise ValueError(f"q_recent must be 4-D [batch, r, num_q_heads, head_dim], got {tuple(q_recent.shape)}")
    batch, r, hq, d = q_recent.shape
    lens = _lens(seq_lens).to(q_recent.device)
    # Each recent query i as its own decode row: it sees the first t_i + 1 = len - r + i + 1 keys.
    n_i = (lens.view(-1, 1) - r + 1 + torch.arange(r, device=q_recent.device).view(1, -1)).clamp(min=0)
    rows_lens = n_i.reshape(-1).to(torch.int32)
    rows_table = block_table.repeat_interleave(r, dim=0).contiguous()
    _, lse = ops.gqa_decode(q_recent.reshape(batch * r, hq, d), k_cache, v_cache, rows_table, rows_lens,
                            scale=scale, return_lse=True)
    shifted = (lse.view(batch, r, hq) - torch.log(n_i.clamp(min=1).to(torch.float32)).unsqueeze(-1)).contiguous()
    scores = ops.attention_scores(q_recent, k_cache, block_table, seq_lens, lse=shifted, scale=scale,
                                  reduction="max")
    forced = _window_forced(scores, seq_lens, r)
    pos = torch.arange(scores.shape[2], device=scores.device).view(1, 1, -1)
    valid = pos < lens.view(-1, 1, 1)
    voted = (scores >= 1.0) | forced
    counts = (voted & valid).sum(dim=-1).max(dim=1).values
    if fill:
        counts = _budget_counts(seq_lens, budget).to(counts.device)
    elif budget is not None:
        counts = torch.clamp(counts, max=budget)
    return _select_top(scores, seq_lens, counts, forced)


def knorm(k_cache: Tensor, block_table: Tensor, seq_lens: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """Knorm (Devoto et al. 2024, "a simple and effective L2 norm-based strategy"): keep, per KV head,
    the ``budget`` keys with the *smallest* L2 norm (low-norm keys draw high attention); needs no
    queries. Norms are computed in fp32 from the paged cache."""
    budget = _check_budget(budget)
    lens = _lens(seq_lens)
    page_size = k_cache.shape[1]
    length = int(lens.max()) if lens.numel() else 0
    pos = torch.arange(length, device=k_cache.device)
    pages = block_table.to(torch.long)[:, (pos // page_size)]  # [B, S] (junk past a sequence: masked)
    pages = pages.clamp(0, k_cache.shape[0] - 1)
    keys = k_cache[pages, (pos % page_size).view(1, -1)]  # [B, S, Hkv, D]
    scores = -keys.float().norm(dim=-1).transpose(1, 2)  # [B, Hkv, S]
    return _select_top(scores, seq_lens, _budget_counts(seq_lens, budget))
