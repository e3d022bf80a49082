#!/usr/bin/env bash
# Session 13, device call 3. gqa_decode_kernel stages Q by cp.async ahead of every KV request (it
# was two dependent register round trips queued behind the first tiles; all decode kernels:
# gqa_decode, block_sparse_decode, the H2O score path); topk_rows' fast bound (k <= 32: the k-th
# largest warp maximum, then the few keys above it ranked directly). Tests of every op on that
# kernel, racecheck / memcheck on a few, the step breakdown, kvcore-only tables (decode, block,
# retrieval, eviction) and the B1 split probe.
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
BS_K="(block_sparse_decode_matches_reference and bf16) or forced_splits or partial_last_page or empty_selections"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-480} build \
 "run:tests:150:$T tests/test_ops.py tests/test_decode_score.py tests/test_block_sparse.py tests/test_retrieval.py tests/test_cuda_graph.py tests/test_nan.py -k 'not in_subprocess'" \
 "run:profile:40:python3 bench/experiments/retrieval_step_profile.py" \
 "run:decode-k:30:python3 -m kvcore.bench --group decode --impl kvcore --out $o/decode-k" \
 "run:block:20:python3 -m kvcore.bench --group block --impl kvcore --out $o/block" \
 "run:retrieval:30:python3 -m kvcore.bench --group retrieval --out $o/retrieval" \
 "run:splits:20:python3 bench/experiments/splits_probe.py $o/splits.json" \
 "run:ev:30:python3 -m kvcore.bench --group eviction --out $o/ev" \
 "run:san:90:KVCORE_SANITIZE_FILES='tests/test_decode_score.py tests/test_block_sparse.py tests/test_retrieval.py' KVCORE_SANITIZE_K='(scratch_grid and bf16) or fused_and_fallback or topk_rows_matches or $BS_K' bash bench/sanitize.sh $o/san racecheck memcheck"
