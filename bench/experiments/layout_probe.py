"""Does the paged cache's token-major layout cost gqa_decode DRAM efficiency? (issue 2: kvcore
97.8% of copy at B16 S8192, cuDNN SDPA 102% on contiguous [B, H, S, D] K/V.)

kvcore's cache is [pages, page_size, Hkv, D]: one KV head's rows are 256 bytes (D128 bf16) at a
2 KB stride, and the 8 CTAs of a (sequence, split) read interleaved rows of the same pages. The
same bytes with one KV head per sequence (B x 8 sequences of Hkv 1, group 4: the same CTA count,
split count, tiles and arithmetic) are read as contiguous 4 KB pages instead. Both with the
bench's random page order and with sequential pages, at page 16 and 128, and cuDNN SDPA on the
contiguous K/V of the same shapes for scale.

    python bench/experiments/layout_probe.py [OUT.json]
"""
from __future__ import annotations

import json
import sys

import torch

import kvcore
from kvcore.bench import decode, harness, peers


def main() -> None:
    dev = torch.device("cuda")
    timer = harness.Timer(dev)
    copy = harness.copy_bandwidth_gbps(dev, timer)
    kvcore.set_validation(False)
    rows = []
    shapes = [  # (label, batch, Hq, Hkv, S, page)
        ("B16 Hkv8 S8192", 16, 32, 8, 8192, 16),
        ("B128 Hkv1 S8192 (head-major)", 128, 4, 1, 8192, 16),
        ("B16 Hkv8 S8192", 16, 32, 8, 8192, 128),
        ("B128 Hkv1 S8192 (head-major)", 128, 4, 1, 8192, 128),
        ("B1 Hkv8 S32768", 1, 32, 8, 32768, 16),
        ("B8 Hkv1 S32768 (head-major)", 8, 4, 1, 32768, 16),
    ]
    for label, b, hq, hkv, s, page in shapes:
        case = decode.DecodeCase(b, hq, hkv, 128, s, page_size=page)
        x = decode.make_inputs(case, dev)
        nbytes = 2 * b * s * hkv * 128 * 2
        for order in ("random", "sequential"):
            if order == "sequential":
                x.block_table.copy_(torch.arange(x.block_table.numel(), device=dev, dtype=torch.int32).view_as(x.block_table))
            impls = ["kvcore"] + (["sdpa-cudnn"] if order == "random" and page == 16 else [])
            for impl in impls:
                try:
                    fn = peers.build(impl, x)[0].fn
                except Exception as exc:  # a peer that cannot run here is reported, not fatal
                    print(f"{label} {impl}: {exc}", flush=True)
                    continue
                ms = timer(fn)
                row = {"case": f"{label} page{page} {order}", "impl": impl, "ms": ms,
                       "pct_copy": nbytes / ms / 1e6 / copy * 100}
                rows.append(row)
                print(f"{row['case']:50s} {impl:11s} {ms * 1e3:8.1f} us {row['pct_copy']:6.1f}% of copy", flush=True)
        del x
        torch.cuda.empty_cache()
    if len(sys.argv) > 1:
        json.dump({"copy_gbps": copy, "rows": rows}, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
