"""Per-point medians over several runs of the decode bench group, for issue 2's "no slower than
cuDNN at any grid point": one run's table leaves 0.3-0.5% differences inside the spread of a
peer's own timings (session 30), so s31_call1.sh runs the group three times and this script
reads the JSON files back.

    python bench/experiments/decode_medians.py RUN.json [RUN.json ...]

For each case it prints every implementation's median time over the runs, then kvcore's time
over the fastest peer's median: <= 1.000 means kvcore is no slower there. The contiguous-K/V
peers (SDPA, plain torch) do the same work in a case and its " in-order" twin (only kvcore's and
FlashInfer's page tables differ), so their timings of both are pooled; likewise a case's
" paired" twin (K and V of a page side by side: only the paged readers' layout differs). Rows a
run lacks are left out of that run only.
"""
from __future__ import annotations

import json
import statistics
import sys

CONTIGUOUS = ("sdpa-cudnn", "sdpa-flash", "torch")  # read contiguous K/V: the page order is not theirs
TWIN_SUFFIXES = (" in-order", " paired")  # cases that differ only in what the paged readers see


def base_case(case: str) -> str:
    """The case's name without the suffixes that change nothing for the contiguous peers."""
    for suffix in TWIN_SUFFIXES:
        case = case.replace(suffix, "")
    return case


def load(paths: list) -> tuple:
    """({case: {impl: [ms, ...]}}, [copy GB/s per run]) over the runs, cases in first-seen order;
    the contiguous peers' lists hold their timings of the case's twins (same base_case) too."""
    times: dict = {}
    copies = []
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        copies.append(float(run["copy_gbps"]))
        for row in run["rows"]:
            if row.get("ms"):
                times.setdefault(row["case"], {}).setdefault(row["impl"], []).append(float(row["ms"]))
    pooled = {case: {impl: list(v) for impl, v in by_impl.items()} for case, by_impl in times.items()}
    for case, by_impl in times.items():
        for twin, twin_times in times.items():
            if twin == case or base_case(twin) != base_case(case):
                continue
            for impl in CONTIGUOUS:
                if impl in by_impl and impl in twin_times:
                    pooled[case][impl] += twin_times[impl]
    return pooled, copies


def table(times: dict, copies: list) -> list:
    """One line per case: impl median us (runs) ..., then kvcore / fastest peer."""
    lines = [f"{len(copies)} runs, median copy {statistics.median(copies):,.0f} GB/s"]
    for case, by_impl in times.items():
        med = {impl: statistics.median(v) for impl, v in by_impl.items()}
        cells = [f"{impl} {ms * 1000:.1f} us (n={len(by_impl[impl])})" for impl, ms in med.items()]
        peers = {impl: ms for impl, ms in med.items() if impl != "kvcore"}
        ratio = ""
        if "kvcore" in med and peers:
            best = min(peers, key=peers.get)
            ratio = f" | kvcore / {best} {med['kvcore'] / peers[best]:.3f}"
        lines.append(f"{case}: " + ", ".join(cells) + ratio)
    return lines


def main(argv: list) -> int:
    if len(argv) < 2:
        raise SystemExit("usage: decode_medians.py RUN.json [RUN.json ...]")
    times, copies = load(argv[1:])
    print("\n".join(table(times, copies)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
