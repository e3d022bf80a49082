"""kvcore microbenchmarks: time kvcore's ops against their peers and write the results.

Usage::

    python -m kvcore.bench                      # every group, full grid, on CUDA when present
    python -m kvcore.bench --group decode       # one group
    python -m kvcore.bench --quick              # small sizes (always the case on CPU)
    python -m kvcore.bench --device cpu --out /tmp/b --no-plot
    python -m kvcore.bench --impl kvcore,torch  # only these implementations

Each run measures, in the same process, a device-to-device copy (GB/s, bytes read + written) and
a large bf16 GEMM (TFLOP/s), then every case x implementation of the selected groups. Each
implementation's output is checked against an fp32 reference before it is timed (a wrong one is
reported as an error, not a time). Times are medians: CUDA events with L2 flushed before each call
by reading a 256 MB buffer on CUDA (see ``harness.Timer`` for why not a writing flush),
``time.perf_counter`` on CPU.
kvcore's ops are timed with index validation off and preallocated outputs, as a serving engine
runs them.

Writes ``<out>/<gpu>-<date>.json`` (gpu: short lowercase name such as h100, h200 or cpu), a
markdown table ``.md`` and a bar chart ``.png`` beside it (the PNG needs matplotlib, the
``kvcore[bench]`` extra), and prints the markdown table. A progress bar is drawn on stderr when
it is a terminal (``--progress`` or ``KVCORE_BENCH_PROGRESS=1`` forces it, ``=0`` hides it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from typing import Optional, Sequence

import torch

from . import GROUPS, group_modules, report
from .harness import ProgressBar, RunContext, Timer, copy_bandwidth_gbps, device_description, gemm_tflops


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kvcore.bench",
        description="Benchmark kvcore ops against peers (see the module docstring).",
    )
    p.add_argument("--group", action="append", choices=sorted(GROUPS), help="group to run (repeatable; default all)")
    p.add_argument("--quick", action="store_true", help="small sizes (the default on CPU)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="output folder (default bench/results)")
    p.add_argument(
        "--impl",
        action="append",
        default=None,
        help="only these implementations (comma-separated and/or repeated), e.g. kvcore,torch",
    )
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    p.add_argument("--progress", action="store_true", help="draw the progress bar even when stderr is not a terminal")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    return p.parse_args(argv)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _kvcore_version() -> Optional[str]:
    try:
        import kvcore  # noqa: WPS433

        version = getattr(kvcore, "__version__", None)
        if version:
            return str(version)
    except Exception:  # noqa: BLE001
        pass
    try:
        from importlib.metadata import version as dist_version

        return dist_version("kvcore")
    except Exception:  # noqa: BLE001
        return None


def _select_impls(module, device: torch.device, wanted: Optional[list]) -> list:
    default = module.impls(device)
    if not wanted:
        return default
    known = module.known_impls()
    chosen = [n for n in default if n in wanted]
    chosen += [n for n in wanted if n in known and n not in chosen]
    return chosen


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; returns the result dict (also written to disk and printed)."""
    args = _parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("kvcore.bench: --device cuda but torch sees no CUDA device")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    quick = args.quick or device.type == "cpu"
    wanted = None
    if args.impl:
        wanted = [n.strip() for item in args.impl for n in item.split(",") if n.strip()]

    group_names = args.group or list(GROUPS)
    modules = [m for name in group_names for m in group_modules(name)]
    if wanted:
        known = {n for m in modules for n in m.known_impls()}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            sys.exit(f"kvcore.bench: unknown --impl {unknown}; known: {sorted(known)}")

    full_name, short_name = device_description(device)
    device_name = full_name if device.type == "cuda" else _cpu_name()
    if device.type == "cuda":
        timer = Timer(device)
    else:
        timer = Timer(device, warmup_ms=5.0, rep_ms=40.0, min_reps=3)
    print(
        f"kvcore.bench: {device_name} ({short_name}), torch {torch.__version__}, "
        f"{'quick' if quick else 'full'} grid, timing: {timer.method}",
        flush=True,
    )

    with torch.no_grad():
        copy_nbytes = 256 * 2**20 if (quick and device.type == "cuda") else None
        copy = copy_bandwidth_gbps(device, timer, nbytes=copy_nbytes)
        gemm = gemm_tflops(device, timer, n=4096 if (quick and device.type == "cuda") else None)
        print(f"  copy {copy:,.1f} GB/s (read + written), GEMM {gemm:,.2f} TFLOP/s", flush=True)

        plan = []
        for module in modules:
            impl_names = _select_impls(module, device, wanted)
            if not impl_names:
                continue
            for case in module.cases(device, quick):
                plan.append((module, case, impl_names))
        total = sum(len(impls) for _, _, impls in plan)
        progress = ProgressBar(total, force=True if args.progress else None)
        ctx = RunContext(device, timer, copy, gemm, progress, quick=quick, seed=args.seed)
        rows = []
        try:
            for module, case, impl_names in plan:
                rows.extend(module.run(case, impl_names, ctx))
        finally:
            progress.close()

    result = {
        "gpu": full_name if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "copy_gbps": round(copy, 1),
        "gemm_tflops": None if gemm is None else round(gemm, 2),
        "kvcore_version": _kvcore_version(),
        "device_name": device_name,
        "rows": rows,
    }
    stem = _free_stem(args.out, f"{short_name}-{result['date']}")
    paths = report.write_all(result, args.out, stem, plot=not args.no_plot)
    print()
    print(report.markdown(result))
    print("wrote " + ", ".join(paths.values()), flush=True)
    return result


def _free_stem(folder: str, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ... when an earlier run of the same GPU and day already
    wrote ``stem.json`` there: a second run (another --group, say) must not replace the first."""
    candidate, n = stem, 1
    while os.path.exists(os.path.join(folder, candidate + ".json")):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


if __name__ == "__main__":
    main()
