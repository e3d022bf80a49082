"""Pure-torch references: the definition of every kvcore op.

Every function here states the exact math it computes, does that math in float64 on the
inputs' device, and is written for readability rather than speed. Kernels are tested against
these functions; when a kernel and this file disagree, this file is right (or the spec changes
here first).

Paged cache convention (shared by every op):

* ``k_cache``, ``v_cache``: ``[num_pages, page_size, num_kv_heads, head_dim]``.
* ``block_table``: ``[batch, max_pages]`` int32; ``seq_lens``: ``[batch]`` int32.
* Token position ``p`` of sequence ``b`` lives at page ``block_table[b, p // page_size]``,
  offset ``p % page_size``; its flat slot is ``page * page_size + offset``.
* Query head ``hq`` reads KV head ``hq // (Hq // Hkv)`` (consecutive grouping, as Hugging Face
  ``repeat_kv``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "append_paged_kv",
    "block_sparse_decode",
    "block_sparse_positions",
    "dense_attention",
    "gather_paged",
    "gqa_decode",
    "gqa_decode_score",
    "merge_attention_states",
]


# --------------------------------------------------------------------------------------------
# Argument checks (ValueError naming the argument).
# --------------------------------------------------------------------------------------------


def _check_dim(t: Tensor, rank: int, name: str, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")


def _check_cache_pair(k_cache: Tensor, v_cache: Tensor) -> None:
    layout = "[num_pages, page_size, num_kv_heads, head_dim]"
    _check_dim(k_cache, 4, "k_cache", layout)
    _check_dim(v_cache, 4, "v_cache", layout)
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )


def _check_group(num_q_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"q's number of heads ({num_q_heads}) must be a multiple of the caches' "
            f"num_kv_heads ({num_kv_heads})"
        )
    return num_q_heads // num_kv_heads


# --------------------------------------------------------------------------------------------
# Building blocks.
# --------------------------------------------------------------------------------------------


def gather_paged(cache: Tensor, block_table_row: Tensor, positions: Tensor) -> Tensor:
    """Read the cache rows of one sequence at the given token positions.

    ``cache`` ``[num_pages, page_size, H, D]``, ``block_table_row`` ``[max_pages]`` (int),
    ``positions`` ``[L]`` (int). Returns ``[L, H, D]`` (``cache``'s dtype) where row ``i`` is
    ``cache[block_table_row[positions[i] // page_size], positions[i] % page_size]``.
    """
    page_size = cache.shape[1]
    positions = positions.to(device=cache.device, dtype=torch.long)
    pages = block_table_row.to(device=cache.device, dtype=torch.long)[positions // page_size]
    return cache[pages, positions % page_size]


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    logit_soft_cap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Attention of one query token over a dense set of keys, with GQA head mapping.

    ``q`` ``[Hq, D]``, ``k`` / ``v`` ``[L, Hkv, D]`` with ``Hq % Hkv == 0``; query head ``h``
    uses KV head ``h // (Hq // Hkv)``. With ``scale`` defaulting to ``1 / sqrt(D)``:

        logits[h, l] = scale * sum_d q[h, d] * k[l, h // G, d]
        if logit_soft_cap > 0: logits = cap * tanh(logits / cap)
        out[h]       = sum_l softmax(logits[h])[l] * v[l, h // G]
        lse[h]       = log(sum_l exp(logits[h, l]))          (natural log)

    With ``L == 0``: ``out = 0`` and ``lse = -inf``. Returns ``(out [Hq, D], lse [Hq])`` in
    **float64** (callers cast; tests compare at full precision).
    """
    _check_dim(q, 2, "q", "[num_q_heads, head_dim]")
    _check_dim(k, 3, "k", "[num_keys, num_kv_heads, head_dim]")
    _check_dim(v, 3, "v", "[num_keys, num_kv_heads, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    num_q_heads, head_dim = q.shape
    if k.shape[2] != head_dim:
        raise ValueError(f"k's head_dim ({k.shape[2]}) must equal q's head_dim ({head_dim})")
    group = _check_group(num_q_heads, k.shape[1])
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    num_keys = k.shape[0]
    if num_keys == 0:
        out = torch.zeros(num_q_heads, head_dim, dtype=torch.float64, device=q.device)
        lse = torch.full((num_q_heads,), -math.inf, dtype=torch.float64, device=q.device)
        return out, lse

    q64 = q.to(torch.float64)
    # [L, Hkv, D] -> [Hq, L, D]: KV head j serves query heads j*G .. j*G+G-1.
    k_per_head = k.to(device=q.device, dtype=torch.float64).repeat_interleave(group, dim=1).transpose(0, 1)
    v_per_head = v.to(device=q.device, dtype=torch.float64).repeat_interleave(group, dim=1).transpose(0, 1)

    logits = scale * (k_per_head @ q64[:, :, None])[:, :, 0]  # [Hq, L]: q[h] . k[l, h // G]
    if logit_soft_cap > 0:
        logits = logit_soft_cap * torch.tanh(logits / logit_soft_cap)
    lse = torch.logsumexp(logits, dim=-1)  # [Hq]
    probs = torch.exp(logits - lse[:, None])  # softmax over l, [Hq, L]
    out = (probs[:, None, :] @ v_per_head)[:, 0, :]  # [Hq, D]
    return out, lse


# --------------------------------------------------------------------------------------------
# Ops.
# --------------------------------------------------------------------------------------------


def append_paged_kv(
    k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor
) -> tuple[Tensor, Tensor]:
    """Write new tokens into the paged caches (functional: the inputs are not modified).

    ``k``, ``v`` ``[T, Hkv, D]``; caches ``[num_pages, page_size, Hkv, D]``; ``slot_mapping``
    ``[T]`` int64. Returns copies ``(k_cache', v_cache')`` (the caches' dtype) with, for every
    ``t`` with ``slot = slot_mapping[t] >= 0``:

        k_cache'[slot // page_size, slot % page_size] = k[t]    (cast to the cache dtype)
        v_cache'[slot // page_size, slot % page_size] = v[t]

    ``slot == -1`` skips token ``t``. Every other slot must lie in
    ``[0, num_pages * page_size)`` and appear at most once (otherwise the result is undefined
    for the kernels; this reference raises ValueError for out-of-range slots).
    """
    _check_cache_pair(k_cache, v_cache)
    num_pages, page_size, num_kv_heads, head_dim = k_cache.shape
    _check_dim(k, 3, "k", "[num_tokens, num_kv_heads, head_dim]")
    _check_dim(v, 3, "v", "[num_tokens, num_kv_heads, head_dim]")
    _check_dim(slot_mapping, 1, "slot_mapping", "[num_tokens]")
    if tuple(k.shape[1:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"k must be [num_tokens, {num_kv_heads}, {head_dim}] to match k_cache, got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(
            f"slot_mapping must have one entry per token ({k.shape[0]}), got {slot_mapping.shape[0]}"
        )
    if slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must have dtype torch.int64, got {slot_mapping.dtype}")

    slots = slot_mapping.to(k_cache.device)
    num_slots = num_pages * page_size
    bad = (slots < -1) | (slots >= num_slots)
    if bool(bad.any()):
        raise ValueError(
            f"slot_mapping entries must be -1 or in [0, {num_slots}), got {slots[bad].tolist()}"
        )
    keep = slots >= 0

    new_k = k_cache.clone()
    new_v = v_cache.clone()
    # A contiguous clone viewed as [num_pages * page_size, Hkv, D]: slot s is row s.
    flat_k = new_k.view(num_slots, num_kv_heads, head_dim)
    flat_v = new_v.view(num_slots, num_kv_heads, head_dim)
    flat_k[slots[keep]] = k.to(device=k_cache.device, dtype=k_cache.dtype)[keep]
    flat_v[slots[keep]] = v.to(device=v_cache.device, dtype=v_cache.dtype)[keep]
    return new_k, new_v


def gqa_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: float | None = None,
    window_left: int = -1,
    logit_soft_cap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """One query token per sequence attending to its paged KV cache (GQA).

    ``q`` ``[B, Hq, D]``; caches ``[num_pages, page_size, Hkv, D]`` with ``Hq % Hkv == 0``;
    ``block_table`` ``[B, max_pages]`` int; ``seq_lens`` ``[B]`` int. For sequence ``b`` with
    ``L = seq_lens[b]`` the keys are the positions

        p in [0, L)                                   if window_left < 0
        p in [max(0, L - 1 - window_left), L)          otherwise

    read through the block table (page ``block_table[b, p // page_size]``, offset
    ``p % page_size``). Then, with ``scale`` defaulting to ``1 / sqrt(D)`` and query head ``h``
    using KV head ``h // (Hq // Hkv)``:

        logits = scale * q[b, h] . k_p
        if logit_soft_cap > 0: logits = cap * tanh(logits / cap)
        out[b, h] = softmax_p(logits) @ v_p
        lse[b, h] = logsumexp_p(logits)               (natural log)

    A sequence with no keys (``L == 0``) gives ``out = 0`` and ``lse = -inf``.
    Returns ``(out [B, Hq, D] float32, lse [B, Hq] float32)``.
    """
    _check_dim(q, 3, "q", "[batch, num_q_heads, head_dim]")
    _check_cache_pair(k_cache, v_cache)
    _check_dim(block_table, 2, "block_table", "[batch, max_pages]")
    _check_dim(seq_lens, 1, "seq_lens", "[batch]")
    batch, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"k_cache's head_dim ({cache_head_dim}) must equal q's head_dim ({head_dim})")
    _check_group(num_q_heads, num_kv_heads)
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows (q's batch), got {block_table.shape[0]}")
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must have {batch} entries (q's batch), got {seq_lens.shape[0]}")

    capacity = block_table.shape[1] * page_size
    lens = [int(x) for x in seq_lens.tolist()]
    for b, length in enumerate(lens):
        if length < 0 or length > capacity:
            raise ValueError(
                f"seq_lens[{b}] = {length} must be in [0, max_pages * page_size = {capacity}]"
            )

    out = torch.empty(batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_q_heads, dtype=torch.float32, device=q.device)
    for b, length in enumerate(lens):
        start = 0 if window_left < 0 else max(0, length - 1 - window_left)
        positions = torch.arange(start, length, device=k_cache.device)
        used_pages = block_table[b, : (length + page_size - 1) // page_size]
        if used_pages.numel() and (bool((used_pages < 0).any()) or bool((used_pages >= num_pages).any())):
            raise ValueError(
                f"block_table[{b}] must hold page ids in [0, {num_pages}) for its {length} tokens, "
                f"got {used_pages.tolist()}"
            )
        keys = gather_paged(k_cache, block_table[b], positions)
        values = gather_paged(v_cache, block_table[b], positions)
        o, s = dense_attention(q[b], keys, values, scale=scale, logit_soft_cap=logit_soft_cap)
        out[b] = o.to(torch.float32)
        lse[b] = s.to(torch.float32)
    return out, lse


def gqa_decode_score(
    q: Tensor,
    k_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    scale: float | None = None,
    window_left: int = -1,
    logit_soft_cap: float = 0.0,
    score_len: int | None = None,
) -> Tensor:
    """What ``gqa_decode(..., score=score)`` adds to ``score`` (H2O accumulation, one step).

    With the keys, logits and ``lse`` of :func:`gqa_decode` (window and soft cap included) and
    ``G = Hq // Hkv``:

        add[b, h, p] = sum_g exp(logits[b, h * G + g, p] - lse[b, h * G + g])   for attended p

    and 0 for every other position ``p < score_len`` (default ``max_pages * page_size``).
    Returns ``[B, Hkv, score_len]`` **float64**.
    """
    _check_dim(q, 3, "q", "[batch, num_q_heads, head_dim]")
    batch, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_cache.shape
    group = _check_group(num_q_heads, num_kv_heads)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if score_len is None:
        score_len = block_table.shape[1] * page_size
    add = torch.zeros(batch, num_kv_heads, score_len, dtype=torch.float64, device=q.device)
    for b, length in enumerate(int(x) for x in seq_lens.tolist()):
        start = 0 if window_left < 0 else max(0, length - 1 - window_left)
        if length <= start:
            continue
        positions = torch.arange(start, length, device=k_cache.device)
        keys = gather_paged(k_cache, block_table[b], positions).to(torch.float64)  # [L, Hkv, D]
        keys = keys.repeat_interleave(group, dim=1)  # [L, Hq, D]
        logits = scale * torch.einsum("hd,lhd->hl", q[b].to(torch.float64), keys)  # [Hq, L]
        if logit_soft_cap > 0:
            logits = logit_soft_cap * torch.tanh(logits / logit_soft_cap)
        prob = torch.softmax(logits, dim=-1).view(num_kv_heads, group, -1).sum(dim=1)
        add[b, :, start:length] = prob
    return add


def merge_attention_states(
    out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor
) -> tuple[Tensor, Tensor]:
    """Merge two partial attention results computed over disjoint key sets.

    ``out_*`` ``[N, H, D]``, ``lse_*`` ``[N, H]`` (natural log; ``-inf`` marks an empty part).
    With ``m = max(lse_a, lse_b)``, ``w_a = exp(lse_a - m)``, ``w_b = exp(lse_b - m)``:

        out = (w_a * out_a + w_b * out_b) / (w_a + w_b)
        lse = m + log(w_a + w_b)                      (= logaddexp(lse_a, lse_b))

    which equals attention over the union of the two key sets. If one side is ``-inf`` the
    other passes through unchanged (the empty side's ``out`` is never read, so it may hold
    anything, even NaN). If both are ``-inf``: ``out = 0``, ``lse = -inf``. If either ``lse``
    is NaN, the row's ``out`` and ``lse`` are NaN (NaN in, NaN out: a part computed from NaN is
    never merged away as if it were empty).
    Returns ``(out [N, H, D] float32, lse [N, H] float32)``.
    """
    _check_dim(out_a, 3, "out_a", "[N, num_heads, head_dim]")
    _check_dim(out_b, 3, "out_b", "[N, num_heads, head_dim]")
    _check_dim(lse_a, 2, "lse_a", "[N, num_heads]")
    _check_dim(lse_b, 2, "lse_b", "[N, num_heads]")
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b must have the shape of out_a {tuple(out_a.shape)}, got {tuple(out_b.shape)}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != out_a.shape[:2]:
            raise ValueError(f"{name} must be {tuple(out_a.shape[:2])} to match out_a, got {tuple(t.shape)}")

    la = lse_a.to(torch.float64)
    lb = lse_b.to(torch.float64)
    m = torch.maximum(la, lb)
    # Both empty: m = -inf; shift by 0 instead so the weights come out as exp(-inf) = 0.
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w_a = torch.exp(la - m)[..., None]  # [N, H, 1]
    w_b = torch.exp(lb - m)[..., None]
    total = w_a + w_b

    # An empty side (weight 0) contributes nothing, even if its out holds NaN/inf.
    part_a = torch.where(w_a > 0, w_a * out_a.to(torch.float64), 0.0)
    part_b = torch.where(w_b > 0, w_b * out_b.to(torch.float64), 0.0)
    out = torch.where(total > 0, (part_a + part_b) / total, 0.0)
    lse = m + torch.log(total[..., 0])  # log(0) = -inf when both are empty
    nan_row = torch.isnan(la) | torch.isnan(lb)  # [N, H]; lse is already NaN there
    out = torch.where(nan_row[..., None], math.nan, out)
    return out.to(torch.float32), lse.to(torch.float32)


# --------------------------------------------------------------------------------------------
# Block-sparse decode.
# --------------------------------------------------------------------------------------------


def block_sparse_positions(pages, seq_len: int, page_size: int) -> Tensor:
    """The key positions that a list of selected logical pages covers in a sequence.

    ``pages``: the selected logical page numbers (a 1-D int tensor or a list; order does not
    matter). Returns, as a sorted 1-D int64 CPU tensor, every position ``p`` with
    ``p // page_size`` in ``pages`` and ``p < seq_len``. Each page must lie in
    ``[0, ceil(seq_len / page_size))`` and appear once, else ValueError.
    """
    pages = [int(x) for x in (pages.tolist() if isinstance(pages, Tensor) else pages)]
    used = (seq_len + page_size - 1) // page_size
    bad = [x for x in pages if x < 0 or x >= used]
    if bad:
        raise ValueError(
            f"selected pages must be in [0, ceil(seq_len / page_size)) = [0, {used}) for seq_len {seq_len} "
            f"and page_size {page_size}, got {bad}"
        )
    if len(set(pages)) != len(pages):
        dups = sorted({x for x in pages if pages.count(x) > 1})
        raise ValueError(f"selected pages must be listed at most once, got {dups} more than once")
    chunks = [torch.arange(x * page_size, min((x + 1) * page_size, seq_len)) for x in sorted(pages)]
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64)


def block_sparse_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    sel_pages: Tensor,
    sel_counts: Tensor,
    scale: float | None = None,
    logit_soft_cap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """One query token per sequence attending to the selected pages of its paged KV cache.

    ``q`` ``[B, Hq, D]``; caches, ``block_table`` and ``seq_lens`` as in :func:`gqa_decode`;
    ``sel_pages`` ``[B, Hkv, max_sel]`` int (logical page numbers within the sequence, i.e.
    indices into its block-table row); ``sel_counts`` ``[B, Hkv]`` int in ``[0, max_sel]``.
    With ``L = seq_lens[b]`` and the selection ``S = sel_pages[b, j, :sel_counts[b, j]]`` of
    KV head ``j`` (entries past the count are ignored), the keys of every query head ``h`` with
    ``h // (Hq // Hkv) == j`` are the positions

        p with p // page_size in S and p < L            (see block_sparse_positions)

    read through the block table as in :func:`gqa_decode`; the order of ``S`` does not matter.
    Then, with ``scale`` defaulting to ``1 / sqrt(D)``:

        logits = scale * q[b, h] . k_p   (KV head j)
        if logit_soft_cap > 0: logits = cap * tanh(logits / cap)
        out[b, h] = softmax_p(logits) @ v_p
        lse[b, h] = logsumexp_p(logits)               (natural log)

    An empty selection gives ``out = 0`` and ``lse = -inf``. Every listed page must lie in
    ``[0, ceil(L / page_size))`` and appear once per list (a duplicate would count its tokens
    twice), and ``sel_counts`` must lie in ``[0, max_sel]``; otherwise ValueError.
    Returns ``(out [B, Hq, D] float32, lse [B, Hq] float32)``.
    """
    _check_dim(q, 3, "q", "[batch, num_q_heads, head_dim]")
    _check_cache_pair(k_cache, v_cache)
    _check_dim(block_table, 2, "block_table", "[batch, max_pages]")
    _check_dim(seq_lens, 1, "seq_lens", "[batch]")
    _check_dim(sel_pages, 3, "sel_pages", "[batch, num_kv_heads, max_sel]")
    _check_dim(sel_counts, 2, "sel_counts", "[batch, num_kv_heads]")
    batch, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"k_cache's head_dim ({cache_head_dim}) must equal q's head_dim ({head_dim})")
    group = _check_group(num_q_heads, num_kv_heads)
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows (q's batch), got {block_table.shape[0]}")
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must have {batch} entries (q's batch), got {seq_lens.shape[0]}")
    if tuple(sel_pages.shape[:2]) != (batch, num_kv_heads):
        raise ValueError(
            f"sel_pages must be [{batch}, {num_kv_heads}, max_sel] (batch, num_kv_heads), got {tuple(sel_pages.shape)}"
        )
    if tuple(sel_counts.shape) != (batch, num_kv_heads):
        raise ValueError(f"sel_counts must be [{batch}, {num_kv_heads}], got {tuple(sel_counts.shape)}")
    max_sel = sel_pages.shape[2]

    capacity = block_table.shape[1] * page_size
    lens = [int(x) for x in seq_lens.tolist()]
    for b, length in enumerate(lens):
        if length < 0 or length > capacity:
            raise ValueError(
                f"seq_lens[{b}] = {length} must be in [0, max_pages * page_size = {capacity}]"
            )
    counts = sel_counts.to("cpu", torch.int64)
    chosen = sel_pages.to("cpu", torch.int64)

    out = torch.empty(batch, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_q_heads, dtype=torch.float32, device=q.device)
    for b, length in enumerate(lens):
        used_pages = block_table[b, : (length + page_size - 1) // page_size]
        if used_pages.numel() and (bool((used_pages < 0).any()) or bool((used_pages >= num_pages).any())):
            raise ValueError(
                f"block_table[{b}] must hold page ids in [0, {num_pages}) for its {length} tokens, "
                f"got {used_pages.tolist()}"
            )
        for j in range(num_kv_heads):
            count = int(counts[b, j])
            if count < 0 or count > max_sel:
                raise ValueError(f"sel_counts[{b}, {j}] = {count} must be in [0, max_sel = {max_sel}]")
            try:
                positions = block_sparse_positions(chosen[b, j, :count], length, page_size)
            except ValueError as exc:
                raise ValueError(f"sel_pages[{b}, {j}]: {exc}") from None
            keys = gather_paged(k_cache, block_table[b], positions)[:, j : j + 1]  # [L_sel, 1, D]
            values = gather_paged(v_cache, block_table[b], positions)[:, j : j + 1]
            heads = slice(j * group, (j + 1) * group)
            o, s = dense_attention(q[b, heads], keys, values, scale=scale, logit_soft_cap=logit_soft_cap)
            out[b, heads] = o.to(torch.float32)
            lse[b, heads] = s.to(torch.float32)
    return out, lse


# --------------------------------------------------------------------------------------------
# Block Transformer (Ho et al. 2024): the token decoder's attention.
# --------------------------------------------------------------------------------------------

__all__ += ["token_decoder_attention", "token_decoder_mask"]


def token_decoder_mask(block_length: int, prefix: int, device: torch.device | str = "cpu") -> Tensor:
    """Boolean ``[L, P + L]`` mask of the token decoder: ``mask[i, j]`` is True when token ``i``
    of a block may attend to key ``j`` of the same block (keys are the ``P`` prefix slots, then
    the ``L`` tokens): ``j < P + i + 1``."""
    rows = torch.arange(block_length, device=device)[:, None]
    cols = torch.arange(prefix + block_length, device=device)[None, :]
    return cols <= rows + prefix


def token_decoder_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_lens: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention inside each block of the Block Transformer's token decoder, as masked dense attention.

    ``q`` ``[N, L, Hq, D]`` holds the queries of the ``L`` tokens of ``N`` blocks; ``k``, ``v``
    ``[N, P + L, Hkv, D]`` hold each block's ``P`` prefix slots (the expanded context from the
    block decoder) followed by its ``L`` tokens; ``Hq % Hkv == 0`` and query head ``h`` uses KV
    head ``h // (Hq // Hkv)``. With ``scale`` defaulting to ``1 / sqrt(D)``, for block ``n``,
    token ``i < block_lens[n]`` (all ``L`` when ``block_lens`` is None) and query head ``h``:

        logits[j]      = scale * q[n, i, h] . k[n, j, h // G]      for j in [0, P + i]
        out[n, i, h]   = softmax_j(logits) @ v[n, j, h // G]
        lse[n, i, h]   = logsumexp_j(logits)                       (natural log)

    i.e. dense attention of the block's ``L`` queries over its ``P + L`` keys under
    :func:`token_decoder_mask`. Rows ``i >= block_lens[n]`` (padding of a partial last block)
    give ``out = 0`` and ``lse = -inf``. ``block_lens`` entries must lie in ``[0, L]``
    (ValueError otherwise). Returns ``(out [N, L, Hq, D] float32, lse [N, L, Hq] float32)``.
    """
    _check_dim(q, 4, "q", "[blocks, block_length, num_q_heads, head_dim]")
    _check_dim(k, 4, "k", "[blocks, prefix + block_length, num_kv_heads, head_dim]")
    _check_dim(v, 4, "v", "[blocks, prefix + block_length, num_kv_heads, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    blocks, block_length, num_q_heads, head_dim = q.shape
    if k.shape[0] != blocks or k.shape[1] < block_length or k.shape[3] != head_dim:
        raise ValueError(
            f"k must be [{blocks}, prefix + {block_length}, num_kv_heads, {head_dim}] to match q, got {tuple(k.shape)}"
        )
    prefix = k.shape[1] - block_length
    group = _check_group(num_q_heads, k.shape[2])
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if block_lens is None:
        lens = torch.full((blocks,), block_length, dtype=torch.long, device=q.device)
    else:
        _check_dim(block_lens, 1, "block_lens", "[blocks]")
        if block_lens.shape[0] != blocks:
            raise ValueError(f"block_lens must have {blocks} entries (one per block), got {block_lens.shape[0]}")
        lens = block_lens.to(device=q.device, dtype=torch.long)
        bad = (lens < 0) | (lens > block_length)
        if bool(bad.any()):
            n = int(bad.nonzero()[0, 0])
            raise ValueError(f"block_lens[{n}] = {int(lens[n])} must be in [0, block_length = {block_length}]")

    q64 = q.to(torch.float64)
    # [N, P + L, Hkv, D] -> [N, Hq, P + L, D]: KV head j serves query heads j*G .. j*G+G-1.
    k64 = k.to(device=q.device, dtype=torch.float64).repeat_interleave(group, dim=2).transpose(1, 2)
    v64 = v.to(device=q.device, dtype=torch.float64).repeat_interleave(group, dim=2).transpose(1, 2)
    logits = scale * (q64.transpose(1, 2) @ k64.transpose(-1, -2))  # [N, Hq, L, P + L]
    allowed = token_decoder_mask(block_length, prefix, q.device)  # [L, P + L]
    valid_row = torch.arange(block_length, device=q.device)[None, :] < lens[:, None]  # [N, L]
    logits = logits.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)  # [N, Hq, L]; every row has at least one key
    # Row i reads only keys 0 .. P + i: a product with the full V would let a NaN in a key the
    # row never attends to leak in through 0 * NaN.
    rows = [torch.exp(logits[:, :, i, : prefix + i + 1] - lse[:, :, i, None])[:, :, None, :]
            @ v64[:, :, : prefix + i + 1] for i in range(block_length)]
    if rows:
        out = torch.stack(rows, dim=2).squeeze(3)  # [N, Hq, L, D]
    else:  # L = 0: no rows (torch.stack refuses an empty list)
        out = v64.new_empty(blocks, num_q_heads, 0, head_dim)
    out = out.transpose(1, 2)  # [N, L, Hq, D]
    lse = lse.transpose(1, 2)  # [N, L, Hq]
    out = torch.where(valid_row[:, :, None, None], out, 0.0)
    lse = torch.where(valid_row[:, :, None], lse, -math.inf)
    return out.to(torch.float32), lse.to(torch.float32)


# --------------------------------------------------------------------------------------------
# MLA (DeepSeek-V2/V3 multi-head latent attention).
# --------------------------------------------------------------------------------------------

__all__ += ["mla_decode", "mla_latent_project", "rope", "rope_cos_sin"]


def rope_cos_sin(max_position: int, rope_dim: int, theta: float = 10000.0) -> Tensor:
    """The RoPE table that ``mla_latent_project`` takes: ``[max_position, rope_dim]`` float32.

    Row ``p`` holds ``cos(p * f_i)`` in columns ``0 .. rope_dim/2 - 1`` and ``sin(p * f_i)`` in
    columns ``rope_dim/2 .. rope_dim - 1``, with ``f_i = theta ** (-2 i / rope_dim)``
    (computed in float64, stored as float32). Any table of this layout may be used instead
    (e.g. with YaRN-scaled frequencies).
    """
    if rope_dim <= 0 or rope_dim % 2:
        raise ValueError(f"rope_dim must be even and positive, got {rope_dim}")
    if max_position <= 0:
        raise ValueError(f"max_position must be positive, got {max_position}")
    inv_freq = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1).to(torch.float32)


def rope(x: Tensor, positions: Tensor, cos_sin: Tensor, interleaved: bool) -> Tensor:
    """Rotary position embedding of ``x`` ``[..., T, P]`` at ``positions`` ``[T]``, in float64.

    With ``c_i = cos_sin[pos, i]`` and ``s_i = cos_sin[pos, P/2 + i]`` for ``i < P/2``, each pair
    ``(a, b)`` of ``x`` becomes ``(a c_i - b s_i, b c_i + a s_i)``, where the pairs are
    ``(x[2i], x[2i+1])`` when ``interleaved`` (DeepSeek's layout) and ``(x[i], x[i + P/2])``
    otherwise (GPT-NeoX's half split). Positions must lie in ``[0, max_position)``.
    Returns a float64 tensor of ``x``'s shape.
    """
    rope_dim = x.shape[-1]
    half = rope_dim // 2
    if cos_sin.shape[-1] != rope_dim:
        raise ValueError(f"cos_sin must have rope_dim = {rope_dim} columns, got shape {tuple(cos_sin.shape)}")
    pos = positions.to(device=cos_sin.device, dtype=torch.long)
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= cos_sin.shape[0]):
        raise ValueError(f"positions must lie in [0, {cos_sin.shape[0]}) (cos_sin's rows), got {pos.tolist()}")
    table = cos_sin.to(torch.float64)[pos].to(x.device)  # [T, P]
    c, s = table[:, :half], table[:, half:]
    x64 = x.to(torch.float64)
    if interleaved:
        a, b = x64[..., 0::2], x64[..., 1::2]
        out = torch.empty_like(x64)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = b * c + a * s
        return out
    a, b = x64[..., :half], x64[..., half:]
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1)


def mla_latent_project(
    hidden: Tensor,
    w_dkv: Tensor,
    norm_weight: Tensor,
    eps: float,
    cos_sin: Tensor,
    positions: Tensor,
    latent_cache: Tensor,
    slot_mapping: Tensor,
    interleaved_rope: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """MLA's KV down-projection into the paged latent cache (functional: inputs unchanged).

    ``hidden`` ``[T, d_model]``, ``w_dkv`` ``[d_model, R + P]``, ``norm_weight`` ``[R]``,
    ``cos_sin`` ``[max_position, P]`` (see :func:`rope_cos_sin`), ``positions`` ``[T]`` int,
    ``latent_cache`` ``[num_pages, page_size, R + P]``, ``slot_mapping`` ``[T]`` int64. In float64:

        kv    = hidden @ w_dkv                                           [T, R + P]
        c_kv  = kv[:, :R] / sqrt(mean(kv[:, :R] ** 2, -1) + eps) * norm_weight
        k_pe  = rope(kv[:, R:], positions, cos_sin, interleaved_rope)
        cache'[slot // page_size, slot % page_size] = cat(c_kv, k_pe)   for slot = slot_mapping[t] >= 0

    (cast to the cache dtype; ``-1`` skips a token; other slots must be in range and distinct).
    Returns ``(cache' (a copy, cache dtype), c_kv [T, R] float32, k_pe [T, P] float32)``.
    """
    _check_dim(hidden, 2, "hidden", "[tokens, d_model]")
    _check_dim(w_dkv, 2, "w_dkv", "[d_model, kv_lora_rank + rope_dim]")
    _check_dim(norm_weight, 1, "norm_weight", "[kv_lora_rank]")
    _check_dim(latent_cache, 3, "latent_cache", "[num_pages, page_size, kv_lora_rank + rope_dim]")
    rank, rope_dim = norm_weight.shape[0], cos_sin.shape[1]
    if tuple(w_dkv.shape) != (hidden.shape[1], rank + rope_dim):
        raise ValueError(f"w_dkv must be [{hidden.shape[1]}, {rank + rope_dim}], got {tuple(w_dkv.shape)}")
    if latent_cache.shape[2] != rank + rope_dim:
        raise ValueError(f"latent_cache's last dim must be {rank + rope_dim}, got {latent_cache.shape[2]}")
    if slot_mapping.shape != (hidden.shape[0],) or positions.shape != (hidden.shape[0],):
        raise ValueError("slot_mapping and positions must have one entry per token")

    kv = hidden.to(torch.float64) @ w_dkv.to(device=hidden.device, dtype=torch.float64)
    c = kv[:, :rank]
    c_kv = c * torch.rsqrt(c.pow(2).mean(dim=-1, keepdim=True) + eps) * norm_weight.to(torch.float64)
    k_pe = rope(kv[:, rank:], positions, cos_sin, interleaved_rope)

    num_pages, page_size, width = latent_cache.shape
    slots = slot_mapping.to(device=latent_cache.device, dtype=torch.long)
    num_slots = num_pages * page_size
    bad = (slots < -1) | (slots >= num_slots)
    if bool(bad.any()):
        raise ValueError(f"slot_mapping entries must be -1 or in [0, {num_slots}), got {slots[bad].tolist()}")
    keep = slots >= 0
    new_cache = latent_cache.clone()
    flat = new_cache.view(num_slots, width)
    flat[slots[keep]] = torch.cat([c_kv, k_pe], dim=1)[keep].to(device=latent_cache.device, dtype=latent_cache.dtype)
    return new_cache, c_kv.to(torch.float32), k_pe.to(torch.float32)


def mla_decode(
    q: Tensor, latent_cache: Tensor, block_table: Tensor, seq_lens: Tensor, scale: float, v_dim: int
) -> tuple[Tensor, Tensor]:
    """Absorbed MLA decode: one query token per sequence over its paged latent cache.

    ``q`` ``[B, H, Dk]``, ``latent_cache`` ``[num_pages, page_size, Dk]``, ``block_table`` and
    ``seq_lens`` as in :func:`gqa_decode`. Every head attends to the same keys, the latent rows
    ``c_p`` of positions ``p in [0, seq_lens[b])``; the values are their first ``v_dim`` columns:

        logits[h, p] = scale * q[b, h] . c_p
        out[b, h]    = sum_p softmax_p(logits[h])[p] * c_p[:v_dim]
        lse[b, h]    = logsumexp_p(logits[h])             (natural log)

    An empty sequence gives ``out = 0``, ``lse = -inf``. Returns ``(out [B, H, v_dim] float32,
    lse [B, H] float32)``; the arithmetic is float64.
    """
    _check_dim(q, 3, "q", "[batch, num_heads, Dk]")
    _check_dim(latent_cache, 3, "latent_cache", "[num_pages, page_size, Dk]")
    _check_dim(block_table, 2, "block_table", "[batch, max_pages]")
    _check_dim(seq_lens, 1, "seq_lens", "[batch]")
    batch, num_heads, dk = q.shape
    num_pages, page_size, width = latent_cache.shape
    if width != dk:
        raise ValueError(f"latent_cache's last dim ({width}) must equal q's ({dk})")
    if not 0 < v_dim <= dk:
        raise ValueError(f"v_dim must be in [1, {dk}], got {v_dim}")
    out = torch.empty(batch, num_heads, v_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_heads, dtype=torch.float32, device=q.device)
    capacity = block_table.shape[1] * page_size
    for b, length in enumerate(int(x) for x in seq_lens.tolist()):
        if length < 0 or length > capacity:
            raise ValueError(f"seq_lens[{b}] = {length} must be in [0, max_pages * page_size = {capacity}]")
        used = block_table[b, : (length + page_size - 1) // page_size]
        if used.numel() and (bool((used < 0).any()) or bool((used >= num_pages).any())):
            raise ValueError(f"block_table[{b}] must hold page ids in [0, {num_pages}), got {used.tolist()}")
        if length == 0:
            out[b] = 0.0
            lse[b] = -math.inf
            continue
        pos = torch.arange(length, device=latent_cache.device)
        rows = latent_cache[block_table[b].long()[pos // page_size], pos % page_size].to(q.device, torch.float64)
        logits = scale * (q[b].to(torch.float64) @ rows.T)  # [H, L]
        s = torch.logsumexp(logits, dim=-1)
        out[b] = (torch.exp(logits - s[:, None]) @ rows[:, :v_dim]).to(torch.float32)
        lse[b] = s.to(torch.float32)
    return out, lse


# --------------------------------------------------------------------------------------------
# Eviction: attention scores over a window of queries, and cache compaction.
# --------------------------------------------------------------------------------------------

__all__ += ["attention_scores", "compact_kv"]

SCORE_REDUCTIONS = ("sum", "mean", "max")
SCORE_POOLINGS = ("none", "avg", "max")


def attention_scores(
    q: Tensor,
    k_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    lse: Tensor | None = None,
    scale: float | None = None,
    reduction: str = "sum",
    pooling: str = "none",
    pool_kernel: int = 5,
    max_len: int | None = None,
) -> Tensor:
    """Per-key eviction scores from a window of the last ``w`` queries of each sequence.

    ``q`` ``[B, w, Hq, D]``: query ``i`` of sequence ``b`` sits at position
    ``t_i = seq_lens[b] - w + i`` and sees the keys ``p <= t_i`` (causal inside the window; a
    query with ``t_i < 0`` sees nothing). With ``G = Hq // Hkv`` and ``scale`` defaulting to
    ``1 / sqrt(D)``, for query head ``hq = h * G + g``:

        logit[i, hq, p] = scale * q[b, i, hq] . k_p[h]                  (p <= t_i)
        lse[i, hq]      = logsumexp_{p <= t_i} logit[i, hq, p]          (or the caller's lse [B, w, Hq])
        prob[i, hq, p]  = exp(logit[i, hq, p] - lse[i, hq])   (0 for p > t_i)
        score[h, p]     = sum | mean | max over (i, g) of prob[i, h * G + g, p]

    ``mean`` divides the sum by ``w * G``. Then, with ``pooling`` ``"avg"`` / ``"max"``, the
    scores of the prefix keys ``p < seq_lens[b] - w`` (the keys before the window) are replaced
    by ``avg_pool1d`` / ``max_pool1d`` over that prefix alone with ``kernel_size = pool_kernel``
    (5 or 7), ``stride = 1`` and ``padding = pool_kernel // 2`` (avg counts the zero padding, as
    ``torch.nn.functional.avg_pool1d`` does by default: SnapKV's rule); the window keys' scores are
    not pooled. Keys ``p >= seq_lens[b]`` (up to ``max_len``, default the longest sequence) score 0.

    Returns ``[B, Hkv, max_len]`` **float64**.
    """
    _check_dim(q, 4, "q", "[batch, window, num_q_heads, head_dim]")
    _check_dim(k_cache, 4, "k_cache", "[num_pages, page_size, num_kv_heads, head_dim]")
    _check_dim(block_table, 2, "block_table", "[batch, max_pages]")
    _check_dim(seq_lens, 1, "seq_lens", "[batch]")
    if reduction not in SCORE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {SCORE_REDUCTIONS}, got {reduction!r}")
    if pooling not in SCORE_POOLINGS:
        raise ValueError(f"pooling must be one of {SCORE_POOLINGS}, got {pooling!r}")
    if pooling != "none" and pool_kernel not in (5, 7):
        raise ValueError(f"pool_kernel must be 5 or 7 when pooling is on, got {pool_kernel}")
    batch, window, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_cache.shape
    group = _check_group(num_q_heads, num_kv_heads)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    lens = [int(x) for x in seq_lens.tolist()]
    if max_len is None:
        max_len = max(lens + [0])
    out = torch.zeros(batch, num_kv_heads, max_len, dtype=torch.float64, device=q.device)
    for b, length in enumerate(lens):
        if length > max_len:
            raise ValueError(f"seq_lens[{b}] = {length} exceeds max_len = {max_len}")
        if length == 0:
            continue
        keys = gather_paged(k_cache, block_table[b], torch.arange(length)).to(torch.float64)  # [L, Hkv, D]
        keys = keys.repeat_interleave(group, dim=1)  # [L, Hq, D]
        logits = scale * torch.einsum("ihd,lhd->ihl", q[b].to(torch.float64), keys)  # [w, Hq, L]
        t = length - window + torch.arange(window, device=q.device)  # query positions
        visible = torch.arange(length, device=q.device)[None, :] <= t[:, None]  # [w, L]
        logits = logits.masked_fill(~visible[:, None, :], -math.inf)
        row_lse = torch.logsumexp(logits, dim=-1) if lse is None else lse[b].to(torch.float64)  # [w, Hq]
        prob = torch.exp(logits - row_lse[..., None])
        prob = torch.where(visible[:, None, :], prob, torch.zeros((), dtype=torch.float64, device=q.device))
        prob = prob.view(window, num_kv_heads, group, length)
        if reduction == "max":
            s = prob.amax(dim=(0, 2))
        else:
            s = prob.sum(dim=(0, 2))
            if reduction == "mean":
                s = s / (window * group)
        prefix = length - window
        if pooling != "none" and prefix > 0:
            pool = torch.nn.functional.avg_pool1d if pooling == "avg" else torch.nn.functional.max_pool1d
            s[:, :prefix] = pool(s[None, :, :prefix], kernel_size=pool_kernel, stride=1, padding=pool_kernel // 2)[0]
        out[b, :, :length] = s
    return out


def compact_kv(
    k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, kept: Tensor, kept_lens: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Compaction after eviction (functional: the inputs are not modified).

    For each sequence ``b`` and KV head ``h``, with ``n = kept_lens[b]`` and the positions
    ``kept[b, h, :n]`` (strictly increasing, in ``[0, seq_lens[b])``):

        k'[b, position i, head h] = k[b, position kept[b, h, i], head h]     for i < n (same for v)

    where "position" is read through the block table. Every other cache element is unchanged,
    and ``seq_lens'[b] = n``. Returns ``(k_cache', v_cache', seq_lens')``.
    """
    _check_cache_pair(k_cache, v_cache)
    _check_dim(kept, 3, "kept", "[batch, num_kv_heads, max_kept]")
    new_k, new_v = k_cache.clone(), v_cache.clone()
    page_size = k_cache.shape[1]
    lens = [int(x) for x in seq_lens.tolist()]
    for b, length in enumerate(lens):
        n = int(kept_lens[b])
        if n < 0 or n > min(length, kept.shape[2]):
            raise ValueError(f"kept_lens[{b}] = {n} must be in [0, min(seq_len {length}, max_kept {kept.shape[2]})]")
        for h in range(k_cache.shape[2]):
            src = kept[b, h, :n].to(torch.long).cpu()
            if n and (bool((src[1:] <= src[:-1]).any()) or int(src[0]) < 0 or int(src[-1]) >= length):
                raise ValueError(f"kept[{b}, {h}] must be strictly increasing positions in [0, {length})")
            dst = torch.arange(n)
            pages = block_table[b].to(torch.long).cpu()
            sp, so = pages[src // page_size], src % page_size
            dp, do = pages[dst // page_size], dst % page_size
            new_k[dp, do, h] = k_cache[sp, so, h]
            new_v[dp, do, h] = v_cache[sp, so, h]
    new_lens = kept_lens.to(device=seq_lens.device, dtype=seq_lens.dtype).clone()
    return new_k, new_v, new_lens


# --------------------------------------------------------------------------------------------
# InfLLM / Quest retrieval scoring (kvcore.retrieval; issue 5)
# --------------------------------------------------------------------------------------------

__all__ += ["infllm_representative_keys", "infllm_unit_scores", "quest_page_scores", "topk_rows", "topk_set"]


def infllm_representative_keys(unit_keys: Tensor, token_scores: Tensor, repr_topk: int) -> Tensor:
    """Representative keys of InfLLM memory units, per KV head (float64).

    ``unit_keys [B, U, bs, Hkv, D]``, ``token_scores [B, U, bs, Hkv]``: for each ``(b, u, h)``
    the mean of the keys of the ``repr_topk`` tokens ``t`` with the largest
    ``token_scores[b, u, t, h]`` (ties broken towards the smaller ``t``). Returns ``[B, U, Hkv, D]``.
    """
    _check_dim(unit_keys, 5, "unit_keys", "[B, U, block_size, Hkv, D]")
    b_, u_, bs, hkv, d = unit_keys.shape
    out = torch.empty(b_, u_, hkv, d, dtype=torch.float64, device=unit_keys.device)
    for b in range(b_):
        for u in range(u_):
            for h in range(hkv):
                s = token_scores[b, u, :, h].double().tolist()
                order = sorted(range(bs), key=lambda t: (-s[t], t))[:repr_topk]
                out[b, u, h] = unit_keys[b, u, order, h].double().mean(dim=0)
    return out


def infllm_unit_scores(q: Tensor, repr_keys: Tensor, per_kv_head: bool = False) -> Tensor:
    """InfLLM unit scores (float64).

    ``q [B, Hq, D]`` (or ``[B, T, Hq, D]``, averaged over ``T``), ``repr_keys [B, U, Hkv, D]``::

        s[b, h, u] = sum over query heads hq with hq // (Hq / Hkv) == h of  q[b, hq] . repr_keys[b, u, h]

    Returns ``s [B, Hkv, U]`` with ``per_kv_head``, else ``sum_h s [B, U]``.
    """
    qd = q.double().mean(dim=1) if q.dim() == 4 else q.double()
    b_, hq, d = qd.shape
    hkv = repr_keys.shape[2]
    g = _check_group(hq, hkv)
    s = torch.zeros(b_, hkv, repr_keys.shape[1], dtype=torch.float64, device=q.device)
    for hh in range(hq):
        s[:, hh // g] += torch.einsum("bd,bud->bu", qd[:, hh], repr_keys[:, :, hh // g].double())
    return s if per_kv_head else s.sum(dim=1)


def quest_page_scores(q: Tensor, k_cache: Tensor, block_table: Tensor, seq_lens: Tensor) -> Tensor:
    """Quest's upper-bound page scores from the cache itself (float64), ``[B, Hkv, max_pages]``.

    For logical page ``j`` of sequence ``b`` holding positions ``P = [j * ps, min((j + 1) * ps,
    seq_len))``, ``m_d = min_{p in P} k[p, h, d]`` and ``M_d = max_{p in P} k[p, h, d]``::

        score[b, h, j] = sum_{hq in group h} sum_d max(q[b, hq, d] * m_d, q[b, hq, d] * M_d)

    and ``-inf`` for pages past the sequence.
    """
    b_, hq, d = q.shape
    ps, hkv = k_cache.shape[1], k_cache.shape[2]
    g = _check_group(hq, hkv)
    n_pages = block_table.shape[1]
    out = torch.full((b_, hkv, n_pages), -math.inf, dtype=torch.float64, device=q.device)
    for b in range(b_):
        length = int(seq_lens[b])
        for j in range(-(-length // ps)):
            pos = torch.arange(j * ps, min((j + 1) * ps, length), device=q.device)
            keys = gather_paged(k_cache, block_table[b], pos).double()  # [n, Hkv, D]
            lo, hi = keys.min(dim=0).values, keys.max(dim=0).values
            out[b, :, j] = 0.0
            for hh in range(hq):
                qq = q[b, hh].double()
                out[b, hh // g, j] += torch.maximum(qq * lo[hh // g], qq * hi[hh // g]).sum()
    return out


def topk_set(scores: Tensor, k: int) -> list:
    """For each row of ``scores [..., U]`` (flattened to rows): the set of indices whose score is
    strictly above the ``k``-th largest, and the ``k``-th largest value itself. A correct top-k
    returns all of the former plus any indices holding the latter (ties)."""
    rows = scores.reshape(-1, scores.shape[-1]).double()
    result = []
    for row in rows:
        kth = float(row.sort(descending=True).values[k - 1])
        result.append(({i for i, x in enumerate(row.tolist()) if x > kth}, kth))
    return result


def topk_rows(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Row-wise top-k in kvcore's total order (the definition of ``kvcore.topk_rows``).

    ``scores [N, U]``: per row the ``k`` best columns, best first, where a column ranks above
    another when its score is larger, or equal (``-0.0 == +0.0``) with a smaller column; NaN ranks
    below every number, ``-inf`` included. Slots ``j >= U`` (``k > U``) hold value ``-inf`` and
    index ``-1``. Returns ``(values [N, k]`` float32 (the scores as given), ``indices [N, k]``
    int64).
    """
    _check_dim(scores, 2, "scores", "[N, U]")
    n, u = scores.shape
    s = scores.double().cpu()
    nan = torch.isnan(s)
    # Two stable sorts: by score descending (NaN parked at -inf, ties keep column order), then
    # NaN after every number (relative order kept).
    order = torch.sort(torch.where(nan, torch.full_like(s, -math.inf), s), dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(nan.gather(1, order).to(torch.int8), dim=1, stable=True).indices)
    kk = min(k, u)
    values = torch.full((n, k), -math.inf, dtype=torch.float32)
    indices = torch.full((n, k), -1, dtype=torch.int64)
    values[:, :kk] = scores.float().cpu().gather(1, order[:, :kk])
    indices[:, :kk] = order[:, :kk]
    return values.to(scores.device), indices.to(scores.device)
