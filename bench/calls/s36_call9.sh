#!/usr/bin/env bash
# Session 36, call 9 (an H100, carry .exp; no build): is B16's random-table cost (the 8-warp
# kernel in cache order: 174.5-174.9 us random against 173.6 in order, call 7) the 8 KV heads'
# CTAs of a sequence reading each page at different times? decode_trace built with
# bench/experiments/lockstep.patch: a CTA issues tile t + 1 only once every sibling (same
# sequence, other KV heads) has passed tile t - LAG - 1's barrier (one atomic a tile, its result
# read a tile later; a poll only when ahead). lib8_ls0 (LAG 0: at most a tile apart), lib8_ls2
# (LAG 2), against lib8, alternated, random tables, three reps; in order once each. Predicted: if
# drift between siblings is the cost, LAG 0 brings random towards 173.6 (up to -0.5%); if not,
# it loses what the waits cost.
. bench/calls/trace_run.sh
TRACE_ROWS='^B[0-9]|^ORDER|check|rror'
for rep in 1 2 3; do
  for v in "" _ls0 _ls2; do
    ORDER=1 TABLE=random run "B16 lib8$v rep $rep" lib8$v 16 8192 1 32 8 16 2
  done
done 2>&1 | sed 's/(empty kernel.*//' | tee $OUT/ls.log
for v in "" _ls0 _ls2; do
  ORDER=1 TABLE=seq run "B16 lib8$v in order" lib8$v 16 8192 1 32 8 16 2
done 2>&1 | sed 's/(empty kernel.*//' | tee -a $OUT/ls.log
