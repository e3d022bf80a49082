#!/usr/bin/env bash
# Prepared in session 29, run as session 30's first call (results: bench/results/h100-2026-12-05-s30/call1; carry .peers and .exp:
# decode_trace.cu built as .exp/lib (4 warps) and .exp/lib8 (-DTRACE_WARPS=8) with the nvcc line
# in its header).
# (a) What session 29 changed after its last GPU call: the mla plan tests (the dominant-sequence
#     test's B16 H128 form, 4 -> 8 splits, and kDominantMaxBase).
# (b) mla_decode's short rows at forced 1 split (ragged_mla.py --splits 1,2): session 28 had B32
#     H128 "short" (every sequence 256 keys) at 23.3 us with one split against 30.7 at the shapes'
#     2; if the other short rows agree, choose_splits_dominant should also cap the count at one
#     split per kMinSplitTokens of the longest sequence, as gqa_decode's rule does.
# (c) Why the page order costs gqa_decode up to 3% (session 29, bench/experiments/page_order.py):
#     decode_trace at B16 (8 warps) and B1 S131072 (32 splits) with the block table random, in
#     order, rows sorted, and in random runs of 2 / 8 / 16 / 64 consecutive pages (64 pages of
#     32 KB = 2 MB: one GPU large page of K). Predicted: if it is TLB reach, only runs near 64
#     recover the in-order time; if it is DRAM locality, short runs already do.
# (d) B1 S131072, 1.2% behind cuDNN even in page order: the 8-warp kernel at 16 splits (128 CTAs,
#     one per SM) against the automatic 4-warp 32 splits; session 17 had it 0.6% faster on an
#     H200, and the launcher takes 8 warps only for unsplit grids.
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-480} build \
 "run:tests:80:python3 -m pytest tests/test_mla.py -m cuda -q -p no:cacheprovider -rfE -k 'plan or dominant'" \
 "run:ragged:60:python3 bench/experiments/ragged_mla.py --splits 1,2 $o/ragged_mla.json" \
 "run:order:150:OUT=$o bash bench/calls/s30_order_trace.sh" \
 "run:b1:60:python3 bench/experiments/decode_splits_probe.py --shape 1,32,8,131072 0 16 32 0 && KVCORE_DECODE_WARPS=8 python3 bench/experiments/decode_splits_probe.py --shape 1,32,8,131072 16 0"
