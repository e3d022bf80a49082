#!/usr/bin/env bash
# Session 8, device call 1 (plan in bench/NOTES.md, session 7's "Next session, first call").
o=$OUT/c; T="python3 -m pytest -q -p no:cacheprovider -rfE -m cuda"
MLA="tests/test_mla.py tests/test_nan.py tests/test_determinism.py tests/test_cuda_graph.py"
bash bench/gpu_stages.sh $o 585 build \
 "run:mla-tests:150:$T $MLA -k mla" \
 "run:mla-wgmma32:60:KVCORE_MLA_DECODE_WIDE=wgmma32 KVCORE_MLA_PROJECT_FUSED_MAX=16 python3 -m kvcore.bench --group mla --out $o/mla-wgmma32" \
 "run:mla-wgmma:60:KVCORE_MLA_DECODE_WIDE=wgmma KVCORE_MLA_PROJECT_FUSED_MAX=32 python3 -m kvcore.bench --group mla --out $o/mla-wgmma" \
 "run:evict-normal:40:KVCORE_SCORE_L2=normal python3 -m kvcore.bench --group eviction --out $o/evict-normal" \
 "run:evict-last:40:KVCORE_SCORE_L2=last KVCORE_SCORES_VARIANT=transposed python3 -m kvcore.bench --group eviction --out $o/evict-last" \
 "run:dedup-tests:60:$T tests/test_block_sparse.py -k test_page_dedup_in_subprocess" \
 "run:block-lean:70:KVCORE_TOKEN_DECODER_VARIANT=lean KVCORE_SPARSE_PAGE_DEDUP=on python3 -m kvcore.bench --group block --impl kvcore,torch --out $o/block-lean" \
 "run:block-default:70:python3 -m kvcore.bench --group block --impl kvcore,torch --out $o/block-default" \
 "run:variant-tests:240:$T tests/test_scores_variant.py tests/test_token_decoder_variant.py"
cd $OUT && tar czf c.tgz c && rm -rf c
