#!/usr/bin/env bash
# Session 17, device call 4 (no build: decode_trace compiled on the CPU machine into .exp/cur,
# carried). One CTA per SM with a deep ring (4-6 stages of 64 tokens) and half the splits, so
# B16 needs no split merge at all (128 pairs, one CTA each) and B1 half as many partials.
o=$OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > $o/gpu.txt 2>&1
run() {  # label, args
  local label=$1; shift
  echo "=== $label: $*"
  timeout 60 .exp/cur "$@" 2>&1 | grep -E "^B[0-9]|check|pair: |traced span|main loop|exit|epilogue|loop end"
}
{
for rep in 1 2; do
  run "B16 current" 16 8192 2
  for st in 3 4 5 6; do run "B16 1 split $st stages" 16 8192 1 32 8 16 $st; done
  run "B1 S32768 current" 1 32768 33
  for st in 4 5 6; do run "B1 S32768 16 splits $st stages" 1 32768 16 32 8 16 $st; done
  run "B1 S32768 17 splits 6 stages" 1 32768 17 32 8 16 6
  run "B1 S131072 current" 1 131072 33
  for st in 4 6; do run "B1 S131072 16 splits $st stages" 1 131072 16 32 8 16 $st; done
  run "B1 S131072 17 splits 6 stages" 1 131072 17 32 8 16 6
  run "B32 Hq64 current" 32 8192 1 64 8
  run "B32 Hq64 6 stages" 32 8192 1 64 8 16 6
done
} > $o/trace.txt 2>&1
grep -E "^===|^B[0-9]" $o/trace.txt | paste - - | sed -E 's/Hq[0-9]+ Hkv.*stages, //; s/\(empty.*//' | tail -c 9000
