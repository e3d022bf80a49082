#!/usr/bin/env bash
# Session 32, call 3 (carry .peers and .exp; ran on an H200: no H100 came). mla_decode's new merge rule (csrc/mla/mla_decode.cu plan_grid): the 64-head
# kernels merge splits in their last CTA only with at most 3 splits and at least 64 (sequence,
# head block) pairs, else in mla_merge_kernel (was: in the kernel up to 4 splits), from call 1's
# mla_merge_ab. (a) The mla_decode CUDA cases of test_mla, test_nan, test_determinism and
# test_cuda_graph, and the mla_decode plan tests, in two processes. (b) ragged_mla.py at small
# H128 batches, every sequence full (4096 keys), forced 2 and 4 splits and the automatic count.
# Predicted from call 1's separate-merge column: B8 2 splits ~76, 4 splits ~48 us; B16 ~81 /
# ~59; B32 4 splits ~111 (was 125), 2 splits unchanged ~92. (c) The mla bench group (its grid's
# rows plan 1 split or 2 at 64 pairs or more than 4: predicted unchanged). (d) call 1's
# mla_merge_ab again, on this GPU.
o=/tmp/c
rm -rf $o; mkdir -p $o
sel='mla_decode and not in_subprocess and not bad_input and not misspelt'
files='tests/test_mla.py tests/test_nan.py tests/test_determinism.py tests/test_cuda_graph.py'
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-400} build \
 "run:mla-tests:150:python3 -m pytest $files -m cuda -k '$sel' -n 2 -q -p no:cacheprovider -rfE --tb=short" \
 "run:ragged-mla:60:python3 bench/experiments/ragged_mla.py --splits 2,4 --shapes 8x128x4096,16x128x4096,32x128x4096 --patterns equal $o/ragged_mla.json" \
 "run:merge_ab:40:OUT=$o bash bench/calls/s31_merge_ab.sh" \
 "bench:mla:90"
