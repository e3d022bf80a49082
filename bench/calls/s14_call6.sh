#!/usr/bin/env bash
# Session 14, device call 6. Call 5's suite failed test_token_decoder_variant's STAGES=3 run: a
# forced depth that did not fit a block (L48 P16 D256: 3 x 112 KB) raised instead of running the
# other depth. After the fix: the token-decoder CUDA tests under each forced depth, directly (one
# process each), then the variant file's agreement and bad-switch tests.
o=/tmp/c
SEL="(token_decoder and (cuda or graph)) or bf16_tracks"
T="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE tests/test_block_transformer.py tests/test_nan.py tests/test_cuda_graph.py"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-400} build \
 "run:td-s3:120:KVCORE_TOKEN_DECODER_STAGES=3 $T -k '$SEL'" \
 "run:td-s2:120:KVCORE_TOKEN_DECODER_STAGES=2 $T -k '$SEL'" \
 "run:td-auto:120:$T -k '$SEL'" \
 "run:td-var:200:python3 -m pytest -m cuda -q -p no:cacheprovider -rfE tests/test_token_decoder_variant.py -k 'agrees or unknown'"
