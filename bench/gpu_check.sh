#!/usr/bin/env bash
# One call on the GPU host: build kvcore, run the test suite (CUDA tests included) and the
# benchmarks, writing logs and results under $OUT (or the folder given as $1).
#   bash bench/gpu_check.sh [OUTDIR] [pytest args...]
# Set KVCORE_BENCH_ARGS to pass options to `python -m kvcore.bench` (default: the decode group);
# KVCORE_SKIP_TESTS=1 or KVCORE_SKIP_BENCH=1 skip a stage; KVCORE_SANITIZE="memcheck racecheck ..."
# adds a compute-sanitizer stage (bench/sanitize.sh) after the benchmarks. Each stage runs under a
# time limit (KVCORE_TEST_TIMEOUT, KVCORE_BENCH_TIMEOUT, KVCORE_SANITIZE_TIMEOUT seconds) so that
# one hung stage cannot eat the whole device call.
set -uo pipefail
out=${1:-${OUT:?give an output folder}}
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv
  python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'
} 2>&1 | tee "$out/env.log"

# FlashInfer, the benchmark peer, when .peers/ was carried (../shared/gpu/get_flashinfer.sh).
if [ -f .peers/flashinfer_slim.zip ]; then
  mkdir -p /tmp/peers && (cd /tmp/peers && python3 -m zipfile -e "$OLDPWD/.peers/flashinfer_slim.zip" .)
  python3 -m pip install -q --no-index --no-deps --target /tmp/peers .peers/apache_tvm_ffi*.whl
  export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH}
fi

start=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} KVCORE_REQUIRE_CUDA=1 KVCORE_PTXAS_VERBOSE=1 \
  python3 -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1
rc=$?
echo "build rc=$rc in $(( $(date +%s) - start )) s"
grep -E "registers|spill" "$out/build.log" | sort | uniq -c | sort -rn | head -5
if [ $rc -ne 0 ]; then tail -40 "$out/build.log"; exit $rc; fi

if [ "${KVCORE_SKIP_TESTS:-0}" != 1 ]; then
  start=$(date +%s)
  timeout "${KVCORE_TEST_TIMEOUT:-900}" python3 -m pytest tests -q -p no:cacheprovider "$@" > "$out/tests.log" 2>&1
  echo "tests rc=$? in $(( $(date +%s) - start )) s"
  tail -15 "$out/tests.log"
fi

if [ "${KVCORE_SKIP_BENCH:-0}" != 1 ]; then
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${KVCORE_BENCH_TIMEOUT:-900}" python3 -m kvcore.bench ${KVCORE_BENCH_ARGS:---group decode} --out "$out" > "$out/bench.log" 2>&1
  echo "bench rc=$? in $(( $(date +%s) - start )) s"
  tail -30 "$out/bench.log"
fi

if [ -n "${KVCORE_SANITIZE:-}" ]; then
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "${KVCORE_SANITIZE_TIMEOUT:-900}" bash bench/sanitize.sh "$out/sanitize" $KVCORE_SANITIZE > "$out/sanitize.log" 2>&1
  echo "sanitize rc=$? in $(( $(date +%s) - start )) s"
  tail -8 "$out/sanitize.log"
fi
