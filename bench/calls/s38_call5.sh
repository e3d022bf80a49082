#!/usr/bin/env bash
# Session 38, call 5 (an H100). The transformers adapter's prefill SDPA in chunks of query rows
# (d55f36b) on CUDA: the new bf16 chunk test and every CUDA test of the three adapter files and the
# e2e bench (which prefill through the model).
o=/tmp/c
rm -rf $o; mkdir -p $o
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=3"
tests="$py tests/test_transformers_integration.py tests/test_transformers_infllm.py tests/test_transformers_mla.py tests/test_bench_e2e.py > $o/t-adapters.log 2>&1; tail -n 3 $o/t-adapters.log"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-330} build "run:tests:160:$tests"
cat $o/stages.txt
