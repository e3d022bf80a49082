#!/usr/bin/env bash
# Session 42, call 1 (an H100; carry .exp and .peers). The ORDER kernels' page sort rewritten: each
# warp sorts its own 32E-entry chunk in registers (one bitonic network unrolled, 21 steps at 8
# warps, 28 at 4), then the chunks go to shared memory and each entry's place is its place in its
# chunk plus a binary search in each other chunk (one barrier instead of six). Predicted: sort
# check 512 entries ~2,200 cycles a CTA at 256 threads (landed loop 5,157, session 40's unrolled
# networks 2,754), 64 entries at 128 threads ~1,300 (loop 2,954); decode_trace B16 random ~0.8 us
# faster than loop8 (~173.6), B1 S32768 unchanged (~51.5); the bench's B16 random below cuDNN.
# .exp/bins.tgz: decode_trace loop{4,8} (092e51c), rank{4,8} (this header), fast8 (ce1d952's
# unrolled networks), order_sort_check as sort_loop / sort_rank.
o=/tmp/c
tar xzf .exp/bins.tgz -C .exp
rm -rf $o; mkdir -p $o
TRACE_ROWS="^B[0-9]|^ORDER B|check|first copies|rror"
. bench/calls/trace_run.sh
trace() {
  for rep in 1 2; do for v in loop rank; do
    TABLE=random ORDER=1 run "B16 random $v ORDER" ${v}8 16 8192 1 32 8 16 2
    TABLE=seq ORDER=1 run "B16 seq $v ORDER" ${v}8 16 8192 1 32 8 16 2
    TABLE=random ORDER=1 run "B1 S32768 random $v ORDER" ${v}4 1 32768 32 32 8 16 3
  done; done
  TABLE=random ORDER=1 run "B16 random fast ORDER" fast8 16 8192 1 32 8 16 2
  for v in loop rank; do TABLE=random ORDER=1 SMEM_PAD=102400 run "B32 Hq64 random $v ORDER" ${v}4 32 8192 1 64 8 16 2; done
}
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=3"
for v in loop rank; do .exp/sort_$v > $o/sort_$v.txt 2>&1; done
trace > $o/trace.txt 2>&1
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build \
 "run:order-tests:40:$py tests/test_ops.py -k 'page_order_cuda or page_order_full or page_order_unsorted'" \
 "bench:decode:100" \
 "run:med-1:30:python3 -m kvcore.bench --group decode --no-plot --impl kvcore,sdpa-cudnn --seed 1 --out $o/med-1" \
 "run:decode-tests:75:$py tests/test_ops.py -k 'gqa_decode and not subprocess'" \
 "run:switch-tests:100:$py tests/test_ops.py -k 'page_major_page_order_switch or page_order_switch'"
for v in loop rank; do echo "== sort_$v"; grep -E "pages +(64|200|512) random|all sorted|[1-9][0-9]* of 132" $o/sort_$v.txt | cut -c1-150; done
grep -E "^===|^B[0-9]|^ORDER B|first copies|MISMATCH|rror" $o/trace.txt | sed -E 's/\(empty kernel.*//' | cut -c1-200
cat $o/stages.txt | cut -c1-60; tail -n 1 $o/order-tests.log $o/decode-tests.log $o/switch-tests.log
grep -h "^|" $o/decode/*.md | head -20
python3 bench/experiments/decode_medians.py $o/decode/*.json $o/med-1/*.json 2>&1 | tail -17
