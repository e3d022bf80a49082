"""What the block table's page order costs the paged decoders at issue 2's grid points.

The decode table (python -m kvcore.bench --group decode) gives every sequence a random
permutation of the cache's pages; FlashInfer's own decode benchmark (benchmarks/bench_batch_decode.py
there) gives them in order (torch.arange), and cuDNN SDPA reads contiguous K/V. decode_trace
measured the library kernel ~1.4% faster with a sequential table (sessions 17 and 27). This times,
in one process and one run, kvcore and FlashInfer on the same caches through a random and a
sequential block table, and cuDNN SDPA on the contiguous copy (the same for both), each output
checked against kvcore.reference first.

    python bench/experiments/page_order.py [OUT.json]
"""
from __future__ import annotations

import json
import sys

import torch

from kvcore import reference
from kvcore.bench import decode, harness, peers

IMPLS = ["kvcore", "flashinfer", "sdpa-cudnn"]


def main(argv: list) -> int:
    dev = torch.device("cuda")
    timer = harness.Timer(dev)
    rows, failed = [], False
    for case in decode.cases(dev, quick=False)[:6]:  # the six grid points (equal lengths)
        x = decode.make_inputs(case, dev)
        ref, _ = reference.gqa_decode(x.q.float(), x.k_cache.float(), x.v_cache.float(), x.block_table,
                                      x.seq_lens, scale=x.scale)
        random_table = x.block_table
        # The same pages in order: sequence b's i-th page is its i-th in the cache. The caches are
        # renumbered to match, so every order reads the same values.
        order = random_table.flatten().long()
        seq_table = torch.arange(order.numel(), device=dev, dtype=torch.int32).view_as(random_table)
        k_seq, v_seq = x.k_cache[order].contiguous(), x.v_cache[order].contiguous()
        for order_name in ("random", "sequential"):
            if order_name == "sequential":
                x.k_cache, x.v_cache, x.block_table = k_seq, v_seq, seq_table
            for impl in IMPLS:
                if impl == "sdpa-cudnn" and order_name == "sequential":
                    continue  # contiguous K/V: no page order
                try:
                    variants = peers.build(impl, x)
                except peers.Skip as why:
                    print(f"{case.name} {impl}: skipped ({why})")
                    continue
                # Every variant a builder offers (FlashInfer: with and without tensor cores), the
                # fastest kept, as the bench's runner does. (Session 29's run took the first only:
                # FlashInfer without tensor cores.)
                best = None
                for prepared in variants:
                    with prepared.context():
                        prepared.before_timing()
                        try:
                            got = prepared.fn()
                            err = (got.float() - ref).abs().max().item()
                            ok = err <= 2e-2
                            failed |= not ok
                            ms = timer(prepared.fn)
                        finally:
                            prepared.after_timing()
                    if best is None or ms < best[0]:
                        best = (ms, err, ok, prepared.notes)
                ms, err, ok, notes = best
                row = {"case": case.name, "order": order_name, "impl": impl, "us": ms * 1e3,
                       "gbps": case.nbytes / (ms * 1e-3) / 1e9, "max_err": err, "ok": ok, "notes": notes}
                rows.append(row)
                print(f"{case.name:44s} {order_name:10s} {impl:11s} {ms * 1e3:8.1f} us {row['gbps']:6.0f} GB/s"
                      f"  max err {err:.1e}{'' if ok else '  MISMATCH'}", flush=True)
        x.release()
        del x, k_seq, v_seq, ref
        torch.cuda.empty_cache()
    if argv:
        with open(argv[0], "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(dev), "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
