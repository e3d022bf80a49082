"""Per-CTA statistics from decode_trace.cu's TRACE_CSV files (one row per CTA: its SM, phase
stamps and the landing time of each tile, in us since the first CTA's entry).

For each file: how the CTAs' rates spread in the bulk of the kernel and at its end (does a CTA
that is behind speed up once others have finished?), how many CTAs are still loading as the end
nears, and the aggregate landed rate in the last microseconds. With two or more files of the same
launch shape: whether the per-SM loop times agree run to run (a slow SM that stays slow is
structural, not luck).

    python bench/experiments/trace_csv_stats.py RUN1.csv [RUN2.csv ...]
"""
from __future__ import annotations

import csv
import statistics
import sys


def load(path: str) -> list:
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            tiles = [float(x) for x in r["tiles"].split(";")] if r.get("tiles") else []
            rows.append({"cta": int(r["cta"]), "sm": int(r["smid"]), "entry": float(r["entry"]),
                         "first": float(r["first"]), "loop_end": float(r["loop_end"]), "exit": float(r["exit"]),
                         "tiles": tiles})
    return rows


def pct(xs: list, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else float("nan")


def summary(path: str, rows: list, tile_bytes: float) -> dict:
    """Prints one file's statistics; returns {sm: loop time} for the run-to-run comparison."""
    rows = [r for r in rows if len(r["tiles"]) >= 16]
    end = max(r["exit"] for r in rows)
    print(f"== {path}: {len(rows)} CTAs with tiles, last exit {end:.1f} us")
    # Rate per CTA over its middle half of tiles (the bulk) and over its last eighth (its end).
    bulk, tail, ratio = [], [], []
    for r in rows:
        t = r["tiles"]
        n = len(t)
        a, b = n // 4, 3 * n // 4
        rb = (b - a) * tile_bytes / max(t[b] - t[a], 1e-9) * 1e-3  # GB/s
        k = max(2, n // 8)
        rt = (k - 1) * tile_bytes / max(t[-1] - t[-k], 1e-9) * 1e-3
        bulk.append(rb), tail.append(rt), ratio.append(rt / rb)
    for name, xs in (("bulk GB/s", bulk), ("end GB/s", tail), ("end / bulk", ratio)):
        print(f"  {name:12s} p10 {pct(xs, .1):7.2f} p50 {pct(xs, .5):7.2f} p90 {pct(xs, .9):7.2f}")
    # Do the CTAs that end last have a slow bulk, a late start, or both?
    order = sorted(rows, key=lambda r: r["exit"])
    late = order[-max(1, len(order) // 10):]
    early = order[: max(1, len(order) // 10)]
    for name, grp in (("first 10% to exit", early), ("last 10% to exit", late)):
        gb = [bulk[rows.index(r)] for r in grp]
        print(f"  {name}: first tile {statistics.mean(r['first'] for r in grp):6.2f} us, bulk "
              f"{statistics.mean(gb):6.2f} GB/s, exit {statistics.mean(r['exit'] for r in grp):7.2f} us")
    # CTAs still loading, and the landed rate, in the last 12 us, 1 us windows.
    line_active, line_rate = [], []
    for w in range(12, 0, -1):
        lo, hi = end - w, end - w + 1
        active = sum(1 for r in rows if r["tiles"][-1] >= lo)
        landed = sum(1 for r in rows for x in r["tiles"] if lo <= x < hi)
        line_active.append(str(active))
        line_rate.append(f"{landed * tile_bytes / 1e-6 / 1e9:.0f}")
    print("  last 12 us, 1 us windows: CTAs still loading " + " ".join(line_active))
    print("                            landed GB/s         " + " ".join(line_rate))
    return {r["sm"]: r["loop_end"] - r["first"] for r in rows}


def main(paths: list) -> None:
    tile_bytes = float(2 * 128 * 128 * 2)  # K + V of a 128-token tile at D 128, bf16 (the 8-warp kernel)
    per_sm = [summary(p, load(p), tile_bytes) for p in paths]
    for i in range(1, len(per_sm)):
        common = sorted(set(per_sm[0]) & set(per_sm[i]))
        if len(common) < 3:
            continue
        xs = [per_sm[0][s] for s in common]
        ys = [per_sm[i][s] for s in common]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
        sx = sum((x - mx) ** 2 for x in xs) ** 0.5
        sy = sum((y - my) ** 2 for y in ys) ** 0.5
        print(f"per-SM loop time, {paths[0]} against {paths[i]}: {len(common)} SMs, correlation "
              f"{cov / max(sx * sy, 1e-12):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
