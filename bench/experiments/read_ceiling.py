"""How fast can *any* kernel read N bytes on this GPU, timed the way the benchmarks time ops?

Several issue targets are a percentage of the copy rate measured on a 2 GiB buffer, applied to
ops that read far less (issue 3's latent projection: 8.26 MB; issue 4's block-sparse B1: 19.4 MB;
issue 5's InfLLM step: 42.5 MB; issue 2's decode B1 S32768: 134 MB). A small read pays the
launch, the DRAM ramp and the uneven end of the grid on top of its bytes, and no kernel that
must read those bytes can beat a plain read of them. This probe measures that ceiling with the
benchmarks' own Timer (CUDA events, median, L2 flushed by a read before every call):

* an empty kernel (launch + completion as seen by two events);
* the best plain read of N contiguous bytes found over a sweep of Triton read kernels (one-shot
  grids and persistent grid-stride loops, several block sizes and warp counts; 16-byte loads,
  one int32 partial per program so nothing is optimised away) and torch.sum;
* device-to-device copy of N bytes (read + write counted, the yardstick's own operation at size N).

It prints, per size, the time and the % of the 2 GiB copy rate (the yardstick every table uses),
and what the issue's target percentage would need, and writes the rows as JSON.

    python bench/experiments/read_ceiling.py [OUT.json]
"""
from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl

from kvcore.bench import harness

# (label, bytes as the benchmark counts them, the target in % of copy)
TARGETS = [
    ("issue 3: mla_latent_project T<=16 weight (d7168 x 576 bf16)", 7168 * 576 * 2, 70.0),
    ("issue 4: block_sparse_decode B1 S131072 (37 x 128 tokens x 8 heads, K+V)", 37 * 128 * 8 * 128 * 2 * 2, 80.0),
    # representative keys of 8192 units + K/V of 128 sinks, 16 x 128 retrieved, 4096 local + q, out
    ("issue 5: InfLLM resident step (kvcore.bench.retrieval's bytes)",
     8192 * 8 * 128 * 2 + (128 + 16 * 128 + 4096) * 8 * 128 * 2 * 2 + 2 * 32 * 128 * 2, 80.0),
    ("issue 2: gqa_decode B1 S32768 (K+V)", 32768 * 8 * 128 * 2 * 2, 80.0),
    ("reference: gqa_decode B16 S8192 (K+V)", 16 * 8192 * 8 * 128 * 2 * 2, 95.0),
]


@triton.jit
def _read_once(x_ptr, part_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(part_ptr + pid, tl.sum(v, axis=0))


@triton.jit
def _read_strided(x_ptr, part_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(pid * BLOCK, n, nprog * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _empty(part_ptr):
    pass


def best_read(timer: harness.Timer, x: torch.Tensor, sms: int) -> tuple[float, str, list]:
    n = x.numel()
    part = torch.empty(max(1, triton.cdiv(n, 1024)), dtype=torch.int32, device=x.device)
    sink = torch.empty((), dtype=torch.int32, device=x.device)
    trials: list[tuple[float, str]] = []
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8):
            grid = (triton.cdiv(n, block),)
            ms = timer(lambda: _read_once[grid](x, part, n, BLOCK=block, num_warps=warps))
            trials.append((ms, f"one-shot BLOCK={block} warps={warps} grid={grid[0]}"))
    for block in (1024, 2048, 4096):
        for warps in (4, 8):
            for per_sm in (2, 4, 8, 16):
                grid = (min(sms * per_sm, triton.cdiv(n, block)),)
                ms = timer(lambda: _read_strided[grid](x, part, n, BLOCK=block, num_warps=warps))
                trials.append((ms, f"grid-stride BLOCK={block} warps={warps} grid={grid[0]}"))
    ms = timer(lambda: torch.sum(x, 0, dtype=torch.int32, out=sink))
    trials.append((ms, "torch.sum"))
    best = min(trials)
    return best[0], best[1], trials


def main() -> None:
    dev = torch.device("cuda")
    timer = harness.Timer(dev)
    copy = harness.copy_bandwidth_gbps(dev, timer)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    dummy = torch.empty(1, dtype=torch.int32, device=dev)
    empty_ms = timer(lambda: _empty[(1,)](dummy))
    print(f"{torch.cuda.get_device_name(dev)}: copy (2 GiB) {copy:,.0f} GB/s; empty kernel {empty_ms * 1e3:.2f} us")
    rows = []
    for label, nbytes, target in TARGETS:
        n = nbytes // 4
        x = torch.randint(0, 1 << 20, (n,), dtype=torch.int32, device=dev)
        read_ms, how, trials = best_read(timer, x, sms)
        dst = torch.empty_like(x)
        copy_ms = timer(lambda: dst.copy_(x))
        del dst, x
        torch.cuda.empty_cache()
        read_pct = nbytes / (read_ms * 1e-3) / 1e9 / copy * 100.0
        copy_n_pct = 2 * nbytes / (copy_ms * 1e-3) / 1e9 / copy * 100.0
        need_us = nbytes / (target / 100.0 * copy * 1e9) * 1e6
        row = {
            "label": label, "bytes": nbytes, "target_pct_copy": target, "target_us": round(need_us, 2),
            "best_read_us": round(read_ms * 1e3, 2), "best_read_pct_copy": round(read_pct, 1), "best_read_how": how,
            "copy_n_us": round(copy_ms * 1e3, 2), "copy_n_pct_copy": round(copy_n_pct, 1),
            "target_within_plain_read": read_pct >= target,
            "trials_us": {how_: round(ms_ * 1e3, 2) for ms_, how_ in trials},
        }
        rows.append(row)
        print(f"{label}: {nbytes / 1e6:.2f} MB; target {target:.0f}% = {need_us:.2f} us; best plain read "
              f"{read_ms * 1e3:.2f} us = {read_pct:.1f}% ({how}); copy of N {copy_ms * 1e3:.2f} us = {copy_n_pct:.1f}%")
    out = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "copy_gbps": round(copy, 1),
           "empty_kernel_us": round(empty_ms * 1e3, 2), "timer": timer.method, "rows": rows}
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
