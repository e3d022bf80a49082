#!/usr/bin/env bash
# Session 38, call 6 (an H100): the score file at the final code (the merged misspelt-switch test,
# two corrected comments since call 3), in-process and the bitwise local / scratch comparison.
o=/tmp/c
rm -rf $o; mkdir -p $o
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=3"
tests="$py tests/test_decode_score.py -k 'not in_subprocess or local_matches_scratch or misspelt' > $o/t-score.log 2>&1; tail -n 2 $o/t-score.log"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-260} build "run:tests:90:$tests"
cat $o/stages.txt
