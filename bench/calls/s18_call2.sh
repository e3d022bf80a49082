#!/usr/bin/env bash
# Session 18, device call 2: build, then the CUDA tests that no call ran at this code: the kernel-
# switch re-runs of MLA, the token decoder and attention_scores (session 16's whole-suite call cut
# most of them at its limit), the MLA and transformers-MLA files and test_bench. Eight processes;
# the gqa_decode files ran in session 17 (calls 9, 10, 12) at this kernel code.
o=/tmp/c
mkdir -p $o
T="-m cuda -q -p no:cacheprovider -rfE --durations=5"
V=tests/test_token_decoder_variant.py::test_variant_passes_the_token_decoder_cuda_tests
M=tests/test_mla.py
S=$(python3 bench/shard_tests.py --subprocess-tests | sed 's/^/--deselect /' | tr '\n' ' ')
KVCORE_STAGES_PACK=$OUT/c.tgz bash bench/gpu_stages.sh $o ${CALL_DEADLINE:-585} build \
 "run:tests:470:\
python3 -m pytest '$V[variant=classic]' '$V[stages=2]' $T > $o/t-td1.log 2>&1 & \
python3 -m pytest '$V[variant=lean]' '$V[stages=3]' $T > $o/t-td2.log 2>&1 & \
python3 -m pytest '$V[variant=lean-wide]' tests/test_token_decoder_variant.py::test_variant_agrees_with_the_default_kernel tests/test_token_decoder_variant.py::test_unknown_setting_is_an_error $T > $o/t-td3.log 2>&1 & \
python3 -m pytest '$M::test_mla_decode_cuda_wgmma_switch_in_subprocess[old]' '$M::test_mla_decode_cuda_wgmma_switch_in_subprocess[seesaw]' $T > $o/t-mla1.log 2>&1 & \
python3 -m pytest '$M::test_mla_decode_cuda_wgmma_switch_in_subprocess[named]' '$M::test_mla_decode_cuda_wgmma_switch_in_subprocess[tma]' $T > $o/t-mla2.log 2>&1 & \
python3 -m pytest $M::test_mla_decode_cuda_h16_old_path_in_subprocess $M::test_mla_latent_project_cuda_fused_max_64_in_subprocess $T > $o/t-mla3.log 2>&1 & \
python3 -m pytest $M tests/test_transformers_mla.py $S $T > $o/t-mla.log 2>&1 & \
python3 -m pytest tests/test_scores_variant.py tests/test_bench.py tests/test_cpu_isa.py $T > $o/t-misc.log 2>&1 & \
wait; for f in $o/t-*.log; do echo \"== \$f\"; tail -n 2 \$f; done"
