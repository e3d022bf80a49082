#!/usr/bin/env bash
# Session 24's second prepared call (after s24_call1.sh): the split-KV decode kernels' CUDA tests
# under each kernel switch (bench/calls/s24_variants.sh: 8 warps, page-major, TMA, no page
# groups, the score epilogue kernel, mla_decode's wgmma switches and old H16 path, each re-run in
# its own process, all at once), then the ragged experiment under KVCORE_DECODE_KERNEL=page8 and
# KVCORE_DECODE_WARPS=4.
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "run:variants:320:bash bench/calls/s24_variants.sh $o" \
 "run:ragged-page8:60:KVCORE_DECODE_KERNEL=page8 python3 bench/experiments/ragged_decode.py $o/ragged-page8.json" \
 "run:ragged-warps4:60:KVCORE_DECODE_WARPS=4 python3 bench/experiments/ragged_decode.py $o/ragged-warps4.json"
