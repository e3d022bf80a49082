"""Benchmark reports: the JSON result file, a markdown table, and a PNG bar chart.

A result is a dict in the committed shape (that of every JSON file under bench/results/)::

    {"gpu", "torch", "date", "copy_gbps", "gemm_tflops",
     "rows": [{"group", "impl", "case", "ms", "gbps", "pct_copy", "tflops", "pct_gemm"}, ...]}

Rows may carry "notes" (e.g. why a peer was skipped) and "error" (a wrong or failing kernel);
such rows have null numbers. This module uses the standard library only (matplotlib, optional,
for the PNG) so that it can read and render results without torch or the compiled ops.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

REQUIRED_KEYS = ("gpu", "torch", "date", "copy_gbps", "gemm_tflops", "rows")
ROW_KEYS = ("group", "impl", "case", "ms", "gbps", "pct_copy", "tflops", "pct_gemm")


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def validate(result: dict) -> None:
    """Raise ValueError when a result lacks a key of the committed shape."""
    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise ValueError(f"result is missing keys {missing}")
    for i, row in enumerate(result["rows"]):
        lack = [k for k in ROW_KEYS if k not in row]
        if lack:
            raise ValueError(f"row {i} ({row.get('impl')}, {row.get('case')}) is missing keys {lack}")


def write_json(result: dict, path: str) -> str:
    validate(result)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return path


def load_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    validate(result)
    return result


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _unique(items: Iterable) -> list:
    seen = {}
    for x in items:
        seen.setdefault(x, None)
    return list(seen)


def groups(result: dict) -> list:
    return _unique(r["group"] for r in result["rows"])


def table_axes(result: dict, group: str) -> tuple:
    """(cases, impls) of one group, in first-seen order."""
    rows = [r for r in result["rows"] if r["group"] == group]
    return _unique(r["case"] for r in rows), _unique(r["impl"] for r in rows)


def format_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def format_cell(row: Optional[dict]) -> str:
    """"ms (pct_copy%)" for a timed row; "-" for none or a skip; "ERROR" for a failed check."""
    if row is None:
        return ""
    if row.get("error"):
        return "ERROR"
    if row.get("ms") is None:
        return "-"
    text = format_ms(row["ms"])
    if row.get("pct_copy") is not None:
        text += f" ({row['pct_copy']:.1f}%)"
    return text


def _fmt_num(x, unit: str) -> str:
    return "n/a" if x is None else f"{x:,.0f} {unit}" if x >= 100 else f"{x:.3g} {unit}"


def markdown(result: dict) -> str:
    """One table per group: rows are cases, columns implementations, cells "ms (% of copy)"."""
    lines = []
    head = f"{result['gpu']}, torch {result['torch']}, {result['date']}"
    if result.get("kvcore_version"):
        head += f", kvcore {result['kvcore_version']}"
    for group in groups(result):
        cases, impls = table_axes(result, group)
        by_key = {(r["case"], r["impl"]): r for r in result["rows"] if r["group"] == group}
        notes: list = []  # footnote texts, numbered in order

        def mark(text: str) -> str:
            if text not in notes:
                notes.append(text)
            return f"[{notes.index(text) + 1}]"

        lines.append(f"### {group}: {head}")
        lines.append("")
        lines.append(
            f"Device-to-device copy {_fmt_num(result['copy_gbps'], 'GB/s')}, "
            f"GEMM {_fmt_num(result['gemm_tflops'], 'TFLOP/s')}. "
            "Cells: median ms (achieved bandwidth over the bytes that must be moved, % of copy)."
        )
        lines.append("")
        lines.append("| case | " + " | ".join(impls) + " |")
        lines.append("|---|" + "---|" * len(impls))
        for case in cases:
            cells = []
            for impl in impls:
                row = by_key.get((case, impl))
                cell = format_cell(row)
                if row is not None:
                    extra = row.get("error") or row.get("notes")
                    if extra:
                        prefix = "error: " if row.get("error") else ""
                        cell += " " + mark(f"{impl}: {prefix}{extra}")
                cells.append(cell)
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        if notes:
            lines.append("")
            lines.extend(f"[{i + 1}] {text}" for i, text in enumerate(notes))
        lines.append("")
    return "\n".join(lines)


def write_markdown(result: dict, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(markdown(result))
    return path


# --------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------


def plot_png(result: dict, path: str) -> Optional[str]:
    """Grouped bars of % of copy bandwidth per case and implementation; one panel per group.

    Returns the path, or None (with a printed note) when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("note: matplotlib is not installed (pip install 'kvcore[bench]'); skipping the PNG plot")
        return None

    group_names = groups(result)
    if not group_names:
        return None
    panels = [table_axes(result, g) for g in group_names]
    width_in = max(8.0, max(len(c) * (0.5 + 0.25 * len(i)) for c, i in panels))
    fig = Figure(figsize=(min(width_in, 30.0), 4.2 * len(group_names)))
    FigureCanvasAgg(fig)
    copy = result.get("copy_gbps")
    copy_text = f"{copy:,.0f} GB/s" if copy else "n/a"
    fig.suptitle(f"{result['gpu']} ({result['date']}): % of device-to-device copy bandwidth ({copy_text})")
    for n, (group, (cases, impls)) in enumerate(zip(group_names, panels)):
        ax = fig.add_subplot(len(group_names), 1, n + 1)
        by_key = {(r["case"], r["impl"]): r for r in result["rows"] if r["group"] == group}
        bar_w = 0.8 / max(len(impls), 1)
        top = 100.0
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, case in enumerate(cases):
                row = by_key.get((case, impl))
                if row and row.get("pct_copy") is not None and not row.get("error"):
                    xs.append(i - 0.4 + bar_w * (j + 0.5))
                    ys.append(row["pct_copy"])
            if ys:
                top = max(top, max(ys))
            ax.bar(xs, ys, width=bar_w, label=impl)
        ax.axhline(100.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("% of copy bandwidth")
        ax.set_ylim(0, top * 1.25)  # headroom for the legend above the 100% line
        ax.set_title(group)
        ax.legend(fontsize=8, ncol=min(len(impls), 6), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------------------------
# All three files
# --------------------------------------------------------------------------------------------


def write_all(result: dict, out_dir: str, stem: str, plot: bool = True) -> dict:
    """Write <out_dir>/<stem>.json, .md and (if plot and matplotlib) .png; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    paths = {"json": write_json(result, base + ".json"), "md": write_markdown(result, base + ".md")}
    if plot:
        png = plot_png(result, base + ".png")
        if png:
            paths["png"] = png
    return paths
