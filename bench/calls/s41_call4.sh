#!/usr/bin/env bash
# Session 41, call 4 (an H100; carry .exp and .peers). Call 3: the run-time loop network brought
# the bench's B1 S32768 back (52.1 us random, 51.3 in order, cuDNN 53.8; B1 S4096 table131072
# 14.9 against 17.2), but its sort is twice the unrolled one's cycles (512 entries 5,157 against
# 2,754 at 256 threads) and B16 random fell level with cuDNN (174.6 / 174.5; decode_trace loop8
# 174.4 against fast8 173.8, first copies issued 4.13 against 2.91 us). Now the steps within a
# warp (shuffles, a thread's own slots) unrolled inside the loop over sequence sizes, each behind a
# uniform test; the shared-memory steps stay a loop (kernel 64 KB; unrolled 120, loop 61).
# Predicted: sort check 512 entries ~3,000 cycles at 256 threads; decode_trace B16 random part8
# within 0.2 us of fast8; bench B1 S32768 as call 3 (~52), B16 random ~0.5 us under call 3's.
# .exp/bins.tgz: decode_trace fast / loop / part {4,8}, order_sort_check sort_new / sort_loop /
# sort_part (run here: the unrolled and this one; decode_trace B16 random fast8 / part8). Then
# the build, issue 2's table and the tests of the page sort in the kernel (page_order_cuda /
# page_order_full / page_order_unsorted; the switch and equal-length tests, which took call 3's
# stage past its limit, left out), then gqa_decode's tests if time is left. (Cut to fit the
# ~520 s of device time that refused starts left.)
o=/tmp/c
tar xzf .exp/bins.tgz -C .exp
rm -rf $o; mkdir -p $o
TRACE_ROWS="^B[0-9]|^ORDER B|check|first copies|rror"
. bench/calls/trace_run.sh
trace() {
  for v in fast part; do TABLE=random ORDER=1 run "B16 random $v ORDER" ${v}8 16 8192 1 32 8 16 2; done
}
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=3"
for v in new part; do .exp/sort_$v > $o/sort_$v.txt 2>&1; done
trace > $o/trace.txt 2>&1
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-330} build \
 "bench:decode:100" \
 "run:order-tests:60:$py tests/test_ops.py -k 'page_order_cuda or page_order_full or page_order_unsorted'" \
 "run:decode-tests:70:$py tests/test_ops.py -k 'gqa_decode and not subprocess'"
for v in new part; do echo "== sort_$v"; grep -E "pages +(64|512) random|all sorted|[1-9][0-9]* of 132" $o/sort_$v.txt | cut -c1-150; done
grep -E "^===|^B[0-9]|^ORDER B|first copies|MISMATCH|rror" $o/trace.txt | sed -E 's/\(empty kernel.*//' | cut -c1-200
cat $o/stages.txt | cut -c1-60; tail -n 1 $o/order-tests.log $o/decode-tests.log
grep -h "^|" $o/decode/*.md | head -20
