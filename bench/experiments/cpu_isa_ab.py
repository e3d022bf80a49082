"""CPU kernels under KVCORE_CPU_ISA=baseline, =avx2 and =avx512: median times of a few ops, one
process each (an ISA this CPU lacks is left out).

The variable is read once per process, so the script runs itself once per setting (``--isa``)
and prints one table. Index validation is off (host-side checks are not the kernels' time); the
inputs are random and the same in both processes (fixed seed). Run from the repository root with
the in-place build on the path:
    PYTHONPATH=python python bench/experiments/cpu_isa_ab.py [--reps 30] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ISAS = ("baseline", "avx2", "avx512")


def _paged(gen, pages, page_size, heads, dim, dtype):
    k = torch.randn(pages, page_size, heads, dim, generator=gen).to(dtype)
    v = torch.randn(pages, page_size, heads, dim, generator=gen).to(dtype)
    table = torch.randperm(pages, generator=gen).to(torch.int32).view(1, pages)
    return k, v, table


def _cases(gen):
    """(name, zero-argument call) per timed op; B1 decode shapes with 2048 keys, page 16."""
    import kvcore

    S, ps = 2048, 16
    lens = torch.tensor([S], dtype=torch.int32)
    cases = []
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        q = torch.randn(1, 32, 128, generator=gen).to(dtype)
        k, v, table = _paged(gen, S // ps, ps, 8, 128, dtype)
        out = torch.empty_like(q)
        cases.append((f"gqa_decode B1 Hq32 Hkv8 D128 S2048 {tag}",
                      lambda q=q, k=k, v=v, t=table, o=out: kvcore.gqa_decode(q, k, v, t, lens, out=o)))

    # block_sparse_decode: every KV head picks 32 of the 128 pages (512 keys each).
    q = torch.randn(1, 32, 128, generator=gen)
    k, v, table = _paged(gen, S // ps, ps, 8, 128, torch.float32)
    sel = torch.stack([torch.randperm(S // ps, generator=gen)[:32] for _ in range(8)]).to(torch.int32).view(1, 8, 32)
    counts = torch.full((1, 8), 32, dtype=torch.int32)
    out = torch.empty_like(q)
    cases.append(("block_sparse_decode B1 Hq32 Hkv8 D128 32 of 128 pages fp32",
                  lambda: kvcore.block_sparse_decode(q, k, v, table, lens, sel, counts, out=out)))

    # attention_scores: SnapKV-style window of 8 queries over the same cache.
    qw = torch.randn(1, 8, 32, 128, generator=gen)
    cases.append(("attention_scores B1 W8 Hq32 Hkv8 D128 S2048 fp32",
                  lambda: kvcore.attention_scores(qw, k, table, lens)))

    # mla_decode: 16 heads over a 576-wide latent (value = first 512 columns).
    ql = torch.randn(1, 16, 576, generator=gen).to(torch.bfloat16)
    latent = torch.randn(S // ps, ps, 576, generator=gen).to(torch.bfloat16)
    out_l = torch.empty(1, 16, 512, dtype=torch.bfloat16)
    cases.append(("mla_decode B1 H16 Dk576 Dv512 S2048 bf16",
                  lambda: kvcore.mla_decode(ql, latent, table, lens, scale=576 ** -0.5, out=out_l)))
    return cases


def _measure(reps: int) -> dict:
    import kvcore

    kvcore.set_validation(False)
    gen = torch.Generator().manual_seed(14)
    res = {"isa": kvcore.cpu_isa(), "threads": torch.get_num_threads(), "ms": {}}
    for name, call in _cases(gen):
        for _ in range(3):
            call()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        res["ms"][name] = statistics.median(times) * 1e3
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--isa", choices=ISAS, help="measure in this process (KVCORE_CPU_ISA must match)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa:
        res = _measure(args.reps)
        if res["isa"] != args.isa:
            print(f"KVCORE_CPU_ISA={os.environ.get('KVCORE_CPU_ISA')!r} runs {res['isa']}, not {args.isa}",
                  file=sys.stderr)
            return 1
        print(json.dumps(res))
        return 0

    rows = {}
    for isa in ISAS:
        env = dict(os.environ, KVCORE_CPU_ISA=isa)
        cmd = [sys.executable, __file__, "--isa", isa, "--reps", str(args.reps), "--threads", str(args.threads)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            if "does not support" in done.stderr:  # this CPU lacks the copy's instructions
                continue
            print(f"{isa}: failed\n{done.stdout}{done.stderr}", file=sys.stderr)
            return 1
        rows[isa] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"median of {args.reps} calls, {rows['baseline']['threads']} threads; ratio: baseline / each")
    print(f"{'op':<62} " + " ".join(f"{isa + ' ms':>12} {'ratio':>6}" for isa in rows))
    for name, base in rows["baseline"]["ms"].items():
        cells = " ".join(f"{rows[isa]['ms'][name]:>12.3f} {base / rows[isa]['ms'][name]:>6.2f}" for isa in rows)
        print(f"{name:<62} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
