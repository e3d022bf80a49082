#!/usr/bin/env bash
# Prepared in sessions 19-20 (no device was lent in session 20). Carry .peers and .exp; build the
# decode_trace binary first on the CPU machine (~30 s):
#   nvcc -std=c++17 -O3 --use_fast_math --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a \
#     -Icsrc/include bench/experiments/decode_trace.cu -o .exp/lib
#   (the same with -DTRACE_WARPS=8 -o .exp/lib8: gqa_decode's 8-warp kernel, the library's pick at
#   B16; and both again with -DKVCORE_CP_ASYNC_L2_BYTES=256 -o .exp/lib256 / .exp/lib8_256)
# 1. Does the page order's cost come from the kernel's per-head rows? decode_trace times a plain
#    read in the kernel's pattern (a CTA per KV head and split, 256-byte rows 2 KB apart:
#    "per-head paged read") next to the whole-page read (one CTA a page, all heads), each at a
#    random and a sequential table; and the page-major kernel (csrc/include/kvcore/
#    gqa_decode_page_major.cuh: a CTA per (sequence, split, block of H KV heads), a warp per
#    head, H x 256 contiguous bytes a token) at H = 8 (whole pages, 1 CTA/SM), 4 (2/SM) and 2
#    (4/SM), with split counts that fill the GPU, and H = 4 with 6 stages (H:N:6; 192 KB, one
#    4-warp CTA per SM with 160 KB in flight: as many CTAs as H8 with half the splits, so a
#    smaller merge, if 4 warps can keep an SM's stream going). Read: gqa_decode's and
#    page-major's us at the random and the sequential table. If page-major at random is ~1.5-2
#    us under gqa_decode at B16 and no slower at seq, it is the B >= 16 kernel (an `auto` rule
#    for KVCORE_DECODE_KERNEL; bench/NOTES.md, session 20).
#    Also, at the random table: every K/V copy with cp.async's L2 prefetch size 256 B instead of
#    128 (lib256, lib8_256; the page-major kernel in lib256 too): a head's row is 256 contiguous
#    bytes. Never tried; expected small either way.
# 2. Build, the decode table again (is B1 S131072's lead over cuDNN, 130.2 against 130.8 us in
#    session 19, real?), the library's page-major path on the bench's inputs
#    (KVCORE_DECODE_KERNEL=page8, then page4: the launcher's split counts; B1 rows run it too,
#    with many splits: not its shape), the automatic split check.
o=/tmp/c
rm -rf $o; mkdir -p $o  # (a machine can keep /tmp from an earlier call)
TRACE_ROWS="^B[0-9]|check|rror|not run"
. bench/calls/trace_run.sh
{
for rep in 1 2; do
  for t in random seq; do
    TABLE=$t PAGE_MAJOR=8:8,4:4,4:4:6,4:8,2:4,2:8 run "B16 2 splits $t" lib 16 8192 2
    TABLE=$t run "B16 8 warps 1 split $t" lib8 16 8192 1
    TABLE=$t run "B1 S32768 $t" lib 1 32768 32
    TABLE=$t PAGE_MAJOR=8:4,4:2,4:2:6,4:4,2:1,2:2 run "B32 Hq64 $t" lib 32 8192 1 64 8
    TABLE=$t PAGE_MAJOR=8:2,4:1,4:1:6,4:2,2:1,2:2 run "B64 $t" lib 64 4096 1
    TABLE=$t PAGE_MAJOR=8:1,4:1,2:1 run "B128 $t" lib 128 2048 1
  done
  TABLE=random PAGE_MAJOR=8:8,4:8,2:8 run "B16 2 splits L2 256B" lib256 16 8192 2
  TABLE=random run "B16 8 warps 1 split L2 256B" lib8_256 16 8192 1
  TABLE=random run "B1 S32768 L2 256B" lib256 1 32768 32
  TABLE=random PAGE_MAJOR=8:2,4:2 run "B64 L2 256B" lib256 64 4096 1
  TABLE=random PAGE_MAJOR=8:1 run "B128 L2 256B" lib256 128 2048 1
done
} > $OUT/trace.txt 2>&1
grep -E "^===|^B[0-9]|MISMATCH|not run|rror" $OUT/trace.txt | sed -E 's/ \(empty kernel [0-9.]+ us; /; /' | cut -c1-330
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-440} build \
 "bench:decode:100" \
 "run:decode-page8:60:KVCORE_DECODE_KERNEL=page8 python3 -m kvcore.bench --group decode --impl kvcore --out $o/decode-page8" \
 "run:decode-page4:60:KVCORE_DECODE_KERNEL=page4 python3 -m kvcore.bench --group decode --impl kvcore --out $o/decode-page4" \
 "run:splits:60:python3 bench/experiments/auto_splits_check.py $o/splits.json"
