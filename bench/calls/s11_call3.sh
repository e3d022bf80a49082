#!/usr/bin/env bash
# Session 11, device call 3 (carry .peers). block_sparse_decode's list prefetch, second form (call
# 2's first form stalled on register copies of loads in flight): its tests (with the no-dedup
# subprocess), the block table, its ncu source profile and racecheck; the decode and eviction
# tables (gqa_decode's SASS is unchanged; the table is for the closing note); the MLA table with
# the TMA loader (kvcore only) now that Q staging and the merge are off the critical path.
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
BS_K="(block_sparse_decode_matches_reference and bf16) or forced_splits or partial_last_page or junk_past or empty_selections"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-330} build \
 "run:bs-tests:90:$T tests/test_block_sparse.py tests/test_retrieval.py -x" \
 "run:block:40:python3 -m kvcore.bench --group block --impl kvcore,torch --out $o/block" \
 "run:ncu-src-bs:60:NCU_SOURCE=1 bash bench/experiments/ncu_pack.sh $o/ncu-src-bs block_sparse_B16" \
 "run:race-bs:40:KVCORE_SANITIZE_FILES=tests/test_block_sparse.py KVCORE_SANITIZE_K='$BS_K' bash bench/sanitize.sh $o/race-bs racecheck" \
 "bench:retrieval:40" \
 "run:mla-tma:30:KVCORE_MLA_WGMMA_LOADER=tma python3 -m kvcore.bench --group mla --impl kvcore --out $o/mla-tma" \
 "bench:eviction:30" \
 "bench:decode:60"
