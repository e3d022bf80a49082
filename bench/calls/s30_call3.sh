#!/usr/bin/env bash
# Session 30, call 3 (carry .peers and .exp; .exp: decode_trace.cu built as lib / lib8 with the
# ORDER instance, ORDER=1 selects it). The ORDER kernels: each CTA sorts its split's pages by cache
# page and visits them in that order (gqa_decode_body; the default for automatic split counts,
# KVCORE_DECODE_PAGE_ORDER=table turns it off).
# Predicted from call 1's row-sorted tables (B16 179.8 us against 183.5 random, B1 S131072 184.1
# against 186.5) less the sort (~0.5-1 us a CTA at its start, ~9 barriers): random tables 1-2%
# faster at B16, B64, B32 Hq64 and B1 S131072, in-order tables unchanged or up to 0.5% slower;
# B1 S32768 (64 pages a split) unchanged.
# (a) decode_trace A/B, ORDER 0 / 1, random and in-order tables (no build needed);
# (b) build; the gqa_decode CUDA tests (with the new ORDER tests and the table-order rerun);
# (c) the decode bench group with peers (the README table), then kvcore alone with
#     KVCORE_DECODE_PAGE_ORDER=table for the A/B in the same call.
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} \
 "run:order:70:OUT=$o bash bench/calls/s30_order_ab.sh" build \
 "tests:170:tests/test_ops.py,tests/test_nan.py,tests/test_cuda_graph.py,tests/test_determinism.py,tests/test_decode_score.py:(gqa_decode or decode_nan or graph or cuda_decode_bitwise or cuda_fixed_splits or score) and not page_major_in_subprocess and not 8_warps_in_subprocess and not table_page_order_in_subprocess" \
 "bench:decode:110" \
 "run:decode-table:70:KVCORE_DECODE_PAGE_ORDER=table python3 -m kvcore.bench --group decode --impl kvcore --out $o/decode-table"
