#!/usr/bin/env bash
# Session 29, call 6 (carry .peers): the decode table with the new in-order rows (the six grid
# points again with every sequence's pages in cache order, as FlashInfer's benchmark lays them
# out), one run with peers, for the README. Predicted from call 4's page_order.py: kvcore's
# in-order rows 0-3% faster than its random ones (B16 -2.9%, B32 Hq64 0%), ahead of or within
# 0.3% of cuDNN except B32 Hq64 (~2% behind).
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build "bench:decode:200"
