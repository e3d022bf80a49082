#!/usr/bin/env bash
# Session 19, device call 2 (carry .peers): the split merge's stepped loads and warp sync made the
# library's code, and the automatic split count kept within one merge batch unless that costs
# >= 5% SM fill (call 1: B1 S131072 33 -> 32 splits, -1.8 us expected; B2-B16 -0.3 us). Build;
# which count the automatic choice runs (bench/experiments/auto_splits_check.py); the decode
# files' CUDA tests (four processes); the decode table.
o=/tmp/c
# (a machine can keep /tmp from an earlier call: session 18's logs were still in /tmp/c)
rm -rf $o; mkdir -p $o
T="-m cuda -q -p no:cacheprovider -rfE"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "run:splits:120:python3 bench/experiments/auto_splits_check.py $o/splits.json" \
 "run:tests:200:python3 -m pytest tests/test_ops.py $T > $o/t-ops.log 2>&1 & python3 -m pytest tests/test_block_sparse.py tests/test_cuda_graph.py $T > $o/t-bs.log 2>&1 & python3 -m pytest tests/test_decode_score.py tests/test_nan.py $T > $o/t-score.log 2>&1 & python3 -m pytest tests/test_determinism.py tests/test_block_transformer.py $T -k 'not in_subprocess' > $o/t-td.log 2>&1 & wait; tail -n 3 $o/t-*.log" \
 "bench:decode:90"
