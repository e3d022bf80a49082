#!/usr/bin/env bash
# Session 32, call 2 (ran on the same H100, warm; results in
# bench/results/h100-2026-12-05-s32/call2). No carry needed.
# The CUDA tests after session 32's host-side changes: every op's C++ checks now refuse a written
# tensor that shares bytes with another argument (check_writes_apart, in the launchers of both
# backends, plus the CUDA split workspace in gqa_decode / block_sparse_decode / mla_decode), the
# new test_decode_workspace_sharing_bytes_with_an_argument_is_refused_cuda, PagedKVCache's
# kv_layout="paired" (test_cache's end-to-end decode in both layouts on CUDA) and its faster
# bookkeeping. Every file's CUDA cases in 4 processes at once, without the kernel-switch
# subprocess re-runs (no kernel changed: the one kernel edit, gqa_decode ORDER's listed=true,
# left decode_trace's cubin byte-identical). Predicted: all pass; a failure would be a library
# path that hands a kernel an output overlapping an input on CUDA only.
o=/tmp/c
rm -rf $o; mkdir -p $o
# Then bench/experiments/eager_validation.py: the adapter's eager decode step (Llama 8 layers,
# hidden 1024, B8, 1024-token prompt) with validation off / on (the adapter's calls trusted) / on
# with nothing trusted (before session 32). Predicted: on ~ off; nothing-trusted slower by the
# two device->host syncs a layer (16 a step), each draining the queue of the step's kernels.
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-575} build \
 "ptests:360:4:not in_subprocess" \
 "run:eager_validation:60:python3 bench/experiments/eager_validation.py"
