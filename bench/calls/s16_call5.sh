#!/usr/bin/env bash
# (Ran an intermediate decode_trace.cu / gqa_decode.cuh with a MERGE argument and gqa_decode_merge_kernel, a split merge as its own grid; measured, not kept: bench/NOTES.md, session 16.)
# Session 16, device call 5 (binaries compiled on the CPU machine into .exp/, carried): stamps of
# gqa_decode_merge_kernel (entry, griddepcontrol.wait passed, exit) against the decode's exits,
# for each point at which the decode lets it launch.
o=$OUT
run() {  # label, binary, args
  local label=$1 bin=$2; shift 2
  echo "=== $label: $bin $*"
  timeout 60 .exp/$bin "$@" 2>&1
}
{
for m in 0 1 3 4 2; do
  run "B1 S32768 m$m" trace_new 1 32768 33 32 8 16 3 0 $m
done
run "B1 S32768 m0 acqrel" trace_acqrel 1 32768 33 32 8 16 3 0 0
for m in 0 1 3; do
  run "B16 S8192 m$m" trace_new 16 8192 2 32 8 16 3 0 $m
done
} > $o/trace.txt 2>&1
grep -E "^===|merge (in|kernel)|exit|merge grid|arrival|merger|landed GB/s per 2" $o/trace.txt | sed 's/ (empty kernel.*//; s/Hq32 Hkv8 page 16 SPP 2 //' | tail -c 7000
