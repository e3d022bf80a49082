#!/usr/bin/env bash
# Prepared in session 40, not run (its device time ran out). Call 3's B1 rows lost ~2.5 us against
# call 1's (B1 S32768 52.0-52.3 -> 54.6-55.1 us, in order too, where the new sort is skipped;
# cuDNN within 1% on both machines). decode_trace at B1 S32768 as the library plans it (4 warps,
# 3-stage ring, 32 splits of 64 pages), ORDER kernels, both tables, alternated twice: `old4`
# (12acf69's header), `fast4` (ce1d952's rewritten sort, five unrolled networks), `one4` (with
# bench/experiments/order_one_network.patch: only the 512-entry network, a third of the code),
# and the table's-order kernel; then B16 random with old8 / fast8 / one8. If fast4 is ~2.5 us
# slower than old4 here too, the change is the cause; if one4 recovers it, the code's size and
# layout are (bench/NOTES.md, session 40). Carry .exp: bins.tgz holds the binaries, built here
# with decode_trace.cu's nvcc line (-DTRACE_WARPS=4/8), `old` with 12acf69's gqa_decode.cuh and
# `one` with the patched one in an include directory ahead of csrc/include.
tar xzf .exp/bins.tgz -C .exp
TRACE_ROWS="^B[0-9]|^ORDER B|first copies|first tile|exit|rror"
. bench/calls/trace_run.sh
{
for rep in 1 2; do for t in seq random; do
  for v in old fast one; do TABLE=$t ORDER=1 run "B1 S32768 $t $v ORDER" ${v}4 1 32768 32 32 8 16 3; done
  TABLE=$t ORDER=0 run "B1 S32768 $t table kernel" old4 1 32768 32 32 8 16 3
done; done
for v in old fast one; do TABLE=random ORDER=1 run "B16 random $v ORDER" ${v}8 16 8192 1 32 8 16 2; done
} 2>&1 | sed -E 's/\(empty kernel.*//' | cut -c1-200
