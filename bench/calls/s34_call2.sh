#!/usr/bin/env bash
# Session 34, call 2 (carry .exp as in s34_call1.sh). Call 1's ladder ran (an H100: one 8-warp CTA
# alone reads at ~40 GB/s, 1.57 us a 128-token tile; 64 CTAs at ~46 GB/s each), its trace stage
# did not (a quoting slip). This call:
# (a) call 1's trace stage: B16 traced with per-tile CSVs (twice in order, once random), the
#     2-stage ring, Q in registers (lib8q) alternated with lib8, 2 splits of 4 warps with ORDER 0 / 1.
#     And the 8-warp B16 kernel launched as thread-block clusters of 2, 4 and 8 CTAs (a sequence's
#     KV heads, which read the same pages, placed in one GPC and started together; no barrier
#     between them): session 17 tried clusters only with the 4-warp kernel (two waves at 8, a
#     per-tile cluster barrier at 2). Predicted: no change (nothing keeps them together after the
#     start) unless the same-page reads' DRAM locality at the start matters.
#     trace_csv_stats.py then summarises the CSVs (bulk and end rates per CTA, CTAs still loading
#     and the landed rate in the last 12 us, per-SM loop times run to run).
# (b) build, then the library's 4-warp kernel alone on an SM (B1 Hq4 Hkv1 S8192, one split) and
#     at B16 with the cp.async loader and with the TMA loader (KVCORE_DECODE_LOADER=tma): does
#     TMA raise what one CTA can read (the tail's catch-up rate)? Prediction: cp.async 4-warp
#     alone ~30 GB/s (decode_trace in call 1: 140.8 us); TMA alone faster (no per-thread copy
#     issue), at B16 slower (session 14: 128-byte box halves cost DRAM efficiency).
o=/tmp/c
rm -rf $o; mkdir -p $o/csv
trace=". bench/calls/trace_run.sh; TRACE_ROWS='^B[0-9]|check|main loop|first tile|exit|epilogue|landed|loop us|rror'; \
 for rep in 1 2; do TABLE=seq TRACE_CSV=$o/csv/b16_seq_\$rep.csv run \"B16 seq rep \$rep\" lib8 16 8192 1; done; \
 TABLE=random TRACE_CSV=$o/csv/b16_random.csv run 'B16 random' lib8 16 8192 1; \
 TABLE=seq run 'B16 seq 2 stages' lib8 16 8192 1 32 8 16 2; \
 for rep in 1 2; do for b in lib8 lib8q; do TABLE=seq run \"B16 seq \$b\" \$b 16 8192 1; done; done; \
 TABLE=seq run 'lib8q 1 CTA' lib8q 1 8192 1 4 1; TABLE=seq run 'lib8 1 CTA 2 stages' lib8 1 8192 1 4 1 16 2; \
 TRACE_ROWS='^B[0-9]|check|clusters of|main loop|exit|rror'; for c in 2 4 8; do CLUSTER=\$c TABLE=seq run \"B16 seq cluster \$c\" lib8 16 8192 1; done; \
 CLUSTER=8 TABLE=random run 'B16 random cluster 8' lib8 16 8192 1; \
 TRACE_ROWS='^B[0-9]|^ORDER|check|rror'; for ord in 0 1; do ORDER=\$ord TABLE=seq run \"B16 seq 4 warps 2 splits order \$ord\" lib 16 8192 2; done"
probe="for loader in cp_async tma; do for rep in 1 2; do \
 KVCORE_DECODE_LOADER=\$loader python3 bench/experiments/decode_splits_probe.py --shape 1,4,1,8192 1 | sed \"s/^/\$loader /\"; \
 KVCORE_DECODE_LOADER=\$loader python3 bench/experiments/decode_splits_probe.py --shape 16,32,8,8192 1 | sed \"s/^/\$loader /\"; done; done"
# TRACE_ONLY=1: (a) alone (~1 minute), when little device time is left.
rest=(build "run:probe:150:$probe")
[ "${TRACE_ONLY:-0}" = 1 ] && rest=()
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-400} \
 "run:trace:120:$trace" \
 "run:csvstats:30:python3 bench/experiments/trace_csv_stats.py $o/csv/b16_seq_1.csv $o/csv/b16_seq_2.csv $o/csv/b16_random.csv" \
 "${rest[@]}"
grep -v "landed GB/s per 10" $o/trace.log | tail -80; cat $o/csvstats.log $o/probe.log
