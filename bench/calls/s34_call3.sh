#!/usr/bin/env bash
# Session 34, call 3 (carry .exp). Call 2 timed the 8-warp B16 kernel with a 2-stage ring (128 KB
# of tiles, one in flight while one is computed) at 175.8 us against 178.7-178.8 with the
# library's 3 stages (pages in order, one sample). Before the library changes: alternated
# repeats, random tables with ORDER (the library's B16 kernel), and the 4-warp kernel's stage
# count at the grid points it serves (B64 S4096, B32 Hq64 S8192, B1 S32768 with 32 splits).
# Predicted: if 2 stages holds, B16 ~3 us faster on both tables; the 4-warp kernel (two CTAs an
# SM, 64 KB of tiles each at 2 stages) unknown.
o=/tmp/c
rm -rf $o; mkdir -p $o
trace=". bench/calls/trace_run.sh; TRACE_ROWS='^B[0-9]|^ORDER|check|rror'; \
 for rep in 1 2 3; do for st in 3 2; do TABLE=seq run \"B16 seq stages \$st\" lib8 16 8192 1 32 8 16 \$st; done; done; \
 for rep in 1 2; do for st in 3 2; do ORDER=1 TABLE=random run \"B16 random order stages \$st\" lib8 16 8192 1 32 8 16 \$st; done; done; \
 for rep in 1 2; do for st in 3 2 4; do ORDER=1 TABLE=random run \"B64 S4096 random order stages \$st\" lib 64 4096 1 32 8 16 \$st; \
 ORDER=1 TABLE=random run \"B32 Hq64 random order stages \$st\" lib 32 8192 1 64 8 16 \$st; \
 ORDER=1 TABLE=random run \"B1 S32768 32 splits random order stages \$st\" lib 1 32768 32 32 8 16 \$st; done; done"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-150} "run:trace:140:$trace"
grep -E "^===|^B|^ORDER" $o/trace.log | sed 's/(empty kernel.*//'
