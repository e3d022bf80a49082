#!/usr/bin/env bash
# Session 37, call 1 (an H100, carry .exp; no build): do 132 CTAs read faster than 128?
# B16 S8192 runs 128 CTAs (one per sequence and KV head) on 132 SMs, as cuDNN does. A balanced
# (stream-K) partition would give all 132 SMs an equal share, each pair split between two CTAs
# at most. Before building that: the same bytes as 128 CTAs of 8192 tokens (B32 Hq16 Hkv4) and as
# 132 CTAs of 7936 tokens (B33 Hq16 Hkv4, 0.1% fewer bytes), both the 8-warp kernel unsplit,
# random tables in cache order and in order, with B16 Hq32 Hkv8 beside them. Predicted: if the
# 4 idle SMs matter, B33's rate is up to 3% over B32's; if DRAM is the limit, within 0.5%.
. bench/calls/trace_run.sh
TRACE_ROWS='^B[0-9]|^ORDER|rror'
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader
for rep in 1 2 3; do
  ORDER=1 TABLE=random run "B16 Hkv8 rep $rep" lib8 16 8192 1 32 8 16 2
  ORDER=1 TABLE=random run "B32 Hkv4 S8192 (128 CTAs) rep $rep" lib8 32 8192 1 16 4 16 2
  ORDER=1 TABLE=random run "B33 Hkv4 S7936 (132 CTAs) rep $rep" lib8 33 7936 1 16 4 16 2
done 2>&1 | sed 's/(empty kernel.*//' | tee $OUT/sms.log
for rep in 1 2; do
  ORDER=1 TABLE=seq run "B16 Hkv8 in order rep $rep" lib8 16 8192 1 32 8 16 2
  ORDER=1 TABLE=seq run "B32 Hkv4 S8192 in order rep $rep" lib8 32 8192 1 16 4 16 2
  ORDER=1 TABLE=seq run "B33 Hkv4 S7936 in order rep $rep" lib8 33 7936 1 16 4 16 2
done 2>&1 | sed 's/(empty kernel.*//' | tee -a $OUT/sms.log
