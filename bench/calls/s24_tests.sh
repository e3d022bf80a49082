#!/usr/bin/env bash
# s24_call1.sh's test stage: the CUDA tests of the kernels session 24 changed (every split-KV
# decode kernel's ranges) and session 22's attention_scores split cap, in three pytest processes
# at once on the one GPU (~700 tests; one process may not finish in the stage's time). Logs
# OUTDIR/tests-N.log; exits non-zero when any failed.
out=${1:?usage: s24_tests.sh OUTDIR}
k="(gqa_decode or mla_decode or block_sparse or bitwise or fixed_splits or graph or attention_scores or width) and not in_subprocess"
groups=(
  "tests/test_ops.py tests/test_decode_score.py"
  "tests/test_mla.py tests/test_block_sparse.py tests/test_determinism.py tests/test_cuda_graph.py"
  "tests/test_eviction.py"
)
pids=()
for i in "${!groups[@]}"; do
  # shellcheck disable=SC2086
  python3 -m pytest ${groups[$i]} -m cuda -k "$k" -q -p no:cacheprovider -rfE --durations=10 > "$out/tests-$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
for i in "${!groups[@]}"; do echo "${groups[$i]}: $(tail -1 "$out/tests-$i.log")"; done
exit $rc
