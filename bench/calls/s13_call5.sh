#!/usr/bin/env bash
# Session 13, device call 5. topk_rows launched programmatically behind infllm_unit_scores (its CTA
# starts while the scores drain); the PDL helpers shared (common/pdl.h, device_utils.cuh); the
# bench Timer's flush a plain int32 read. Tests of the retrieval ops, the H2O score path (its
# epilogue uses the same helpers) and graphs; the step profile; kvcore-only tables to compare with
# call 4 (the flush change should not move them); Nsight Compute of the selection's two kernels.
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-430} build \
 "run:tests:120:$T tests/test_retrieval.py tests/test_decode_score.py tests/test_cuda_graph.py tests/test_transformers_infllm.py -k 'not in_subprocess'" \
 "run:profile:30:python3 bench/experiments/retrieval_step_profile.py" \
 "run:retrieval:30:python3 -m kvcore.bench --group retrieval --out $o/retrieval" \
 "run:decode-k:20:python3 -m kvcore.bench --group decode --impl kvcore --out $o/decode-k" \
 "run:block:20:python3 -m kvcore.bench --group block --impl kvcore --out $o/block" \
 "run:ev:20:python3 -m kvcore.bench --group eviction --impl kvcore,kvcore-score --out $o/ev" \
 "run:ncu:70:NCU_SOURCE=1 bash bench/experiments/ncu_pack.sh $o/ncu retrieval_select" \
 "run:sub:90:$T tests/test_decode_score.py tests/test_retrieval.py -k 'in_subprocess or misspelt'"
