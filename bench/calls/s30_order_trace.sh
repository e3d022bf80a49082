#!/usr/bin/env bash
# The decode_trace part of s30_call1.sh (prepared in session 29, not run): the block table's page
# order at B16 (8-warp kernel, one split) and B1 S131072 (4-warp, 32 splits), two reps.
TRACE_ROWS="^B[0-9]|check|not run|rror"
. bench/calls/trace_run.sh
{
for rep in 1 2; do
  for t in random seq rowsorted cluster2 cluster8 cluster16 cluster64; do
    TABLE=$t run "B16 $t" lib8 16 8192 1
    TABLE=$t run "B1 S131072 $t" lib 1 131072 32
  done
done
} > $OUT/order_trace.txt 2>&1
grep -E "^===|^B[0-9]|MISMATCH|not run|rror" $OUT/order_trace.txt | cut -c1-300
