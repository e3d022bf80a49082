#!/usr/bin/env bash
# Session 39, call 4 (an H100; the session's last ~280 s of device time, so no FlashInfer). Call 3:
# the ORDER kernel without its sort (KVCORE_DECODE_PAGE_ORDER=unsorted) is as fast as the
# table's-order kernel on an in-order table (B16 177.4 / 178.5, B32 Hq64 344.3 / 344.2 us), with it
# 179.2 / 347.9: the sort is the whole cost, and sorting half the slots (np-restricted) changed
# nothing, so its length is not what shows but what is in flight during it. Now the ORDER kernels
# issue one tile more before the sort (tile STAGES - 1 into the ring's last stage; the sort's one
# buffer is the list's own room), so every stage is in flight while it runs. Predicted: auto ~=
# unsorted on the in-order table (within ~0.5 us), and auto random ~1-2 us faster than call 3's
# (B16 178.9 -> ~177.5, B32 Hq64 353.3 -> ~350), i.e. near the host-sorted table.
o=/tmp/c
rm -rf $o; mkdir -p $o
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE -x"
pb="python3 bench/experiments/page_bands.py"
tests="$py tests/test_ops.py -k 'page_order_cuda or page_order_full or (gqa_decode and not subprocess)' > $o/t-order.log 2>&1; \
 echo \"order: \$(tail -n 1 $o/t-order.log)\""
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-300} build \
 "run:tests:60:$tests" \
 "run:bands-auto:30:$pb $o/bands-auto.json" \
 "run:bands-unsorted:30:KVCORE_DECODE_PAGE_ORDER=unsorted $pb $o/bands-unsorted.json" \
 "run:decode-lite:30:python3 -m kvcore.bench --group decode --no-plot --impl kvcore,sdpa-cudnn --out $o/decode"
cat $o/stages.txt; for m in auto unsorted; do echo "== $m"; grep -h "order=" $o/bands-$m.log; done
cat $o/tests.log; grep -h "^|" $o/decode/*.md | head -20
