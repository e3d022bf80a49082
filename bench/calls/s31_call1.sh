#!/usr/bin/env bash
# Prepared in session 30 for the next session's first call (NOT RUN yet; carry .peers).
# (a) What session 30 changed and ran on no GPU: the mla plan tests' new short-lengths asserts
#     (test_mla.py -k 'plan or dominant'), and the gqa_decode reruns in fresh processes that call
#     4 left out for time: KVCORE_DECODE_PAGE_ORDER=table, the page-major kernels and 8 warps
#     (their `auto` choices sit next to the new ORDER kernels).
# (b) Issue 2's last target, "no slower than cuDNN at any grid point": session 30's table had
#     kvcore 0.3-0.5% behind cuDNN at four random-table points and 1.2% behind cuDNN's faster B16
#     timing in order, inside the spread of cuDNN's own two timings of one work (up to 1.5%).
#     The decode group three times in one call (kvcore, cuDNN and FlashInfer only, seeds 0-2):
#     per point, the median over the three runs of each implementation (bench/experiments/
#     decode_medians.py, which pools the contiguous peers' timings of a case and its in-order
#     twin), to tell a real 0.3-0.5% from noise.
# (c) mla_decode's short-lengths cap at small batches (session 30 timed it at 64 pairs only):
#     ragged_mla.py's "short" rows (every sequence at 1/16 of the table) at B1 / B4 H128 and B8 H32
#     with forced 1 / 2 / 4 splits against "hint" (the capped count).
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "run:decode0:90:python3 -m kvcore.bench --group decode --impl kvcore,sdpa-cudnn,flashinfer --seed 0 --no-plot --out $o/decode0" \
 "run:decode1:90:python3 -m kvcore.bench --group decode --impl kvcore,sdpa-cudnn,flashinfer --seed 1 --no-plot --out $o/decode1" \
 "run:decode2:90:python3 -m kvcore.bench --group decode --impl kvcore,sdpa-cudnn,flashinfer --seed 2 --no-plot --out $o/decode2" \
 "run:medians:20:python3 bench/experiments/decode_medians.py $o/decode0/*.json $o/decode1/*.json $o/decode2/*.json" \
 "run:mla:60:python3 -m pytest tests/test_mla.py -m cuda -q -p no:cacheprovider -rfE -k 'plan or dominant'" \
 "run:mla-small:60:python3 bench/experiments/ragged_mla.py --splits 1,2,4 --shapes 1x128x4096,4x128x4096,8x32x4096 $o/ragged_mla_small.json" \
 "run:reruns:200:python3 -m pytest tests/test_ops.py -m cuda -v -p no:cacheprovider -rfE --tb=short -k 'table_page_order_in_subprocess or page_major_in_subprocess or 8_warps_in_subprocess or page_order'"
