"""The ``block`` group: block-sparse paged decode (each KV head attends to its own selected blocks).

The workload of retrieval attention (InfLLM, Quest): one query token per sequence, and per
(sequence, KV head) a list of ``blocks`` blocks of ``block_tokens`` tokens chosen out of the
sequence. kvcore reads them straight from the paged cache through ``block_sparse_decode``
(``page_size == block_tokens``: a block is a page; ``page_size 16``: a block is 8 pages).

Bytes that must be moved per call: the selected K and V rows (B * Hkv * blocks * block_tokens *
D * 2 * itemsize) plus q and out; FLOPs: 4 * B * Hq * blocks * block_tokens * D. Peers, each on
the same inputs and checked against an fp32 evaluation of the selected-token attention before
it is timed (a wrong result is an error row, never a time):

* ``flashinfer``: ``flashinfer.BlockSparseAttentionWrapper`` with one BSR row per (sequence, KV
  head) (R = 1, its Hq / Hkv query heads as the row's heads) over a head-major copy of the cache
  made before timing (so each page of one head is C = page_size contiguous key rows);
* ``flex_attention``: ``torch.compile(flex_attention)`` with the equivalent ``BlockMask`` over
  contiguous K/V ``[B, Hkv, S, D]`` (``enable_gqa``); eager on CPU;
* ``gather+sdpa``: gather the selected pages into contiguous K/V, then SDPA (``enable_gqa``),
  both inside the timing;
* ``torch``: the same gather, then matmul-softmax (the plain-torch InfLLM form).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import peers
from . import runner
from .decode import TOLERANCE
from .harness import RunContext, dtype_suffix

GROUP = "block"


@dataclass(frozen=True)
class BlockSparseCase:
    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    seq_len: int
    page_size: int = 128
    block_tokens: int = 128
    blocks: int = 37  # selected per (sequence, KV head)
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.block_tokens % self.page_size or self.seq_len % self.block_tokens:
            raise ValueError("block_tokens must be a multiple of page_size and seq_len a multiple of block_tokens")
        if self.blocks > self.seq_len // self.block_tokens:
            raise ValueError(f"cannot select {self.blocks} blocks of {self.seq_len // self.block_tokens}")

    @property
    def name(self) -> str:
        s = (
            f"B{self.batch} Hq{self.num_q_heads} Hkv{self.num_kv_heads} D{self.head_dim} S{self.seq_len} "
            f"page{self.page_size} sel{self.blocks}x{self.block_tokens}"
        )
        s += dtype_suffix(self.dtype)
        return s

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def selected_tokens(self) -> int:
        """Keys attended per (sequence, KV head)."""
        return self.blocks * self.block_tokens

    @property
    def nbytes(self) -> int:
        """Bytes that must be moved: the selected K and V rows, q read, out written."""
        kv = self.batch * self.num_kv_heads * self.selected_tokens * self.head_dim * 2 * self.itemsize
        return kv + 2 * self.batch * self.num_q_heads * self.head_dim * self.itemsize

    @property
    def flops(self) -> int:
        return 4 * self.batch * self.num_q_heads * self.selected_tokens * self.head_dim


def cases(device: torch.device, quick: bool) -> list:
    """The issue's grid on a GPU (37 blocks of 128 per KV head, pages of 128 and of 16), a small
    GPU grid in quick mode, and tiny cases on CPU."""
    device = torch.device(device)
    if device.type == "cuda" and not quick:
        return [
            BlockSparseCase(b, 32, 8, 128, s, page_size=p)
            for b, s in [(16, 32768), (1, 131072)]
            for p in (128, 16)
        ]
    if device.type == "cuda":
        return [BlockSparseCase(2, 32, 8, 128, 8192, page_size=p) for p in (128, 16)]
    return [
        BlockSparseCase(2, 8, 2, 64, 2048, page_size=128, blocks=5, dtype=torch.float32),
        BlockSparseCase(1, 8, 2, 64, 2048, page_size=16, blocks=5, dtype=torch.bfloat16),
    ]


_GPU_IMPLS = ["kvcore", "flashinfer", "flex_attention", "gather+sdpa", "torch"]
_CPU_IMPLS = ["kvcore", "flex_attention", "gather+sdpa", "torch"]


def impls(device: torch.device) -> list:
    """Implementations run by default on this device, in report column order."""
    return list(_GPU_IMPLS if torch.device(device).type == "cuda" else _CPU_IMPLS)


def known_impls() -> list:
    return list(BUILDERS)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class BlockSparseInputs:
    """A paged cache, the query, and each (sequence, KV head)'s selected blocks and pages."""

    q: torch.Tensor  # [B, Hq, D]
    k_cache: torch.Tensor  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [B, max_pages] int32
    seq_lens: torch.Tensor  # [B] int32
    blocks: torch.Tensor  # [B, Hkv, n_blocks] int64, selected block ids (sorted)
    sel_pages: torch.Tensor  # [B, Hkv, n_blocks * pages_per_block] int32, logical pages
    sel_counts: torch.Tensor  # [B, Hkv] int32
    block_tokens: int
    scale: float
    _contig: Optional[tuple] = field(default=None, repr=False)

    @property
    def page_size(self) -> int:
        return self.k_cache.shape[1]

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.k_cache.shape[2]

    def gather_selected(self) -> tuple:
        """K and V of the selected pages as ``[B, Hkv, selected_tokens, D]`` (a copy, each call)."""
        b, hkv, n = self.sel_pages.shape
        phys = self.block_table.long().gather(1, self.sel_pages.reshape(b, hkv * n).long()).view(b, hkv, n)
        heads = torch.arange(hkv, device=phys.device).view(1, hkv, 1)

        def gather(cache: torch.Tensor) -> torch.Tensor:
            # cache viewed [pages, Hkv, page_size, D]: (page, head) picks one head's page rows
            rows = cache.permute(0, 2, 1, 3)[phys, heads]  # [B, Hkv, n, page_size, D]
            return rows.reshape(b, hkv, n * self.page_size, cache.shape[3])

        return gather(self.k_cache), gather(self.v_cache)

    def contiguous_kv(self) -> tuple:
        """Every token's K and V as dense ``[B, Hkv, S, D]`` (cached; for flex_attention)."""
        if self._contig is None:
            s = int(self.seq_lens.max())
            pages = s // self.page_size
            idx = self.block_table[:, :pages].long()
            b, hkv, d = self.q.shape[0], self.k_cache.shape[2], self.q.shape[2]

            def gather(cache: torch.Tensor) -> torch.Tensor:
                return cache[idx].reshape(b, s, hkv, d).permute(0, 2, 1, 3).contiguous()

            self._contig = (gather(self.k_cache), gather(self.v_cache))
        return self._contig


def make_inputs(case: BlockSparseCase, device: torch.device, seed: int = 0) -> BlockSparseInputs:
    """Random (never zero) q and paged K/V with shuffled pages; per (sequence, KV head) a random
    set of ``case.blocks`` distinct blocks, listed as their pages."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed + 1)
    b, hq, hkv, d, s, p = case.batch, case.num_q_heads, case.num_kv_heads, case.head_dim, case.seq_len, case.page_size
    pages_per_seq = s // p
    num_pages = b * pages_per_seq
    kw = {"dtype": case.dtype, "device": device, "generator": gen}
    k_cache = torch.randn(num_pages, p, hkv, d, **kw)
    v_cache = torch.randn(num_pages, p, hkv, d, **kw)
    q = torch.randn(b, hq, d, **kw)
    block_table = torch.randperm(num_pages, generator=cpu_gen).view(b, pages_per_seq).to(torch.int32).to(device)
    seq_lens = torch.full((b,), s, dtype=torch.int32, device=device)

    n_blocks = s // case.block_tokens
    blocks = torch.stack([torch.randperm(n_blocks, generator=cpu_gen)[: case.blocks] for _ in range(b * hkv)])
    blocks = blocks.sort(dim=-1).values.view(b, hkv, case.blocks)
    per_block = case.block_tokens // p
    sel_pages = (blocks.unsqueeze(-1) * per_block + torch.arange(per_block)).reshape(b, hkv, -1)
    sel_counts = torch.full((b, hkv), sel_pages.shape[2], dtype=torch.int32)
    return BlockSparseInputs(
        q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens,
        blocks=blocks.to(device), sel_pages=sel_pages.to(torch.int32).to(device), sel_counts=sel_counts.to(device),
        block_tokens=case.block_tokens, scale=d**-0.5,
    )


def reference_output(inputs: BlockSparseInputs) -> torch.Tensor:
    """fp32 attention over exactly the selected tokens (the correctness yardstick)."""
    k, v = inputs.gather_selected()
    return peers.grouped_attention(inputs.q.float(), k.float(), v.float(), inputs.scale)


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------


def build_kvcore(inputs: BlockSparseInputs) -> list:
    kvcore = peers.import_kvcore("block_sparse_decode")
    q = inputs.q
    if q.is_cuda and not torch._C._dispatch_has_kernel_for_dispatch_key("kvcore::block_sparse_decode", "CUDA"):
        raise peers.Skip("this kvcore build has no CUDA kernel for block_sparse_decode")
    out = torch.empty_like(q)
    workspace = kvcore.decode_workspace(q.device) if q.is_cuda else None
    args = (q, inputs.k_cache, inputs.v_cache, inputs.block_table, inputs.seq_lens, inputs.sel_pages, inputs.sel_counts)

    def fn() -> torch.Tensor:
        kvcore.block_sparse_decode(*args, scale=inputs.scale, out=out, workspace=workspace)
        return out

    before, after = peers.validation_off_while_timed(kvcore)
    return [peers.Prepared(fn=fn, out=out, before_timing=before, after_timing=after)]


def build_torch(inputs: BlockSparseInputs) -> list:
    q, scale = inputs.q, inputs.scale

    def fn() -> torch.Tensor:
        k, v = inputs.gather_selected()
        return peers.grouped_attention(q, k, v, scale)

    return [peers.Prepared(fn=fn)]


def build_gather_sdpa(inputs: BlockSparseInputs) -> list:
    b, hq, d = inputs.q.shape
    q4 = inputs.q.unsqueeze(2)

    def fn() -> torch.Tensor:
        k, v = inputs.gather_selected()
        return F.scaled_dot_product_attention(q4, k, v, scale=inputs.scale, enable_gqa=True).view(b, hq, d)

    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        raise peers.Skip(f"SDPA with enable_gqa failed: {peers._first_line(exc)}") from exc
    return [peers.Prepared(fn=fn)]


_compiled_flex: dict = {}


def _flex_fn(device: torch.device) -> tuple:
    """(flex_attention callable, note): compiled on CUDA (once per process), eager on CPU."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        raise peers.Skip(f"torch.nn.attention.flex_attention unavailable: {peers._first_line(exc)}") from exc
    if device.type != "cuda":
        return flex_attention, "eager (unfused) on CPU"
    if "cuda" not in _compiled_flex:
        _compiled_flex["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex["cuda"], "torch.compile(flex_attention)"


def build_flex_attention(inputs: BlockSparseInputs) -> list:
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as exc:
        raise peers.Skip(f"torch.nn.attention.flex_attention unavailable: {peers._first_line(exc)}") from exc
    k, v = inputs.contiguous_kv()
    b, hkv, s, d = k.shape
    hq, g, blk = inputs.q.shape[1], inputs.group, inputs.block_tokens
    keep = torch.zeros(b, hkv, s // blk, dtype=torch.bool, device=k.device)
    keep.scatter_(2, inputs.blocks, True)

    def mask_mod(bi, hi, q_idx, kv_idx):
        return keep[bi, hi // g, kv_idx // blk]

    block_mask = create_block_mask(mask_mod, b, hq, 1, s, device=k.device, BLOCK_SIZE=(128, blk))
    flex, note = _flex_fn(k.device)
    q4 = inputs.q.unsqueeze(2)

    def fn() -> torch.Tensor:
        return flex(q4, k, v, block_mask=block_mask, scale=inputs.scale, enable_gqa=True).view(b, hq, d)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the eager path warns that it is unfused, once
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            raise peers.Skip(f"{note} failed: {peers._first_line(exc)}") from exc
    return [peers.Prepared(fn=fn, notes=note, context=_quiet)]


@contextlib.contextmanager
def _quiet():
    """Silence flex_attention's one-time warnings (e.g. that the eager path is unfused)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass
class BsrLayout:
    """The block-sparse problem as one BSR attention (FlashInfer's BlockSparseAttentionWrapper):
    query rows ``q [M, num_qo_heads, D]``, key/value rows ``k, v [N, num_kv_heads, D]``, and
    row ``i`` attending to the key blocks ``indices[indptr[i]:indptr[i + 1]]`` of ``C`` rows each
    (block ``j`` = key rows ``j * C .. j * C + C - 1``); ``R`` query rows per BSR row."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    indptr: torch.Tensor  # [M / R + 1] int32
    indices: torch.Tensor  # [nnz] int32
    M: int
    N: int
    R: int
    C: int
    num_qo_heads: int
    num_kv_heads: int


def bsr_layout(inputs: BlockSparseInputs) -> BsrLayout:
    """One BSR row per (sequence, KV head) with R = 1: the row's heads are the KV group's G query
    heads against one KV head. Keys are the rows of a head-major copy of the cache,
    ``[num_pages, Hkv, page_size, D]`` flattened, so key block ``page * Hkv + head`` is that head's
    ``page_size`` contiguous rows of that page (C = page_size). Every selected page is full here
    (the bench's sequences are whole pages), which the wrapper's fixed block length needs."""
    b, hq, d = inputs.q.shape
    num_pages, ps, hkv, _ = inputs.k_cache.shape
    dev = inputs.q.device
    k_rows = inputs.k_cache.permute(0, 2, 1, 3).contiguous().view(num_pages * hkv * ps, 1, d)
    v_rows = inputs.v_cache.permute(0, 2, 1, 3).contiguous().view(num_pages * hkv * ps, 1, d)
    n = inputs.sel_pages.shape[2]
    phys = inputs.block_table.long().gather(1, inputs.sel_pages.reshape(b, hkv * n).long()).view(b, hkv, n)
    live = torch.arange(n, device=dev).view(1, 1, n) < inputs.sel_counts.unsqueeze(-1)
    indices = (phys * hkv + torch.arange(hkv, device=dev).view(1, hkv, 1))[live].to(torch.int32)
    indptr = torch.zeros(b * hkv + 1, dtype=torch.int32, device=dev)
    indptr[1:] = inputs.sel_counts.reshape(-1).to(torch.int64).cumsum(0).to(torch.int32)
    return BsrLayout(
        q=inputs.q.reshape(b * hkv, inputs.group, d), k=k_rows, v=v_rows, indptr=indptr, indices=indices,
        M=b * hkv, N=k_rows.shape[0], R=1, C=ps, num_qo_heads=inputs.group, num_kv_heads=1,
    )


def build_flashinfer(inputs: BlockSparseInputs) -> list:
    if not inputs.q.is_cuda:
        raise peers.Skip("flashinfer needs CUDA")
    try:
        import flashinfer  # noqa: WPS433
    except Exception as exc:  # noqa: BLE001
        raise peers.Skip(f"import flashinfer failed: {peers._first_line(exc)}") from exc
    sparse = getattr(flashinfer, "sparse", None)
    wrapper_cls = getattr(sparse, "BlockSparseAttentionWrapper", None) or getattr(
        flashinfer, "BlockSparseAttentionWrapper", None
    )
    if wrapper_cls is None:
        raise peers.Skip("flashinfer has no BlockSparseAttentionWrapper")

    layout = bsr_layout(inputs)
    b, hq, d = inputs.q.shape
    workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=inputs.q.device)
    wrapper = wrapper_cls(workspace)
    try:
        wrapper.plan(
            layout.indptr, layout.indices, layout.M, layout.N, layout.R, layout.C, layout.num_qo_heads,
            layout.num_kv_heads, d, q_data_type=inputs.q.dtype, kv_data_type=inputs.k_cache.dtype,
            sm_scale=inputs.scale,
        )

        def fn() -> torch.Tensor:
            return wrapper.run(layout.q, layout.k, layout.v).view(b, hq, d)

        fn()
    except Exception as exc:  # noqa: BLE001
        raise peers.Skip(f"BlockSparseAttentionWrapper: {peers._first_line(exc)}") from exc
    note = "BlockSparseAttentionWrapper, R=1 row per (sequence, KV head), head-major copy of the cache"
    return [peers.Prepared(fn=fn, notes=note)]


# name -> builder, in the column order of the report.
BUILDERS: dict[str, Callable[[BlockSparseInputs], list]] = {
    "kvcore": build_kvcore,
    "flashinfer": build_flashinfer,
    "flex_attention": build_flex_attention,
    "gather+sdpa": build_gather_sdpa,
    "torch": build_torch,
}


# --------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------


def run(case: BlockSparseCase, impl_names: Sequence[str], ctx: RunContext) -> list:
    """Time each implementation on one case; one row per implementation (skips and errors too)."""
    return runner.run_case(GROUP, case, impl_names, ctx, BUILDERS, make_inputs, reference_output,
                           TOLERANCE.get(case.dtype, 2e-2))


__all__ = ["GROUP", "BlockSparseCase", "BlockSparseInputs", "cases", "impls", "known_impls", "make_inputs", "run"]
