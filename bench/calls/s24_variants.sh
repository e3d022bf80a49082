#!/usr/bin/env bash
# s24_call2.sh's kernel-variant stage: each subprocess re-run of the split-KV decode kernels'
# CUDA tests under one kernel switch (8 warps, page-major 8/4/2, the TMA loader, the score
# epilogue kernel, mla_decode's wgmma switches and old H16 path), all at once in their own pytest
# processes on the one GPU (each spawns its own child). Logs OUTDIR/variant-N.log; exits non-zero
# when any failed.
out=${1:?usage: s24_variants.sh OUTDIR}
tests=(
  "tests/test_ops.py::test_gqa_decode_with_8_warps_in_subprocess"
  "tests/test_ops.py::test_gqa_decode_page_major_in_subprocess"
  "tests/test_ops.py::test_gqa_decode_with_tma_loader_in_subprocess"
  "tests/test_ops.py::test_gqa_decode_without_page_groups_in_subprocess"
  "tests/test_decode_score.py::test_gqa_decode_score_epilogue_kernel_in_subprocess"
  "tests/test_mla.py::test_mla_decode_cuda_wgmma_switch_in_subprocess"
  "tests/test_mla.py::test_mla_decode_cuda_h16_old_path_in_subprocess"
)
pids=()
for i in "${!tests[@]}"; do
  python3 -m pytest "${tests[$i]}" -m cuda -q -p no:cacheprovider -rfE > "$out/variant-$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
for i in "${!tests[@]}"; do echo "${tests[$i]##*::}: $(tail -1 "$out/variant-$i.log")"; done
exit $rc
