#!/usr/bin/env bash
# Nsight Compute over one kvcore call of each open performance gap (bench/experiments/ncu_pack.py),
# at the GPU's own clocks, in one device call: OUTDIR/<key>.txt per case (ncu's full section set,
# with the warp-stall sampling by SASS line), and OUTDIR/summary.txt with the headline metrics.
#   bash bench/experiments/ncu_pack.sh OUTDIR [KEY ...]      (default: every key of ncu_pack.py)
#   NCU_SOURCE=1: also OUTDIR/<key>-sass.csv (ncu's source page, SASS view) and <key>-sass-top.txt
#   (the instructions with the most stall samples, with their reasons).
set -uo pipefail
out=${1:?usage: ncu_pack.sh OUTDIR [KEY ...]}
shift
mkdir -p "$out"
cd "$(dirname "$0")/../.."
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
[ -x "$ncu" ] || { echo "ncu not found" >&2; exit 2; }
keys=("$@")
[ ${#keys[@]} -eq 0 ] && mapfile -t keys < <(python3 bench/experiments/ncu_pack.py --list | cut -f1)
for key in "${keys[@]}"; do
  start=$(date +%s)
  # --clock-control none: the boost clocks the benchmarks run at (ncu locks base clocks by
  # default, which turned a DRAM-bound kernel SM-bound in session 6's H2O pass).
  timeout 120 "$ncu" --profile-from-start off --clock-control none --set full --import-source no \
    python3 bench/experiments/ncu_pack.py "$key" > "$out/$key.txt" 2>&1
  echo "$key rc=$? $(( $(date +%s) - start )) s"
  # The warp-stall breakdown (cycles per issued instruction by reason): the text page above only
  # prints the section's summary, the raw page has the per-reason metrics.
  timeout 60 "$ncu" --profile-from-start off --clock-control none --section WarpStateStats --page raw \
    python3 bench/experiments/ncu_pack.py "$key" 2>&1 | grep -i -E "stall|==PROF==|Error" > "$out/$key-stalls.txt"
  if [ "${NCU_SOURCE:-0}" = 1 ]; then
    # Stall sampling per SASS instruction (which warps and which instructions carry the stalls
    # the breakdown above averages): the report is saved, then its source page printed as CSV and
    # summarised (bench/experiments/ncu_sass_top.py). First run in session 11: these options give
    # one CSV row per SASS instruction with its samples by reason and its execution count.
    timeout 90 "$ncu" --profile-from-start off --clock-control none --section SourceCounters \
      --section WarpStateStats --import-source no -f -o "$out/$key-src" \
      python3 bench/experiments/ncu_pack.py "$key" > "$out/$key-src.log" 2>&1
    timeout 60 "$ncu" --import "$out/$key-src.ncu-rep" --page source --csv --print-source sass \
      > "$out/$key-sass.csv" 2>> "$out/$key-src.log"
    python3 bench/experiments/ncu_sass_top.py "$out/$key-sass.csv" > "$out/$key-sass-top.txt" 2>&1
    rm -f "$out/$key-src.ncu-rep"  # large; the CSV and its summary carry what is needed
  fi
done
{
  for key in "${keys[@]}"; do
    echo "== $key"
    grep -E "^  [A-Za-z_].*\(.*\)x\(|^    (Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Executed Ipc Active|Issue Slots Busy|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued Instruction|SM Frequency) " \
      "$out/$key.txt" | sed 's/  */ /g'
  done
} > "$out/summary.txt"
cat "$out/summary.txt"
