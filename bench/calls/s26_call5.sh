#!/usr/bin/env bash
# Prepared in session 26 (its device time ran out before it could run). Carry .exp, built first
# on the CPU machine at this code (~1 min):
#   F="-std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Icsrc/include"
#   nvcc $F bench/experiments/decode_trace.cu -o .exp/lib
#   nvcc $F -DTRACE_WARPS=8 bench/experiments/decode_trace.cu -o .exp/lib8
# (lib: the 4-warp kernel; lib8: the 8-warp one, the library's pick at B16). Where B16's 7 us to cuDNN go on
# an H100: decode_trace's kernel time next to its plain reads (one-shot K and V, whole-page paged
# read, per-head paged read) at a random and a sequential block table, B16 (8 warps, the
# library's pick; and 2 splits of 4 warps), B1 S32768, B1 S131072 and B64; twice.
TRACE_ROWS="^B[0-9]|check|rror|not run"
. bench/calls/trace_run.sh
{
for rep in 1 2; do
  for t in random seq; do
    TABLE=$t run "B16 8 warps 1 split $t" lib8 16 8192 1
    TABLE=$t run "B16 2 splits $t" lib 16 8192 2
    TABLE=$t run "B1 S32768 $t" lib 1 32768 32
    TABLE=$t run "B1 S131072 $t" lib 1 131072 32
    TABLE=$t run "B64 $t" lib 64 4096 1
  done
done
} > $OUT/trace.txt 2>&1
grep -E "^===|^B[0-9]|MISMATCH|not run|rror" $OUT/trace.txt | cut -c1-330
