"""Which split count gqa_decode's automatic choice (num_splits=0) runs, found by matching its
output bit for bit against forced counts, and its time next to its neighbours'.

Session 19: the automatic count now avoids a count just past a multiple of the split merge's
batch (kMergeBatch, 32 at head_dim 128) unless that gains >= 5% of SM fill
(paged_decode::choose_splits). B1 Hq32 Hkv8 S131072 on 132 SMs went from 33 splits (two merge
batches) to 32.

    python bench/experiments/auto_splits_check.py [OUT.json]

Prints one line per case: the forced count(s) whose output equals the automatic one's bit for bit,
then median us (harness Timer: CUDA events, L2 flushed) at the automatic count and at forced
counts around it. Inputs are the decode benchmark's (kvcore.bench.decode.make_inputs), so the
times compare with its table; session 19's call 2 ran an earlier version that built its own
(seeded device randperm block tables; bench/results/h200-2026-12-04-s19/call2/splits.log).
"""
from __future__ import annotations

import json
import sys

import torch

import kvcore
from kvcore.bench import decode, harness

# (batch, num_kv_heads, seq_len): the decode table's small-batch rows and a few more pair counts.
# Query heads per KV head 4 (the table's Hq32 Hkv8), D 128, page 16.
CASES = [(1, 8, 32768), (1, 8, 131072), (1, 4, 131072), (1, 2, 131072), (2, 8, 32768), (4, 8, 8192)]
GROUP = 4


def main() -> None:
    dev = torch.device("cuda")
    timer = harness.Timer(dev)
    kvcore.set_validation(False)
    ws = kvcore.decode_workspace(dev)
    rows = []
    for b, hkv, s in CASES:
        case = decode.DecodeCase(b, GROUP * hkv, hkv, 128, s)
        x = decode.make_inputs(case, dev)
        out = torch.empty_like(x.q)

        def call(ns: int) -> None:
            kvcore.gqa_decode(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens, scale=x.scale, out=out,
                              workspace=ws, num_splits=ns)

        def result(ns: int) -> torch.Tensor:  # into a poisoned out
            out.fill_(float("nan"))
            call(ns)
            return out.clone()

        auto = result(0)
        matches = [n for n in range(1, 161) if torch.equal(result(n), auto)]
        times = {}
        # its neighbours, and the counts either side of a merge batch (what the rule before
        # session 19 could pick: e.g. 33 at B1 Hkv8, 132 at B1 Hkv2 on 132 SMs)
        top = 2 * max(matches + [16])
        around = sorted({n for m in matches for n in (m - 1, m, m + 1) if n >= 1}
                        | {n for n in (16, 32, 33, 64, 66, 128, 132) if n <= top})
        for ns in [0] + around:
            times[ns] = timer(lambda: call(ns)) * 1e3
        rows.append({"case": case.name, "auto_equals_forced": matches, "us": times})
        print(f"{case.name:36s} automatic = forced {matches}; " + ", ".join(
            f"{'auto' if n == 0 else n}: {t:.1f} us" for n, t in times.items()), flush=True)
        del x, out
    if len(sys.argv) > 1:
        json.dump({"gpu": torch.cuda.get_device_name(dev), "rows": rows}, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
