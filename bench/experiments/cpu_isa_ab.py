"""CPU kernels under each KVCORE_CPU_ISA setting (baseline, avx2, avx512, avx512bf16; one this CPU
lacks is left out): median times of a few ops, one process each, with torch's matmul form of the
gqa_decode and mla_decode cases (contiguous K/V) timed alternating with kvcore's calls.

The variable is read once per process, so the script runs itself once per setting (``--isa``)
and prints one table. Index validation is off (host-side checks are not the kernels' time); the
inputs are random and the same in every process (fixed seed). Run from the repository root with
the in-place build on the path:
    PYTHONPATH=python python bench/experiments/cpu_isa_ab.py [--reps 30] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ISAS = ("baseline", "avx2", "avx512", "avx512bf16")


def _paged(gen, pages, page_size, heads, dim, dtype):
    k = torch.randn(pages, page_size, heads, dim, generator=gen).to(dtype)
    v = torch.randn(pages, page_size, heads, dim, generator=gen).to(dtype)
    table = torch.randperm(pages, generator=gen).to(torch.int32).view(1, pages)
    return k, v, table


def _cases(gen):
    """(name, kvcore call, torch call or None) per timed op: kvcore on a paged cache (page 16,
    random page order), torch's matmul form of the same attention on contiguous K/V (the
    reference a CPU user would otherwise write)."""
    import kvcore

    cases = []

    def gqa(batch, seq, dtype, tag):
        q = torch.randn(batch, 32, 128, generator=gen).to(dtype)
        k, v, table = _paged(gen, batch * seq // 16, 16, 8, 128, dtype)
        table = table.view(batch, seq // 16)
        lens = torch.full((batch,), seq, dtype=torch.int32)
        out = torch.empty_like(q)
        kc = k.view(batch, seq, 8, 128).permute(0, 2, 1, 3).contiguous()  # torch's contiguous copy
        vc = v.view(batch, seq, 8, 128).permute(0, 2, 1, 3).contiguous()
        qg = q.view(batch, 8, 4, 128)

        def torch_form():
            w = torch.softmax(torch.matmul(qg, kc.transpose(-1, -2)).float() * 128 ** -0.5, -1)
            return torch.matmul(w.to(dtype), vc)

        cases.append((f"gqa_decode B{batch} Hq32 Hkv8 D128 S{seq} {tag}",
                      lambda: kvcore.gqa_decode(q, k, v, table, lens, out=out), torch_form))

    gqa(1, 2048, torch.float32, "fp32")
    gqa(1, 8192, torch.bfloat16, "bf16")
    gqa(1, 8192, torch.float16, "fp16")
    gqa(4, 4096, torch.bfloat16, "bf16")

    # block_sparse_decode: every KV head picks 32 of the 128 pages (512 keys each).
    S, ps = 2048, 16
    lens = torch.tensor([S], dtype=torch.int32)
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        q = torch.randn(1, 32, 128, generator=gen).to(dtype)
        k, v, table = _paged(gen, S // ps, ps, 8, 128, dtype)
        sel = torch.stack([torch.randperm(S // ps, generator=gen)[:32] for _ in range(8)]).to(torch.int32).view(1, 8, 32)
        counts = torch.full((1, 8), 32, dtype=torch.int32)
        out = torch.empty_like(q)
        cases.append((f"block_sparse_decode B1 Hq32 Hkv8 D128 32 of 128 pages {tag}",
                      lambda q=q, k=k, v=v, t=table, s=sel, c=counts, o=out:
                      kvcore.block_sparse_decode(q, k, v, t, lens, s, c, out=o), None))

    # attention_scores: SnapKV-style window of 8 queries over a cache of 2048 keys.
    k, v, table = _paged(gen, S // ps, ps, 8, 128, torch.float32)
    qw = torch.randn(1, 8, 32, 128, generator=gen)
    cases.append(("attention_scores B1 W8 Hq32 Hkv8 D128 S2048 fp32",
                  lambda: kvcore.attention_scores(qw, k, table, lens), None))

    # mla_decode: H heads over a 576-wide latent (value = first 512 columns), page 64.
    def mla(batch, heads, seq, dtype, tag):
        pages = batch * seq // 64
        ql = torch.randn(batch, heads, 576, generator=gen).to(dtype)
        latent = torch.randn(pages, 64, 576, generator=gen).to(dtype)
        table = torch.randperm(pages, generator=gen).to(torch.int32).view(batch, seq // 64)
        mlens = torch.full((batch,), seq, dtype=torch.int32)
        out = torch.empty(batch, heads, 512, dtype=dtype)
        rows = latent[table.long()].reshape(batch, seq, 576)  # torch's contiguous copy

        def torch_form():
            w = torch.softmax(torch.bmm(ql, rows.transpose(1, 2)).float() * 576 ** -0.5, -1)
            return torch.bmm(w.to(dtype), rows[..., :512])

        cases.append((f"mla_decode B{batch} H{heads} Dk576 Dv512 S{seq} {tag}",
                      lambda: kvcore.mla_decode(ql, latent, table, mlens, scale=576 ** -0.5, out=out), torch_form))

    # token_decoder_attention: the Block Transformer token decoder over 512 blocks (out given);
    # torch's form is SDPA with the block's causal-plus-prefix mask over KV heads repeated per group.
    def token_decoder(blocks, length, prefix, hq, hkv, dtype, tag):
        q = torch.randn(blocks, length, hq, 128, generator=gen).to(dtype)
        k = torch.randn(blocks, prefix + length, hkv, 128, generator=gen).to(dtype)
        v = torch.randn(blocks, prefix + length, hkv, 128, generator=gen).to(dtype)
        out = torch.empty_like(q)
        mask = torch.ones(length, prefix + length, dtype=torch.bool).tril(prefix)
        qt = q.transpose(1, 2)
        kt = k.transpose(1, 2).repeat_interleave(hq // hkv, 1)
        vt = v.transpose(1, 2).repeat_interleave(hq // hkv, 1)

        def torch_form():
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)

        cases.append((f"token_decoder N{blocks} L{length} P{prefix} Hq{hq} Hkv{hkv} D128 {tag}",
                      lambda: kvcore.token_decoder_attention(q, k, v, out=out), torch_form))

    token_decoder(512, 16, 2, 16, 16, torch.float32, "fp32")
    token_decoder(512, 8, 1, 32, 8, torch.bfloat16, "bf16")

    mla(1, 16, 2048, torch.bfloat16, "bf16")
    mla(1, 128, 4096, torch.bfloat16, "bf16")
    mla(4, 16, 4096, torch.bfloat16, "bf16")
    mla(1, 128, 4096, torch.float32, "fp32")
    return cases


def _time(calls, reps: int) -> list[float]:
    """Median ms of each call, the calls alternating within every rep (so a noisy host slows them
    alike: the ratios hold better than the times). Alternating also keeps a large case's K/V out of
    the last-level cache (32 MB on the session-25 host): each call finds the other's copy there,
    as a model's decode step finds the other layers' caches."""
    for _ in range(3):
        for call in calls:
            call()
    times = [[] for _ in calls]
    for _ in range(reps):
        for call, t in zip(calls, times):
            t0 = time.perf_counter()
            call()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def _measure(reps: int, with_torch: bool) -> dict:
    import kvcore

    kvcore.set_validation(False)
    gen = torch.Generator().manual_seed(14)
    res = {"isa": kvcore.cpu_isa(), "threads": torch.get_num_threads(), "ms": {}, "torch_ms": {}}
    for name, call, torch_form in _cases(gen):
        if with_torch and torch_form is not None:
            res["ms"][name], res["torch_ms"][name] = _time([call, torch_form], reps)
        else:
            res["ms"][name] = _time([call], reps)[0]
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--isa", choices=ISAS, help="measure in this process (KVCORE_CPU_ISA must match)")
    ap.add_argument("--torch", action="store_true", help="with --isa: time torch's matmul forms too")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa:
        res = _measure(args.reps, args.torch)
        if res["isa"] != args.isa:
            print(f"KVCORE_CPU_ISA={os.environ.get('KVCORE_CPU_ISA')!r} runs {res['isa']}, not {args.isa}",
                  file=sys.stderr)
            return 1
        print(json.dumps(res))
        return 0

    rows = {}
    for isa in ISAS:
        env = dict(os.environ, KVCORE_CPU_ISA=isa)
        # torch's matmul forms alternate with kvcore's calls in every process (the ratio is taken
        # within one process, so the host's noise moves both).
        cmd = [sys.executable, __file__, "--isa", isa, "--reps", str(args.reps), "--threads", str(args.threads),
               "--torch"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            if "does not support" in done.stderr:  # this CPU lacks the copy's instructions
                continue
            print(f"{isa}: failed\n{done.stdout}{done.stderr}", file=sys.stderr)
            return 1
        rows[isa] = json.loads(done.stdout.strip().splitlines()[-1])
    widest = list(rows)[-1]  # what KVCORE_CPU_ISA=auto runs here
    torch_ms = rows[widest]["torch_ms"]
    print(f"median of {args.reps} calls, {rows['baseline']['threads']} threads, ms; torch: its matmul form, "
          f"timed alternating with {widest}'s calls; ratio: torch's time / {widest}'s")
    print(f"{'op':<56} " + " ".join(f"{isa:>10}" for isa in rows) + f" {'torch':>8} {'ratio':>6}")
    for name in rows["baseline"]["ms"]:
        cells = " ".join(f"{rows[isa]['ms'][name]:>10.3f}" for isa in rows)
        t = torch_ms.get(name)
        tail = f" {t:>8.3f} {t / rows[widest]['ms'][name]:>6.2f}" if t is not None else f" {'-':>8} {'-':>6}"
        print(f"{name:<56} {cells}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
