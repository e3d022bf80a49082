#!/usr/bin/env bash
# Session 34, call 1 (its first run lost stage "trace" to a quoting slip, fixed for run 2; carry .exp: decode_trace.cu built as .exp/lib (4 warps) and .exp/lib8
# (-DTRACE_WARPS=8); no kvcore build: decode_trace and cudnn_rates.py need only torch and CUDA).
# Issue 2's last gap is B16 S8192, where cuDNN's 4-warp kernel and kvcore's 8-warp one run the same
# one-wave grid (128 CTAs, one per (sequence, KV head)) and cuDNN ends 1-2% sooner.
# (a) The rate ladder: the 8-warp kernel with 1, 4, 16, 32, 64, 96 and 128 CTAs (pages in order),
#     and cuDNN on the same ladder (bench/experiments/cudnn_rates.py). Question: how much faster
#     can one CTA read once others are done, i.e. how much of a one-wave grid's uneven end can be
#     absorbed? Prediction: kvcore's single CTA is issue-bound near ~35-45 GB/s (session 17: a
#     4-warp CTA alone ~30 GB/s); if cuDNN's alone is much faster, its CTAs catch up at the end
#     and ours do not, which would be the gap.
# (b) B16 traced twice with per-tile CSVs (TRACE_CSV, now with each tile's landing time): is a slow
#     CTA slow on the same SM both times (structural), and does it speed up in the tail?
# (c) B16 8 warps with a 2-stage ring (128 KB in flight instead of 3 stages' 192 KB); B16 as two
#     splits of the 4-warp kernel, ORDER 0 / 1 (s33_call2.sh's question).
# (d) .exp/lib8q: the 8-warp kernel with the group's Q fragments loaded once into registers
#     (-DKVCORE_DECODE_Q_REGS=1) instead of 16 ldmatrix a warp a tile; alternated with lib8.
#     Predicted: no change in the DRAM-bound bulk; at most ~0.5 us off the tail if the ladder
#     shows a single CTA's rate limited by its own work.
o=/tmp/c
rm -rf $o; mkdir -p $o/csv
ladder=". bench/calls/trace_run.sh; TRACE_ROWS='^B[0-9]|check|main loop|first tile|exit|epilogue|landed GB/s per 2|rror'; \
 for a in '1 8192 1 4 1' '4 8192 1 4 1' '2 8192 1' '4 8192 1' '8 8192 1' '12 8192 1' '16 8192 1'; do \
 TABLE=seq run \"ladder 8 warps \$a\" lib8 \$a; done; TABLE=seq run 'ladder 4 warps 1 CTA' lib 1 8192 1 4 1"
trace=". bench/calls/trace_run.sh; TRACE_ROWS='^B[0-9]|check|main loop|first tile|exit|epilogue|landed|loop us|rror'; \
 for rep in 1 2; do TABLE=seq TRACE_CSV=$o/csv/b16_seq_\$rep.csv run \"B16 seq rep \$rep\" lib8 16 8192 1; done; \
 TABLE=random TRACE_CSV=$o/csv/b16_random.csv run 'B16 random' lib8 16 8192 1; \
 TABLE=seq run 'B16 seq 2 stages' lib8 16 8192 1 32 8 16 2; \
 for rep in 1 2; do for b in lib8 lib8q; do TABLE=seq run \"B16 seq \$b\" \$b 16 8192 1; done; done; \
 TABLE=seq run 'lib8q 1 CTA' lib8q 1 8192 1 4 1; TABLE=seq run 'lib8 1 CTA 2 stages' lib8 1 8192 1 4 1 16 2; \
 TRACE_ROWS='^B[0-9]|^ORDER|check|rror'; for ord in 0 1; do ORDER=\$ord TABLE=seq run \"B16 seq 4 warps 2 splits order \$ord\" lib 16 8192 2; done"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-500} \
 "run:ladder:120:$ladder" \
 "run:cudnn:90:python3 bench/experiments/cudnn_rates.py $o/cudnn_rates.json" \
 "run:trace:120:$trace"
cat $o/ladder.log $o/cudnn.log 2>/dev/null | grep -v "^  landed"
