#!/usr/bin/env bash
# Session 8, device call 2: the flipped defaults (wgmma MLA decode, transposed scores, evict_last,
# page dedup, token decoder auto) under the sanitizers, which also run the op files' CUDA tests in
# the default process; the cuBLAS projection path timed at every T.
o=$OUT/c; T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
bash bench/gpu_stages.sh $o 585 build \
 "run:mla-fused0:60:KVCORE_MLA_PROJECT_FUSED_MAX=0 python3 -m kvcore.bench --group mla --out $o/mla-fused0" \
 "run:graph-tests:60:$T tests/test_cuda_graph.py" \
 "sanitize:all:memcheck,racecheck,synccheck:420"
cd $OUT && tar czf c.tgz c && rm -rf c
