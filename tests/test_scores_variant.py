"""attention_scores' kernel variants (KVCORE_SCORES_VARIANT, read once per process by the CUDA
launcher; the default "transposed" kernels put the keys on the mma's M dimension, "untransposed"
swaps both passes back to the query-rows-on-M kernel): the variant must pass every CUDA
attention_scores test the default kernels pass, and agree with the default kernels as tightly as
the CUDA and CPU kernels agree (cases without the caller's lse run both of its passes).

The variable is read once per process, so each variant runs in a subprocess of its own.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

import kvcore  # noqa: F401  (registers the ops; the subprocesses import it from the same place)
from conftest import assert_switch_value_rejected, run_script_with_env, run_tests_with_env
HAS_CUDA_SCORES = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "kvcore::attention_scores", "CUDA")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAS_CUDA_SCORES, reason="no CUDA kernel registered for kvcore::attention_scores")]

VARIANTS = ["untransposed"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_passes_the_attention_scores_cuda_tests_in_subprocess(variant):
    """The CUDA attention_scores tests (grid vs reference and the CPU kernel, NaN rules,
    determinism, strided q, clamped bad contents, opcheck, the H2O graph replay) under the variant."""
    # 82 are selected (37 of them bad-input cases); the kernel-running ones must not have skipped.
    run_tests_with_env("KVCORE_SCORES_VARIANT", variant,
                       ["tests/test_eviction.py", "tests/test_nan.py", "tests/test_cuda_graph.py"],
                       "(attention_scores and cuda) or h2o_step_scores", 40)


# A SnapKV-like shape big enough for many splits and full (unmasked) tiles, plus ragged lengths,
# padding rows (G = 3), several row blocks and the three reductions, with and without the lse.
_SCRIPT = textwrap.dedent(
    """
    import sys, torch, kvcore
    sys.path.insert(0, "tests")
    from conftest import make_paged_kv, randn
    out_path = sys.argv[1]
    results = []
    cases = [
        # (lens, w, hq, hkv, d, page, dtype, reduction, pooling, kernel, with_lse)
        ((20000, 3001), 64, 32, 8, 128, 16, torch.bfloat16, "sum", "avg", 5, True),
        ((20000, 3001), 64, 32, 8, 128, 16, torch.bfloat16, "max", "none", 5, False),
        ((9000, 64, 63), 21, 12, 4, 64, 32, torch.float16, "mean", "max", 7, False),
        ((4100,), 40, 32, 2, 256, 8, torch.bfloat16, "sum", "none", 5, False),
    ]
    for i, (lens, w, hq, hkv, d, page, dt, red, pool, kern, with_lse) in enumerate(cases):
        gen = torch.Generator().manual_seed(1234 + i)
        kv = make_paged_kv(list(lens), page, hkv, d, gen=gen, dtype=dt, device="cuda")
        q = randn(len(lens), w, hq, d, gen=gen, dtype=dt, device="cuda")
        # A caller's lse (fp32 [B, w, Hq]) need not be the true one: any finite value exercises the
        # one-pass path the same way.
        lse = torch.randn(len(lens), w, hq, generator=gen).abs().add(3.0).to("cuda") if with_lse else None
        a = kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, lse=lse, reduction=red,
                                    pooling=pool, pool_kernel=kern, max_len=max(lens) + 100)
        b = kvcore.attention_scores(q, kv.k_cache, kv.block_table, kv.seq_lens, lse=lse, reduction=red,
                                    pooling=pool, pool_kernel=kern, max_len=max(lens) + 100)
        assert torch.equal(a, b), f"case {i}: two calls differ"
        results.append(a.cpu())
    torch.save(results, out_path)
    """
)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_agrees_with_the_default_kernel_in_subprocess(variant, tmp_path):
    """Same inputs through the default kernel and the variant (each in its own process): equal within
    the CUDA-vs-CPU tolerance of test_attention_scores_cuda_grid, and bitwise stable run to run."""
    outs = {v: run_script_with_env("KVCORE_SCORES_VARIANT", v, _SCRIPT, tmp_path) for v in (None, variant)}
    for i, (ref, got) in enumerate(zip(outs[None], outs[variant])):
        assert not torch.isnan(got).any() and not torch.isnan(ref).any(), f"case {i}: NaN"
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"case {i}: {m}")


def test_unknown_variant_is_an_error():
    """A misspelt KVCORE_SCORES_VARIANT fails the call instead of silently timing the default."""
    assert_switch_value_rejected(
        "KVCORE_SCORES_VARIANT", "untransposd",
        """
        q = torch.randn(1, 2, 4, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(4, 16, 2, 64, dtype=torch.bfloat16, device="cuda")
        bt = torch.arange(4, dtype=torch.int32, device="cuda").view(1, 4)
        sl = torch.tensor([40], dtype=torch.int32, device="cuda")
        """,
        "kvcore.attention_scores(q, k, bt, sl)")
