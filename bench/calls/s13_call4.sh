#!/usr/bin/env bash
# Session 13, device call 4 (carry .peers): the tables at the session's final code with their peers
# (decode: FlashInfer and cuDNN / flash SDPA; block: flex_attention, gather + SDPA; retrieval: the
# torch pipeline; eviction), then the whole CUDA test suite in 4 shards.
o=/tmp/c
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-540} build \
 "bench:decode:80" \
 "run:block:70:python3 -m kvcore.bench --group block --impl kvcore,torch,gather+sdpa,flex_attention --out $o/block" \
 "bench:retrieval:30" \
 "bench:eviction:30" \
 "ptests:200:4"
