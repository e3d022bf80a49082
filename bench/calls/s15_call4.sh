#!/usr/bin/env bash
# Session 15, device call 4: the block group with its peers at the new token-decoder default
# (lean kernel, compact copy table, 3 CTAs per SM at L16): the README table.
o=/tmp/c
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-300} build \
 "run:block:150:python3 -m kvcore.bench --group block --impl kvcore,torch,gather+sdpa,flex_attention --out $o/block"
