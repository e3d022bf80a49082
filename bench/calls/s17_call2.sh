#!/usr/bin/env bash
# Session 17, device call 2 (no build: decode_trace binaries compiled on the CPU machine into
# .exp/, carried). Tail units: the main splits take (1 - TAIL_FRAC) of each sequence, the rest
# goes to short units of TAIL_TOKENS launched after every main split (renumbered linear order),
# so the hardware hands them to the SMs that finish first. base = HEAD's decode_trace and
# kernel; tail = this tree's (no TAIL_* env: the same layout as base).
o=$OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > $o/gpu.txt 2>&1
run() {  # label, frac, tail tokens, binary, args
  local label=$1 frac=$2 tt=$3 bin=$4; shift 4
  echo "=== $label [frac $frac tail $tt]: $bin $*"
  TAIL_FRAC=$frac TAIL_TOKENS=$tt timeout 60 .exp/$bin "$@" 2>&1 | grep -E "^B[0-9]|check|main splits|tail units|pair: |traced span"
}
{
for rep in 1 2; do
  run "B16 S8192" 0 0 base 16 8192 2
  run "B16 S8192" 0 0 tail 16 8192 2
  for tt in 128 256; do for f in 0.05 0.1 0.2; do run "B16 S8192" $f $tt tail 16 8192 2; done; done
  run "B1 S32768" 0 0 base 1 32768 33
  run "B1 S32768" 0 0 tail 1 32768 33
  for tt in 64 128 256; do for f in 0.05 0.1; do run "B1 S32768" $f $tt tail 1 32768 32; done; done
  run "B32 Hq64 S8192" 0 0 tail 32 8192 1 64 8
  for tt in 128 256 512; do for f in 0.05 0.1; do run "B32 Hq64 S8192" $f $tt tail 32 8192 1 64 8; done; done
  run "B1 S131072" 0 0 tail 1 131072 33
  for tt in 256 512; do for f in 0.05 0.1; do run "B1 S131072" $f $tt tail 1 131072 33; done; done
  run "B64 S4096" 0 0 tail 64 4096 1
  run "B64 S4096" 0.1 256 tail 64 4096 1
done
} > $o/trace.txt 2>&1
grep -E "^===|^B[0-9]" $o/trace.txt | paste - - | sed -E 's/Hq.*CTAs\/SM: //; s/\(empty.*//' | tail -c 9000
