"""The reference-test cases that gqa_decode (test_ops) and block_sparse_decode (test_block_sparse)
share: a case's shape, lengths and layouts, its test id, and the q and lengths drawn from it.

Import with ``from decode_cases import ...``, like conftest's builders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from conftest import ragged_lens, randn


@dataclass(frozen=True)
class PagedDecodeCase:
    batch: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    lens: Union[int, tuple[int, ...]]  # max length (ragged lengths drawn up to it) or exact lengths
    soft_cap: float = 0.0
    with_lse: bool = True
    q_layout: str = "contiguous"  # "contiguous" | "slice" (of [B, Hq, 2D]) | "transposed" ([Hq, B, D].T)
    strided_cache: bool = False  # k/v caches are the halves of one [pages, 2, ...] allocation
    scale: Optional[float] = None

    def shape_parts(self) -> list[str]:
        """The id's leading parts: batch, KV heads and group size, head dim, page size, lengths."""
        g = self.num_q_heads // self.num_kv_heads
        parts = [f"B{self.batch}", f"Hkv{self.num_kv_heads}g{g}", f"D{self.head_dim}", f"ps{self.page_size}"]
        parts.append(f"L{self.lens}" if isinstance(self.lens, int) else "L" + "_".join(map(str, self.lens)))
        return parts

    def option_parts(self) -> list[str]:
        """The id's parts for the shared options that differ from their defaults."""
        parts = []
        if self.soft_cap:
            parts.append(f"cap{self.soft_cap:g}")
        if not self.with_lse:
            parts.append("nolse")
        if self.q_layout != "contiguous":
            parts.append(f"q{self.q_layout}")
        if self.strided_cache:
            parts.append("kvstrided")
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        return parts

    def make_q(self, gen: torch.Generator, dtype, device) -> torch.Tensor:
        """A random ``[batch, num_q_heads, head_dim]`` q in the case's layout."""
        b, h, d = self.batch, self.num_q_heads, self.head_dim
        if self.q_layout == "slice":
            q = randn(b, h, 2 * d, gen=gen, dtype=dtype, device=device)[:, :, d:]
        elif self.q_layout == "transposed":
            q = randn(h, b, d, gen=gen, dtype=dtype, device=device).transpose(0, 1)
        else:
            q = randn(b, h, d, gen=gen, dtype=dtype, device=device)
        assert q.shape == (b, h, d) and q.stride(2) == 1
        assert (self.q_layout == "contiguous") == q.is_contiguous() or b == 1
        return q

    def draw_lens(self, gen: torch.Generator) -> list[int]:
        """The exact lengths, or ragged ones up to the case's maximum."""
        if isinstance(self.lens, tuple):
            assert len(self.lens) == self.batch
            return list(self.lens)
        return ragged_lens(self.batch, self.lens, self.page_size, gen)
