#!/usr/bin/env bash
# Session 13, device call 6 (short). An A/B in one process per variant on one machine: the bench
# Timer's flush (KVCORE_BENCH_FLUSH=int64, the historical cast + read, against int32, a plain
# read; call 5 saw read-only kernels 2-3% slower with the plain read, on another machine), and
# topk_rows' programmatic launch (KVCORE_NO_PDL=1 against the default) in the retrieval step.
# (KVCORE_BENCH_FLUSH was removed after this call: the two forms timed the same, and the plain
# read became the only flush.)
o=/tmp/c
K="python3 -m kvcore.bench --impl kvcore"
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-200} build \
 "run:dec-a:20:KVCORE_BENCH_FLUSH=int64 $K --group decode --out $o/dec-a" \
 "run:dec-b:20:KVCORE_BENCH_FLUSH=int32 $K --group decode --out $o/dec-b" \
 "run:dec-a2:20:KVCORE_BENCH_FLUSH=int64 $K --group decode --out $o/dec-a2" \
 "run:blk-a:20:KVCORE_BENCH_FLUSH=int64 $K --group block --out $o/blk-a" \
 "run:blk-b:20:KVCORE_BENCH_FLUSH=int32 $K --group block --out $o/blk-b" \
 "run:ret-a:20:KVCORE_BENCH_FLUSH=int64 python3 -m kvcore.bench --group retrieval --impl kvcore,kvcore-graph --out $o/ret-a" \
 "run:ret-nopdl:20:KVCORE_NO_PDL=1 KVCORE_BENCH_FLUSH=int64 python3 -m kvcore.bench --group retrieval --impl kvcore,kvcore-graph --out $o/ret-nopdl" \
 "run:ret-b:20:KVCORE_BENCH_FLUSH=int32 python3 -m kvcore.bench --group retrieval --impl kvcore,kvcore-graph --out $o/ret-b" \
 "run:profile:25:python3 bench/experiments/retrieval_step_profile.py"
