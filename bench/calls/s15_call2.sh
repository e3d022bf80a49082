#!/usr/bin/env bash
# Session 15, device call 2: gqa_decode's tile-stealing schedule (KVCORE_DECODE_SCHEDULE=steal)
# against the static one, alternating processes; the read ceiling again with every trial kept;
# then the stealing tests (t-steal.log) next to the suite files call 1's shard 2 did not finish
# (shard2.log).
o=/tmp/c
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-580} build \
 "run:dec-static:70:python3 -m kvcore.bench --group decode --impl kvcore --out $o/dec-static" \
 "run:dec-steal:70:KVCORE_DECODE_SCHEDULE=steal python3 -m kvcore.bench --group decode --impl kvcore --out $o/dec-steal" \
 "run:dec-static2:70:python3 -m kvcore.bench --group decode --impl kvcore --out $o/dec-static2" \
 "run:dec-steal2:70:KVCORE_DECODE_SCHEDULE=steal python3 -m kvcore.bench --group decode --impl kvcore --out $o/dec-steal2" \
 "run:ceiling:60:python3 bench/experiments/read_ceiling.py $o/ceiling.json" \
 "run:tests:330:python3 -m pytest tests/test_ops.py tests/test_determinism.py -m cuda -k 'steal or split_schedule or misspelt or deterministic' -q -p no:cacheprovider -rfE > $o/t-steal.log 2>&1 & python3 -m pytest tests/test_eviction.py tests/test_scale.py tests/test_decode_workspace.py tests/test_cuda_graph.py -m cuda -q -p no:cacheprovider -rfE --durations=10 > $o/shard2.log 2>&1; wait; tail -3 $o/t-steal.log"
