#!/usr/bin/env bash
# The decode_trace part of s30_call3.sh: ORDER 0 / 1 on random and in-order tables.
TRACE_ROWS="^B[0-9]|^ORDER|check|not run|rror"
. bench/calls/trace_run.sh
{
for t in random seq; do
  for ord in 0 1; do
    ORDER=$ord TABLE=$t run "B16 $t order $ord" lib8 16 8192 1
    ORDER=$ord TABLE=$t run "B1 S131072 $t order $ord" lib 1 131072 32
    ORDER=$ord TABLE=$t run "B32 Hq64 $t order $ord" lib 32 8192 1 64 8
  done
done
} > $OUT/order_ab.txt 2>&1
grep -E "^===|^B[0-9]|^ORDER|MISMATCH|not run|rror" $OUT/order_ab.txt | cut -c1-200
