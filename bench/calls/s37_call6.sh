#!/usr/bin/env bash
# Session 37, call 6 (an H100; carry .peers). gqa_decode(score=...) now runs the kernel plain decode
# would: the 8-warp one where use_wide_decode says so (B16 Hkv8), launched with 200 KB of shared
# memory so that its fused score epilogue stages a CTA's 8192 keys past the merge area
# (WideScoreConfig). Predicted: H2O B16 0.196 -> ~0.182-0.185 ms (overhead over plain 0.178: ~+10%
# -> +2-4%), B1 unchanged (+9.6%, the 4-warp split kernel in both). The score tests in-process
# (the new one-pair-per-SM test: out/lse bitwise plain decode's at B16 S1000 / S8192 fused and
# S16384 through the epilogue kernel), the file under KVCORE_DECODE_WARPS=8 (every score case on
# the 8-warp kernel) and the two epilogue switches, the eviction / graph / determinism / NaN files,
# then the eviction group twice.
o=/tmp/c
rm -rf $o; mkdir -p $o
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=3"
tests="$py tests/test_decode_score.py -k 'not in_subprocess' > $o/t-score.log 2>&1 & \
 $py tests/test_decode_score.py -k 'with_8_warps_in_subprocess' > $o/t-w8.log 2>&1 & \
 $py tests/test_decode_score.py -k 'epilogue_in_subprocess or epilogue_kernel_in_subprocess' > $o/t-epi.log 2>&1 & \
 $py tests/test_eviction.py tests/test_cuda_graph.py tests/test_determinism.py tests/test_nan.py -k 'not in_subprocess' > $o/t-misc.log 2>&1; \
 wait; for f in score w8 epi misc; do echo \"\$f: \$(tail -n 1 $o/t-\$f.log)\"; done"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build \
 "run:tests:300:$tests" "bench:eviction:60" \
 "run:eviction2:60:python3 -m kvcore.bench --group eviction --impl kvcore,kvcore-score --no-plot --out $o/eviction2"
cat $o/stages.txt; grep -h "^| h2o" $o/eviction/*.md $o/eviction2/*.md; grep -h "overhead" $o/eviction/*.md $o/eviction2/*.md
