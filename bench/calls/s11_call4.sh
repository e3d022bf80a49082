#!/usr/bin/env bash
# Session 11, device call 4 (carry .peers): the MLA split merge kernel as a programmatic dependent
# launch (released by the decode kernels as they start). The MLA decode selection (forced splits
# of 7 take the separate merge), then the MLA table.
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
SEL="mla_decode and not in_subprocess and not bad_input and not misspelt"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-200} build \
 "run:mla-tests:60:$T tests/test_mla.py tests/test_nan.py tests/test_determinism.py tests/test_cuda_graph.py -x -k '$SEL'" \
 "bench:mla:45"
