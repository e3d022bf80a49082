#!/usr/bin/env bash
# Session 36, call 5 (an H100, likely another machine than call 4's; carry .peers for the bench's
# FlashInfer import only). The same code as call 4 (tests aside): the decode group three times
# (kvcore and cuDNN SDPA, seeds 0-2) for a second machine's medians; the page-major rule test as
# fixed after call 4 (at the 4-head batch the unequal hint moves the head kernel's split count,
# so auto's unequal call is compared with the head switch's same call); and the CUDA tests of the
# other files that reach gqa_decode's launcher, in-process.
o=/tmp/c
rm -rf $o; mkdir -p $o
b="python3 -m kvcore.bench --group decode --no-plot --impl kvcore,sdpa-cudnn"
ab=()
for seed in 0 1 2; do ab+=("run:auto-$seed:40:$b --seed $seed --out $o/auto-$seed"); done
med="python3 bench/experiments/decode_medians.py"
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=5"
tests="$py tests/test_ops.py -k 'equal_lengths_take_page_major' > $o/tests-rule.log 2>&1 & \
 $py tests/test_block_sparse.py tests/test_decode_score.py -k 'not in_subprocess' > $o/tests-a.log 2>&1 & \
 $py tests/test_retrieval.py tests/test_eviction.py -k 'not in_subprocess' > $o/tests-b.log 2>&1 & \
 $py tests/test_cache.py tests/test_api_edges.py tests/test_properties.py tests/test_scale.py tests/test_block_transformer.py tests/test_nan.py tests/test_determinism.py -k 'not in_subprocess' > $o/tests-c.log 2>&1; \
 wait; for f in rule a b c; do echo \"\$f: \$(tail -n 1 $o/tests-\$f.log)\"; done"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build "${ab[@]}" \
 "run:medians:20:$med $o/auto-0/*.json $o/auto-1/*.json $o/auto-2/*.json" "run:tests:300:$tests"
cat $o/medians.log
