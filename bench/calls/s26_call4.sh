#!/usr/bin/env bash
# Session 26, fourth call (H100, run inline as one command; kept here as run): the automatic
# split count against forced ones (auto_splits_check.py) and the ragged experiment under
# KVCORE_DECODE_WARPS=8.
o=/tmp/c; rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o 200 build \
 "run:splits:60:python3 bench/experiments/auto_splits_check.py $o/splits.json" \
 "run:ragged-w8:40:KVCORE_DECODE_WARPS=8 python3 bench/experiments/ragged_decode.py --splits 2,4,8,16 $o/ragged-w8.json"
