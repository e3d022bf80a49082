#!/usr/bin/env bash
# Session 33, call 1 (carry .peers and .exp: decode_trace.cu built as .exp/lib (4 warps) and
# .exp/lib8 (-DTRACE_WARPS=8) with the nvcc line in its header).
# (a) This machine's decode table three times, medians by decode_medians.py: where issue 2's "no
#     slower than cuDNN" stands, random and in order. Run 0 is the full table (every peer, the
#     plot: the README's table from one run); runs 1-2 time kvcore, cuDNN SDPA and FlashInfer only.
# (b) decode_trace: does visiting pages through the sorted list (ORDER 1, the library's pick with
#     an automatic split count) cost the in-order table anything? Session 30 (one rep): 8 warps B16
#     179.0 plain / 179.6 ORDER; 4 warps B32 Hq64 353.4 / 350.6. Predicted: the 8-warp kernel
#     ~0.5 us slower with ORDER in order (the sort's barriers in the first tiles, nothing to gain
#     from the order); 4-warp faster with ORDER (one coalesced lookup of the split's entries).
# (c) The CUDA tests of the files whose launchers' host checks moved in session 32 (7558e63:
#     common_params checks the split workspace), without the kernel-switch subprocess reruns;
#     then the mla group (this machine's MLA rows against FlashInfer).
o=/tmp/c
rm -rf $o; mkdir -p $o
trace="TRACE_ROWS='^B[0-9]|^ORDER|check|rror'; . bench/calls/trace_run.sh; for rep in 1 2; do for ord in 0 1; do \
 ORDER=\$ord TABLE=seq run \"B16 seq order \$ord\" lib8 16 8192 1; \
 ORDER=\$ord TABLE=seq run \"B32 Hq64 seq order \$ord\" lib 32 8192 1 64 8; done; done; \
 ORDER=1 TABLE=random run \"B16 random order 1\" lib8 16 8192 1; ORDER=1 TABLE=random run \"B32 Hq64 random order 1\" lib 32 8192 1 64 8"
bench="python3 -m kvcore.bench --group decode --impl kvcore,sdpa-cudnn,flashinfer --no-plot"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-575} build \
 "run:decode0:170:python3 -m kvcore.bench --group decode --seed 0 --out $o/decode0" \
 "run:trace:70:$trace" \
 "run:decode1:110:$bench --seed 1 --out $o/decode1" \
 "run:decode2:110:$bench --seed 2 --out $o/decode2" \
 "run:medians:20:python3 bench/experiments/decode_medians.py $o/decode0/*.json $o/decode1/*.json $o/decode2/*.json" \
 "tests:150:tests/test_ops.py,tests/test_decode_workspace.py,tests/test_block_sparse.py:not subprocess" \
 "bench:mla:90"
cat $o/medians.log 2>/dev/null
