#!/usr/bin/env bash
# (Ran an intermediate decode_trace.cu / gqa_decode.cuh with a MERGE argument and gqa_decode_merge_kernel, a split merge as its own grid; measured, not kept: bench/NOTES.md, session 16.)
# Session 16, device call 3 (binaries compiled on the CPU machine into .exp/, carried): when the
# decode CTAs let gqa_decode_merge_kernel launch (at their start, after their loop, at their
# last tile's issue), against the in-kernel merge and a plain second launch.
o=$OUT
run() {  # label, args
  local label=$1; shift
  echo "=== $label: $*"
  timeout 60 .exp/trace_new "$@" 2>&1
}
{
for rep in 1 2; do
  for m in 0 1 3 4 2; do
    run "B1 S32768 merge $m" 1 32768 33 32 8 16 3 0 $m
  done
  for m in 0 1 3 4; do
    run "B16 S8192 merge $m" 16 8192 2 32 8 16 3 0 $m
  done
done
for m in 0 3 4; do
  run "B1 S131072 merge $m" 1 131072 33 32 8 16 3 0 $m
  run "B1 S32768 page 128 merge $m" 1 32768 33 32 8 128 3 0 $m
done
} > $o/trace.txt 2>&1
grep -E "merge (in|kernel)|MISMATCH" $o/trace.txt | sed 's/ (empty kernel.*//' | tail -c 6000
