#!/usr/bin/env bash
# Session 18, device call 3 (no build: decode_trace binaries in .exp/, carried). The split
# merge's first lse entry per lane requested before the last CTA's partials (m1,
# KVCORE_MERGE_LSE_FIRST=1) against the partials first (m0, the library's order until now).
# Same arithmetic, so the same bits. Question: do the lse values queue behind up to 64 KB of
# partials on the SM's load path (merge ~1.8 us from arrival to exit at B1 S32768)?
o=$OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > $o/gpu.txt 2>&1
run() {  # label, binary, args
  local label=$1 bin=$2; shift 2
  echo "=== $label: $bin $*"
  timeout 60 .exp/$bin "$@" 2>&1 | grep -E "^B[0-9]|check|pair: |traced span|main loop|exit|loop end|rror"
}
{
for rep in 1 2 3; do
  for v in m0 m1; do run "B1 S32768 $v" $v 1 32768 32; done
  for v in m0 m1; do run "B1 S131072 $v" $v 1 131072 33; done
  for v in m0 m1; do run "B16 $v 2 splits" $v 16 8192 2; done
  for v in m0 m1; do run "B4 S8192 $v" $v 4 8192 8; done
  for v in m0 m1; do run "B2 S32768 $v" $v 2 32768 16; done
  for v in m0 m1; do run "B1 S4096 $v" $v 1 4096 16; done
done
} > $o/trace.txt 2>&1
grep -E "^===|^B[0-9]|pair: merge" $o/trace.txt | paste - - - | sed -E 's/Hq[0-9]+ Hkv.*stages, //; s/\(empty[^)]*\)//; s/^=== //; s/pair: merge .arr->exit.//' | cut -c1-200
grep -c MISMATCH $o/trace.txt
