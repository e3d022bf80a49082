#!/usr/bin/env bash
# Session 15, device call 1: the read ceiling at each small-read target's bytes
# (bench/experiments/read_ceiling.py), then the whole CUDA suite in six shards (not completed
# in sessions 13-14; the CPU kernels were reworked in session 14 and the CUDA build compiles them).
o=/tmp/c
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-575} build \
 "run:ceiling:120:python3 bench/experiments/read_ceiling.py $o/ceiling.json" \
 "ptests:400:6"
