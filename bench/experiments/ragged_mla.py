"""mla_decode on ragged batches: the split count from shapes alone, from a host copy of the
lengths (plan_seq_lens), and forced counts.

Without a hint mla_decode plans its split count as if every sequence filled the block table
(no host sync; fixed under graph capture), so a batch of very unequal lengths leaves its long
sequences on few CTAs, as gqa_decode did before session 27 (bench/experiments/ragged_decode.py).
With plan_seq_lens it plans from the keys the batch attends: at up to 16 heads with
split_plan.h's choose_splits_hinted (the rule measured on gqa_decode); at more heads, where the
kernels are compute-bound, with choose_splits_dominant (session 29, from this script's forced
counts: the shapes' count, doubled where one long sequence dominates, so "hint" equals "auto"
on the other rows; session 28's call 3 ran the H128 rows with gqa_decode's rule). For each shape and length pattern this
prints the median time (harness Timer: CUDA events, L2 flushed) of the automatic count ("auto"),
the hinted one ("hint") and forced counts, after checking each output against kvcore.reference.

    python bench/experiments/ragged_mla.py [--splits 2,4,8] [--shapes BxHxCAP,...] [--patterns P,...] [OUT.json]

--shapes replaces SHAPES (e.g. --shapes 1x128x4096,4x128x4096: small batches of the "short"
pattern, where choose_splits_dominant's short-lengths cap leaves a few CTAs; session 30);
--patterns times only those of PATTERNS (e.g. --patterns short; session 31).
"""
from __future__ import annotations

import json
import sys

import torch

import kvcore
from kvcore import reference
from kvcore.bench import harness
from kvcore.bench.mla import RANK, MlaDecodeCase, make_decode_inputs
# (this folder: the script's own directory is on sys.path)
from ragged_decode import checked_time, lengths, report_row, take_option, take_splits_arg

# (batch, heads, capacity in tokens), page 64, DeepSeek's widths: the MLA bench's B32 H128 and
# B64 H16 rows, B128 H128 at a shorter table, B16 H128 at a long one, and B64 H32 (the 32-head
# mma.sync kernel on Hopper).
SHAPES = [(32, 128, 4096), (64, 16, 8192), (128, 128, 1024), (16, 128, 16384), (64, 32, 4096)]
PATTERNS = ("equal", "uniform", "one-long", "short")  # ragged_decode.py's, "short" at 1/16 of the table


def take_shapes_arg(argv: list) -> tuple:
    """(--shapes' (batch, heads, capacity) list or SHAPES, argv without the option)."""
    value, argv = take_option(argv, "--shapes")
    if value is None:
        return SHAPES, argv
    try:
        shapes = [tuple(int(v) for v in item.split("x")) for item in value.split(",")]
    except ValueError:
        raise SystemExit(f"--shapes: not BxHxCAP[,BxHxCAP...]: {value!r}") from None
    if any(len(t) != 3 or min(t) <= 0 for t in shapes):
        raise SystemExit(f"--shapes: each item is three positive integers BxHxCAP: {value!r}")
    return shapes, argv


def take_patterns_arg(argv: list) -> tuple:
    """(--patterns' names or PATTERNS, argv without the option)."""
    value, argv = take_option(argv, "--patterns")
    if value is None:
        return PATTERNS, argv
    names = tuple(value.split(","))
    unknown = [n for n in names if n not in PATTERNS]
    if unknown:
        raise SystemExit(f"--patterns: {unknown} not among {PATTERNS}")
    return names, argv


def main(argv: list) -> int:
    shapes, argv = take_shapes_arg(argv)
    patterns, argv = take_patterns_arg(argv)
    forced, argv = take_splits_arg(argv)
    if len(argv) > 1:
        raise SystemExit("usage: ragged_mla.py [--splits N,N,...] [--shapes BxHxCAP,...] [--patterns P,...] [OUT.json];"
                         f" got {argv}")
    dev = torch.device("cuda")
    timer = harness.Timer(dev)
    kvcore.set_validation(False)
    ws = kvcore.decode_workspace(dev, 1 << 29)  # room for the forced counts' partials
    gen = torch.Generator().manual_seed(11)
    rows = []
    failed = False
    for b, h, cap in shapes:
        case = MlaDecodeCase(b, h, cap)
        x = make_decode_inputs(case, dev)
        out = torch.empty(b, h, RANK, dtype=x.q.dtype, device=dev)
        for pattern in patterns:
            seq_lens = lengths(pattern, b, cap, gen, short_div=16).to(dev)
            ref, _ = reference.mla_decode(x.q, x.latent, x.block_table, seq_lens, x.scale, RANK)
            host_lens = seq_lens.tolist()
            for splits in [0, "hint"] + forced:
                kw = {"plan_seq_lens": host_lens} if splits == "hint" else {"num_splits": splits}

                def call() -> None:
                    kvcore.mla_decode(x.q, x.latent, x.block_table, seq_lens, scale=x.scale, out=out, workspace=ws,
                                      **kw)

                err, ok, ms = checked_time(call, out, ref, timer, 3e-2)
                failed |= not ok
                tokens = int(seq_lens.sum().item())
                nbytes = tokens * x.latent.shape[-1] * 2
                report_row(rows, case.name, 32, pattern, splits, tokens, ms, nbytes, err, ok)
            del ref
        del x, out
        torch.cuda.empty_cache()
    if argv:
        with open(argv[0], "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(dev), "rows": rows}, f, indent=1)
    return 1 if failed else 0  # a mismatch fails the stage


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
