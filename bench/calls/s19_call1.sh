#!/usr/bin/env bash
# Prepared in session 18, whose device was withdrawn before it could run (bench/NOTES.md, session
# 18); ran as session 19's call 1 at e13e6f1 (the switches below were removed after it: the step
# loads and warp sync are now the code, batch 36 and lse pairs were dropped).
# No build: decode_trace binaries in .exp/, carried. Build them first on the CPU machine:
#   for v in "mb 32 0 0 0" "mst 32 1 0 0" "mws 32 0 1 0" "mall 32 1 1 0" "mb36 36 1 0 0" "mall36 36 1 1 0" \
#            "mp36 36 1 1 1"; do
#     set -- $v; nvcc -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr \
#       -gencode=arch=compute_90a,code=sm_90a -Icsrc/include -DKVCORE_MERGE_BATCH_D128=$2 \
#       -DKVCORE_MERGE_STEP_LOADS=$3 -DKVCORE_MERGE_WARP_SYNC=$4 -DKVCORE_MERGE_LSE_PAIRS=$5 \
#       bench/experiments/decode_trace.cu -o .exp/$1; done
# The split merge's phases (trace slots 5 and 7-12) and three trims of its path, all with the
# same arithmetic in the same order (the same bits):
#   mst:  the partials addressed by one stepped pointer (~4 instructions a load instead of ~13,
#         which issue even where the load is predicated off: ~380 before the lse loads);
#   mws:  at D 128, __syncwarp instead of the barrier between the weights and the combine (a
#         warp combines only the heads whose weights it worked out);
#   mall: both; mb: neither (the library's code, with the stamps);
#   mb36 / mall36: a merge batch of 36 splits at D 128 (with mst / with both), so B1 Hkv8's 33
#         splits (B1 S131072) take one batch, not two (call 4: combine 1.9-2.1 us against 0.4);
#   mp36: mall36 with a lane's lse entries loaded two at a time (at 33 splits lane 0's two were
#         two round trips in a row: arrival -> weights 1.8-1.9 us against 1.3).
# And KV_LAYOUT (decode_trace's env): V right after K in one allocation, or further apart.
o=$OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > $o/gpu.txt 2>&1
TRACE_ROWS="^B[0-9]|^KV_LAYOUT|check|pair: |merge: |merger: |traced span|rror"
. bench/calls/trace_run.sh
{
for rep in 1 2 3; do
  for v in mb mst mws mall mall36 mp36; do run "B1 S32768 $v" $v 1 32768 32; done
  for v in mb mb36 mall36 mp36; do run "B1 S131072 $v" $v 1 131072 33; done
  run "B1 S131072 32 splits mb" mb 1 131072 32  # one batch and one lse a lane at the default code
  # K and V one allocation apart (as the bench's torch caches tend to be: its B1 S32768 is ~1 us
  # slower than decode_trace's for the same kernel, session 16) or 2 MB + 4 KB further apart
  for lay in adjacent gap2101248 separate; do KV_LAYOUT=$lay run "B1 S32768 mb $lay" mb 1 32768 32; done
  for v in mb mall mall36; do run "B1 S4096 2 splits $v" $v 1 4096 2; done
  for v in mb mall mall36; do run "B16 2 splits $v" $v 16 8192 2; done
  for v in mb mall mall36; do run "B4 S8192 $v" $v 4 8192 8; done
  for v in mb mall mall36; do run "B2 S32768 $v" $v 2 32768 16; done
done
} > $o/trace.txt 2>&1
grep -E "^===|^B[0-9]|pair: merge" $o/trace.txt | paste - - - | sed -E 's/Hq[0-9]+ Hkv.*stages, //; s/\(empty[^)]*\)//; s/^=== //; s/pair: merge .arr->exit.//' | cut -c1-200
grep -c MISMATCH $o/trace.txt
