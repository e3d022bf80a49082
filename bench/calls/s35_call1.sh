#!/usr/bin/env bash
# Session 35, call 1 (carry .exp and .peers): gqa_decode's 4-warp kernel at head_dim 128 with a
# ring of 2 tiles launched with the 3-stage ring's shared memory (NarrowRingConfig: two CTAs an
# SM as before, so the same split plan), against the 3-stage ring, through the library switch
# KVCORE_DECODE_NARROW_RING; the decode group three times each (kvcore and cuDNN SDPA, seeds 0-2,
# alternated), then the full decode table (every peer) at the default (auto: 2 on Hopper), the
# CUDA tests of the decode files, and decode_trace's 3 / 2-padded / 2 stages at the 4-warp points.
# Predicted from session 34's call 3 (2 stages, unpadded): B32 Hq64 -3 us (353.7 -> ~351), B1
# S32768 -0.3 us, B64 and B128 unknown (their 2-stage runs had three CTAs an SM).
o=/tmp/c
rm -rf $o; mkdir -p $o
b="python3 -m kvcore.bench --group decode --impl kvcore,sdpa-cudnn --no-plot"
ab=()
for seed in 0 1 2; do for ring in 3 2; do
  ab+=("run:ring$ring-$seed:40:KVCORE_DECODE_NARROW_RING=$ring $b --seed $seed --out $o/ring$ring-$seed")
done; done
pad=102400  # GqaDecodeConfig<128>::SMEM_BYTES, the 3-stage ring's
trace=". bench/calls/trace_run.sh; TRACE_ROWS='^B[0-9]|^ORDER|check|rror'; \
 for rep in 1 2; do for pt in '64 4096 1 32' '32 8192 1 64' '128 2048 1 32' '1 32768 32 32' '1 131072 32 32'; do \
 set -- \$pt; ORDER=1 TABLE=random run \"\$pt stages 3\" lib \$1 \$2 \$3 \$4 8 16 3; \
 SMEM_PAD=$pad ORDER=1 TABLE=random run \"\$pt stages 2 padded\" lib \$1 \$2 \$3 \$4 8 16 2; done; done; \
 ORDER=1 TABLE=random run \"32 8192 1 64 stages 2 unpadded\" lib 32 8192 1 64 8 16 2"
# The new switch's subprocess re-runs and the misspelt-switch cases in one pytest process, the
# decode files' in-process CUDA cases in a second, at once on the one GPU.
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=8"
tests="timeout 230 $py tests/test_ops.py -k 'narrow_ring or misspelt' > $o/tests-ring.log 2>&1 & \
 timeout 230 $py tests/test_ops.py tests/test_decode_workspace.py tests/test_cuda_graph.py tests/test_nan.py -k 'not in_subprocess' > $o/tests-decode.log 2>&1; \
 wait; tail -3 $o/tests-ring.log $o/tests-decode.log"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-580} build "${ab[@]}" \
 "run:medians3:20:python3 bench/experiments/decode_medians.py $o/ring3-0/*.json $o/ring3-1/*.json $o/ring3-2/*.json" \
 "run:medians2:20:python3 bench/experiments/decode_medians.py $o/ring2-0/*.json $o/ring2-1/*.json $o/ring2-2/*.json" \
 "bench:decode:100" \
 "run:tests:240:$tests" \
 "run:trace:100:$trace"
cat $o/medians3.log $o/medians2.log
