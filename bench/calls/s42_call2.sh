#!/usr/bin/env bash
# Session 42, call 2 (an H100; carry .exp and .peers). Call 1 (bench/calls/s42_call1.sh) timed the
# sort with phase 2 as a search of every other chunk (178193c): 512 entries 5,161 ->
# 3,167 cycles at 8 warps, but decode_trace B16 random unchanged (177.9 / 177.8 us) and the bench's
# B1 S32768 ~1 us further from decode_trace than session 41's (53.0 against 51.8-52.2), with the
# 4-warp kernel's code 61 -> 78 KB. Now phase 2 as pairwise merge rounds (24 loads an entry at 8
# warps, 17 at 4; kernel 76 KB / 8-warp 62 KB): run with bench/experiments/order_pairwise.patch
# applied to the tree (git apply; it is not in 178193c). Predicted: sort check 512 entries ~2,500 cycles at
# 256 threads, ~2,200 at 128. Then the code-size question in the bench, on one host: this header
# (A) built and timed, then session 41's loop sort (B: 092e51c's two headers from .exp/old_include, 61 KB) rebuilt in
# place and timed. If the kernel's size is what costs B1 S32768 in the bench, B is ~0.7 us faster
# there (session 41's 42 ns a KB); if not, within ~0.3 us.
# .exp/bins.tgz: decode_trace loop{4,8} (092e51c), rank{4,8} (call 1), pair{4,8} (this header),
# fast8 (ce1d952), order_sort_check as sort_loop / sort_rank / sort_pair.
o=/tmp/c
tar xzf .exp/bins.tgz -C .exp
rm -rf $o; mkdir -p $o
TRACE_ROWS="^B[0-9]|^ORDER B|check|first copies|rror"
. bench/calls/trace_run.sh
trace() {
  for rep in 1 2; do for v in loop rank pair; do
    TABLE=random ORDER=1 run "B16 random $v ORDER" ${v}8 16 8192 1 32 8 16 2
  done; done
  for v in loop pair; do
    TABLE=random ORDER=1 run "B1 S32768 random $v ORDER" ${v}4 1 32768 32 32 8 16 3
    TABLE=random ORDER=1 SMEM_PAD=102400 run "B32 Hq64 random $v ORDER" ${v}4 32 8192 1 64 8 16 2
  done
}
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=3"
d="python3 -m kvcore.bench --group decode --no-plot --impl kvcore,sdpa-cudnn"
for v in loop rank pair; do .exp/sort_$v > $o/sort_$v.txt 2>&1; done
trace > $o/trace.txt 2>&1
buildB="cp .exp/old_include/*.cuh csrc/include/kvcore/ && TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 KVCORE_REQUIRE_CUDA=1 python3 setup.py build_ext --inplace > $o/buildB-full.log 2>&1; echo rc=\$?; date +%T; ls -la --time-style=+%T python/kvcore/*.so; python3 -c 'import kvcore._C as c; print(c.__file__)'"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-520} build \
 "run:order-tests:40:$py tests/test_ops.py -k 'page_order_cuda or page_order_full or page_order_unsorted'" \
 "bench:decode:100" \
 "run:medA-1:30:$d --seed 1 --out $o/medA-1" \
 "run:decode-tests:75:$py tests/test_ops.py -k 'gqa_decode and not subprocess'" \
 "run:switch-tests:60:$py tests/test_ops.py -k 'page_major_page_order_switch or page_order_switch'" \
 "run:buildB:170:$buildB" \
 "run:medB-1:30:$d --seed 1 --out $o/medB-1" "run:medB-2:30:$d --seed 2 --out $o/medB-2" \
 "run:medB-3:30:$d --seed 3 --out $o/medB-3"
for v in loop rank pair; do echo "== sort_$v"; grep -E "pages +(64|200|512) random|all sorted|[1-9][0-9]* of 132" $o/sort_$v.txt | cut -c1-150; done
grep -E "^===|^ORDER B|first copies|MISMATCH|rror" $o/trace.txt | sed -E 's/cluster 1 splits.*CTAs,//; s/\(empty kernel.*//' | cut -c1-160
cat $o/stages.txt | cut -c1-60; tail -n 1 $o/order-tests.log $o/decode-tests.log $o/switch-tests.log; cat $o/buildB.log
grep -h "^|" $o/decode/*.md | head -20
echo "== A (this header): table run + medA-1"
python3 bench/experiments/decode_medians.py $o/decode/*.json $o/medA-1/*.json 2>&1 | tail -17 | sed -E 's/flashinfer.*sdpa-cudnn/... sdpa-cudnn/; s/sdpa-flash.*\|/|/'
echo "== B (092e51c's loop sort): medB-1..3"
python3 bench/experiments/decode_medians.py $o/medB-1/*.json $o/medB-2/*.json $o/medB-3/*.json 2>&1 | tail -17
