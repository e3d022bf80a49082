"""Paged KV cache with cross-layer KV sharing (CLA / MLKV).

``PagedKVCache`` owns the KV memory of a model: one K and one V tensor
``[num_pages, page_size, num_kv_heads, head_dim]`` per *store*, a page allocator, and one block
table per sequence. Several layers may map to one store (cross-layer attention, Brandon et al.
2024; multi-layer KV heads, Zuhri et al. 2024): the first layer mapped to a store (its
*producer*) writes the KV, the later ones only read it.

All stores share one allocator and one block table per sequence, so a page id indexes every
store: reserving a token reserves it in all stores at once.

Per-store lengths (PyramidKV gives each layer its own budget): :meth:`PagedKVCache.split_stores`
turns the one shared allocator into one per store, each starting as a copy of the shared state
(same free list, same pages and length per sequence; no data moves). From then on every store has
its own free list and, per sequence, its own pages and length, so a store that keeps fewer tokens
really gives its pages back. Methods that read or change one store's bookkeeping take ``store=``;
the ``*_per_store`` methods build every store's slots / tables / lengths in one upload.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._args import as_index as _index

__all__ = ["OutOfPagesError", "PagedKVCache"]

KV_LAYOUTS = ("separate", "paired")  # PagedKVCache's kv_layout values


def check_kv_layout(kv_layout: Any) -> str:
    """``kv_layout`` if it is one of KV_LAYOUTS, else a ValueError naming it."""
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be 'separate' or 'paired', got {kv_layout!r}")
    return kv_layout


class OutOfPagesError(RuntimeError):
    """``PagedKVCache.reserve`` needs more pages than are free (nothing was changed)."""


@dataclass
class _Sequence:
    length: int = 0
    pages: list[int] = field(default_factory=list)


def _as_int(value: Any, name: str, minimum: int) -> int:
    ivalue = _index(value)
    if ivalue is None:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if ivalue < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {ivalue}")
    return ivalue


def _as_list(value: Any, name: str) -> list:
    """``value`` (ids or counts, one per sequence: a sequence, iterable or 1-D tensor) as a list; a
    single int or string where the list goes is a TypeError naming the argument (``list(3)`` would
    say "'int' object is not iterable")."""
    if isinstance(value, Tensor):
        ok = value.dim() == 1
    else:
        ok = isinstance(value, Iterable) and not isinstance(value, (str, bytes))
    if not ok:
        raise TypeError(f"{name} must be a sequence with one entry per sequence (e.g. [3]), got {value!r}")
    return list(value)


def _ops():
    # Imported lazily: kvcore/__init__ imports this module, and kvcore.ops needs the extension.
    from kvcore import ops

    return ops


class PagedKVCache:
    """Paged K/V storage for ``num_layers`` layers mapped onto one or more shared stores.

    Args:
        num_layers: layers of the model.
        num_kv_heads, head_dim: KV heads and head size of every layer.
        num_pages: pages per store (every store has the same pages; a page id indexes all).
        page_size: tokens per page.
        dtype, device: of the K/V storage. ``dtype``: bfloat16 or float16, or float32 on CPU only
            (the CUDA attention kernels have no float32 path); ValueError otherwise.
        cla_share: CLA factor ``f``: layers ``[0, f)`` use store 0, ``[f, 2f)`` store 1, ...
        layer_to_store: explicit layer -> store map (MLKV), length ``num_layers``, store ids
            ``0 .. S-1`` all used. Exclusive with ``cla_share != 1``.
        kv_layout: ``"separate"`` (default): each store's K and V are two contiguous
            ``[num_pages, page_size, num_kv_heads, head_dim]`` tensors. ``"paired"``: one
            ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` buffer per store (FlashInfer's
            paged layout, a page's K right before its V), and ``kv()`` hands out its two halves,
            whose pages are twice as far apart; every op takes either.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        num_pages: int,
        page_size: int = 16,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        cla_share: int = 1,
        layer_to_store: Sequence[int] | None = None,
        kv_layout: str = "separate",
    ) -> None:
        self.num_layers = _as_int(num_layers, "num_layers", 1)
        self.num_kv_heads = _as_int(num_kv_heads, "num_kv_heads", 1)
        self.head_dim = _as_int(head_dim, "head_dim", 1)
        self.num_pages = _as_int(num_pages, "num_pages", 1)
        self.page_size = _as_int(page_size, "page_size", 1)
        cla_share = _as_int(cla_share, "cla_share", 1)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must name a torch device, got {device!r}") from exc
        # The dtypes the ops (append_paged_kv, gqa_decode) take, as InfLLMCache checks them.
        if self.device.type == "cuda":
            if dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(
                    f"dtype must be bfloat16 or float16 on CUDA (float32 is CPU-only: the CUDA decode "
                    f"kernels have no float32 path), got {dtype!r}"
                )
        elif dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
        self.dtype = dtype
        self.kv_layout = check_kv_layout(kv_layout)

        if layer_to_store is not None:
            if cla_share != 1:
                raise ValueError(
                    f"give either cla_share (got {cla_share}) or layer_to_store, not both"
                )
            mapping = self._check_layer_to_store(layer_to_store)
        else:
            mapping = [layer // cla_share for layer in range(self.num_layers)]
        self.cla_share = cla_share
        self._layer_to_store: tuple[int, ...] = tuple(mapping)
        self.num_stores = max(mapping) + 1
        # Producer of each store: the first layer mapped to it.
        self._producers: tuple[int, ...] = tuple(mapping.index(s) for s in range(self.num_stores))

        shape = (self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)
        # torch.empty on purpose: a slot is only read after it was written (never rely on zeros).
        if kv_layout == "paired":
            pairs = [torch.empty((shape[0], 2) + shape[1:], dtype=dtype, device=self.device)
                     for _ in range(self.num_stores)]
            self._k = [pair[:, 0] for pair in pairs]
            self._v = [pair[:, 1] for pair in pairs]
        else:
            self._k = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(self.num_stores)]
            self._v = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(self.num_stores)]

        # One allocator ("unit") while the stores share pages, one per store after split_stores().
        # Free pages as a stack; reversed so that a fresh cache hands out 0, 1, 2, ...
        self._frees: list[list[int]] = [list(range(self.num_pages - 1, -1, -1))]
        # Per sequence: its pages and length in each unit (one entry until split_stores()).
        self._seqs: dict[int, list[_Sequence]] = {}
        self._split = False
        self._next_id = 0

    def _check_layer_to_store(self, layer_to_store: Sequence[int]) -> list[int]:
        try:
            mapping = [_index(s) for s in layer_to_store]
        except TypeError:  # not iterable
            mapping = [None]
        if None in mapping:
            raise ValueError(f"layer_to_store must be a sequence of ints, got {layer_to_store!r}")
        if len(mapping) != self.num_layers:
            raise ValueError(
                f"layer_to_store must have one entry per layer (num_layers={self.num_layers}), "
                f"got {len(mapping)}"
            )
        num_stores = max(mapping) + 1
        if min(mapping) < 0 or set(mapping) != set(range(num_stores)):
            raise ValueError(
                f"layer_to_store must use every store id 0..S-1 (and only those), got {mapping}"
            )
        return mapping

    # ---------------------------------------------------------------- layer -> store mapping

    def _check_layer(self, layer: int) -> int:
        index = _index(layer)
        if index is None or not 0 <= index < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return index

    @property
    def layer_to_store(self) -> tuple[int, ...]:
        """Store id of every layer."""
        return self._layer_to_store

    def store_of(self, layer: int) -> int:
        """The store that ``layer`` reads (and, if it is the producer, writes)."""
        return self._layer_to_store[self._check_layer(layer)]

    def producer_of(self, layer: int) -> int:
        """The layer that writes the KV which ``layer`` reads."""
        return self._producers[self.store_of(layer)]

    def is_producer(self, layer: int) -> bool:
        """True if ``layer`` is the first layer of its store (it writes the KV)."""
        return self.producer_of(layer) == layer

    def kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(k_cache, v_cache)`` of ``layer``'s store; sharing layers get the same tensors."""
        store = self.store_of(layer)
        return self._k[store], self._v[store]

    # ---------------------------------------------------------------- sequences and pages

    @property
    def stores_split(self) -> bool:
        """True after :meth:`split_stores`: each store has its own allocator, pages and lengths."""
        return self._split

    def split_stores(self) -> None:
        """Give every store its own page allocator and per-sequence pages / lengths (irreversible).

        Each store starts as a copy of the shared state: the same free pages and, per sequence, the
        same page list and length, so nothing moves in memory and every block table stays valid.
        Afterwards the stores change independently (:meth:`truncate` / :meth:`reserve` with
        ``store=``, or all at once with :meth:`reserve_per_store`), and a page freed by one store can
        be handed to another sequence in that store only. A second call does nothing.
        """
        if self.stores_split:
            return
        shared = self._frees[0]
        self._frees = [list(shared) for _ in range(self.num_stores)]
        self._seqs = {
            seq_id: [_Sequence(units[0].length, list(units[0].pages)) for _ in range(self.num_stores)]
            for seq_id, units in self._seqs.items()
        }
        self._split = True

    def _check_store(self, store: int) -> int:
        index = _index(store)
        if index is None or not 0 <= index < self.num_stores:
            raise ValueError(f"store must be an int in [0, {self.num_stores}), got {store!r}")
        return index

    def _unit(self, store: int | None, action: str, *, mutates: bool = False) -> int | None:
        """Allocator index for ``store`` (None: every store, only valid while they share pages)."""
        if store is None:
            if mutates and len(self._frees) > 1:
                raise ValueError(
                    f"{action}: the stores are split (split_stores()), each has its own pages; pass store= "
                    f"(or use the *_per_store method)"
                )
            return None
        store = self._check_store(store)
        if len(self._frees) == 1:
            if mutates and self.num_stores > 1:
                raise ValueError(
                    f"{action}(store={store}): the stores share one allocator until split_stores(); "
                    f"call it first, or leave store=None"
                )
            return 0
        return store

    def _key(self, seq_id: int) -> int:
        """``seq_id`` as the int key of a live sequence: any integer-like id (an int, a numpy
        integer, a 0-d integer tensor such as an element of ``torch.tensor(ids)``), never a bool or
        a float; KeyError otherwise."""
        key = _index(seq_id)
        if key is None:
            raise KeyError(
                f"unknown sequence id {seq_id!r}: sequence ids are ints (from add_sequence()), got "
                f"{type(seq_id).__name__}; live ids: {sorted(self._seqs)}"
            )
        if key not in self._seqs:
            raise KeyError(
                f"unknown sequence id {key!r} (never added or already freed); live ids: {sorted(self._seqs)}"
            )
        return key

    def _get(self, seq_id: int) -> list[_Sequence]:
        return self._seqs[self._key(seq_id)]

    def _one(self, seq_id: int, store: int | None, what: str) -> _Sequence:
        """``seq_id``'s bookkeeping in ``store``; with ``store=None`` after a split, the stores must agree."""
        seq_id = self._key(seq_id)
        units = self._seqs[seq_id]
        unit = self._unit(store, what)
        if unit is not None:
            return units[unit]
        first = units[0]
        if any(u.length != first.length or u.pages != first.pages for u in units[1:]):
            raise ValueError(
                f"{what}: sequence {seq_id} holds different tokens/pages per store after split_stores() "
                f"(lengths {[u.length for u in units]}); pass store="
            )
        return first

    @property
    def seq_ids(self) -> list[int]:
        """Ids of the live sequences, in creation order."""
        return list(self._seqs)

    def add_sequence(self) -> int:
        """Start a new, empty sequence and return its id (ids are never reused)."""
        seq_id = self._next_id
        self._next_id += 1
        self._seqs[seq_id] = [_Sequence() for _ in self._frees]
        return seq_id

    def free(self, seq_id: int) -> None:
        """Drop a sequence and return its pages (in every store) to the free list."""
        seq_id = self._key(seq_id)
        units = self._seqs.pop(seq_id)
        # Pushed in reverse so the sequence's first page is handed out first again.
        for free, seq in zip(self._frees, units):
            free.extend(reversed(seq.pages))

    def seq_len(self, seq_id: int, store: int | None = None) -> int:
        """Tokens reserved so far for ``seq_id`` (in ``store``; ``None``: the one length all stores
        hold, a ValueError after :meth:`split_stores` if they differ)."""
        return self._one(seq_id, store, "seq_len").length

    def pages_of(self, seq_id: int, store: int | None = None) -> list[int]:
        """Page ids held by ``seq_id`` (in ``store``, see :meth:`seq_len`), in token order (a copy)."""
        return list(self._one(seq_id, store, "pages_of").pages)

    def reserve(self, seq_ids: Sequence[int], num_tokens: Sequence[int], store: int | None = None) -> Tensor:
        """Make room for ``num_tokens[i]`` new tokens at the end of sequence ``seq_ids[i]``.

        Allocates pages as needed and advances each sequence's length. Returns the
        ``slot_mapping`` int64 ``[sum(num_tokens)]`` on the cache device for the new tokens:
        those of ``seq_ids[0]`` first, in position order, then ``seq_ids[1]``'s, and so on.
        ``store``: after :meth:`split_stores`, the store to grow (required then; before, leave it
        ``None``: every store grows at once). :meth:`reserve_per_store` grows all split stores.

        Raises ``OutOfPagesError`` (a RuntimeError) when there are not enough free pages, and
        ValueError/KeyError for bad arguments; in every error case nothing is changed.
        """
        unit = self._unit(store, "reserve", mutates=True)
        seqs, counts, starts = self._grow_units(seq_ids, num_tokens, [0 if unit is None else unit])
        return self._upload(self._slots(seqs[0], counts, starts[0]))

    def reserve_per_store(self, seq_ids: Sequence[int], num_tokens: Sequence[int]) -> Tensor:
        """:meth:`reserve` in every store at once (all or nothing): int64 ``[num_stores, sum(num_tokens)]``
        slots, row ``s`` for store ``s``, in one upload. Before :meth:`split_stores` the rows are equal
        (an expanded view of one row)."""
        units = list(range(len(self._frees)))
        seqs, counts, starts = self._grow_units(seq_ids, num_tokens, units)
        slots = self._slots([q for u in units for q in seqs[u]], counts * len(units), [x for u in units for x in starts[u]])
        return self._upload(slots.view(len(units), sum(counts))).expand(self.num_stores, -1)

    def _slots(self, seqs: list[_Sequence], counts: list[int], starts: list[int]) -> Tensor:
        if sum(counts) <= 4096:
            # Decode steps and short chunks: plain Python then one conversion is several times
            # faster than torch ops per sequence (the eager step is host-bound).
            # One list and one array() of it: an array.extend per sequence costs twice as much.
            ps = self.page_size
            flat: list[int] = []
            for seq, n, start in zip(seqs, counts, starts):
                pages = seq.pages
                if n == 1:  # a decode step's token
                    flat.append(pages[start // ps] * ps + start % ps)
                elif n:
                    flat += [pages[p // ps] * ps + p % ps for p in range(start, start + n)]
            if not flat:
                return torch.empty(0, dtype=torch.int64)
            return torch.frombuffer(array("q", flat), dtype=torch.int64).clone()
        slot_parts = []
        for seq, n, start in zip(seqs, counts, starts):
            if n:
                positions = torch.arange(start, start + n, dtype=torch.int64)
                pages = torch.tensor(seq.pages, dtype=torch.int64)
                slot_parts.append(pages[positions // self.page_size] * self.page_size + positions % self.page_size)
        return torch.cat(slot_parts)

    def _grow(self, seq_ids: Sequence[int], num_tokens: Sequence[int],
              store: int | None = None) -> tuple[list[_Sequence], list[int], list[int]]:
        """``reserve`` without building the slot mapping: checks the arguments, allocates the pages
        and advances the lengths (all or nothing). Returns the sequences, the token counts and each
        sequence's length before the call. Used directly by callers that compute their slots on
        the device (the transformers adapter's CUDA-graph step); :meth:`_grow_units` grows several
        split stores at once."""
        unit = self._unit(store, "reserve", mutates=True)
        seqs, counts, starts = self._grow_units(seq_ids, num_tokens, [0 if unit is None else unit])
        return seqs[0], counts, starts[0]

    def _grow_units(self, seq_ids: Sequence[int], num_tokens: Sequence[int],
                    units: Sequence[int]) -> tuple[list[list[_Sequence]], list[int], list[list[int]]]:
        """Grow ``seq_ids`` in each allocator of ``units`` (all or nothing over all of them); returns,
        per unit, the sequences and their lengths before the call, and the token counts."""
        seq_ids = _as_list(seq_ids, "seq_ids")
        num_tokens = _as_list(num_tokens, "num_tokens")
        if len(seq_ids) != len(num_tokens):
            raise ValueError(
                f"num_tokens must have one entry per sequence in seq_ids ({len(seq_ids)}), "
                f"got {len(num_tokens)}"
            )
        seq_ids = [self._key(s) for s in seq_ids]  # ints, so that repeats are found below
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids must not repeat a sequence, got {seq_ids}")
        counts = [_as_int(n, f"num_tokens[{i}]", 0) for i, n in enumerate(num_tokens)]
        entries = [self._seqs[s] for s in seq_ids]
        per_unit = [[units_of[u] for units_of in entries] for u in units]

        new_pages = []
        for u, seqs in zip(units, per_unit):
            pages = [math.ceil((seq.length + n) / self.page_size) - len(seq.pages) for seq, n in zip(seqs, counts)]
            needed = sum(max(0, p) for p in pages)
            if needed > len(self._frees[u]):
                where = f" of store {u}" if len(self._frees) > 1 else ""
                raise OutOfPagesError(
                    f"reserve needs {needed} new pages{where} for {sum(counts)} tokens but only "
                    f"{len(self._frees[u])} of {self.num_pages} pages are free"
                )
            new_pages.append(pages)
        starts = [[seq.length for seq in seqs] for seqs in per_unit]
        for u, seqs, pages in zip(units, per_unit, new_pages):
            free = self._frees[u]
            for seq, n, extra in zip(seqs, counts, pages):
                for _ in range(extra):
                    seq.pages.append(free.pop())
                seq.length += n
        return per_unit, counts, starts

    def _upload(self, host: Tensor) -> Tensor:
        """Copy step metadata built on the host (slots, block tables, lengths) to the cache device.

        On CUDA through pinned memory without blocking: a plain ``.to(device)`` from pageable memory
        synchronises the stream, so every decode step would wait for the GPU to drain before the
        host could queue the step's kernels. torch's pinned-memory allocator keeps the staging
        buffer alive until the copy has run.
        """
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    @staticmethod
    def _table(seqs: list[_Sequence], max_pages: int | None = None) -> Tensor:
        """int32 ``[len(seqs), max_pages]`` on the host, rows zero-padded; ``max_pages`` defaults
        to the most pages any of ``seqs`` holds (at least 1)."""
        if max_pages is None:
            max_pages = max([1] + [len(seq.pages) for seq in seqs])
        # One flat list and one conversion: a torch.tensor per row costs ~5 us each, and an
        # array.extend per row twice what one array() of the whole list does (B128 x 19 pages:
        # 59 against 30 us).
        flat: list[int] = []
        for seq in seqs:
            flat += seq.pages
            pad = max_pages - len(seq.pages)
            if pad:  # (equal lengths, the common case, need none)
                flat += [0] * pad
        if not flat:
            return torch.zeros(len(seqs), max_pages, dtype=torch.int32)
        return torch.frombuffer(array("i", flat), dtype=torch.int32).clone().view(len(seqs), max_pages)

    def block_table(self, seq_ids: Sequence[int], store: int | None = None) -> Tensor:
        """int32 ``[B, max_pages]`` page ids of the listed sequences on the cache device (in
        ``store`` after :meth:`split_stores`; ``None``: the stores must agree, see :meth:`seq_len`).

        ``max_pages`` is the most pages any listed sequence holds (at least 1); unused entries
        are 0 (a valid page index, never read because of ``seq_lens``).
        """
        seqs = [self._one(s, store, "block_table") for s in _as_list(seq_ids, "seq_ids")]
        return self._upload(self._table(seqs))

    def block_table_per_store(self, seq_ids: Sequence[int]) -> Tensor:
        """int32 ``[num_stores, B, max_pages]``: :meth:`block_table` of every store in one upload
        (``max_pages`` over all stores); before :meth:`split_stores` an expanded view of one table."""
        entries = [self._get(s) for s in _as_list(seq_ids, "seq_ids")]
        per_unit = [[units[u] for units in entries] for u in range(len(self._frees))]
        flat = [seq for seqs in per_unit for seq in seqs]
        max_pages = max([1] + [len(seq.pages) for seq in flat])
        tables = self._table(flat, max_pages).view(len(per_unit), len(entries), max_pages)
        return self._upload(tables).expand(self.num_stores, -1, -1)

    def seq_lens(self, seq_ids: Sequence[int], store: int | None = None) -> Tensor:
        """int32 ``[B]`` lengths of the listed sequences on the cache device (in ``store``, see
        :meth:`seq_len`)."""
        return self._upload(torch.tensor(self._lengths(seq_ids, store), dtype=torch.int32))

    def _lengths(self, seq_ids: Sequence[int], store: int | None) -> list[int]:
        """The listed sequences' lengths in ``store`` as host ints (seq_lens' values)."""
        return [self._one(s, store, "seq_lens").length for s in _as_list(seq_ids, "seq_ids")]

    def seq_lens_per_store(self, seq_ids: Sequence[int]) -> Tensor:
        """int32 ``[num_stores, B]``: :meth:`seq_lens` of every store in one upload (an expanded
        view of one row before :meth:`split_stores`)."""
        entries = [self._get(s) for s in _as_list(seq_ids, "seq_ids")]
        lens = [[units[u].length for units in entries] for u in range(len(self._frees))]
        return self._upload(torch.tensor(lens, dtype=torch.int32).view(len(self._frees), len(entries))).expand(
            self.num_stores, -1)

    # ---------------------------------------------------------------- ops

    def append(self, layer: int, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
        """Write ``k``, ``v`` ``[T, Hkv, D]`` at ``slot_mapping`` into ``layer``'s store.

        Only a store's producer layer may write; the other layers reuse its KV.
        """
        layer = self._check_layer(layer)
        producer = self.producer_of(layer)
        if producer != layer:
            raise ValueError(
                f"layer {layer} shares store {self.store_of(layer)} with layer {producer}, whose "
                f"KV it reuses; append only for the producer layer {producer}"
            )
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 3 or tuple(t.shape[1:]) != (self.num_kv_heads, self.head_dim):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"{name} must be [num_tokens, {self.num_kv_heads}, {self.head_dim}], got {shape}"
                )
        if not isinstance(slot_mapping, Tensor) or slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
            shape = tuple(slot_mapping.shape) if isinstance(slot_mapping, Tensor) else type(slot_mapping).__name__
            raise ValueError(f"slot_mapping must be [{k.shape[0]}] (one slot per token of k), got {shape}")
        k_cache, v_cache = self.kv(layer)
        _ops().append_paged_kv(k, v, k_cache, v_cache, slot_mapping)

    def _append_reserved(self, layer: int, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
        """:meth:`append` for kvcore's own callers (the Block Transformer, the transformers
        adapter), whose slots came from this cache's :meth:`reserve`: their contents are not
        checked again (on a GPU that check is a device->host sync a call)."""
        with _ops()._trusted_indices():
            self.append(layer, k, v, slot_mapping)

    def decode(self, layer: int, q: Tensor, seq_ids: Sequence[int], **kwargs: Any) -> Any:
        """``kvcore.ops.gqa_decode`` of ``q`` ``[B, Hq, D]`` against ``layer``'s store for the
        sequences ``seq_ids`` (row ``i`` of ``q`` belongs to ``seq_ids[i]``).

        ``kwargs`` go to ``gqa_decode`` (``scale``, ``window_left``, ``logit_soft_cap``,
        ``out``, ``lse``, ``return_lse``, ...); returns what it returns. The cache knows the
        lengths on the host, so it passes them as ``plan_seq_lens`` (the split count is then
        planned for unequal lengths; equal ones as the shapes would plan for that length, and
        may pick the page-major kernel: see ``gqa_decode``) unless ``kwargs`` has one.
        """
        k_cache, v_cache = self.kv(layer)
        seq_ids = _as_list(seq_ids, "seq_ids")
        if not isinstance(q, Tensor) or q.dim() != 3 or q.shape[0] != len(seq_ids):
            shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ValueError(
                f"q must be [{len(seq_ids)}, num_q_heads, {self.head_dim}] (one row per seq_id), got {shape}"
            )
        store = self.store_of(layer)  # after split_stores() each store has its own table and lengths
        # One lookup a sequence for both the lengths and the table (what seq_lens and block_table
        # would each do again), the store's allocator resolved once; plain int ids (bool is not
        # one) skip _key's conversions, anything else and unknown ids take _one's checks.
        unit, live = self._unit(store, "seq_lens"), self._seqs
        if all(type(s) is int and s in live for s in seq_ids):
            seqs = [live[s][unit] for s in seq_ids]
        else:
            seqs = [self._one(s, store, "seq_lens") for s in seq_ids]
        lens = [seq.length for seq in seqs]
        kwargs.setdefault("plan_seq_lens", lens)
        table = self._table(seqs)
        ops = _ops()
        with ops._trusted_indices():  # the table and lengths are the allocator's own
            return ops.gqa_decode(
                q, k_cache, v_cache, self._upload(table), self._upload(torch.tensor(lens, dtype=torch.int32)), **kwargs
            )

    # ---------------------------------------------------------------- accounting

    @property
    def used_pages(self) -> int:
        """Pages in use. Before :meth:`split_stores` a page id covers every store; after it, the sum
        over the stores of the pages each uses (each then one store's page)."""
        return sum(self.num_pages - len(free) for free in self._frees)

    @property
    def free_pages(self) -> int:
        """Free pages, counted as :attr:`used_pages` counts."""
        return sum(len(free) for free in self._frees)

    def used_pages_per_store(self) -> list[int]:
        """Pages in use in each store (all equal before :meth:`split_stores`)."""
        used = [self.num_pages - len(free) for free in self._frees]
        return used * self.num_stores if len(used) == 1 else used

    def held_bytes(self, seq_ids: Sequence[int] | None = None) -> int:
        """K+V bytes of the whole pages that ``seq_ids`` (default: every live sequence) hold, over
        all stores: each store's pages times one store's page bytes, so pages freed by a store after
        :meth:`split_stores` no longer count."""
        ids = self.seq_ids if seq_ids is None else _as_list(seq_ids, "seq_ids")
        elem = torch.empty((), dtype=self.dtype).element_size()
        page_bytes = 2 * self.page_size * self.num_kv_heads * self.head_dim * elem  # one store's page
        per_unit = self.num_stores if len(self._frees) == 1 else 1  # a shared page id spans all stores
        pages = sum(len(seq.pages) for s in ids for seq in self._get(s))
        return pages * per_unit * page_bytes

    def memory_report(self) -> dict[str, Any]:
        """Sizes of the cache, and what cross-layer sharing saves.

        ``bytes_per_token``: K+V bytes one token of a sequence takes over all stores;
        ``bytes_per_token_one_store_per_layer``: the same without sharing (one store per layer);
        ``saving``: the second divided by the first (e.g. 2.0 for CLA with factor 2).
        """
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_store = 2 * self.num_kv_heads * self.head_dim * elem
        shared = self.num_stores * per_store
        unshared = self.num_layers * per_store
        return {
            "num_layers": self.num_layers,
            "num_stores": self.num_stores,
            "page_size": self.page_size,
            "num_pages": self.num_pages,
            "bytes_per_token": shared,
            "bytes_per_token_one_store_per_layer": unshared,
            "saving": unshared / shared,
            "allocated_bytes": sum(t.numel() * t.element_size() for t in self._k + self._v),
            "used_pages": self.used_pages,
            "free_pages": self.free_pages,
            "stores_split": self.stores_split,
            "used_pages_per_store": self.used_pages_per_store(),
        }

    def __repr__(self) -> str:
        return (
            f"PagedKVCache(layers={self.num_layers}, stores={self.num_stores}, "
            f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, pages={self.used_pages}/"
            f"{self.num_pages} used x {self.page_size} tokens, dtype={self.dtype}, "
            f"device={self.device}, sequences={len(self._seqs)}"
            + (", kv_layout=paired)" if self.kv_layout == "paired" else ")")
        )

    # ---------------------------------------------------------------- eviction

    def truncate(self, seq_id: int, new_len: int, store: int | None = None) -> int:
        """Shorten ``seq_id`` to ``new_len`` tokens and give back the pages it no longer needs.

        Used after :func:`kvcore.compact_kv` has moved the kept tokens of every store to the
        front of the sequence: the sequence keeps its first ``ceil(new_len / page_size)`` pages
        (in order), the rest go back to the free list. ``store=None`` truncates every store;
        with per-layer budgets (PyramidKV) call :meth:`split_stores` first and truncate each store
        to its own kept count (``store=``), so the pages a small store frees are really free.

        Returns the number of pages freed (summed over the stores after a split). Raises
        ``KeyError`` for an unknown sequence, ``ValueError`` for a ``store`` before
        :meth:`split_stores` or ``new_len`` outside ``[0, seq_len]`` (of every store truncated);
        nothing changes then.
        """
        units = self._get(seq_id)
        # store=None truncates every store, split or not (so it is not refused as a mutation).
        unit = None if store is None else self._unit(store, "truncate", mutates=True)
        targets = list(range(len(units))) if unit is None else [unit]
        shortest = min(units[u].length for u in targets)
        index = _index(new_len)
        if index is None or not 0 <= index <= shortest:
            raise ValueError(f"new_len must be an int in [0, {shortest}] (the sequence's length), got {new_len!r}")
        new_len = index
        keep = math.ceil(new_len / self.page_size)
        freed = 0
        for u in targets:
            seq = units[u]
            dropped = seq.pages[keep:]
            del seq.pages[keep:]
            seq.length = new_len
            self._frees[u].extend(reversed(dropped))
            freed += len(dropped)
        return freed
