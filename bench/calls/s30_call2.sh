#!/usr/bin/env bash
# Prepared in session 29 for the next session (NOT RUN yet; carry .peers not needed). Nsight
# Compute on cuDNN SDPA's kernel next to kvcore's at grids where both launch the same CTAs
# (session 29, bench/experiments/peer_kernels.py: B16 128 CTAs, one per (sequence, KV head);
# B1 S131072 32 splits x 8 heads) and at B32 Hq64: DRAM throughput, L2 hit rate, issue slots,
# stall reasons, so the per-CTA difference has a name. Build, then ncu_pack.sh over the keys
# (each: ncu --set full and the warp-stall breakdown; OUTDIR/summary.txt holds the headlines).
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "run:ncu:400:bash bench/experiments/ncu_pack.sh $o/ncu decode_B16 decode_B16_in_order cudnn_B16 decode_B1_S131072 cudnn_B1_S131072 decode_B32_Hq64 cudnn_B32_Hq64"
