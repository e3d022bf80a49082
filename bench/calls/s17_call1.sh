#!/usr/bin/env bash
# Session 17, device call 1 (no build: decode_trace binaries compiled on the CPU machine into
# .exp/, carried). Does the page order cost gqa_decode DRAM efficiency, and does an L2 bulk
# prefetch of whole page segments (all KV heads' rows of a page, one contiguous run, issued by
# one owning head's CTA PF tiles ahead) recover it? pfN = decode_trace built with
# -DKVCORE_DECODE_L2_PREFETCH=N. TABLE=random|seq|cluster64 picks the block table.
o=$OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > $o/gpu.txt 2>&1
run() {  # label, table, binary, args
  local label=$1 table=$2 bin=$3; shift 3
  echo "=== $label [$table]: $bin $*"
  TABLE=$table timeout 60 .exp/$bin "$@" 2>&1 | grep -E "^B[0-9]|check"
}
{
for rep in 1 2; do
  for table in random seq; do
    for bin in pf0 pf1 pf2 pf4; do
      run "B1 S32768" $table $bin 1 32768 33
      run "B16 S8192" $table $bin 16 8192 2
      run "B32 Hq64 S8192" $table $bin 32 8192 1 64 8
    done
  done
done
for bin in pf0 pf2; do
  run "B1 S131072" random $bin 1 131072 33
  run "B64 S4096" random $bin 64 4096 1
  run "B128 S2048" random $bin 128 2048 1
  run "B16 S8192" cluster64 $bin 16 8192 2
  run "B16 S8192 page 128" random $bin 16 8192 2 32 8 128
  run "B16 S8192 page 1" random $bin 16 8192 2 32 8 1
done
} > $o/trace.txt 2>&1
tail -c 6000 $o/trace.txt
