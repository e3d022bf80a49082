#!/usr/bin/env bash
# Session 16, device call 8 (carry .exp and .peers): decode_trace A/B of the new split epilogue
# (four warps' states at a padded stride, only the group's rows; one acq_rel arrival; the last
# CTA's partials prefetched before its lse round trip) against the old one; build; the CUDA tests
# of every file that runs gqa_decode / block_sparse_decode kernels (four processes); the decode
# table with its peers.
o=/tmp/c
mkdir -p $o
{
for rep in 1 2 3; do
  for b in trace_old trace_new; do
    echo "=== $b B1 S32768"; .exp/$b 1 32768 33
    echo "=== $b B16 S8192"; .exp/$b 16 8192 2
    echo "=== $b B1 S131072"; .exp/$b 1 131072 33
  done
done
} > $o/trace.txt 2>&1
grep -E "^===|merge in-kernel|MISMATCH" $o/trace.txt | sed 's/ (empty kernel.*//; s/Hq32 Hkv8 page 16 SPP 2 //; s/merge in-kernel: //' | paste - - | sed 's/\t/ :: /'
T="-m cuda -q -p no:cacheprovider -rfE"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "run:tests:240:python3 -m pytest tests/test_ops.py $T > $o/t-ops.log 2>&1 & python3 -m pytest tests/test_block_sparse.py $T > $o/t-bs.log 2>&1 & python3 -m pytest tests/test_decode_score.py tests/test_nan.py $T > $o/t-score.log 2>&1 & python3 -m pytest tests/test_cuda_graph.py tests/test_determinism.py tests/test_decode_workspace.py $T > $o/t-graph.log 2>&1 & wait; tail -n 2 $o/t-*.log" \
 "bench:decode:90"
