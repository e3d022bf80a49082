"""Where gqa_decode's random-page cost comes from: the same keys through five block tables.

Issue 2's table gives every sequence a random permutation of the cache's pages; kvcore then
reads B16 S8192 ~0.6% slower than through an in-order table, and cuDNN SDPA (contiguous K/V) is
level with the in-order time. The ORDER kernels sort each CTA's pages into cache order, so that
all CTAs sweep the cache together in one band. This separates the pieces of the cost:

    random      the bench's table (the kernel sorts it with KVCORE_DECODE_PAGE_ORDER=auto)
    sorted      each row sorted by cache page: one band swept by every CTA, no sort needed
    rotated     each row sorted, sequence b's starting at page b * N / B (mod N): B bands spread
                over the cache as an in-order table's are, each CTA's pages still scattered
    in_order    sequence b's pages b * P .. b * P + P - 1 (the cache renumbered to match)
    strided     sequence b's i-th page is i * B + b (renumbered): one band, every gap B pages

Run once with KVCORE_DECODE_PAGE_ORDER=table (every CTA visits its row in the table's order,
no sort) and once with auto (the default: the kernel sorts every row it can, so sorted and
rotated then differ from random only in the first tile). Every variant reads the same keys and
values for each sequence, so one reference checks all of them. The rounds alternate the
variants and cuDNN SDPA, and the medians over rounds are printed.

    KVCORE_DECODE_PAGE_ORDER=table python bench/experiments/page_bands.py [OUT.json]
"""
from __future__ import annotations

import json
import os
import statistics
import sys

import torch

from kvcore import reference
from kvcore.bench import decode, harness, peers

ROUNDS = 3
POINTS = [(16, 32, 8192), (32, 64, 8192), (64, 32, 4096)]  # (B, Hq, S): Hkv 8, D 128, page 16


def renumbered(x: peers.DecodeInputs, table: torch.Tensor) -> tuple:
    """Caches in which `table` reaches, for each sequence and position, the K/V rows that the
    bench's table reaches in x's caches."""
    old, new = x.block_table.flatten().long(), table.flatten().long()
    k, v = torch.empty_like(x.k_cache), torch.empty_like(x.v_cache)
    k[new], v[new] = x.k_cache[old], x.v_cache[old]
    return k, v


def tables(x: peers.DecodeInputs) -> dict:
    """name -> (block_table, k_cache, v_cache) for every variant."""
    bt = x.block_table
    b, p = bt.shape
    n = b * p
    rows = torch.sort(bt, dim=1).values
    shift = (torch.arange(b, device=bt.device, dtype=torch.int64) * n // b).view(b, 1)
    rot_key = (rows.long() - shift) % n
    rotated = torch.gather(rows, 1, torch.argsort(rot_key, dim=1))
    in_order = torch.arange(n, device=bt.device, dtype=torch.int32).view(b, p)
    strided = (torch.arange(p, device=bt.device, dtype=torch.int32).view(1, p) * b
               + torch.arange(b, device=bt.device, dtype=torch.int32).view(b, 1))
    out = {"random": (bt, x.k_cache, x.v_cache), "sorted": (rows, x.k_cache, x.v_cache),
           "rotated": (rotated, x.k_cache, x.v_cache)}
    for name, t in (("in_order", in_order), ("strided", strided)):
        out[name] = (t, *renumbered(x, t))
    return out


def main(argv: list) -> int:
    dev = torch.device("cuda")
    timer = harness.Timer(dev)
    mode = os.environ.get("KVCORE_DECODE_PAGE_ORDER", "auto")
    rows, failed = [], False
    for bsz, hq, s in POINTS:
        case = decode.DecodeCase(bsz, hq, 8, 128, s)
        x = decode.make_inputs(case, dev)
        ref, _ = reference.gqa_decode(x.q.float(), x.k_cache.float(), x.v_cache.float(), x.block_table,
                                      x.seq_lens, scale=x.scale)
        fns = {}
        for name, (t, kc, vc) in tables(x).items():
            x.block_table, x.k_cache, x.v_cache = t, kc, vc
            (prepared,) = peers.build("kvcore", x)
            got = prepared.fn()
            err = (got.float() - ref).abs().max().item()
            failed |= err > 2e-2
            fns[name] = (prepared, err)
        (cudnn,) = peers.build("sdpa-cudnn", x)  # contiguous K/V: the same for every table
        got = cudnn.fn()
        fns["sdpa-cudnn"] = (cudnn, (got.float() - ref).abs().max().item())
        times = {name: [] for name in fns}
        for _ in range(ROUNDS):
            for name, (prepared, _) in fns.items():
                with prepared.context():
                    prepared.before_timing()
                    try:
                        times[name].append(timer(prepared.fn) * 1e3)
                    finally:
                        prepared.after_timing()
        for name, (_, err) in fns.items():
            med = statistics.median(times[name])
            row = {"case": case.name, "mode": mode, "variant": name, "us": med, "rounds_us": times[name],
                   "gbps": case.nbytes / (med * 1e-6) / 1e9, "max_err": err}
            rows.append(row)
            print(f"{case.name:36s} order={mode:5s} {name:10s} {med:7.1f} us  rounds "
                  f"{' '.join(f'{t:.1f}' for t in times[name])}  err {err:.1e}", flush=True)
        x.release()
        del x, fns, ref
        torch.cuda.empty_cache()
    if argv:
        with open(argv[0], "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(dev), "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
