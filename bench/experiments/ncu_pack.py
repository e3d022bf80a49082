"""One kvcore call of a benchmark case, bracketed for Nsight Compute (``--profile-from-start off``).

    python bench/experiments/ncu_pack.py KEY          # one case (see CASES)
    python bench/experiments/ncu_pack.py --list

Builds the case exactly as ``python -m kvcore.bench`` does (the group module's inputs and its
kvcore builder, or a decode peer's), runs it three times to warm up, then calls it once between
``cudaProfilerStart`` / ``cudaProfilerStop``, so that ``ncu --profile-from-start off`` sees only
that call's kernels. ``bench/experiments/ncu_pack.sh`` runs every key under ncu in one device call:
the open performance gaps of issues 2-6, each with ncu's sections, for the sessions without a GPU
to read (bench/NOTES.md).
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

import kvcore
from kvcore.bench import block_sparse, block_transformer, decode, eviction_cache, eviction_scores, mla, peers, retrieval


def _case(module, name: str):
    device = torch.device("cuda")
    for case in module.cases(device, False):
        if case.name == name:
            return case
    raise KeyError(f"{module.__name__} has no case {name!r}")


def _retrieval_select(name: str) -> Callable:
    x = retrieval.make_inputs(_case(retrieval, name), torch.device("cuda"))
    return retrieval.build_kvcore(x)[0]


def _mla_project(name: str) -> Callable:
    x = mla.make_project_inputs(_case(mla, name), torch.device("cuda"))
    return mla.build_project_kvcore(x)[0]


def _mla_decode(name: str, impl: str = "kvcore") -> Callable:
    """An MLA decode implementation on the mla bench's inputs: its last variant (the one the
    table's row comes from where there are several)."""
    x = mla.make_decode_inputs(_case(mla, name), torch.device("cuda"))
    return mla.DECODE_BUILDERS[impl](x)[-1]


def _decode(name: str) -> Callable:
    x = decode.make_inputs(_case(decode, name), torch.device("cuda"))
    return eviction_cache.build_h2o(x, False)[0]


def _peer(name: str, impl: str) -> Callable:
    """A decode peer on the decode bench's inputs: its last variant (FlashInfer's with tensor
    cores, the one the table shows; SDPA has one)."""
    x = decode.make_inputs(_case(decode, name), torch.device("cuda"))
    return peers.build(impl, x)[-1]


def _h2o(name: str) -> Callable:
    x = decode.make_inputs(_case(eviction_cache, name).decode, torch.device("cuda"))
    return eviction_cache.build_h2o(x, True)[0]


def _scores(name: str, with_lse: bool) -> Callable:
    x = eviction_scores.make_inputs(_case(eviction_scores, name), torch.device("cuda"))
    return (eviction_scores.build_kvcore_lse if with_lse else eviction_scores.build_kvcore)(x)[0]


def _compact(name: str) -> Callable:
    x = eviction_cache.make_compact_inputs(_case(eviction_cache, name), torch.device("cuda"))
    return eviction_cache.build_compact_kvcore(x)[0]


def _block_sparse(name: str) -> Callable:
    x = block_sparse.make_inputs(_case(block_sparse, name), torch.device("cuda"))
    return block_sparse.build_kvcore(x)[0]


def _token_decoder(name: str) -> Callable:
    x = block_transformer.make_inputs(_case(block_transformer, name), torch.device("cuda"))
    return block_transformer.build_kvcore(x)[0]


#: key -> (what it shows, builder of a Prepared). The keys name the gaps in bench/NOTES.md.
CASES = {
    "mla_project_T1": ("issue 3: 16 us for an 8 MB weight (12% of copy; s9)", lambda: _mla_project("project T1 d7168")),
    "mla_decode_H16": ("issue 3: 88% of copy vs FlashInfer's 93% (s9)", lambda: _mla_decode("decode B64 H16 S8192 page64")),
    "mla_decode_H128": ("issue 3: 45% of the GEMM rate vs FlashInfer's 62% (s9)", lambda: _mla_decode("decode B32 H128 S4096 page64")),
    # Session 33: FlashInfer's MLA decode on the same inputs, for the counters next to kvcore's.
    "flashinfer_mla_H16": ("issue 3: FlashInfer's MLA decode at B64 H16 (s33)",
                           lambda: _mla_decode("decode B64 H16 S8192 page64", "flashinfer")),
    "flashinfer_mla_H128": ("issue 3: FlashInfer's MLA decode at B32 H128 (s33)",
                            lambda: _mla_decode("decode B32 H128 S4096 page64", "flashinfer")),
    "decode_B1": ("issue 2: 69% of copy at B1 S32768 (s9)", lambda: _decode("B1 Hq32 Hkv8 D128 S32768 page16")),
    "decode_B16": ("issue 2: 94-98% of copy at B16 S8192, cuDNN 102% (s13; the loaders' A/B in s14)",
                   lambda: _decode("B16 Hq32 Hkv8 D128 S8192 page16")),
    # Session 29: cuDNN SDPA runs kvcore's own grids at B16 and B1 S131072 and is faster per CTA
    # (bench/NOTES.md); its kernel's counters next to kvcore's, at random and in-order pages.
    "decode_B16_in_order": ("issue 2: B16 with each sequence's pages in order (s29)",
                            lambda: _decode("B16 Hq32 Hkv8 D128 S8192 page16 in-order")),
    "cudnn_B16": ("issue 2: cuDNN SDPA at B16 (contiguous K/V; s29)",
                  lambda: _peer("B16 Hq32 Hkv8 D128 S8192 page16", "sdpa-cudnn")),
    "decode_B1_S131072": ("issue 2: B1 S131072, 1.2% behind cuDNN in page order (s29)",
                          lambda: _decode("B1 Hq32 Hkv8 D128 S131072 page16 in-order")),
    "cudnn_B1_S131072": ("issue 2: cuDNN SDPA at B1 S131072 (s29)",
                         lambda: _peer("B1 Hq32 Hkv8 D128 S131072 page16", "sdpa-cudnn")),
    "decode_B32_Hq64": ("issue 2: B32 Hq64, 1.9 points behind cuDNN at random pages (s29)",
                        lambda: _decode("B32 Hq64 Hkv8 D128 S8192 page16")),
    "cudnn_B32_Hq64": ("issue 2: cuDNN SDPA at B32 Hq64 (s29)",
                       lambda: _peer("B32 Hq64 Hkv8 D128 S8192 page16", "sdpa-cudnn")),
    "h2o_B16": ("issue 6: score path +12.5% at B16 (s9)", lambda: _h2o("h2o B16 Hq32 Hkv8 D128 S8192 page16")),
    "h2o_B1": ("issue 6: score path +11.3-11.7% at B1, fused epilogue (s12)",
               lambda: _h2o("h2o B1 Hq32 Hkv8 D128 S32768 page16")),
    "scores_lse": ("issue 6: one pass 0.249 ms (22x, met; s9)",
                   lambda: _scores("SnapKV scores B1 Hq32 Hkv8 D128 S131072 w64 page16 avgpool5", True)),
    "compact_50": ("issue 6: 79% of copy (s9)", lambda: _compact("compact B1 Hkv8 D128 S131072 keep 50% page16")),
    "block_sparse_B16": ("issue 4: 86% of copy at B16 page16 (s13)",
                         lambda: _block_sparse("B16 Hq32 Hkv8 D128 S32768 page16 sel37x128")),
    "block_sparse_B1": ("issue 4: 25% of copy at B1 page128 (s13)",
                        lambda: _block_sparse("B1 Hq32 Hkv8 D128 S131072 page128 sel37x128")),
    "retrieval_select": ("issue 5: unit scores 10.3 us + top-k 5.1 us of device time at B1 (s13)",
                         lambda: _retrieval_select("B1 Hq32 Hkv8 D128 mem8192x128 top16 select")),
    "token_decoder_L16": ("issue 4: 65% of copy at L16 (s9)", lambda: _token_decoder("token-decoder B8 H16 D128 S16384 L16 P2")),
}


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    if sys.argv[1] == "--list":
        for key, (what, _) in CASES.items():
            print(f"{key}\t{what}")
        return 0
    kvcore.set_validation(False)
    prepared = CASES[sys.argv[1]][1]()
    with prepared.context():  # (SDPA peers: the backend choice)
        for _ in range(3):
            if prepared.setup is not None:
                prepared.setup()
            prepared.fn()
        if prepared.setup is not None:
            prepared.setup()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        prepared.fn()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print(f"{sys.argv[1]}: profiled one call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
