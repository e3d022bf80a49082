#!/usr/bin/env bash
# Prepared in session 24 (no device: loans were paused) and not run there. Next session's first
# call, replacing s23_call1.sh (which it contains). Session 24 changed every split-KV decode
# kernel's ranges (split_range.h's split_chunk: a shorter sequence's splits share its own keys),
# compiled but never run, so the CUDA tests of the changed kernels come first: gqa_decode (4-warp,
# 8-warp, TMA and page-major through their subprocess re-runs), the H2O score paths,
# block_sparse_decode (unchanged range, shared body) and mla_decode. Then the ragged experiment
# under the default, KVCORE_DECODE_KERNEL=page8 and KVCORE_DECODE_WARPS=4 (its "short" rows: the
# automatic split count should now be near the best forced one), the decode table with peers
# (the full-length rows must not move: their ranges are bit for bit session 22's), and session
# 22's merged attention_scores split cap (compiled, never run). Carry .peers.
o=/tmp/c
rm -rf $o; mkdir -p $o  # (a machine can keep /tmp from an earlier call)
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "tests:180:tests/test_ops.py,tests/test_decode_score.py,tests/test_mla.py,tests/test_block_sparse.py,tests/test_determinism.py,tests/test_cuda_graph.py,tests/test_eviction.py:(gqa_decode or mla_decode or block_sparse or bitwise or fixed_splits or graph or attention_scores) and not in_subprocess" \
 "run:ragged-default:90:python3 bench/experiments/ragged_decode.py --splits 2,4,8,16 $o/ragged-default.json" \
 "bench:decode:100" \
 "run:ragged-page8:60:KVCORE_DECODE_KERNEL=page8 python3 bench/experiments/ragged_decode.py $o/ragged-page8.json" \
 "run:variants:200:bash bench/calls/s24_variants.sh $o" \
 "run:ragged-warps4:60:KVCORE_DECODE_WARPS=4 python3 bench/experiments/ragged_decode.py $o/ragged-warps4.json"
