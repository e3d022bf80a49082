#!/usr/bin/env bash
# Session 41 call 1: session 40's prepared B1 trace (bench/calls/s40_b1_trace.sh) with a fourth
# variant, `noin`: bench/experiments/order_noinline.patch against ce1d952 (the five networks in a
# __noinline__ function, entries stashed in shared memory around the call, so that the main
# loop's code follows the prologue's), built with decode_trace.cu's nvcc line and the patched
# header ahead of csrc/include. Carry .exp.
tar xzf .exp/bins.tgz -C .exp
TRACE_ROWS="^B[0-9]|^ORDER B|first copies|first tile|exit|rror"
. bench/calls/trace_run.sh
{
for rep in 1 2; do for t in seq random; do
  for v in old fast one noin; do TABLE=$t ORDER=1 run "B1 S32768 $t $v ORDER" ${v}4 1 32768 32 32 8 16 3; done
  TABLE=$t ORDER=0 run "B1 S32768 $t table kernel" old4 1 32768 32 32 8 16 3
done; done
for v in old fast one noin; do TABLE=random ORDER=1 run "B16 random $v ORDER" ${v}8 16 8192 1 32 8 16 2; done
} 2>&1 | sed -E 's/\(empty kernel.*//' | cut -c1-200
