"""Run Hugging Face transformers decoder models on kvcore's paged cache and decode kernel.

One call turns it on for a loaded model::

    import kvcore.integrations.transformers as kvt
    kvt.enable(model)                                   # exact: no eviction
    kvt.enable(model, policy="snapkv", budget=1024)     # compress the prompt's cache after prefill
    kvt.enable(model, policy="pyramidkv", budget=1024)  # per-layer budgets, 1024 on average
    out = model.generate(input_ids, max_new_tokens=64)

What runs where:

* :class:`KVCoreCache` (a ``transformers.Cache``) keeps every layer's K/V in one
  :class:`kvcore.PagedKVCache`; ``update`` writes the new tokens with ``kvcore.append_paged_kv``.
* The attention function registered as ``"kvcore"`` in transformers' ``AttentionInterface``
  decodes (one new token per sequence) with ``kvcore.gqa_decode`` straight from the pages. Steps
  with several new tokens (prefill, chunked prefill) run torch SDPA over the cached tokens
  (gathered from the pages) plus the new ones, causal, with the model's sliding window if any.
* Policies (``streaming_llm``, ``snapkv``, ``pyramidkv``, ``h2o``, ``tova``, ``corm``, ``knorm``;
  :mod:`kvcore.policies`) run once, at the end of the prefill (the first multi-token step, or the
  last chunk of a chunked prefill, even of one token, see ``KVCoreCache.hold_eviction``; the
  policies that score with the last ``window`` queries take them across the chunks, H2O scores
  with that step's queries only): each layer's store is compacted in place with ``kvcore.compact_kv`` to ``budget``
  tokens and the freed pages go back to the pool. RoPE positions keep counting the tokens seen
  (``get_seq_length`` is the logical length), as in kvpress / SnapKV, while the pages hold only
  the kept tokens.
* Per-store lengths (``pyramidkv``): PyramidKV gives each layer its own budget (KVCache-Factory's
  schedule, :func:`kvcore.policies.pyramidkv_budget`, ``budget`` the mean: lower layers keep more).
  After its eviction each store holds its own number of tokens per sequence and has its own pages
  (``PagedKVCache.split_stores``), so the pages a small-budget layer drops are really freed and
  ``cache_bytes`` counts each store's own pages. Every later token of a store goes at that store's
  kept count (+ the tokens since); decode, multi-token steps and :class:`DecodeGraph` read each
  store's own lengths and block table. ``cached_tokens(layer)`` / ``cached_tokens_per_layer()``
  give the per-layer counts (``cached_tokens()`` the largest).
* CLA / MLKV (``layer_to_store``): layers mapped to one store share its K/V; the store's first
  layer (its producer) writes it and the later ones read it, ignoring their own K/V projections.
  This changes the model's function: use it for models trained with shared KV layers.
* ``policy="infllm"`` (:data:`RETRIEVAL_POLICIES`) is not an eviction: each layer's K/V go to an
  InfLLM memory (sinks + local window on the device, memory units offloaded to CPU, top-k units
  retrieved per step); :func:`enable` hands it to :mod:`kvcore.integrations.transformers_infllm`.

Supported: Llama, Mistral and Qwen2 (GQA/MQA/MHA, RoPE, optional sliding window), batches without
padding. DeepSeek-V2/V3 (MLA) models are handed to :mod:`kvcore.integrations.transformers_mla`
(latent cache, ``kvcore.mla_decode``; no policies, no CLA). Refused with a message: other
architectures, padded batches (left padding would need per-sequence positions), beam search /
assisted decoding (cache reordering and cropping).

Uses ``AttentionInterface`` / ``AttentionMaskInterface`` registration, ``set_attn_implementation``
and the per-layer ``Cache`` API (``CacheLayerMixin``), which transformers has since 4.56; run and
tested only with 5.24 so far.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import transformers
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kvcore.integrations.transformers needs transformers >= 4.56 "
        "(pip install 'kvcore[transformers]')"
    ) from exc

from .. import ops
from ..cache import PagedKVCache, check_kv_layout
from ..policies import eviction

__all__ = ["ATTN_IMPLEMENTATION", "POLICIES", "RETRIEVAL_POLICIES", "SUPPORTED_MODEL_TYPES", "DecodeGraph",
           "KVCoreCache", "check_supported", "disable", "enable", "kvcore_attention"]

#: The name under which the attention (and mask) function is registered in transformers.
ATTN_IMPLEMENTATION = "kvcore"
#: ``config.model_type`` values this adapter runs (GQA attention through ``AttentionInterface``).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: Eviction policies that :func:`enable` accepts (applied once, after prefill).
POLICIES = ("streaming_llm", "snapkv", "pyramidkv", "h2o", "tova", "corm", "knorm")
#: Retrieval policies that :func:`enable` also accepts: the K/V live in a per-layer InfLLM memory
#: (:class:`kvcore.integrations.transformers_infllm.InfLLMKVCache`) instead of the paged cache.
RETRIEVAL_POLICIES = ("infllm",)

_MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2")
# The policies that score with the prefill's last `window` queries (tova: its last one).
_WINDOW_POLICIES = ("snapkv", "pyramidkv", "corm", "tova")
# The query window of those policies when policy_kwargs gives none (tova itself scores with its
# last query; a held prefill chunk keeps this many for every one of them).
_DEFAULT_POLICY_WINDOW = 32

# The attention function has no handle on the cache (transformers passes it only to the
# attention module), so ``KVCoreCache.update`` leaves a note here for the attention call that
# follows it in the same layer; the note names the returned key tensor, so an attention call
# that did not come from our cache (use_cache=False) is recognised and runs plain SDPA.
# Any cache with ``_attend(layer_idx, query, key, value, scaling, window)`` may leave the note
# (KVCoreCache here, InfLLMKVCache in transformers_infllm).
_note = threading.local()


def check_supported(config: Any) -> None:
    """Raise ``ValueError`` naming the reason if ``config``'s architecture cannot run on kvcore here.

    Args:
        config: a ``transformers.PretrainedConfig`` (``model.config``).
    """
    model_type = getattr(config, "model_type", None)
    if model_type in _MLA_MODEL_TYPES:
        # MLA models run on the latent cache (kvcore.integrations.transformers_mla), checked there.
        from .transformers_mla import check_supported_mla

        check_supported_mla(config)
        return
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by kvcore's transformers adapter; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (GQA decoder models) and {', '.join(_MLA_MODEL_TYPES)} (MLA)"
        )
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        odd = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if odd:
            raise ValueError(f"config.layer_types has layer kinds kvcore does not run: {odd}")


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def _sliding_window(config: Any) -> Optional[int]:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    # Qwen2 carries a sliding_window value but uses it only with use_sliding_window.
    if getattr(config, "model_type", None) == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return int(window)


class _LayerView(CacheLayerMixin):
    """One model layer's view of a kvcore cache that holds every layer (transformers' per-layer
    cache API): the parent cache does the work. :class:`KVCoreCache`'s layers use it as is; the
    MLA and InfLLM caches subclass it where their layers differ."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, parent: Cache, layer_idx: int) -> None:
        super().__init__()
        self._parent = parent
        self._layer_idx = layer_idx

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self._parent._allocate(key_states)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return self._parent._update_layer(key_states, value_states, self._layer_idx)

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        return self._parent.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self._parent.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._parent._reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(
            f"{type(self._parent).__name__} does not reorder sequences (beam search is not supported)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            f"{type(self._parent).__name__} cannot be cropped (assisted decoding is not supported)")


class _LogicalPositions:
    """What kvcore's caches (paged, MLA latent, InfLLM) answer alike about positions: ``_seen``
    tokens fed per sequence (the next token's RoPE position; eviction does not lower it) and the
    constructor's ``_max_cache_len``. Listed before ``Cache`` in their bases."""

    _seen: int
    _max_cache_len: int

    # transformers 5.16/5.17's Cache defines a read-only (deprecated) ``max_cache_len`` property;
    # ours shadows it, so the attribute reads the same on every supported version.
    @property
    def max_cache_len(self) -> int:
        """Tokens per sequence the cache holds (the constructor's ``max_cache_len``)."""
        return self._max_cache_len

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen per sequence (the next token's position), not the number kept after eviction."""
        return self._seen

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for transformers' mask code (logical positions).

        transformers 5 passes the query length, 4.5x the step's ``cache_position`` tensor."""
        if isinstance(query_length, Tensor):
            query_length = query_length.shape[0]
        return self._seen + int(query_length), 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._seen

    def forward_kwargs(self, model: Any) -> dict[str, Any]:
        """``{name: self}`` for ``model(...)``: transformers 5 calls the argument ``cache``, older ``past_key_values``."""
        return {_cache_kwarg(model): self}


class KVCoreCache(_LogicalPositions, Cache):
    """A ``transformers.Cache`` whose K/V live in a :class:`kvcore.PagedKVCache`.

    The pages are allocated on the first ``update`` (dtype and device of the model's keys), with
    room for ``max_cache_len`` tokens of each of the batch's sequences (one kvcore sequence per
    batch row). :func:`enable` builds one per ``generate`` call; build one yourself to pass as
    ``past_key_values`` to ``model(...)`` / ``generate``.

    Args:
        config: the model's config (a supported architecture, see :func:`check_supported`).
        max_cache_len: tokens per sequence the pages must hold (prompt + new tokens; before
            eviction the whole prompt is cached, so count it fully).
        page_size: tokens per page (power of two).
        policy: ``None`` or one of :data:`POLICIES`; applied once at the end of the prefill.
        budget: tokens kept per sequence and layer by the policy (required with a policy;
            pyramidkv: the mean over the layers of its schedule).
        policy_kwargs: extra keyword arguments: ``num_sinks`` (streaming_llm, default 4),
            ``window`` (snapkv's / pyramidkv's observation window and corm's recent queries,
            default 32, capped at budget (pyramidkv: budget - 1) and at the prefill step's
            queries), ``kernel_size`` / ``pooling`` (snapkv, pyramidkv), ``beta`` (pyramidkv's
            schedule, default 20), ``recent`` (h2o).
            pyramidkv keeps ``pyramidkv_budget(layer, num_layers, prompt_len, budget, window, beta)``
            tokens in each store, where ``layer`` is the store's producer layer (with CLA / MLKV
            sharing, the sharing layers follow their producer's budget) and ``num_layers`` the
            model's layer count; budget must be >= 2 and the model have >= 2 layers.
            corm keeps exactly ``budget`` tokens: the keys its recent queries vote for (probability
            >= 1/n), then the best-scored others (CORM's own rule keeps a variable number).
        layer_to_store: CLA / MLKV map, one store id per layer (see :class:`kvcore.PagedKVCache`);
            ``None``: one store per layer.
        kv_layout: the pages' K/V layout, ``"separate"`` or ``"paired"`` (see
            :class:`kvcore.PagedKVCache`).

    Raises:
        ValueError: unsupported config, unknown policy, missing/bad budget, a policy on a model
            with a sliding window.
    """

    def __init__(
        self,
        config: Any,
        *,
        max_cache_len: int,
        page_size: int = 16,
        policy: Optional[str] = None,
        budget: Optional[int] = None,
        policy_kwargs: Optional[dict[str, Any]] = None,
        layer_to_store: Optional[Sequence[int]] = None,
        kv_layout: str = "separate",
    ) -> None:
        check_supported(config)
        check_kv_layout(kv_layout)  # now: the PagedKVCache is built at the first update
        if getattr(config, "model_type", None) in _MLA_MODEL_TYPES:
            raise ValueError(f"model_type {config.model_type!r} uses MLA: its cache is "
                             "kvcore.integrations.transformers_mla.KVCoreMLACache (one latent row per token)")
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be an int >= 1, got {max_cache_len!r}")
        if policy is not None and policy not in POLICIES:
            raise ValueError(f"policy must be None or one of {POLICIES} (or {RETRIEVAL_POLICIES[0]!r} through "
                             f"enable()), got {policy!r}")
        if policy is not None:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise ValueError(f"budget must be an int >= 1 with policy {policy!r}, got {budget!r}")
            if _sliding_window(config) is not None:
                raise ValueError(
                    f"policy {policy!r} on a model with a sliding window ({_sliding_window(config)}) is not "
                    "supported: the window is defined on original positions, the compacted cache has lost them"
                )
        elif budget is not None:
            raise ValueError(f"budget ({budget}) needs a policy; got policy=None")
        kw = dict(policy_kwargs or {})
        # Checked now (the policies' own checks, on an empty batch), not at the end of the prefill.
        if policy == "streaming_llm":
            eviction.streaming_llm(torch.zeros(0, dtype=torch.int32), 1, budget, num_sinks=kw.get("num_sinks", 4))
        if policy == "h2o":
            eviction.h2o(torch.zeros(0, 1, 0), torch.zeros(0, dtype=torch.int32), budget, recent=kw.get("recent"))
        if policy == "pyramidkv":
            if budget < 2:
                raise ValueError(f"budget must be >= 2 with policy 'pyramidkv' (window + at least one key), got {budget}")
            if int(config.num_hidden_layers) < 2:
                raise ValueError("policy 'pyramidkv' needs a model with >= 2 layers (its budget schedule spans the layers)")
            eviction.pyramidkv_budget(0, int(config.num_hidden_layers), budget, budget,
                                      min(kw.get("window", _DEFAULT_POLICY_WINDOW), budget - 1),
                                      beta=kw.get("beta", 20))
        self.config = config
        self.num_layers = int(config.num_hidden_layers)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        self.head_dim = _head_dim(config)
        self._max_cache_len = max_cache_len
        self.page_size = page_size
        self.kv_layout = kv_layout
        self.policy = policy
        self.budget = budget
        self.policy_kwargs = dict(policy_kwargs or {})
        self.sliding_window = _sliding_window(config)
        self._layer_to_store = None if layer_to_store is None else list(layer_to_store)
        self.paged: Optional[PagedKVCache] = None
        self.seq_ids: list[int] = []
        #: True once the stores hold different lengths (pyramidkv evicted; the PagedKVCache's stores
        #: are split, see PagedKVCache.split_stores): each step then reserves and decodes per store.
        self._per_store = False
        # With _per_store: the eager steps' device block tables [S, B, width], kept between steps
        # and patched with the pages each step opens (rebuilt when too narrow, or None after
        # anything else changed the pages: eviction, reset, a DecodeGraph step).
        self._ps_table: Optional[Tensor] = None
        self._seen = 0  # logical tokens per sequence (RoPE positions), eviction does not lower it
        self._evicted = False
        #: Set while feeding a long prompt in chunks: the policy then runs at the end of the first
        #: step after it is cleared (the last chunk, even of one token), over everything cached so far.
        self.hold_eviction = False
        self._prefill_held = False  # the last step ran with hold_eviction set
        self._held_q: dict[int, Tensor] = {}  # a held chunk's last queries per store (see _policy_step)
        self._graph: Optional[_GraphBuffers] = None  # set while a DecodeGraph runs or captures a step
        self._store_last_layers: Optional[list[int]] = None  # see _last_layer_of_store
        self._reset_step()
        super().__init__(layers=[_LayerView(self, i) for i in range(self.num_layers)])

    # ------------------------------------------------------------------ state

    def _reset_step(self) -> None:
        self._block_table: Optional[Tensor] = None
        self._seq_lens: Optional[Tensor] = None
        self._slots: Optional[Tensor] = None
        self._past = 0  # physical tokens per sequence before this step
        # Per-store views of the step (only with _per_store): block table [B, P], lengths [B] and
        # slots [B * T] of each store, and each store's physical tokens before the step.
        self._tables: Optional[tuple[Tensor, ...]] = None
        self._lens_s: Optional[tuple[Tensor, ...]] = None
        self._slots_s: Optional[tuple[Tensor, ...]] = None
        self._past_s: Optional[list[int]] = None
        self._step_kv: dict[int, tuple[Tensor, Tensor]] = {}
        self._policy_q: dict[int, Tensor] = {}
        self._policy_scores: dict[int, Tensor] = {}  # h2o: each store's scores, taken at its layer
        self._evict_now = False

    def _open_policy_step(self, new: int) -> None:
        """At layer 0 of a step of ``new`` tokens per sequence (``_past`` set): whether the policy
        runs at its end (the prefill's last step: a multi-token step, or any step after held
        chunks, once the cache holds more than the budget), and count the tokens seen."""
        self._evict_now = (
            self.policy is not None and not self._evicted and not self.hold_eviction
            and (new > 1 or self._prefill_held) and self._past + new > self.budget
        )
        self._prefill_held = self.hold_eviction and self.policy is not None and not self._evicted
        self._seen += new

    def _reset(self) -> None:
        if self.paged is not None:
            for seq_id in self.seq_ids:
                self.paged.free(seq_id)
            self.seq_ids = [self.paged.add_sequence() for _ in range(len(self.seq_ids))]
        self._seen = 0
        self._evicted = False
        self._prefill_held = False
        self._held_q.clear()
        self._ps_table = None
        self._reset_step()

    def _allocate(self, key_states: Tensor) -> None:
        if self.paged is not None:
            return
        batch = key_states.shape[0]
        pages_per_seq = -(-self._max_cache_len // self.page_size)
        self.paged = PagedKVCache(
            self.num_layers, self.num_kv_heads, self.head_dim, num_pages=batch * pages_per_seq,
            page_size=self.page_size, dtype=key_states.dtype, device=key_states.device,
            layer_to_store=self._layer_to_store, kv_layout=self.kv_layout,
        )
        self.seq_ids = [self.paged.add_sequence() for _ in range(batch)]

    def cached_tokens(self, layer: Optional[int] = None) -> int:
        """Tokens held in the pages per sequence (after eviction: at most the budget + new tokens).

        Every layer holds the same number except after ``pyramidkv``'s eviction: then ``layer``
        picks the layer (its store) and ``None`` gives the largest count over the stores (the
        lowest layer's, normally); :meth:`cached_tokens_per_layer` lists them all."""
        if self.paged is None or not self.seq_ids:
            return 0
        seq = self.seq_ids[0]
        if layer is not None:
            return self.paged.seq_len(seq, self.paged.store_of(layer))
        if self._per_store:
            return max(self.paged.seq_len(seq, store) for store in range(self.paged.num_stores))
        return self.paged.seq_len(seq)

    def cached_tokens_per_layer(self) -> list[int]:
        """Tokens held per sequence by each layer's store (CLA layers sharing a store repeat its count)."""
        if self.paged is None or not self.seq_ids:
            return [0] * self.num_layers
        seq = self.seq_ids[0]
        counts = [self.paged.seq_len(seq, store) for store in range(self.paged.num_stores)]
        return [counts[store] for store in self.paged.layer_to_store]

    def cache_bytes(self) -> int:
        """Bytes of K/V the live sequences hold now: whole pages, summed over the stores (each
        store's own pages once the stores hold different lengths, after ``pyramidkv``)."""
        if self.paged is None:
            return 0
        return self.paged.held_bytes(self.seq_ids)

    def _last_layer_of_store(self) -> list[int]:
        """The last layer that reads each store (its producer alone without CLA / MLKV sharing)."""
        if self._store_last_layers is None:
            last = [0] * self.paged.num_stores
            for layer, store in enumerate(self.paged.layer_to_store):
                last[store] = layer
            self._store_last_layers = last
        return self._store_last_layers

    def _step_meta(self, layer_idx: int) -> tuple[Tensor, Tensor, int]:
        """``(block_table, seq_lens, past)`` of this step for ``layer_idx``'s store."""
        if self._tables is None:
            return self._block_table, self._seq_lens, self._past
        store = self.paged._layer_to_store[layer_idx]
        return self._tables[store], self._lens_s[store], (self._past_s[store] if self._past_s else 0)

    # ------------------------------------------------------------------ update (called per layer)

    def _update_layer(self, key_states: Tensor, value_states: Tensor, layer_idx: int) -> tuple[Tensor, Tensor]:
        if self.paged is None:
            self._allocate(key_states)
        paged = self.paged
        batch, heads, new, dim = key_states.shape
        if batch != len(self.seq_ids) or heads != self.num_kv_heads or dim != self.head_dim:
            raise ValueError(
                f"key_states must be [{len(self.seq_ids)}, {self.num_kv_heads}, T, {self.head_dim}] for this "
                f"cache, got {tuple(key_states.shape)}"
            )
        if layer_idx == 0 and self._graph is not None:
            # A CUDA-graph step (DecodeGraph): the host work was done before the replay
            # (_stage_graph_step); here only device work that the graph records. The new token's
            # slot comes from the staged lengths and block table, so it follows them on replay.
            if new != 1:
                raise ValueError(f"a CUDA-graph decode step takes one new token per sequence, got {new}")
            self._reset_step()
            g = self._graph
            slots = self._device_slots(g.block_table, g.seq_lens)
            if g.seq_lens.dim() == 1:
                self._slots = slots
                self._block_table, self._seq_lens = g.block_table, g.seq_lens
            else:  # views of the static buffers, one per store (no device work)
                self._slots_s, self._tables, self._lens_s = slots.unbind(0), g.block_table.unbind(0), g.seq_lens.unbind(0)
        elif layer_idx == 0 and self._per_store:
            # Stores of different lengths (after pyramidkv): each store's new tokens go at its own
            # kept count; all stores' slots, tables and lengths come in one upload each.
            # The device tables persist between steps and only the pages this step opens are
            # uploaded: rebuilding S tables of every page each step costs milliseconds of host time.
            self._reset_step()
            units = list(range(paged.num_stores))
            seqs_u, _, starts_u = paged._grow_units(self.seq_ids, [new] * batch, units)
            self._past_s = [starts[0] for starts in starts_u]
            self._past = max(self._past_s)
            need = max(len(seq.pages) for seqs in seqs_u for seq in seqs)
            table = self._ps_table
            if table is None or need > table.shape[2]:
                # Headroom of a quarter (at least 4 pages) so that rebuilds stay rare.
                table = self._ps_table = self._per_store_table(need + max(need // 4, 4))
            else:
                self._publish_pages(table, seqs_u, starts_u)
            lens = paged.seq_lens_per_store(self.seq_ids)
            if new == 1:
                slots = self._device_slots(table, lens)
            else:
                flat_seqs = [seq for seqs in seqs_u for seq in seqs]
                flat_starts = [start for starts in starts_u for start in starts]
                slots = paged._upload(paged._slots(flat_seqs, [new] * len(flat_seqs), flat_starts)).view(len(units), -1)
            self._slots_s, self._tables, self._lens_s = slots.unbind(0), table.unbind(0), lens.unbind(0)
            self._open_policy_step(new)
        elif layer_idx == 0:
            # Layer 0 opens every forward step: reserve the new tokens once for all layers/stores.
            self._reset_step()
            self._past = paged.seq_len(self.seq_ids[0])
            self._slots = paged.reserve(self.seq_ids, [new] * batch)
            self._block_table = paged.block_table(self.seq_ids)
            self._seq_lens = paged.seq_lens(self.seq_ids)
            self._open_policy_step(new)
        store = paged.store_of(layer_idx)
        if paged.is_producer(layer_idx):
            # [B, Hkv, T, D] -> [B * T, Hkv, D]: token-major, the order reserve() gave the slots.
            # contiguous(): with B = 1 the reshape of contiguous [1, Hkv, T, D] states is a strided
            # view, which append_paged_kv refuses (a model's roped keys are token-major already).
            k = key_states.transpose(1, 2).reshape(batch * new, heads, dim).contiguous()
            v = value_states.transpose(1, 2).reshape(batch * new, heads, dim).contiguous()
            paged._append_reserved(layer_idx, k, v, self._slots if self._slots_s is None else self._slots_s[store])
            self._step_kv[store] = (key_states, value_states)
        # Held only until the store's last layer has read it: kept for the whole step, a prefill
        # kept every layer's [B, Hkv, T, D] states alive at once, a second copy of the K/V it
        # writes (session 37: the e2e bench's B8 S32768 fill ran out of memory on an 80 GB H100).
        if layer_idx == self._last_layer_of_store()[store]:
            key_states, value_states = self._step_kv.pop(store)
        else:
            key_states, value_states = self._step_kv[store]
        _note.entry = (self, layer_idx, key_states)
        return key_states, value_states

    # ------------------------------------------------------------------ attention

    def _gather_past(self, layer_idx: int, past: int, block_table: Tensor) -> tuple[Tensor, Tensor]:
        """Dense ``[B, Hkv, past, D]`` K and V of the first ``past`` cached tokens of every sequence
        in ``layer_idx``'s store (``block_table``: that store's)."""
        k_cache, v_cache = self.paged.kv(layer_idx)
        pos = torch.arange(past, device=k_cache.device)
        pages = block_table.to(torch.int64)[:, pos // self.page_size]  # [B, past]
        # Indexed by (page, row), not through a flat view: the caches may be the two halves of
        # one paired buffer (PagedKVCache(kv_layout="paired")), whose pages are not contiguous.
        k = k_cache[pages, pos % self.page_size]  # [B, past, Hkv, D]
        v = v_cache[pages, pos % self.page_size]
        return k.transpose(1, 2), v.transpose(1, 2)

    def _attend(self, layer_idx: int, query: Tensor, key: Tensor, value: Tensor, scaling: float,
                window: Optional[int]) -> Tensor:
        batch, hq, new, dim = query.shape
        block_table, seq_lens, past = self._step_meta(layer_idx)
        if new == 1:
            k_cache, v_cache = self.paged.kv(layer_idx)
            with ops._trusted_indices():  # this cache's own step tables
                out = ops.gqa_decode(
                    query[:, :, 0, :], k_cache, v_cache, block_table, seq_lens, scale=scaling,
                    window_left=-1 if window is None else window - 1,
                )
            self._policy_step(layer_idx, query, scaling)
            return out.unsqueeze(1)  # [B, 1, Hq, D]
        if past:
            past_k, past_v = self._gather_past(layer_idx, past, block_table)
            key = torch.cat([past_k, key], dim=2)
            value = torch.cat([past_v, value], dim=2)
        out = _sdpa(query, key, value, past, scaling, window)
        self._policy_step(layer_idx, query, scaling)
        return out

    def _policy_step(self, layer_idx: int, query: Tensor, scaling: float) -> None:
        """The policy's part of a step: on the prefill's last step, keep each producer layer's
        queries and evict after the last layer; on a held chunk (``hold_eviction``), keep the last
        ``window`` queries of the policies that score with a window of them, so that a last chunk
        shorter than the window (down to one token) still scores with a full one."""
        if self.policy is None or self._evicted:
            return
        if self.paged.is_producer(layer_idx):
            store = self.paged.store_of(layer_idx)
            if self._evict_now:
                held = self._held_q.pop(store, None)
                q = query if held is None else torch.cat([held, query], dim=2)
                if self.policy == "h2o":
                    # Scored here rather than at the last layer: the same inputs (the store's keys
                    # are written and nothing changes them before the eviction), and [B, Hkv, S]
                    # fp32 scores stay alive instead of the whole prompt's [B, Hq, T, D] queries.
                    k_cache, _ = self.paged.kv(layer_idx)
                    block_table, step_lens, _ = self._step_meta(layer_idx)
                    self._policy_scores[store] = eviction.h2o_scores(
                        q.transpose(1, 2).contiguous(), k_cache, block_table, step_lens, scale=scaling)
                else:
                    self._policy_q[store] = self._queries_for_eviction(q)
            elif self.hold_eviction and self.policy in _WINDOW_POLICIES:
                held = self._held_q.get(store)
                q = query if held is None else torch.cat([held, query], dim=2)
                held_window = int(self.policy_kwargs.get("window", _DEFAULT_POLICY_WINDOW))
                self._held_q[store] = q[:, :, -held_window:, :].clone()
        if self._evict_now and layer_idx == self.num_layers - 1:
            self._evict(scaling)

    def _queries_for_eviction(self, query: Tensor) -> Optional[Tensor]:
        """What ``_evict`` reads of a store's prefill queries ``[B, Hq, T, D]``: the last ``window``
        for the window policies (a copy, so that the step's full query tensor of every producer
        layer is not kept alive until the last layer: 268 MB a layer at Llama-3-8B's shape, B1, a
        32k prompt), nothing for ``streaming_llm`` and ``knorm`` (``h2o`` scores at the layer)."""
        if self.policy in _WINDOW_POLICIES:
            keep = 1 if self.policy == "tova" else int(self.policy_kwargs.get("window", _DEFAULT_POLICY_WINDOW))
            return query[:, :, -keep:, :].clone()
        return None

    def apply_policy(self, queries: Optional[Sequence[Tensor]] = None, scaling: Optional[float] = None) -> None:
        """Run the policy now over everything cached, as at the end of a prefill.

        For a cache filled through ``update`` alone, without a forward pass (a synthesized prefill
        state, as the ``e2e`` benchmark builds): a forward prefill applies the policy by itself.

        Args:
            queries: one ``[B, Hq, T, D]`` tensor per layer standing in for that layer's last ``T``
                prefill queries (only the stores' producer layers are read): ``snapkv`` and
                ``pyramidkv`` use the last ``window`` of them, ``corm`` the last ``window`` too, ``tova`` the last one,
                ``h2o`` all; ``None`` is allowed for
                ``streaming_llm`` and ``knorm``, which need none.
            scaling: softmax scale of the scores (default ``head_dim ** -0.5``).

        Raises:
            ValueError: no policy, nothing cached yet, the policy already ran, or bad queries.
        """
        if self.policy is None:
            raise ValueError("apply_policy needs a KVCoreCache built with a policy (policy=None here)")
        if self.paged is None or (self._block_table is None and self._tables is None):
            raise ValueError("apply_policy: nothing is cached yet (fill the cache with update() first)")
        if self._evicted:
            raise ValueError("apply_policy: the policy already ran on this cache")
        batch = len(self.seq_ids)
        if queries is None:
            if self.policy not in ("streaming_llm", "knorm"):
                raise ValueError(f"policy {self.policy!r} scores with queries: pass one [B, Hq, T, D] per layer")
            queries = [None] * self.num_layers
        if len(queries) != self.num_layers:
            raise ValueError(f"queries must have one tensor per layer ({self.num_layers}), got {len(queries)}")
        self._policy_q.clear()
        self._policy_scores.clear()
        for layer, q in enumerate(queries):
            if q is None or not self.paged.is_producer(layer):
                continue
            if not isinstance(q, Tensor) or q.dim() != 4 or q.shape[0] != batch or q.shape[3] != self.head_dim:
                shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
                raise ValueError(f"queries[{layer}] must be [{batch}, Hq, T, {self.head_dim}], got {shape}")
            self._policy_q[self.paged.store_of(layer)] = q
        if self.policy not in ("streaming_llm", "knorm") and len(self._policy_q) != self.paged.num_stores:
            raise ValueError(f"policy {self.policy!r} needs queries for every producer layer, got None for some")
        self._evict(float(self.head_dim ** -0.5 if scaling is None else scaling))

    # ------------------------------------------------------------------ CUDA-graph steps (DecodeGraph)

    def _device_slots(self, block_table: Tensor, seq_lens: Tensor) -> Tensor:
        """Slot of each sequence's last token (one new token per sequence), computed on the device
        from the lengths ``[B]`` / ``[S, B]`` and the block table ``[B, W]`` / ``[S, B, W]``."""
        last = (seq_lens - 1).to(torch.int64)
        col = seq_lens.dim()  # the page-column dimension of the block table
        page = block_table.gather(col, (last // self.page_size).unsqueeze(col)).squeeze(col).to(torch.int64)
        return page * self.page_size + last % self.page_size

    def _per_store_table(self, width: int) -> Tensor:
        """int32 ``[S, B, width]`` device block tables of every store (zero past each row's pages)."""
        held = self.paged.block_table_per_store(self.seq_ids)  # [S, B, most pages held]
        table = torch.zeros(held.shape[0], held.shape[1], max(width, held.shape[2]), dtype=torch.int32,
                            device=self.paged.device)
        table[:, :, : held.shape[2]].copy_(held)
        return table

    def _publish_pages(self, table: Tensor, seqs_u: list, starts_u: list) -> None:
        """Write into ``table [S, B, W]`` the ids of the pages that the growth which started at
        ``starts_u`` opened (one upload and one scatter, nothing when no page opened)."""
        page_size = self.page_size
        opened = [(store, row, col, seq.pages[col])
                  for store, (seqs, starts) in enumerate(zip(seqs_u, starts_u))
                  for row, (seq, start) in enumerate(zip(seqs, starts))
                  for col in range(-(-start // page_size), len(seq.pages))]
        if opened:
            where = self.paged._upload(torch.tensor(opened, dtype=torch.int64))
            table[where[:, 0], where[:, 1], where[:, 2]] = where[:, 3].to(torch.int32)

    def _store_lengths(self) -> list[int]:
        """Every (store, sequence) length: one per sequence while the stores share pages."""
        paged = self.paged
        stores = range(paged.num_stores) if self._per_store else [None]
        return [paged.seq_len(seq, store) for store in stores for seq in self.seq_ids]

    def _graph_buffers(self, headroom: int) -> "_GraphBuffers":
        """Static device buffers for a captured step, with room for ``headroom`` more tokens per sequence
        (per store and sequence with per-store lengths: the table is then ``[S, B, width]``, the lengths ``[S, B]``)."""
        batch = len(self.seq_ids)
        longest = max(self._store_lengths())
        width = -(-(longest + headroom) // self.page_size)
        device = self.paged.device
        if self._per_store:
            table = self._per_store_table(width)
            seq_lens = torch.zeros(self.paged.num_stores, batch, dtype=torch.int32, device=device)
        else:
            table = torch.zeros(batch, width, dtype=torch.int32, device=device)
            held = self.paged.block_table(self.seq_ids)  # [B, most pages held], zero past each row's pages
            table[:, : held.shape[1]].copy_(held)
            seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        return _GraphBuffers(
            block_table=table,
            seq_lens=seq_lens,
            position_ids=torch.zeros(batch, 1, dtype=torch.int64, device=device),
            input_ids=torch.zeros(batch, 1, dtype=torch.int64, device=device),
        )

    def _graph_step_fits(self, g: "_GraphBuffers") -> bool:
        """Whether one more token per sequence (and store) still fits the static block table's width,
        and the buffers still have the cache's layout (per-store or not)."""
        if (g.seq_lens.dim() == 2) != self._per_store:
            return False
        capacity = g.block_table.shape[-1] * self.page_size
        return all(n + 1 <= capacity for n in self._store_lengths())

    def _stage_graph_step(self, g: "_GraphBuffers", input_ids: Tensor) -> None:
        """Host side of one graph step: reserve a token per sequence (new pages go into the static
        block table), then stage the new lengths, positions and input tokens for the replay."""
        paged = self.paged
        if self._per_store:
            units = list(range(paged.num_stores))
            seqs_u, _, starts_u = paged._grow_units(self.seq_ids, [1] * len(self.seq_ids), units)
            self._publish_pages(g.block_table, seqs_u, starts_u)
            g.seq_lens.copy_(paged.seq_lens_per_store(self.seq_ids))
            self._ps_table = None  # the eager steps' tables miss this step's pages
        else:
            seqs, _, starts = paged._grow(self.seq_ids, [1] * len(self.seq_ids))
            for row, (seq, start) in enumerate(zip(seqs, starts)):
                if start % self.page_size == 0:  # this token opened a page: publish its id
                    g.block_table[row, start // self.page_size].fill_(seq.pages[-1])
            g.seq_lens.copy_(paged.seq_lens(self.seq_ids))
        g.position_ids.fill_(self._seen)
        g.input_ids.copy_(input_ids)
        self._seen += 1

    def _evict(self, scaling: float) -> None:
        """Compact every store to its budget (the last layer of the prefill has attended) and free pages.

        ``pyramidkv`` gives each store its own budget: the store's producer layer (its first layer;
        with CLA / MLKV sharing, the sharing layers follow it) takes its layer index in the
        schedule ``pyramidkv_budget(layer, num_layers, prompt_len, budget, window, beta)``. The
        stores are then split (``PagedKVCache.split_stores``) and each is truncated to its own
        kept count, so the pages a small-budget store no longer needs go back to its free list.
        """
        paged, budget, kw = self.paged, self.budget, self.policy_kwargs
        per_store = self.policy == "pyramidkv" and paged.num_stores > 1
        self._ps_table = None  # pages are truncated below (the tables are rebuilt at the next step)
        if per_store:
            paged.split_stores()
        kept_lens: list[list[int]] = []
        for store in range(paged.num_stores):
            layer = paged._producers[store]
            k_cache, v_cache = paged.kv(layer)
            block_table, step_lens, _ = self._step_meta(layer)
            seq_lens = step_lens.clone()
            query = self._policy_q.get(store)  # [B, Hq, T, D]
            if self.policy == "streaming_llm":
                sel = eviction.streaming_llm(seq_lens, self.num_kv_heads, budget, num_sinks=kw.get("num_sinks", 4))
            elif self.policy == "snapkv":
                window = min(kw.get("window", _DEFAULT_POLICY_WINDOW), budget, query.shape[2])
                q_window = query[:, :, -window:, :].transpose(1, 2).contiguous()
                sel = eviction.snapkv(q_window, k_cache, block_table, seq_lens, budget, scale=scaling,
                                      kernel_size=kw.get("kernel_size", 5), pooling=kw.get("pooling", "avg"))
            elif self.policy == "pyramidkv":
                # The schedule needs budget > window (the constructor checked budget >= 2).
                window = min(kw.get("window", _DEFAULT_POLICY_WINDOW), budget - 1, query.shape[2])
                q_window = query[:, :, -window:, :].transpose(1, 2).contiguous()
                sel = eviction.pyramidkv(q_window, k_cache, block_table, seq_lens, budget, layer=layer,
                                         num_layers=self.num_layers, beta=kw.get("beta", 20), scale=scaling,
                                         kernel_size=kw.get("kernel_size", 5), pooling=kw.get("pooling", "avg"))
            elif self.policy == "h2o":
                scores = self._policy_scores.pop(store, None)  # taken at the layer (_policy_step)
                if scores is None:  # apply_policy's queries
                    scores = eviction.h2o_scores(query.transpose(1, 2).contiguous(), k_cache, block_table,
                                                 seq_lens, scale=scaling)
                sel = eviction.h2o(scores, seq_lens, budget, recent=kw.get("recent"))
            elif self.policy == "corm":
                recent = min(kw.get("window", _DEFAULT_POLICY_WINDOW), budget, query.shape[2])
                q_recent = query[:, :, -recent:, :].transpose(1, 2).contiguous()
                # fill: exactly the budget, as the other policies (one length per sequence here).
                sel = eviction.corm(q_recent, k_cache, v_cache, block_table, seq_lens, budget=budget,
                                    scale=scaling, fill=True)
            elif self.policy == "tova":
                q_last = query[:, :, -1:, :].transpose(1, 2).contiguous()
                sel = eviction.tova(q_last, k_cache, block_table, seq_lens, budget, scale=scaling)
            else:  # knorm
                sel = eviction.knorm(k_cache, block_table, seq_lens, budget)
            eviction.apply(sel, k_cache, v_cache, block_table, seq_lens)
            kept_lens.append(seq_lens.tolist())
        if per_store or paged.stores_split:
            for store, lens in enumerate(kept_lens):
                for seq_id, n in zip(self.seq_ids, lens):
                    paged.truncate(seq_id, n, store=store)
            self._per_store = True
        else:
            # One length per sequence for every store: the policies give every store the same count.
            kept_len = max(max(lens) for lens in kept_lens)
            for seq_id in self.seq_ids:
                paged.truncate(seq_id, kept_len)
        self._policy_q.clear()
        self._policy_scores.clear()
        self._held_q.clear()
        self._evict_now = False
        self._evicted = True


@dataclasses.dataclass
class _GraphBuffers:
    """The device tensors a captured decode step reads; their contents change before each replay."""

    # With per-store lengths (pyramidkv) both gain a leading store dimension: [S, B, width], [S, B].
    block_table: Tensor   # int32 [B, width]: every page a sequence may use before the next capture
    seq_lens: Tensor      # int32 [B]: lengths including the step's token
    position_ids: Tensor  # int64 [B, 1]: the step token's RoPE position
    input_ids: Tensor     # int64 [B, 1]


class DecodeGraph:
    """One decode step of ``model`` on a :class:`KVCoreCache`, captured in a CUDA graph and replayed.

    An eager transformers decode step spends most of its time on the host (Python, module calls,
    ~10 kernel launches per layer): measured on an H200 with a Llama-3-8B-shaped model at batch 8,
    28-41 ms of wall time for 7-14 ms of kernels. Replaying a captured step removes that host
    time. Each call reserves one token per sequence on the host, stages the new lengths, positions
    and input tokens in static device buffers, and replays; the step's slots are computed on the
    device from those buffers, so a replay writes the right cache slots and decodes over the
    right lengths without any host work inside the graph.

    The static block table has room for ``headroom`` more tokens per sequence than the cache held
    at capture; a step past that re-captures with a wider table (counted in :attr:`captures`).
    With per-store lengths (after ``pyramidkv``) the static lengths are ``[S, B]`` and the table
    ``[S, B, width]`` (width from the longest store), and each store's slots come from its rows.
    The first call warms up and captures (one eager forward, then the replay).

    Usage (the prefill caches every prompt token; the first step feeds the token it predicts)::

        logits = model(prompt, **cache.forward_kwargs(model), use_cache=True).logits
        graph = kvt.DecodeGraph(model, cache)
        token = logits[:, -1:].argmax(-1)
        for _ in range(n):
            logits = graph(token)              # [B, 1, vocab], overwritten by the next call
            token = logits[:, -1:].argmax(-1)

    Args:
        model: a causal LM switched to kvcore attention (:func:`enable`), on CUDA.
        cache: its :class:`KVCoreCache`, holding at least one token per sequence (prefilled; a
            policy, if any, already applied: graph steps never evict).
        headroom: tokens per sequence the captured step can grow by before a re-capture.
        capture: ``False`` runs the same static-buffer step eagerly, without a graph (for
            debugging, and on CPU, where CUDA graphs do not exist).

    Raises:
        ValueError: an empty cache, a model without kvcore attention, a CPU cache with
            ``capture=True``, a bad ``headroom``, or ``input_ids`` of the wrong shape (per call).
    """

    def __init__(self, model: Any, cache: KVCoreCache, *, headroom: int = 256, capture: bool = True) -> None:
        if not isinstance(cache, KVCoreCache):
            raise ValueError(f"cache must be a KVCoreCache, got {type(cache).__name__}")
        if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            raise ValueError("DecodeGraph needs the model switched to kvcore attention: call kvcore's enable(model) first")
        if cache.paged is None or not cache.seq_ids or min(cache._store_lengths()) < 1:
            raise ValueError("DecodeGraph needs a prefilled cache (at least one cached token per sequence)")
        if isinstance(headroom, bool) or not isinstance(headroom, int) or headroom < 1:
            raise ValueError(f"headroom must be an int >= 1, got {headroom!r}")
        if capture and cache.paged.device.type != "cuda":
            raise ValueError(f"capture=True needs a CUDA cache, this one is on {cache.paged.device}; "
                             "pass capture=False to run the static-buffer step eagerly")
        self.model = model
        self.cache = cache
        self.headroom = headroom
        self.capture = capture
        #: How many times the step has been captured (the first call, then each re-capture).
        self.captures = 0
        self._kwargs = {**cache.forward_kwargs(model), "use_cache": True}
        self._buffers: Optional[_GraphBuffers] = None
        self._graph: Optional[Any] = None
        self._logits: Optional[Tensor] = None

    def _forward(self, g: _GraphBuffers) -> Tensor:
        self.cache._graph = g
        try:
            return self.model(input_ids=g.input_ids, position_ids=g.position_ids, **self._kwargs).logits
        finally:
            self.cache._graph = None
            _note.entry = None

    def __call__(self, input_ids: Tensor) -> Tensor:
        """Decode one token per sequence; returns the step's logits ``[B, 1, vocab]``.

        The returned tensor is a static buffer of the graph: the next call overwrites it.
        """
        cache = self.cache
        batch = len(cache.seq_ids)
        if not isinstance(input_ids, Tensor) or tuple(input_ids.shape) != (batch, 1):
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [{batch}, 1] tensor (one token per sequence), got {shape}")
        if self._buffers is None or not cache._graph_step_fits(self._buffers):
            self._graph = self._logits = None
            self._buffers = cache._graph_buffers(self.headroom)
        g = self._buffers
        cache._stage_graph_step(g, input_ids)
        if not self.capture:
            with torch.no_grad():
                return self._forward(g)
        if self._graph is None:
            self.captures += 1
            self._capture(g)
        self._graph.replay()
        return self._logits

    def _capture(self, g: _GraphBuffers) -> None:
        """Capture the step staged in ``g`` (the caller then replays it)."""
        saved = ops.set_validation(False)  # validation reads index contents on the host
        try:
            with torch.no_grad():
                # The warm-up forward writes this step's K/V and computes its logits; the capture
                # then records the same step and the replay repeats it (same slots, same values).
                side = torch.cuda.Stream(device=g.seq_lens.device)
                side.wait_stream(torch.cuda.current_stream(g.seq_lens.device))
                with torch.cuda.stream(side):
                    self._forward(g)
                torch.cuda.current_stream(g.seq_lens.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = self._forward(g)
        finally:
            ops.set_validation(saved)
        self._graph, self._logits = graph, logits


# The most mask entries one masked SDPA call of _sdpa gets: a prefill past cached tokens or with a
# sliding window runs its queries in chunks of rows, each against only the keys those rows can
# attend, so that the boolean mask (and the additive bias SDPA's kernels make of it) stays small
# instead of [T, past + T] (1 G entries at a 32k chunk).
_SDPA_MASK_ELEMENTS = 1 << 26


def _sdpa_chunk_rows(past: int, new: int, window: Optional[int]) -> int:
    """Query rows per masked SDPA call of ``_sdpa``: at most ``_SDPA_MASK_ELEMENTS`` mask entries,
    at least one row."""
    budget = _SDPA_MASK_ELEMENTS
    if window is None:  # a chunk's rows attend every key up to the last row's position
        return max(1, min(new, budget // (past + new)))
    # r rows attend at most r + window - 1 keys: the largest r with r * (r + window - 1) <= budget
    w = window - 1
    r = int((-w + math.isqrt(w * w + 4 * budget)) // 2)
    return max(1, min(new, r))


def _sdpa(query: Tensor, key: Tensor, value: Tensor, past: int, scaling: float, window: Optional[int]) -> Tensor:
    """Causal SDPA of ``query [B, Hq, T, D]`` at positions ``past ..`` over ``key/value [B, Hkv, past + T, D]``;
    returns ``[B, T, Hq, D]`` (transformers' attention-output layout). With cached tokens before
    the queries or a sliding window, the queries go in chunks of rows, each against the keys it
    can attend (``_sdpa_chunk_rows``)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    new = query.shape[2]
    if past == 0 and window is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous()
    rows = _sdpa_chunk_rows(past, new, window)
    out = query.new_empty(query.shape[0], new, query.shape[1], value.shape[3])  # (V's head dim: MLA's differs)
    for q0 in range(0, new, rows):
        q1 = min(new, q0 + rows)
        lo = 0 if window is None else max(0, past + q0 - window + 1)  # the first key row q0 attends
        hi = past + q1  # one past the last key row q1 - 1 attends
        q_pos = torch.arange(past + q0, past + q1, device=query.device).view(-1, 1)
        k_pos = torch.arange(lo, hi, device=query.device).view(1, -1)
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        part = F.scaled_dot_product_attention(query[:, :, q0:q1], key[:, :, lo:hi], value[:, :, lo:hi],
                                              attn_mask=mask, scale=scaling)
        out[:, q0:q1] = part.transpose(1, 2)
    return out


def kvcore_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The attention function registered as ``"kvcore"`` (transformers' attention-interface signature).

    Args:
        module: the attention module (its ``layer_idx`` is used).
        query: ``[B, Hq, T, D]``; key, value: ``[B, Hkv, T, D]`` as returned by the cache's update.
        attention_mask: ignored (kvcore's mask function refuses padding and returns None; the
            causal / sliding-window structure is built here).
        scaling: softmax scale (default ``D ** -0.5``); dropout: must be 0 (inference only).
        kwargs: ``sliding_window`` (Mistral / Qwen2 pass it) is honoured; the rest is ignored.

    Returns:
        ``(out [B, T, Hq, D], None)``: no attention weights are materialised.
    """
    if dropout:
        raise ValueError(f"dropout must be 0 with kvcore attention (inference only), got {dropout}")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    entry = getattr(_note, "entry", None)
    _note.entry = None
    layer_idx = getattr(module, "layer_idx", None)
    if entry is not None and entry[2] is key and entry[1] == layer_idx:
        return entry[0]._attend(layer_idx, query, key, value, float(scaling), window), None
    # No kvcore cache behind this call (use_cache=False): plain causal SDPA over the given tokens.
    past = key.shape[2] - query.shape[2]
    return _sdpa(query, key, value, past, float(scaling), window), None


def _kvcore_mask(*args: Any, attention_mask: Optional[Tensor] = None, q_length: int = 1, **kwargs: Any) -> None:
    """Mask function registered as ``"kvcore"``: refuses padded batches, else no mask (built in attention)."""
    # Padding shows at prefill; checking only multi-token steps keeps decode free of host syncs.
    if attention_mask is not None and q_length > 1 and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError(
            "attention_mask has padding (zeros); kvcore's transformers adapter runs batches without padding "
            "only (give sequences of one length, or one sequence per generate call)"
        )
    return None


def _cache_kwarg(model: Any) -> str:
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _register() -> None:
    ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, kvcore_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, _kvcore_mask)


def _max_new_tokens(model: Any, input_len: int, kwargs: dict[str, Any]) -> int:
    gen_config = kwargs.get("generation_config") or model.generation_config
    max_new = kwargs.get("max_new_tokens", getattr(gen_config, "max_new_tokens", None))
    if max_new is None:
        max_length = kwargs.get("max_length", getattr(gen_config, "max_length", None)) or input_len + 20
        max_new = max(max_length - input_len, 1)
    return int(max_new)


def enable(
    model: Any,
    policy: Optional[str] = None,
    budget: Optional[int] = None,
    *,
    page_size: int = 16,
    layer_to_store: Optional[Sequence[int]] = None,
    kv_layout: str = "separate",
    **policy_kwargs: Any,
) -> Any:
    """Run ``model`` (a transformers causal LM) on kvcore: paged cache, kvcore decode, optional eviction.

    Registers the ``"kvcore"`` attention and mask functions, switches the model to them, and wraps
    ``model.generate`` so that each call without ``past_key_values`` gets a fresh
    :class:`KVCoreCache` sized for the prompt plus ``max_new_tokens`` (the last one is kept as
    ``model.kvcore_cache`` for inspection).

    Args:
        model: a loaded ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``; a base
            model (``LlamaModel``, ...) has no ``generate`` to wrap: it gets kvcore's attention, and
            its caller passes a :class:`KVCoreCache` (``cache.forward_kwargs(model)``).
        policy: ``None`` (exact), one of :data:`POLICIES` (applied after prefill), or ``"infllm"``
            (:data:`RETRIEVAL_POLICIES`: handled by
            :func:`kvcore.integrations.transformers_infllm.enable_infllm`, which documents its
            options: ``budget`` = tokens attended per decode step, ``n_init``, ``n_local``,
            ``block_size``, ``topk``, ``repr_topk``, ``max_cached_block``, ...).
        budget: tokens per sequence and layer kept by the policy (pyramidkv: their mean over the layers).
        page_size: tokens per page of the paged cache.
        layer_to_store: CLA / MLKV layer -> store map (see :class:`KVCoreCache`).
        kv_layout: ``"separate"`` or ``"paired"`` K/V pages (see :class:`kvcore.PagedKVCache`); MLA
            models (one latent row per token) and ``"infllm"`` (its own cache) take only the default.
        policy_kwargs: passed to the policy (see :class:`KVCoreCache`).

    Returns:
        ``model`` (modified in place).

    Raises:
        ValueError: unsupported architecture (with the reason), bad policy/budget (MLA models: any policy).
    """
    check_supported(model.config)
    if kv_layout != "separate" and (getattr(model.config, "model_type", None) in _MLA_MODEL_TYPES
                                    or policy in RETRIEVAL_POLICIES):
        raise ValueError(f"kv_layout={kv_layout!r} applies to the K/V page cache; MLA models and 'infllm' "
                         "have their own caches (leave kv_layout at 'separate')")
    if getattr(model.config, "model_type", None) in _MLA_MODEL_TYPES:  # refuses every policy, infllm included
        from .transformers_mla import enable as enable_mla

        return enable_mla(model, policy, budget, page_size=page_size, layer_to_store=layer_to_store, **policy_kwargs)
    if policy in RETRIEVAL_POLICIES:
        from .transformers_infllm import enable_infllm  # imports this module: load it on demand

        return enable_infllm(model, budget, page_size=page_size, layer_to_store=layer_to_store, **policy_kwargs)
    # Validate the options now rather than at the first generate.
    KVCoreCache(model.config, max_cache_len=1, page_size=page_size, policy=policy, budget=budget,
                policy_kwargs=policy_kwargs, layer_to_store=layer_to_store, kv_layout=kv_layout)
    return _install(model, lambda max_cache_len: KVCoreCache(
        model.config, max_cache_len=max_cache_len, page_size=page_size, policy=policy, budget=budget,
        policy_kwargs=policy_kwargs, layer_to_store=layer_to_store, kv_layout=kv_layout))


def _install(model: Any, make_cache: Callable[[int], Cache]) -> Any:
    """Register kvcore's attention for ``model`` and wrap its ``generate`` so that each call without
    a cache of its own gets ``make_cache(prompt length + new tokens)`` (kept as
    ``model.kvcore_cache``). The last step of :func:`enable` for the paged, MLA and InfLLM caches;
    ``model`` is modified in place and returned."""
    _register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    original = getattr(model, "_kvcore_original_generate", None) or getattr(model, "generate", None)
    if original is None:
        # A base model (LlamaModel, ...) has no generate: it runs on kvcore's attention with the
        # cache its caller passes (a KVCoreCache and its forward_kwargs).
        return model
    model._kvcore_original_generate = original
    # transformers 5.x renamed the forward's past_key_values to cache; use what this version takes.
    cache_kwarg = _cache_kwarg(model)

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        given = kwargs.get(cache_kwarg, kwargs.get("past_key_values"))
        if given is None and kwargs.get("use_cache", True):
            inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
            if inputs is None:
                raise ValueError("kvcore's generate needs input_ids (first argument or input_ids=...)")
            input_len = inputs.shape[-1]
            cache = make_cache(input_len + _max_new_tokens(model, input_len, kwargs))
            kwargs[cache_kwarg] = cache
            model.kvcore_cache = cache
        return original(*args, **kwargs)

    model.generate = generate
    return model


def disable(model: Any, attn_implementation: str = "sdpa") -> Any:
    """Undo :func:`enable`: restore ``generate`` (and MLA attention forwards) and switch to ``attn_implementation``.
    Returns ``model``."""
    if model.__dict__.get("_kvcore_mla_enabled"):
        from .transformers_mla import restore_attention

        restore_attention(model)
    original = getattr(model, "_kvcore_original_generate", None)
    if original is not None:
        model.generate = original
        del model._kvcore_original_generate
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = attn_implementation
    return model


_ = transformers  # the top-level import above is the version gate
