#!/usr/bin/env bash
# Session 16, device call 11 (carry .exp): the ~1.2 us between the bench and decode_trace for B1
# S32768, continued: decode_trace for the same GPU, then build and bench/experiments/
# bench_vs_trace.py with its input variants of the library op (uniform values as decode_trace
# has, a 2 MiB workspace, sorted block-table rows).
o=/tmp/c
mkdir -p $o
{ for rep in 1 2 3; do echo "=== trace_new"; .exp/trace_new 1 32768 33; done; } > $o/trace.txt 2>&1
grep -E "^===|CTAs," $o/trace.txt | sed 's/ (empty kernel.*//; s/ page 16 SPP 2//' | paste - - | sed 's/\t/ :: /'
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-320} build \
 "run:bvt:150:python3 bench/experiments/bench_vs_trace.py"
cat $o/bvt.log
