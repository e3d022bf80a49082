#!/usr/bin/env bash
# (Ran an intermediate decode_trace.cu / gqa_decode.cuh with a MERGE argument and gqa_decode_merge_kernel, a split merge as its own grid; measured, not kept: bench/NOTES.md, session 16.)
# Session 16, device call 4 (binaries compiled on the CPU machine into .exp/, carried): the
# in-kernel split merge's arrival as one acq_rel atomic (trace_acqrel), partials stored as bf16
# (trace_pt), both (trace_both), against today's form (trace_new, MERGE 0) and the merge grid
# (MERGE 3); then per-CTA CSVs of four runs of B1 S32768 (is a slow SM slow every time?).
o=$OUT
run() {  # label, binary, args
  local label=$1 bin=$2; shift 2
  echo "=== $label: $bin $*"
  timeout 60 .exp/$bin "$@" 2>&1
}
{
for rep in 1 2; do
  for b in trace_new trace_acqrel trace_pt trace_both; do
    run "B1 S32768 m0" $b 1 32768 33 32 8 16 3 0 0
  done
  run "B1 S32768 m3" trace_new 1 32768 33 32 8 16 3 0 3
  for b in trace_new trace_acqrel trace_both; do
    run "B16 S8192 m0" $b 16 8192 2 32 8 16 3 0 0
  done
  run "B16 S8192 m3" trace_new 16 8192 2 32 8 16 3 0 3
done
for b in trace_new trace_both; do
  run "B1 S131072 m0" $b 1 131072 33 32 8 16 3 0 0
done
run "B1 S131072 m3" trace_new 1 131072 33 32 8 16 3 0 3
mkdir -p $o/csv
for i in 1 2 3 4; do
  TRACE_CSV=$o/csv/b1_$i.csv run "csv $i" trace_new 1 32768 33 32 8 16 3 0 0 > /dev/null
done
} > $o/trace.txt 2>&1
cd $o && tar czf csv.tgz csv && rm -rf csv
grep -E "^===|merge (in|kernel)|MISMATCH" $o/trace.txt | sed 's/ (empty kernel.*//; s/Hq32 Hkv8 page 16 SPP 2 //' | paste - - | awk -F'\t' '{print $1 " :: " $2}' | sed 's/: 1 32768.*::/::/' | tail -c 5000
