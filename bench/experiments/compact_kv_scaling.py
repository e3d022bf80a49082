"""compact_kv: fixed cost vs steady-state rate. Fit time = fixed + bytes moved / rate.

B1 Hkv8 D128 bf16 page 16, S 131072, SnapKV-like scattered keeps from 2048 to 98304 tokens per
head (the bench's inputs: kvcore.bench.eviction_cache.make_compact_inputs), timed as the bench
times them (seq_lens restored before each call, inside the time), plus the restore alone, an
empty kernel and a device copy of 537 MB. The slope gives the steady-state rate to compare with
copy (the 80% target needs it near 85% once the fixed cost is paid); the intercept the fixed
cost (restore + scratch memset + launch + the last CTAs' tail). Run on the GPU host:
    python bench/experiments/compact_kv_scaling.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json

import torch

import kvcore
from kvcore.bench import harness
from kvcore.bench.eviction_cache import CompactCase, make_compact_inputs


fit = harness.linear_fit  # (intercept us, slope us per byte)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    timer = harness.Timer(dev)
    res = {"gpu": torch.cuda.get_device_name(), "rows": []}
    tiny = torch.zeros(1, device=dev)
    res["empty_kernel_us"] = timer(lambda: tiny.add_(1)) * 1e3
    res["copy_gbps"] = harness.copy_bandwidth_gbps(dev, timer, 512 << 20)
    kvcore.set_validation(False)
    try:
        xs, ys = [], []
        cases = [CompactCase(1, 131072, keep, str(keep)) for keep in (2048, 4096, 16384, 32768, 65536, 98304)]
        cases.append(CompactCase(8, 32768, 8192, "25%"))
        for case in cases:
            inp = make_compact_inputs(case, dev)
            lens = inp.seq_lens0.clone()

            def call():
                lens.copy_(inp.seq_lens0)
                kvcore.compact_kv(inp.k_cache, inp.v_cache, inp.block_table, lens, inp.kept, inp.kept_lens)

            us = timer(call) * 1e3
            restore_us = timer(lambda: lens.copy_(inp.seq_lens0)) * 1e3
            gbps = case.nbytes / (us * 1e-6) / 1e9
            row = {"case": case.name, "bytes": case.nbytes, "us": round(us, 2), "restore_us": round(restore_us, 2),
                   "gbps": round(gbps, 1), "pct_copy": round(100 * gbps / res["copy_gbps"], 1)}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            if case.batch == 1:
                xs.append(case.nbytes)
                ys.append(us)
            del inp
            torch.cuda.empty_cache()
        a, b = fit(xs, ys)
        res["fit_fixed_us"] = round(a, 2)
        res["fit_rate_gbps"] = round(1e-3 / b, 1)  # bytes per us -> GB/s
        res["fit_rate_pct_copy"] = round(100 * (1e-3 / b) / res["copy_gbps"], 1)
    finally:
        kvcore.set_validation(True)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
