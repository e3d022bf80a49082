#!/usr/bin/env bash
# Session 27, call 1 (carry .exp: decode_trace.cu built as lib (4 warps) and lib8 (-DTRACE_WARPS=8)
# with the nvcc line in its header; supersedes s26_call5.sh, prepared then, never run). Two questions about
# B16 S8192's 184 us against cuDNN's 177 on the H100:
# (a) s26_call5's: kernel time next to the plain reads (one-shot, whole-page paged, per-head
#     paged) at a random and a sequential table;
# (b) would a schedule that uses all 132 SMs (stream-K over the batch's tokens) gain? The same
#     bytes cut three ways with the 4-warp kernel: B16 S8192 2 splits (256 CTAs on 128 SMs, with
#     the split merge), B32 S4096 1 split (256 CTAs, no merge: the merge's cost), B33 S3968
#     1 split (264 CTAs, every SM two; 0.1% fewer bytes): the SM count's worth, no merge.
#     Plus B15 / B17 at S8192 with the 8-warp kernel (120 / 136 CTAs) for rate against CTAs.
TRACE_ROWS="^B[0-9]|check|rror|not run"
. bench/calls/trace_run.sh
{
for rep in 1 2; do
  for t in random seq; do
    TABLE=$t run "B16 8 warps 1 split $t" lib8 16 8192 1
    TABLE=$t run "B16 2 splits $t" lib 16 8192 2
    TABLE=$t run "B32 S4096 $t" lib 32 4096 1
    TABLE=$t run "B33 S3968 $t" lib 33 3968 1
    TABLE=$t run "B1 S32768 $t" lib 1 32768 32
    TABLE=$t run "B1 S131072 $t" lib 1 131072 32
  done
  run "B15 8 warps" lib8 15 8192 1
  run "B17 8 warps" lib8 17 8192 1
  run "B64" lib 64 4096 1
done
} > $OUT/trace.txt 2>&1
grep -E "^===|^B[0-9]|MISMATCH|not run|rror" $OUT/trace.txt | cut -c1-330
