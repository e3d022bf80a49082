"""Where a kernel's warp-stall samples fall, by straight-line region of its SASS, from the CSV that
ncu_pack.sh writes with NCU_SOURCE=1 (`<key>-sass.csv`, or the `.csv.gz` kept under bench/results).

    python bench/experiments/ncu_sass_regions.py CSV [MIN_PERCENT]      regions holding >= MIN_PERCENT
                                                                       (default 3) of the samples
    python bench/experiments/ncu_sass_regions.py CSV --range LO HI       every instruction at offsets
                                                                       LO..HI (hex, from the kernel start)

Each kernel section of the CSV is summarised on its own (a repeated identical section once). A
region is a run of consecutive instructions with the same execution count (a basic block, or
several with the same count): the samples it holds, its execution count (a loop body's is the
trip count times the warps that run it) and its most frequent opcodes tell a prologue from a
tile loop from a merge tail. Offsets are from the kernel's first instruction, so they match a
local disassembly of the same build (triton's bundled cuobjdump / nvdisasm can produce one).
Session 11 found the MLA decode's Q staging and split merge (~23% of B32 H128's samples) and
block_sparse_decode's dependent index loads (18% of B16's) this way.
"""

from __future__ import annotations

import sys
from collections import Counter

from ncu_sass_top import read_tables  # same folder: the script's directory is on sys.path


def read_sections(path: str) -> list[tuple[str, list[dict[str, str]]]]:
    """(kernel name, rows as column -> text) per kernel section (ncu_sass_top.read_tables)."""
    return [(name, [dict(zip(header, row)) for row in rows]) for name, header, rows in read_tables(path)]


def as_int(text: str) -> int:
    text = text.strip()
    return int(text) if text and text != "-" else 0


def instructions(rows: list[dict[str, str]]) -> list[tuple[int, int, int, str]]:
    """(offset, samples, executions, SASS text) per instruction of one section."""
    base = int(rows[0]["Address"], 16)
    return [(int(r["Address"], 16) - base, as_int(r["Warp Stall Sampling (All Samples)"]),
             as_int(r["Instructions Executed"]), r["Source"].strip()) for r in rows]


def opcode(text: str) -> str:
    words = [w for w in text.split() if not w.startswith("@")]
    return words[0] if words else ""


def regions(name: str, ins: list[tuple[int, int, int, str]], min_percent: float) -> None:
    total = sum(samples for _, samples, _, _ in ins) or 1
    runs: list[list] = []  # [first offset, last offset, executions, samples, opcode counts]
    for off, samples, execs, text in ins:
        if not runs or runs[-1][2] != execs:
            runs.append([off, off, execs, 0, Counter()])
        run = runs[-1]
        run[1] = off
        run[3] += samples
        run[4][opcode(text)] += 1
    print(f"{name}: {len(ins)} instructions, {total} samples")
    for first, last, execs, samples, ops in runs:
        if 100.0 * samples / total >= min_percent:
            top = ", ".join(f"{op} x{n}" for op, n in ops.most_common(5))
            print(f"{first:6x}-{last:6x} {(last - first) // 16 + 1:4d} instr  exec {execs:8d}  "
                  f"{samples:6d} samples {100.0 * samples / total:5.1f}%  {top}")


def show_range(name: str, ins: list[tuple[int, int, int, str]], lo: int, hi: int) -> None:
    print(name)
    for off, samples, execs, text in ins:
        if lo <= off <= hi:
            print(f"{off:6x} {samples:5d} {execs:8d}  {text}")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    for name, rows in read_sections(argv[1]):
        ins = instructions(rows)
        if len(argv) >= 4 and argv[2] == "--range":
            lo = int(argv[3], 16)
            show_range(name, ins, lo, int(argv[4], 16) if len(argv) > 4 else lo + 0x200)
        else:
            regions(name, ins, float(argv[2]) if len(argv) > 2 else 3.0)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
