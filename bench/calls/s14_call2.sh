#!/usr/bin/env bash
# Session 14, device call 2. Why the TMA loader reads 4-5% slower than cp.async (call 1): its
# tensor maps' L2 promotion (KVCORE_DECODE_TMA_L2=256/128/none) in the decode group, and Nsight
# Compute over decode B16 S8192 (key decode_B16) with each loader (DRAM bytes and throughput, L2
# hit rate, stall reasons).
o=/tmp/c
K="python3 -m kvcore.bench --impl kvcore --group decode"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build \
 "run:dec-cp:25:KVCORE_DECODE_LOADER=cp_async $K --out $o/dec-cp" \
 "run:dec-tma256:25:KVCORE_DECODE_LOADER=tma $K --out $o/dec-tma256" \
 "run:dec-tma128:25:KVCORE_DECODE_LOADER=tma KVCORE_DECODE_TMA_L2=128 $K --out $o/dec-tma128" \
 "run:dec-tmanone:25:KVCORE_DECODE_LOADER=tma KVCORE_DECODE_TMA_L2=none $K --out $o/dec-tmanone" \
 "run:ncu-cp:120:KVCORE_DECODE_LOADER=cp_async bash bench/experiments/ncu_pack.sh $o/ncu-cp decode_B16" \
 "run:ncu-tma:120:KVCORE_DECODE_LOADER=tma bash bench/experiments/ncu_pack.sh $o/ncu-tma decode_B16"
