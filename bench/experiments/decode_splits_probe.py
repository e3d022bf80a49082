"""gqa_decode's time at forced split counts (0 = automatic) for one equal-length shape of the
decode bench (default B32 Hq64 Hkv8 S8192, issue 2's grid point furthest behind cuDNN at random
page order in session 29). The kernel switches (KVCORE_DECODE_WARPS, KVCORE_DECODE_KERNEL) are
read once per process, so run one process per setting. (Session 29 ran it as
b32_splits_probe.py, without --shape.)

    python bench/experiments/decode_splits_probe.py [--shape B,Hq,Hkv,S] 0 1 2 4
    KVCORE_DECODE_WARPS=8 python bench/experiments/decode_splits_probe.py --shape 1,32,8,131072 0 16
"""
import sys

import torch

import kvcore
from kvcore.bench import decode, harness


def main(argv: list) -> None:
    shape = (32, 64, 8, 8192)
    if "--shape" in argv:
        at = argv.index("--shape")
        shape = tuple(int(x) for x in argv[at + 1].split(","))
        argv = argv[:at] + argv[at + 2:]
    b, hq, hkv, s = shape
    dev = torch.device("cuda")
    timer = harness.Timer(dev)
    kvcore.set_validation(False)
    case = decode.DecodeCase(b, hq, hkv, 128, s)
    x = decode.make_inputs(case, dev)
    out = torch.empty_like(x.q)
    ws = kvcore.decode_workspace(dev, 256 << 20)
    for n in [int(a) for a in argv]:
        def call() -> None:
            kvcore.gqa_decode(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens, scale=x.scale, out=out,
                              workspace=ws, num_splits=n)
        print(case.name, "splits", n, "%.1f us" % (timer(call) * 1e3), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
