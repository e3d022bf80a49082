"""Which kernels do the decode peers launch, with what grid, block, registers and shared memory?

Issue 2's last gap is to cuDNN SDPA at the one-wave grid points (B16, B64, B32 Hq64, B1 S131072):
kvcore's CTAs end apart by the SMs' rate spread (bench/NOTES.md, session 27). Whether cuDNN
splits the keys finer than one wave, keeps a persistent grid, or runs a second reduction kernel
says which schedule reaches its time. This runs each grid point's peers (and kvcore) under
torch.profiler and prints every kernel's name, launch shape and device time from the trace.

    python bench/experiments/peer_kernels.py [OUT.json]
"""
from __future__ import annotations

import json
import sys

import torch
from profiler_kernels import kernels_of

from kvcore.bench import decode, peers

# (B, Hq, Hkv, S): issue 2's grid points where cuDNN was ahead in session 28, and B128
POINTS = [(16, 32, 8, 8192), (64, 32, 8, 4096), (32, 64, 8, 8192), (1, 32, 8, 131072), (128, 32, 8, 2048)]
IMPLS = ["sdpa-cudnn", "flashinfer", "kvcore"]


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else None
    results = []
    for b, hq, hkv, s in POINTS:
        case = decode.DecodeCase(batch=b, num_q_heads=hq, num_kv_heads=hkv, head_dim=128, seq_len=s)
        inputs = decode.make_inputs(case, torch.device("cuda"))
        for impl in IMPLS:
            try:
                prepared = peers.BUILDERS[impl](inputs)[0]  # the first variant (FlashInfer: no tensor cores)
            except Exception as exc:  # noqa: BLE001 (a missing peer is a row, not a failure)
                print(f"B{b} Hq{hq} S{s} {impl}: unavailable ({str(exc).splitlines()[0][:120]})")
                continue
            with prepared.context():
                prepared.before_timing()
                try:
                    rows = kernels_of(prepared.fn)
                finally:
                    prepared.after_timing()
            print(f"== B{b} Hq{hq} Hkv{hkv} S{s} {impl}")
            for r in rows:
                print(f"  {r['us']:>8} us grid {r['grid']} block {r['block']} regs {r['registers']} "
                      f"smem {r['smem']} blocks/SM {r['blocks_per_sm']}  {r['name']}")
            results.append({"batch": b, "hq": hq, "hkv": hkv, "seq_len": s, "impl": impl, "kernels": rows})
        inputs.release()
        torch.cuda.empty_cache()
    if out_path:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
