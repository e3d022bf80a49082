#!/usr/bin/env bash
# Session 10, device call 1 (written in session 9; carry .peers).
# 0. the MLA decode kernel tests at the defaults, and memcheck + racecheck over its H128 cases:
#    mla_decode_wgmma_kernel was rewritten onto the shared tile-loop functions after session 9's
#    last call (same operations, new SASS), after issue 8's sanitizer logs were taken;
# 1. mla_decode_seesaw_kernel (KVCORE_MLA_DECODE_WIDE=seesaw, written in session 9, never run):
#    the MLA decode kernel tests with it (-x, under a stage limit in case it hangs), then
#    `--group mla` with it and at the default back to back, and racecheck over its H128 cases;
# 2. where each open gap waits: ncu_pack.sh over every key (the full section set plus the raw
#    warp-stall breakdown, new in session 9), ~25 s per key;
# 3. the decode and block tables at the defaults.
# Added in session 10: compact_kv's persistent scratch (no memset per call): its CUDA tests and the
# eviction table, after the MLA benches.
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
SEL="mla_decode and not in_subprocess and not bad_input and not misspelt"
RACE_K="(mla_decode_cuda_grid and bf16 and H128) or (mla_decode_cuda_forced_splits and bf16 and H128) or (graph_replay and H128)"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-570} build \
 "run:mla-tests:60:$T tests/test_mla.py tests/test_nan.py tests/test_determinism.py tests/test_cuda_graph.py -x -k '$SEL'" \
 "run:seesaw-tests:90:KVCORE_MLA_DECODE_WIDE=seesaw $T tests/test_mla.py tests/test_nan.py tests/test_determinism.py tests/test_cuda_graph.py -x -k '$SEL'" \
 "run:mla-seesaw:40:KVCORE_MLA_DECODE_WIDE=seesaw python3 -m kvcore.bench --group mla --out $o/mla-seesaw" \
 "bench:mla:40" \
 "run:compact-tests:60:$T tests/test_eviction.py tests/test_nan.py -x -k compact" \
 "bench:eviction:40" \
 "run:mla-san:90:KVCORE_SANITIZE_FILES='tests/test_mla.py tests/test_cuda_graph.py' KVCORE_SANITIZE_K='$RACE_K' bash bench/sanitize.sh $o/mla-san memcheck racecheck" \
 "run:race-seesaw:60:KVCORE_MLA_DECODE_WIDE=seesaw KVCORE_SANITIZE_FILES='tests/test_mla.py tests/test_cuda_graph.py' KVCORE_SANITIZE_K='$RACE_K' bash bench/sanitize.sh $o/race-seesaw racecheck" \
 "run:compact-san:60:KVCORE_SANITIZE_FILES=tests/test_eviction.py KVCORE_SANITIZE_K=compact_kv_cuda bash bench/sanitize.sh $o/compact-san memcheck racecheck" \
 "run:ncu-mla:80:bash bench/experiments/ncu_pack.sh $o/ncu mla_decode_H128 mla_decode_H16" \
 "run:ncu-seesaw:40:KVCORE_MLA_DECODE_WIDE=seesaw bash bench/experiments/ncu_pack.sh $o/ncu-seesaw mla_decode_H128" \
 "bench:decode:120" \
 "bench:block:60" \
 "run:ncu-rest:200:bash bench/experiments/ncu_pack.sh $o/ncu-rest decode_B1 h2o_B16 compact_50 block_sparse_B16 token_decoder_L16 mla_project_T1"
