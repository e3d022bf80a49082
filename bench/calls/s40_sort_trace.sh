#!/usr/bin/env bash
# Session 40, call 2 (an H100; carry .exp: decode_trace.cu built here as .exp/{new,old}{4,8} with
# the nvcc line in its header, -DTRACE_WARPS=4/8; `new` with order_prefetch_tile.patch applied,
# `old` with 12acf69's gqa_decode.cuh). Call 1: with the patch the ORDER kernel still costs its
# sort in full on an in-order table (B16 auto 177.1 / unsorted 174.1 us, B32 Hq64 341.6 / 339.4),
# though at B16 (8 warps, 2-stage ring, one CTA per SM, 128 CTAs) two 64 KB tiles a CTA, 16 MB in
# all, are in flight during the sort: ~5 us of copy against a sort counted at ~1.6 us. Either the
# sort is much longer than counted (then "first copies issued" grows by it, and the landed rate
# dips while CTAs sort) or its cost is not where it runs. Per-CTA phases and landed GB/s per 2 us,
# alternated, ORDER with and without its sort, old and new prologue, the table kernel.
TRACE_ROWS="^B[0-9]|check|first|main loop|exit|per 2 us|rror"
. bench/calls/trace_run.sh
{
for rep in 1 2; do
  for t in seq random; do
    TABLE=$t ORDER=0 run "B16 $t table-kernel" old8 16 8192 1 32 8 16 2
    for v in old new; do
      TABLE=$t ORDER=1 run "B16 $t $v ORDER" ${v}8 16 8192 1 32 8 16 2
      TABLE=$t ORDER=1 ORDER_SKIP_SORT=1 run "B16 $t $v ORDER skip-sort" ${v}8 16 8192 1 32 8 16 2
    done
  done
done
for t in seq random; do
  TABLE=$t ORDER=0 SMEM_PAD=102400 run "B32 Hq64 $t table-kernel" old4 32 8192 1 64 8 16 2
  for v in old new; do
    TABLE=$t ORDER=1 SMEM_PAD=102400 run "B32 Hq64 $t $v ORDER" ${v}4 32 8192 1 64 8 16 2
    TABLE=$t ORDER=1 ORDER_SKIP_SORT=1 SMEM_PAD=102400 run "B32 Hq64 $t $v ORDER skip-sort" ${v}4 32 8192 1 64 8 16 2
  done
done
} > $OUT/sort_trace.txt 2>&1
grep -E "^===|^B[0-9]|first|rror|not run" $OUT/sort_trace.txt | cut -c1-250
