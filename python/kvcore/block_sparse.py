"""Page selections for :func:`kvcore.block_sparse_decode`.

A selection says, per (sequence, KV head), which logical pages of the sequence its query heads
attend to: ``sel_pages [B, Hkv, max_sel]`` int32 (logical page numbers, i.e. indices into the
sequence's block-table row) and ``sel_counts [B, Hkv]`` int32 (how many entries of each list are
read). Attention sinks (the first pages of a sequence), the local window (its last pages) and
pages chosen by a retrieval policy (InfLLM's top-k memory units, Quest's top-k pages) are all
just pages in one list, so one call covers them; :func:`build_selection` merges the three.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import validation_enabled

__all__ = ["build_selection"]


def build_selection(
    seq_lens: Tensor,
    page_size: int,
    *,
    num_kv_heads: Optional[int] = None,
    chosen_pages: Optional[Tensor] = None,
    n_sink_pages: int = 0,
    n_local_pages: int = 0,
    max_pages: Optional[int] = None,
    max_sel: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Make ``(sel_pages, sel_counts)`` from chosen pages plus sink and local pages.

    For sequence ``b`` with ``n_b = ceil(seq_lens[b] / page_size)`` pages, the list of KV head
    ``h`` is the union of

    * the sink pages ``0 .. min(n_sink_pages, n_b) - 1``,
    * the local pages ``max(0, n_b - n_local_pages) .. n_b - 1`` (the last one may be partially
      filled; :func:`kvcore.block_sparse_decode` stops at ``seq_len``),
    * the chosen pages ``chosen_pages[b, h, :]`` that are ``>= 0`` (negative entries are padding),

    deduplicated and sorted ascending. Entries of ``sel_pages`` past ``sel_counts`` are ``-1``.
    Runs on ``seq_lens``'s device with tensor ops only; given ``max_pages`` and ``max_sel`` and
    with validation off (:func:`kvcore.set_validation`) it does no host synchronisation, so it can
    run inside a captured decode step.

    Args:
        seq_lens: ``[B]`` integer tensor, tokens per sequence.
        page_size: tokens per page (the cache's ``k_cache.shape[1]``).
        num_kv_heads: the number of KV heads; required without ``chosen_pages``, else it must
            equal ``chosen_pages.shape[1]``.
        chosen_pages: optional ``[B, num_kv_heads, K]`` integer tensor of logical pages per
            (sequence, KV head), e.g. a top-k over page scores; ``-1`` (any negative) pads.
            Duplicates, and pages that are also sinks or local, are merged.
        n_sink_pages: how many first pages every list gets (``>= 0``).
        n_local_pages: how many last pages every list gets (``>= 0``).
        max_pages: width of the page range considered, at least ``max_b n_b`` (e.g.
            ``block_table.shape[1]``); default ``max_b n_b`` (a host sync on a GPU).
        max_sel: the lists' capacity, ``sel_pages.shape[2]``; default the longest list (a host
            sync). A fixed value gives fixed shapes (CUDA graphs).

    Returns:
        ``sel_pages [B, num_kv_heads, max_sel]`` int32 and ``sel_counts [B, num_kv_heads]``
        int32, on ``seq_lens``'s device.

    Raises:
        ValueError: bad arguments; with validation on also a chosen page at or past its
            sequence's ``n_b``, a sequence longer than ``max_pages`` pages, or a list longer
            than ``max_sel``. With validation off such chosen pages are dropped, and lists are
            cut to their ``max_sel`` smallest pages.
    """
    if not isinstance(seq_lens, Tensor) or seq_lens.dim() != 1:
        raise ValueError(f"seq_lens must be a 1-D tensor [batch], got {getattr(seq_lens, 'shape', type(seq_lens))}")
    if seq_lens.is_floating_point() or seq_lens.is_complex():
        raise ValueError(f"seq_lens must have an integer dtype, got {seq_lens.dtype}")
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    if n_sink_pages < 0:
        raise ValueError(f"n_sink_pages must be >= 0, got {n_sink_pages}")
    if n_local_pages < 0:
        raise ValueError(f"n_local_pages must be >= 0, got {n_local_pages}")
    batch = seq_lens.shape[0]
    if chosen_pages is not None:
        if not isinstance(chosen_pages, Tensor) or chosen_pages.dim() != 3 or chosen_pages.shape[0] != batch:
            raise ValueError(
                f"chosen_pages must be a [batch = {batch}, num_kv_heads, K] tensor, got "
                f"{tuple(getattr(chosen_pages, 'shape', ()))}"
            )
        if chosen_pages.is_floating_point() or chosen_pages.is_complex():
            raise ValueError(f"chosen_pages must have an integer dtype, got {chosen_pages.dtype}")
        if num_kv_heads is not None and num_kv_heads != chosen_pages.shape[1]:
            raise ValueError(
                f"num_kv_heads ({num_kv_heads}) must equal chosen_pages.shape[1] ({chosen_pages.shape[1]})"
            )
        num_kv_heads = chosen_pages.shape[1]
    if num_kv_heads is None or num_kv_heads <= 0:
        raise ValueError(f"num_kv_heads must be a positive int (or given by chosen_pages), got {num_kv_heads}")
    if max_pages is not None and max_pages < 0:
        raise ValueError(f"max_pages must be >= 0, got {max_pages}")
    if max_sel is not None and max_sel < 0:
        raise ValueError(f"max_sel must be >= 0, got {max_sel}")

    device = seq_lens.device
    validate = validation_enabled()
    lens = seq_lens.to(torch.int64).clamp(min=0)
    used = (lens + page_size - 1) // page_size  # [B] pages per sequence
    if validate and batch and bool((seq_lens < 0).any()):
        raise ValueError(f"seq_lens must be >= 0, got {seq_lens.tolist()}")
    if max_pages is None:
        max_pages = int(used.max()) if batch else 0
    elif validate and batch and int(used.max()) > max_pages:
        b = int(used.argmax())
        raise ValueError(
            f"seq_lens[{b}] = {int(lens[b])} needs {int(used[b])} pages of {page_size}, more than max_pages = {max_pages}"
        )

    cols = torch.arange(max_pages, device=device)
    in_seq = cols.view(1, -1) < used.view(-1, 1)  # [B, P]
    keep = torch.zeros(batch, num_kv_heads, max_pages, dtype=torch.bool, device=device)
    if n_sink_pages:
        keep |= (in_seq & (cols.view(1, -1) < n_sink_pages)).unsqueeze(1)
    if n_local_pages:
        keep |= (in_seq & (cols.view(1, -1) >= (used - n_local_pages).view(-1, 1))).unsqueeze(1)
    if chosen_pages is not None and chosen_pages.shape[2] > 0:
        chosen = chosen_pages.to(device=device, dtype=torch.int64)
        past_end = chosen >= used.view(-1, 1, 1)
        if validate and bool(past_end.any()):
            b, h, j = (int(x) for x in past_end.nonzero()[0])
            raise ValueError(
                f"chosen_pages[{b}, {h}, {j}] = {int(chosen[b, h, j])} is not a page of sequence {b}: with "
                f"seq_lens[{b}] = {int(lens[b])} and page_size {page_size} the pages are [0, {int(used[b])})"
            )
        valid = (chosen >= 0) & ~past_end & (chosen < max_pages)
        # Invalid entries land in one extra column that is dropped afterwards.
        target = torch.where(valid, chosen, torch.full_like(chosen, max_pages))
        hits = torch.zeros(batch, num_kv_heads, max_pages + 1, dtype=torch.bool, device=device)
        hits.scatter_(2, target, True)
        keep |= hits[..., :max_pages]

    counts = keep.sum(dim=-1)  # [B, Hkv]
    if max_sel is None:
        max_sel = int(counts.max()) if counts.numel() else 0
    elif validate and counts.numel() and int(counts.max()) > max_sel:
        b, h = (int(x) for x in (counts > max_sel).nonzero()[0])
        raise ValueError(
            f"the list of sequence {b}, KV head {h} has {int(counts[b, h])} pages, more than max_sel = {max_sel}"
        )
    # Sort the kept page numbers first (the rest get the sentinel max_pages), keep max_sel of them.
    ordered = torch.where(keep, cols, torch.full_like(cols, max_pages)).sort(dim=-1).values
    if max_sel <= max_pages:
        ordered = ordered[..., :max_sel]
    else:
        pad = torch.full((batch, num_kv_heads, max_sel - max_pages), max_pages, dtype=ordered.dtype, device=device)
        ordered = torch.cat([ordered, pad], dim=-1)
    sel_pages = torch.where(ordered < max_pages, ordered, torch.full_like(ordered, -1)).to(torch.int32)
    sel_counts = counts.clamp(max=max_sel).to(torch.int32)
    return sel_pages.contiguous(), sel_counts.contiguous()
