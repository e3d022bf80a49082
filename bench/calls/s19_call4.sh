#!/usr/bin/env bash
# Session 19, device call 4 (carry .peers): the decode table again at the same code as call 2
# (likely another H200), to see whether B1 S131072's lead over cuDNN (130.2 against 130.8 us in
# call 2) holds; and the automatic split check again, for its run-to-run spread.
# Not run in session 19: the machine stopped answering at the start and no device was lent after
# it. Session 20's first call (~300 s).
o=/tmp/c
rm -rf $o; mkdir -p $o  # (a machine can keep /tmp from an earlier call)
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-400} build \
 "bench:decode:100" \
 "run:splits:60:python3 bench/experiments/auto_splits_check.py $o/splits.json"
