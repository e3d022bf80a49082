"""How fast does one cuDNN SDPA decode CTA read when fewer CTAs share the GPU?

Issue 2's last gap is B16 S8192 (Hq32 Hkv8 D128), where cuDNN's kernel runs one 4-warp CTA per
(sequence, KV head), 128 CTAs in one wave (session 29's profile), as kvcore's 8-warp kernel does,
and ends 1-2% sooner. decode_trace.cu times kvcore's kernel on a ladder of CTA counts (B1 Hkv1 up
to B16 Hkv8); this times cuDNN on the same ladder, contiguous K/V, with each call's kernels
(grid, block, registers, shared memory) from torch.profiler so the CTA count is known, not
assumed. The per-CTA rate as the grid shrinks says how much a CTA can speed up once its
neighbours have finished: the headroom that absorbs a one-wave grid's uneven end.

    python bench/experiments/cudnn_rates.py [OUT.json]

CUDNN_CASES (env) replaces the ladder with other shapes, "B,Hq,Hkv,S;B,Hq,Hkv,S;..." (session 35:
the decode table's multi-wave points, to see cuDNN's grid where kvcore's 4-warp kernel runs).
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
from profiler_kernels import kernels_of
from torch.nn.attention import SDPBackend, sdpa_kernel

# (B, Hq, Hkv, S): one (sequence, KV head) pair up to the B16 grid point's 128
LADDER = [(1, 4, 1, 8192), (4, 4, 1, 8192), (2, 32, 8, 8192), (4, 32, 8, 8192), (8, 32, 8, 8192),
          (12, 32, 8, 8192), (16, 32, 8, 8192)]


def median_us(fn, flush: torch.Tensor, reps: int = 30) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(reps + 3):
        flush.add_(1)  # evicts K/V from the 50 MB L2
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    torch.manual_seed(0)
    flush = torch.empty(64 << 20, dtype=torch.float32, device="cuda")  # 256 MB
    rows = []
    cases = LADDER
    if os.environ.get("CUDNN_CASES"):
        cases = [tuple(int(x) for x in case.split(",")) for case in os.environ["CUDNN_CASES"].split(";")]
    for b, hq, hkv, s in cases:
        q = torch.randn(b, hq, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, hkv, s, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        kv_bytes = 2 * k.numel() * k.element_size()

        def fn():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv, scale=128 ** -0.5)

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            kernels = kernels_of(fn, reps=1)  # (after a first call outside the profile)
            us = median_us(fn, flush)
        ctas = 1
        main_kernel = max(kernels, key=lambda r: r["us"] or 0) if kernels else None
        if main_kernel and main_kernel["grid"]:
            for g in main_kernel["grid"]:
                ctas *= g
        per_cta = kv_bytes / ctas / us * 1e-3 if main_kernel else float("nan")
        print(f"cuDNN B{b} Hq{hq} Hkv{hkv} S{s}: {us:.1f} us, {kv_bytes / us * 1e-3:.0f} GB/s, {ctas} CTAs "
              f"({per_cta:.1f} GB/s a CTA); kernels: "
              + "; ".join(f"{r['name'][:60]} grid {r['grid']} block {r['block']} regs {r['registers']} smem {r['smem']} "
                          f"{r['us']} us" for r in kernels))
        rows.append({"batch": b, "hq": hq, "hkv": hkv, "seq_len": s, "us": us, "kv_bytes": kv_bytes,
                     "ctas": ctas, "kernels": kernels})
        del q, k, v
        torch.cuda.empty_cache()
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
