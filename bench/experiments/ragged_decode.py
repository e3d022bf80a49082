"""gqa_decode on ragged batches: does a kernel picked from shapes alone lose where lengths differ?

The launcher chooses the kernel and split count from shapes only (no look at seq_lens, so no host
sync and a fixed choice for a captured graph). Two choices put a whole sequence's KV head, or all
of its KV heads, on one CTA with no split: the 8-warp kernel at about one (sequence, KV head) pair
per SM (B16 Hkv8, the library's default there), and the page-major kernel with 8 heads a CTA
(KVCORE_DECODE_KERNEL=page8, which session 22 measured 2% ahead at B128 S2048 with equal lengths).
With unequal lengths the longest sequence sets the time of such a grid: one SM reads all of it,
where the 4-warp kernel's smaller CTAs (or its splits) spread it over more SMs. By counting, a
page-major CTA of 8 heads carries 4x the bytes of a 4-warp CTA that shares its SM with another:
with lengths uniform in [1, S] page-major should take about the equal-lengths time while the
4-warp kernel takes about half. The split count, too, follows the block table's width: "short"
(every sequence at 1/64 of the capacity, as when the table is sized for the model's context)
left most of an automatic split count's CTAs without keys until session 24, when each
sequence's splits began to share its own keys (split_range.h); it should now be near the best
forced count.

    KVCORE_DECODE_KERNEL=head  python bench/experiments/ragged_decode.py [OUT.json]
    KVCORE_DECODE_KERNEL=page8 python bench/experiments/ragged_decode.py [OUT.json]
    KVCORE_DECODE_WARPS=4      python bench/experiments/ragged_decode.py [OUT.json]
    python bench/experiments/ragged_decode.py --splits 2,4,8,16 [OUT.json]

Every shape and pattern is timed with the automatic count planned from shapes ("auto") and from a
host copy of the lengths ("hint": gqa_decode's plan_seq_lens, session 27). Since session 28 the
hint of equal lengths also picks the kernel under the default KVCORE_DECODE_KERNEL=auto: the
page-major kernel where its unsplit 8-head CTAs fill one wave (B128 Hkv8's "equal" and "short"
rows), so there the "hint" column times that kernel (`head` keeps the other).


(the switches are read once per process, hence one process each; --splits also times those
forced split counts, which run the 4-warp head kernel unless KVCORE_DECODE_WARPS=8: what a split count chosen from the
lengths, as FlashInfer's host-side plan does, would gain). For each shape and length pattern it
prints the median time (harness Timer: CUDA events, L2 flushed) and the bandwidth of
the bytes the lengths actually need, after checking the output against kvcore.reference.
"""
from __future__ import annotations

import json
import os
import sys

import torch

import kvcore
from kvcore import reference
from kvcore.bench import decode, harness

# (batch, num_kv_heads, capacity in tokens), Hq = 4 x Hkv, D 128, page 16: the decode table's
# B16, B128, B1 S131072 and B64 rows ("bench": the lengths of its ragged rows). (At B1
# "one-long" is "equal" and "uniform" one shorter sequence: that row is there for "short".)
SHAPES = [(16, 8, 8192), (128, 8, 2048), (1, 8, 131072), (64, 8, 4096)]
PATTERNS = ("equal", "uniform", "one-long", "short", "bench")


def lengths(pattern: str, batch: int, cap: int, gen: torch.Generator, short_div: int = 64) -> torch.Tensor:
    """Sequence lengths for one pattern, all within the block table's capacity ("short": every
    sequence at 1 / short_div of it; bench/experiments/ragged_mla.py takes 16)."""
    if pattern == "equal":
        return torch.full((batch,), cap, dtype=torch.int32)
    if pattern == "uniform":  # uniform in [1, cap]
        return torch.randint(1, cap + 1, (batch,), generator=gen, dtype=torch.int32)
    if pattern == "one-long":  # one sequence at the capacity, the rest at an eighth of it
        lens = torch.full((batch,), cap // 8, dtype=torch.int32)
        lens[batch // 2] = cap
        return lens
    if pattern == "short":  # every sequence at a fraction of the capacity: a block table sized for
        return torch.full((batch,), cap // short_div, dtype=torch.int32)  # the model's context, not the batch
    if pattern == "bench":  # the decode table's ragged rows' lengths (B16 S8192, B64 S4096 there)
        return torch.tensor(decode.DecodeCase(batch, 32, 8, 128, cap, ragged=True).seq_lens(), dtype=torch.int32)
    raise ValueError(f"unknown pattern {pattern!r}")


def checked_time(call, out: torch.Tensor, ref: torch.Tensor, timer, rel_tol: float) -> tuple:
    """Poison ``out``, run ``call`` once and compare ``out`` with ``ref`` (max error within
    ``rel_tol`` of ``ref``'s largest value, at least 1; a NaN fails), then time ``call``:
    (max error, ok, ms). Shared by this folder's decode probes."""
    out.fill_(float("nan"))
    call()
    err = (out.float() - ref).abs().max().item()
    ok = err <= rel_tol * max(1.0, ref.abs().max().item())  # False for a NaN too
    return err, ok, timer(call)


def take_option(argv: list, name: str) -> tuple:
    """``name VALUE`` out of argv: (VALUE, None without the option; the other arguments)."""
    if name not in argv:
        return None, argv
    at = argv.index(name)
    if at + 1 >= len(argv):
        raise SystemExit(f"{name} needs a value")
    return argv[at + 1], argv[:at] + argv[at + 2:]


def take_splits_arg(argv: list) -> tuple:
    """``--splits N,N,...`` out of argv: (the forced split counts, empty without it; the other
    arguments). Shared by this folder's decode probes."""
    value, argv = take_option(argv, "--splits")
    return ([] if value is None else [int(n) for n in value.split(",")]), argv


def report_row(rows: list, name: str, width: int, pattern: str, splits, tokens: int, ms: float, nbytes: int,
               err, ok: bool) -> None:
    """Appends one timed call's row to `rows` and prints it (`name` padded to `width`). Shared with
    ragged_mla.py."""
    row = {"case": name, "pattern": pattern, "splits": splits, "tokens": tokens, "us": ms * 1e3,
           "gbps": nbytes / (ms * 1e-3) / 1e9, "max_err": err if ok else str(err), "ok": ok}
    rows.append(row)
    print(f"{name:{width}s} {pattern:9s} splits {'auto' if splits == 0 else splits:>4} {tokens:8d} tokens "
          f"{ms * 1e3:8.1f} us {row['gbps']:7.0f} GB/s  max err {err:.1e}{'' if ok else '  MISMATCH'}", flush=True)


def main(argv: list) -> int:
    counts, argv = take_splits_arg(argv)
    forced = [0] + counts
    if len(argv) > 1:
        raise SystemExit(f"usage: ragged_decode.py [--splits N,N,...] [OUT.json]; got {argv}")
    dev = torch.device("cuda")
    timer = harness.Timer(dev)
    kvcore.set_validation(False)
    ws = kvcore.decode_workspace(dev)
    gen = torch.Generator().manual_seed(7)
    switches = {k: os.environ.get(k, "") for k in ("KVCORE_DECODE_KERNEL", "KVCORE_DECODE_WARPS")}
    rows = []
    failed = False
    for b, hkv, cap in SHAPES:
        case = decode.DecodeCase(b, 4 * hkv, hkv, 128, cap)
        x = decode.make_inputs(case, dev)
        out = torch.empty_like(x.q)
        k32, v32 = x.k_cache.float(), x.v_cache.float()  # the reference's inputs, once per shape
        for pattern in PATTERNS:
            seq_lens = lengths(pattern, b, cap, gen).to(dev)

            ref, _ = reference.gqa_decode(x.q.float(), k32, v32, x.block_table, seq_lens, scale=x.scale)
            host_lens = seq_lens.tolist()
            for splits in [0, "hint"] + forced[1:]:
                # "hint": the automatic count planned from a host copy of the lengths (plan_seq_lens)
                kw = {"plan_seq_lens": host_lens} if splits == "hint" else {"num_splits": splits}

                def call() -> None:
                    kvcore.gqa_decode(x.q, x.k_cache, x.v_cache, x.block_table, seq_lens, scale=x.scale, out=out,
                                      workspace=ws, **kw)

                err, ok, ms = checked_time(call, out, ref, timer, 2e-2)
                failed |= not ok
                tokens = int(seq_lens.sum().item())
                nbytes = tokens * hkv * 128 * 2 * 2 + 2 * out.numel() * 2
                report_row(rows, case.name, 36, pattern, splits, tokens, ms, nbytes, err, ok)
        del x, out, k32, v32
    if argv:
        with open(argv[0], "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(dev), "switches": switches, "rows": rows}, f, indent=1)
    return 1 if failed else 0  # a mismatch fails the stage


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
