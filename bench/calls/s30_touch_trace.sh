#!/usr/bin/env bash
# Session 30, call 2's decode_trace part (carry .exp: decode_trace.cu built as lib / lib8, and with
# -DKVCORE_PAGE_TOUCH as libT / lib8T; the nvcc line is in decode_trace.cu's header, 8 warps with
# -DTRACE_WARPS=8). Call 1 found a row-sorted random table as fast as an in-order one (B16 179.8
# against 179.0 us, random 183.5) and runs of 2 / 8 / 16 / 64 pages recovering the gap gradually
# (182.3 / 181.6 / 180.7 / 179.3): the cost follows how many distinct 2 MB regions the SMs touch
# at once, as address translation would. KVCORE_PAGE_TOUCH prefetches one L2 line of each page of
# tile t + STAGES at the end of tile t, a wait before its copies. Predicted, if the cost is a
# translation's latency on the copies: random close to in-order (B16 -3 to -4 us); unchanged if
# it is the translation's throughput or not translation at all.
# Measured: no change (bench/results/h100-2026-12-05-s30/call2/touch_trace.txt), so the code was
# removed after the run: at the end of tile t's loop body, thread 0 of each 128 issued
# `prefetch.global.L2` to the first row of each K and V page of tile t + STAGES (the `pages` entries
# of its leading copy slots), under #ifdef KVCORE_PAGE_TOUCH in gqa_decode.cuh.
TRACE_ROWS="^B[0-9]|check|not run|rror"
. bench/calls/trace_run.sh
{
for rep in 1 2; do
  for t in random seq; do
    for v in "" T; do
      TABLE=$t run "B16 $t $v" lib8$v 16 8192 1
      TABLE=$t run "B1 S131072 $t $v" lib$v 1 131072 32
      if [ $rep = 1 ]; then
        TABLE=$t run "B64 $t $v" lib$v 64 4096 1
        TABLE=$t run "B32 Hq64 $t $v" lib$v 32 8192 1 64 8
        TABLE=$t run "B1 S32768 $t $v" lib$v 1 32768 32
      fi
    done
  done
done
} > $OUT/touch_trace.txt 2>&1
grep -E "^===|^B[0-9]|MISMATCH|not run|rror" $OUT/touch_trace.txt | cut -c1-200
