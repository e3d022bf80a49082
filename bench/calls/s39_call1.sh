#!/usr/bin/env bash
# Session 39, call 1 (an H100). Where B16's random-page cost comes from, and one lever for it.
# bench/experiments/page_bands.py times B16 S8192, B32 Hq64 S8192 and B64 S4096 through five
# tables over the same keys (random, rows sorted, rows sorted from a per-sequence rotation, in
# order, strided) and cuDNN SDPA, alternated in 3 rounds, under KVCORE_DECODE_PAGE_ORDER=table
# (the table's order, no sort), auto (the default sort) and rotated (the kernel's sort starting
# sequence b at cache page b * N / B: B bands over the cache, as an in-order table has, instead
# of one band all CTAs sweep together).
# Predicted (B16, us): table-mode sorted ~= auto random minus the in-kernel sort's cost (0-1);
# if one band is the cost, rotated (either mode) ~= in_order (~0.6% under random) and strided ~=
# sorted; if each CTA's scattered pages are the cost, rotated ~= sorted and only in_order is fast.
# Then the page-order tests under the rotated switch and at the default.
o=/tmp/c
rm -rf $o; mkdir -p $o
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE"
pb="python3 bench/experiments/page_bands.py"
tests="KVCORE_DECODE_PAGE_ORDER=rotated $py tests/test_ops.py -k 'page_order and not subprocess' > $o/t-rot.log 2>&1; \
 $py tests/test_ops.py -k 'page_order or page_major' > $o/t-order.log 2>&1; \
 for f in rot order; do echo \"\$f: \$(tail -n 1 $o/t-\$f.log)\"; done"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build \
 "run:bands-table:90:KVCORE_DECODE_PAGE_ORDER=table $pb $o/bands-table.json" \
 "run:bands-auto:90:$pb $o/bands-auto.json" \
 "run:bands-rot:90:KVCORE_DECODE_PAGE_ORDER=rotated $pb $o/bands-rot.json" \
 "run:tests:150:$tests"
cat $o/stages.txt; for m in table auto rot; do echo "== $m"; grep -h "order=" $o/bands-$m.log; done
cat $o/tests.log
