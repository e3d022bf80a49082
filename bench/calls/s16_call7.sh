#!/usr/bin/env bash
# (Ran an intermediate decode_trace.cu / gqa_decode.cuh with a MERGE argument and gqa_decode_merge_kernel, a split merge as its own grid; measured, not kept: bench/NOTES.md, session 16.)
# Session 16, device call 7 (binaries compiled on the CPU machine into .exp/, carried): the
# epilogue without bank conflicts (only the group's rows, stride D + 8) and the acq_rel arrival
# (trace_new) against the same code with the old epilogue and fences (trace_old); the merge grid
# with the last CTA's arithmetic (bitwise check against the last CTA's merge).
o=$OUT
run() {  # label, binary, args
  local label=$1 bin=$2; shift 2
  echo "=== $label: $bin $*"
  timeout 60 .exp/$bin "$@" 2>&1
}
{
for rep in 1 2; do
  for b in trace_old trace_new; do
    run "B1 S32768 m0" $b 1 32768 33 32 8 16 3 0 0
    run "B1 S32768 m1" $b 1 32768 33 32 8 16 3 0 1
    run "B16 S8192 m0" $b 16 8192 2 32 8 16 3 0 0
    run "B64 S4096 1 split" $b 64 4096 1
  done
done
run "B1 S32768 m2" trace_new 1 32768 33 32 8 16 3 0 2
run "B1 S131072 m1" trace_new 1 131072 33 32 8 16 3 0 1
run "B1 S131072 m0" trace_new 1 131072 33 32 8 16 3 0 0
run "B1 S32768 Hq8 Hkv8 m1 (group 1)" trace_new 1 32768 33 8 8 16 3 0 1
run "B2 S65536 Hq64 Hkv4 m1 (group 16)" trace_new 2 65536 40 64 4 16 3 0 1
run "B1 S131072 100 splits m1 (4 rounds)" trace_new 1 131072 100 32 8 16 3 0 1
} > $o/trace.txt 2>&1
grep -E "^===|merge (in|kernel)|MISMATCH|bit for bit|merge grid: (wait|exit)|decode: loop" $o/trace.txt | sed 's/ (empty kernel.*//; s/Hq32 Hkv8 page 16 SPP 2 //' | tail -c 8000
