#!/usr/bin/env bash
# Session 14, device call 3. bench/experiments/layout_probe.py: does the token-major paged layout
# ([pages, page_size, Hkv, D]) cost gqa_decode DRAM efficiency (the same bytes as one KV head
# per sequence, contiguous 4 KB pages), with each loader; then memcheck and racecheck over the
# gqa_decode CUDA tests under the TMA loader (its mbarrier ring and the zeroed tail rows).
o=/tmp/c
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build \
 "run:layout-cp:60:python3 bench/experiments/layout_probe.py $o/layout-cp.json" \
 "run:layout-tma:60:KVCORE_DECODE_LOADER=tma python3 bench/experiments/layout_probe.py $o/layout-tma.json" \
 "run:san-tma:200:KVCORE_DECODE_LOADER=tma KVCORE_SANITIZE_FILES=tests/test_ops.py KVCORE_SANITIZE_K='gqa_decode and cuda and not in_subprocess and not misspelt and not bad' bash bench/sanitize.sh $o/san-tma memcheck racecheck"
