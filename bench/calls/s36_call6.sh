#!/usr/bin/env bash
# Session 36, call 6 (an H100, carry .exp; no build): B16 S8192 is the point left behind cuDNN
# (calls 4-5 medians 1.003 / 1.006 with random pages, 0.996 / 0.998 in order). Does a page-major
# grid of 128 CTAs (one an SM, pages in cache order) beat the 8-warp head kernel there, as it did
# at B64 and B128: 4 heads x 4 splits (2048 tokens a CTA), 8 x 8 (1024), 2 x 8 (256 CTAs), against
# the 8-warp kernel in cache order, random tables, three reps; then in order once. Predicted from
# call 2 (8 x 8: 178.7-179.0 against 174.8): the split merge and the shorter CTAs cost more than
# the page-major read gains; 4 x 4 perhaps ~176.
. bench/calls/trace_run.sh
TRACE_ROWS='^B[0-9]|^ORDER|check|rror'
for rep in 1 2 3; do
  ORDER=1 PM_ORDER=1 TABLE=random PAGE_MAJOR=4:4,8:8,2:8 run "B16 rep $rep" lib8 16 8192 1 32 8 16 2
done 2>&1 | sed 's/(empty kernel.*//' | tee $OUT/b16.log
ORDER=1 PM_ORDER=1 TABLE=seq PAGE_MAJOR=4:4 run "B16 in order" lib8 16 8192 1 32 8 16 2 2>&1 |
  sed 's/(empty kernel.*//' | tee -a $OUT/b16.log
