#!/usr/bin/env bash
# Session 34, call 5 (the machine of call 4, kvcore built with the 2-stage 8-warp kernel): the
# decode group three times (kvcore and cuDNN SDPA, seeds 0-2) and their per-point medians
# (decode_medians.py); then the CUDA tests of test_ops.py (its 8-warp subprocess re-run included)
# and test_decode_workspace.py / test_cuda_graph.py.
o=/tmp/c5
rm -rf $o; mkdir -p $o
b="python3 -m kvcore.bench --group decode --impl kvcore,sdpa-cudnn --no-plot"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-300} \
 "run:decode0:40:$b --seed 0 --out $o/decode0" "run:decode1:40:$b --seed 1 --out $o/decode1" \
 "run:decode2:40:$b --seed 2 --out $o/decode2" \
 "run:medians:20:python3 bench/experiments/decode_medians.py $o/decode0/*.json $o/decode1/*.json $o/decode2/*.json" \
 "tests:200:tests/test_ops.py,tests/test_decode_workspace.py,tests/test_cuda_graph.py"
cat $o/medians.log
