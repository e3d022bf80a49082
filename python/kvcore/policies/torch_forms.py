"""Plain-torch forms of the eviction policies, written the way kvpress / KVCache-Factory do it.

Each function works on dense per-sequence tensors and materialises the ``[w, S]`` attention
matrix (fp32 softmax, as the reference implementations), then keeps the top scores. They are the
test oracles of :mod:`kvcore.policies.eviction` (same kept set on the same inputs, ties aside)
and the "torch" peer of the eviction benchmarks. They return the kept positions of each
(sequence, KV head) as a list (over sequences) of ``[Hkv, n_b]`` sorted int64 tensors.

Inputs: ``q`` ``[B, w, Hq, D]`` (the last ``w`` positions of each sequence), ``keys``
``[B, Hkv, S, D]`` (dense, from :func:`dense_keys`), ``seq_lens`` ``[B]``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .eviction import adakv_allocation, pyramidkv_budget

__all__ = [
    "adakv_torch",
    "corm_torch",
    "dense_keys",
    "h2o_torch",
    "knorm_torch",
    "pyramidkv_torch",
    "snapkv_torch",
    "streaming_llm_torch",
    "tova_torch",
    "window_probs",
]


def dense_keys(k_cache: Tensor, block_table: Tensor, seq_lens: Tensor) -> Tensor:
    """Gather a paged cache into dense ``[B, Hkv, S_max, D]`` (positions past a sequence: zeros)."""
    lens = [int(x) for x in seq_lens.tolist()]
    length = max(lens + [0])
    page_size = k_cache.shape[1]
    out = torch.zeros(len(lens), k_cache.shape[2], length, k_cache.shape[3], dtype=k_cache.dtype,
                      device=k_cache.device)
    for b, n in enumerate(lens):
        pos = torch.arange(n, device=k_cache.device)
        pages = block_table[b].to(torch.long)[pos // page_size]
        out[b, :, :n] = k_cache[pages, pos % page_size].transpose(0, 1)
    return out


def window_probs(q: Tensor, keys: Tensor, n: int, b: int, scale: Optional[float] = None) -> Tensor:
    """Softmax probabilities ``[Hq, w, n]`` (fp32) of sequence ``b``'s window queries over its ``n``
    keys, causal inside the window (query ``i`` sees keys ``<= n - w + i``)."""
    w, hq, d = q.shape[1], q.shape[2], q.shape[3]
    hkv = keys.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = keys[b, :, :n].float().repeat_interleave(hq // hkv, dim=0)  # [Hq, n, D]
    logits = torch.matmul(q[b].float().transpose(0, 1), k.transpose(1, 2)) * scale  # [Hq, w, n]
    t = n - w + torch.arange(w, device=q.device)
    mask = torch.arange(n, device=q.device).view(1, -1) > t.view(-1, 1)
    logits = logits.masked_fill(mask, -math.inf)
    return torch.softmax(logits, dim=-1, dtype=torch.float32).nan_to_num(0.0)


def _group_sum(p: Tensor, hkv: int) -> Tensor:
    return p.view(hkv, -1, *p.shape[1:]).sum(dim=1)


def _keep(scores: Tensor, count: int, forced: Optional[Tensor] = None) -> Tensor:
    s = scores.double().clone()
    if forced is not None:
        s[:, forced] = math.inf
    return s.topk(count, dim=-1).indices.sort(dim=-1).values


def streaming_llm_torch(seq_lens: Tensor, num_kv_heads: int, budget: int, num_sinks: int = 4) -> list[Tensor]:
    out = []
    for n in (int(x) for x in seq_lens.tolist()):
        if n <= budget:
            pos = torch.arange(n)
        else:
            pos = torch.cat([torch.arange(num_sinks), torch.arange(n - (budget - num_sinks), n)])
        out.append(pos.view(1, -1).expand(num_kv_heads, -1))
    return out


def h2o_torch(q: Tensor, keys: Tensor, seq_lens: Tensor, budget: int, recent: Optional[int] = None,
              scale: Optional[float] = None) -> list[Tensor]:
    recent = budget // 2 if recent is None else recent
    out = []
    for b, n in enumerate(int(x) for x in seq_lens.tolist()):
        if n <= budget:
            out.append(torch.arange(n).view(1, -1).expand(keys.shape[1], -1))
            continue
        acc = _group_sum(window_probs(q, keys, n, b, scale).sum(dim=1), keys.shape[1])  # [Hkv, n]
        forced = torch.arange(n) >= n - recent
        out.append(_keep(acc, budget, forced).cpu())
    return out


def _snap_scores(q: Tensor, keys: Tensor, n: int, b: int, kernel: int, pooling: str, scale) -> Tensor:
    w = q.shape[1]
    p = window_probs(q, keys, n, b, scale)  # [Hq, w, n]
    s = _group_sum(p.sum(dim=1), keys.shape[1])  # [Hkv, n]
    prefix = s[:, : n - w]
    if n - w > 0:
        pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
        prefix = pool(prefix.unsqueeze(0), kernel_size=kernel, padding=kernel // 2, stride=1)[0]
    return prefix  # scores of the keys before the window


def snapkv_torch(q: Tensor, keys: Tensor, seq_lens: Tensor, budget: int, kernel_size: int = 5, pooling: str = "avg",
                 scale: Optional[float] = None, counts: Optional[list[int]] = None) -> list[Tensor]:
    w = q.shape[1]
    out = []
    for b, n in enumerate(int(x) for x in seq_lens.tolist()):
        keep = min(n, budget) if counts is None else counts[b]
        if keep >= n:
            out.append(torch.arange(n).view(1, -1).expand(keys.shape[1], -1))
            continue
        prefix = _snap_scores(q, keys, n, b, kernel_size, pooling, scale)
        top = prefix.double().topk(keep - w, dim=-1).indices.cpu()
        window = torch.arange(n - w, n).view(1, -1).expand(keys.shape[1], -1)
        out.append(torch.cat([top, window], dim=1).sort(dim=-1).values)
    return out


def pyramidkv_torch(q: Tensor, keys: Tensor, seq_lens: Tensor, budget: int, layer: int, num_layers: int,
                    beta: int = 20, kernel_size: int = 5, pooling: str = "avg",
                    scale: Optional[float] = None) -> list[Tensor]:
    w = q.shape[1]
    counts = [pyramidkv_budget(layer, num_layers, int(n), budget, w, beta=beta) for n in seq_lens.tolist()]
    return snapkv_torch(q, keys, seq_lens, budget, kernel_size, pooling, scale, counts=counts)


def adakv_torch(q: Tensor, keys: Tensor, seq_lens: Tensor, budget: int, floor_alpha: float = 0.2,
                kernel_size: int = 5, pooling: str = "avg", scale: Optional[float] = None) -> list[Tensor]:
    w = q.shape[1]
    lens = [int(x) for x in seq_lens.tolist()]
    length = max(lens + [0])
    full = torch.zeros(len(lens), keys.shape[1], length, dtype=torch.float64)
    for b, n in enumerate(lens):
        if n > w:
            full[b, :, : n - w] = _snap_scores(q, keys, n, b, kernel_size, pooling, scale).double().cpu()
    alloc = adakv_allocation(full, seq_lens.cpu(), budget, w, floor_alpha=floor_alpha)
    counts = [int(alloc[b].max()) + min(n, w) for b, n in enumerate(lens)]
    return snapkv_torch(q, keys, seq_lens, budget, kernel_size, pooling, scale, counts=counts)


def tova_torch(q_last: Tensor, keys: Tensor, seq_lens: Tensor, budget: int, scale: Optional[float] = None) -> list[Tensor]:
    out = []
    for b, n in enumerate(int(x) for x in seq_lens.tolist()):
        if n <= budget:
            out.append(torch.arange(n).view(1, -1).expand(keys.shape[1], -1))
            continue
        p = window_probs(q_last, keys, n, b, scale)[:, -1]  # [Hq, n]: the last query
        s = p.mean(dim=0, keepdim=True).expand(keys.shape[1], -1)
        out.append(_keep(s, budget).cpu())
    return out


def corm_torch(q: Tensor, keys: Tensor, seq_lens: Tensor, budget: Optional[int] = None,
               scale: Optional[float] = None) -> tuple[list[Tensor], list[Tensor]]:
    """Returns (kept per sequence, the per-head CORM vote mask ``[Hkv, n]`` per sequence): the kept
    set is the largest per-head vote count, padded per head with its next-best keys."""
    r = q.shape[1]
    out, votes = [], []
    for b, n in enumerate(int(x) for x in seq_lens.tolist()):
        p = window_probs(q, keys, n, b, scale)  # [Hq, r, n]
        seen = (n - r + 1 + torch.arange(r, device=q.device)).clamp(min=1).float()  # keys each query sees
        # (the group's rows spelled out: a -1 cannot be inferred from an empty sequence's 0 keys)
        ratio = (p * seen.view(1, -1, 1)).view(keys.shape[1], p.shape[0] // keys.shape[1] * r, n).amax(dim=1)  # [Hkv, n]
        recent = torch.arange(n) >= n - r
        vote = (ratio.cpu() >= 1.0) | recent.view(1, -1)
        count = int(vote.sum(dim=-1).max()) if n else 0
        if budget is not None:
            count = min(count, budget)
        out.append(_keep(ratio.cpu(), count, recent))
        votes.append(vote)
    return out, votes


def knorm_torch(keys: Tensor, seq_lens: Tensor, budget: int) -> list[Tensor]:
    out = []
    for b, n in enumerate(int(x) for x in seq_lens.tolist()):
        norms = keys[b, :, :n].float().norm(dim=-1)  # [Hkv, n]
        out.append((-norms).double().topk(min(n, budget), dim=-1).indices.sort(dim=-1).values.cpu())
    return out
