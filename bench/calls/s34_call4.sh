#!/usr/bin/env bash
# Session 34, call 4: the library's 8-warp kernel (B16) with a 2-stage ring (WideDecodeConfig
# <128, 2, 8>; call 3's decode_trace: B16 in order 178.8-179.0 -> 175.8-175.9 us, random with
# ORDER 180.3-180.6 -> 178.2). Build, then the decode group with kvcore and cuDNN SDPA in one run.
# Predicted: B16 kvcore / cuDNN from session 33's 1.019 (random) / 1.011 (in order) to ~1.006 /
# ~0.995; every other row unchanged (they run the 4-warp kernel).
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-300} build \
 "run:decode:150:python3 -m kvcore.bench --group decode --impl kvcore,sdpa-cudnn --no-plot --out $o/decode"
grep "^| " $o/decode.log
