"""Where does a one-wave decode lose its time? Fit time = fixed + bytes / rate per implementation.

For a fixed grid shape (batch, heads) the sequence length is swept, so the CTA count stays the
same while the bytes per CTA grow; the intercept is the per-launch fixed cost (launch, ramp-up,
prologue/epilogue, merge) and the slope the steady-state read rate. Run on the GPU host:
    python bench/experiments/decode_scaling.py [--impls kvcore,sdpa-cudnn,flashinfer] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from kvcore.bench import decode, harness, peers


fit = harness.linear_fit  # (intercept us, slope us per byte)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impls", default="kvcore,sdpa-cudnn,flashinfer")
    ap.add_argument("--out", default=None)
    ap.add_argument("--splits", default="0", help="comma list of kvcore num_splits to try (0 = automatic)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    timer = harness.Timer(dev)
    res = {"gpu": torch.cuda.get_device_name(), "rows": []}
    tiny = torch.zeros(1, device=dev)
    res["empty_kernel_us"] = timer(lambda: tiny.add_(1)) * 1e3
    for nbytes in (64 << 20, 256 << 20, 1 << 30):
        res[f"copy_gbps_{nbytes >> 20}MiB"] = harness.copy_bandwidth_gbps(dev, timer, nbytes)
    print(json.dumps(res), flush=True)
    shapes = [(16, 32, [2048, 4096, 8192, 16384]), (1, 32, [16384, 32768, 65536, 131072]), (64, 32, [1024, 2048, 4096, 8192])]
    import kvcore

    for batch, hq, lens in shapes:
        for impl in args.impls.split(","):
            variants = [int(s) for s in args.splits.split(",")] if impl == "kvcore" else [None]
            for ns in variants:
                xs, ys = [], []
                for s in lens:
                    case = decode.DecodeCase(batch, hq, 8, 128, s)
                    inputs = decode.make_inputs(case, dev)
                    try:
                        if impl == "kvcore" and ns:
                            out = torch.empty_like(inputs.q)
                            ws = kvcore.decode_workspace(dev)
                            kvcore.set_validation(False)
                            fn = lambda: kvcore.gqa_decode(inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table,
                                                           inputs.seq_lens, scale=inputs.scale, out=out, workspace=ws,
                                                           num_splits=ns)
                            ctx = None
                        else:
                            prep = peers.build(impl, inputs)[0]
                            fn, ctx = prep.fn, prep.context
                            prep.before_timing()
                        if ctx is None:
                            us = timer(fn) * 1e3
                        else:
                            with ctx():
                                us = timer(fn) * 1e3
                    except peers.Skip as e:
                        print(f"{impl}: skip ({e})", flush=True)
                        break
                    xs.append(case.nbytes)
                    ys.append(us)
                    row = {"impl": impl, "splits": ns, "case": case.name, "us": us, "gbps": case.nbytes / us / 1e3}
                    res["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    inputs.release()
                    del inputs
                    torch.cuda.empty_cache()
                if len(xs) >= 2:
                    a, b = fit(xs, ys)
                    row = {"impl": impl, "splits": ns, "fit": f"B{batch} Hq{hq}", "fixed_us": a, "rate_gbps": 1e-3 / b}
                    res["rows"].append(row)
                    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
