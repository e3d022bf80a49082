#!/usr/bin/env bash
# Session 29, call 4 (carry .peers). Build; (a) mla_decode's compute-bound plan rule (split_plan.h's
# choose_splits_dominant, from call 1's forced counts): the mla plan tests (a new one reads the
# plan back through forced counts' bits) and the gqa_decode plan tests (plan_splits gained a
# parameter), then ragged_mla.py: its "hint" column should now be the doubled count's time on the
# one-long rows above 16 heads (B64 H32 ~64 us, B32 H128 ~67, B16 H128 ~109) and "auto"'s on the
# others; (b) page_order.py: kvcore and FlashInfer through a random and a sequential block table
# over the same caches, cuDNN SDPA on contiguous K/V, at issue 2's six grid points. Predicted from
# decode_trace (sessions 17 and 27): kvcore ~1.4% faster with the sequential table.
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-480} build \
 "run:tests:100:python3 -m pytest tests/test_mla.py tests/test_ops.py -m cuda -q -p no:cacheprovider -rfE -k '(plan and not in_subprocess) or dominant'" \
 "run:order:120:python3 bench/experiments/page_order.py $o/page_order.json" \
 "run:ragged:90:python3 bench/experiments/ragged_mla.py $o/ragged_mla.json"
