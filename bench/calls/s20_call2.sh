#!/usr/bin/env bash
# Prepared in session 20 (no device was lent). After s20_call1.sh: the CUDA tests of the
# page-major path (KVCORE_DECODE_KERNEL=page8 / page4 / page2, each a subprocess re-run of
# test_ops' gqa_decode cases, test_nan's decode cases, the graph-capture and determinism cases),
# the new page-major-shaped DECODE_CASES at the default kernel, the misspelt-switch cases, and the
# rest of the decode files at the default (the launcher's dispatch changed around them), and
# test_mla's CUDA cases (mla_decode.cu's workspace pointers now come from use_split_workspace;
# the kernels' SASS is unchanged: session 20 compared gqa_decode's, the page-major kernel's and
# the token decoder's instantiations byte for byte after its helper refactors).
o=/tmp/c
rm -rf $o; mkdir -p $o  # (a machine can keep /tmp from an earlier call)
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "tests:300:tests/test_ops.py:page_major or misspelt or matches_reference" \
 "tests:150:tests/test_ops.py,tests/test_cuda_graph.py,tests/test_determinism.py,tests/test_nan.py:not in_subprocess" \
 "tests:100:tests/test_mla.py:not in_subprocess"
