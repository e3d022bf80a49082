#!/usr/bin/env bash
# Session 37, call 4 (an H100; carry .peers). After ede42cc (the transformers adapter no longer
# holds every layer's K/V states for a whole step): the e2e group, whose B8 S32768 row ran out of
# memory on this 80 GB GPU in call 2; issue 7's target is on an H100 (kvcore >= 1.5x sdpa, SnapKV
# at 2048 >= 4x). Predicted: the B8 rows run (peak ~51 GB: weights 15 + pool 34 + a layer's
# states). Then the CUDA tests of the adapter (integration, InfLLM, MLA adapters, the e2e bench's
# tests), and H2O's overhead against the 4-warp plain kernel (the scored decode runs the 4-warp
# kernel; plain B16 the 8-warp one): eviction's kvcore rows with KVCORE_DECODE_WARPS=4.
o=/tmp/c
rm -rf $o; mkdir -p $o
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=5"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build \
 "bench:e2e:240" \
 "run:tests:150:$py tests/test_transformers_integration.py tests/test_transformers_infllm.py tests/test_transformers_mla.py tests/test_bench_e2e.py" \
 "run:h2o-w4:60:KVCORE_DECODE_WARPS=4 python3 -m kvcore.bench --group eviction --impl kvcore --no-plot --out $o/h2o-w4"
cat $o/stages.txt; tail -n 3 $o/tests.log; grep -h "^| h2o" $o/h2o-w4/*.md
