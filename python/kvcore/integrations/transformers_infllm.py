"""InfLLM as a policy of kvcore's transformers adapter: each layer's K/V in a :class:`kvcore.InfLLMCache`.

One call turns it on for a loaded model::

    import kvcore.integrations.transformers as kvt
    kvt.enable(model, policy="infllm", budget=6272)       # InfLLM's own config: see infllm_config
    kvt.enable(model, policy="infllm", budget=1024, topk=8)
    out = model.generate(input_ids, max_new_tokens=64)

(:func:`kvcore.integrations.transformers.enable` dispatches ``policy="infllm"`` to :func:`enable_infllm`.)

What runs where:

* :class:`InfLLMKVCache` (a ``transformers.Cache``) holds one :class:`kvcore.retrieval.InfLLMCache`
  per layer: ``n_init`` attention sinks and the local window (the last ``n_local`` tokens, plus
  up to ``block_size - 1`` that have left it but do not fill a unit yet) on the model's device,
  the older tokens cut into memory units of ``block_size`` tokens whose K/V live in (pinned) CPU
  memory, with a device cache of ``max_cached_block`` units per sequence. A layer's InfLLMCache is
  built at its first attention call (batch, dtype, device and softmax scale come from the model).
* ``update`` only hands the step's K/V to the attention call that follows it in the same layer
  (the ``"kvcore"`` attention function finds this cache through the same note as for
  :class:`~kvcore.integrations.transformers.KVCoreCache`); that call appends and attends in one go:
* Prefill (any step with several new tokens, including a prompt fed in several forward calls) is
  InfLLM's chunked prefill, ``InfLLMCache.prefill``: execution blocks of ``exc_block_size``
  tokens, each attending causally to the sinks, the recent tokens, the block itself and the
  ``topk`` units chosen by the block's mean query; the tokens that leave the window then form
  units. It is torch math in float32 (no kernel yet), so a long prompt's prefill is slower than
  the plain adapter's SDPA.
* Decode (one new token) is ``InfLLMCache.decode``: score the units against the query
  (``kvcore.infllm_unit_scores``), take the ``topk`` (``kvcore.topk_rows``), load the missing ones,
  and attend to sinks + selected units + window (``block_sparse_decode``, merged with
  ``gqa_decode`` over the window where needed).

RoPE: keys are cached after the model rotated them at their absolute positions, and every token is
attended at that position (``get_seq_length`` counts every token seen). InfLLM's own rule, which
puts every token outside the local window at one fixed distance, would need pre-RoPE keys; it is
not applied (see :mod:`kvcore.retrieval`). So with ``topk >=`` the number of units (all of them
fit in ``max_cached_block``) a step equals full attention, and generation equals the model's own.

Not supported (refused with a message): models with a sliding window (InfLLM's window replaces
it), CLA / MLKV ``layer_to_store`` (a shared store would need the consumer layers to attend to
another layer's memory without appending; not wired), ``DecodeGraph`` (the retrieval step syncs
with the host whenever a unit must be loaded or forms), beam search / assisted decoding, padded
batches. On CUDA the model must be bfloat16 / float16 with head_dim 64, 128 or 256 (the decode
kernels' limits); on CPU float32 works too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from transformers.cache_utils import Cache

from ..retrieval import InfLLMCache
from . import transformers as _kvt

__all__ = ["InfLLMKVCache", "enable_infllm", "infllm_config"]

# InfLLM's published Llama-3 / Mistral configuration: sinks 128, window 4096, 16 units of 128
# tokens (repr_topk 4), 32 units cached on the GPU, execution blocks of 512. Its tokens attended
# per decode step: 128 + 4096 + 16 * 128.
_INFLLM_BUDGET = 128 + 4096 + 16 * 128  # 6272
_MAX_BLOCK_SIZE = 128
_DEFAULT_TOPK = 16

#: Options of ``policy="infllm"`` besides ``budget`` (passed as keyword arguments to ``enable``).
INFLLM_OPTIONS = ("n_init", "n_local", "block_size", "topk", "repr_topk", "max_cached_block", "exc_block_size",
                  "cache_strategy", "score_decay", "repr_score", "per_kv_head")


def _opt_int(name: str, val: Any, minimum: int) -> Optional[int]:
    if val is None:
        return None
    if isinstance(val, bool) or not isinstance(val, int) or val < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {val!r}")
    return val


def infllm_config(budget: Optional[int] = None, **options: Any) -> dict[str, Any]:
    """InfLLM's parameters from a token ``budget`` and explicit options; returns the
    :class:`kvcore.InfLLMCache` keyword arguments.

    ``budget`` is the number of tokens a decode step attends to:
    ``budget = n_init + n_local + topk * block_size`` (the window also holds up to
    ``block_size - 1`` tokens that have left it but do not fill a unit yet, so a step reads at
    most ``budget + block_size - 1``). Options not given follow InfLLM's configuration (n_init
    128, n_local 4096, topk 16, block_size 128, repr_topk 4, max_cached_block 32,
    exc_block_size 512: a budget of 6272) scaled down to the budget:

    * ``block_size``: the largest power of two ``<= budget / 49``, at most 128 (InfLLM: 6272 / 128
      = 49); 128 without a budget;
    * ``topk``: 16; ``n_init``: ``block_size`` (whole sink pages, so a step is one
      ``block_sparse_decode``); ``n_local``: the rest of the budget, ``budget - n_init -
      topk * block_size`` (at least 1);
    * ``repr_topk``: ``min(4, block_size)``; ``max_cached_block``: ``2 * topk``;
      ``exc_block_size``: ``4 * block_size``.

    For example budget 1024 gives block 16, n_init 16, topk 16, n_local 752, 32 cached units.

    Args:
        budget: tokens attended per decode step; may be left out when ``n_local`` is given.
        options: any of :data:`INFLLM_OPTIONS` (``cache_strategy``, ``score_decay``,
            ``repr_score``, ``per_kv_head`` go to InfLLMCache unchanged). When ``budget`` and
            ``n_local`` are both given they must agree with the formula.

    Raises:
        ValueError: an unknown option, a non-int size, neither budget nor n_local, a budget too
            small for the sinks + retrieved units + one window token, or a budget that does not
            match the given sizes.
    """
    unknown = sorted(set(options) - set(INFLLM_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) for policy 'infllm': {unknown}; accepted: budget, "
                         f"{', '.join(INFLLM_OPTIONS)}")
    budget = _opt_int("budget", budget, 1)
    n_local = _opt_int("n_local", options.pop("n_local", None), 1)
    block_size = _opt_int("block_size", options.pop("block_size", None), 1)
    topk = _opt_int("topk", options.pop("topk", None), 1)
    n_init = _opt_int("n_init", options.pop("n_init", None), 0)
    repr_topk = _opt_int("repr_topk", options.pop("repr_topk", None), 1)
    max_cached_block = _opt_int("max_cached_block", options.pop("max_cached_block", None), 1)
    exc_block_size = _opt_int("exc_block_size", options.pop("exc_block_size", None), 1)
    if budget is None and n_local is None:
        raise ValueError("policy 'infllm' needs budget= (tokens attended per decode step: n_init + n_local + "
                         "topk * block_size) or an explicit n_local=")
    if block_size is None:
        block_size = _MAX_BLOCK_SIZE
        if budget is not None:
            block_size = 1 << max(0, (budget // (_INFLLM_BUDGET // _MAX_BLOCK_SIZE)).bit_length() - 1)
            block_size = min(block_size, _MAX_BLOCK_SIZE)
    topk = _DEFAULT_TOPK if topk is None else topk
    n_init = block_size if n_init is None else n_init
    fixed = n_init + topk * block_size
    if n_local is None:
        n_local = budget - fixed
        if n_local < 1:
            raise ValueError(
                f"budget {budget} is too small for policy 'infllm': n_init {n_init} + topk {topk} * block_size "
                f"{block_size} = {fixed} leaves no local window (give a larger budget or smaller topk / block_size)"
            )
    elif budget is not None and budget != fixed + n_local:
        raise ValueError(
            f"budget {budget} does not match n_init {n_init} + n_local {n_local} + topk {topk} * block_size "
            f"{block_size} = {fixed + n_local}; give budget or n_local, not both"
        )
    return {
        "n_init": n_init,
        "n_local": n_local,
        "block_size": block_size,
        "topk": topk,
        "repr_topk": min(4, block_size) if repr_topk is None else repr_topk,
        "max_cached_block": 2 * topk if max_cached_block is None else max_cached_block,
        "exc_block_size": 4 * block_size if exc_block_size is None else exc_block_size,
        **options,
    }


class _InfLLMLayer(_kvt._LayerView):
    """A layer of :class:`InfLLMKVCache` (its InfLLMCache is made at the layer's first attention call)."""

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.is_initialized = True


class InfLLMKVCache(_kvt._LogicalPositions, Cache):
    """A ``transformers.Cache`` keeping each layer's K/V in a :class:`kvcore.InfLLMCache`.

    :func:`enable_infllm` builds one per ``generate`` call; build one yourself to pass as
    ``past_key_values`` / ``cache`` to ``model(...)`` (see :meth:`forward_kwargs`). Each layer's
    InfLLMCache (:attr:`layers_memory`) is created at that layer's first attention call.

    Args:
        config: the model's config (a supported architecture without a sliding window).
        max_cache_len: tokens per sequence the cache will hold (prompt + new tokens): sizes each
            layer's CPU unit store.
        budget, options: InfLLM's parameters, see :func:`infllm_config`.
        layer_to_store: must be ``None`` (CLA / MLKV sharing is not supported with InfLLM).

    Raises:
        ValueError: unsupported config, a sliding window, ``layer_to_store``, bad InfLLM options
            (InfLLMCache's own checks included, e.g. ``max_cached_block < topk``).
    """

    def __init__(self, config: Any, *, max_cache_len: int, budget: Optional[int] = None,
                 layer_to_store: Optional[Sequence[int]] = None, **options: Any) -> None:
        _kvt.check_supported(config)
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be an int >= 1, got {max_cache_len!r}")
        if layer_to_store is not None:
            raise ValueError(
                "policy 'infllm' does not support layer_to_store (CLA / MLKV): each layer keeps its own InfLLM "
                "memory; a shared one would need the consumer layers to attend to it without appending"
            )
        window = _kvt._sliding_window(config)
        if window is not None:
            raise ValueError(
                f"policy 'infllm' on a model with a sliding window ({window}) is not supported: InfLLM's local "
                "window and retrieved units replace the model's window, which changes what it attends to"
            )
        self.config = config
        self.num_layers = int(config.num_hidden_layers)
        self.num_q_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self.head_dim = _kvt._head_dim(config)
        self.params = infllm_config(budget, **options)
        self.budget = self.params["n_init"] + self.params["n_local"] + self.params["topk"] * self.params["block_size"]
        # InfLLMCache checks the rest (max_cached_block >= topk, repr_topk <= block_size, ...):
        # a one-token instance with head_dim 1 costs nothing and reports it now, not at the first step.
        InfLLMCache(1, self.num_q_heads, self.num_kv_heads, 1, 1, dtype=torch.float32, device="cpu", **self.params)
        self._max_cache_len = max_cache_len
        #: One :class:`kvcore.InfLLMCache` per layer (``None`` until the layer first attends).
        self.layers_memory: list[Optional[InfLLMCache]] = [None] * self.num_layers
        self._seen = 0  # tokens seen per sequence: the next token's RoPE position
        self._batch: Optional[int] = None
        #: Accepted for kvcore.generate's chunked prefill; InfLLM has no end-of-prefill step to hold.
        self.hold_eviction = False
        super().__init__(layers=[_InfLLMLayer(self, i) for i in range(self.num_layers)])

    # ------------------------------------------------------------------ state

    def _reset(self) -> None:
        self.layers_memory = [None] * self.num_layers
        self._seen = 0
        self._batch = None

    def memory_report(self, layer_idx: int = 0) -> dict[str, int]:
        """Where layer ``layer_idx``'s tokens are, per sequence (sequence 0 for the residency counts):

        ``seen`` (tokens appended), ``sink_tokens``, ``recent_tokens`` (local window + the tokens
        not yet in a unit), ``units`` (formed; all in the CPU store), ``resident_units`` (also in
        the device cache), ``offloaded_units`` (``units - resident_units``: only on the CPU),
        ``device_tokens`` (sinks + recent + resident units' tokens), ``device_bytes`` /
        ``host_bytes`` (what the layer allocated on its device / in CPU memory, all sequences).
        All zero before the layer first attends.
        """
        mem = self.layers_memory[layer_idx]
        if mem is None:
            return dict.fromkeys(("seen", "sink_tokens", "recent_tokens", "units", "resident_units",
                                  "offloaded_units", "device_tokens", "device_bytes", "host_bytes"), 0)
        sinks = min(mem.length, mem.n_init)
        resident = len(mem.resident_units(0))
        device_bytes = sum(t.numel() * t.element_size() for t in (mem.kv_k, mem.kv_v, mem.repr_keys))
        host_bytes = sum(t.numel() * t.element_size() for t in (mem.store_k, mem.store_v))
        return {
            "seen": mem.length, "sink_tokens": sinks, "recent_tokens": mem.num_recent, "units": mem.num_units,
            "resident_units": resident, "offloaded_units": mem.num_units - resident,
            "device_tokens": sinks + mem.num_recent + resident * mem.block_size,
            "device_bytes": device_bytes, "host_bytes": host_bytes,
        }

    def cached_tokens(self) -> int:
        """Tokens per sequence held on the device by layer 0 (sinks + recent + resident units)."""
        return self.memory_report(0)["device_tokens"]

    def cache_bytes(self) -> int:
        """Bytes of K/V (and representative keys) allocated on the device, all layers and sequences."""
        return sum(self.memory_report(i)["device_bytes"] for i in range(self.num_layers))

    def host_bytes(self) -> int:
        """Bytes of the CPU unit stores, all layers and sequences."""
        return sum(self.memory_report(i)["host_bytes"] for i in range(self.num_layers))

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        """K/V bytes one token takes in a full cache of this model (all layers), for comparisons."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    # ------------------------------------------------------------------ update / attention

    def _update_layer(self, key_states: Tensor, value_states: Tensor, layer_idx: int) -> tuple[Tensor, Tensor]:
        batch, heads, new, dim = key_states.shape
        if heads != self.num_kv_heads or dim != self.head_dim or tuple(value_states.shape) != tuple(key_states.shape):
            raise ValueError(
                f"key_states / value_states must be [B, {self.num_kv_heads}, T, {self.head_dim}] for this cache, "
                f"got {tuple(key_states.shape)} / {tuple(value_states.shape)}"
            )
        if self._batch is None:
            self._batch = batch
        elif batch != self._batch:
            raise ValueError(f"key_states has batch {batch}, the cache holds {self._batch} sequences")
        if layer_idx == 0:
            self._seen += new  # layer 0 opens every forward step
        # The K/V are appended by the attention call that follows (InfLLMCache appends and attends
        # in one call, prefill needs the queries); the note tells kvcore_attention to come here.
        _kvt._note.entry = (self, layer_idx, key_states)
        return key_states, value_states

    def _memory(self, layer_idx: int, key: Tensor, scaling: float) -> InfLLMCache:
        mem = self.layers_memory[layer_idx]
        if mem is None:
            if key.device.type == "cuda" and key.dtype not in (torch.bfloat16, torch.float16):
                raise ValueError(f"policy 'infllm' on CUDA needs a bfloat16 / float16 model, got {key.dtype}")
            mem = InfLLMCache(key.shape[0], self.num_q_heads, self.num_kv_heads, self.head_dim, self._max_cache_len,
                              dtype=key.dtype, device=key.device, scale=scaling, **self.params)
            self.layers_memory[layer_idx] = mem
        elif abs(mem.scale - scaling) > 1e-6 * mem.scale:
            raise ValueError(f"layer {layer_idx} attends with scale {scaling}, its InfLLM memory was built with "
                             f"{mem.scale}")
        return mem

    def _attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scaling: float,
                window: Optional[int]) -> Tensor:
        """Append the step's K/V to the layer's memory and attend (called by ``kvcore_attention``).

        ``query [B, Hq, T, D]``, ``key / value [B, Hkv, T, D]``; returns ``[B, T, Hq, D]``."""
        if window is not None:
            raise ValueError(f"policy 'infllm' does not run sliding-window attention (window {window})")
        mem = self._memory(layer_idx, key, scaling)
        # [B, H, T, D] -> [B, T, H, D], dense: the kvcore ops take contiguous step tensors.
        q = query.transpose(1, 2).contiguous()
        k = key.transpose(1, 2).contiguous()
        v = value.transpose(1, 2).contiguous()
        if q.shape[1] == 1:
            return mem.decode(q[:, 0], k[:, 0], v[:, 0]).unsqueeze(1)
        return mem.prefill(q, k, v)


def enable_infllm(model: Any, budget: Optional[int] = None, *, page_size: int = 16,
                  layer_to_store: Optional[Sequence[int]] = None, **options: Any) -> Any:
    """``enable(model, policy="infllm", ...)``: run ``model`` with every layer's K/V in InfLLM memory.

    Registers kvcore's attention / mask functions, switches the model to them and wraps
    ``model.generate`` so that each call without a cache gets a fresh :class:`InfLLMKVCache`
    sized for the prompt plus ``max_new_tokens`` (kept as ``model.kvcore_cache``).

    Args:
        model: a loaded Llama / Mistral / Qwen2 causal LM without a sliding window.
        budget, options: see :func:`infllm_config`.
        page_size: must stay 16 (the default): InfLLM's pages are its memory units, set
            ``block_size`` instead.
        layer_to_store: must be ``None``.

    Returns:
        ``model`` (modified in place). :func:`kvcore.integrations.transformers.disable` undoes it.

    Raises:
        ValueError: as :class:`InfLLMKVCache`, or a non-default ``page_size``.
    """
    _kvt.check_supported(model.config)
    if page_size != 16:
        raise ValueError(f"page_size ({page_size}) is not used by policy 'infllm': its pages are memory units of "
                         "block_size tokens; pass block_size= instead")
    # Validate the options now rather than at the first generate.
    InfLLMKVCache(model.config, max_cache_len=1, budget=budget, layer_to_store=layer_to_store, **options)
    return _kvt._install(model, lambda max_len: InfLLMKVCache(model.config, max_cache_len=max_len, budget=budget,
                                                             **options))
