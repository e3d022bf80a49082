"""Where the H2O score's overhead over plain gqa_decode goes: per-kernel device times.

    python bench/experiments/h2o_profile.py [REPEATS]

For the eviction group's two H2O cases (B1 S32768 and B16 S8192, Hq32 Hkv8 D128 page 16, bf16),
profiles REPEATS back-to-back calls of plain ``gqa_decode`` and of ``gqa_decode(score=...)`` and
prints, per kernel name, the median duration, plus the median gap between one kernel's end and
the next one's start inside a call (the kernel boundary the epilogue waits across). Run it again
with KVCORE_NO_PDL=1 to see what programmatic dependent launch saves, and with KVCORE_SCORE_L2=normal
for the normal L2 policy on the P scratch instead of the default evict_last (bench/NOTES.md,
sessions 6 and 8). Kernel durations here are without an L2 flush between calls (back-to-back,
as in a decode loop), so compare them with each other, not with the benchmark's flushed times.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import kvcore
from kvcore.bench import decode, eviction_cache


def kernel_events(prof) -> list:
    """Device-side kernel events in start order, as (name, start_us, end_us)."""
    rows = []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        rows.append((e.name, e.time_range.start, e.time_range.end))
    return sorted(rows, key=lambda r: r[1])


def profile_calls(fn, repeats: int) -> tuple[dict, list]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    events = kernel_events(prof)
    per_name = defaultdict(list)
    for name, start, end in events:
        per_name[name].append(end - start)
    gaps = [b[1] - a[2] for a, b in zip(events, events[1:])]
    return per_name, gaps


def short(name: str) -> str:
    return name if len(name) <= 90 else name[:87] + "..."


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    device = torch.device("cuda")
    kvcore.set_validation(False)
    for case in (decode.DecodeCase(1, 32, 8, 128, 32768), decode.DecodeCase(16, 32, 8, 128, 8192)):
        inputs = decode.make_inputs(case, device, seed=0)
        totals = {}
        for with_score in (False, True):
            prep = eviction_cache.build_h2o(inputs, with_score)[0]
            per_name, gaps = profile_calls(prep.fn, repeats)
            label = "score" if with_score else "plain"
            total = 0.0
            print(f"== {case.name} {label}: {repeats} calls")
            for name, durs in sorted(per_name.items(), key=lambda kv: -statistics.median(kv[1])):
                per_call = len(durs) / repeats
                med = statistics.median(durs)
                total += med * per_call
                print(f"   {med:8.2f} us  x{per_call:.0f}/call  {short(name)}")
            # The gap after each call's last kernel is host time between calls; within a call
            # (score: decode -> epilogue) the gap is the boundary itself.
            if with_score and gaps:
                inner = gaps[0::2]
                print(f"   decode end -> epilogue start: median {statistics.median(inner):.2f} us "
                      f"(negative: the epilogue starts before the decode ends, PDL)")
            totals[label] = total
            print(f"   sum of medians per call: {total:.2f} us")
        print(f"   score overhead by kernel time: {100.0 * (totals['score'] / totals['plain'] - 1.0):+.1f}%")
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
