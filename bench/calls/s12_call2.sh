#!/usr/bin/env bash
# Session 12, device call 2 (carry .peers). Page groups as a template parameter (SPP 1 / 2 / a
# whole tile's slots: straight-line code; call 1's runtime group size made every slot a branch and
# cost gqa_decode ~1 point with groups and 10 without); the fused H2O epilogue's departure count
# consumed at the CTA's end. Tests, the tables A/B (groups on/off; fused/narrow), the switch tests
# in subprocesses, sanitizers over the fused score path and block-sparse, an ncu source profile of
# H2O B1, then the full decode table with its peers.
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
BS_K="(block_sparse_decode_matches_reference and bf16) or forced_splits or partial_last_page or junk_past or empty_selections"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-480} build \
 "run:tests:120:$T tests/test_ops.py tests/test_decode_score.py tests/test_block_sparse.py -k 'not in_subprocess'" \
 "run:ev:30:python3 -m kvcore.bench --group eviction --out $o/ev" \
 "run:ev-narrow:30:KVCORE_SCORE_EPILOGUE=narrow python3 -m kvcore.bench --group eviction --out $o/ev-narrow" \
 "run:decode-k:30:python3 -m kvcore.bench --group decode --impl kvcore --out $o/decode-k" \
 "run:decode-off:30:KVCORE_DECODE_PAGE_GROUPS=off python3 -m kvcore.bench --group decode --impl kvcore --out $o/decode-off" \
 "run:block:30:python3 -m kvcore.bench --group block --impl kvcore --out $o/block" \
 "run:block-off:30:KVCORE_SPARSE_PAGE_DEDUP=off python3 -m kvcore.bench --group block --impl kvcore --out $o/block-off" \
 "run:ev2:30:python3 -m kvcore.bench --group eviction --out $o/ev2" \
 "run:sub:120:$T tests/test_decode_score.py tests/test_ops.py -k 'in_subprocess or misspelt'" \
 "run:bs-sub:120:$T tests/test_block_sparse.py tests/test_retrieval.py -k 'in_subprocess or misspelt or retrieval'" \
 "run:san:90:KVCORE_SANITIZE_FILES='tests/test_decode_score.py tests/test_block_sparse.py' KVCORE_SANITIZE_K='(scratch_grid and bf16) or fused_and_fallback or $BS_K' bash bench/sanitize.sh $o/san racecheck memcheck" \
 "run:ncu-h2o:60:NCU_SOURCE=1 bash bench/experiments/ncu_pack.sh $o/ncu-h2o h2o_B1" \
 "bench:decode:70"
