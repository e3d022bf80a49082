"""Generate with a small random-weight transformers model on kvcore's cache and kernels (no downloads).

    python -m kvcore.generate --arch llama --layers 4 --context 8192 --policy snapkv --budget 1024

Builds the model from a config (random weights, seeded), feeds a random prompt of ``--context``
tokens in chunks (progress bar on stderr; kvcore's SDPA-over-cached-tokens path), applies the
policy at the end of the prefill, decodes ``--new-tokens`` greedily with ``kvcore.gqa_decode``,
and prints: cache bytes with the policy (measured: pages held) and without it (the same tokens in a
full paged cache), prefill and decode tokens per second, and the generated tokens.
``--policy infllm --budget N`` keeps each layer's K/V in InfLLM memory instead
(:mod:`kvcore.integrations.transformers_infllm`: chunked prefill, top-k unit retrieval per decode
step); its cache bytes are what the device allocates for sinks, window and cached units, and the
CPU unit store is printed too.
Needs the ``transformers`` extra. Defaults are small so it runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: Architectures with multi-head latent attention (kvcore's latent cache and MLA ops, no policies).
MLA_ARCHS = ("deepseek_v2", "deepseek_v3")


def _build_mla_model(arch: str, layers: int, *, hidden: int, heads: int, vocab: int, max_positions: int) -> Any:
    """A tiny DeepSeek-V2/V3: DeepSeek's latent layout (kv_lora_rank 512 + rope 64, which the CUDA
    kernels are built for), small heads (nope 64, v 64), a query LoRA, and MoE layers after a
    dense first one (4 routed experts, top 2, one shared)."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  moe_intermediate_size=max(hidden // 2, 8), num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64,
                  v_head_dim=64, q_lora_rank=128, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                  first_k_dense_replace=1, max_position_embeddings=max_positions)
    if arch == "deepseek_v2":
        return transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**common))
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(n_group=2, topk_group=1, **common))


def build_model(arch: str, layers: int, *, hidden: int, heads: int, kv_heads: int, vocab: int, max_positions: int,
                seed: int = 0) -> Any:
    """A random-weight ``{Llama,Mistral,Qwen2,DeepseekV2,DeepseekV3}ForCausalLM`` from a config (eval mode,
    float32, CPU). DeepSeek models ignore ``kv_heads`` (MLA caches one latent per token)."""
    import transformers

    if arch in MLA_ARCHS:
        torch.manual_seed(seed)
        return _build_mla_model(arch, layers, hidden=hidden, heads=heads, vocab=vocab,
                                max_positions=max_positions).eval()
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes) + list(MLA_ARCHS)}, got {arch!r}")
    config_cls, model_cls = classes[arch]
    extra = {"sliding_window": None} if arch == "mistral" else {}
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads,
                        max_position_embeddings=max_positions, **extra)
    torch.manual_seed(seed)
    return model_cls(config).eval()


def _progress(done: int, total: int, start: float, out=None) -> None:
    # sys.stderr looked up per call, not bound at import (pytest's capture replaces and closes it).
    out = sys.stderr if out is None else out
    width = 30
    filled = width * done // max(total, 1)
    rate = done / max(time.perf_counter() - start, 1e-9)
    out.write(f"\rprefill [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tokens {rate:,.0f} tok/s")
    if done >= total:
        out.write("\n")
    out.flush()


def run(arch: str = "llama", layers: int = 4, context: int = 512, new_tokens: int = 16, policy: Optional[str] = None,
        budget: Optional[int] = None, batch: int = 1, hidden: int = 256, heads: int = 8, kv_heads: int = 2,
        vocab: int = 1024, page_size: int = 16, chunk: int = 512, dtype: str = "float32", device: str = "cpu",
        seed: int = 0, progress: bool = True, cuda_graph: bool = False,
        policy_kwargs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Prefill ``context`` random tokens and decode ``new_tokens`` greedily; returns the numbers printed.

    ``cuda_graph``: decode through :class:`kvcore.integrations.transformers.DecodeGraph` (the step
    captured once in a CUDA graph and replayed; CUDA only), else eager forward calls.

    ``policy_kwargs``: extra options of the policy (for ``"infllm"``: ``n_init``, ``topk``, ...,
    see :func:`kvcore.integrations.transformers_infllm.infllm_config`).

    Returns a dict: ``tokens`` (``[batch, new_tokens]`` list), ``cache_bytes`` (with the policy, measured),
    ``cache_bytes_full`` (no policy, same tokens), ``cached_tokens`` (per sequence; with ``pyramidkv``,
    whose layers keep different numbers, the largest), ``prefill_tok_s``, ``decode_tok_s``; for the
    paged GQA cache also ``cached_tokens_per_layer``; for the MLA archs (no policy, no CUDA graph)
    also ``latent_bytes`` (the latent rows without page rounding: transformers 5's own DynamicCache
    for DeepSeek) and ``per_head_kv_bytes`` (a cache of per-head K and V for the same model); with ``"infllm"`` also
    ``host_bytes`` (the CPU unit stores) and ``cached_tokens`` counts the tokens layer 0 holds on the
    device (sinks + window + resident units).

    Raises ValueError for ``context``, ``new_tokens`` or ``chunk`` below 1 (the prefill gives the
    first new token, so there is no run of 0 tokens).
    """
    for name, value in (("context", context), ("new_tokens", new_tokens), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    from .integrations import transformers as kvt

    mla = arch in MLA_ARCHS
    if mla and (policy is not None or cuda_graph):
        raise ValueError(f"arch {arch!r} (MLA) runs without a policy and without --cuda-graph")
    model = build_model(arch, layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab,
                        max_positions=context + new_tokens + 1, seed=seed)
    model = model.to(device=device, dtype=_DTYPES[dtype])
    kvt.enable(model)
    infllm = policy in kvt.RETRIEVAL_POLICIES
    if mla:
        from .integrations.transformers_mla import KVCoreMLACache

        cache = KVCoreMLACache(model.config, max_cache_len=context + new_tokens, page_size=page_size)
    elif infllm:
        from .integrations.transformers_infllm import InfLLMKVCache

        if cuda_graph:
            raise ValueError("cuda_graph is not available with policy 'infllm' (its step syncs to load units)")
        cache = InfLLMKVCache(model.config, max_cache_len=context + new_tokens, budget=budget,
                              **(policy_kwargs or {}))
    else:
        cache = kvt.KVCoreCache(model.config, max_cache_len=context + new_tokens, page_size=page_size, policy=policy,
                                budget=budget, policy_kwargs=policy_kwargs)
    kwargs = cache.forward_kwargs(model)
    gen = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, vocab, (batch, context), generator=gen).to(device)

    start = time.perf_counter()
    with torch.no_grad():
        for begin in range(0, context, chunk):
            end = min(begin + chunk, context)
            cache.hold_eviction = end < context  # evict once, after the last chunk
            logits = model(prompt[:, begin:end], use_cache=True, **kwargs).logits[:, -1]
            if progress:
                _progress(end, context, start)
        prefill_s = time.perf_counter() - start

        tokens = [logits.argmax(-1)]
        step = kvt.DecodeGraph(model, cache, headroom=max(new_tokens, 1)) if cuda_graph else None
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            if step is not None:
                logits = step(tokens[-1][:, None])[:, -1]
            else:
                logits = model(tokens[-1][:, None], use_cache=True, **kwargs).logits[:, -1]
            tokens.append(logits.argmax(-1))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        decode_s = time.perf_counter() - start

    held = cache.get_seq_length()  # every token fed so far, as a cache without eviction would hold
    full_pages = -(-held // page_size)
    if mla:
        memory = cache.memory_comparison()
        extra = {"cache_bytes_full": cache.cache_bytes(), "latent_bytes": memory["latent_bytes"],
                 "per_head_kv_bytes": memory["per_head_kv_bytes"]}
    elif infllm:
        bytes_per_token = cache.bytes_per_token(_DTYPES[dtype])
        extra = {"cache_bytes_full": batch * full_pages * page_size * bytes_per_token, "host_bytes": cache.host_bytes()}
    else:
        bytes_per_token = cache.paged.memory_report()["bytes_per_token"]
        extra = {"cache_bytes_full": batch * full_pages * page_size * bytes_per_token,
                 "cached_tokens_per_layer": cache.cached_tokens_per_layer()}
    return {
        **extra,
        "tokens": torch.stack(tokens, dim=1).tolist(),
        "cache_bytes": cache.cache_bytes(),
        "cached_tokens": cache.cached_tokens(),
        "seen_tokens": held,
        "prefill_tok_s": batch * context / prefill_s,
        "decode_tok_s": batch * (new_tokens - 1) / decode_s if new_tokens > 1 else float("nan"),
    }


def main(argv: Optional[list[str]] = None) -> int:
    """Command line entry point (``python -m kvcore.generate --help``)."""
    from .integrations.transformers import POLICIES, RETRIEVAL_POLICIES

    parser = argparse.ArgumentParser(prog="python -m kvcore.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2", *MLA_ARCHS],
                        help="deepseek_v2 / deepseek_v3: MLA on kvcore's latent cache (no --policy, no --cuda-graph)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=512, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--policy", default=None, choices=list(POLICIES) + list(RETRIEVAL_POLICIES))
    parser.add_argument("--budget", type=int, default=None,
                        help="tokens kept per sequence and layer by the policy (pyramidkv: their mean over the "
                             "layers; infllm: attended per decode step)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (tokens per forward)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="decode with the step captured in a CUDA graph (kvcore's DecodeGraph; CUDA only)")
    args = parser.parse_args(argv)
    for flag in ("context", "new_tokens", "chunk"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.cuda_graph and not args.device.startswith("cuda"):
        parser.error("--cuda-graph needs a CUDA --device")
    if args.cuda_graph and args.policy in RETRIEVAL_POLICIES:
        parser.error(f"--cuda-graph is not available with --policy {args.policy}")
    if args.policy is not None and args.budget is None:
        parser.error("--policy needs --budget")
    if args.arch in MLA_ARCHS and (args.policy is not None or args.cuda_graph):
        parser.error(f"--arch {args.arch} (MLA) takes neither --policy nor --cuda-graph")
    result = run(args.arch, args.layers, args.context, args.new_tokens, args.policy, args.budget, args.batch,
                 args.hidden, args.heads, args.kv_heads, args.vocab, args.page_size, args.chunk, args.dtype,
                 args.device, args.seed, cuda_graph=args.cuda_graph)
    name = args.policy or "none"
    if args.arch in MLA_ARCHS:
        print(f"model: {args.arch}, {args.layers} layers, hidden {args.hidden}, {args.heads} heads, MLA latent "
              f"512 + 64 per token and layer, random weights, {args.dtype} on {args.device}")
        print(f"cache bytes, kvcore latent pages: {result['cache_bytes']:,} ({result['cached_tokens']} tokens per "
              "sequence)")
        print(f"cache bytes, transformers' default DynamicCache (5.x DeepSeek modules cache the latent too, "
              f"unpaged): {result['latent_bytes']:,}")
        ratio = result["per_head_kv_bytes"] / max(result["cache_bytes"], 1)
        print(f"cache bytes, per-head K and V (DeepSeek's remote modeling code; an MHA-style cache): "
              f"{result['per_head_kv_bytes']:,} ({ratio:.2f}x kvcore's)")
    else:
        print(f"model: {args.arch}, {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads} "
              f"(q/kv), random weights, {args.dtype} on {args.device}")
        print(f"cache bytes without policy: {result['cache_bytes_full']:,} ({result['seen_tokens']} tokens per "
              "sequence)")
        where = " on the device by layer 0" if "host_bytes" in result else ""
        per_layer = result.get("cached_tokens_per_layer") or [result["cached_tokens"]]
        held = (f"{result['cached_tokens']} tokens per sequence held{where}" if len(set(per_layer)) == 1
                else f"tokens per sequence held per layer: {per_layer}")
        print(f"cache bytes with policy {name} (budget {args.budget}): {result['cache_bytes']:,} ({held})")
        if "host_bytes" in result:
            print(f"CPU unit store of policy {name}: {result['host_bytes']:,} bytes")
    print(f"prefill: {result['prefill_tok_s']:,.1f} tokens/s; decode: {result['decode_tok_s']:,.1f} tokens/s")
    for row, toks in enumerate(result["tokens"]):
        print(f"tokens[{row}]: {toks}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
