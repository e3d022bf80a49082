#!/usr/bin/env bash
# Session 13, device call 1. topk_rows with the row's first 8192 keys held in registers (one read
# instead of one per radix pass), infllm_unit_scores' L2 prefetch of its keys ahead of the q fold,
# and block_sparse_decode's split floor at 128 tokens: the retrieval and block-sparse tests, the
# retrieval step's kernel breakdown, the retrieval and block tables (kvcore only), the B1 split probe.
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-400} build \
 "run:tests:150:$T tests/test_retrieval.py tests/test_block_sparse.py tests/test_transformers_infllm.py -k 'not in_subprocess'" \
 "run:profile:60:python3 bench/experiments/retrieval_step_profile.py" \
 "run:retrieval:40:python3 -m kvcore.bench --group retrieval --impl kvcore,kvcore-graph --out $o/retrieval" \
 "run:block:60:python3 -m kvcore.bench --group block --impl kvcore --out $o/block" \
 "run:splits:40:python3 bench/experiments/splits_probe.py $o/splits.json"
