"""The kernels a call launches, read from a torch.profiler trace: name, grid, block, registers,
shared memory and device time. Needs only torch (no kvcore build), so that scripts timing the
peers alone (cudnn_rates.py) can run on a bare GPU host; peer_kernels.py uses it too.

    from profiler_kernels import kernels_of   # (scripts run as python bench/experiments/X.py)
"""
from __future__ import annotations

import json
import os
import tempfile

import torch


def kernels_of(fn, reps: int = 3) -> list:
    """Kernel events (name, grid, block, registers, shared memory, us) of `reps` calls of fn,
    after one call outside the profile."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    prof.export_chrome_trace(path)
    with open(path) as f:
        trace = json.load(f)
    os.unlink(path)
    rows = []
    for ev in trace.get("traceEvents", []):
        if ev.get("cat") != "kernel":
            continue
        a = ev.get("args", {})
        rows.append({
            "name": ev.get("name", "")[:160],
            "grid": a.get("grid"),
            "block": a.get("block"),
            "registers": a.get("registers per thread"),
            "smem": a.get("shared memory"),
            "blocks_per_sm": a.get("blocks per SM"),
            "occupancy": a.get("est. achieved occupancy %"),
            "us": ev.get("dur"),
        })
    return rows
