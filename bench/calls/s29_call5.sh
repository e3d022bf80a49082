#!/usr/bin/env bash
# Session 29, call 5: the CUDA tests that reach mla_decode's plan after choose_splits_dominant
# (the hint now reaches the 32- and 64-head kernels: MLAAttention.decode passes it), in three
# processes: test_mla.py (not in_subprocess); test_transformers_mla.py + test_cuda_graph.py +
# test_determinism.py + test_nan.py (mla cases); test_ops.py's gqa_decode / plan cases (plan_splits
# gained a parameter; gqa's plans must be unchanged).
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build \
 "run:tests:200:PYTEST_K='not in_subprocess' bash bench/parallel_pytest.sh $o t tests/test_mla.py 'tests/test_transformers_mla.py tests/test_api_edges.py' && PYTEST_K='(mla or gqa_decode or plan) and not in_subprocess' bash bench/parallel_pytest.sh $o u 'tests/test_cuda_graph.py tests/test_determinism.py tests/test_nan.py' 'tests/test_ops.py'"
