"""Measurement primitives shared by every benchmark group.

Timing (`time_ms`), the two yardsticks each run is compared against (`copy_bandwidth_gbps`,
`gemm_tflops`), device naming, and a small stderr progress bar.

This module depends on torch alone; it must not import the rest
of kvcore, so that it stays usable when the compiled ops are missing.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch

# --------------------------------------------------------------------------------------------
# Case names
# --------------------------------------------------------------------------------------------

# Case names carry the dtype when it is not bf16, every grid's default.
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dtype_suffix(dtype: torch.dtype) -> str:
    """A case name's dtype suffix: ``""`` for bf16, else ``" fp16"``, ``" fp32"`` (or torch's name)."""
    if dtype == torch.bfloat16:
        return ""
    return " " + _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# --------------------------------------------------------------------------------------------
# Device naming
# --------------------------------------------------------------------------------------------

_VENDOR_WORDS = re.compile(r"\b(NVIDIA|GeForce|Tesla|Quadro|AMD|Radeon|Instinct)\b", re.IGNORECASE)


def gpu_short_name(device_name: str) -> str:
    """A short lowercase name for a device, used in result file names.

    "NVIDIA H100 80GB HBM3" -> "h100", "NVIDIA H200" -> "h200", "NVIDIA A100-SXM4-80GB" -> "a100",
    "NVIDIA GeForce RTX 4090" -> "rtx4090", "NVIDIA L40S" -> "l40s", "cpu" -> "cpu".
    """
    name = _VENDOR_WORDS.sub(" ", device_name).strip()
    if not name:
        return "gpu"
    m = re.search(r"\bRTX\s*(A?\d{3,5}\w*)", name, re.IGNORECASE)
    if m:
        return ("rtx" + m.group(1)).lower()
    # A model token: letters then digits (H100, A100, L40S, MI300X, B200, GH200), not "80GB".
    for tok in re.split(r"[\s\-_/]+", name):
        if re.fullmatch(r"[A-Za-z]{1,3}\d{1,4}[A-Za-z]{0,2}", tok) and not re.fullmatch(r"\d+GB", tok, re.I):
            return tok.lower()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "gpu"


def device_description(device: torch.device) -> tuple[str, str]:
    """(full device name, short name) for a torch device."""
    if device.type == "cuda":
        full = torch.cuda.get_device_name(device)
        return full, gpu_short_name(full)
    return "cpu", "cpu"


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


class Timer:
    """Times a zero-argument callable and returns its median time in milliseconds.

    CUDA: CUDA events around each call after warm-up, median over the repetitions, with L2
    flushed before every call by *reading* a 256 MB buffer. A flush that writes (as
    ``triton.testing.do_bench`` does, zeroing its buffer) leaves up to an L2's worth (50 MB on an
    H100) of dirty lines whose write-back then lands inside the timed call: measured on an H100
    (2026-11-25), that added 9 us (+16%) to a 134 MB decode and 9 us to a 537 MB one, charging a
    benchmark artefact to whichever kernel runs next. CPU: ``time.perf_counter`` median after
    warm-up.

    The flush is ``torch.sum`` of an int32 buffer into an int32 scalar: a plain 256 MB read
    (~65 us). Until session 13 it summed into an int64 scalar, for which torch first casts the
    buffer to a 512 MB int64 temporary and then reads that (~300 us, L2 left clean by that read);
    an A/B of the two forms in one process measured the same kernel times (bench/NOTES.md).

    ``warmup_ms``/``rep_ms`` are time budgets; the number of repetitions is derived from a first
    estimate of the call's time and clamped to [min_reps, max_reps].
    """

    method_name = "CUDA events median, L2 flushed by a 256 MB read"

    def __init__(
        self,
        device: torch.device,
        *,
        warmup_ms: float = 25.0,
        rep_ms: float = 100.0,
        min_reps: int = 5,
        max_reps: int = 1000,
    ) -> None:
        self.device = torch.device(device)
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.min_reps = min_reps
        self.max_reps = max_reps
        self._flush_buf: Optional[torch.Tensor] = None
        self._flush_sink: Optional[torch.Tensor] = None

    @property
    def method(self) -> str:
        return self.method_name if self.device.type == "cuda" else "perf_counter median"

    def __call__(self, fn: Callable[[], object], setup: Optional[Callable[[], object]] = None) -> float:
        """Median milliseconds of one ``fn()``. ``setup()`` (optional) runs before every call, outside
        the timed interval: for ops that change their inputs in place (compact_kv lowers seq_lens),
        so that each timed call starts from the same state without timing the restore."""
        setup = setup or (lambda: None)
        if self.device.type == "cuda":
            return self._time_events(fn, setup)
        return self._time_cpu(fn, setup)

    # -- CUDA ------------------------------------------------------------------------------
    def _flush_l2(self) -> None:
        if self._flush_buf is None:
            self._flush_buf = torch.ones(256 * 2**20 // 4, dtype=torch.int32, device=self.device)
            self._flush_sink = torch.empty((), dtype=torch.int32, device=self.device)
        # dtype=int32: without it the sum's int64 default made torch cast the buffer first.
        torch.sum(self._flush_buf, 0, dtype=torch.int32, out=self._flush_sink)

    def _time_events(self, fn: Callable[[], object], setup: Callable[[], object]) -> float:
        # Estimate one call (flush included so the estimate is not from a warm L2).
        setup()
        fn()
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            self._flush_l2()
            setup()
            fn()
        end.record()
        torch.cuda.synchronize(self.device)
        est = max(start.elapsed_time(end) / 5, 1e-3)
        n_warm = max(1, int(self.warmup_ms / est))
        n_rep = min(self.max_reps, max(self.min_reps, int(self.rep_ms / est)))
        for _ in range(n_warm):
            setup()
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for i in range(n_rep):
            self._flush_l2()
            setup()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))

    # -- CPU -------------------------------------------------------------------------------
    def _time_cpu(self, fn: Callable[[], object], setup: Callable[[], object]) -> float:
        setup()
        t0 = time.perf_counter()
        fn()
        est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        n_warm = min(3, max(1, int(self.warmup_ms / est_ms)))
        for _ in range(n_warm):
            setup()
            fn()
        n_rep = min(self.max_reps, max(self.min_reps, int(self.rep_ms / est_ms)))
        times = []
        for _ in range(n_rep):
            setup()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


# --------------------------------------------------------------------------------------------
# Yardsticks measured in the same run
# --------------------------------------------------------------------------------------------


def copy_bandwidth_gbps(device: torch.device, timer: Timer, nbytes: Optional[int] = None) -> float:
    """Device-to-device copy rate in GB/s (1e9 bytes/s), counting bytes read plus bytes written.

    Default size: 2 GiB on CUDA (well past any cache), 64 MiB on CPU.
    """
    device = torch.device(device)
    if nbytes is None:
        nbytes = 2 * 2**30 if device.type == "cuda" else 64 * 2**20
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    try:
        ms = timer(lambda: dst.copy_(src))
    finally:
        del src, dst
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 2.0 * n * 4 / (ms * 1e-3) / 1e9


def gemm_tflops(device: torch.device, timer: Timer, n: Optional[int] = None) -> Optional[float]:
    """Dense matmul rate in TFLOP/s: n^3 bf16 on CUDA (n=8192), a small fp32 one on CPU (n=512)."""
    device = torch.device(device)
    if device.type == "cuda":
        n = n or 8192
        dtype = torch.bfloat16
    else:
        n = n or 512
        dtype = torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    c = torch.empty(n, n, dtype=dtype, device=device)
    try:
        ms = timer(lambda: torch.matmul(a, b, out=c))
    finally:
        del a, b, c
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


def rates(
    ms: float,
    nbytes: float,
    flops: float,
    copy_gbps: Optional[float],
    gemm_tf: Optional[float],
) -> dict:
    """The derived numbers of one result row: gbps, pct_copy, tflops, pct_gemm."""
    gbps = nbytes / (ms * 1e-3) / 1e9
    tflops = flops / (ms * 1e-3) / 1e12
    return {
        "gbps": gbps,
        "pct_copy": (gbps / copy_gbps * 100.0) if copy_gbps else None,
        "tflops": tflops,
        "pct_gemm": (tflops / gemm_tf * 100.0) if gemm_tf else None,
    }


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares line through ``(xs, ys)``: ``(intercept, slope)``. The scaling experiments fit
    time = fixed cost + bytes / rate with it (intercept in the time unit, slope per byte)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def round_sig(x: Optional[float], digits: int = 4) -> Optional[float]:
    """Round to a number of significant digits (None and non-finite values pass through)."""
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x) or x == 0:
        return x
    return round(x, max(0, digits - 1 - int(math.floor(math.log10(abs(x))))))


# --------------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------------


class ProgressBar:
    """A one-line progress bar on stderr, redrawn with carriage returns.

    Enabled when the stream is a terminal, or when forced (``force=True`` or the environment
    variable ``KVCORE_BENCH_PROGRESS=1``); ``KVCORE_BENCH_PROGRESS=0`` disables it. Use
    ``write()`` for messages while the bar is shown so the two do not interleave.
    """

    def __init__(self, total: int, *, stream=None, force: Optional[bool] = None, width: int = 28) -> None:
        self.total = max(int(total), 0)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.label = ""
        self._t0 = time.monotonic()
        self._shown = False
        env = os.environ.get("KVCORE_BENCH_PROGRESS")
        if force is None and env in ("0", "1"):
            force = env == "1"
        if force is None:
            isatty = getattr(self.stream, "isatty", None)
            force = bool(isatty and isatty())
        self.enabled = force

    def render(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self._t0
        label = self.label if len(self.label) <= 60 else self.label[:57] + "..."
        return f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s {label}"

    def _draw(self) -> None:
        if not self.enabled:
            return
        self.stream.write("\r\x1b[2K" + self.render())
        self.stream.flush()
        self._shown = True

    def set_label(self, label: str) -> None:
        self.label = label
        self._draw()

    def update(self, n: int = 1, label: Optional[str] = None) -> None:
        self.done = min(self.total, self.done + n) if self.total else self.done + n
        if label is not None:
            self.label = label
        self._draw()

    def write(self, message: str, file=None) -> None:
        """Print a message (to stdout by default) without breaking the bar."""
        out = file if file is not None else sys.stdout
        if self.enabled and self._shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
        print(message, file=out, flush=True)
        if self.enabled and self._shown:
            self._draw()

    def close(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r\x1b[2K" + self.render() + "\n")
            self.stream.flush()
            self._shown = False

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# What a group's run() gets, and the rows it returns
# --------------------------------------------------------------------------------------------


class RunContext:
    """Everything a benchmark group needs besides its case: device, timer, yardsticks, output."""

    def __init__(
        self,
        device: torch.device,
        timer: Timer,
        copy_gbps: Optional[float],
        gemm_tflops: Optional[float],
        progress: Optional[ProgressBar] = None,
        *,
        quick: bool = False,
        seed: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.timer = timer
        self.copy_gbps = copy_gbps
        self.gemm_tflops = gemm_tflops
        self.progress = progress if progress is not None else ProgressBar(0, force=False)
        self.quick = quick
        self.seed = seed

    def log(self, message: str) -> None:
        self.progress.write(message)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free_memory(self) -> None:
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()


def make_row(
    group: str,
    impl: str,
    case: str,
    ctx: RunContext,
    *,
    ms: Optional[float] = None,
    nbytes: Optional[float] = None,
    flops: Optional[float] = None,
    notes: Optional[str] = None,
    error: Optional[str] = None,
) -> dict:
    """One result row in the committed JSON shape; numbers are None when there is no timing."""
    row = {
        "group": group,
        "impl": impl,
        "case": case,
        "ms": None,
        "gbps": None,
        "pct_copy": None,
        "tflops": None,
        "pct_gemm": None,
    }
    if ms is not None and error is None:
        r = rates(ms, nbytes or 0.0, flops or 0.0, ctx.copy_gbps, ctx.gemm_tflops)
        row.update(
            ms=round_sig(ms, 4),
            gbps=round_sig(r["gbps"], 4),
            # 4 digits: the tables print one decimal, which 3 would fake at >= 100% (100.53 -> "101.0").
            pct_copy=round_sig(r["pct_copy"], 4),
            tflops=round_sig(r["tflops"], 4),
            pct_gemm=round_sig(r["pct_gemm"], 3),
        )
    if notes:
        row["notes"] = notes
    if error:
        row["error"] = error
    return row
