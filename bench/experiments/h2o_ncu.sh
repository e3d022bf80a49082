#!/usr/bin/env bash
# Nsight Compute sections of the plain and the H2O-score decode kernels (and the score epilogue)
# at the eviction group's B16 S8192 case, to see whether the score path's extra time is issue
# (instructions), memory (write traffic) or latency: bench/NOTES.md, "H2O score, session 6".
#   bash bench/experiments/h2o_ncu.sh OUTDIR
set -uo pipefail
out=${1:?usage: h2o_ncu.sh OUTDIR}
mkdir -p "$out"
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
[ -x "$ncu" ] || { echo "ncu not found" >&2; exit 2; }
cat > "$out/h2o_calls.py" <<'PY'
import torch, kvcore
from kvcore.bench import decode, eviction_cache
kvcore.set_validation(False)
inputs = decode.make_inputs(decode.DecodeCase(16, 32, 8, 128, 8192), torch.device("cuda"), seed=0)
plain = eviction_cache.build_h2o(inputs, False)[0].fn
score = eviction_cache.build_h2o(inputs, True)[0].fn
for fn in (plain, score):
    for _ in range(2):
        fn()
torch.cuda.synchronize()
print("done")
PY
# Launches, in order: plain x2 (decode), score x2 (decode + epilogue each); profile the second of each.
KVCORE_NO_PDL=1 timeout 240 "$ncu" --target-processes all --kernel-name regex:'gqa_decode_kernel|decode_score_kernel' \
  --launch-skip 1 --launch-count 5 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
  --section WarpStateStats --section SchedulerStats --section InstructionStats \
  python3 "$out/h2o_calls.py" > "$out/h2o_ncu.txt" 2>&1
echo "ncu rc=$?"
grep -E "gqa_decode_kernel|decode_score_kernel|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Executed Ipc A|Issue Slots Busy|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Executed Instructions  " "$out/h2o_ncu.txt" | head -80
