#!/usr/bin/env bash
# Session 11, device call 2 (carry .peers). Call 1's ncu source profiles (per SASS line) showed:
# - MLA H128 B32: ~10% of the samples in Q staging (load + store per piece, ~2 in flight per thread)
#   and ~13% in the last CTA's split merge (one partial round trip per item, 32 per thread);
#   now Q goes by cp.async with the first tiles' loads issued behind it, and the merge batches 8
#   items' loads (weights: one thread per head, one round trip);
# - block-sparse B16: 18% of the samples on the list entry -> block_table chain in fetch_pages;
#   now the list entries are read one tile earlier than the block_table entries.
# Tests first (the MLA decode selection at the default, a TMA / seesaw subset, block-sparse and
# the gqa_decode paths that share its header), then the tables, racecheck, the profiles again.
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
SEL="mla_decode and not in_subprocess and not bad_input and not misspelt"
SUB="mla_decode_cuda_forced_splits or mla_decode_cuda_other_widths or mla_decode_cuda_grid"
RACE_K="(mla_decode_cuda_grid and bf16 and H128) or (mla_decode_cuda_forced_splits and bf16 and H128) or (graph_replay and H128)"
BS_K="(block_sparse_decode_matches_reference and bf16) or forced_splits or partial_last_page or junk_past or empty_selections"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build \
 "run:mla-tests:60:$T tests/test_mla.py tests/test_nan.py tests/test_determinism.py tests/test_cuda_graph.py -x -k '$SEL'" \
 "run:bs-tests:90:$T tests/test_block_sparse.py tests/test_retrieval.py -x -k 'not in_subprocess'" \
 "bench:mla:40" \
 "run:block:40:python3 -m kvcore.bench --group block --impl kvcore,torch --out $o/block" \
 "run:ncu-src-mla:60:NCU_SOURCE=1 bash bench/experiments/ncu_pack.sh $o/ncu-src mla_decode_H128" \
 "run:ncu-src-bs:60:NCU_SOURCE=1 bash bench/experiments/ncu_pack.sh $o/ncu-src-bs block_sparse_B16" \
 "run:tma-sub:40:KVCORE_MLA_WGMMA_LOADER=tma $T tests/test_mla.py -x -k '$SUB'" \
 "run:seesaw-sub:40:KVCORE_MLA_DECODE_WIDE=seesaw $T tests/test_mla.py -x -k '$SUB'" \
 "run:gqa-tests:60:$T tests/test_ops.py tests/test_decode_score.py tests/test_decode_workspace.py -x -k 'decode and not in_subprocess'" \
 "run:race-mla:40:KVCORE_SANITIZE_FILES='tests/test_mla.py tests/test_cuda_graph.py' KVCORE_SANITIZE_K='$RACE_K' bash bench/sanitize.sh $o/race-mla racecheck" \
 "run:race-bs:40:KVCORE_SANITIZE_FILES=tests/test_block_sparse.py KVCORE_SANITIZE_K='$BS_K' bash bench/sanitize.sh $o/race-bs racecheck" \
 "bench:retrieval:40" \
 "run:ncu-src-b1:60:NCU_SOURCE=1 bash bench/experiments/ncu_pack.sh $o/ncu-src-b1 decode_B1 mla_decode_H16"
