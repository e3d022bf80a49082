#!/usr/bin/env bash
# Session 17, device call 7 (no build: decode_trace binaries in .exp/, carried). Calls 5-6 ran
# the eight-warp kernel with page groups of two slots whose rows spanned 32 rows at page 16
# (followers read the next physical page: wrong addresses, and a crash at B1 S4096); the copy
# slots now cover 64-row halves (GqaDecodeConfig::STEP = 8 at D 128 for any warp count). Again,
# correct, with a host reference check of four heads: w4 (the library's kernel) against w8.
o=$OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > $o/gpu.txt 2>&1
run() {  # label, binary, args
  local label=$1 bin=$2; shift 2
  echo "=== $label: $bin $*"
  timeout 60 .exp/$bin "$@" 2>&1 | grep -E "^B[0-9]|check|pair: |traced span|main loop|exit|loop end|rror"
}
{
for rep in 1 2; do
  run "B1 S32768 w4" w4 1 32768 33
  run "B1 S32768 w8 16 splits" w8 1 32768 16 32 8 16 3
  run "B16 w4" w4 16 8192 2
  run "B16 w8 1 split" w8 16 8192 1 32 8 16 3
  run "B1 S131072 w4" w4 1 131072 33
  run "B1 S131072 w8 16 splits" w8 1 131072 16 32 8 16 3
  run "B32 Hq64 w4" w4 32 8192 1 64 8
  run "B32 Hq64 w8" w8 32 8192 1 64 8 16 3
  run "B64 w4" w4 64 4096 1
  run "B64 w8" w8 64 4096 1 32 8 16 3
  run "B2 S32768 w4 16" w4 2 32768 16
  run "B2 S32768 w8 8" w8 2 32768 8 32 8 16 3
  run "B4 S8192 w4 8" w4 4 8192 8
  run "B4 S8192 w8 4" w8 4 8192 4 32 8 16 3
  run "B1 S4096 w4 16" w4 1 4096 16
  run "B1 S4096 w8 16" w8 1 4096 16 32 8 16 3
  run "B16 page 1 w8" w8 16 8192 1 32 8 1 3
  run "B16 page 64 w8" w8 16 8192 1 32 8 64 3
  run "B16 page 1 w4" w4 16 8192 2 32 8 1 3
  run "B16 page 64 w4" w4 16 8192 2 32 8 64 3
done
} > $o/trace.txt 2>&1
grep -E "^===|^B[0-9]" $o/trace.txt | paste - - | sed -E 's/Hq[0-9]+ Hkv.*stages, //; s/\(empty.*//' | tail -c 9000
grep -c MISMATCH $o/trace.txt
