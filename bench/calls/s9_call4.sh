#!/usr/bin/env bash
# Session 9, device call 4 (the budget's last ~260 s): the warp-stall breakdown of the two MLA
# decode kernels at the defaults (ncu_pack.sh's new raw WarpStateStats pass), for the next
# session's plan for issue 3 (H128: what the tile loop's chain waits on; H16: 88% vs 92%).
o=/tmp/c; mkdir -p $o
(while sleep 15; do tar czf $OUT/c.tgz.part -C /tmp c 2>/dev/null && mv $OUT/c.tgz.part $OUT/c.tgz; done) &
packer=$!
bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-160} build \
 "run:ncu:70:bash bench/experiments/ncu_pack.sh $o/ncu mla_decode_H128 mla_decode_H16"
kill $packer; wait $packer 2>/dev/null
tar czf $OUT/c.tgz -C /tmp c
