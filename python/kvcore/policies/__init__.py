"""Policies built on kvcore's ops: KV-cache eviction (:mod:`kvcore.policies.eviction`) and their
plain-torch forms used as test oracles and benchmark peers (:mod:`kvcore.policies.torch_forms`)."""

from . import eviction, torch_forms
from .eviction import adakv, apply, corm, h2o, h2o_scores, knorm, pyramidkv, pyramidkv_budget, snapkv, streaming_llm, tova

__all__ = [
    "adakv", "apply", "corm", "eviction", "h2o", "h2o_scores", "knorm", "pyramidkv", "pyramidkv_budget", "snapkv",
    "streaming_llm", "torch_forms", "tova",
]
