#!/usr/bin/env bash
# Session 15, device call 2: gqa_decode's tile-stealing schedule (KVCORE_DECODE_SCHEDULE=steal)
# against the static one, alternating processes; the read ceiling again with every trial kept;
# then the stealing tests and the suite files call 1's shard 2 did not finish.
o=/tmp/c
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-575} build \
 "run:dec-static:70:python3 -m kvcore.bench --group decode --impl kvcore --out $o/dec-static" \
 "run:dec-steal:70:KVCORE_DECODE_SCHEDULE=steal python3 -m kvcore.bench --group decode --impl kvcore --out $o/dec-steal" \
 "run:dec-static2:70:python3 -m kvcore.bench --group decode --impl kvcore --out $o/dec-static2" \
 "run:dec-steal2:70:KVCORE_DECODE_SCHEDULE=steal python3 -m kvcore.bench --group decode --impl kvcore --out $o/dec-steal2" \
 "run:ceiling:60:python3 bench/experiments/read_ceiling.py $o/ceiling.json" \
 "ptests:200:3:steal or split_schedule or misspelt" \
 "run:shard2:150:python3 -m pytest tests/test_eviction.py tests/test_scale.py tests/test_decode_workspace.py tests/test_cuda_graph.py -m cuda -q -p no:cacheprovider -rfE -x --durations=10"
