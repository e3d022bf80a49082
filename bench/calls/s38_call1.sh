#!/usr/bin/env bash
# Session 38, call 1 (an H100; carry .peers). (1) CUDA tests of what changed since the last GPU
# run: 3ded807 (use_wide_decode takes the 8-warp config whose launch must fit: the score path's
# choice) and the ORDER page list's shared helpers (load_order_entries / sort_split_pages, used by
# the head and page-major kernels; SASS compared here: 98 of 102 gqa_decode kernels byte-identical,
# the other four the same instructions reordered or one IADD3 for a VIADD). (2) Issue 2's full
# decode table at this code. (3) MLA H128's loader on an H100: the wgmma kernel with cp.async
# (default) against its TMA form (KVCORE_MLA_WGMMA_LOADER=tma), alternated, kvcore only; session
# 11 timed them equal on an H200, session 36's ncu put lg_throttle and 27% more instructions than
# FlashInfer on the cp.async loader. Predicted: TMA 0-5% faster at B32 / B128 H128 if the loader's
# instruction count matters on this GPU.
o=/tmp/c
rm -rf $o; mkdir -p $o
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=5"
tests="$py tests/test_ops.py -k 'equal_lengths or page_major_page_order or page_order_switch or page_order_cuda or page_order_full or table_page_order' > $o/tests-order.log 2>&1 & \
 $py tests/test_ops.py -k 'test_gqa_decode_page_major_in_subprocess and page8' > $o/tests-p8.log 2>&1 & \
 $py tests/test_ops.py -k 'with_8_warps_in_subprocess' > $o/tests-w8.log 2>&1 & \
 $py tests/test_decode_score.py > $o/tests-score.log 2>&1; \
 wait; for f in order p8 w8 score; do echo \"\$f: \$(tail -n 1 $o/tests-\$f.log)\"; done"
m="python3 -m kvcore.bench --group mla --no-plot --impl kvcore"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build \
 "run:tests:170:$tests" "bench:decode:120" \
 "run:mla-cp-1:45:$m --out $o/mla-cp-1" "run:mla-tma-1:45:KVCORE_MLA_WGMMA_LOADER=tma $m --out $o/mla-tma-1" \
 "run:mla-cp-2:45:$m --out $o/mla-cp-2" "run:mla-tma-2:45:KVCORE_MLA_WGMMA_LOADER=tma $m --out $o/mla-tma-2"
cat $o/stages.txt
