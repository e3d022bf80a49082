#!/usr/bin/env bash
# Session 11, device call 1 (written in session 10; carry .peers).
# 0. bench/experiments/mla_tma_probe.cu (compiled only so far): do TMA boxes reproduce the wgmma
#    kernel's swizzled tile layout, and how fast does one issuing thread stream latent tiles;
# 1. mla_decode_wgmma_tma_kernel (KVCORE_MLA_WGMMA_LOADER=tma, written in session 10, never run):
#    the MLA decode tests (-x), `--group mla` with it, racecheck over its H128 cases. If it fails
#    or hangs, take its WGMMA_SWITCHES entry out of test_mla.py before any whole-suite run;
# 1b. the H2O epilogue with 8 keys per thread (KVCORE_SCORE_EPILOGUE=wide, session 10, never run):
#    its tests, then the eviction table with it and at the default, back to back;
# 2. ncu's per-SASS-line stall sampling (ncu_pack.sh NCU_SOURCE=1, never run: the first such stage
#    checks its ncu options) of the MLA H128 default kernel, then the H2O B16 pair, compact keep
#    50% and block-sparse B16;
# 3. the block table without FlashInfer (its JIT cut session 10's block stage), then the tables.
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
SEL="mla_decode and not in_subprocess and not bad_input and not misspelt"
RACE_K="(mla_decode_cuda_grid and bf16 and H128) or (mla_decode_cuda_forced_splits and bf16 and H128) or (graph_replay and H128)"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-570} build \
 "run:tma-probe:40:nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/tma bench/experiments/mla_tma_probe.cu && /tmp/tma" \
 "run:tma-tests:90:KVCORE_MLA_WGMMA_LOADER=tma $T tests/test_mla.py tests/test_nan.py tests/test_determinism.py tests/test_cuda_graph.py -x -k '$SEL'" \
 "run:mla-tma:40:KVCORE_MLA_WGMMA_LOADER=tma python3 -m kvcore.bench --group mla --out $o/mla-tma" \
 "bench:mla:40" \
 "run:h2o-wide-tests:40:KVCORE_SCORE_EPILOGUE=wide $T tests/test_decode_score.py -x -k 'not in_subprocess and not misspelt'" \
 "run:ev-wide:30:KVCORE_SCORE_EPILOGUE=wide python3 -m kvcore.bench --group eviction --out $o/ev-wide" \
 "bench:eviction:30" \
 "run:race-tma:60:KVCORE_MLA_WGMMA_LOADER=tma KVCORE_SANITIZE_FILES='tests/test_mla.py tests/test_cuda_graph.py' KVCORE_SANITIZE_K='$RACE_K' bash bench/sanitize.sh $o/race-tma racecheck" \
 "run:ncu-src-mla:100:NCU_SOURCE=1 bash bench/experiments/ncu_pack.sh $o/ncu-src mla_decode_H128" \
 "run:ncu-src-rest:160:NCU_SOURCE=1 bash bench/experiments/ncu_pack.sh $o/ncu-src-rest h2o_B16 compact_50 block_sparse_B16" \
 "run:block:40:python3 -m kvcore.bench --group block --impl kvcore,torch --out $o/block"
