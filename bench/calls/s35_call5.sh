#!/usr/bin/env bash
# Session 35, call 5 (an H100, carry .exp; no build): the warp-rows experiment. decode_trace built
# with bench/experiments/warp_rows.patch applied and -DKVCORE_DECODE_WARP_ROWS=1 (lib_wr, lib8_wr;
# lib and lib8 from the same header without the define): each warp copies the 16 rows it computes and
# a tile waits at __syncwarp instead of a block barrier. Alternated against the same code without
# it (lib, lib8), random tables with the page sort (the library's kernels), two reps: B64 S4096
# and B128 S2048 (4-warp, 3 stages: the multi-wave points behind cuDNN), B32 Hq64 (4-warp, 2
# stages padded: the library's choice there), B16 (8-warp, 2 stages), B1 S32768 (32 splits, 3
# stages). Predicted: if block barriers cost bytes in flight, the multi-wave points gain most
# (0.5-1%); if not, nothing moves. The check lines compare each run with the one-split output and
# a host reference.
pad=102400
. bench/calls/trace_run.sh
TRACE_ROWS='^B[0-9]|^ORDER|check|rror'
for rep in 1 2; do
  for v in "" _wr; do
    ORDER=1 TABLE=random run "B64 lib$v" lib$v 64 4096 1 32 8 16 3
    ORDER=1 TABLE=random run "B128 lib$v" lib$v 128 2048 1 32 8 16 3
    SMEM_PAD=$pad ORDER=1 TABLE=random run "B32 Hq64 lib$v (2 stages padded)" lib$v 32 8192 1 64 8 16 2
    ORDER=1 TABLE=random run "B16 lib8$v" lib8$v 16 8192 1 32 8 16 2
    ORDER=1 TABLE=random run "B1 S32768 lib$v" lib$v 1 32768 32 32 8 16 3
  done
done 2>&1 | sed 's/(empty kernel.*//' | tee $OUT/wr.log
