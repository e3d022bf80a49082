#!/usr/bin/env bash
# (Ran an intermediate decode_trace.cu / gqa_decode.cuh with a MERGE argument and gqa_decode_merge_kernel, a split merge as its own grid; measured, not kept: bench/NOTES.md, session 16.)
# Session 16, device call 2 (binaries compiled on the CPU machine into .exp/, carried): the split
# merge as a grid of its own (gqa_decode_merge_kernel, with and without programmatic dependent
# launch) against the last-arriving CTA's merge, bench/experiments/decode_trace.cu.
o=$OUT
run() {  # label, args
  local label=$1; shift
  echo "=== $label: $*"
  timeout 60 .exp/trace_new "$@" 2>&1
}
{
for rep in 1 2; do
  for m in 0 1 2; do
    run "B1 S32768 merge $m" 1 32768 33 32 8 16 3 0 $m
  done
  for m in 0 1 2; do
    run "B16 S8192 merge $m" 16 8192 2 32 8 16 3 0 $m
  done
done
for m in 0 1; do
  run "B1 S32768 33x1008 merge $m" 1 32768 33 32 8 16 3 16 $m
  run "B1 S131072 merge $m" 1 131072 33 32 8 16 3 0 $m
  run "B1 S32768 page 128 merge $m" 1 32768 33 32 8 128 3 0 $m
  run "B4 S32768 merge $m" 4 32768 8 32 8 16 3 0 $m
done
} > $o/trace.txt 2>&1
grep -E "^===|merge (in|kernel)|check" $o/trace.txt | tail -c 6000
