#!/usr/bin/env bash
# Session 12, device call 3 (carry .peers). compact_kv's pipelined kernel (KVCORE_COMPACT_KERNEL=
# pipelined, new default: resident CTAs stage the next chunk's indices while the current chunk's
# bytes are in flight): its tests, the eviction table A/B/A against the chunk kernel, the switch
# tests in a subprocess, racecheck / memcheck; then the other CUDA test files that call the
# decode kernels (graphs, determinism, NaN, properties, workspace), and the block and retrieval
# tables with their peers for the README.
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-520} build \
 "run:compact-tests:90:$T tests/test_eviction.py -k 'compact_kv and not in_subprocess'" \
 "run:ev:30:python3 -m kvcore.bench --group eviction --out $o/ev" \
 "run:ev-chunk:30:KVCORE_COMPACT_KERNEL=chunk python3 -m kvcore.bench --group eviction --out $o/ev-chunk" \
 "run:ev2:30:python3 -m kvcore.bench --group eviction --out $o/ev2" \
 "run:other-tests:120:$T tests/test_cuda_graph.py tests/test_determinism.py tests/test_nan.py tests/test_properties.py tests/test_decode_workspace.py tests/test_eviction.py -k 'not in_subprocess and not compact_kv'" \
 "run:compact-sub:120:$T tests/test_eviction.py -k 'compact_kv and (in_subprocess or misspelt)'" \
 "run:san:60:KVCORE_SANITIZE_FILES=tests/test_eviction.py KVCORE_SANITIZE_K='(compact_kv_cuda_patterns and bf16-128-16) or compact_kv_cuda_edge_shapes or compact_kv_cuda_mixed_heads or compact_kv_cuda_scratch_reuse or compact_kv_cuda_long_dense' bash bench/sanitize.sh $o/san racecheck memcheck" \
 "run:block:60:python3 -m kvcore.bench --group block --impl kvcore,torch,gather+sdpa,flex_attention --out $o/block" \
 "bench:retrieval:40"
