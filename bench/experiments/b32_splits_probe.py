"""gqa_decode at B32 Hq64 Hkv8 S8192 (issue 2's grid point furthest behind cuDNN at random page
order) at the given forced split counts, 0 = automatic; the kernel switches (KVCORE_DECODE_WARPS,
KVCORE_DECODE_KERNEL) are read once per process, so run one process per setting.

    python bench/experiments/b32_splits_probe.py 0 1 2 4
"""
import sys, torch, kvcore
from kvcore.bench import decode, harness
dev = torch.device("cuda"); timer = harness.Timer(dev); kvcore.set_validation(False)
case = decode.DecodeCase(32, 64, 8, 128, 8192); x = decode.make_inputs(case, dev)
out = torch.empty_like(x.q); ws = kvcore.decode_workspace(dev, 256 << 20)
for n in [int(a) for a in sys.argv[1:]]:
    f = lambda: kvcore.gqa_decode(x.q, x.k_cache, x.v_cache, x.block_table, x.seq_lens, scale=x.scale, out=out, workspace=ws, num_splits=n)
    print(case.name, "splits", n, "%.1f us" % (timer(f) * 1e3), flush=True)
