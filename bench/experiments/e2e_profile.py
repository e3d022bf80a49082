"""Where a decode step of the e2e benchmark's model spends its time (GPU kernels vs the host).

    python bench/experiments/e2e_profile.py [BATCH] [SEQ_LEN]

For each of kvcore (full cache) and kvcore + SnapKV 2048: the step's wall time with a sync, the
summed CUDA kernel time of one profiled step, and the top host-side and device-side ops. A step
whose wall time is far above its kernel time is bound by the host (Python, launches, syncs).
"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import kvcore
from kvcore.bench import e2e
from kvcore.integrations import transformers as kvt


def report(name: str, step) -> None:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    walls = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    # Kernel rows only: an op's row repeats the device time of the kernels it launched.
    gpu_ms = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    print(f"== {name}: wall {sorted(walls)[2]:.2f} ms (median of 5), kernels {gpu_ms:.2f} ms")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    print(events.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=60))


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    seq_len = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
    case = e2e.E2ECase(batch, seq_len)
    device = torch.device("cuda")
    kvcore.set_validation(False)
    with torch.no_grad():
        model = e2e.build_model(case, device)
        tokens = torch.randint(0, case.vocab, (batch, 1), device=device)
        kvt.enable(model)
        room = seq_len + 64
        cache = kvt.KVCoreCache(model.config, max_cache_len=room, page_size=case.page_size)
        e2e.fill_cache(cache, case, seq_len, device, 0)
        report(f"kvcore B{batch} S{seq_len}", e2e._Step(model, cache, tokens))
        del cache
        torch.cuda.empty_cache()
        cache = kvt.KVCoreCache(model.config, max_cache_len=room, page_size=case.page_size, policy="snapkv",
                                budget=2048, policy_kwargs={"window": e2e.SNAPKV_WINDOW})
        e2e.fill_cache(cache, case, seq_len, device, 0)
        cache.apply_policy(e2e._window_queries(case, device, 0), scaling=case.head_dim ** -0.5)
        report(f"kvcore-snapkv2048 B{batch} S{seq_len}", e2e._Step(model, cache, tokens))


if __name__ == "__main__":
    main()
