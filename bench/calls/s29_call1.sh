#!/usr/bin/env bash
# Session 29, call 1 (carry .peers): session 28's call 4, which the device refused, plus the peers'
# launch shapes. Build; the mla plan tests (two never run on a GPU: the hint's 16-head limit,
# bitwise, and the plan test's H32 case); ragged_mla.py at forced 2 / 4 / 8 to choose a hint rule
# for the 32- and 64-head kernels (their "hint" column should now equal "auto", the H16 rows stay as
# in session 28's call 3: one-long 82.1, short 27.6); then peer_kernels.py: the kernels cuDNN SDPA,
# FlashInfer and kvcore launch at the grid points where cuDNN is ahead (names, grid, block,
# registers, shared memory), to see which schedule cuDNN uses there.
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-480} build \
 "run:tests:80:python3 -m pytest tests/test_mla.py -m cuda -q -p no:cacheprovider -rfE -k 'plan or (mla_decode and matches_reference)'" \
 "run:peers:60:python3 bench/experiments/peer_kernels.py $o/peer_kernels.json" \
 "run:ragged:170:python3 bench/experiments/ragged_mla.py --splits 2,4,8 $o/ragged_mla.json"
