# Sourced by the decode_trace call scripts (bench/calls/s*_call*.sh from session 19 on):
#   run LABEL BINARY ARGS...  runs .exp/BINARY ARGS (60 s at most) after a "=== LABEL" line and
#   keeps its summary lines (TRACE_ROWS, an extended regex, says which).
TRACE_ROWS=${TRACE_ROWS:-"^B[0-9]|check|pair: |merge: |merger: |traced span|main loop|exit|loop end|rror"}
run() {
  local label=$1 bin=$2; shift 2
  echo "=== $label: $bin $*"
  timeout 60 ".exp/$bin" "$@" 2>&1 | grep -E "$TRACE_ROWS"
}
