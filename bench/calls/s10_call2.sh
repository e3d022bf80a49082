#!/usr/bin/env bash
# Session 10, device call 2 (carry .peers). compact_kv's persistent scratch, second form (the flag
# mark chosen on the host per launch, no epoch read on the ticket's cache line):
# its CUDA tests, the switch's other value (KVCORE_COMPACT_SCRATCH=memset) and racecheck over a
# compact selection; the eviction table with memset / persistent / memset / persistent back to
# back (the compact rows' spread is ~1 point, as large as the change is expected to be); then
# the MLA decode switch tests in their subprocesses (the seesaw entry included).
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
CK="(compact_kv_cuda_patterns and bf16 and (random or shift)) or compact_kv_cuda_scratch_reuse or compact_kv_cuda_mixed_heads or compact_kv_cuda_edge_shapes or compact_kv_cuda_default_lens or compact_kv_cuda_clamps"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-400} build \
 "run:compact-tests:60:$T tests/test_eviction.py tests/test_nan.py -x -k 'compact and not in_subprocess'" \
 "run:ev-memset-1:30:KVCORE_COMPACT_SCRATCH=memset python3 -m kvcore.bench --group eviction --out $o/ev-memset-1" \
 "run:ev-persist-1:30:python3 -m kvcore.bench --group eviction --out $o/ev-persist-1" \
 "run:ev-memset-2:30:KVCORE_COMPACT_SCRATCH=memset python3 -m kvcore.bench --group eviction --out $o/ev-memset-2" \
 "run:ev-persist-2:30:python3 -m kvcore.bench --group eviction --out $o/ev-persist-2" \
 "run:compact-race:70:KVCORE_SANITIZE_FILES=tests/test_eviction.py KVCORE_SANITIZE_K='$CK' bash bench/sanitize.sh $o/compact-race racecheck" \
 "run:compact-switch:60:$T tests/test_eviction.py -k 'compact and (in_subprocess or misspelt)'" \
 "run:mla-switch:150:$T tests/test_mla.py -k 'mla_decode and (in_subprocess or misspelt)'"
