#!/usr/bin/env bash
# Session 36, call 2 (an H100, carry .exp; no build): where else the page-major kernel in cache
# order (call 1: B128 342.3 -> 340.7 us, ahead of the head kernel's 345.2 and of B64's 344.5 on
# the same bytes) would beat the head kernel that the library runs. decode_trace with ORDER=1 (the
# head kernel in cache order, as the library runs it) and PAGE_MAJOR with PM_ORDER=1 (each entry
# in table then cache order), random tables, three reps: B64 S4096 as 8 heads x 2 splits (128
# CTAs, the B128 grid's work per CTA plus a two-way split merge) and 4 heads x 1 / 2 splits; B32
# Hq64 as 8 heads x 4 splits; B16 as 8 heads x 8 splits; B1 S131072 as 8 heads x 128 splits.
# Predicted: B64 8:2 near B128's 340.7 plus the merge (~1 us), i.e. ahead of the head kernel's
# 344.5; the others unknown (session 28: page-major behind wherever it needs a split merge, in
# table order).
. bench/calls/trace_run.sh
TRACE_ROWS='^B[0-9]|^ORDER|check|rror'
for rep in 1 2 3; do
  ORDER=1 PM_ORDER=1 TABLE=random PAGE_MAJOR=8:2,4:1,4:2 run "B64 rep $rep" lib 64 4096 1 32 8 16 3
  SMEM_PAD=102400 ORDER=1 PM_ORDER=1 TABLE=random PAGE_MAJOR=8:4 run "B32 Hq64 rep $rep" lib 32 8192 1 64 8 16 2
  ORDER=1 PM_ORDER=1 TABLE=random PAGE_MAJOR=8:8 run "B16 rep $rep" lib8 16 8192 1 32 8 16 2
  ORDER=1 PM_ORDER=1 TABLE=random PAGE_MAJOR=8:128,8:64 run "B1 S131072 rep $rep" lib 1 131072 32 32 8 16 3
  ORDER=1 PM_ORDER=1 TABLE=random PAGE_MAJOR=8:1 run "B128 rep $rep" lib 128 2048 1 32 8 16 3
done 2>&1 | sed 's/(empty kernel.*//' | tee $OUT/pm2.log
