#!/usr/bin/env bash
# Prepared in session 21 (no device was lent). After s20_call1.sh and s20_call2.sh: the CUDA cases
# of the test files session 21 rewrote around shared helpers (tests/decode_cases.py, conftest's
# out/lse checks) that s20_call2.sh does not already run: test_block_sparse, test_eviction and
# test_properties. (test_ops, test_cuda_graph and test_mla are in s20_call2.sh.) The kernels
# these reach compile to the same SASS as before session 21, so a failure here is the tests'.
o=/tmp/c
rm -rf $o; mkdir -p $o  # (a machine can keep /tmp from an earlier call)
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build \
 "tests:300:tests/test_block_sparse.py,tests/test_eviction.py,tests/test_properties.py:not in_subprocess"
