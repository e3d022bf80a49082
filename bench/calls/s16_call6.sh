#!/usr/bin/env bash
# (Ran an intermediate decode_trace.cu / gqa_decode.cuh with a MERGE argument and gqa_decode_merge_kernel, a split merge as its own grid; measured, not kept: bench/NOTES.md, session 16.)
# Session 16, device call 6 (binaries compiled on the CPU machine into .exp/, carried): finer
# stamps of the merge grid (lse landed, weights known) and of the decode epilogue (loop end ->
# the four warps' states in shared memory).
o=$OUT
run() {  # label, binary, args
  local label=$1 bin=$2; shift 2
  echo "=== $label: $bin $*"
  timeout 60 .exp/$bin "$@" 2>&1
}
{
for m in 3 1 3 1; do
  run "B1 S32768 m$m" trace_new 1 32768 33 32 8 16 3 0 $m
done
run "B1 S131072 m3" trace_new 1 131072 33 32 8 16 3 0 3
} > $o/trace.txt 2>&1
grep -E "^===|merge (in|kernel)|exit|merge grid|decode:|epilogue" $o/trace.txt | sed 's/ (empty kernel.*//; s/Hq32 Hkv8 page 16 SPP 2 //' | tail -c 7000
