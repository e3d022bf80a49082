#!/usr/bin/env bash
# Session 36, call 3 (an H100, carry .exp; no build): call 2 found B64 S4096 as the page-major
# kernel with 4 KV heads a CTA, unsplit (128 CTAs, one an SM), in cache order at 340.5-341.1 us
# against the head kernel's 344.2-344.6. Here: the same with the table in order (is cache order
# still level with it?), and B32 Hq64 (group 8) as 2 heads x 1 split (128 CTAs of 2 warps, one an
# SM: 32 KB in flight an SM) and 2 x 2, 4 x 2 (split merges), against the head kernel's 2-stage
# ring. Predicted: B64 in order ~340.5 both; B32 Hq64 H2 short of bytes in flight (~16 KB a
# stage), likely slower than the head kernel's 342.
. bench/calls/trace_run.sh
TRACE_ROWS='^B[0-9]|^ORDER|check|rror'
for rep in 1 2; do
  ORDER=1 PM_ORDER=1 TABLE=seq PAGE_MAJOR=4:1 run "B64 in order rep $rep" lib 64 4096 1 32 8 16 3
  ORDER=1 PM_ORDER=1 TABLE=random PAGE_MAJOR=4:1 run "B64 rep $rep" lib 64 4096 1 32 8 16 3
  SMEM_PAD=102400 ORDER=1 PM_ORDER=1 TABLE=random PAGE_MAJOR=2:1,2:2,4:2 run "B32 Hq64 rep $rep" lib 32 8192 1 64 8 16 2
  ORDER=1 PM_ORDER=1 TABLE=random PAGE_MAJOR=2:2,4:1 run "B16 rep $rep" lib8 16 8192 1 32 8 16 2
done 2>&1 | sed 's/(empty kernel.*//' | tee $OUT/pm3.log
