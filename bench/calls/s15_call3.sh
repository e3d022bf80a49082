#!/usr/bin/env bash
# Session 15, device call 3: the lean token decoder's compact copy table (3 CTAs per SM at L16):
# the block group at the new default against the classic kernel (the old pick at L16), then the
# token-decoder tests (each switch setting of test_token_decoder_variant.py in its own process,
# in parallel) next to the suite files call 1 did not finish (test_reference, test_determinism).
o=/tmp/c
f=tests/test_token_decoder_variant.py
pt="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-570} build \
 "run:blk-default:80:python3 -m kvcore.bench --group block --impl kvcore --out $o/blk-default" \
 "run:blk-classic:80:KVCORE_TOKEN_DECODER_VARIANT=classic python3 -m kvcore.bench --group block --impl kvcore --out $o/blk-classic" \
 "run:blk-default2:80:python3 -m kvcore.bench --group block --impl kvcore --out $o/blk-default2" \
 "run:tests:300:for id in variant=classic variant=lean variant=lean-wide stages=3 stages=2; do $pt \"$f::test_variant_passes_the_token_decoder_cuda_tests[\$id]\" > $o/td-\$id.log 2>&1 & done; $pt $f -k 'agrees or unknown' > $o/td-agree.log 2>&1 & $pt tests/test_block_transformer.py -k token_decoder > $o/td-main.log 2>&1 & $pt tests/test_reference.py tests/test_determinism.py > $o/ref-det.log 2>&1; wait; for x in $o/td-*.log $o/ref-det.log; do echo \"\$x: \$(tail -1 \$x)\"; done"
