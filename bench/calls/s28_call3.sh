#!/usr/bin/env bash
# Session 28, call 3: mla_decode's plan_seq_lens (a host copy of the lengths plans the automatic
# split count, as gqa_decode's has since session 27), compiled here, first run. Build; the
# mla_decode CUDA tests (the new plan cases among them; not in_subprocess) and the MLA layer's;
# ragged_mla.py (auto, hint, forced 2 / 4 / 8 on four shapes and four length patterns): the hint
# should sit at or near the best forced count on the ragged rows and equal auto on equal ones.
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build \
 "run:tests:150:PYTEST_K='mla and not in_subprocess' bash bench/parallel_pytest.sh $o tests tests/test_mla.py 'tests/test_transformers_mla.py tests/test_nan.py tests/test_cuda_graph.py tests/test_determinism.py'" \
 "run:ragged:120:python3 bench/experiments/ragged_mla.py --splits 2,4,8 $o/ragged_mla.json"
