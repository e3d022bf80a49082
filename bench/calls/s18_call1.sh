#!/usr/bin/env bash
# Session 18, device call 1 (no build: decode_trace binaries in .exp/, carried). An L2 prefetch
# of each CTA's own rows PF tiles beyond the cp.async ring (KVCORE_DECODE_L2_PREFETCH=PF, compiled
# in): w4 / w8 are the library's kernels, w4pf1 / w4pf2 / w8pf1 / w8pf2 add the prefetch. The
# question: is the one-wave grid's tail (the last 2-4 us, landing at 1-3 TB/s while the last
# CTAs run) limited by each CTA's bytes in flight?
o=$OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > $o/gpu.txt 2>&1
run() {  # label, binary, args
  local label=$1 bin=$2; shift 2
  echo "=== $label: $bin $*"
  timeout 60 .exp/$bin "$@" 2>&1 | grep -E "^B[0-9]|check|pair: |traced span|main loop|exit|loop end|landed GB/s per 2|rror"
}
{
for rep in 1 2; do
  for v in w4 w4pf1 w4pf2; do run "B1 S32768 $v" $v 1 32768 32; done
  for v in w8 w8pf1 w8pf2; do run "B16 $v 1 split" $v 16 8192 1 32 8 16 3; done
  for v in w4 w4pf1 w4pf2; do run "B16 $v 2 splits" $v 16 8192 2; done
  for v in w4 w4pf1 w4pf2; do run "B1 S131072 $v" $v 1 131072 33; done
  for v in w4 w4pf1 w4pf2; do run "B32 Hq64 $v" $v 32 8192 1 64 8; done
  for v in w4 w4pf1 w4pf2; do run "B64 $v" $v 64 4096 1; done
  for v in w4 w4pf1; do run "B4 S8192 $v" $v 4 8192 8; done
done
} > $o/trace.txt 2>&1
grep -E "^===|^B[0-9]" $o/trace.txt | paste - - | sed -E 's/Hq[0-9]+ Hkv.*stages, //; s/\(empty.*//; s/^=== //' | cut -c1-150
grep -c MISMATCH $o/trace.txt
