"""What validation costs the transformers adapter's eager decode step (session 32).

Since session 32 the adapter's own append and decode calls run inside ``ops._trusted_indices()``
and skip the index-content checks (each a device->host sync on a GPU) of the slots and tables it
built; a caller's own calls keep them. This times one eager decode step of a random-weight Llama
on kvcore three ways, alternated: validation off; validation on (the default: the adapter's calls
trusted); and validation on with the trust turned off (what every step did before session 32).

    python bench/experiments/eager_validation.py [--batch 8] [--context 1024] [--layers 8] [--steps 32]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def main() -> None:
    import transformers

    import kvcore
    from kvcore import ops
    from kvcore.integrations import transformers as kvt

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048,
                                      num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                                      head_dim=64, max_position_embeddings=args.context + args.steps * 64)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    kvt.enable(model)
    prompt = torch.randint(0, 1024, (args.batch, args.context), device=device)
    trusted = ops._trusted_indices

    def untrusted():
        return contextlib.nullcontext()

    settings = {"validation off": (False, trusted), "validation on (adapter trusted)": (True, trusted),
                "validation on, nothing trusted (before session 32)": (True, untrusted)}
    times = {name: [] for name in settings}
    for _ in range(args.reps):
        for name, (validate, trust) in settings.items():
            cache = kvt.KVCoreCache(model.config, max_cache_len=args.context + args.steps + 1)
            with torch.no_grad():
                logits = model(prompt, **cache.forward_kwargs(model), use_cache=True).logits
                token = logits[:, -1:].argmax(-1)
                saved = kvcore.set_validation(validate)
                ops._trusted_indices = trust
                try:
                    token = model(token, **cache.forward_kwargs(model), use_cache=True).logits[:, -1:].argmax(-1)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        token = model(token, **cache.forward_kwargs(model), use_cache=True).logits[:, -1:].argmax(-1)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
                finally:
                    ops._trusted_indices = trusted
                    kvcore.set_validation(saved)
            del cache
    print(f"{device} ({torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}), Llama {args.layers} layers "
          f"hidden 1024, B{args.batch}, context {args.context}, {args.steps} steps x {args.reps} reps (ms/step):")
    for name, ts in times.items():
        print(f"  {name}: median {statistics.median(ts):.2f} (runs {', '.join(f'{t:.2f}' for t in ts)})")


if __name__ == "__main__":
    main()
