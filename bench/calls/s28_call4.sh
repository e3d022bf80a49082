#!/usr/bin/env bash
# Session 28, call 4 (NOT RUN: the device refused it and the session's device time ran out; for
# the next session): mla_decode's hinted split count with at least 1536 keys a split at the
# 64-head kernels (call 3 found B32 H128 uniform lengths over-split by the four-wave plan: 83.7
# us against 80.0 without the hint). Predicted from call 3's forced counts: B32 H128 uniform and
# one-long 2 splits (79.6, 78.8 us), short 1 (23.3); the H16 rows unchanged (82.1, 27.6); B128
# H128 and B16 H128 S16384 (not measured in call 3) at or below the no-hint times.
# Build; the mla_decode plan tests; ragged_mla.py with forced 2 / 4 / 8 (a 512 MB workspace).
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-330} build \
 "run:ragged:110:python3 bench/experiments/ragged_mla.py --splits 2,4,8 $o/ragged_mla.json" \
 "run:tests:80:python3 -m pytest tests/test_mla.py -m cuda -q -p no:cacheprovider -rfE -k 'plan or (mla_decode and matches_reference)'"
