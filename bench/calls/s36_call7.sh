#!/usr/bin/env bash
# Session 36, call 7 (an H100, carry .exp; no build): B16 S8192 is the point left behind cuDNN,
# whose B16 grid is 128 CTAs of 4 warps, one per (sequence, KV head). kvcore's auto runs the 8-warp
# kernel there (128 CTAs of 8 warps, 128-token tiles, 2 stages). Here the 4-warp kernel unsplit
# (the same grid as cuDNN's: 64-token tiles) with 3 stages, 2 stages, and 4 stages (4 x 32 KB,
# one CTA an SM anyway), against the 8-warp kernel, random tables in cache order, three reps, and
# once in order. Predicted: the 8-warp kernel keeps its lead (session 17: two 4-warp splits a pair
# were 1.4% slower than one 8-warp CTA); the 4-warp unsplit grid is untimed.
. bench/calls/trace_run.sh
TRACE_ROWS='^B[0-9]|^ORDER|check|rror'
for rep in 1 2 3; do
  ORDER=1 TABLE=random run "B16 8-warp rep $rep" lib8 16 8192 1 32 8 16 2
  ORDER=1 TABLE=random run "B16 4-warp 3 stages rep $rep" lib 16 8192 1 32 8 16 3
  ORDER=1 TABLE=random run "B16 4-warp 2 stages rep $rep" lib 16 8192 1 32 8 16 2
  ORDER=1 TABLE=random run "B16 4-warp 4 stages rep $rep" lib 16 8192 1 32 8 16 4
done 2>&1 | sed 's/(empty kernel.*//' | tee $OUT/b16w.log
ORDER=1 TABLE=seq run "B16 8-warp in order" lib8 16 8192 1 32 8 16 2 2>&1 | sed 's/(empty kernel.*//' | tee -a $OUT/b16w.log
ORDER=1 TABLE=seq run "B16 4-warp 3 stages in order" lib 16 8192 1 32 8 16 3 2>&1 | sed 's/(empty kernel.*//' | tee -a $OUT/b16w.log
