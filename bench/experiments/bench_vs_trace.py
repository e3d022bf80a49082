"""Why does the bench time B1 S32768's gqa_decode ~1.5 us slower than decode_trace.cu does?

Session 16: decode_trace (cudaMalloc'd inputs, a grid-stride 256 MB read as the L2 flush, raw
CUDA events) measured 40.0-40.3 us for the kernel the bench (kvcore.bench.harness.Timer: torch
tensors, torch.sum of a 256 MB int32 buffer as the flush) measured at 41.3-41.9 us, and host time
was ruled out (bench/experiments/timer_host_gap.py). Here the library op on the bench's inputs is
timed with each flush in one process, alternating:
  - torch.sum of 256 MB int32 (the Timer's flush),
  - a Triton one-shot read of the same buffer (16 KB per program, as the best plain reads of
    bench/experiments/read_ceiling.py),
  - a Triton grid-stride read of it (decode_trace's read_all: 1056 programs),
  - torch.sum, then 20 us of GPU spin (torch.cuda._sleep) before the start event,
and, for scale, with no flush. Median of CUDA-event times over `reps` calls each.

    python3 bench/experiments/bench_vs_trace.py
"""

from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl

import kvcore
from kvcore.bench import decode, peers


@triton.jit
def _read_oneshot(x_ptr, sink_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n, other=0)
    s = tl.sum(v, axis=0)
    if s == 0x12345678:  # never: keeps the loads
        tl.store(sink_ptr, s)


@triton.jit
def _read_stride(x_ptr, sink_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc ^= tl.load(x_ptr + offs, mask=offs < n, other=0)
    s = tl.sum(acc, axis=0)
    if s == 0x12345678:
        tl.store(sink_ptr, s)


def main(reps: int = 300) -> None:
    dev = torch.device("cuda")
    case = decode.DecodeCase(1, 32, 8, 128, 32768)
    inputs = decode.make_inputs(case, dev)
    prepared = peers.build("kvcore", inputs)[0]
    fn = prepared.fn
    buf = torch.ones(256 * 2**20 // 4, dtype=torch.int32, device=dev)
    sink = torch.empty((), dtype=torch.int32, device=dev)
    n = buf.numel()

    flushes = {
        "torch.sum (Timer)": lambda: torch.sum(buf, 0, dtype=torch.int32, out=sink),
        "triton one-shot read": lambda: _read_oneshot[(triton.cdiv(n, 4096),)](buf, sink, n, BLOCK=4096),
        "triton grid-stride read": lambda: _read_stride[(1056,)](buf, sink, n, BLOCK=2048),
        "torch.sum + 20 us spin": lambda: (torch.sum(buf, 0, dtype=torch.int32, out=sink), torch.cuda._sleep(40_000)),
        "no flush": lambda: None,
    }
    for f in flushes.values():  # compile / warm up
        f()
    fn()
    torch.cuda.synchronize()

    def timed(flush, call=fn) -> float:
        """Median us of call() over reps, flush() before each, CUDA events around the call."""
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            flush()
            starts[i].record()
            call()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3

    prepared.before_timing()
    try:
        results = {name: [] for name in flushes}
        for _ in range(3):
            for name, flush in flushes.items():
                results[name].append(timed(flush))
    finally:
        prepared.after_timing()
    print(f"{case.name}, kvcore.gqa_decode via the bench's inputs; us per call (three alternations)")
    for name, ts in results.items():
        print(f"  {name:26} " + "  ".join(f"{t:6.2f}" for t in ts))

    # Input variants, Timer's flush: what else differs from decode_trace (uniform [-1, 1) values,
    # exactly sized split scratch, a shuffled block table of its own)?
    flush = flushes["torch.sum (Timer)"]
    q, kc, vc, bt, sl = inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table, inputs.seq_lens
    out = torch.empty_like(q)
    ws_shared = kvcore.ops.decode_workspace(dev)
    ws_small = torch.zeros((1 << 20) + (1 << 20), dtype=torch.uint8, device=dev)
    uni = lambda t: (torch.rand(t.shape, device=dev, dtype=torch.float32) * 2 - 1).to(t.dtype)
    kc_u, vc_u, q_u = uni(kc), uni(vc), uni(q)
    variants = {
        "bench inputs": lambda: kvcore.gqa_decode(q, kc, vc, bt, sl, out=out, workspace=ws_shared),
        "uniform q/K/V": lambda: kvcore.gqa_decode(q_u, kc_u, vc_u, bt, sl, out=out, workspace=ws_shared),
        "2 MiB workspace": lambda: kvcore.gqa_decode(q, kc, vc, bt, sl, out=out, workspace=ws_small),
    }
    seq_bt = torch.sort(bt, dim=1).values.contiguous()
    variants["sequential pages"] = lambda: kvcore.gqa_decode(q, kc, vc, seq_bt, sl, out=out, workspace=ws_shared)
    for v in variants.values():
        v()
    torch.cuda.synchronize()
    res = {name: [] for name in variants}
    prepared.before_timing()
    try:
        for _ in range(3):
            for name, v in variants.items():
                res[name].append(timed(flush, v))
    finally:
        prepared.after_timing()
    print("input variants (torch.sum flush):")
    for name, ts in res.items():
        print(f"  {name:26} " + "  ".join(f"{t:6.2f}" for t in ts))


if __name__ == "__main__":
    main()
