#!/usr/bin/env bash
# Session 17, device call 12 (carry .peers): the review's refactors (the 8-warp choice inside
# dispatch's go, wave_fill, the test helper, the token decoder's forced_lean hoisted): build; the
# decode files' CUDA tests and the token decoder's (four processes); the decode table, to see the
# same kernels chosen.
o=/tmp/c
mkdir -p $o
T="-m cuda -q -p no:cacheprovider -rfE"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-370} build \
 "run:tests:170:python3 -m pytest tests/test_ops.py $T > $o/t-ops.log 2>&1 & python3 -m pytest tests/test_block_sparse.py tests/test_cuda_graph.py $T > $o/t-bs.log 2>&1 & python3 -m pytest tests/test_decode_score.py tests/test_nan.py $T > $o/t-score.log 2>&1 & python3 -m pytest tests/test_determinism.py tests/test_block_transformer.py $T -k 'not in_subprocess' > $o/t-td.log 2>&1 & wait; tail -n 3 $o/t-*.log" \
 "bench:decode:60"
