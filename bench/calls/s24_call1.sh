#!/usr/bin/env bash
# Prepared in session 24 (no device: loans were paused) and not run there. Next session's first
# call, replacing s23_call1.sh (whose stages it and s24_call2.sh contain). Session 24 changed
# every split-KV decode kernel's ranges (split_range.h's split_chunk: a shorter sequence's splits
# share its own keys), compiled but never run, so the CUDA tests of the changed kernels come
# first: gqa_decode, the H2O score paths, block_sparse_decode, mla_decode, the determinism and
# graph cases (including the new width-invariance tests, which the old ranges would fail), and
# session 22's merged attention_scores split cap (compiled, never run). Then the ragged
# experiment (its "short" rows: the automatic split count should now be near the best forced
# one) and the decode and MLA tables with peers (full-length rows: their ranges are bit for bit
# session 22's; the MLA rows should match session 11's, README: B1 H128 S32768 0.038 ms, B32
# H128 0.088, B64 H16 0.154). Carry .peers. The kernel-switch re-runs: s24_call2.sh.
o=/tmp/c
rm -rf $o; mkdir -p $o  # (a machine can keep /tmp from an earlier call)
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "run:tests:200:PYTEST_K='(gqa_decode or mla_decode or block_sparse or bitwise or fixed_splits or graph or attention_scores or width) and not in_subprocess' bash bench/parallel_pytest.sh $o tests 'tests/test_ops.py tests/test_decode_score.py' 'tests/test_mla.py tests/test_block_sparse.py tests/test_determinism.py tests/test_cuda_graph.py' tests/test_eviction.py" \
 "run:ragged-default:90:python3 bench/experiments/ragged_decode.py --splits 2,4,8,16 $o/ragged-default.json" \
 "bench:decode:100" \
 "bench:mla:80"
