#!/usr/bin/env bash
# Session 13, device call 2. infllm_unit_scores' flat kernel (a CTA's units as one contiguous run
# of vectors, 8 per thread in flight, the first chunk issued before the q fold), topk_rows'
# skip of warps with no key left to count, the step's selection written by one gather into a
# kept buffer (no concatenation): the retrieval tests and the other CUDA files that call these
# ops, the step's kernel breakdown, the retrieval table; then per-SASS Nsight Compute profiles
# of block_sparse_decode at B16 page 16 and B1 page 128 (issue 4's gaps).
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-480} build \
 "run:tests:150:$T tests/test_retrieval.py tests/test_transformers_infllm.py tests/test_cuda_graph.py tests/test_nan.py tests/test_properties.py tests/test_determinism.py -k 'not in_subprocess'" \
 "run:profile:60:python3 bench/experiments/retrieval_step_profile.py" \
 "run:retrieval:40:python3 -m kvcore.bench --group retrieval --impl kvcore,kvcore-graph --out $o/retrieval" \
 "run:ncu:150:NCU_SOURCE=1 bash bench/experiments/ncu_pack.sh $o/ncu block_sparse_B16 block_sparse_B1"
