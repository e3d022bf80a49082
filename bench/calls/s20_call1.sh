#!/usr/bin/env bash
# Prepared in session 19 (no device left for it). Carry .peers and .exp; build the decode_trace
# binary first on the CPU machine (~25 s):
#   nvcc -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
#     -Icsrc/include bench/experiments/decode_trace.cu -o .exp/lib
# 1. Does the page order's cost come from the kernel's per-head rows? decode_trace now also times
#    a plain read in the kernel's pattern (a CTA per KV head and split, 256-byte rows 2 KB apart:
#    "per-head paged read") next to the whole-page read (one CTA a page, all heads), each at a
#    random and a sequential table. If the per-head read loses to random order what the kernel
#    does (~1.8 us at B16) while the whole-page read loses nothing, a kernel that reads whole
#    pages (bench/NOTES.md, session 19's next steps) is worth building; if not, it is not.
# 2. bench/calls/s19_call4.sh's stages: build, the decode table again (is B1 S131072's lead over
#    cuDNN, 130.2 against 130.8 us in session 19, real?), the automatic split check.
o=/tmp/c
rm -rf $o; mkdir -p $o  # (a machine can keep /tmp from an earlier call)
TRACE_ROWS="^B[0-9]|check|rror"
. bench/calls/trace_run.sh
{
for rep in 1 2; do
  for t in random seq; do
    TABLE=$t run "B16 2 splits $t" lib 16 8192 2
    TABLE=$t run "B1 S32768 $t" lib 1 32768 32
    TABLE=$t run "B32 Hq64 $t" lib 32 8192 1 64 8
    TABLE=$t run "B64 $t" lib 64 4096 1
  done
done
} > $OUT/trace.txt 2>&1
grep -E "^===|^B[0-9]" $OUT/trace.txt | paste - - | sed -E 's/ \(empty kernel [0-9.]+ us; /; /' | cut -c1-330
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-480} build \
 "bench:decode:100" \
 "run:splits:60:python3 bench/experiments/auto_splits_check.py $o/splits.json"
