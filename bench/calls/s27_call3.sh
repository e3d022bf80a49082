#!/usr/bin/env bash
# Session 27, call 3 (carry .peers and .exp): call 2 found the hint picking the 8-warp kernel
# where the 4-warp one splits finer (B16 one-long 51.5 us against 49.1 forced, uniform 101.3
# against 98.3); use_wide_decode now takes the 8-warp kernel with a hint only where the 4-warp
# kernel would not split. Build; the plan and gqa_decode CUDA tests; ragged_decode (now with the
# decode table's own ragged lengths, "bench", and a B64 shape); the decode table with peers; the
# B16 trace's phases (entry, first tile, loop, exit) for the 8-warp kernel and B33 S3968.
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-500} build \
 "run:tests:120:PYTEST_K='(gqa_decode or plan) and not in_subprocess' bash bench/parallel_pytest.sh $o tests tests/test_ops.py" \
 "run:ragged:100:python3 bench/experiments/ragged_decode.py --splits 2,4,8 $o/ragged.json" \
 "bench:decode:110" \
 "run:trace:40:.exp/lib8 16 8192 1; .exp/lib 33 3968 1; .exp/lib 32 4096 1"
