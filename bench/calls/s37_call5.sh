#!/usr/bin/env bash
# Session 37, call 5 (an H100; carry .peers): issue 2's grid at this session's code (the decode
# kernels as session 36 left them; page_order_fits, a refactor, first timed here). The decode group
# three times with kvcore and cuDNN SDPA (seeds 0-2), their medians, then the full table (every
# peer) once. Predicted: as session 36's calls 4-5 on a machine like theirs (B16 random 1.003-1.006
# of cuDNN, every other point at or ahead); on a machine like session 35's, B16 ahead.
o=/tmp/c
rm -rf $o; mkdir -p $o
b="python3 -m kvcore.bench --group decode --no-plot"
ab=()
for seed in 0 1 2; do
  ab+=("run:auto-$seed:40:$b --impl kvcore,sdpa-cudnn --seed $seed --out $o/auto-$seed")
done
med="python3 bench/experiments/decode_medians.py $o/auto-0/*.json $o/auto-1/*.json $o/auto-2/*.json"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build "${ab[@]}" \
 "run:medians:20:$med" "bench:decode:120"
cat $o/medians.log
