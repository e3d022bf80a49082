#!/usr/bin/env bash
# Session 36, call 10 (an H100; carry .peers), with the session's last ~460 s of device time: the
# Nsight Compute pair session 33 prepared and never ran (s33_call2.sh (b)): mla_decode at B32 H128
# S4096 (the MLA bench row 10-13% behind FlashInfer), then FlashInfer's MLA decode on the same
# inputs. No prediction: the counters are for the next session's MLA work. Whatever finishes
# before the deadline comes back packed.
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-430} build \
 "run:ncu128:260:bash bench/experiments/ncu_pack.sh $o/ncu mla_decode_H128 flashinfer_mla_H128"
cat $o/ncu/summary.txt 2>/dev/null
