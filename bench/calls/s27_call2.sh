#!/usr/bin/env bash
# Session 27, call 2 (carry .peers and .exp): gqa_decode's plan_seq_lens (a host copy of the
# lengths plans the automatic split count), compiled here, first run. Build; the gqa_decode CUDA
# tests (the new plan_seq_lens cases among them; not in_subprocess) and the H2O score and graph
# files; ragged_decode (auto, hint, forced 4 / 8 / 16: the hint should sit at or near the best
# forced count on every row); the decode table with peers (kvcore now gets the host lengths
# FlashInfer's plan gets: equal rows unchanged, ragged rows near the best forced count); then
# s27_call1.sh's decode_trace questions if time is left.
o=/tmp/c
rm -rf $o; mkdir -p $o  # (a machine can keep /tmp from an earlier call)
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-570} build \
 "run:tests:170:PYTEST_K='(gqa_decode or plan or graph or score) and not in_subprocess' bash bench/parallel_pytest.sh $o tests tests/test_ops.py 'tests/test_decode_score.py tests/test_cuda_graph.py' tests/test_determinism.py" \
 "run:ragged:80:python3 bench/experiments/ragged_decode.py --splits 4,8,16 $o/ragged.json" \
 "bench:decode:110" \
 "run:trace:120:OUT=$o bash bench/calls/s27_call1.sh"
