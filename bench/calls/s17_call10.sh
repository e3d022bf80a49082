#!/usr/bin/env bash
# Session 17, device call 10: build at the final code; the CUDA tests of the files that call
# gqa_decode / block_sparse_decode through other layers (retrieval, the transformers adapters,
# eviction's H2O score, the e2e bench, compile, README examples, bad-input doc, scale), which
# call 9 did not run; four processes.
o=/tmp/c
mkdir -p $o
T="-m cuda -q -p no:cacheprovider -rfE"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-570} build \
 "run:tests:420:python3 -m pytest tests/test_retrieval.py tests/test_transformers_infllm.py $T > $o/t-ret.log 2>&1 & python3 -m pytest tests/test_transformers_integration.py tests/test_bench_e2e.py tests/test_compile.py $T > $o/t-hf.log 2>&1 & python3 -m pytest tests/test_eviction.py $T > $o/t-ev.log 2>&1 & python3 -m pytest tests/test_readme_examples.py tests/test_bad_input_doc.py tests/test_reference.py tests/test_scale.py tests/test_cache.py $T > $o/t-misc.log 2>&1 & wait; tail -n 3 $o/t-*.log"
