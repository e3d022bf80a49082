#!/usr/bin/env bash
# Session 40, call 1 (an H100; carry .peers). bench/experiments/order_prefetch_tile.patch applied:
# the ORDER kernels issue tile STAGES - 1 (into the ring's last stage) before their page sort, the
# sort's one buffer being the page list's own room, so every stage is in flight while it runs
# (session 39 call 3: the sort was the ORDER kernels' whole extra cost on an in-order table, B16
# 179.2 against 177.4 us without it, B32 Hq64 347.9 against 344.3). Predicted: auto ~= unsorted
# on the in-order table (within ~0.5 us); random B16 ~177.5 (call 3: 178.8) against cuDNN ~177-178,
# B32 Hq64 ~350 (352.8). Tests first (the changed prologue's correctness), then the bands, issue
# 2's decode table with FlashInfer, two kvcore + cuDNN runs for medians.
o=/tmp/c
rm -rf $o; mkdir -p $o
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=3"
pb="python3 bench/experiments/page_bands.py"
k="page_order_cuda or page_order_full or page_order_switch or page_order_unsorted"
tests="$py tests/test_ops.py -k '$k or equal_lengths' > $o/t-order.log 2>&1 & \
 KVCORE_DECODE_PAGE_ORDER=unsorted $py tests/test_ops.py -k 'page_order_cuda or page_order_full' > $o/t-unsorted.log 2>&1 & \
 $py tests/test_ops.py -k 'gqa_decode and not subprocess' > $o/t-decode.log 2>&1; \
 wait; for f in order unsorted decode; do echo \"\$f: \$(tail -n 1 $o/t-\$f.log)\"; done"
d="python3 -m kvcore.bench --group decode --no-plot --impl kvcore,sdpa-cudnn"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build \
 "run:tests:120:$tests" \
 "run:bands-auto:60:$pb $o/bands-auto.json" \
 "run:bands-unsorted:60:KVCORE_DECODE_PAGE_ORDER=unsorted $pb $o/bands-unsorted.json" \
 "run:bands-table:60:KVCORE_DECODE_PAGE_ORDER=table $pb $o/bands-table.json" \
 "bench:decode:120" \
 "run:med-1:60:$d --seed 1 --out $o/med-1" "run:med-2:60:$d --seed 2 --out $o/med-2"
cat $o/stages.txt; cat $o/tests.log
for m in auto unsorted table; do echo "== $m"; grep -h "order=" $o/bands-$m.log; done
grep -h "^|" $o/decode/*.md | head -20
python3 bench/experiments/decode_medians.py $o/decode/*.json $o/med-1/*.json $o/med-2/*.json 2>&1 | tail -17
