#!/usr/bin/env bash
# (trace_new here was an intermediate gqa_decode.cuh whose last CTA staged the partials into shared memory by cp.async; measured slower, not kept: bench/NOTES.md, session 16.)
# Session 16, device call 1 (no build: binaries compiled on the CPU machine into .exp/, carried).
# gqa_decode B1 S32768's time over a plain read: per-CTA traces (bench/experiments/decode_trace.cu,
# now with the SM id, the first copies' issue, the split arrival and the merging CTA's part) of
# the kernel before (trace_old) and after (trace_new) the staged split merge, and of split
# counts / lengths / ring depths around the launcher's choice.
o=$OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > $o/gpu.txt 2>&1
run() {  # label, binary, args
  local label=$1 bin=$2; shift 2
  echo "=== $label: $bin $*"
  timeout 60 .exp/$bin "$@" 2>&1
}
{
for rep in 1 2; do
  run "B1 S32768 33 splits (-> 32 x 1024), old merge" trace_old 1 32768 33
  run "B1 S32768 33 splits (-> 32 x 1024), staged merge" trace_new 1 32768 33
  run "B1 S32768 33 x 1008 (grain 16), staged merge" trace_new 1 32768 33 32 8 16 3 16
  run "B16 S8192 2 splits, old merge" trace_old 16 8192 2
  run "B16 S8192 2 splits, staged merge" trace_new 16 8192 2
done
run "B1 S32768 2 stages 49 splits grain 16" trace_new 1 32768 49 32 8 16 2 16
run "B1 S32768 2 stages 50 splits grain 16" trace_new 1 32768 50 32 8 16 2 16
run "B1 S32768 66 splits grain 16" trace_new 1 32768 66 32 8 16 3 16
run "B1 S32768 16 splits" trace_new 1 32768 16
run "B1 S32768 page 128 33 splits" trace_new 1 32768 33 32 8 128 3
run "B1 S32768 page 128 33 splits old" trace_old 1 32768 33 32 8 128 3
run "B1 S131072 33 splits grain 16" trace_new 1 131072 33 32 8 16 3 16
run "B1 S131072 33 splits" trace_new 1 131072 33
run "B16 S8192 3 splits grain 16" trace_new 16 8192 3 32 8 16 3 16
run "B16 S8192 2 stages 3 splits grain 16" trace_new 16 8192 3 32 8 16 2 16
run "B16 S8192 2 stages 2 splits" trace_new 16 8192 2 32 8 16 2
} > $o/trace.txt 2>&1
tail -c 3000 $o/trace.txt
