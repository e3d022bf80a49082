#!/usr/bin/env bash
# Session 29, call 2 (carry .exp: decode_trace.cu built as lib (4 warps) and lib8 (-DTRACE_WARPS=8)).
# Call 1 showed cuDNN SDPA runs the same schedule as kvcore at B16 (128 CTAs, one per (sequence,
# KV head), one wave, no split) and at B1 S131072 (256 CTAs: 32 splits x 8 heads, plus a 3 us
# reduction kernel), yet its main kernel is 3-7 us faster. It reads contiguous K/V per head, while
# kvcore's CTAs read one head's 256-byte rows, 2 KB apart, out of pages that hold all 8 heads
# (NHD), so every DRAM row is opened by 8 CTAs at 8 different times. Question: does a page layout
# with each head's rows contiguous (HND: [page][head][token][D], 4 KB runs at page 16) close the
# gap? Predicted, if DRAM row locality is the cause: HND 2-3% faster at B16, B64, B1 S131072 and
# B32 Hq64; the per-head plain read much faster under HND. NHD and HND alternate, two reps.
# It ran (on an H200) with code this session then reverted, never committed: GqaDecodeParams had
# kv_row_stride / kv_head_stride (the kernel's row and head offsets from them, the launcher
# setting NHD's), and decode_trace.cu read HEAD_MAJOR=1 as "pages laid out [Hkv][PAGE][D]". HND was
# no faster (B16 127.4 against 127.5 us; bench/NOTES.md, session 29), so the switch does not exist.
TRACE_ROWS="^NHD|^HND|check|not run"
. bench/calls/trace_run.sh
{
for rep in 1 2; do
  for hm in 0 1; do
    HEAD_MAJOR=$hm run "B16 8 warps hm$hm" lib8 16 8192 1
    HEAD_MAJOR=$hm run "B64 S4096 hm$hm" lib 64 4096 1
    HEAD_MAJOR=$hm run "B1 S131072 hm$hm" lib 1 131072 32
    HEAD_MAJOR=$hm run "B32 Hq64 S8192 hm$hm" lib 32 8192 1 64 8
    HEAD_MAJOR=$hm run "B1 S32768 hm$hm" lib 1 32768 32
    HEAD_MAJOR=$hm run "B128 S2048 hm$hm" lib 128 2048 1
  done
done
} > $OUT/trace.txt 2>&1
grep -E "^===|^NHD|^HND|MISMATCH|not run|rror" $OUT/trace.txt | cut -c1-400
