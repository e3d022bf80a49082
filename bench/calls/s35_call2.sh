#!/usr/bin/env bash
# Session 35, call 2 (an H100; carry .exp and .peers). Call 1 (an H200) timed the 4-warp kernel's
# 2-stage ring (padded to two CTAs an SM) everywhere: one wave of long splits gained ~1% (B32
# Hq64, B1 S131072), several waves or short splits lost (B64, B128, B1 S32768). The library now
# takes it only there (narrow_ring_depth_two). Here: the decode group three times at the new
# default and with KVCORE_DECODE_NARROW_RING=3 (kvcore and cuDNN SDPA, seeds 0-2, alternated);
# the full decode table (every peer); the switch's subprocess tests and the decode files' CUDA
# tests; decode_trace's 3 / 2-padded stages at B32 Hq64, B1 S131072 and B64 on this H100.
# Predicted: B32 Hq64 ~353.7 -> ~351 us (session 34's medians, random pages), B1 S131072 ~-1 us,
# the other points unchanged.
o=/tmp/c
rm -rf $o; mkdir -p $o
b="python3 -m kvcore.bench --group decode --impl kvcore,sdpa-cudnn --no-plot"
ab=()
for seed in 0 1 2; do for ring in auto 3; do
  ab+=("run:ring$ring-$seed:40:KVCORE_DECODE_NARROW_RING=$ring $b --seed $seed --out $o/ring$ring-$seed")
done; done
med="python3 bench/experiments/decode_medians.py"
py="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE --durations=8"
tests="timeout 230 $py tests/test_ops.py -k 'narrow_ring or misspelt' > $o/tests-ring.log 2>&1 & \
 timeout 230 $py tests/test_ops.py tests/test_decode_workspace.py tests/test_cuda_graph.py tests/test_nan.py tests/test_determinism.py -k 'not in_subprocess' > $o/tests-decode.log 2>&1; \
 wait; tail -n 3 $o/tests-ring.log; tail -n 3 $o/tests-decode.log"
pad=102400  # GqaDecodeConfig<128>::SMEM_BYTES, the 3-stage ring's
trace=". bench/calls/trace_run.sh; TRACE_ROWS='^B[0-9]|^ORDER|check|rror'; \
 for rep in 1 2; do for pt in '32 8192 1 64' '1 131072 32 32' '64 4096 1 32'; do \
 set -- \$pt; ORDER=1 TABLE=random run \"\$pt stages 3\" lib \$1 \$2 \$3 \$4 8 16 3; \
 SMEM_PAD=$pad ORDER=1 TABLE=random run \"\$pt stages 2 padded\" lib \$1 \$2 \$3 \$4 8 16 2; done; done"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-580} build "${ab[@]}" \
 "run:medians-auto:20:$med $o/ringauto-0/*.json $o/ringauto-1/*.json $o/ringauto-2/*.json" \
 "run:medians-3:20:$med $o/ring3-0/*.json $o/ring3-1/*.json $o/ring3-2/*.json" \
 "bench:decode:100" \
 "run:tests:240:$tests" \
 "run:trace:60:$trace"
cat $o/medians-auto.log $o/medians-3.log
