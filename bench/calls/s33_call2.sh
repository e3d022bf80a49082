#!/usr/bin/env bash
# NOT RUN in session 33 (no device machine could be started after call 1): the next session's first call.
# Session 33, call 2 (carry .peers and .exp as in s33_call1.sh).
# (a) decode_trace at B16, the one grid point where kvcore stayed behind cuDNN on call 1's H100
#     with pages in order too (179.2 against 177.3 us, medians of three): the 8-warp kernel's
#     phases (entry skew, first tile, main loop, epilogue, loop ends) with the default trace rows,
#     and the 4-warp ORDER kernel at 2 splits (256 CTAs, 2 a SM), which call 1's B32 Hq64 rows
#     showed gaining 3.3 us from ORDER in order where the 8-warp kernel gains nothing. Predicted:
#     2 splits of 4 warps with ORDER still ~1% slower than one 8-warp CTA (session 27: 180.6 /
#     178.8 against 177.9 / 175.4 without ORDER; ORDER's ~1% would at best make it level).
# (b) Nsight Compute of mla_decode against FlashInfer's MLA decode on the mla bench's inputs, for
#     the rows where kvcore is behind it (call 1: B32 H128 S4096 90 against 82 us, B64 H16 S8192
#     219 against 212). No prediction to test: the counters say where each kernel's time goes,
#     for the next session's MLA work (ncu_pack.py's flashinfer_mla_* keys).
o=/tmp/c
rm -rf $o; mkdir -p $o
trace=". bench/calls/trace_run.sh; TABLE=seq run \"B16 seq 8 warps\" lib8 16 8192 1; \
 TRACE_ROWS='^B[0-9]|^ORDER|check|rror'; for rep in 1 2; do for t in seq random; do \
 ORDER=1 TABLE=\$t run \"B16 \$t 8 warps order 1\" lib8 16 8192 1; \
 for ord in 0 1; do ORDER=\$ord TABLE=\$t run \"B16 \$t 4 warps 2 splits order \$ord\" lib 16 8192 2; done; done; done"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-575} \
 "run:trace:60:$trace" build \
 "run:ncu128:240:bash bench/experiments/ncu_pack.sh $o/ncu mla_decode_H128 flashinfer_mla_H128" \
 "run:ncu16:200:bash bench/experiments/ncu_pack.sh $o/ncu16 mla_decode_H16 flashinfer_mla_H16"
cat $o/ncu/summary.txt $o/ncu16/summary.txt 2>/dev/null
