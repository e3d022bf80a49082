"""Where the GPU-resident InfLLM step's time goes (issue 5; bench case B1 Hq32 Hkv8 D128, 8192
units of 128, topk 16, n_local 4096): every kernel of one ``InfLLMCache.attend`` with its mean
device time (torch.profiler, CUPTI), then CUDA-event medians of the step and of its pieces with
L2 flushed before each call (the bench harness's Timer).

    python bench/experiments/retrieval_step_profile.py [--units 8192] [--steps 50]
"""

from __future__ import annotations

import argparse

import torch

import kvcore
from kvcore.bench import retrieval as R
from kvcore.bench.harness import Timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    dev = torch.device("cuda")
    case = R.RetrievalCase(1, 32, 8, 128, args.units)
    inputs = R.make_inputs(case, dev)
    cache = R._resident_cache(kvcore, inputs)
    q = inputs.q
    kvcore.set_validation(False)  # as the bench times it: no host-syncing index checks
    cache.attend(q)
    torch.cuda.synchronize()

    timer = Timer(dev)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            timer._flush_l2()  # the bench Timer's flush
            cache.attend(q)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        # The flush's own kernels (its sum and the sum's output memset).
        if t and not any(f in e.key for f in ("reduce_kernel", "Memset")):
            rows.append((t / args.steps, e.count / args.steps, e.key))
    rows.sort(reverse=True)
    print(f"kernels of one attend() (mean over {args.steps} steps, us of device time per step):")
    total = 0.0
    for t, n, name in rows:
        total += t
        print(f"  {t:8.2f} us  x{n:4.1f}  {name[:110]}")
    print(f"  {total:8.2f} us  sum of kernel times")

    keys, scores, values, idx = cache._score_buffers(q)
    ops = torch.ops.kvcore
    pieces = {
        "attend (whole step)": lambda: cache.attend(q),
        "infllm_unit_scores": lambda: ops.infllm_unit_scores(q, keys, scores),
        "topk_rows": lambda: ops.topk_rows(scores.view(values.shape[0], -1), values, idx),
        "scores + topk": lambda: (ops.infllm_unit_scores(q, keys, scores),
                                  ops.topk_rows(scores.view(values.shape[0], -1), values, idx)),
    }
    # Yardstick: torch reading the same 16.8 MB of keys (a sum of their bits as int32 pairs).
    bits = keys.reshape(-1).view(torch.int32)
    acc = torch.empty((), dtype=torch.int32, device=dev)
    pieces[f"plain read of the keys ({keys.numel() * keys.element_size() / 1e6:.1f} MB, torch.sum)"] = (
        lambda: torch.sum(bits, 0, dtype=torch.int32, out=acc))
    print("CUDA-event medians, L2 flushed before each call (the bench Timer):")
    for name, fn in pieces.items():
        print(f"  {timer(fn) * 1e3:8.2f} us  {name}")


if __name__ == "__main__":
    main()
