#!/usr/bin/env bash
# One device call as a list of stages run in priority order under one overall deadline, so that
# whatever fits gets done and a slow stage cannot starve the call's fixed end (the device tool's
# per-call limit). Each stage gets min(its own limit, the time left - 15 s).
#   bash bench/gpu_stages.sh OUTDIR DEADLINE_SECONDS STAGE [STAGE ...]
# Stages:
#   build                      build and install kvcore (bench/gpu_check.sh with tests and benchmarks off)
#   tests[:LIMIT][:FILES][:KEXPR]  pytest -m cuda over FILES (comma-separated; default: the whole
#                              suite), with -k KEXPR when given
#   ptests[:LIMIT][:SHARDS][:KEXPR]  the same over every test file, in SHARDS (default 4) pytest
#                              processes at once on the one GPU (the suite is host-bound: ~400 s in
#                              one process in session 7); files dealt to the shards by estimated
#                              weight (bench/shard_tests.py); logs OUTDIR/ptests-N.log
#   xtests[:LIMIT][:SHARDS]    the whole suite in SHARDS (default 8) processes at once, dealt by
#                              test (bench/shard_tests.py --by-test): each kernel-switch subprocess
#                              test on its own, the files' other tests by file; a shard runs its
#                              files, then its subprocess tests; logs OUTDIR/xtests-N.log
#   bench:GROUP[:LIMIT]        python -m kvcore.bench --group GROUP into OUTDIR/GROUP
#   sanitize:SCOPE:TOOLS[:LIMIT]  bench/sanitize.sh with KVCORE_SANITIZE_SCOPE=SCOPE over TOOLS (comma-separated)
#   run:NAME:LIMIT:COMMAND     any command (its output in OUTDIR/NAME.log)
# KVCORE_STAGES_PACK=FILE.tgz: OUTDIR is also packed into FILE.tgz every 20 s and once more on exit,
# so a call cut by the device tool's limit still brings back what its stages wrote (the device tool
# returns only files under $OUT, at most 8 of them).
# Kernel A/B switches are environment variables read once per process, so a variant is timed by a
# run stage next to the plain bench stage, e.g. attention_scores' variant kernels (bench/NOTES.md,
# "attention_scores, session 6"):
#   run:eviction-t:300:KVCORE_SCORES_VARIANT=transposed python3 -m kvcore.bench --group eviction --out OUTDIR/eviction-t
set -uo pipefail
out=${1:?usage: bench/gpu_stages.sh OUTDIR DEADLINE_SECONDS STAGE...}
deadline=$(( $(date +%s) + ${2:?give the overall deadline in seconds} ))
shift 2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
pack=${KVCORE_STAGES_PACK:-}
if [ -n "$pack" ]; then
  pack_now() { tar czf "$pack.part" -C "$(dirname "$out")" "$(basename "$out")" 2>/dev/null && mv "$pack.part" "$pack"; }
  (while sleep 20; do pack_now; done) &
  packer=$!
  trap 'kill $packer 2>/dev/null; wait $packer 2>/dev/null; pack_now' EXIT
fi

budget() {  # the stage's limit: its own, capped by the time left
  local own=$1 left=$(( deadline - $(date +%s) - 15 ))
  (( left < own )) && own=$left
  echo $(( own > 1 ? own : 1 ))  # never 0: `timeout 0` disables the limit
}

for stage in "$@"; do
  IFS=: read -r kind a b c <<< "$stage"
  start=$(date +%s)
  # No time left: skip, since `timeout 0` would mean no limit at all (session 9's call 2 ran
  # two stages past its deadline that way).
  if (( deadline - start - 15 <= 0 )); then
    echo "== $stage: skipped (deadline)" | tee -a "$out/stages.txt"
    continue
  fi
  case "$kind" in
    build)
      KVCORE_SKIP_TESTS=1 KVCORE_SKIP_BENCH=1 bash bench/gpu_check.sh "$out/build" > "$out/build.txt" 2>&1
      rc=$?; tail -3 "$out/build.txt"
      [ $rc -ne 0 ] && { echo "build failed: rc=$rc"; exit $rc; }
      # gpu_check.sh unpacked the benchmark peers there when .peers/ was carried: later stages see them.
      [ -d /tmp/peers ] && export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH} ;;
    tests)
      lim=$(budget "${a:-300}"); files=${b:-tests}; kexpr=(); [ -n "$c" ] && kexpr=(-k "$c")
      # shellcheck disable=SC2046
      timeout "$lim" python3 -m pytest $(tr ',' ' ' <<< "$files") -m cuda "${kexpr[@]}" -q -p no:cacheprovider -rfE --durations=15 \
        > "$out/tests.log" 2>&1
      rc=$?; tail -6 "$out/tests.log" ;;
    ptests)
      lim=$(budget "${a:-300}"); shards=${b:-4}; kexpr=(); [ -n "$c" ] && kexpr=(-k "$c")
      mapfile -t groups < <(python3 bench/shard_tests.py "$shards")
      pids=()
      for i in "${!groups[@]}"; do
        # shellcheck disable=SC2086
        timeout "$lim" python3 -m pytest ${groups[$i]} -m cuda "${kexpr[@]}" -q -p no:cacheprovider -rfE --durations=15 \
          > "$out/ptests-$i.log" 2>&1 &
        pids+=($!)
      done
      rc=0
      for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
      for i in "${!groups[@]}"; do echo "shard $i: $(tail -1 "$out/ptests-$i.log")"; done ;;
    xtests)
      lim=$(budget "${a:-300}"); shards=${b:-8}; end=$(( $(date +%s) + lim ))
      mapfile -t groups < <(python3 bench/shard_tests.py --by-test "$shards")
      deselect=(); while read -r t; do deselect+=(--deselect "$t"); done < <(python3 bench/shard_tests.py --subprocess-tests)
      pids=()
      for i in "${!groups[@]}"; do
        files=${groups[$i]%%|*}; nodes=${groups[$i]#*|}
        (
          # Each part gets what is left of the stage's time; none left skips it (timeout 0 would
          # mean no limit at all).
          r=0
          for part in files nodes; do
            args=${!part}; left=$(( end - $(date +%s) ))
            [ -z "${args// /}" ] && continue
            (( left < 1 )) && { echo "xtests: no time left for the $part part"; r=124; continue; }
            extra=(); [ "$part" = files ] && extra=("${deselect[@]}")
            # shellcheck disable=SC2086
            timeout "$left" python3 -m pytest $args "${extra[@]}" -m cuda -q -p no:cacheprovider -rfE --durations=10 || r=$?
          done
          exit $r
        ) > "$out/xtests-$i.log" 2>&1 &
        pids+=($!)
      done
      rc=0
      for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
      for i in "${!groups[@]}"; do
        echo "shard $i: $(grep -E ' in [0-9.]+s( \(|$)' "$out/xtests-$i.log" | tr '\n' ';')"
      done ;;
    bench)
      lim=$(budget "${b:-300}")
      timeout "$lim" python3 -m kvcore.bench --group "$a" --out "$out/$a" > "$out/bench_$a.log" 2>&1
      rc=$?; grep "^| " "$out/bench_$a.log" | tail -12 ;;
    sanitize)
      lim=$(budget "${c:-600}")
      KVCORE_SANITIZE_SCOPE=$a timeout "$lim" bash bench/sanitize.sh "$out/sanitize-$a" $(tr ',' ' ' <<< "$b") \
        > "$out/sanitize-$a.log" 2>&1
      rc=$?; cat "$out/sanitize-$a/summary.tsv" 2>/dev/null ;;
    run)
      lim=$(budget "${b:-60}"); cmd=${stage#run:"$a":"$b":}
      timeout "$lim" bash -c "$cmd" > "$out/$a.log" 2>&1
      rc=$?; tail -6 "$out/$a.log" ;;
    *) echo "unknown stage $stage"; rc=2 ;;
  esac
  # The stage list with times, kept beside the logs so the next session can plan its calls.
  echo "== $stage: rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$out/stages.txt"
done
