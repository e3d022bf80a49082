"""Generate with a small random-weight transformers model on kvcore's cache and kernels (no downloads).

    python -m kvcore.generate --arch llama --layers 4 --context 8192 --policy snapkv --budget 1024

Builds the model from a config (random weights, seeded), feeds a random prompt of ``--context``
tokens in chunks (progress bar on stderr; kvcore's SDPA-over-cached-tokens path), applies the
policy at the end of the prefill, decodes ``--new-tokens`` greedily with ``kvcore.gqa_decode``,
and prints: cache bytes with the policy (measured: pages held) and without it (the same tokens in a
full paged cache), prefill and decode tokens per second, and the generated tokens.
Needs the ``transformers`` extra. Defaults are small so it runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Optional

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(arch: str, layers: int, *, hidden: int, heads: int, kv_heads: int, vocab: int, max_positions: int,
                seed: int = 0) -> Any:
    """A random-weight ``{Llama,Mistral,Qwen2}ForCausalLM`` from a config (eval mode, float32, CPU)."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    config_cls, model_cls = classes[arch]
    extra = {"sliding_window": None} if arch == "mistral" else {}
    config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads,
                        max_position_embeddings=max_positions, **extra)
    torch.manual_seed(seed)
    return model_cls(config).eval()


def _progress(done: int, total: int, start: float, out=None) -> None:
    out = sys.stderr if out is None else out  # looked up per call: a default bound at import outlives a swapped stderr
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
        seed: int = 0, progress: bool = True, cuda_graph: bool = False) -> dict[str, Any]:
    """Prefill ``context`` random tokens and decode ``new_tokens`` greedily; returns the numbers printed.

    ``cuda_graph``: decode through :class:`kvcore.integrations.transformers.DecodeGraph` (the step
    captured once in a CUDA graph and replayed; CUDA only), else eager forward calls.

    Returns a dict: ``tokens`` (``[batch, new_tokens]`` list), ``cache_bytes`` (with the policy, measured),
    ``cache_bytes_full`` (no policy, same tokens), ``cached_tokens`` (per sequence; with ``pyramidkv``,
    whose layers keep different numbers, the largest), ``cached_tokens_per_layer``, ``prefill_tok_s``,
    ``decode_tok_s``.
    """
    from .integrations import transformers as kvt

    model = build_model(arch, layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab,
                        max_positions=context + new_tokens + 1, seed=seed)
    model = model.to(device=device, dtype=_DTYPES[dtype])
    kvt.enable(model)
    cache = kvt.KVCoreCache(model.config, max_cache_len=context + new_tokens, page_size=page_size, policy=policy,
                            budget=budget)
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

    report = cache.paged.memory_report()
    held = cache.get_seq_length()  # every token fed so far, as a cache without eviction would hold
    full_pages = -(-held // page_size)
    return {
        "tokens": torch.stack(tokens, dim=1).tolist(),
        "cache_bytes": cache.cache_bytes(),
        "cache_bytes_full": batch * full_pages * page_size * report["bytes_per_token"],
        "cached_tokens": cache.cached_tokens(),
        "cached_tokens_per_layer": cache.cached_tokens_per_layer(),
        "seen_tokens": held,
        "prefill_tok_s": batch * context / prefill_s,
        "decode_tok_s": batch * (new_tokens - 1) / decode_s if new_tokens > 1 else float("nan"),
    }


def main(argv: Optional[list[str]] = None) -> int:
    """Command line entry point (``python -m kvcore.generate --help``)."""
    from .integrations.transformers import POLICIES

    parser = argparse.ArgumentParser(prog="python -m kvcore.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=512, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--policy", default=None, choices=list(POLICIES))
    parser.add_argument("--budget", type=int, default=None, help="tokens kept per sequence and layer by the policy (pyramidkv: their mean over the layers)")
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
    if args.cuda_graph and not args.device.startswith("cuda"):
        parser.error("--cuda-graph needs a CUDA --device")
    if args.policy is not None and args.budget is None:
        parser.error("--policy needs --budget")
    result = run(args.arch, args.layers, args.context, args.new_tokens, args.policy, args.budget, args.batch,
                 args.hidden, args.heads, args.kv_heads, args.vocab, args.page_size, args.chunk, args.dtype,
                 args.device, args.seed, cuda_graph=args.cuda_graph)
    name = args.policy or "none"
    print(f"model: {args.arch}, {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads} "
          f"(q/kv), random weights, {args.dtype} on {args.device}")
    print(f"cache bytes without policy: {result['cache_bytes_full']:,} ({result['seen_tokens']} tokens per sequence)")
    per_layer = result["cached_tokens_per_layer"]
    held = (f"{result['cached_tokens']} tokens per sequence held" if len(set(per_layer)) == 1
            else f"tokens per sequence held per layer: {per_layer}")
    print(f"cache bytes with policy {name} (budget {args.budget}): {result['cache_bytes']:,} ({held})")
    print(f"prefill: {result['prefill_tok_s']:,.1f} tokens/s; decode: {result['decode_tok_s']:,.1f} tokens/s")
    for row, toks in enumerate(result["tokens"]):
        print(f"tokens[{row}]: {toks}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
