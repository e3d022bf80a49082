"""Where does the page-major kernel (8 or 4 KV heads a CTA) beat gqa_decode_kernel on equal lengths?

gqa_decode's `auto` kernel choice (KVCORE_DECODE_KERNEL unset) runs the page-major kernel when a
host copy of the lengths (plan_seq_lens) says they are equal and its unsplit CTAs, 8 KV heads
each or else 4, fill the SMs once nearly whole (split_plan.h's page_major_fills_one_wave: B128
Hkv8 at 8 heads, measured since session 26, and B64 Hkv8 at 4, since session 36). This times
equal-length shapes around those, each without the hint (the head kernel under `auto`) and with
it (the rule's pick), so one process shows what the rule does; under KVCORE_DECODE_KERNEL=page8
(or page4) both columns are the page-major kernel at its own split count, which shows what the
rule leaves out:

    python bench/experiments/page_major_rule.py [OUT.json]
    KVCORE_DECODE_KERNEL=page8 python bench/experiments/page_major_rule.py [OUT.json]

Each output is checked against kvcore.reference before it is timed (harness Timer: CUDA events,
median, L2 flushed).
"""
from __future__ import annotations

import json
import os
import sys

import torch

import kvcore
from kvcore import reference
from kvcore.bench import decode, harness
from ragged_decode import checked_time  # (this folder: the script's own directory is on sys.path)

# (batch, Hq, Hkv, tokens a sequence), D 128, page 16: B128 S2048 and B64 S4096 are the decode
# table's rows the rule takes (8 and 4 heads a CTA); the rest probe its edges (length, fill of the
# SMs, 2 waves, 16 and 4 KV heads, group 8, and rows the rule leaves to the head kernel).
SHAPES = [(128, 32, 8, 2048), (128, 32, 8, 256), (128, 32, 8, 512), (128, 32, 8, 8192), (132, 32, 8, 2048),
          (120, 32, 8, 2048), (112, 32, 8, 2048), (100, 32, 8, 2048), (256, 32, 8, 1024), (64, 64, 16, 2048),
          (64, 32, 8, 4096), (64, 32, 8, 1024), (64, 32, 8, 16384), (66, 32, 8, 4096), (60, 32, 8, 4096),
          (56, 32, 8, 4096), (64, 64, 8, 4096), (128, 32, 4, 2048), (128, 16, 4, 2048), (16, 32, 8, 8192),
          (32, 64, 8, 8192)]


def main(argv: list) -> int:
    if len(argv) > 1:
        raise SystemExit(f"usage: page_major_rule.py [OUT.json]; got {argv}")
    dev = torch.device("cuda")
    timer = harness.Timer(dev)
    kvcore.set_validation(False)
    ws = kvcore.decode_workspace(dev)
    rows = []
    failed = False
    for b, hq, hkv, s in SHAPES:
        case = decode.DecodeCase(b, hq, hkv, 128, s)
        x = decode.make_inputs(case, dev)
        out = torch.empty_like(x.q)
        ref, _ = reference.gqa_decode(x.q.float(), x.k_cache.float(), x.v_cache.float(), x.block_table, x.seq_lens,
                                      scale=x.scale)
        host_lens = x.seq_lens.tolist()
        times = {}
        for label, kw in (("no hint", {}), ("hint", {"plan_seq_lens": host_lens})):

            def call() -> None:
                kvcore.gqa_decode(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens, scale=x.scale, out=out,
                                  workspace=ws, **kw)

            err, ok, ms = checked_time(call, out, ref, timer, 2e-2)
            failed |= not ok
            times[label] = ms * 1e3
            rows.append({"case": case.name, "hint": label == "hint", "us": times[label],
                         "max_err": err if ok else str(err), "ok": ok})
            if not ok:
                print(f"{case.name} {label}: MISMATCH, max err {err:.1e}", flush=True)
        print(f"{case.name:36s} no hint {times['no hint']:8.1f} us   hint {times['hint']:8.1f} us   "
              f"hint / no hint {times['hint'] / times['no hint']:.3f}", flush=True)
        del x, out, ref
        torch.cuda.empty_cache()
    if argv:
        with open(argv[0], "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(dev), "switch": os.environ.get("KVCORE_DECODE_KERNEL", ""),
                       "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
