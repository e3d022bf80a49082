#!/usr/bin/env bash
# Session 17, device call 6 (no build: decode_trace binaries in .exp/, carried). Where the
# eight-warp kernel (w8, one CTA per SM) beats the four-warp one (cur, two per SM), to set the
# launcher's choice: the larger batches and shapes whose pair counts fill one kind of
# wave badly.
o=$OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > $o/gpu.txt 2>&1
run() {  # label, binary, args
  local label=$1 bin=$2; shift 2
  echo "=== $label: $bin $*"
  timeout 60 .exp/$bin "$@" 2>&1 | grep -E "^B[0-9]|check|pair: |traced span|main loop|exit|loop end"
}
{
for rep in 1 2; do
  run "B32 Hq64 cur" cur 32 8192 1 64 8
  run "B32 Hq64 w8 3st" w8 32 8192 1 64 8 16 3
  run "B32 Hq64 w8 2st" w8 32 8192 1 64 8 16 2
  run "B64 cur" cur 64 4096 1
  run "B64 w8 3st" w8 64 4096 1 32 8 16 3
  run "B64 w8 2st" w8 64 4096 1 32 8 16 2
  run "B128 cur" cur 128 2048 1
  run "B128 w8 3st" w8 128 2048 1 32 8 16 3
  run "B10 S8192 cur 3 splits" cur 10 8192 3
  run "B10 S8192 w8 1 split" w8 10 8192 1 32 8 16 3
  run "B10 S8192 w8 2 splits" w8 10 8192 2 32 8 16 3
  run "B24 S4096 cur 1 split" cur 24 4096 1
  run "B24 S4096 w8 1 split" w8 24 4096 1 32 8 16 3
  run "B2 S32768 cur 16 splits" cur 2 32768 16
  run "B2 S32768 w8 8 splits" w8 2 32768 8 32 8 16 3
  run "B4 S8192 cur 8 splits" cur 4 8192 8
  run "B4 S8192 w8 4 splits" w8 4 8192 4 32 8 16 3
  run "B1 S4096 cur 33" cur 1 4096 16
  run "B1 S4096 w8 16" w8 1 4096 16 32 8 16 3
  run "B1 S4096 w8 8" w8 1 4096 8 32 8 16 3
  run "B1 S32768 Hkv32 Hq32 (group 1) cur 8 splits" cur 1 32768 8 32 32
  run "B1 S32768 Hkv32 Hq32 (group 1) w8 4 splits" w8 1 32768 4 32 32 16 3
done
} > $o/trace.txt 2>&1
grep -E "^===|^B[0-9]" $o/trace.txt | paste - - | sed -E 's/Hq[0-9]+ Hkv.*stages, //; s/\(empty.*//' | tail -c 9000
