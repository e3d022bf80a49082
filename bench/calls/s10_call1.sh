#!/usr/bin/env bash
# Session 10, device call 1 (written in session 9; carry .peers): where each open performance gap
# waits. bench/experiments/ncu_pack.sh over every key of ncu_pack.py (the full section set plus
# the raw warp-stall breakdown per key, new in session 9 and not yet run), then the benchmark
# groups at the defaults for the tables. ~25 s per ncu key (13 s full set + the stall pass).
o=/tmp/c; mkdir -p $o
(while sleep 20; do tar czf $OUT/c.tgz.part -C /tmp c 2>/dev/null && mv $OUT/c.tgz.part $OUT/c.tgz; done) &
packer=$!
bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "run:ncu-mla:80:bash bench/experiments/ncu_pack.sh $o/ncu mla_decode_H128 mla_decode_H16" \
 "run:ncu-rest:240:bash bench/experiments/ncu_pack.sh $o/ncu-rest decode_B1 h2o_B16 compact_50 block_sparse_B16 token_decoder_L16 mla_project_T1" \
 "bench:decode:120" \
 "bench:block:60"
kill $packer; wait $packer 2>/dev/null
tar czf $OUT/c.tgz -C /tmp c
