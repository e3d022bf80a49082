"""Summarise Nsight Compute's source page (SASS view, CSV) by where the warps stall.

    python bench/experiments/ncu_sass_top.py KEY-sass.csv[.gz] [--top N]

Input: ``ncu --import REPORT --page source --csv --print-source sass`` (written by ncu_pack.sh
with NCU_SOURCE=1). The column names differ between ncu versions, so they are found by pattern:
the stall-sample column ("Warp Stall Sampling (All Samples)" or the closest match), the address
and the source text. Output: the total of stall samples, the instructions that carry the most
(with their share, the running share, and the largest per-reason columns when the export has
them), and the same samples summed by opcode. Standard library only.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import re
import sys
from collections import defaultdict


def _number(text: str) -> "float | None":
    text = text.strip().replace(",", "")
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _find(header: list, *patterns: str) -> "int | None":
    for pat in patterns:
        for i, name in enumerate(header):
            if re.search(pat, name, re.IGNORECASE):
                return i
    return None


def _opcode(sass: str) -> str:
    words = sass.strip().split()
    if words and words[0].startswith("@"):  # predicate guard
        words = words[1:]
    return words[0].rstrip(";") if words else "?"


def read_tables(path: str):
    """[(kernel name, header, rows)] per kernel section of the file: a "Kernel Name" line, then the
    table whose header names a source or address column. A repeated identical section (ncu's export
    can print one twice) is kept once. Reads .csv or .csv.gz."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="", errors="replace") as f:
        lines = list(csv.reader(f))
    tables = []
    name, header = "?", None
    for row in lines:
        if row and row[0].strip() == "Kernel Name":
            name, header = (row[1] if len(row) > 1 else "?"), None
        elif header is None and (any(c.strip().lower() == "source" for c in row)
                                 or any("address" in c.lower() for c in row)):
            header = row
            tables.append((name, header, []))
        elif header is not None and len(row) == len(header):
            tables[-1][2].append(row)
    kept = []
    for t in tables:
        if t[2] and not (kept and kept[-1] == t):
            kept.append(t)
    return kept


def main(argv: "list | None" = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args(argv)
    tables = read_tables(args.csv)
    if not tables:
        print(f"{args.csv}: no source table found (is it ncu's --page source --csv output?)")
        return 1
    rc = 0
    for name, header, rows in tables:
        print(f"== {name}")
        rc = max(rc, summarise(args.csv, header, rows, args.top))
        print()
    return rc


def summarise(path: str, header: list, rows: list, top: int) -> int:
    """The most-sampled instructions of one kernel's table, and the samples by opcode."""
    samples = _find(header, r"warp stall sampling \(all", r"stall sampling.*all", r"stall sampling", r"samples")
    source = _find(header, r"^\s*source\s*$", r"source")
    address = _find(header, r"address", r"^#")
    if samples is None or source is None:
        print(f"{path}: columns not recognised: {header}")
        return 1
    # Per-reason stall columns, when the export carries them (names mentioning a stall reason).
    reasons = [i for i, name in enumerate(header)
               if i != samples and re.search(r"stall", name, re.IGNORECASE)
               and not re.search(r"sampling", name, re.IGNORECASE)]
    table = []
    for r in rows:
        n = _number(r[samples])
        if n is None:
            continue
        table.append((n, r))
    total = sum(n for n, _ in table)
    print(f"{path}: {len(table)} instructions, {total:.0f} stall samples ({header[samples].strip()})")
    if total <= 0:
        return 0
    table.sort(key=lambda x: -x[0])
    running = 0.0
    print(f"\n{'address':>10} {'samples':>9} {'share':>6} {'cum':>6}  instruction  [largest reasons]")
    for n, r in table[:top]:
        running += n
        extra = []
        for i in reasons:
            v = _number(r[i])
            if v:
                extra.append((v, header[i].strip()))
        extra.sort(reverse=True)
        tags = ", ".join(f"{name} {v:.0f}" for v, name in extra[:3])
        addr = r[address].strip() if address is not None else "?"
        print(f"{addr:>10} {n:9.0f} {100 * n / total:5.1f}% {100 * running / total:5.1f}%  "
              f"{r[source].strip()[:90]}" + (f"  [{tags}]" if tags else ""))
    by_op = defaultdict(float)
    for n, r in table:
        by_op[_opcode(r[source])] += n
    print("\nby opcode:")
    for op, n in sorted(by_op.items(), key=lambda x: -x[1])[:25]:
        print(f"  {op:<24} {n:9.0f} {100 * n / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
