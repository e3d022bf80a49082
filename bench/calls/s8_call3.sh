#!/usr/bin/env bash
# Session 8, device call 3: does racecheck model a bar.arrive / bar.sync hand-off (the P hand-off
# of mla_decode_wgmma_kernel, 62 reports in call 2)? Then initcheck over every op (issue 8).
# The results are packed every 20 s, so a call cut by the session's device budget still returns them.
o=/tmp/c; mkdir -p $o
(while sleep 20; do tar czf $OUT/c.tgz.part -C /tmp c 2>/dev/null && mv $OUT/c.tgz.part $OUT/c.tgz; done) &
packer=$!
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
nvcc -arch=sm_90a -o /tmp/rnb bench/experiments/racecheck_named_barrier.cu > $o/rnb-build.log 2>&1
for m in arrive sync; do timeout 60 $cs --tool racecheck /tmp/rnb $m > $o/rnb-$m.log 2>&1; echo "rnb $m rc=$?"; tail -2 $o/rnb-$m.log; done
bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-420} build \
 "run:proj-tests:40:python3 -m pytest -q -p no:cacheprovider -rfE -m cuda tests/test_mla.py -k 'latent_project and not in_subprocess'" \
 "sanitize:all:initcheck:360"
kill $packer; wait $packer 2>/dev/null
tar czf $OUT/c.tgz -C /tmp c
