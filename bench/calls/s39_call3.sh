#!/usr/bin/env bash
# Session 39, call 3 (an H100; carry .peers). Call 2's late sort (the ORDER kernels sorting after
# tile 0) was no better and is reverted: on in-order tables the ORDER kernel still took 0.5-2.9 us
# more than the table's-order kernel (B32 Hq64 347.3 against 344.4). Counted since: the bitonic
# sort ran every one of its 1,024 slots whatever the split's pages (512 at S8192: half pads; 64 at
# B1 S32768's splits: seven eighths), ~4 us a 4-warp CTA at 512 pages, more than tile 0's flight
# at start-up. Now only the slots of the first np elements take part. And an A/B switch,
# KVCORE_DECODE_PAGE_ORDER=unsorted, runs the ORDER kernel without its sort (the list in the
# table's order). Predicted: auto on the in-order table ~= unsorted ~= table if the sort was the
# cost (B32 Hq64 in order within ~0.5 us of table; random B32 Hq64 ~1-2 us faster than call 1's
# 342.4 against cuDNN's ~341.5); unsorted ~= old auto if the ORDER loop is. Then issue 2's decode
# table at the code that lands, two kvcore + cuDNN runs for medians, and the page-order tests at
# the default and under unsorted.
o=/tmp/c
rm -rf $o; mkdir -p $o
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=3"
pb="python3 bench/experiments/page_bands.py"
k="page_order_cuda or page_order_full or page_order_switch"
tests="$py tests/test_ops.py -k '$k or equal_lengths' > $o/t-order.log 2>&1 & \
 KVCORE_DECODE_PAGE_ORDER=unsorted $py tests/test_ops.py -k 'page_order_cuda or page_order_full' > $o/t-unsorted.log 2>&1 & \
 $py tests/test_ops.py -k 'gqa_decode and not subprocess' > $o/t-decode.log 2>&1; \
 wait; for f in order unsorted decode; do echo \"\$f: \$(tail -n 1 $o/t-\$f.log)\"; done"
d="python3 -m kvcore.bench --group decode --no-plot --impl kvcore,sdpa-cudnn"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build \
 "bench:decode:120" \
 "run:bands-auto:60:$pb $o/bands-auto.json" \
 "run:bands-unsorted:60:KVCORE_DECODE_PAGE_ORDER=unsorted $pb $o/bands-unsorted.json" \
 "run:bands-table:60:KVCORE_DECODE_PAGE_ORDER=table $pb $o/bands-table.json" \
 "run:med-1:60:$d --seed 1 --out $o/med-1" "run:med-2:60:$d --seed 2 --out $o/med-2" \
 "run:tests:120:$tests"
cat $o/stages.txt; for m in auto unsorted table; do echo "== $m"; grep -h "order=" $o/bands-$m.log; done
cat $o/tests.log; grep -h "^|" $o/decode/*.md | head -20
python3 bench/experiments/decode_medians.py $o/decode/*.json $o/med-1/*.json $o/med-2/*.json 2>&1 | tail -17
