#!/usr/bin/env bash
# Session 12, device call 1. Two changes, each behind an A/B switch:
# (a) the H2O score epilogue fused into gqa_decode (KVCORE_SCORE_EPILOGUE=fused, the new default:
#     each CTA adds its own keys once its pair's splits have all published, cooperative one-wave
#     grid; P stored without shuffles), against the epilogue kernel (=narrow);
# (b) page groups for the copy slots of gqa_decode (KVCORE_DECODE_PAGE_GROUPS=on, new default)
#     and block_sparse_decode (KVCORE_SPARSE_PAGE_DEDUP=on: pairs before, whole groups now).
# Tests first (decode, score, block-sparse), then the tables A/B, then the subprocess switch tests.
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-450} build \
 "run:tests:120:$T tests/test_ops.py tests/test_decode_score.py tests/test_block_sparse.py -k 'not in_subprocess'" \
 "bench:eviction:30" \
 "run:ev-narrow:30:KVCORE_SCORE_EPILOGUE=narrow python3 -m kvcore.bench --group eviction --out $o/ev-narrow" \
 "run:decode:40:python3 -m kvcore.bench --group decode --impl kvcore --out $o/decode" \
 "run:decode-off:40:KVCORE_DECODE_PAGE_GROUPS=off python3 -m kvcore.bench --group decode --impl kvcore --out $o/decode-off" \
 "run:block:30:python3 -m kvcore.bench --group block --impl kvcore --out $o/block" \
 "run:ev-fused2:30:python3 -m kvcore.bench --group eviction --out $o/ev-fused2" \
 "run:splits:40:python3 bench/experiments/splits_probe.py $o/splits.json" \
 "run:sub:150:$T tests/test_decode_score.py tests/test_ops.py -k 'in_subprocess or misspelt'"
