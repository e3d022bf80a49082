#!/usr/bin/env bash
# Session 28, call 2: the CUDA tests the new default kernel choice (KVCORE_DECODE_KERNEL=auto)
# touches, after the review's fixes. Build; then four pytest processes at once (-m cuda): the
# page8 re-run of the decode cases (a subprocess pytest); page4 and the auto-rule test; page2,
# test_cache, test_cuda_graph and test_compile; test_ops (not in_subprocess), test_determinism,
# test_nan and test_decode_workspace. Logs $o/t-N.log. (B64's page-major options, unsplit 4-head
# CTAs among them, were timed in session 22 on an H200: none ahead of the head kernel.)
o=/tmp/c
rm -rf $o; mkdir -p $o
cat > $o/tests.sh <<'EOS'
o=$1
p() { n=$1; shift; python3 -m pytest "$@" -m cuda -q -p no:cacheprovider -rfE --durations=5 > $o/t-$n.log 2>&1; echo "t-$n rc=$? $(tail -1 $o/t-$n.log)"; }
p 0 'tests/test_ops.py::test_gqa_decode_page_major_in_subprocess[page8]' &
p 1 'tests/test_ops.py::test_gqa_decode_page_major_in_subprocess[page4]' tests/test_ops.py::test_gqa_decode_equal_lengths_take_page_major_in_subprocess &
p 2 'tests/test_ops.py::test_gqa_decode_page_major_in_subprocess[page2]' tests/test_cache.py tests/test_cuda_graph.py tests/test_compile.py &
p 3 tests/test_ops.py tests/test_determinism.py tests/test_nan.py tests/test_decode_workspace.py -k 'not in_subprocess' &
wait
EOS
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-540} build \
 "run:tests:390:bash $o/tests.sh $o"
