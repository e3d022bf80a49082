#!/usr/bin/env bash
# Session 36, call 4 (an H100; carry .peers). The library now runs (a) the page-major kernel's
# ORDER instance (pages in cache order) wherever the page-major kernel serves 16-token pages, and
# (b) under `auto`, the page-major kernel with 4 KV heads a CTA where unsplit 4-head blocks fill
# the SMs once (B64 Hkv8 on 132 SMs), planned one CTA an SM. decode_trace (calls 1-3, one H100):
# B128 page8 342.3 -> 340.7 us in cache order; B64 as unsplit 4-head CTAs in cache order 340.9
# against the head kernel's 344.5. Here: the decode group three times (kvcore and cuDNN SDPA,
# seeds 0-2) alternated with KVCORE_DECODE_KERNEL=head (kvcore alone: the head kernel, the
# previous default at B64); the full decode table (every peer); then the CUDA tests of the
# page-major kernels (the page8 / page4 / page2 reruns, the rule and page-order subprocess tests)
# and the decode files in-process. Predicted (medians): B64 ~-1% against the head kernel, level
# with or ahead of cuDNN; B128 ~-0.5%; the other points unchanged.
o=/tmp/c
rm -rf $o; mkdir -p $o
b="python3 -m kvcore.bench --group decode --no-plot"
ab=()
for seed in 0 1 2; do
  ab+=("run:auto-$seed:40:$b --impl kvcore,sdpa-cudnn --seed $seed --out $o/auto-$seed")
  ab+=("run:head-$seed:30:KVCORE_DECODE_KERNEL=head $b --impl kvcore --seed $seed --out $o/head-$seed")
done
med="python3 bench/experiments/decode_medians.py"
meds="for v in auto head; do echo \"== \$v\"; $med $o/\$v-0/*.json $o/\$v-1/*.json $o/\$v-2/*.json; done"
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=5"
tests="$py tests/test_ops.py -k 'test_gqa_decode_page_major_in_subprocess and page8' > $o/tests-p8.log 2>&1 & \
 $py tests/test_ops.py -k 'test_gqa_decode_page_major_in_subprocess and page4' > $o/tests-p4.log 2>&1 & \
 $py tests/test_ops.py -k 'test_gqa_decode_page_major_in_subprocess and page2' > $o/tests-p2.log 2>&1 & \
 $py tests/test_ops.py -k 'equal_lengths or page_major_page_order or page_order_switch or page_order_cuda or page_order_full' > $o/tests-rule.log 2>&1 & \
 $py tests/test_ops.py tests/test_cuda_graph.py tests/test_decode_workspace.py -k 'not in_subprocess' > $o/tests-decode.log 2>&1; \
 wait; for f in p8 p4 p2 rule decode; do echo \"\$f: \$(tail -n 1 $o/tests-\$f.log)\"; done"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build "${ab[@]}" \
 "run:medians:20:$meds" "bench:decode:100" "run:tests:400:$tests"
cat $o/medians.log
