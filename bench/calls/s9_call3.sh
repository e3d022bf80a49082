#!/usr/bin/env bash
# Session 9, device call 3 (short: the budget's rest). What call 2 did not reach at the session-9
# defaults: the last 27 tests of its fourth shard (test_determinism, test_compile,
# test_scores_variant), and memcheck / synccheck / initcheck over the MLA H128 wgmma cases with
# the mbarrier P hand-off (the default now; session 8's scope-all runs had the named form).
o=/tmp/c; mkdir -p $o
(while sleep 15; do tar czf $OUT/c.tgz.part -C /tmp c 2>/dev/null && mv $OUT/c.tgz.part $OUT/c.tgz; done) &
packer=$!
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
MLA_K="(mla_decode_cuda_grid and bf16 and H128) or (mla_decode_cuda_forced_splits and bf16 and H128) or (graph_replay and H128)"
SAN="KVCORE_SANITIZE_FILES='tests/test_mla.py tests/test_cuda_graph.py' KVCORE_SANITIZE_K='$MLA_K' bash bench/sanitize.sh $o/mla-san"
bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-230} build \
 "run:rest-tests:60:$T tests/test_determinism.py tests/test_compile.py" \
 "run:mla-san:100:$SAN memcheck synccheck initcheck" \
 "run:scores-variant:60:$T tests/test_scores_variant.py"
kill $packer; wait $packer 2>/dev/null
tar czf $OUT/c.tgz -C /tmp c
