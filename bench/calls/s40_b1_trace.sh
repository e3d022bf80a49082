#!/usr/bin/env bash
# Prepared in session 40, not run (its device time ran out). Call 3's B1 rows lost ~2.5 us against
# call 1's (B1 S32768 52.0-52.3 -> 54.6-55.1 us, in order too, where the new sort is skipped;
# cuDNN within 1% on both machines). decode_trace (carry .exp: bins.tgz as built for
# s40_call3.sh, `old4` = 12acf69's header, `fast4` = the rewritten sort) at B1 S32768 as the
# library plans it (4 warps, 3-stage ring, 32 splits of 64 pages), ORDER kernels, both tables,
# alternated twice. If fast4 is ~2.5 us slower here too, the change is the cause (then look at the
# code between the sort and the loop: bench/NOTES.md, session 40); if not, the machine was.
tar xzf .exp/bins.tgz -C .exp
TRACE_ROWS="^B[0-9]|^ORDER B|first copies|first tile|exit|rror"
. bench/calls/trace_run.sh
for rep in 1 2; do for t in seq random; do
  TABLE=$t ORDER=1 run "B1 S32768 $t old ORDER" old4 1 32768 32 32 8 16 3
  TABLE=$t ORDER=1 run "B1 S32768 $t fast ORDER" fast4 1 32768 32 32 8 16 3
  TABLE=$t ORDER=0 run "B1 S32768 $t table kernel" old4 1 32768 32 32 8 16 3
done; done 2>&1 | sed -E 's/\(empty kernel.*//' | cut -c1-200
