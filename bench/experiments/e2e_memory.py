"""Where the e2e group's memory goes at B8 S32768 (the case that ran out of memory on an 80 GB H100
in session 37, after transformers' sdpa row and before kvcore's).

Runs the group's own steps for one case (kvcore.bench.e2e: the model, the DynamicCache filled
and timed as the sdpa row does, then freed as run() frees it; then the KVCoreCache built and
filled) and prints torch's allocated / reserved bytes and the device's free bytes after each,
and, if the freed DynamicCache is still alive, what refers to it.

    python bench/experiments/e2e_memory.py [B] [S]
"""
from __future__ import annotations

import gc
import sys
import weakref

import torch
import transformers

from kvcore.bench import e2e
from kvcore.bench.harness import Timer
from kvcore.integrations import transformers as kvt


def report(label: str) -> None:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    print(f"{label:<44} allocated {torch.cuda.memory_allocated() / 2**30:6.2f} GiB, reserved "
          f"{torch.cuda.memory_reserved() / 2**30:6.2f} GiB, device free {free / 2**30:6.2f} of {total / 2**30:.2f}",
          flush=True)


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    seq = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
    print("transformers", transformers.__version__, "torch", torch.__version__, flush=True)
    case = e2e.E2ECase(batch, seq)
    dev = torch.device("cuda")
    with torch.no_grad():
        model = e2e.build_model(case, dev, 0)
        report("model")
        tokens = torch.randint(0, case.vocab, (case.batch, 1)).to(dev)
        cache = transformers.DynamicCache(config=model.config)
        e2e.fill_cache(cache, case, case.seq_len, dev, 0)
        report("DynamicCache filled")
        step = e2e._Step(model, cache, tokens)
        reference = step.traced()
        report("sdpa traced step")
        Timer(dev, warmup_ms=0.0, rep_ms=0.0, min_reps=e2e.STEPS, max_reps=e2e.STEPS)(step)
        report("sdpa timed")
        alive = weakref.ref(cache)
        keys = weakref.ref(cache.layers[0].keys)
        del step, cache
        gc.collect()
        torch.cuda.empty_cache()
        report("sdpa freed")
        print("DynamicCache alive:", alive() is not None, "layer 0 keys alive:", keys() is not None, flush=True)
        if keys() is not None:
            for r in gc.get_referrers(keys()):
                print("  keys referrer:", type(r).__name__, repr(r)[:160], flush=True)
        if alive() is not None:
            for r in gc.get_referrers(alive()):
                print("  cache referrer:", type(r).__name__, repr(r)[:160], flush=True)
        kvt.enable(model)
        room = case.seq_len + e2e.STEPS + 16
        cache = kvt.KVCoreCache(model.config, max_cache_len=room, page_size=case.page_size)
        report("KVCoreCache built")
        e2e.fill_cache(cache, case, case.seq_len, dev, 0)
        report("KVCoreCache filled")
        step = e2e._Step(model, cache, tokens)
        step.traced()
        report("kvcore traced step")
        del reference


if __name__ == "__main__":
    main()
