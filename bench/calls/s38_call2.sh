#!/usr/bin/env bash
# Session 38, call 2 (an H100; carry .peers). The fused H2O score epilogue keeps a CTA's P and
# bases in its own shared memory past the ring (GqaDecodeParams::score_p_local, the default;
# KVCORE_SCORE_P=scratch the old path through the workspace, read back at the end). B16 S8192:
# the 8-warp launch grows from 200 to 204 KB (P 64 KB + bases 8 KB past Q and the 128 KB ring),
# and 8 MB of P stores plus 8 MB of staging reads leave the DRAM stream. Predicted: H2O's
# overhead over plain decode at B16 +7.3-7.5% (s37) -> +4-5%; B1 S32768 (fused splits, 9 KB
# more per 4-warp CTA, still two an SM) within noise of +7.6-10.3%, its P being only 256 KB.
# Tests: the score file in-process, the new bitwise local/scratch comparison and misspelt switch,
# the file under KVCORE_SCORE_P=scratch, under KVCORE_DECODE_WARPS=8 and the epilogue kernel;
# eviction / graph / determinism / NaN. Then the eviction group's h2o rows, local and scratch
# alternated.
o=/tmp/c
rm -rf $o; mkdir -p $o
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=3"
tests="$py tests/test_decode_score.py -k 'not in_subprocess or local_matches_scratch or misspelt' > $o/t-score.log 2>&1 & \
 $py tests/test_decode_score.py -k 'p_scratch_in_subprocess' > $o/t-scratch.log 2>&1 & \
 $py tests/test_decode_score.py -k 'with_8_warps_in_subprocess or epilogue_kernel_in_subprocess' > $o/t-w8.log 2>&1 & \
 $py tests/test_eviction.py tests/test_cuda_graph.py tests/test_determinism.py tests/test_nan.py -k 'not in_subprocess' > $o/t-misc.log 2>&1; \
 wait; for f in score scratch w8 misc; do echo \"\$f: \$(tail -n 1 $o/t-\$f.log)\"; done"
e="python3 -m kvcore.bench --group eviction --impl kvcore,kvcore-score --no-plot"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build \
 "run:tests:260:$tests" \
 "run:ev-local-1:50:$e --out $o/ev-local-1" "run:ev-scratch-1:50:KVCORE_SCORE_P=scratch $e --out $o/ev-scratch-1" \
 "run:ev-local-2:50:$e --out $o/ev-local-2" "run:ev-scratch-2:50:KVCORE_SCORE_P=scratch $e --out $o/ev-scratch-2"
cat $o/stages.txt; for d in ev-local-1 ev-scratch-1 ev-local-2 ev-scratch-2; do echo "== $d"; grep -h "^| h2o" $o/$d/*.md; grep -h "overhead" $o/$d/*.md; done
