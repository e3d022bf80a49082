#!/usr/bin/env bash
# Session 12, device call 4 (short: the session's last device budget). compact_kv's launcher rule
# (KVCORE_COMPACT_KERNEL=auto: the pipelined kernel only for calls with more chunks than resident
# CTAs; call 3 timed keep 2048 at 21 us pipelined against 13 us with the chunk kernel): the
# compact tests at the default, the eviction table twice, the per-kernel subprocess tests.
o=/tmp/c
T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-270} build \
 "run:compact-tests:60:$T tests/test_eviction.py -k 'compact_kv and not in_subprocess'" \
 "run:ev:20:python3 -m kvcore.bench --group eviction --out $o/ev" \
 "run:ev2:20:python3 -m kvcore.bench --group eviction --out $o/ev2" \
 "run:compact-sub:130:$T tests/test_eviction.py -k 'compact_kv and (in_subprocess or misspelt)'"
