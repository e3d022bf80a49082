"""The ``decode`` group: paged GQA decode (one query token per sequence), kvcore vs peers.

Bytes that must be read per call: the K and V pages touched (B * S * Hkv * D * 2 * itemsize) plus
q and out; FLOPs: 4 * B * Hq * S * D (QK^T and PV). Every implementation's output is checked
against an fp32 evaluation of the plain-torch form on the same paged inputs before it is timed;
a wrong result is reported as an error row, never as a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import peers, runner
from .harness import RunContext, dtype_suffix

GROUP = "decode"


# Max abs error against the fp32 reference that an output may have and still be timed.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-3}


@dataclass(frozen=True)
class DecodeCase:
    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    seq_len: int
    page_size: int = 16
    dtype: torch.dtype = torch.bfloat16
    # Lengths drawn uniformly from [1, seq_len] (fixed per shape; seq_len stays the block table's
    # capacity) instead of seq_len for every sequence: a serving batch's mix, where a kernel
    # choice made from shapes alone meets sequences of unequal work.
    ragged: bool = False
    # > 0: the block table is this many tokens wide (its columns past a sequence's pages hold stale
    # page ids), as a CUDA graph's or a serving engine's table sized for the model's context; the
    # split count kvcore picks from shapes then follows this width, not seq_len. 0: seq_len's pages.
    table_tokens: int = 0
    # Each sequence's pages in cache order (sequence b's i-th page is page b * pages_per_seq + i:
    # how FlashInfer's decode benchmark lays them out, and how PagedKVCache hands out a prompt's
    # pages) instead of a random permutation of all pages (the default: a cache after much churn).
    # The caches and q are drawn the same either way (only which pages a sequence reads differ);
    # the bytes moved, and the contiguous-K/V peers' work, are the same.
    pages_in_order: bool = False
    # Each page's K and V side by side in one [num_pages, 2, page_size, Hkv, D] buffer (k_cache and
    # v_cache its two halves, pages 2 * page_size * Hkv * D elements apart: FlashInfer's paged
    # layout) instead of two separate caches: a random table then scatters half as many runs of
    # twice the length. Same values, same bytes moved.
    pages_paired: bool = False

    @property
    def name(self) -> str:
        s = (
            f"B{self.batch} Hq{self.num_q_heads} Hkv{self.num_kv_heads} D{self.head_dim} "
            f"S{self.seq_len} page{self.page_size}"
        )
        s += " ragged" if self.ragged else ""
        s += f" table{self.table_tokens}" if self.table_tokens else ""
        s += " in-order" if self.pages_in_order else ""
        s += " paired" if self.pages_paired else ""
        s += dtype_suffix(self.dtype)
        return s

    def seq_lens(self) -> list:
        """Each sequence's length: seq_len, or (ragged) uniform in [1, seq_len] from a seed fixed
        by the shape, so that the byte count and every run see the same lengths."""
        if not self.ragged:
            return [self.seq_len] * self.batch
        gen = torch.Generator().manual_seed(1_000_003 * self.batch + self.seq_len)
        return torch.randint(1, self.seq_len + 1, (self.batch,), generator=gen).tolist()

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes that must be moved: the K and V rows of every sequence's tokens, q read, out written."""
        kv = sum(self.seq_lens()) * self.num_kv_heads * self.head_dim * 2 * self.itemsize
        q_and_out = 2 * self.batch * self.num_q_heads * self.head_dim * self.itemsize
        return kv + q_and_out

    @property
    def flops(self) -> int:
        return 4 * self.num_q_heads * sum(self.seq_lens()) * self.head_dim


def cases(device: torch.device, quick: bool) -> list:
    """The decode grid: the full GPU grid, or a few small cases (quick mode, and always on CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and not quick:
        grid = [(32, 1, 32768), (32, 1, 131072), (32, 16, 8192), (32, 64, 4096), (32, 128, 2048), (64, 32, 8192)]
        # and two ragged batches (only the paged peers take unequal lengths), two batches in a
        # block table sized for a 131072-token context, and the grid again with every sequence's
        # pages in cache order (what the random page order costs the paged decoders). (The
        # pages_paired layout saved nothing on an H100 in session 32: bench/NOTES.md.)
        return [DecodeCase(b, hq, 8, 128, s) for hq, b, s in grid] + [
            DecodeCase(16, 32, 8, 128, 8192, ragged=True), DecodeCase(64, 32, 8, 128, 4096, ragged=True),
            DecodeCase(1, 32, 8, 128, 4096, table_tokens=131072), DecodeCase(8, 32, 8, 128, 8192, table_tokens=131072)
        ] + [DecodeCase(b, hq, 8, 128, s, pages_in_order=True) for hq, b, s in grid]
    if device.type == "cuda":
        return [DecodeCase(2, 32, 8, 128, 4096), DecodeCase(16, 32, 8, 128, 1024),
                DecodeCase(16, 32, 8, 128, 1024, ragged=True), DecodeCase(2, 32, 8, 128, 1024, table_tokens=32768),
                DecodeCase(16, 32, 8, 128, 1024, pages_paired=True)]
    return [
        DecodeCase(2, 8, 2, 64, 512, dtype=torch.float32),
        DecodeCase(2, 8, 2, 64, 512, dtype=torch.float32, pages_paired=True),
        DecodeCase(1, 32, 8, 128, 2048, dtype=torch.float32),
        DecodeCase(2, 8, 2, 64, 512, dtype=torch.bfloat16),
        DecodeCase(4, 8, 2, 64, 512, dtype=torch.float32, ragged=True),
        DecodeCase(2, 8, 2, 64, 512, dtype=torch.float32, table_tokens=4096),
    ]


def impls(device: torch.device) -> list:
    """Implementations run by default on this device, in report column order."""
    return list(peers.GPU_IMPLS if torch.device(device).type == "cuda" else peers.CPU_IMPLS)


def known_impls() -> list:
    return list(peers.BUILDERS)


def make_inputs(case: DecodeCase, device: torch.device, seed: int = 0) -> peers.DecodeInputs:
    """Random (never zero) q and paged K/V; pages assigned to sequences in a random order, or in
    cache order with pages_in_order (every sequence gets seq_len's pages; ragged cases use only the
    first pages of some), then a table widened to table_tokens with stale (valid, unused) page
    ids. q and the caches are drawn the same whatever the order."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed + 1)
    b, hq, hkv, d, s, p = (
        case.batch,
        case.num_q_heads,
        case.num_kv_heads,
        case.head_dim,
        case.seq_len,
        case.page_size,
    )
    pages_per_seq = math.ceil(s / p)
    num_pages = b * pages_per_seq
    kw = {"dtype": case.dtype, "device": device, "generator": gen}
    k_cache = torch.randn(num_pages, p, hkv, d, **kw)
    v_cache = torch.randn(num_pages, p, hkv, d, **kw)
    q = torch.randn(b, hq, d, **kw)
    kv_pairs = None
    if case.pages_paired:
        kv_pairs = torch.stack([k_cache, v_cache], dim=1)
        del k_cache, v_cache
        k_cache, v_cache = kv_pairs[:, 0], kv_pairs[:, 1]
    perm = torch.randperm(num_pages, generator=cpu_gen)  # drawn either way: the same generator state after
    if case.pages_in_order:
        perm = torch.arange(num_pages)
    block_table = perm.view(b, pages_per_seq).to(torch.int32)
    if case.table_tokens > s:
        stale = torch.randint(num_pages, (b, math.ceil(case.table_tokens / p) - pages_per_seq), generator=cpu_gen)
        block_table = torch.cat([block_table, stale.to(torch.int32)], dim=1)
    block_table = block_table.to(device)
    seq_lens = torch.tensor(case.seq_lens(), dtype=torch.int32, device=device)
    return peers.DecodeInputs(q, k_cache, v_cache, block_table, seq_lens, scale=d**-0.5, kv_pairs=kv_pairs)


def run(case: DecodeCase, impl_names: Sequence[str], ctx: RunContext) -> list:
    """Time each implementation on one case; one row per implementation (skips and errors too)."""
    inputs = make_inputs(case, ctx.device, seed=ctx.seed)
    try:
        ref = peers.reference_output(inputs)
        return runner.time_all(GROUP, case, impl_names, ctx, lambda name: (lambda: peers.build(name, inputs)), ref,
                               TOLERANCE.get(case.dtype, 2e-2))
    finally:
        del inputs
        ctx.free_memory()
