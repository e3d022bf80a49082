#!/usr/bin/env bash
# Session 17, device call 5 (no build: decode_trace binaries compiled on the CPU machine into
# .exp/, carried). Eight warps per CTA (w8: GqaDecodeConfig<128, STAGES, 8>, tiles of 128 tokens,
# one CTA per SM) with half the CTAs: B16 without any split merge (128 pairs, one CTA each), B1
# with 16 splits; against the library's four-warp kernel (cur) at today's layout.
o=$OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > $o/gpu.txt 2>&1
run() {  # label, binary, args
  local label=$1 bin=$2; shift 2
  echo "=== $label: $bin $*"
  timeout 60 .exp/$bin "$@" 2>&1 | grep -E "^B[0-9]|check|pair: |traced span|main loop|exit|epilogue|loop end|first"
}
{
for rep in 1 2; do
  run "B16 current" cur 16 8192 2
  run "B16 w8 1 split 2 stages" w8 16 8192 1 32 8 16 2
  run "B16 w8 1 split 3 stages" w8 16 8192 1 32 8 16 3
  run "B1 S32768 current" cur 1 32768 33
  run "B1 S32768 w8 16 splits 2 stages" w8 1 32768 16 32 8 16 2
  run "B1 S32768 w8 16 splits 3 stages" w8 1 32768 16 32 8 16 3
  run "B1 S131072 current" cur 1 131072 33
  run "B1 S131072 w8 16 splits 3 stages" w8 1 131072 16 32 8 16 3
  run "B8 S16384 current (launcher: 4 splits?)" cur 8 16384 4
  run "B8 S16384 w8 2 splits 3 stages" w8 8 16384 2 32 8 16 3
done
} > $o/trace.txt 2>&1
grep -E "^===|^B[0-9]" $o/trace.txt | paste - - | sed -E 's/Hq[0-9]+ Hkv.*stages, //; s/\(empty.*//' | tail -c 9000
