#!/usr/bin/env bash
# Session 28, call 1 (carry .peers): gqa_decode's `auto` kernel choice, first run: a hint of equal
# lengths whose unsplit 8-KV-head blocks fill one wave (B128 Hkv8 on 132 SMs) runs the page-major
# kernel. Predicted: B128 S2048 359 -> ~354 us (session 26's page8 switch run), every other decode
# row unchanged. Build; the gqa_decode / plan CUDA tests (session 27's review fixes' first GPU run
# too); the new auto-rule test (three processes); page_major_rule.py under auto and under page8
# (where the rule's edges should be); ragged_decode (auto, hint); the decode table with peers.
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-570} build \
 "run:tests:90:PYTEST_K='(gqa_decode or plan) and not in_subprocess' bash bench/parallel_pytest.sh $o tests tests/test_ops.py" \
 "run:rule-test:80:python3 -m pytest tests/test_ops.py -m cuda -q -p no:cacheprovider -rfE -k 'equal_lengths_take_page_major or misspelt'" \
 "run:rule:90:python3 bench/experiments/page_major_rule.py $o/rule-auto.json" \
 "run:rule8:80:KVCORE_DECODE_KERNEL=page8 python3 bench/experiments/page_major_rule.py $o/rule-page8.json" \
 "bench:decode:100" \
 "run:ragged:50:python3 bench/experiments/ragged_decode.py $o/ragged.json"
