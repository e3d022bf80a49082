#!/usr/bin/env bash
# Session 19, device call 3: the CUDA tests of every other file that reaches gqa_decode's or
# block_sparse_decode's split merge or split count (call 2 ran test_ops, test_block_sparse,
# test_cuda_graph, test_decode_score, test_nan, test_determinism, test_block_transformer).
# Build, then four processes. (test_mla, test_transformers_mla, the token decoder's and
# attention_scores' variant re-runs and test_cpu_isa do not reach the changed code.)
o=/tmp/c
rm -rf $o; mkdir -p $o  # (a machine can keep /tmp from an earlier call)
T="-m cuda -q -p no:cacheprovider -rfE"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "run:tests:380:python3 -m pytest tests/test_eviction.py $T > $o/t-evict.log 2>&1 & python3 -m pytest tests/test_retrieval.py tests/test_transformers_infllm.py tests/test_decode_workspace.py $T > $o/t-retr.log 2>&1 & python3 -m pytest tests/test_transformers_integration.py tests/test_properties.py tests/test_compile.py tests/test_bad_input_doc.py $T > $o/t-hf.log 2>&1 & python3 -m pytest tests/test_bench.py tests/test_bench_e2e.py tests/test_readme_examples.py tests/test_cache.py tests/test_scale.py tests/test_reference.py $T > $o/t-bench.log 2>&1 & wait; tail -n 3 $o/t-*.log"
