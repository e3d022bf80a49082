"""Does host time leak into the benchmark's event times?

The bench Timer (kvcore.bench.harness.Timer) enqueues the L2 flush (a ~65 us read), records the
start event, then calls the op. If the op's host path (Python wrapper, dispatcher, launcher) takes
longer than the flush has left to run, the GPU idles between the start event and the kernel and the
idle time is counted as the op's. Here each implementation is timed twice in one process: by the
Timer as it is, and by the same Timer with the GPU held busy for ~100 us (torch.cuda._sleep) before
each flush, so the op is always enqueued before the GPU reaches the start event. It also prints
each op's host time per call.

    python3 bench/experiments/timer_host_gap.py
"""

from __future__ import annotations

import statistics
import time

import torch

from kvcore.bench import decode, peers
from kvcore.bench.harness import Timer


class BusyTimer(Timer):
    """Timer whose flush is preceded by a GPU spin of `cycles` clock cycles."""

    def __init__(self, device: torch.device, cycles: int) -> None:
        super().__init__(device)
        self.cycles = cycles

    def _flush_l2(self) -> None:
        torch.cuda._sleep(self.cycles)
        super()._flush_l2()


def host_us(fn, calls: int = 200) -> float:
    """Median host time of one fn() call, the GPU kept ahead by a long spin."""
    times = []
    for _ in range(5):
        torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU work: every call below only enqueues
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    dev = torch.device("cuda")
    cases = [decode.DecodeCase(1, 32, 8, 128, 32768), decode.DecodeCase(16, 32, 8, 128, 8192)]
    plain, busy = Timer(dev), BusyTimer(dev, 200_000)
    print(f"{'case':36} {'impl':12} {'timer us':>9} {'busy-timer us':>14} {'host us/call':>13}")
    for case in cases:
        inputs = decode.make_inputs(case, dev)
        for name in ("kvcore", "sdpa-cudnn", "flashinfer"):
            try:
                prepared = peers.build(name, inputs)[0]
            except Exception as exc:  # noqa: BLE001 (a missing peer is a skipped row)
                print(f"{case.name:36} {name:12} skipped: {str(exc).splitlines()[0][:80]}")
                continue
            with prepared.context():
                prepared.before_timing()
                try:
                    rows = []
                    for _ in range(2):  # alternate, twice
                        rows.append((plain(prepared.fn) * 1e3, busy(prepared.fn) * 1e3))
                    h = host_us(prepared.fn)
                finally:
                    prepared.after_timing()
            for a, b in rows:
                print(f"{case.name:36} {name:12} {a:9.2f} {b:14.2f} {h:13.1f}")


if __name__ == "__main__":
    main()
