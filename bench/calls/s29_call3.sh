#!/usr/bin/env bash
# Session 29, call 3 (carry .exp: bench/experiments/decode_stream.cu built as .exp/stream with the
# nvcc line in its header; the prototype is in commit d3486a5, removed after this run). The persistent "stream of pieces" prototype against the library
# kernel, alternating in one process, at the grid points where cuDNN is ahead. Each pair's keys
# are cut into fixed pieces of falling size; a CTA's first piece comes from its index, later ones
# from a counter, claimed a piece ahead, the tile ring running on across pieces. Controls: the
# pieces that reproduce the library's static grid ("4096,4096" at B16 = 2 splits; "8192" at B32
# Hq64; "32*4096" at B1 S131072) give the prototype's own overhead. Predicted, if the end spread
# is the gap: 1-3% faster where late pieces are small (B16, B32 Hq64, B1 S131072); B64 "4096"
# (512 whole pairs handed out over 264 CTAs, cuDNN's two waves) 0-2% faster.
. bench/calls/trace_run.sh
TRACE_ROWS="^B[0-9]|check|not run|rror"
{
for rep in 1 2; do
  run "B16" stream 16 8192 32 8 8 1 4096,4096 3584,3584,512,256,256 3072,3072,1024,512,256,256 "3*2048,1024,512,256,256" w8:6144,1024,512,512 w8:7168,512,512
  run "B64" stream 64 4096 32 8 4 1 4096 2048,2048 2048,1024,512,256,256 3072,512,256,256
  run "B32 Hq64" stream 32 8192 64 8 4 1 8192 6144,1024,512,256,256 4096,2048,1024,512,256,256
  run "B1 S131072" stream 1 131072 32 8 4 32 "32*4096" "28*4096,4*2048,4*1024,8*512" "30*4096,2*2048,4*512,8*256"
  run "B1 S32768" stream 1 32768 32 8 4 32 "32*1024" "28*1024,4*512,8*256"
done
} > $OUT/stream.txt 2>&1
grep -E "^===|^B[0-9]|MISMATCH|not run|rror" $OUT/stream.txt | cut -c1-330
