#!/usr/bin/env bash
# Session 17, device call 8 (carry .peers): build with the 8-warp gqa_decode kernel and the
# launcher's choice (KVCORE_DECODE_WARPS=auto); the CUDA tests of every file that runs the
# gqa_decode / block_sparse_decode kernels (four processes; test_ops.py includes the forced
# 8-warp re-run of the decode, NaN, graph and determinism cases); the decode table with peers.
o=/tmp/c
mkdir -p $o
T="-m cuda -q -p no:cacheprovider -rfE"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-570} build \
 "run:tests:270:python3 -m pytest tests/test_ops.py $T > $o/t-ops.log 2>&1 & python3 -m pytest tests/test_block_sparse.py $T > $o/t-bs.log 2>&1 & python3 -m pytest tests/test_decode_score.py tests/test_nan.py $T > $o/t-score.log 2>&1 & python3 -m pytest tests/test_cuda_graph.py tests/test_determinism.py tests/test_decode_workspace.py $T > $o/t-graph.log 2>&1 & wait; tail -n 3 $o/t-*.log" \
 "bench:decode:100"
