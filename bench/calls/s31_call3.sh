#!/usr/bin/env bash
# Session 31, call 3 (no peers needed): mla_decode after the 64-head kernels' short-lengths cap
# moved to 16 pairs (commit f232ed1).
# (a) the plan tests (test_mla_decode_plan_seq_lens_by_kernel_cuda now expects one split at 32
#     heads and the shapes' count at 128), also under KVCORE_MLA_DECODE_WIDE=old, where 128 heads
#     run the 32-head kernel and the test expects the cap;
# (b) the short rows at 1-32 sequences again, automatic and hinted only (expected: hint as the
#     shapes' count at B1-B4 H128, as one split from B8 H128 and at every H32 batch);
# (c) the mla CUDA cases of test_mla, test_cuda_graph, test_determinism and test_nan, in four
#     pytest processes (xdist).
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "run:mla-plan:60:python3 -m pytest tests/test_mla.py -m cuda -v -p no:cacheprovider -rfE -k 'plan or dominant'" \
 "run:mla-plan-old:60:KVCORE_MLA_DECODE_WIDE=old python3 -m pytest tests/test_mla.py -m cuda -v -p no:cacheprovider -rfE -k 'plan or dominant'" \
 "run:mla-short:60:python3 bench/experiments/ragged_mla.py --patterns short --shapes 1x128x4096,2x128x4096,4x128x4096,8x128x4096,16x128x4096,1x32x4096,4x32x4096,8x32x4096,32x32x4096 $o/mla_short.json" \
 "run:mla-tests:240:python3 -m pytest tests/test_mla.py tests/test_cuda_graph.py tests/test_determinism.py tests/test_nan.py -m cuda -k 'mla and not in_subprocess' -n 4 -q -p no:cacheprovider -rfE --tb=short"
