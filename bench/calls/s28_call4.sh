#!/usr/bin/env bash
# Session 28, call 4: mla_decode's hinted split count with at least 16 x ROWS keys a split (1024
# at the 64-head blocks; call 3 found B32 H128 uniform lengths over-split by the four-wave plan:
# 83.7 us against 80.0 without the hint). Predicted: B32 H128 uniform 3 splits, ~80-82 us;
# one-long and short rows as in call 3 (66-67, 23 us); the H16 rows unchanged (82.1, 27.6).
# Build; the mla_decode plan tests; ragged_mla.py with forced 2 / 4 / 8 (a 512 MB workspace).
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-330} build \
 "run:ragged:110:python3 bench/experiments/ragged_mla.py --splits 2,4,8 $o/ragged_mla.json" \
 "run:tests:80:python3 -m pytest tests/test_mla.py -m cuda -q -p no:cacheprovider -rfE -k 'plan or (mla_decode and matches_reference)'"
