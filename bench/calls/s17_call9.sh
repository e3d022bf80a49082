#!/usr/bin/env bash
# Session 17, device call 9 (carry .peers): call 8's failures fixed (the 8-warp kernel only for an
# automatic split count, so score and plain decode agree bitwise at a forced num_splits; the
# KVCORE_DECODE_WARPS switch read on every call). Build; the CUDA tests of the decode files again
# (four processes); the decode table with peers.
o=/tmp/c
mkdir -p $o
T="-m cuda -q -p no:cacheprovider -rfE"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-570} build \
 "run:tests:300:python3 -m pytest tests/test_ops.py $T > $o/t-ops.log 2>&1 & python3 -m pytest tests/test_block_sparse.py tests/test_cuda_graph.py $T > $o/t-bs.log 2>&1 & python3 -m pytest tests/test_decode_score.py tests/test_nan.py $T > $o/t-score.log 2>&1 & python3 -m pytest tests/test_determinism.py tests/test_decode_workspace.py tests/test_scale.py tests/test_properties.py $T > $o/t-graph.log 2>&1 & wait; tail -n 3 $o/t-*.log" \
 "bench:decode:100"
