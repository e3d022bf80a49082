#!/usr/bin/env bash
# Session 17, device call 11 (no build: decode_trace binaries in .exp/, carried). The early
# arrival: the split's arrival is counted when its loop ends (the round trip overlaps the
# epilogue), the last loop to end merges after the others' release-publications (EARLY=1),
# against the acq_rel arrival after the partial stores (EARLY=0, and head = HEAD's kernel).
o=$OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > $o/gpu.txt 2>&1
run() {  # label, early, binary, args
  local label=$1 e=$2 bin=$3; shift 3
  echo "=== $label [early $e]: $bin $*"
  EARLY=$e timeout 60 .exp/$bin "$@" 2>&1 | grep -E "^B[0-9]|check|pair: |traced span|exit|loop end|rror"
}
{
for rep in 1 2 3; do
  for args in "1 32768 33" "1 131072 33" "4 8192 8" "16 8192 2"; do
    run "$args" 0 head $args
    run "$args" 0 w4 $args
    run "$args" 1 w4 $args
  done
done
} > $o/trace.txt 2>&1
grep -E "^===|^B[0-9]" $o/trace.txt | paste - - | sed -E 's/Hq[0-9]+ Hkv.*stages, //; s/\(empty.*//' | tail -c 9000
grep -c MISMATCH $o/trace.txt
