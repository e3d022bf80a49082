#!/usr/bin/env bash
# Session 18, device call 5 (no build: decode_trace in .exp/ph2, carried). Where the split merge's
# ~1.8 us go (arrival -> exit of the last CTA of each pair): decode_trace now also stamps the
# merger's thread 0 after its warp's weights (lse round trip + reductions), after the barrier that
# follows them, and after its items are combined and stored (trace slots 7-9). Call 5 adds
# slots 10-12: thread 0 before its arrival atomic, after the first partials' loads are issued,
# and when its first lse value is back (a timer read that waits on the value).
o=$OUT
run() {  # label, binary, args
  local label=$1 bin=$2; shift 2
  echo "=== $label: $bin $*"
  timeout 60 .exp/$bin "$@" 2>&1 | grep -E "^B[0-9]|check|pair: |merge: |merger: |traced span|rror"
}
{
for rep in 1 2; do
  run "B1 S32768" ph2 1 32768 32
  run "B1 S4096 16 splits" ph2 1 4096 16
  run "B1 S4096 2 splits" ph2 1 4096 2
  run "B16 2 splits" ph2 16 8192 2
  run "B4 S8192 8 splits" ph2 4 8192 8
  run "B1 S131072" ph2 1 131072 33
done
} > $o/trace.txt 2>&1
grep -E "^===|^B[0-9]|merge" $o/trace.txt | sed -E 's/Hq[0-9]+ Hkv.*stages, //; s/\(empty[^)]*\)//' | cut -c1-140
