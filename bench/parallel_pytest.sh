#!/usr/bin/env bash
# Several pytest processes at once on the one GPU (-m cuda), for a device call's test stage: each
# GROUP argument is one process's files or node ids (split on spaces); PYTEST_K, when set, is
# every process's -k expression. Logs OUTDIR/NAME-N.log; prints each group's last line; exits
# non-zero when any process failed.
#   bash bench/parallel_pytest.sh OUTDIR NAME GROUP [GROUP ...]
out=${1:?usage: bench/parallel_pytest.sh OUTDIR NAME GROUP...}
name=${2:?give the logs a name}
shift 2
kexpr=(); [ -n "${PYTEST_K:-}" ] && kexpr=(-k "$PYTEST_K")
groups=("$@")
pids=()
for i in "${!groups[@]}"; do
  # shellcheck disable=SC2086
  python3 -m pytest ${groups[$i]} -m cuda "${kexpr[@]}" -q -p no:cacheprovider -rfE --durations=10 \
    > "$out/$name-$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
for i in "${!groups[@]}"; do echo "${groups[$i]}: $(tail -1 "$out/$name-$i.log")"; done
exit $rc
