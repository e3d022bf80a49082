#!/usr/bin/env bash
# Session 35, call 3 (an H100). Call 2's H100 (copy 3,054 GB/s) had kvcore behind cuDNN SDPA at
# B128 S2048 (350 / 344 us, 1.017; session 34's H100: 0.999) and B64 S4096 (1.005). Which
# gqa_decode kernel is fastest there on this machine: the default (B128: the page-major kernel
# with 8 KV heads a CTA, which the benchmark's equal lengths select; B64: the 4-warp kernel),
# KVCORE_DECODE_KERNEL=head (the 4-warp kernel, 3-stage ring), KVCORE_DECODE_KERNEL=page8 (B64:
# the page-major kernel with splits) and KVCORE_DECODE_WARPS=8 (the 8-warp kernel); decode group,
# seeds 0-2, cuDNN SDPA beside the default. Then the CUDA tests of the other files that reach
# gqa_decode's launcher (block-sparse, retrieval, eviction, score, cache and API files), which
# calls 1-2 did not run at this code.
o=/tmp/c
rm -rf $o; mkdir -p $o
b="python3 -m kvcore.bench --group decode --no-plot"
ab=()
for seed in 0 1 2; do
  ab+=("run:auto-$seed:40:$b --impl kvcore,sdpa-cudnn --seed $seed --out $o/auto-$seed")
  ab+=("run:head-$seed:30:KVCORE_DECODE_KERNEL=head $b --impl kvcore --seed $seed --out $o/head-$seed")
  ab+=("run:page8-$seed:30:KVCORE_DECODE_KERNEL=page8 $b --impl kvcore --seed $seed --out $o/page8-$seed")
  ab+=("run:warps8-$seed:30:KVCORE_DECODE_WARPS=8 $b --impl kvcore --seed $seed --out $o/warps8-$seed")
done
med="python3 bench/experiments/decode_medians.py"
meds="for v in auto head page8 warps8; do echo \"== \$v\"; $med $o/\$v-0/*.json $o/\$v-1/*.json $o/\$v-2/*.json; done"
py="timeout 170 python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=5 -k 'not in_subprocess'"
tests="$py tests/test_block_sparse.py tests/test_decode_score.py > $o/tests-a.log 2>&1 & \
 $py tests/test_retrieval.py tests/test_eviction.py > $o/tests-b.log 2>&1 & \
 $py tests/test_cache.py tests/test_api_edges.py tests/test_properties.py tests/test_scale.py tests/test_block_transformer.py > $o/tests-c.log 2>&1; \
 wait; for f in a b c; do tail -n 2 $o/tests-\$f.log; done"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build "${ab[@]}" \
 "run:medians:20:$meds" "run:tests:180:$tests"
cat $o/medians.log
