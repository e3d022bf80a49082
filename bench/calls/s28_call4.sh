#!/usr/bin/env bash
# Session 28, call 4 (NOT RUN: the device refused it and the session's device time ran out; for
# the next session): mla_decode's hinted split count above 16 heads a CTA. Call 3 found the plan
# measured on gqa_decode over-splitting there (B32 H128 uniform lengths 83.7 us against 80.0
# without the hint) while gaining on one-long (67.0 / 80.6) and short rows (23.3 / 30.7), so the
# launcher now ignores the hint above 16 heads. Build; the mla plan tests (two never run on a
# GPU: the hint's 16-head limit, bitwise); ragged_mla.py at forced 2 / 4 / 8 (a 512 MB workspace)
# to choose a rule for the 32- and 64-head kernels: their "hint" column should now equal "auto",
# the H16 rows stay as in call 3 (82.1, 27.6).
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-400} build \
 "run:tests:80:python3 -m pytest tests/test_mla.py -m cuda -q -p no:cacheprovider -rfE -k 'plan or (mla_decode and matches_reference)'" \
 "run:ragged:170:python3 bench/experiments/ragged_mla.py --splits 2,4,8 $o/ragged_mla.json"
