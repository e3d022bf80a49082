"""KVCORE_CPU_ISA: the CPU attention kernels exist three times (baseline, AVX2+FMA+F16C, and that
plus AVX-512 F/BW/DQ/VL; chosen once per process), and the AVX-512 copy runs bf16 gqa_decode,
block_sparse_decode, mla_decode and attention_scores with AVX512_BF16's dot products under
avx512bf16, and bf16 mla_decode on AMX tiles under amx; every setting must pass the same
reference checks.

The rest of the suite runs the CPU kernels with whatever this process picked (``auto``: the widest
copy the CPU supports). Every other available ISA runs the reference, NaN and determinism tests of
the ops compiled per ISA (gqa_decode with and without the H2O score, block_sparse_decode,
mla_decode, attention_scores, token_decoder_attention, and mla_latent_project's projection and
infllm_unit_scores, which use cpu_attention.h's row conversion) in a fresh process
with the variable set: those tests draw fresh random inputs, poison the outputs before the call
and use conftest's OUT_TOL / LSE_TOL. The copies need not agree bit for bit (FMA rounds once where
the baseline rounds twice; each vector width sums in its own order), only each with the reference.
"""

from __future__ import annotations

import ctypes
import os
import platform

import pytest
import torch

import kvcore
from conftest import assert_switch_value_rejected, run_code_with_env, run_tests_with_env

VARIABLE = "KVCORE_CPU_ISA"


def _cpu_flags() -> set[str]:
    """The feature flags this CPU advertises (Linux x86-64; empty wherever that is unknown)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _requested() -> str:
    return os.environ.get(VARIABLE, "") or "auto"


# What the AVX2 copy needs, what the AVX-512 copy needs on top of it, and its bf16 dot products.
AVX2_AVAILABLE = {"avx2", "fma", "f16c"} <= _cpu_flags()
AVX512_AVAILABLE = AVX2_AVAILABLE and {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= _cpu_flags()
AVX512_BF16_AVAILABLE = AVX512_AVAILABLE and "avx512_bf16" in _cpu_flags()


def _os_grants_amx_tiles() -> bool:
    """Whether Linux lets this process use the AMX tile registers (arch_prctl ARCH_REQ_XCOMP_PERM
    for XTILEDATA, as kvcore asks; harmless to ask again)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA
    except (OSError, AttributeError):
        return False


AMX_AVAILABLE = AVX512_BF16_AVAILABLE and {"amx_tile", "amx_bf16"} <= _cpu_flags() and _os_grants_amx_tiles()
AVAILABLE = {"baseline": True, "avx2": AVX2_AVAILABLE, "avx512": AVX512_AVAILABLE,
             "avx512bf16": AVX512_BF16_AVAILABLE, "amx": AMX_AVAILABLE}

# The reference / NaN / determinism tests of those ops, CPU cases only; the bad-input tests
# never reach a kernel and the subprocess tests would recurse.
ISA_TEST_FILES = ["tests/test_cpu_isa.py", "tests/test_ops.py", "tests/test_decode_score.py",
                  "tests/test_block_sparse.py", "tests/test_mla.py", "tests/test_eviction.py",
                  "tests/test_block_transformer.py", "tests/test_nan.py", "tests/test_determinism.py",
                  "tests/test_retrieval.py"]
ISA_TEST_SELECT = ("reports_the_setting or (cpu and (matches_reference or nan or bitwise or every_page or head_dims "
                   "or group_sizes or partial_last_page or merges_with_other_parts or decode_is_gqa or accumulates) "
                   "and not bad_input and not subprocess)")
ISA_TEST_MIN_PASSED = 400  # 447 when written


def test_cpu_isa_reports_the_setting():
    """kvcore.cpu_isa() names the copy the kernels run: the requested one, or for auto the widest
    the CPU supports (our builds are GCC on x86-64, which compile every copy)."""
    requested = _requested()
    widest = [isa for isa, available in AVAILABLE.items() if available][-1]
    expected = widest if requested == "auto" else requested
    assert kvcore.cpu_isa() == expected
    assert torch.ops.kvcore.cpu_isa() == expected


@pytest.mark.parametrize("isa", list(AVAILABLE))
def test_cpu_kernels_match_reference_under_isa_in_subprocess(isa):
    if not AVAILABLE[isa]:
        pytest.skip(f"this CPU lacks what the {isa} copy needs")
    if kvcore.cpu_isa() == isa:
        pytest.skip(f"this process already runs the {isa} kernels (the rest of the suite tests them)")
    run_tests_with_env(VARIABLE, isa, ISA_TEST_FILES, ISA_TEST_SELECT, ISA_TEST_MIN_PASSED)


_BF16_OPS = """
import hashlib, torch, kvcore
from kvcore import reference
g = torch.Generator().manual_seed(5)
table = torch.randperm(40, generator=g).int().view(2, 20)
lens = torch.tensor([320, 77], dtype=torch.int32)

def check(name, out, lse, ref_out, ref_lse):
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4)
    print(name, hashlib.sha1(out.float().numpy().tobytes()).hexdigest())

lat = torch.randn(40, 16, 576, generator=g).bfloat16()
q = torch.randn(2, 8, 576, generator=g).bfloat16()
nan = float("nan")  # outputs poisoned before each call
out, lse = torch.full((2, 8, 512), nan).bfloat16(), torch.full((2, 8), nan)
kvcore.mla_decode(q, lat, table, lens, scale=0.05, out=out, lse=lse)
check("mla_decode", out, lse, *reference.mla_decode(q, lat, table, lens, 0.05, 512))

k = torch.randn(40, 16, 4, 64, generator=g).bfloat16()
v = torch.randn(40, 16, 4, 64, generator=g).bfloat16()
q = torch.randn(2, 8, 64, generator=g).bfloat16()
score = torch.zeros(2, 4, 320)
out, lse = torch.full((2, 8, 64), nan).bfloat16(), torch.full((2, 8), nan)
kvcore.gqa_decode(q, k, v, table, lens, logit_soft_cap=30.0, out=out, lse=lse, score=score)
check("gqa_decode", out, lse, *reference.gqa_decode(q, k, v, table, lens, logit_soft_cap=30.0))
ref_score = reference.gqa_decode_score(q, k, table, lens, logit_soft_cap=30.0, score_len=320)
torch.testing.assert_close(score, ref_score.float(), atol=1e-4, rtol=1e-3)

sel = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(8)]).int().view(2, 4, 3)
counts = torch.tensor([[3, 2, 1, 3], [3, 3, 0, 2]], dtype=torch.int32)
out, lse = torch.full((2, 8, 64), nan).bfloat16(), torch.full((2, 8), nan)
kvcore.block_sparse_decode(q, k, v, table, lens, sel, counts, out=out, lse=lse)
check("block_sparse_decode", out, lse, *reference.block_sparse_decode(q, k, v, table, lens, sel, counts))

qw = torch.randn(2, 6, 8, 64, generator=g).bfloat16()  # a window of 6 queries
scores = torch.full((2, 4, 320), nan)
kvcore.attention_scores(qw, k, table, lens, out=scores)
torch.testing.assert_close(scores, reference.attention_scores(qw, k, table, lens).float(), atol=1e-4, rtol=1e-3)
print("attention_scores", hashlib.sha1(scores.numpy().tobytes()).hexdigest())
print("isa", kvcore.cpu_isa())
"""


def _bf16_op_digests(*isas: str) -> dict:
    """{isa: {op: digest of its output}} from _BF16_OPS run once under each setting (each op
    checked against the reference there)."""
    digests = {}
    for isa in isas:
        res = run_code_with_env(VARIABLE, isa, _BF16_OPS)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        lines = dict(line.split() for line in res.stdout.splitlines())
        assert lines.pop("isa") == isa
        digests[isa] = lines
    return digests


@pytest.mark.skipif(not AVX512_BF16_AVAILABLE, reason="this CPU lacks AVX512_BF16")
def test_avx512bf16_runs_the_bf16_dot_products_in_subprocess():
    """avx512bf16 takes bf16 gqa_decode's (with the H2O score), block_sparse_decode's,
    mla_decode's and attention_scores' own path (vdpbf16ps; the decodes' weights rounded to bf16):
    under both settings each op matches the reference, and each op's output differs between them,
    so the path is not silently skipped."""
    digests = _bf16_op_digests("avx512", "avx512bf16")
    assert set(digests["avx512"]) == {"mla_decode", "gqa_decode", "block_sparse_decode", "attention_scores"}
    for op, digest in digests["avx512"].items():
        assert digests["avx512bf16"][op] != digest, op


@pytest.mark.skipif(not AMX_AVAILABLE, reason="this CPU (or its OS) gives no AMX-BF16 tiles")
def test_amx_runs_mla_decode_on_tiles_in_subprocess():
    """amx is avx512bf16 with bf16 mla_decode on AMX tiles: each op matches the reference under
    both, mla_decode's output differs between them (the tile path is not silently skipped) and
    the other ops' outputs are the same bits (they run avx512bf16's code)."""
    digests = _bf16_op_digests("avx512bf16", "amx")
    for op, digest in digests["avx512bf16"].items():
        assert (digests["amx"][op] != digest) == (op == "mla_decode"), op


_SETUP = """
q = torch.randn(1, 8, 64)
k = torch.randn(4, 16, 2, 64)
bt = torch.arange(4, dtype=torch.int32).view(1, 4)
sl = torch.tensor([40], dtype=torch.int32)
"""


def test_misspelt_cpu_isa_is_an_error():
    """A value other than auto, baseline, avx2, avx512, avx512bf16 or amx (here the upper-case AVX2) fails every CPU
    attention call and the query, naming the variable, instead of silently timing the default."""
    code = (f"import torch, kvcore\n{_SETUP}\n"
            "for call in (lambda: kvcore.gqa_decode(q, k, k, bt, sl), lambda: kvcore.gqa_decode(q, k, k, bt, sl),\n"
            "             kvcore.cpu_isa):\n"
            "    try:\n"
            "        call()\n"
            "    except RuntimeError as e:\n"
            f"        assert {VARIABLE!r} in str(e) and 'AVX2' in str(e), str(e)\n"
            "        print('raised')\n")
    res = run_code_with_env(VARIABLE, "AVX2", code)
    assert res.returncode == 0 and res.stdout.count("raised") == 3, (res.stdout + res.stderr)[-4000:]


@pytest.mark.skipif(AVX2_AVAILABLE, reason="this CPU has AVX2, FMA and F16C")
def test_avx2_without_avx2_is_an_error():
    """Forcing avx2 on a CPU without it must raise (naming the variable), never run the AVX2 copy
    into an illegal instruction."""
    assert_switch_value_rejected(VARIABLE, "avx2", _SETUP, "kvcore.gqa_decode(q, k, k, bt, sl)", calls=2)


@pytest.mark.skipif(AVX512_AVAILABLE, reason="this CPU has AVX-512 F, BW, DQ and VL")
def test_avx512_without_avx512_is_an_error():
    """Likewise for avx512 on a CPU without AVX-512."""
    assert_switch_value_rejected(VARIABLE, "avx512", _SETUP, "kvcore.gqa_decode(q, k, k, bt, sl)", calls=2)


@pytest.mark.skipif(AVX512_BF16_AVAILABLE, reason="this CPU has AVX512_BF16")
def test_avx512bf16_without_avx512_bf16_is_an_error():
    """Likewise for avx512bf16 on a CPU without AVX512_BF16."""
    assert_switch_value_rejected(VARIABLE, "avx512bf16", _SETUP, "kvcore.gqa_decode(q, k, k, bt, sl)", calls=2)


@pytest.mark.skipif(AMX_AVAILABLE, reason="this CPU and its OS give AMX-BF16 tiles")
def test_amx_without_amx_is_an_error():
    """Likewise for amx on a CPU without AMX-TILE and AMX-BF16 (or an OS that does not grant them)."""
    assert_switch_value_rejected(VARIABLE, "amx", _SETUP, "kvcore.gqa_decode(q, k, k, bt, sl)", calls=2)


def test_cpu_isa_choice_is_read_once():
    """The choice is made at the first call and kept: setting the variable later in the process
    does not switch copies (so a benchmark's process times one copy throughout)."""
    code = (f"import os, torch, kvcore\n{_SETUP}\nkvcore.gqa_decode(q, k, k, bt, sl)\nfirst = kvcore.cpu_isa()\n"
            f"os.environ[{VARIABLE!r}] = 'avx2'\nkvcore.gqa_decode(q, k, k, bt, sl)\nprint(first, kvcore.cpu_isa())\n")
    res = run_code_with_env(VARIABLE, "baseline", code)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert res.stdout.split() == ["baseline", "baseline"]
