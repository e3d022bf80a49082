#!/usr/bin/env bash
# Prepared in session 23 and not run there (every start was refused). Next session's first call:
# build; the attention_scores
# CUDA cases (session 22's read-back merged its two split caps into one: compiled, never run);
# gqa_decode on ragged batches under the default, KVCORE_DECODE_KERNEL=page8 and
# KVCORE_DECODE_WARPS=4 (bench/experiments/ragged_decode.py: does a shape-only pick of one CTA per
# sequence lose where lengths differ?); the decode table with peers. Carry .peers.
o=/tmp/c
rm -rf $o; mkdir -p $o  # (a machine can keep /tmp from an earlier call)
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build \
 "tests:90:tests/test_eviction.py,tests/test_scores_variant.py:attention_scores and not in_subprocess" \
 "run:ragged-default:90:python3 bench/experiments/ragged_decode.py --splits 2,4,8,16 $o/ragged-default.json" \
 "run:ragged-page8:60:KVCORE_DECODE_KERNEL=page8 python3 bench/experiments/ragged_decode.py $o/ragged-page8.json" \
 "bench:decode:100" \
 "run:ragged-warps4:60:KVCORE_DECODE_WARPS=4 python3 bench/experiments/ragged_decode.py $o/ragged-warps4.json"
