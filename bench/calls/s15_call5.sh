#!/usr/bin/env bash
# Session 15, device call 5 (review pass): the occupancy query is now one shared mechanism
# (occupancy_per_sm / ctas_per_sm in common/cuda_occupancy.h, cached per footprint; the token
# decoder's own copy removed). Its callers' CUDA tests, and the decode and block groups (kvcore
# only) to see that the launch choices and times did not move.
o=/tmp/c
pt="python3 -m pytest -m cuda -q -p no:cacheprovider -rfE"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-330} build \
 "run:dec:40:python3 -m kvcore.bench --group decode --impl kvcore --out $o/dec" \
 "run:blk:40:python3 -m kvcore.bench --group block --impl kvcore --out $o/blk" \
 "run:tests:150:$pt tests/test_block_transformer.py -k token_decoder > $o/t-td.log 2>&1 & $pt tests/test_ops.py -k 'gqa_decode and not in_subprocess' > $o/t-ops.log 2>&1 & $pt tests/test_eviction.py -k 'not in_subprocess' > $o/t-ev.log 2>&1 & $pt tests/test_mla.py -k 'latent_project and not in_subprocess' > $o/t-mla.log 2>&1; wait; for x in $o/t-*.log; do echo \"\$x: \$(tail -n 1 \$x)\"; done"
