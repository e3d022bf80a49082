#!/usr/bin/env bash
# Session 9, device call 1 (planned in session 8, bench/NOTES.md): carry .peers.
# 1. racecheck's model of the wgmma kernel's hand-off forms (the experiment, three modes); the
#    gqa_decode B1 phase trace (bench/experiments/decode_trace.cu, issue 2);
# 2. the session-8 changes to mla_decode_wgmma_kernel that no GPU has run (constant-offset
#    descriptors, last-tile-only masking, the rescale skip, the mbarrier hand-off; the MLA tile
#    loader's short path, which the H16 kernel takes too): tests, then
#    `--group mla` at the defaults and with KVCORE_MLA_WGMMA_HANDOFF=mbarrier;
# 3. racecheck over the wgmma cases with the mbarrier hand-off; initcheck's 25 tests not reached;
# 4. `--group block` at the defaults (which kernel the token decoder's auto picks), then the
#    switch tests of the old paths.
o=/tmp/c; mkdir -p $o
(while sleep 20; do tar czf $OUT/c.tgz.part -C /tmp c 2>/dev/null && mv $OUT/c.tgz.part $OUT/c.tgz; done) &
packer=$!
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
nvcc -arch=sm_90a -o /tmp/rnb bench/experiments/racecheck_named_barrier.cu > $o/rnb-build.log 2>&1
for m in arrive sync mbarrier; do timeout 60 $cs --tool racecheck /tmp/rnb $m > $o/rnb-$m.log 2>&1; tail -1 $o/rnb-$m.log; done
# Issue 2's B1 gap (69% of copy at S32768): the per-CTA phase trace (entry skew, first-tile
# latency, loop, epilogue with the split merge) at a few split counts.
nvcc -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Icsrc/include \
  bench/experiments/decode_trace.cu -o /tmp/decode_trace > $o/trace-build.log 2>&1
for sp in 16 33 66 132; do timeout 30 /tmp/decode_trace 1 32768 $sp >> $o/decode-trace.log 2>&1; done
tail -4 $o/decode-trace.log
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
MLA="tests/test_mla.py tests/test_nan.py tests/test_cuda_graph.py"
RACE_K="(mla_decode_cuda_grid and bf16 and H128) or (mla_decode_cuda_forced_splits and bf16 and H128) or (graph_replay and H128)"
RET_K="cuda and (unit_scores_op_matches_reference or topk_rows or steps_equal_full_attention)"
bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "run:mla-tests:90:$T $MLA -k 'mla_decode and not in_subprocess'" \
 "bench:mla:60" \
 "run:mla-mbar:40:KVCORE_MLA_WGMMA_HANDOFF=mbarrier python3 -m kvcore.bench --group mla --out $o/mla-mbar" \
 "run:race-mbar:90:KVCORE_SANITIZE_FILES='tests/test_mla.py tests/test_cuda_graph.py' KVCORE_SANITIZE_K='$RACE_K' bash bench/sanitize.sh $o/race-mbar racecheck" \
 "run:init-rest:90:KVCORE_SANITIZE_FILES=tests/test_retrieval.py KVCORE_SANITIZE_K='$RET_K' bash bench/sanitize.sh $o/init-rest initcheck" \
 "run:block:30:python3 -m kvcore.bench --group block --impl kvcore,torch --out $o/block" \
 "run:switch-tests:200:$T tests/test_mla.py tests/test_block_sparse.py -k in_subprocess"
kill $packer; wait $packer 2>/dev/null
tar czf $OUT/c.tgz -C /tmp c
