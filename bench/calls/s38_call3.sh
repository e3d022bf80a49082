#!/usr/bin/env bash
# Session 38, call 3 (an H100; carry .peers). With local P (call 2's change), the old score values
# are now staged right after the loop, before the warps' merge, instead of after it (their round
# trip overlaps the merge; with the scratch path they still wait for the P stores' visibility).
# Predicted: B16 score ~0.5-1 us faster than call 2's local form (-> ~+4.5% over plain), B1 ~0.5
# us. Tests as call 2 (the score file in-process, the bitwise local / scratch comparison, the file
# under KVCORE_SCORE_P=scratch; eviction / graph / determinism / NaN), then the eviction group's
# h2o rows, local and scratch alternated, then bench/experiments/read_ceiling.py: the best plain
# read of B16 S8192's 537 MB on an H100 (only H200s had it), the ceiling any decode kernel and
# cuDNN share there.
o=/tmp/c
rm -rf $o; mkdir -p $o
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=3"
tests="$py tests/test_decode_score.py -k 'not in_subprocess or local_matches_scratch or misspelt' > $o/t-score.log 2>&1 & \
 $py tests/test_decode_score.py -k 'p_scratch_in_subprocess or with_8_warps_in_subprocess' > $o/t-scratch.log 2>&1 & \
 $py tests/test_eviction.py tests/test_cuda_graph.py tests/test_determinism.py tests/test_nan.py -k 'not in_subprocess' > $o/t-misc.log 2>&1; \
 wait; for f in score scratch misc; do echo \"\$f: \$(tail -n 1 $o/t-\$f.log)\"; done"
e="python3 -m kvcore.bench --group eviction --impl kvcore,kvcore-score --no-plot"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build \
 "run:tests:200:$tests" \
 "run:ev-local-1:50:$e --out $o/ev-local-1" "run:ev-scratch-1:50:KVCORE_SCORE_P=scratch $e --out $o/ev-scratch-1" \
 "run:ev-local-2:50:$e --out $o/ev-local-2" "run:ev-scratch-2:50:KVCORE_SCORE_P=scratch $e --out $o/ev-scratch-2" \
 "run:read-ceiling:120:python3 bench/experiments/read_ceiling.py $o/read_ceiling.json"
cat $o/stages.txt; for d in ev-local-1 ev-scratch-1 ev-local-2 ev-scratch-2; do echo "== $d"; grep -h "^| h2o" $o/$d/*.md; done
tail -n 30 $o/read-ceiling.log
