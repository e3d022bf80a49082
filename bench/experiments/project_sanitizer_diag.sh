#!/usr/bin/env bash
# Tells apart a kvcore fault from a compute-sanitizer limitation in mla_latent_project's prefill
# path (cuBLAS at::mm, then kvcore's epilogue kernel), where racecheck stopped with "failed to
# handle a hardware exception" on 2026-12-03. Run on the GPU host after the build:
#   bash bench/experiments/project_sanitizer_diag.sh OUTDIR
# Writes OUTDIR/<step>.log for: memcheck of the T > 64 tests; racecheck of a bare torch.mm with
# fp32 output (no kvcore at all), with and without the kvcore kernel filter; racecheck of one
# T300 test; initcheck of the same torch.mm followed by a torch kernel reading its product
# (initcheck_mm: whether initcheck sees the cuBLAS kernel's stores at all).
#   STEPS="initcheck_mm racecheck_mm_all" bash ... OUTDIR   runs only the steps named.
set -uo pipefail
out=${1:?usage: project_sanitizer_diag.sh OUTDIR}
mkdir -p "$out"
cs=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
mm='import torch
a = torch.randn(300, 256, dtype=torch.bfloat16, device="cuda")
b = torch.randn(256, 576, dtype=torch.bfloat16, device="cuda")
c = torch.mm(a, b, out_dtype=torch.float32)
torch.cuda.synchronize()
print("mm ok", float(c.float().abs().sum()))'
sel="test_mla_latent_project_cuda_grid and T300"
step() {  # name, timeout, command...
  local name=$1 secs=$2; shift 2
  [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]] && return 0
  timeout "$secs" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? $(grep -E 'ERROR SUMMARY|passed|failed|mm ok|Internal Sanitizer' "$out/$name.log" | tr '\n' ' ' | cut -c1-300)"
}
step memcheck_T300 180 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool memcheck --kernel-name kns=kvcore \
  python3 -m pytest tests/test_mla.py -m cuda -k "$sel" -q -p no:cacheprovider
step racecheck_mm_filtered 120 "$cs" --tool racecheck --kernel-name kns=kvcore python3 -c "$mm"
step racecheck_mm_all 120 "$cs" --tool racecheck python3 -c "$mm"
step racecheck_T300_one 180 "$cs" --tool racecheck --kernel-name kns=kvcore \
  python3 -m pytest tests/test_mla.py -m cuda -k "$sel and bf16 and inter and not noout" -q -p no:cacheprovider -x
step initcheck_mm 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool initcheck python3 -c "$mm"
