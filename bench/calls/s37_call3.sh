#!/usr/bin/env bash
# Session 37, call 3 (an H100; carry .peers). Three things call 2's run of the other groups showed:
# (a) e2e B8 S32768 ran out of memory on this 80 GB GPU after the sdpa row, before kvcore's first
#     step (16 GB of weights + 34 GB of kvcore pool should fit): bench/experiments/e2e_memory.py
#     prints the memory after each of the group's steps and, if the freed DynamicCache is still
#     alive, what holds it. Predicted: the DynamicCache (34 GB) is still alive after it is freed.
# (b) the retrieval group's first row was slow for every implementation (torch 0.650 ms against
#     0.251 on the next row, the same computation): the group twice, then torch alone. Predicted:
#     the first row is slow again in each process (an effect of the first case), or it is not
#     reproducible (a host hiccup).
# (c) the eviction group after the torch-bf16 check fix (b6e948d): no ERROR rows.
o=/tmp/c
rm -rf $o; mkdir -p $o
clocks="nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader"
ret="$clocks; python3 -m kvcore.bench --group retrieval --no-plot --out $o/ret1; $clocks; \
 python3 -m kvcore.bench --group retrieval --no-plot --out $o/ret2; \
 python3 -m kvcore.bench --group retrieval --no-plot --impl torch --out $o/ret3; $clocks"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build \
 "run:e2e_memory:200:python3 bench/experiments/e2e_memory.py 8 32768" \
 "run:retrieval:120:$ret" "bench:eviction:60"
cat $o/stages.txt; cat $o/e2e_memory.log; grep -h "^| B1" $o/ret*/*.md
