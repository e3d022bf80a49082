#!/usr/bin/env bash
# Session 16, device call 10 (carry .exp): the ~1.5 us between the bench and decode_trace for B1
# S32768: decode_trace built with torch's extension flags (-lineinfo, the __CUDA_NO_* defines)
# against the plain build; build; the library op on the bench's inputs under four flushes
# (bench/experiments/bench_vs_trace.py).
o=/tmp/c
mkdir -p $o
{
for rep in 1 2 3; do
  for b in trace_new trace_torchflags; do echo "=== $b"; .exp/$b 1 32768 33; done
done
} > $o/trace.txt 2>&1
grep -E "^===|CTAs," $o/trace.txt | sed 's/ (empty kernel.*//; s/ page 16 SPP 2//' | paste - - | sed 's/\t/ :: /'
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-300} build \
 "run:bvt:150:python3 bench/experiments/bench_vs_trace.py"
cat $o/bvt.log
