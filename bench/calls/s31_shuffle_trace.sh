#!/usr/bin/env bash
# Session 31, call 5 (carry .exp: decode_trace.cu built as .exp/lib and .exp/lib8, as in
# s30_call1.sh, with the new TABLE=shuffleN). What the random table's residual cost is, after
# session 30's cluster64 (random 2 MB regions, pages in order inside: as fast as in order) and
# rowsorted (ascending, a new region every ~4 pages: as fast as in order) tables: shuffle64 keeps
# every 2 MB region of K in place and randomises the page order inside it. Predicted: as fast as
# in order if the cost is a page's translation (its 2 MB region), as slow as random if it is the
# order of the reads within a region. Plain kernels (ORDER 0) unless noted; three reps alternated.
TRACE_ROWS="^B[0-9]|^ORDER|check|not run|rror"
. bench/calls/trace_run.sh
{
for rep in 1 2 3; do
  for t in seq shuffle64 shuffle16 cluster64 rowsorted random; do
    TABLE=$t run "B16 $t" lib8 16 8192 1
  done
  ORDER=1 TABLE=random run "B16 random order 1" lib8 16 8192 1
  for t in seq shuffle64 random; do
    TABLE=$t run "B64 $t" lib 64 4096 1
    TABLE=$t run "B32 Hq64 $t" lib 32 8192 1 64 8
  done
done
} > $OUT/shuffle_trace.txt 2>&1
grep -E "^===|^B[0-9]|^ORDER|MISMATCH|not run|rror" $OUT/shuffle_trace.txt | cut -c1-160
