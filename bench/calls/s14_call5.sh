#!/usr/bin/env bash
# Session 14, device call 5: the block group with its peers at the new token-decoder default (the
# README table), then the whole CUDA suite in four shards (the merged CPU ISA work registers a new
# op; the token-decoder configuration tests run four settings now).
o=/tmp/c
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-570} build \
 "run:block:150:python3 -m kvcore.bench --group block --impl kvcore,torch,gather+sdpa,flex_attention --out $o/block" \
 "ptests:330:4"
