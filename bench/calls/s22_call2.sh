#!/usr/bin/env bash
# Session 22: the CUDA tests after the session's host-code changes (the reviews' fixes: launcher
# checks, the attention_scores q copy, the 256-split caps, the wrappers' autograd guard and
# argument checks, mla_latent_project's captured counters) and the test fixes (test_eviction's
# CUDA params, never selected by -m cuda before). The odd-offset q case first and alone (a
# misaligned-address fault would poison the rest of its process), then every file's CUDA cases
# in 4 processes at once, without the kernel-switch subprocess re-runs (their kernels did not
# change). Stands in for s20_call2.sh's non-page-major stages and s21_call3.sh.
o=/tmp/c
rm -rf $o; mkdir -p $o  # (a machine can keep /tmp from an earlier call)
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-575} build \
 "tests:60:tests/test_eviction.py:strided_q" \
 "ptests:420:4:not in_subprocess and not strided_q"
