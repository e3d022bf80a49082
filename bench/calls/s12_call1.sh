#!/usr/bin/env bash
# Session 12, device call 1. The H2O score epilogue fused into gqa_decode (KVCORE_SCORE_EPILOGUE=
# fused, the new default: each CTA adds its own keys once its pair's splits have all published,
# cooperative one-wave grid; P stored without shuffles): its tests (the fused and fallback grids,
# graph replay, the two epilogue-kernel switch values in subprocesses), racecheck / memcheck of
# the scratch grid, then the eviction table A/B/A (fused, narrow, fused) and an ncu source
# profile of the fused H2O B16 kernel.
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
SK="scratch_grid and bf16"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build \
 "run:score-tests:90:$T tests/test_decode_score.py -k 'not in_subprocess'" \
 "bench:eviction:30" \
 "run:ev-narrow:30:KVCORE_SCORE_EPILOGUE=narrow python3 -m kvcore.bench --group eviction --out $o/ev-narrow" \
 "run:ev-fused2:30:python3 -m kvcore.bench --group eviction --out $o/ev-fused2" \
 "run:score-sub:150:$T tests/test_decode_score.py -k 'in_subprocess or misspelt'" \
 "run:race-score:60:KVCORE_SANITIZE_FILES=tests/test_decode_score.py KVCORE_SANITIZE_K='$SK' bash bench/sanitize.sh $o/race-score racecheck memcheck" \
 "run:ncu-src-h2o:60:NCU_SOURCE=1 bash bench/experiments/ncu_pack.sh $o/ncu-src-h2o h2o_B16"
