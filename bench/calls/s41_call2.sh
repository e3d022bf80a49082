#!/usr/bin/env bash
# Session 41 call 2 (an H100; carry .peers). Call 1 (decode_trace, same H100) found no B1 S32768
# difference between 12acf69's sort and ce1d952's (ORDER 52.0-52.8 us in both tables, every
# variant), so the code's size is not what call 3 of session 40 saw. Here: issue 2's decode table
# again with the landed code (ce1d952's kernel), then four kvcore + cuDNN runs for medians.
o=/tmp/c
rm -rf $o; mkdir -p $o
d="python3 -m kvcore.bench --group decode --no-plot --impl kvcore,sdpa-cudnn"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-450} build \
 "bench:decode:120" \
 "run:med-1:40:$d --seed 1 --out $o/med-1" "run:med-2:40:$d --seed 2 --out $o/med-2" \
 "run:med-3:40:$d --seed 3 --out $o/med-3" "run:med-4:40:$d --seed 4 --out $o/med-4"
cat $o/stages.txt | cut -c1-120
grep -h "^|" $o/decode/*.md | head -20
python3 bench/experiments/decode_medians.py $o/decode/*.json $o/med-*/*.json 2>&1 | tail -17
