#!/usr/bin/env bash
# Session 38, call 4 (an H100). compute-sanitizer over the score path's new shared-memory use
# (local P: the loop's P and base stores past the ring; the old values' early cp.async past the
# merge area while the warps fill it): memcheck, racecheck, initcheck and synccheck over the score
# file's fused cases, unsplit (a pair per SM at S1000 on the 8-warp kernel) and split (cooperative
# grids), bf16.
o=/tmp/c
rm -rf $o; mkdir -p $o
export KVCORE_SANITIZE_FILES=tests/test_decode_score.py
export KVCORE_SANITIZE_K="(score_splits_cuda and bf16) or (score_scratch_grid_cuda and bf16) or fused_and_fallback_grids or (one_pair_per_sm and fused and not b16)"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build \
 "sanitize:all:memcheck,synccheck,initcheck,racecheck:400"
cat $o/stages.txt
