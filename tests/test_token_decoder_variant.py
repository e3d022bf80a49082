"""token_decoder_attention's kernel configurations: the kernel (KVCORE_TOKEN_DECODER_VARIANT: the
default "auto" picks per shape, "classic" and "lean" (table-driven copies, one V scan per item, O
staged through shared memory; its copy table with 4-byte entries where the shape's offsets fit)
force one, "lean-wide" forces lean with the 8-byte table, the fallback) and the ring depth
(KVCORE_TOKEN_DECODER_STAGES: "auto" or a forced 2 or 3). Both are read once per process by the
CUDA launcher, whose "auto" takes the configuration that fits the most CTAs per SM (on the
benchmark shapes since session 15, by shared memory and the registers ptxas reported: lean with
the compact table and two stages at L16, 3 CTAs; the classic kernel with two stages at L4, 4
CTAs). Each forced setting must pass every CUDA token_decoder_attention test and agree with the
default on the two benchmark shapes (fewer blocks); between them they run each kernel and table
with each depth (STAGES=3: lean compact at L16, classic at L4; VARIANT=lean: lean compact with two
stages at both; VARIANT=lean-wide: lean wide with three stages at L16, two at L4).

Each setting runs in a subprocess of its own.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

import kvcore  # noqa: F401  (registers the ops; the subprocesses import it from the same place)
from conftest import assert_switch_value_rejected, run_script_with_env, run_tests_with_env
HAS_CUDA_TD = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "kvcore::token_decoder_attention", "CUDA")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAS_CUDA_TD, reason="no CUDA kernel registered for kvcore::token_decoder_attention")]

SETTINGS = [("KVCORE_TOKEN_DECODER_VARIANT", "classic"), ("KVCORE_TOKEN_DECODER_VARIANT", "lean"),
            ("KVCORE_TOKEN_DECODER_VARIANT", "lean-wide"), ("KVCORE_TOKEN_DECODER_STAGES", "3"),
            ("KVCORE_TOKEN_DECODER_STAGES", "2")]
SETTING_IDS = [f"{name.rsplit('_', 1)[1].lower()}={value}" for name, value in SETTINGS]


@pytest.mark.parametrize("name, value", SETTINGS, ids=SETTING_IDS)
def test_variant_passes_the_token_decoder_cuda_tests_in_subprocess(name, value):
    """The CUDA token_decoder_attention tests (the reference grid with poisoned outputs, ragged and
    strided cases, head packing, NaN rules, bad input, clamped lengths without validation,
    opcheck, torch.compile, graph replays, the bf16 model) under the setting."""
    # The reference grid alone is 20 cases x 2 dtypes on CUDA; the kernel-running ones must not skip.
    run_tests_with_env(name, value,
                       ["tests/test_block_transformer.py", "tests/test_nan.py", "tests/test_cuda_graph.py"],
                       "(token_decoder and (cuda or graph)) or bf16_tracks", 50)


# The two benchmark shapes with fewer blocks (L16: B1 S8192 -> 512 blocks, 8 items of 2 heads
# each, ~16 items per CTA on an H100/H200, so every ring and staging tile wraps; L4: B1 S8192 ->
# 2048 blocks), full and ragged block lengths, both dtypes, with and without lse, the L4 one also
# on block-strided views. Outputs are poisoned before each call.
_SCRIPT = textwrap.dedent(
    """
    import math, sys, torch, kvcore
    sys.path.insert(0, "tests")
    from conftest import randn
    out_path = sys.argv[1]
    results = []
    cases = [
        # (blocks, L, P, Hq, Hkv, D, dtype, ragged, with_lse, strided)
        (512, 16, 2, 16, 16, 128, torch.bfloat16, False, True, False),
        (512, 16, 2, 16, 16, 128, torch.float16, True, True, False),
        (2048, 4, 2, 12, 12, 64, torch.bfloat16, False, True, False),
        (2048, 4, 2, 12, 12, 64, torch.float16, True, False, True),
    ]
    for c, (n, l, p, hq, hkv, d, dt, ragged, with_lse, strided) in enumerate(cases):
        gen = torch.Generator().manual_seed(4321 + c)
        if strided:
            q = randn(n, l + 1, hq, d, gen=gen, dtype=dt, device="cuda")[:, 1:]
            kv = randn(n, 2, p + l, hkv, d, gen=gen, dtype=dt, device="cuda")
            k, v = kv[:, 0], kv[:, 1]
        else:
            q = randn(n, l, hq, d, gen=gen, dtype=dt, device="cuda")
            k = randn(n, p + l, hkv, d, gen=gen, dtype=dt, device="cuda")
            v = randn(n, p + l, hkv, d, gen=gen, dtype=dt, device="cuda")
        lens = None
        if ragged:
            lens = torch.randint(0, l + 1, (n,), generator=gen, dtype=torch.int32)
            lens[0], lens[1] = l, 0
            lens = lens.cuda()
        outs = []
        for _ in range(2):
            out = torch.full((n, l, hq, d), math.nan, dtype=dt, device="cuda")
            lse = torch.full((n, l, hq), math.nan, dtype=torch.float32, device="cuda") if with_lse else None
            kvcore.token_decoder_attention(q, k, v, lens, out=out, lse=lse)
            outs.append((out, lse))
        (a, la), (b, lb) = outs
        assert torch.equal(a, b) and (la is None or torch.equal(la, lb)), f"case {c}: two calls differ"
        results.append((a.cpu(), None if la is None else la.cpu()))
    torch.save(results, out_path)
    """
)


@pytest.mark.parametrize("name, value", SETTINGS, ids=SETTING_IDS)
def test_variant_agrees_with_the_default_kernel_in_subprocess(name, value, tmp_path):
    """Same inputs through the default configuration and the setting (each in its own process).
    Both run the same mma fragments and softmax in the same order, so they should agree bitwise;
    the assertion allows the CUDA-vs-reference tolerance in case the compiler contracts
    differently."""
    outs = {v: run_script_with_env(name, v, _SCRIPT, tmp_path) for v in (None, value)}
    for i, ((ref, ref_lse), (got, got_lse)) in enumerate(zip(outs[None], outs[value])):
        assert not torch.isnan(got).any() and not torch.isnan(ref).any(), f"case {i}: NaN (unwritten) in out"
        tol = dict(atol=2e-2, rtol=1e-2) if got.dtype == torch.bfloat16 else dict(atol=5e-3, rtol=2e-3)
        torch.testing.assert_close(got.float(), ref.float(), **tol, msg=lambda m: f"case {i} out: {m}")
        if ref_lse is not None:
            assert not torch.isnan(got_lse).any(), f"case {i}: NaN (unwritten) in lse"
            torch.testing.assert_close(got_lse, ref_lse, atol=1e-3, rtol=1e-4, msg=lambda m: f"case {i} lse: {m}")


@pytest.mark.parametrize("name, bad", [("KVCORE_TOKEN_DECODER_VARIANT", "laen"), ("KVCORE_TOKEN_DECODER_STAGES", "4")])
def test_unknown_setting_is_an_error(name, bad):
    """A misspelt KVCORE_TOKEN_DECODER_VARIANT or _STAGES fails the call instead of silently timing
    the default."""
    assert_switch_value_rejected(
        name, bad,
        """
        q = torch.randn(2, 4, 4, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(2, 6, 2, 64, dtype=torch.bfloat16, device="cuda")
        v = torch.randn(2, 6, 2, 64, dtype=torch.bfloat16, device="cuda")
        """,
        "kvcore.token_decoder_attention(q, k, v)", calls=2)  # the first call and every later one
