#!/usr/bin/env bash
# Session 14, device call 1. gqa_decode's TMA loader (gqa_decode_tma_kernel, KVCORE_DECODE_LOADER=tma):
# its correctness (the decode cases, test_nan's poisoned tails, graph capture, under the switch),
# then an A/B of the decode group against the cp.async loader, alternating, one process each;
# then session 13's compile-only PdlLaunchConfig refactor (test_decode_score, test_retrieval).
o=/tmp/c
K="python3 -m kvcore.bench --impl kvcore --group decode"
T="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build \
 "run:t-tma:150:KVCORE_DECODE_LOADER=tma $T tests/test_ops.py tests/test_nan.py tests/test_cuda_graph.py -k 'gqa_decode or decode_nan or graph'" \
 "run:dec-cp:25:KVCORE_DECODE_LOADER=cp_async $K --out $o/dec-cp" \
 "run:dec-tma:25:KVCORE_DECODE_LOADER=tma $K --out $o/dec-tma" \
 "run:dec-cp2:25:KVCORE_DECODE_LOADER=cp_async $K --out $o/dec-cp2" \
 "run:dec-tma2:25:KVCORE_DECODE_LOADER=tma $K --out $o/dec-tma2" \
 "run:t-pdl:120:$T tests/test_decode_score.py tests/test_retrieval.py" \
 "run:t-mla-tma:60:KVCORE_MLA_WGMMA_LOADER=tma $T tests/test_mla.py -k 'decode and not in_subprocess'"
