#!/usr/bin/env bash
# Prepared in session 31 (NOT RUN: the device budget ran out). Carry .exp, with
# bench/experiments/mla_merge_ab.cu built as .exp/mla_merge_ab (the nvcc line in its header).
# mla_decode's 64-head wgmma kernel with its split merge in the
# last CTA of each (sequence, head block) against the separate merge kernel, same decode kernel,
# forced split counts. Predicted from the short rows (ragged_mla.py, calls 2-3): the separate
# merge ~5 us faster at 2 splits and ~10 at 4 where one CTA's merge is the critical path (B1,
# B4 at 256 keys); at B32 H128 S4096 (the MLA bench's row, 2 splits, 64 CTAs merging at once)
# 1-3 us.
{
for args in "32 128 4096 4096 2,3,4" "1 128 256 4096 2,4,8" "4 128 256 4096 2,4" "1 128 4096 4096 2,4,8" \
            "8 128 4096 4096 2,4" "16 128 4096 4096 2,4" "64 128 2048 2048 2" "32 128 4096 4096 2,3,4"; do
  echo "=== $args"
  timeout 60 .exp/mla_merge_ab $args
done
} > $OUT/merge_ab.txt 2>&1
cat $OUT/merge_ab.txt
