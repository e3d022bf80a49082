#!/usr/bin/env bash
# Session 16, device call 9 (carry .exp and .peers): split counts past one wave at the new
# epilogue (decode_trace: do 4-8 waves of smaller splits let the hardware even out per-SM rates?),
# then build and bench/experiments/timer_host_gap.py (does host time leak into the bench Timer?).
o=/tmp/c
mkdir -p $o
{
for rep in 1 2; do
  for sp in 2 4 8 16; do echo "=== B16 S8192 $sp splits"; .exp/trace_new 16 8192 $sp; done
  for sp in 1 4 8; do echo "=== B32 Hq64 S8192 $sp splits"; .exp/trace_new 32 8192 $sp 64 8; done
  for sp in 33 66 132; do echo "=== B1 S32768 $sp splits"; .exp/trace_new 1 32768 $sp; done
  for sp in 33 66 132; do echo "=== B1 S131072 $sp splits"; .exp/trace_new 1 131072 $sp; done
done
} > $o/trace.txt 2>&1
grep -E "^===|CTAs,|MISMATCH" $o/trace.txt | sed 's/ (empty kernel.*//; s/ page 16 SPP 2//' | paste - - | sed 's/\t/ :: /' | sed 's/check.*:://'
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-400} build \
 "run:timer:150:python3 bench/experiments/timer_host_gap.py"
cat $o/timer.log
