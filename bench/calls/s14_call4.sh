#!/usr/bin/env bash
# Session 14, device call 4. The token decoder (issue 4: 65-67% of copy, target 85%), counted as
# issue-bound at 8 warps per SM: a two-stage ring (KVCORE_TOKEN_DECODER_STAGES=2) fits more CTAs
# per SM (classic L16 D128: 3 instead of 2, registers permitting; L4 D64: 4 instead of 3?). Each variant in its own
# process, the default first and last; then the token decoder's CUDA tests with two stages.
o=/tmp/c
K="python3 -m kvcore.bench --impl kvcore --group block"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build \
 "run:blk-def:30:$K --out $o/blk-def" \
 "run:blk-s2-classic:30:KVCORE_TOKEN_DECODER_STAGES=2 KVCORE_TOKEN_DECODER_VARIANT=classic $K --out $o/blk-s2-classic" \
 "run:blk-s2-lean:30:KVCORE_TOKEN_DECODER_STAGES=2 KVCORE_TOKEN_DECODER_VARIANT=lean $K --out $o/blk-s2-lean" \
 "run:blk-s3-classic:30:KVCORE_TOKEN_DECODER_STAGES=3 KVCORE_TOKEN_DECODER_VARIANT=classic $K --out $o/blk-s3-classic" \
 "run:blk-def2:30:$K --out $o/blk-def2" \
 "run:t-s2:150:KVCORE_TOKEN_DECODER_STAGES=2 python3 -m pytest -m cuda -q -p no:cacheprovider -rfE tests/test_block_transformer.py tests/test_nan.py -k 'token_decoder'"
