"""Time block_sparse_decode and gqa_decode at B1 over forced split counts (0: the automatic choice,
which keeps splits >= 256 tokens, kMinSplitTokens), to see where the small-batch cases' time goes.
Session 13 (H200, after page groups): block-sparse B1 within 17.2-18.1 us from 15 to 33 splits
(25 = 3 tiles per split, the most CTAs of one wave: 18.0), 21-22 us at two waves; a 128-token
floor for the automatic count was tried and dropped (no gain).

    python bench/experiments/splits_probe.py [OUT.json]

Prints one line per (case, num_splits): median ms (harness Timer: CUDA events, L2 flushed) and %
of the copy bandwidth measured in the same run over the bytes the case must read.
"""
from __future__ import annotations

import json
import sys

import torch

import kvcore
from kvcore.bench import block_sparse, harness


def main() -> None:
    dev = torch.device("cuda")
    timer = harness.Timer(dev)
    copy = harness.copy_bandwidth_gbps(dev, timer)
    kvcore.set_validation(False)  # time the kernels, not the wrapper's index checks
    rows = []
    ws = kvcore.decode_workspace(dev)
    for page in (128, 16):
        case = block_sparse.BlockSparseCase(1, 32, 8, 128, 131072, page_size=page)
        x = block_sparse.make_inputs(case, dev)
        out = torch.empty_like(x.q)
        for ns in (0, 15, 19, 25, 33, 37, 48):
            fn = lambda: kvcore.block_sparse_decode(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens, x.sel_pages,
                                                    x.sel_counts, scale=x.scale, out=out, workspace=ws, num_splits=ns)
            ms = timer(fn)
            rows.append({"case": case.name, "num_splits": ns, "ms": ms, "pct_copy": case.nbytes / ms / 1e6 / copy * 100})
            print(f"{case.name:55s} splits {ns:3d}: {ms * 1e3:7.1f} us  {rows[-1]['pct_copy']:5.1f}% of copy", flush=True)
    # gqa_decode B1 S32768 page 16 (the decode table's B1 case)
    b, hq, hkv, d, s, ps = 1, 32, 8, 128, 32768, 16
    g = torch.Generator(device=dev).manual_seed(0)
    kc = torch.randn(s // ps, ps, hkv, d, dtype=torch.bfloat16, device=dev, generator=g)
    vc = torch.randn_like(kc)
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=dev, generator=g)
    bt = torch.randperm(s // ps, device=dev).view(1, -1).int()
    sl = torch.tensor([s], dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    nbytes = 2 * s * hkv * d * 2
    for ns in (0, 16, 24, 32, 48, 64, 96, 128):
        fn = lambda: kvcore.gqa_decode(q, kc, vc, bt, sl, out=out, workspace=ws, num_splits=ns)
        ms = timer(fn)
        rows.append({"case": "gqa_decode B1 S32768 page16", "num_splits": ns, "ms": ms, "pct_copy": nbytes / ms / 1e6 / copy * 100})
        print(f"{'gqa_decode B1 S32768 page16':55s} splits {ns:3d}: {ms * 1e3:7.1f} us  {rows[-1]['pct_copy']:5.1f}% of copy", flush=True)
    if len(sys.argv) > 1:
        json.dump({"copy_gbps": copy, "rows": rows}, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
