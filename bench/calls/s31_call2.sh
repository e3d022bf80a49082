#!/usr/bin/env bash
# Session 31, call 2 (no peers needed).
# (a) mla_decode's short-lengths cap: call 1 found it slower at B1 H128 (2 pairs: shapes' 16
#     splits 17.4 us, capped to 1 21.5) and at B4 H128 (20.8 / 30.7; forced 1 21.7) while faster at
#     B8 H32 (32.7 / 22.3). The short rows only (every sequence 256 keys in a 4096-token table) at
#     1-16 sequences of 128 heads and 1-32 of 32 heads, forced 1 / 2 / 4 / 8 / 16 splits, to set where the cap
#     applies.
# (b) The gqa_decode reruns call 1 cut (tests/test_ops.py's DECODE_KERNEL_RERUN selection under
#     KVCORE_DECODE_PAGE_ORDER=table, KVCORE_DECODE_WARPS=8 and KVCORE_DECODE_KERNEL=page8),
#     run directly in three pytest processes at once instead of one subprocess test after another
#     (the suite is host-bound).
o=/tmp/c
rm -rf $o; mkdir -p $o
sel='(gqa_decode or decode_nan or graph or cuda_decode_bitwise or cuda_fixed_splits) and not in_subprocess and not misspelt'
files='tests/test_ops.py tests/test_nan.py tests/test_cuda_graph.py tests/test_determinism.py'
reruns="for sw in KVCORE_DECODE_PAGE_ORDER=table KVCORE_DECODE_WARPS=8 KVCORE_DECODE_KERNEL=page8; do \
 env \$sw python3 -m pytest $files -m cuda -k '$sel' -q -p no:cacheprovider -rfE --tb=short > $o/rerun-\${sw%%=*}.log 2>&1 & done; wait; \
 for f in $o/rerun-*.log; do echo \"\$f: \$(tail -1 \$f)\"; done"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "run:mla-short:90:python3 bench/experiments/ragged_mla.py --patterns short --splits 1,2,4,8,16 --shapes 1x128x4096,2x128x4096,4x128x4096,8x128x4096,16x128x4096,1x32x4096,2x32x4096,4x32x4096,8x32x4096,16x32x4096,32x32x4096 $o/mla_short.json" \
 "run:reruns:300:$reruns"
