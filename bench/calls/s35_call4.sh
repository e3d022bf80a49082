#!/usr/bin/env bash
# Session 35, call 4 (an H100, no build): cuDNN SDPA's decode kernels and grids (torch.profiler)
# at the decode table's points where kvcore is level or behind with random pages (B64 S4096,
# B128 S2048) and at B32 Hq64 / B1 S131072 / B16 for reference: does cuDNN run one CTA per
# (sequence, KV head) in two or more waves as kvcore's 4-warp kernel does at B64 (512 CTAs, two
# an SM), or another schedule (persistent / lean CTAs)?
mkdir -p $OUT
CUDNN_CASES="64,32,8,4096;128,32,8,2048;32,64,8,8192;1,32,8,131072;16,32,8,8192;48,32,8,4096;33,32,8,4096" \
  timeout 200 python3 bench/experiments/cudnn_rates.py $OUT/cudnn_grids.json 2>&1 | tee $OUT/cudnn_grids.log
