#!/usr/bin/env bash
# Session 41, call 3 (an H100; carry .exp and .peers). Calls 1-2 (same H100): decode_trace has
# every sort variant at B1 S32768 within 52.0-52.8 us (12acf69's loop, ce1d952's unrolled
# networks, one network, the networks out of line), but the bench times the library's kernel at
# 55.1 us (cuDNN 54.7), where sessions 34-39 (12acf69's code) had 52-53. Suspect: the unrolled
# networks doubled the kernel's code (bf16 4-warp ORDER instance 59 -> 120 KB; registers, shared
# memory and occupancy unchanged), and the bench's flush kernel between calls leaves it to be
# fetched cold, which decode_trace's back-to-back launches of one kernel never show. Now the
# network as a run-time loop over the same blocked layout (the kernel 61 KB again).
# Predicted: bench B1 S32768 back to ~52.5 us (both tables), B1 S4096 table131072 ~15.5; the sort
# a little slower than unrolled (sort check 512 entries ~3,500 cycles against ~2,500), B16 random
# within ~0.5 us of fast8 in decode_trace.
# .exp/bins.tgz: decode_trace fast{4,8} (ce1d952) and loop{4,8} (this header), order_sort_check
# as sort_new / sort_loop.
o=/tmp/c
tar xzf .exp/bins.tgz -C .exp
rm -rf $o; mkdir -p $o
TRACE_ROWS="^B[0-9]|^ORDER B|check|first copies|rror"
. bench/calls/trace_run.sh
trace() {
  for t in seq random; do for v in fast loop; do
    TABLE=$t ORDER=1 run "B1 S32768 $t $v ORDER" ${v}4 1 32768 32 32 8 16 3
    TABLE=$t ORDER=1 run "B16 $t $v ORDER" ${v}8 16 8192 1 32 8 16 2
    TABLE=$t ORDER=1 SMEM_PAD=102400 run "B32 Hq64 $t $v ORDER" ${v}4 32 8192 1 64 8 16 2
  done; done
}
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=3"
k="page_order_cuda or page_order_full or page_order_switch or page_order_unsorted"
tests="$py tests/test_ops.py -k '$k or equal_lengths' > $o/t-order.log 2>&1 & \
 KVCORE_DECODE_PAGE_ORDER=unsorted $py tests/test_ops.py -k 'page_order_cuda or page_order_full' > $o/t-unsorted.log 2>&1 & \
 $py tests/test_ops.py -k 'gqa_decode and not subprocess' > $o/t-decode.log 2>&1; \
 wait; for f in order unsorted decode; do echo \"\$f: \$(tail -n 1 $o/t-\$f.log)\"; done"
d="python3 -m kvcore.bench --group decode --no-plot --impl kvcore,sdpa-cudnn"
{ echo "== unrolled (ce1d952)"; .exp/sort_new; echo "== loop"; .exp/sort_loop; } > $o/sort_check.txt 2>&1
trace > $o/trace.txt 2>&1
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-500} build \
 "bench:decode:120" \
 "run:tests:130:$tests" \
 "run:med-1:40:$d --seed 1 --out $o/med-1" "run:med-2:40:$d --seed 2 --out $o/med-2"
cat $o/sort_check.txt | cut -c1-160
grep -E "^===|^B[0-9]|^ORDER B|first copies|MISMATCH|rror" $o/trace.txt | sed -E 's/\(empty kernel.*//' | cut -c1-200
cat $o/stages.txt | cut -c1-120; cat $o/tests.log
grep -h "^|" $o/decode/*.md | head -20
python3 bench/experiments/decode_medians.py $o/decode/*.json $o/med-1/*.json $o/med-2/*.json 2>&1 | tail -17
