#!/usr/bin/env bash
# Session 30, call 2 (carry .exp; see s30_touch_trace.sh). (a) The page-touch experiment on
# decode_trace (no build needed). (b) Build, then Nsight Compute on cuDNN SDPA's kernel next to
# kvcore's at grids where both launch the same CTAs (session 29, bench/experiments/peer_kernels.py:
# B16 128 CTAs, one per (sequence, KV head); B1 S131072 32 splits x 8 heads) and at B32 Hq64:
# DRAM throughput, L2 hit rate, issue slots, stall reasons, so the per-CTA difference has a name
# (ncu_pack.sh: each key's ncu --set full and warp-stall breakdown; OUTDIR/summary.txt).
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} \
 "run:touch:150:OUT=$o bash bench/calls/s30_touch_trace.sh" build \
 "run:ncu:400:bash bench/experiments/ncu_pack.sh $o/ncu decode_B16 cudnn_B16 decode_B1_S131072 cudnn_B1_S131072 decode_B32_Hq64 cudnn_B32_Hq64 decode_B16_in_order"
