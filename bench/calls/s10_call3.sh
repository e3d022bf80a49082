#!/usr/bin/env bash
# Session 10, device call 3 (the budget's last ~240 s, start included): decode_score_kernel with
# __launch_bounds__(256, 8) (one wave at B16): its tests, then the eviction table (H2O rows).
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-140} build \
 "run:h2o-tests:30:$T tests/test_decode_score.py -x" \
 "bench:eviction:20"
