#!/usr/bin/env bash
# Session 39, call 2 (an H100; carry .peers). Call 1's page_bands put the ORDER kernels' own cost
# at ~2 us at B32 Hq64 (auto on an in-order table 341.3 against the table's-order kernel's 339.2;
# on a random table 342.4 against a host-sorted table read in order, 340.7) and 0.3-0.8 us at B16
# / B64: the sort ran before the loop with only tile 0 in flight, so tile 1's copies waited for
# it. Now the ORDER kernels read the first STAGES tiles in the table's order and sort after tile
# 0's compute, while tile STAGES - 1 is in flight. Predicted: auto ~= table on in-order tables
# (within 0.3 us) and auto random ~= table sorted (B32 Hq64 342.4 -> ~341, B16 175.4 -> ~175.1).
# Then issue 2's decode table at this code (every peer), two kvcore + cuDNN runs for medians,
# and the CUDA tests of the page-order paths and the decode suite.
o=/tmp/c
rm -rf $o; mkdir -p $o
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=3"
pb="python3 bench/experiments/page_bands.py"
tests="$py tests/test_ops.py -k 'equal_lengths or page_major_page_order or page_order_switch or page_order_cuda or page_order_full or table_page_order or with_8_warps_in_subprocess' > $o/t-order.log 2>&1 & \
 $py tests/test_ops.py -k 'gqa_decode and not subprocess' > $o/t-decode.log 2>&1 & \
 $py tests/test_decode_workspace.py tests/test_cuda_graph.py tests/test_determinism.py tests/test_nan.py -k 'not in_subprocess' > $o/t-misc.log 2>&1; \
 wait; for f in order decode misc; do echo \"\$f: \$(tail -n 1 $o/t-\$f.log)\"; done"
d="python3 -m kvcore.bench --group decode --no-plot --impl kvcore,sdpa-cudnn"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build \
 "run:bands-auto:60:$pb $o/bands-auto.json" \
 "run:bands-table:60:KVCORE_DECODE_PAGE_ORDER=table $pb $o/bands-table.json" \
 "bench:decode:120" \
 "run:med-1:60:$d --seed 1 --out $o/med-1" "run:med-2:60:$d --seed 2 --out $o/med-2" \
 "run:tests:170:$tests"
cat $o/stages.txt; for m in auto table; do echo "== $m"; grep -h "order=" $o/bands-$m.log; done
cat $o/tests.log; grep -h "^|" $o/decode/*.md | head -30
python3 bench/experiments/decode_medians.py $o/decode/*.json $o/med-1/*.json $o/med-2/*.json 2>&1 | tail -40
