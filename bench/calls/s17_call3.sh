#!/usr/bin/env bash
# Session 17, device call 3 (no build: decode_trace binaries compiled on the CPU machine into
# .exp/, carried). The KV heads of one split as a thread-block cluster (CLUSTER=n CTAs), placed
# only (cs0) or also kept within one tile of each other by a cluster barrier per tile (cs1,
# -DKVCORE_DECODE_CLUSTER_SYNC=1), so the 8 heads' 256-byte slices of a page reach DRAM together.
o=$OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv > $o/gpu.txt 2>&1
run() {  # label, cluster, table, binary, args
  local label=$1 cl=$2 table=$3 bin=$4; shift 4
  echo "=== $label [cluster $cl, $table]: $bin $*"
  CLUSTER=$cl TABLE=$table timeout 60 .exp/$bin "$@" 2>&1 | grep -E "^B[0-9]|check|clusters of|pair: |traced span|main loop|exit"
}
{
for rep in 1 2; do
  for args in "1 32768 33" "16 8192 2" "32 8192 1 64 8" "1 131072 33" "64 4096 1"; do
    run "$args" 1 random cs0 $args
    run "$args" 8 random cs0 $args
    run "$args" 8 random cs1 $args
    run "$args" 4 random cs1 $args
    run "$args" 2 random cs1 $args
    run "$args" 1 seq cs0 $args
    run "$args" 8 seq cs1 $args
  done
done
} > $o/trace.txt 2>&1
grep -E "^===|^B[0-9]" $o/trace.txt | paste - - | sed -E 's/Hq.*CTAs\/SM: //; s/\(empty.*//' | tail -c 9000
