#!/usr/bin/env bash
# Session 36, call 8 (an H100, no carry): does the 4-head page-major rule hold beyond the shape it
# was measured at (B64 Hq32 Hkv8 S4096)? bench/experiments/page_major_rule.py at the library's
# code: each equal-length shape without the hint (the head kernel) and with it (the rule's pick):
# B64 at S1024 and S16384 (1,024 pages a CTA: past the page sort's 512, so table order), B66 /
# B60 (the rule's fill edges) and B56 (left to the head kernel), group 8 (B64 Hq64), 4 KV heads
# (B128 Hq32 / Hq16 Hkv4: 128 4-head CTAs), and session 28's rows for the 8-head rule.
# Predicted: the hinted column 0.5-1.5% faster wherever the rule fires, level where it does not.
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-500} build \
 "run:rule:300:cd bench/experiments && python3 page_major_rule.py $o/rule.json"
cat $o/rule.log
