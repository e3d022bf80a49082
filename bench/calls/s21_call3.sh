#!/usr/bin/env bash
# Prepared in session 21 (no device was lent), updated in session 22. After s20_call1.sh and
# s20_call2.sh: the CUDA cases of the test files session 21 rewrote around shared helpers
# (tests/decode_cases.py, conftest's out/lse checks) that s20_call2.sh does not already run:
# test_block_sparse and test_eviction (test_properties has no CUDA cases). Session 22 added CUDA
# cases there: attention_scores with a q at an odd element offset (the launcher's copy; if the
# fix did not hold, a misaligned-address fault would poison the rest of its process, so it runs
# in a stage of its own first), the 256-split caps, test_eviction's matches_reference CUDA params
# (unmarked `cuda` before, so no GPU run selected them: compact_kv's have never run on a GPU), and
# the host checks of the CUDA launchers (session 22's CUDA review).
o=/tmp/c
rm -rf $o; mkdir -p $o  # (a machine can keep /tmp from an earlier call)
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-480} build \
 "tests:60:tests/test_eviction.py:strided_q" \
 "tests:300:tests/test_block_sparse.py,tests/test_eviction.py:not in_subprocess and not strided_q"
