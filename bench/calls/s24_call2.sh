#!/usr/bin/env bash
# Session 24's second prepared call (after s24_call1.sh): the split-KV decode kernels' CUDA tests
# under each kernel switch (8 warps, page-major, TMA, no page groups, the score epilogue kernel,
# mla_decode's wgmma switches and old H16 path), each re-run in its own pytest process, all at
# once (bench/parallel_pytest.sh); then the ragged experiment under KVCORE_DECODE_KERNEL=page8 and
# KVCORE_DECODE_WARPS=4.
o=/tmp/c
rm -rf $o; mkdir -p $o
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-560} build \
 "run:variants:320:bash bench/parallel_pytest.sh $o variant tests/test_ops.py::test_gqa_decode_with_8_warps_in_subprocess tests/test_ops.py::test_gqa_decode_page_major_in_subprocess tests/test_ops.py::test_gqa_decode_with_tma_loader_in_subprocess tests/test_ops.py::test_gqa_decode_without_page_groups_in_subprocess tests/test_decode_score.py::test_gqa_decode_score_epilogue_kernel_in_subprocess tests/test_mla.py::test_mla_decode_cuda_wgmma_switch_in_subprocess tests/test_mla.py::test_mla_decode_cuda_h16_old_path_in_subprocess" \
 "run:ragged-page8:60:KVCORE_DECODE_KERNEL=page8 python3 bench/experiments/ragged_decode.py $o/ragged-page8.json" \
 "run:ragged-warps4:60:KVCORE_DECODE_WARPS=4 python3 bench/experiments/ragged_decode.py $o/ragged-warps4.json"
