#!/usr/bin/env bash
# Session 36, call 1 (an H100, carry .exp; no build): two changes to the decode loops, timed with
# decode_trace against the same header without them, alternated, random tables.
# (a) The page-major kernel's ORDER instance (gqa_decode_page_major.cuh: each CTA visits its pages
#     in cache order, as the head kernel's ORDER instances do): PAGE_MAJOR=8:1 with PM_ORDER=1
#     times table order then cache order in one process, three reps at B128 S2048 (the library
#     runs page8 there), and once with the table in order (the ceiling). Predicted: random 1%
#     slower than in order in table order (session 35's library: 354.8 / 351.2); cache order
#     recovers most of it (~-0.8%), as it did for the head kernel at B16 (183.7 -> 180.2, in order
#     178.8).
# (b) K and V as separate cp.async groups in the head kernel (lib_kv, lib8_kv: -DKVCORE_EXP_KV_GROUPS,
#     bench/experiments/kv_groups.patch): the loop waits for K(t) before S = Q K^T, issues tile
#     t + STAGES - 1 right after it, and waits for V(t) (a second barrier) before P V. Predicted:
#     small; if anything a gain at the multi-wave points (B64, B128) from issuing the next tile
#     half a tile earlier, against the second barrier's cost. Controls: B32 Hq64 (2 stages
#     padded), B16 (8-warp), B1 S32768.
pad=102400
. bench/calls/trace_run.sh
TRACE_ROWS='^B[0-9]|^ORDER|check|rror'
for rep in 1 2 3; do
  PAGE_MAJOR=8:1 PM_ORDER=1 TABLE=random run "B128 page-major rep $rep" lib 128 2048 1 32 8 16 3
done 2>&1 | sed 's/(empty kernel.*//' | tee $OUT/pm.log
PAGE_MAJOR=8:1 PM_ORDER=1 TABLE=seq run "B128 page-major, table in order" lib 128 2048 1 32 8 16 3 2>&1 |
  sed 's/(empty kernel.*//' | tee -a $OUT/pm.log
for rep in 1 2; do
  for v in "" _kv; do
    ORDER=1 TABLE=random run "B64 lib$v" lib$v 64 4096 1 32 8 16 3
    ORDER=1 TABLE=random run "B128 lib$v" lib$v 128 2048 1 32 8 16 3
    SMEM_PAD=$pad ORDER=1 TABLE=random run "B32 Hq64 lib$v (2 stages padded)" lib$v 32 8192 1 64 8 16 2
    ORDER=1 TABLE=random run "B16 lib8$v" lib8$v 16 8192 1 32 8 16 2
    ORDER=1 TABLE=random run "B1 S32768 lib$v" lib$v 1 32768 32 32 8 16 3
  done
done 2>&1 | sed 's/(empty kernel.*//' | tee $OUT/kv.log
