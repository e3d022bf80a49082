"""DeepSeek-V2/V3 (MLA) transformers models on kvcore's latent cache and MLA ops.

:func:`kvcore.integrations.transformers.enable` sends models whose ``config.model_type`` is
``deepseek_v2``, ``deepseek_v3`` or ``kimi_k2`` here; the same one call turns it on::

    import kvcore.integrations.transformers as kvt
    kvt.enable(model)                 # a DeepseekV2ForCausalLM / DeepseekV3ForCausalLM
    out = model.generate(input_ids, max_new_tokens=64)
    model.kvcore_cache.memory_comparison()

What runs where:

* :class:`KVCoreMLACache` (a ``transformers.Cache``) keeps one :class:`kvcore.MLALatentCache`:
  per token and layer one latent row of ``kv_lora_rank + qk_rope_head_dim`` values (512 + 64 for
  DeepSeek), paged.
* Each ``DeepseekV2Attention`` / ``DeepseekV3Attention`` gets an instance ``forward`` that, when
  the call's cache is a :class:`KVCoreMLACache`, runs :class:`kvcore.mla.MLAAttention`'s path on
  the module's own parameters (shared, not copied): ``kvcore.mla_latent_project`` writes the
  step's latents (down-projection, RMSNorm, RoPE) into the pages; a decode step (one new token
  per sequence) folds ``W_UK`` into the query and attends over the latents with
  ``kvcore.mla_decode`` (absorbed form), then applies ``W_UV`` and ``o_proj``; a multi-token step
  (prefill, chunked prefill) up-projects the sequence's cached latents to per-head K/V and runs
  causal SDPA. With any other cache (``use_cache=False``, a ``DynamicCache``) the module's
  original forward runs. :func:`disable` puts the original ``forward`` back.
* MoE / MLP layers, norms, embeddings and the LM head are untouched (only attention changes).

Supported configurations:

* ``q_lora_rank`` set (``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``) or ``None`` (``q_proj``,
  DeepSeek-V2-Lite).
* RoPE: DeepSeek's interleaved pairs (V2 always; V3 with ``rope_interleave=True``, the default) or
  the half split (V3 with ``rope_interleave=False``). ``rope_parameters`` of type ``default``,
  ``linear``, ``llama3`` and ``yarn``: their inverse frequencies do not depend on the sequence
  length, so the RoPE table is built once from the model's own rotary module (its ``inv_freq``
  and ``attention_scaling``, i.e. YaRN's cos/sin magnitude factor), and the softmax scale is the
  attention module's own ``scaling`` (which carries YaRN's ``mscale_all_dim`` correction, squared,
  as DeepSeek-V3's released config uses). ``dynamic`` and ``longrope`` are refused: their
  frequencies change with the sequence length, while the latent cache keeps k_pe roped once.
* Refused with a ``ValueError`` naming why: eviction policies (the latent row is shared by every
  head, and kvcore's eviction scoring works on per-head K/V pages), ``layer_to_store`` (CLA: no
  MLA model is trained to share latents across layers), ``attention_bias=True`` (the fused latent
  projection has no bias term; no DeepSeek checkpoint uses one), attention modules that are not
  transformers' own DeepSeek classes (``trust_remote_code`` modeling files have another forward),
  padded batches (through kvcore's mask function, as for GQA models), beam search and assisted
  decoding (cache reordering / cropping), quantized (e.g. FP8) ``kv_a_proj_with_mqa`` /
  ``kv_b_proj`` weights (kvcore reads them directly; load such checkpoints dequantized).
  ``DecodeGraph`` takes the GQA ``KVCoreCache`` only (no CUDA-graph decode for MLA yet).
* Positions come from the cache (tokens cached so far), not from ``position_ids``: without
  padding they are the same.

Memory: :meth:`KVCoreMLACache.memory_comparison` compares the pages held with a cache of per-head
K and V for the same model (``H * (qk_nope + rope + v_head)`` values per token and layer: what
DeepSeek's released ``trust_remote_code`` modeling code stores in a ``DynamicCache``; 40960 vs
576 values for DeepSeek-V3, 71x) and with the exact latent bytes (what transformers 5.x's own
DeepSeek modules store in their ``DynamicCache``: they too cache the latent, unpaged).

Costs to know: per layer, the absorbed weights (``kv_a_proj_with_mqa`` transposed, ``W_UK`` and
``W_UV^T`` from ``kv_b_proj``) are kept as contiguous copies next to the model's (for DeepSeek-V3
about 42 MB per layer in bf16); kvcore's validation (on by default) reads the step's slots and
positions on the host once per layer (the latent projection's check; the decode's block table
and lengths, which the latent cache built, are not checked again). The patched ``forward`` replaces any
instance-level ``forward`` wrapper (e.g. accelerate's device-placement hook) on the attention
modules for the kvcore path; the model is expected on one device.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

try:
    from transformers.cache_utils import Cache
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention, DeepseekV2RotaryEmbedding
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kvcore.integrations.transformers_mla needs transformers with DeepSeek-V2/V3 models "
        "(pip install 'kvcore[transformers]')"
    ) from exc

from ..mla import MLAAttention, MLAConfig, MLALatentCache, MLAStep
from . import transformers as _kvt

__all__ = ["MLA_MODEL_TYPES", "SUPPORTED_ROPE_TYPES", "KVCoreMLACache", "check_supported_mla", "disable", "enable",
           "mla_config", "restore_attention"]

#: ``config.model_type`` values with multi-head latent attention that this module runs.
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2")
#: RoPE types whose inverse frequencies are fixed (the latent cache stores k_pe roped once).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

_ATTENTION_CLASSES = (DeepseekV2Attention, DeepseekV3Attention)
_ROTARY_CLASSES = (DeepseekV2RotaryEmbedding, DeepseekV3RotaryEmbedding)


def _rope_type(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported for MLA models")
    return str(params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default")


def check_supported_mla(config: Any) -> None:
    """Raise ``ValueError`` naming the reason if ``config`` (an MLA model's) cannot run on kvcore.

    Checks the model type, the RoPE type (see the module docstring) and ``attention_bias``.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in MLA_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not an MLA model type ({', '.join(MLA_MODEL_TYPES)})")
    rope_type = _rope_type(config)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported for MLA models on kvcore: its frequencies change with the "
            "sequence length, while the latent cache keeps every token's k_pe roped once; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if getattr(config, "attention_bias", False):
        raise ValueError(
            "attention_bias=True is not supported for MLA models on kvcore: kvcore.mla_latent_project fuses "
            "kv_a_proj_with_mqa without a bias term"
        )
    for name in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "num_attention_heads"):
        value = getattr(config, name, None)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name} must be a positive int for an MLA model, got {value!r}")


def _interleaved(config: Any) -> bool:
    # DeepSeek-V2's modeling rotates complex pairs (2i, 2i+1) always; V3 follows rope_interleave.
    if config.model_type == "deepseek_v2":
        return True
    return bool(getattr(config, "rope_interleave", True))


def mla_config(config: Any, attn: Optional[nn.Module] = None) -> MLAConfig:
    """The :class:`kvcore.mla.MLAConfig` of a transformers DeepSeek config (and attention module).

    ``attn`` supplies what the config does not say exactly: the softmax scale (``attn.scaling``,
    YaRN's mscale included) and the latent RMSNorm's epsilon (``kv_a_layernorm``'s, which
    transformers builds with its default 1e-6 whatever ``rms_norm_eps`` says).
    """
    check_supported_mla(config)
    scale = float(attn.scaling) if attn is not None else None
    eps = float(attn.kv_a_layernorm.variance_epsilon) if attn is not None else 1e-6
    return MLAConfig(
        hidden_size=int(config.hidden_size), num_heads=int(config.num_attention_heads),
        q_lora_rank=None if config.q_lora_rank is None else int(config.q_lora_rank),
        kv_lora_rank=int(config.kv_lora_rank), qk_nope_head_dim=int(config.qk_nope_head_dim),
        qk_rope_head_dim=int(config.qk_rope_head_dim), v_head_dim=int(config.v_head_dim),
        max_position=int(getattr(config, "max_position_embeddings", 4096) or 4096), rms_norm_eps=eps,
        interleaved_rope=_interleaved(config), softmax_scale=scale,
    )


class _RopeTable:
    """kvcore's ``cos_sin`` table ``[rows, P]`` (cos of the P/2 angles, then their sin) from the
    model's rotary module: the same ``position * inv_freq`` angles in fp32 and the same
    ``attention_scaling`` factor on cos and sin as transformers applies (YaRN's magnitude factor).
    Shared by every layer; grows (doubling) when a step needs positions past its rows."""

    def __init__(self, rotary: nn.Module) -> None:
        self.rotary = rotary
        self._table: Optional[Tensor] = None
        self._key: Optional[tuple] = None

    def get(self, rows: int, device: torch.device) -> Tensor:
        inv_freq = self.rotary.inv_freq
        have = 0 if self._table is None else self._table.shape[0]
        key = (device, inv_freq.data_ptr(), inv_freq._version, float(self.rotary.attention_scaling))
        if self._table is None or key != self._key or have < rows:
            rows = max(rows, 2 * have if key == self._key else 0, 256)
            freqs = torch.arange(rows, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq.float()[None]
            scaling = float(self.rotary.attention_scaling)
            table = torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=1)
            self._table = table.to(device=device, dtype=torch.float32).contiguous()
            self._key = key
        return self._table


class _SharedMLA(MLAAttention):
    """:class:`kvcore.mla.MLAAttention` on a transformers DeepSeek attention module's own
    submodules (shared, nothing copied but the absorbed weights ``MLAAttention`` derives)."""

    def __init__(self, attn: nn.Module, config: MLAConfig, rope: _RopeTable) -> None:
        nn.Module.__init__(self)  # not MLAAttention.__init__: that would allocate a second set of weights
        self.config = config
        names = ("q_a_proj", "q_a_layernorm", "q_b_proj") if config.q_lora_rank is not None else ("q_proj",)
        for name in names + ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"):
            setattr(self, name, getattr(attn, name))
        self.cos_sin: Optional[Tensor] = None  # set before each call from the shared rope table
        self._rope = rope
        self._absorbed_key = None


def _shared_mla(module: nn.Module) -> _SharedMLA:
    return module.__dict__["_kvcore_mla"]


class _MLALayer(_kvt._LayerView):
    """A layer of :class:`KVCoreMLACache`: written by the MLA attention path, not by ``update``."""

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(
            "KVCoreMLACache is written by kvcore's MLA attention path only: call "
            "kvcore.integrations.transformers.enable(model) before using it"
        )


class KVCoreMLACache(_kvt._LogicalPositions, Cache):
    """A ``transformers.Cache`` holding an MLA model's latents in a :class:`kvcore.MLALatentCache`.

    One latent row of ``kv_lora_rank + qk_rope_head_dim`` values per token and layer (no per-head
    K/V). The pages are allocated at the first forward step (dtype and device of the model's
    hidden states), with room for ``max_cache_len`` tokens of each of the batch's sequences.
    :func:`enable` builds one per ``generate`` call; build one yourself to pass to ``model(...)``
    (``**cache.forward_kwargs(model)``) after ``enable(model)``.

    Args:
        config: the model's config (see :func:`check_supported_mla`).
        max_cache_len: tokens per sequence the pages must hold (prompt + new tokens).
        page_size: tokens per page.

    Raises:
        ValueError: unsupported config, bad ``max_cache_len`` / ``page_size``.
    """

    def __init__(self, config: Any, *, max_cache_len: int, page_size: int = 16) -> None:
        check_supported_mla(config)
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be an int >= 1, got {max_cache_len!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        self.config = config
        self.num_layers = int(config.num_hidden_layers)
        self.kv_lora_rank = int(config.kv_lora_rank)
        self.rope_dim = int(config.qk_rope_head_dim)
        self._max_cache_len = max_cache_len
        self.page_size = page_size
        self.latent: Optional[MLALatentCache] = None
        self.seq_ids: list[int] = []
        self._seen = 0  # tokens per sequence (the next token's position)
        self._step: Optional[MLAStep] = None
        super().__init__(layers=[_MLALayer(self, i) for i in range(self.num_layers)])

    # ------------------------------------------------------------------ state

    def _reset(self) -> None:
        if self.latent is not None:
            for seq_id in self.seq_ids:
                self.latent.free(seq_id)
            self.seq_ids = [self.latent.add_sequence() for _ in range(len(self.seq_ids))]
        self._seen = 0
        self._step = None

    def cached_tokens(self) -> int:
        """Tokens held in the pages per sequence."""
        return 0 if self.latent is None or not self.seq_ids else self.latent.seq_len(self.seq_ids[0])

    def _bytes_per_value(self) -> int:
        return 0 if self.latent is None else self.latent.latent(0).element_size()

    def cache_bytes(self) -> int:
        """Bytes of latent storage the live sequences hold now: pages held x page bytes (all layers)."""
        if self.latent is None:
            return 0
        pages = sum(len(self.latent.pages_of(s)) for s in self.seq_ids)
        return pages * self.page_size * self.latent.memory_report()["bytes_per_token"]

    def memory_comparison(self) -> dict[str, Any]:
        """What the cached tokens cost here and in two other caches of the same model.

        Returns a dict: ``tokens`` (cached tokens, all sequences); ``kvcore_bytes``
        (:meth:`cache_bytes`, whole pages); ``latent_bytes`` (the same latent rows without page
        rounding: what transformers 5.x's own DeepSeek modules keep in their ``DynamicCache``);
        ``per_head_kv_bytes`` (per-head K ``[H, qk_nope + rope]`` and V ``[H, v_head]`` per token
        and layer: what DeepSeek's released remote modeling code keeps, and what a GQA/MHA-style
        paged cache of this model would hold); ``per_head_kv_over_kvcore`` (their ratio).
        """
        c = self.config
        tokens = sum(self.latent.seq_len(s) for s in self.seq_ids) if self.latent is not None else 0
        elem = self._bytes_per_value()
        latent = tokens * self.num_layers * (self.kv_lora_rank + self.rope_dim) * elem
        per_head = tokens * self.num_layers * int(c.num_attention_heads) * (
            int(c.qk_nope_head_dim) + int(c.qk_rope_head_dim) + int(c.v_head_dim)) * elem
        kv = self.cache_bytes()
        return {"tokens": tokens, "kvcore_bytes": kv, "latent_bytes": latent, "per_head_kv_bytes": per_head,
                "per_head_kv_over_kvcore": per_head / kv if kv else float("nan")}

    # ------------------------------------------------------------------ per-layer step

    def _open_step(self, layer_idx: int, hidden: Tensor) -> MLAStep:
        """The step's :class:`MLAStep` for this layer: layer 0 reserves the new tokens for every layer."""
        batch, new = hidden.shape[0], hidden.shape[1]
        if self.latent is None:
            pages_per_seq = -(-self._max_cache_len // self.page_size)
            self.latent = MLALatentCache(
                self.num_layers, num_pages=batch * pages_per_seq, page_size=self.page_size,
                kv_lora_rank=self.kv_lora_rank, rope_dim=self.rope_dim, dtype=hidden.dtype, device=hidden.device,
            )
            self.seq_ids = [self.latent.add_sequence() for _ in range(batch)]
        if batch != len(self.seq_ids):
            raise ValueError(f"hidden_states has batch {batch} but this cache holds {len(self.seq_ids)} sequences")
        if hidden.dtype != self.latent.dtype or hidden.device != self.latent.device:
            raise ValueError(f"hidden_states are {hidden.dtype} on {hidden.device} but the latent cache is "
                             f"{self.latent.dtype} on {self.latent.device}")
        if layer_idx == 0:
            self._step = self.latent.step(self.seq_ids, [new] * batch)
            self._seen += new
        elif self._step is None or self._step.num_tokens != [new] * batch:
            raise ValueError(f"layer {layer_idx} ran before layer 0 opened a step of {new} tokens per sequence")
        return self._step


def _mla_forward(
    self: nn.Module,
    hidden_states: Tensor,
    attention_mask: Optional[Tensor] = None,
    cache: Optional[Cache] = None,
    position_embeddings: Any = None,
    past_key_values: Optional[Cache] = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """The forward kvcore puts on a DeepSeek attention module (see the module docstring)."""
    if cache is None:
        cache = past_key_values
    if not isinstance(cache, KVCoreMLACache):
        original = self.__dict__["_kvcore_mla_forward"][0] or type(self).forward.__get__(self)
        return original(hidden_states, attention_mask=attention_mask, cache=cache,
                        position_embeddings=position_embeddings, **kwargs)
    if self.training:
        raise ValueError("kvcore's MLA path is inference only (the module is in training mode)")
    batch, new, width = hidden_states.shape
    step = cache._open_step(self.layer_idx, hidden_states)
    mla = _shared_mla(self)
    # Positions run to seen - 1 (no eviction for MLA): the table needs that many rows.
    mla.cos_sin = mla._rope.get(cache.get_seq_length(), hidden_states.device)
    out = mla(hidden_states.reshape(batch * new, width), cache.latent.latent(self.layer_idx), step)
    return out.view(batch, new, -1), None


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    modules = list(model.modules()) if hasattr(model, "modules") else []
    found = [m for m in modules if isinstance(m, _ATTENTION_CLASSES)]
    if not found:
        odd = sorted({type(m).__name__ for m in modules if "Attention" in type(m).__name__})
        raise ValueError(
            "no transformers DeepseekV2Attention / DeepseekV3Attention module found in the model "
            f"(attention classes present: {odd or 'none'}); kvcore patches transformers' own DeepSeek "
            "classes only (load without trust_remote_code)"
        )
    return found


def _rotary(model: nn.Module) -> nn.Module:
    found = [m for m in model.modules() if isinstance(m, _ROTARY_CLASSES)]
    if len(found) != 1:
        raise ValueError(f"expected one DeepSeek rotary embedding module in the model, found {len(found)}")
    return found[0]


def restore_attention(model: nn.Module) -> None:
    """Put back every patched attention module's original ``forward`` (no-op if none is patched)."""
    for module in model.modules():
        saved = module.__dict__.pop("_kvcore_mla_forward", None)
        if saved is None:
            continue
        module.__dict__.pop("_kvcore_mla", None)
        module.__dict__.pop("forward", None)
        if saved[0] is not None:
            module.__dict__["forward"] = saved[0]  # an instance forward that was there before (e.g. a hook's)
    model.__dict__.pop("_kvcore_mla_enabled", None)


def enable(
    model: Any,
    policy: Optional[str] = None,
    budget: Optional[int] = None,
    *,
    page_size: int = 16,
    layer_to_store: Optional[Sequence[int]] = None,
    **policy_kwargs: Any,
) -> Any:
    """Run a transformers DeepSeek-V2/V3 model's attention on kvcore's MLA path (see the module docstring).

    Called by :func:`kvcore.integrations.transformers.enable` for MLA model types (same
    signature). Patches every DeepSeek attention module's ``forward``, switches the model to the
    ``"kvcore"`` attention/mask functions (padding refusal; the unpatched fallback path's SDPA),
    and wraps ``model.generate`` so that each call without a cache gets a fresh
    :class:`KVCoreMLACache` for the prompt plus ``max_new_tokens`` (kept as ``model.kvcore_cache``).

    Args:
        model: a ``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM`` (or base model).
        policy, budget, policy_kwargs: must be unset (no eviction policy for MLA).
        page_size: tokens per page of the latent cache.
        layer_to_store: must be ``None`` (no CLA for MLA).

    Returns:
        ``model`` (modified in place).

    Raises:
        ValueError: an option MLA does not take, or an unsupported configuration (with the reason).
    """
    from . import transformers as kvt

    if policy is not None or budget is not None or policy_kwargs:
        raise ValueError(
            f"eviction policies are not supported for MLA models, nor retrieval (got policy={policy!r}, budget={budget!r}, "
            f"options {sorted(policy_kwargs)}): every head reads one shared latent row per token, and kvcore's "
            "policies score and compact per-head K/V pages"
        )
    if layer_to_store is not None:
        raise ValueError(
            "layer_to_store (CLA / MLKV store sharing) is not supported for MLA models: each layer's latent is its "
            "own projection, and no DeepSeek model is trained to share it across layers"
        )
    config = model.config
    check_supported_mla(config)
    KVCoreMLACache(config, max_cache_len=1, page_size=page_size)  # validates page_size now
    modules = _attention_modules(model)
    rope = _RopeTable(_rotary(model))
    for module in modules:
        if module.kv_a_proj_with_mqa.bias is not None:
            raise ValueError(f"layer {module.layer_idx}: kv_a_proj_with_mqa has a bias, which "
                             "kvcore.mla_latent_project does not take")
        # kvcore reads these two weights directly (the fused projection, the absorbed W_UK / W_UV);
        # the other projections are called as modules, so quantized ones work there.
        for name in ("kv_a_proj_with_mqa", "kv_b_proj"):
            weight = getattr(getattr(module, name), "weight", None)
            if not isinstance(weight, Tensor) or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(
                    f"layer {module.layer_idx}: {name}.weight must be a float32/bfloat16/float16 tensor, got "
                    f"{getattr(weight, 'dtype', type(weight).__name__)}: kvcore reads it directly, so quantized "
                    "(e.g. FP8) checkpoints must be loaded dequantized"
                )
    restore_attention(model)  # enable twice: patch once
    for module in modules:
        module.__dict__["_kvcore_mla"] = _SharedMLA(module, mla_config(config, module), rope)
        module.__dict__["_kvcore_mla_forward"] = (module.__dict__.get("forward"),)
        module.__dict__["forward"] = types.MethodType(_mla_forward, module)
    model.__dict__["_kvcore_mla_enabled"] = True

    return kvt._install(model, lambda max_len: KVCoreMLACache(config, max_cache_len=max_len, page_size=page_size))


def disable(model: Any, attn_implementation: str = "sdpa") -> Any:
    """Undo :func:`enable` (same as :func:`kvcore.integrations.transformers.disable`). Returns ``model``."""
    from . import transformers as kvt

    return kvt.disable(model, attn_implementation)

