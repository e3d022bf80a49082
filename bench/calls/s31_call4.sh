#!/usr/bin/env bash
# Session 31, call 4 (no peers needed). Call 3 found test_mla_decode_dominant_sequence_doubles_
# splits_cuda failing under KVCORE_MLA_DECODE_WIDE=old (128 heads on the 32-head kernel: four
# head blocks a sequence, so the shapes plan 2 splits, not the 64-head kernels' 4; a failure since
# session 29's B16 H128 form, which no rerun had run); it now skips there. This runs the mla_decode
# kernel-switch reruns (test_mla.py's MLA_DECODE_KERNEL_TESTS selection over MLA_DECODE_TEST_FILES)
# under each switch at once, one pytest run each (two xdist workers), instead of the subprocess tests one after
# another: KVCORE_MLA_DECODE_WIDE=old and seesaw, KVCORE_MLA_WGMMA_HANDOFF=named,
# KVCORE_MLA_WGMMA_LOADER=tma and KVCORE_MLA_DECODE_H16=old.
o=/tmp/c
rm -rf $o; mkdir -p $o
sel='mla_decode and not in_subprocess and not bad_input and not misspelt'
files='tests/test_mla.py tests/test_nan.py tests/test_determinism.py tests/test_cuda_graph.py'
reruns="for sw in KVCORE_MLA_DECODE_WIDE=old KVCORE_MLA_DECODE_WIDE=seesaw KVCORE_MLA_WGMMA_HANDOFF=named \
 KVCORE_MLA_WGMMA_LOADER=tma KVCORE_MLA_DECODE_H16=old; do \
 env \$sw python3 -m pytest $files -m cuda -k '$sel' -n 2 -q -p no:cacheprovider -rfE --tb=short > $o/rerun-\${sw/=/-}.log 2>&1 & done; wait; \
 for f in $o/rerun-*.log; do echo \"\$f: \$(tail -1 \$f)\"; done"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-330} build \
 "run:reruns:180:$reruns"
