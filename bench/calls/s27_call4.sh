#!/usr/bin/env bash
# Session 27, call 4 (carry .peers): the hinted split count's rule after call 3 (unequal lengths
# over at least a quarter pair a slot: four waves of CTAs; B64 ragged should go 178 -> ~166 us,
# B16 stay at 8 splits). Build; the gqa_decode / plan CUDA tests; ragged_decode (auto, hint,
# forced 2 / 4 / 8); the decode table with peers (the README's, from this one run).
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-330} build \
 "run:tests:80:PYTEST_K='(gqa_decode or plan) and not in_subprocess' bash bench/parallel_pytest.sh $o tests tests/test_ops.py" \
 "run:ragged:60:python3 bench/experiments/ragged_decode.py --splits 2,4,8 $o/ragged.json" \
 "bench:decode:90"
