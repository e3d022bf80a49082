#!/usr/bin/env bash
# Session 40, call 3 (an H100; carry .exp and .peers). Call 2 (decode_trace) timed the ORDER
# kernels' page sort in place: "first copies issued" 5.4 us from entry with it, 1.6 without at B16
# (8 warps), 7.7 against 1.7 at B32 Hq64 (4 warps): the sort takes 3.8 / 6 us a CTA, longer than
# tile 0's flight (~4 us), and order_prefetch_tile.patch (one more tile before it) made B16 worse
# (traced 178.3-179.1 against 176.5-176.9 us in order): reverted. Now the sort is a network
# unrolled at compile time over a blocked layout (6 / 3 of its 45 steps through shared memory, not
# 9 / 7), with an early exit for rows already ascending. Predicted: the sort ~1-1.5 us a CTA (sort
# check: cycles a CTA well under half of the old form's), "first copies issued" ~2.5-3 us; in-order
# tables as fast as without the sort; random B16 ~175.5 against cuDNN ~175 (call 1's machine).
# .exp/bins.tgz: decode_trace built as old{4,8} (12acf69's header) and fast{4,8} (this one), and
# order_sort_check as sort_old / sort_new (the nvcc lines in their headers; -DTRACE_WARPS=4/8).
# Then the build, the tests, the bands (auto), issue 2's decode table and two kvcore + cuDNN runs.
o=/tmp/c
tar xzf .exp/bins.tgz -C .exp
rm -rf $o; mkdir -p $o
TRACE_ROWS="^B[0-9]|^ORDER B|check|first copies|rror"
. bench/calls/trace_run.sh
trace() {
  for rep in 1; do
    for t in seq random; do
      TABLE=$t ORDER=0 run "B16 $t table-kernel" old8 16 8192 1 32 8 16 2
      TABLE=$t ORDER=1 run "B16 $t old ORDER" old8 16 8192 1 32 8 16 2
      TABLE=$t ORDER=1 run "B16 $t fast ORDER" fast8 16 8192 1 32 8 16 2
      TABLE=$t ORDER=1 ORDER_SKIP_SORT=1 run "B16 $t fast ORDER skip-sort" fast8 16 8192 1 32 8 16 2
    done
  done
  for t in seq random; do
    TABLE=$t ORDER=0 SMEM_PAD=102400 run "B32 Hq64 $t table-kernel" old4 32 8192 1 64 8 16 2
    TABLE=$t ORDER=1 SMEM_PAD=102400 run "B32 Hq64 $t old ORDER" old4 32 8192 1 64 8 16 2
    TABLE=$t ORDER=1 SMEM_PAD=102400 run "B32 Hq64 $t fast ORDER" fast4 32 8192 1 64 8 16 2
    TABLE=$t ORDER=1 ORDER_SKIP_SORT=1 SMEM_PAD=102400 run "B32 Hq64 $t fast ORDER skip-sort" fast4 32 8192 1 64 8 16 2
  done
}
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=3"
pb="python3 bench/experiments/page_bands.py"
k="page_order_cuda or page_order_full or page_order_switch or page_order_unsorted"
tests="$py tests/test_ops.py -k '$k or equal_lengths' > $o/t-order.log 2>&1 & \
 KVCORE_DECODE_PAGE_ORDER=unsorted $py tests/test_ops.py -k 'page_order_cuda or page_order_full' > $o/t-unsorted.log 2>&1 & \
 $py tests/test_ops.py -k 'gqa_decode and not subprocess' > $o/t-decode.log 2>&1; \
 wait; for f in order unsorted decode; do echo \"\$f: \$(tail -n 1 $o/t-\$f.log)\"; done"
d="python3 -m kvcore.bench --group decode --no-plot --impl kvcore,sdpa-cudnn"
{ echo "== old"; .exp/sort_old; echo "== new"; .exp/sort_new; } > $o/sort_check.txt 2>&1
trace > $o/trace.txt 2>&1
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-400} build \
 "run:tests:130:$tests" \
 "run:bands-auto:40:$pb $o/bands-auto.json" \
 "bench:decode:120" \
 "run:med-1:40:$d --seed 1 --out $o/med-1" "run:med-2:40:$d --seed 2 --out $o/med-2"
cat $o/sort_check.txt | cut -c1-160
grep -E "^===|^B[0-9]|^ORDER B|first copies|MISMATCH|rror" $o/trace.txt | sed -E 's/\(empty kernel.*//' | cut -c1-200
cat $o/stages.txt | cut -c1-120; cat $o/tests.log
for m in auto; do echo "== $m"; grep -h "order=" $o/bands-$m.log; done
grep -h "^|" $o/decode/*.md | head -20
python3 bench/experiments/decode_medians.py $o/decode/*.json $o/med-1/*.json $o/med-2/*.json 2>&1 | tail -17
