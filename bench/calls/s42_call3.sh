#!/usr/bin/env bash
# Session 42, call 3 (an H100; carry .peers; the landed code, 38211a3). Call 1 ran this code's
# table with every grid point ahead of cuDNN and FlashInfer (B16 random by 0.1 us); call 2, on
# another H100 with the same copy rate, had B64 and B128 random 0.1-0.5% behind cuDNN with both
# session 41's loop sort and the pairwise sort. One more table of this code on whatever host
# comes, with two kvcore + cuDNN runs: is the landed code ahead at every point here too?
o=/tmp/c
rm -rf $o; mkdir -p $o
d="python3 -m kvcore.bench --group decode --no-plot --impl kvcore,sdpa-cudnn"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-250} build "bench:decode:90" \
 "run:med-1:30:$d --seed 1 --out $o/med-1" "run:med-2:30:$d --seed 2 --out $o/med-2"
cat $o/stages.txt | cut -c1-60
grep -h "^|" $o/decode/*.md | head -20
python3 bench/experiments/decode_medians.py $o/decode/*.json $o/med-1/*.json $o/med-2/*.json 2>&1 | tail -17 | sed -E 's/flashinfer.*sdpa-cudnn/... sdpa-cudnn/; s/sdpa-flash.*\|/|/'
