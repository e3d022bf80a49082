#!/usr/bin/env bash
# Session 37, call 2 (an H100; carry .peers): the README's H100 tables for the ops other than
# decode are old (block-sparse and the token decoder from session 2's CUDA-core kernels; MLA from
# session 26; eviction, retrieval and e2e only on H200s). One run of each other group at this
# code, every peer, then the CUDA tests of what changed after session 36's last GPU run
# (page_order_fits shared by the head and page-major launches: the page-order, rule and
# page-major tests). Predicted: block-sparse B16 page128 ~90% of copy as on the H200 (85% in
# session 2), the token decoder ~80% (39-62% then), MLA as session 26 (3-13% behind FlashInfer
# at B32 / B128 H128 and H16, ahead at B1 H128).
o=/tmp/c
rm -rf $o; mkdir -p $o
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=5"
tests="$py tests/test_ops.py -k 'equal_lengths or page_major_page_order or page_order_switch or page_order_cuda or page_order_full' > $o/tests-order.log 2>&1 & \
 $py tests/test_ops.py -k 'test_gqa_decode_page_major_in_subprocess and page8' > $o/tests-p8.log 2>&1 & \
 $py tests/test_ops.py -k 'test_gqa_decode_page_major_in_subprocess and page4' > $o/tests-p4.log 2>&1; \
 wait; for f in order p8 p4; do echo \"\$f: \$(tail -n 1 $o/tests-\$f.log)\"; done"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build \
 "bench:block:120" "bench:mla:80" "bench:eviction:100" "bench:retrieval:80" \
 "run:tests:150:$tests" "bench:e2e:200"
cat $o/stages.txt
