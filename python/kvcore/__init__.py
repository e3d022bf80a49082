"""kvcore: kernels for long-context LLM inference with a small KV cache.

Ops (``kvcore.ops``, also importable from ``kvcore``): ``append_paged_kv``, ``gqa_decode``,
``merge_attention_states``, ``block_sparse_decode`` (selections: ``kvcore.block_sparse``),
``token_decoder_attention`` (the model: ``kvcore.block``), ``mla_latent_project`` and
``mla_decode`` (the layer: ``kvcore.mla``), ``attention_scores`` and ``compact_kv`` (policies:
``kvcore.policies``), ``infllm_unit_scores`` and ``topk_rows`` (the cache:
``kvcore.InfLLMCache``). The paged cache with cross-layer sharing: ``kvcore.PagedKVCache``. The
definition of every op: ``kvcore.reference``. Benchmarks: ``python -m kvcore.bench``. The ops are
for inference: they have no backward (a backward through one raises).
"""

from __future__ import annotations

import torch

from . import ops, reference
from .cache import PagedKVCache
from .ops import (
    append_paged_kv,
    cpu_isa,
    decode_workspace,
    gqa_decode,
    merge_attention_states,
    set_validation,
    validation_enabled,
)

__version__ = "0.1.0"

__all__ = [
    "PagedKVCache",
    "append_paged_kv",
    "cpu_isa",
    "cuda_kernels_built",
    "decode_workspace",
    "gqa_decode",
    "merge_attention_states",
    "ops",
    "reference",
    "set_validation",
    "validation_enabled",
]


def cuda_kernels_built() -> bool:
    """True when this build of kvcore contains the CUDA kernels (False for a CPU-only build)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("kvcore::gqa_decode", "CUDA")


# ---- block-sparse decode (selection helpers in kvcore.block_sparse) ----
from . import block_sparse  # noqa: E402
from .ops import block_sparse_decode  # noqa: E402

__all__ += ["block_sparse", "block_sparse_decode"]
# Block Transformer (token decoder attention; the model layer is kvcore.block).
from .ops import token_decoder_attention  # noqa: E402

__all__ += ["token_decoder_attention"]
# MLA (DeepSeek-V2/V3): latent projection and absorbed decode ops; the layer is kvcore.mla.
from .ops import mla_decode, mla_latent_project  # noqa: E402

__all__ += ["mla_decode", "mla_latent_project"]
from . import mla  # noqa: E402

__all__ += ["mla"]

# Eviction (issue 6): scores without the score matrix, in-place compaction; policies in kvcore.policies.
from .ops import attention_scores, compact_kv  # noqa: E402

__all__ += ["attention_scores", "compact_kv"]

# Retrieval (issue 5): InfLLM memory units and Quest page bounds on the existing ops (kvcore.retrieval).
from . import retrieval  # noqa: E402
from .retrieval import InfLLMCache  # noqa: E402

__all__ += ["InfLLMCache", "retrieval"]

from .ops import infllm_unit_scores, topk_rows  # noqa: E402

__all__ += ["infllm_unit_scores", "topk_rows"]
