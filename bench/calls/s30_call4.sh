#!/usr/bin/env bash
# Session 30, call 4 (carry .peers and .exp; .exp: decode_trace.cu built as lib / lib8 with the
# ORDER instance). Call 3's ORDER kernels sorted a split's pages before the first copy: random
# tables 1.1-1.8 us faster, in-order ones 0.6-1.5 us slower (the sort, ~1.5 us a CTA, on the
# critical path). Now the first STAGES - 1 tiles are copied in the table's order and the rest is
# sorted while they land. Predicted: in-order tables as without ORDER (B16 180.5 us), random
# ones ~1.5% faster than without (B16 184.3 -> ~181.5, B1 S131072 187.0 -> ~185, B32 Hq64
# 359.4 -> ~356).
# (a) decode_trace A/B, ORDER 0 / 1, random and in-order tables (no build needed);
# (b) build; the decode bench group with peers (the README table), then kvcore alone with
#     KVCORE_DECODE_PAGE_ORDER=table for the A/B in the same call;
# (c) the gqa_decode CUDA tests (names printed as they run, so a cut run still says which passed).
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-500} \
 "run:order:40:OUT=$o bash bench/calls/s30_order_ab.sh" build \
 "bench:decode:100" \
 "run:decode-table:40:KVCORE_DECODE_PAGE_ORDER=table python3 -m kvcore.bench --group decode --impl kvcore --out $o/decode-table" \
 "run:tests:260:python3 -m pytest tests/test_ops.py tests/test_nan.py tests/test_cuda_graph.py tests/test_determinism.py tests/test_decode_score.py -m cuda -v -p no:cacheprovider -rfE --tb=short -k '(gqa_decode or decode_nan or graph or cuda_decode_bitwise or cuda_fixed_splits or score) and not page_major_in_subprocess and not 8_warps_in_subprocess and not table_page_order_in_subprocess'"
