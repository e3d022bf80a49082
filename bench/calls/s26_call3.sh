#!/usr/bin/env bash
# Session 26, third call (H100, after s24_call1.sh and s24_call2.sh): the decode grid's kernel
# switches on an H100 (the defaults were chosen on H200s in sessions 8-22), kvcore alone, one
# process each; then the full table with peers again (a second sample of call 1's).
o=/tmp/c
rm -rf $o; mkdir -p $o
b="python3 -m kvcore.bench --group decode --impl kvcore --out"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build \
 "run:default:40:$b $o/d-default" \
 "run:warps4:40:KVCORE_DECODE_WARPS=4 $b $o/d-warps4" \
 "run:warps8:40:KVCORE_DECODE_WARPS=8 $b $o/d-warps8" \
 "run:page8:40:KVCORE_DECODE_KERNEL=page8 $b $o/d-page8" \
 "run:page4:40:KVCORE_DECODE_KERNEL=page4 $b $o/d-page4" \
 "run:tma:40:KVCORE_DECODE_LOADER=tma $b $o/d-tma" \
 "run:nogroups:40:KVCORE_DECODE_PAGE_GROUPS=off $b $o/d-nogroups" \
 "run:default2:40:$b $o/d-default2" \
 "bench:decode:100"
