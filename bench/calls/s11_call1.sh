#!/usr/bin/env bash
# Session 11, device call 1 (written in session 10; carry .peers). Where the open gaps stall, by
# instruction, before any kernel change:
# 0. ncu's per-SASS-line stall sampling (ncu_pack.sh NCU_SOURCE=1, new and never run: the first
#    stage checks its ncu options) of the MLA H128 default kernel, the H2O B16 pair (SCORE decode
#    + epilogue), compact keep 50% and block-sparse B16;
# 0b. bench/experiments/mla_tma_probe.cu (session 10, compiled only): does a TMA box reproduce the
#    kernel's swizzled tile layout, and how fast does one issuing thread stream latent tiles;
# 1. the block table without FlashInfer (its JIT cut session 10's block stage), then the tables.
o=/tmp/c
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-570} build \
 "run:tma-probe:40:nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/tma bench/experiments/mla_tma_probe.cu && /tmp/tma" \
 "run:ncu-src-mla:100:NCU_SOURCE=1 bash bench/experiments/ncu_pack.sh $o/ncu-src mla_decode_H128" \
 "run:ncu-src-rest:220:NCU_SOURCE=1 bash bench/experiments/ncu_pack.sh $o/ncu-src-rest h2o_B16 compact_50 block_sparse_B16" \
 "run:block:40:python3 -m kvcore.bench --group block --impl kvcore,torch --out $o/block" \
 "bench:mla:40" \
 "bench:eviction:30"
