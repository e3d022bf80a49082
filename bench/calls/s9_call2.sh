#!/usr/bin/env bash
# Session 9, device call 2: carry .peers.
# 1. the whole CUDA suite at the session-9 defaults (mbarrier P hand-off in the MLA wgmma kernel)
#    as 4 pytest processes at once (ptests, first timing of it);
# 2. racecheck over every op's selection at the new default (issue 8's committed log: the
#    session-8 run's 62 reports were all on the named-barrier form, which racecheck cannot model);
# 3. Nsight Compute over the MLA H128 case after session 8's instruction cuts (issue 3: what
#    the tile loop now stalls on);
# 4. the benchmark groups for the closing tables: decode, eviction, mla, retrieval, block.
o=/tmp/c; mkdir -p $o
(while sleep 20; do tar czf $OUT/c.tgz.part -C /tmp c 2>/dev/null && mv $OUT/c.tgz.part $OUT/c.tgz; done) &
packer=$!
bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-570} build \
 "ptests:300:4" \
 "sanitize:all:racecheck:130" \
 "run:ncu-h128:60:bash bench/experiments/ncu_pack.sh $o/ncu mla_decode_H128" \
 "bench:decode:90" \
 "bench:eviction:40" \
 "bench:mla:50" \
 "bench:retrieval:40" \
 "run:block:30:python3 -m kvcore.bench --group block --impl kvcore,torch --out $o/block"
kill $packer; wait $packer 2>/dev/null
tar czf $OUT/c.tgz -C /tmp c
