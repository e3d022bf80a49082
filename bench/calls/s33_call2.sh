#!/usr/bin/env bash
# Session 33, call 2 (carry .peers): Nsight Compute of mla_decode against FlashInfer's MLA decode
# on the mla bench's inputs, for the rows where kvcore is behind it (session 26's H100 table:
# B32 H128 S4096 90 against 82 us, B64 H16 S8192 219 against 212). No prediction to test: the
# counters (duration, DRAM and SM throughput, issue slots, occupancy, stall reasons) say where
# each kernel's time goes, for the next session's MLA work. ncu_pack.py's flashinfer_mla_* keys
# profile FlashInfer's kernels (plan outside, as the bench times them).
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-575} build \
 "run:ncu128:300:bash bench/experiments/ncu_pack.sh $o/ncu mla_decode_H128 flashinfer_mla_H128" \
 "run:ncu16:250:bash bench/experiments/ncu_pack.sh $o/ncu16 mla_decode_H16 flashinfer_mla_H16"
cat $o/ncu/summary.txt $o/ncu16/summary.txt 2>/dev/null
