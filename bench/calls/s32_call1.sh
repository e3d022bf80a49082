#!/usr/bin/env bash
# Session 32, call 1 (ran on an H100 late in the session; results in
# bench/results/h100-2026-12-05-s32/call1). Carry .peers and
# .exp (decode_trace.cu built as .exp/lib and .exp/lib8 with the new KV_LAYOUT=pagepair,
# mla_merge_ab.cu as .exp/mla_merge_ab).
# (a) Does keeping a page's K and V side by side ([pages, 2, PAGE, Hkv, D], FlashInfer's layout;
#     64 KB runs instead of two 32 KB ones at Hkv 8, D 128) take back what the random table costs
#     kvcore against cuDNN (session 31: 0.3-0.6% behind at B16, B64, B32 Hq64; in order 1% faster)?
#     The decode group (now with the grid's " paired" rows) three times, kvcore / cuDNN /
#     FlashInfer, seeds 0-2, medians by decode_medians.py (which pools cuDNN's timings of a case
#     and its in-order and paired twins). Predicted: if the cost is DRAM locality of scattered
#     32 KB runs, paired random lands about halfway between random and in order (B16 ~180, B64 ~353).
# (b) decode_trace, the same question without torch (2 reps alternated).
# (c) The prepared s31_merge_ab.sh: the 64-head MLA kernel's in-kernel split merge against the
#     separate merge kernel.
o=/tmp/c
rm -rf $o; mkdir -p $o
trace="TRACE_ROWS='^B[0-9]|^ORDER|check|rror'; . bench/calls/trace_run.sh; for rep in 1 2; do for lay in separate pagepair; do \
 KV_LAYOUT=\$lay run \"B16 \$lay\" lib8 16 8192 1; KV_LAYOUT=\$lay run \"B64 \$lay\" lib 64 4096 1; \
 KV_LAYOUT=\$lay run \"B32 Hq64 \$lay\" lib 32 8192 1 64 8; done; done"
bench="python3 -m kvcore.bench --group decode --impl kvcore,sdpa-cudnn,flashinfer --no-plot"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "run:decode0:110:$bench --seed 0 --out $o/decode0" \
 "run:decode1:110:$bench --seed 1 --out $o/decode1" \
 "run:decode2:110:$bench --seed 2 --out $o/decode2" \
 "run:medians:20:python3 bench/experiments/decode_medians.py $o/decode0/*.json $o/decode1/*.json $o/decode2/*.json" \
 "run:merge_ab:60:OUT=$o bash bench/calls/s31_merge_ab.sh" \
 "run:trace:90:$trace"
cat $o/medians.log 2>/dev/null
