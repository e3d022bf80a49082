#!/usr/bin/env bash
# Run benchmark groups one at a time on the GPU host, each under its own time limit and into its
# own folder, so that a slow or failing group never loses the results of the others (the bench
# writes its JSON only when a run completes).
#   bash bench/gpu_groups.sh OUTDIR SECONDS GROUP [GROUP ...]
set -uo pipefail
out=${1:?usage: bench/gpu_groups.sh OUTDIR SECONDS GROUP...}
limit=${2:?give a time limit per group in seconds}
shift 2
mkdir -p "$out"
for group in "$@"; do
  start=$(date +%s)
  timeout "$limit" python3 -m kvcore.bench --group "$group" --out "$out/$group" > "$out/$group.log" 2>&1
  echo "bench $group rc=$? in $(( $(date +%s) - start )) s"
  tail -25 "$out/$group.log"
done
