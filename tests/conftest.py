"""Shared fixtures and input builders for the kernel tests.

Device / dtype parametrisation
    A test that takes a ``device`` argument runs once per device ("cpu", and "cuda" marked
    ``pytest.mark.cuda`` and skipped without a GPU). A test that also takes ``dtype`` runs over
    the dtypes that device supports (``DTYPES``), so CUDA never gets float32.

Input builders (plain functions, import them with ``from conftest import ...``)
    ``ragged_lens``, ``make_paged_kv`` (a shuffled paged cache with junk in the unused block-table
    entries), ``randn`` and ``poison``.

Checks
    ``assert_out_lse_close`` and ``assert_written_and_close`` (the same, after checking that a
    poisoned output was fully written), at the per-dtype tolerances below.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import kvcore

HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "no CUDA device (torch.cuda.is_available() is False); CUDA kernel tests skipped"

DEVICES = ("cpu", "cuda")
DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16, torch.float16),
}
_DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Per-dtype tolerances for an output stored in that dtype (values O(1)), against an fp32/fp64
# reference. lse is always fp32 with fp32 accumulation.
OUT_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=1e-2),
    torch.float16: dict(atol=5e-3, rtol=2e-3),
}
LSE_TOL = dict(atol=1e-3, rtol=1e-4)


def _device_marks(device: str) -> list:
    if device == "cuda":
        return [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]
    return []


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = metafunc.fixturenames
    if "device" not in names:
        return
    # A test that parametrizes device (and dtype) itself, e.g. a CUDA-only one, keeps its own.
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0]
        if isinstance(argnames, str):
            argnames = [n.strip() for n in argnames.split(",")]
        if "device" in argnames:
            return
    if "dtype" in names:
        params = [
            pytest.param(dev, dt, marks=_device_marks(dev), id=f"{dev}-{_DTYPE_IDS[dt]}")
            for dev in DEVICES
            for dt in DTYPES[dev]
        ]
        metafunc.parametrize(("device", "dtype"), params)
    else:
        metafunc.parametrize("device", [pytest.param(dev, marks=_device_marks(dev), id=dev) for dev in DEVICES])


@pytest.fixture
def no_validation():
    """Turn kvcore's index-content validation off for one test, restoring it afterwards."""
    previous = kvcore.set_validation(False)
    try:
        yield
    finally:
        kvcore.set_validation(previous)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator: every test draws its inputs from it, then moves them."""
    g = torch.Generator()
    g.manual_seed(20260)
    return g


# ---- input builders -------------------------------------------------------------------------


def capture_graph(step) -> "torch.cuda.CUDAGraph":
    """Run ``step()`` once eagerly (kernel attributes, occupancy caches, workspaces and validation
    happen outside the capture), then capture it in a CUDA graph and return the graph."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


ROOT = Path(__file__).resolve().parent.parent


def env_with(name: str, value: "str | None") -> dict:
    """This process's environment with ``name`` set to ``value`` (removed for None), for a
    subprocess that must import the same kvcore (an in-place build or an install): kernel
    switches such as KVCORE_SCORES_VARIANT are read once per process by the CUDA launchers."""
    env = dict(os.environ)
    env.pop(name, None)
    if value is not None:
        env[name] = value
    pkg_root = str(Path(kvcore.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def record_op_calls(monkeypatch, name: str) -> list:
    """Make every call of the compiled op ``name`` through ``kvcore.ops`` append its arguments (a
    tuple) to the returned list before it runs, for tests of what a wrapper hands the op."""
    import kvcore.ops as ops_module

    seen = []
    real = ops_module._ops

    class Spy:
        def __getattr__(self, attr):
            op = getattr(real, attr)
            if attr != name:
                return op

            def call(*args):
                seen.append(args)
                return op(*args)

            return call

    monkeypatch.setattr(ops_module, "_ops", Spy())
    return seen


def record_check_calls(monkeypatch, *names: str) -> list:
    """Make every call of the ``kvcore.ops`` helpers ``names`` (e.g. the index-content checks
    ``_check_block_table_contents``, ``_check_slots``) append its name to the returned list before
    it runs, for tests of when a wrapper validates."""
    import kvcore.ops as ops_module

    seen = []
    for name in names:
        real = getattr(ops_module, name)

        def call(*args, _real=real, _name=name, **kwargs):
            seen.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops_module, name, call)
    return seen


def run_tests_with_env(name: str, value: str, files: list, select: str, min_passed: int, *extra: str) -> None:
    """Run pytest over ``files`` (paths from the repository root) with ``-k select`` in a fresh
    process whose ``name`` is ``value``; fail unless it passes with at least ``min_passed`` tests."""
    cmd = [sys.executable, "-m", "pytest", *map(str, files), *extra, "-q", "-p", "no:cacheprovider", "-rfE",
           "-k", select]
    res = subprocess.run(cmd, cwd=ROOT, env=env_with(name, value), capture_output=True, text=True, timeout=1800)
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"{name}={value}: tests failed\n{tail}"
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed is not None and int(passed.group(1)) >= min_passed, f"{name}={value}: too few tests ran\n{tail}"


def assert_generate_refuses_padding(model, ids: torch.Tensor) -> None:
    """``model.generate`` on a kvcore-enabled model with a left-padded attention mask raises a
    ValueError naming the padding (the adapters run unpadded batches only)."""
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)


def run_script_with_env(name: str, value: "str | None", script: str, tmp_path: Path, timeout: int = 600):
    """Run ``script`` (Python source that ``torch.save``s its results to the path in sys.argv[1])
    in a fresh process whose ``name`` is ``value`` (None: unset), and return what it saved; for
    comparing a kernel variant with the default on the same inputs, one process each."""
    src = tmp_path / "script.py"
    src.write_text(script)
    out = tmp_path / f"{value or 'default'}.pt"
    res = subprocess.run([sys.executable, str(src), str(out)], cwd=ROOT, env=env_with(name, value),
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{name}={value}: script failed\n{(res.stdout + res.stderr)[-4000:]}"
    return torch.load(out)


def run_code_with_env(name: str, value: str, code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` with ``python -c`` in a fresh process whose ``name`` is ``value``."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_with(name, value), capture_output=True,
                          text=True, timeout=timeout)


def assert_switch_value_rejected(name: str, value: str, setup: str, call: str, calls: int = 1) -> None:
    """In a fresh process whose kernel switch ``name`` is the bad ``value``: run ``setup`` (Python
    that builds the inputs; torch and kvcore are imported), then ``call`` (one line) ``calls``
    times; each call must raise a RuntimeError naming the variable, so a misspelt switch cannot
    silently run (and time) the default."""
    code = (f"import torch, kvcore\n{textwrap.dedent(setup)}\nfor _ in range({calls}):\n    try:\n        {call}\n"
            f"    except RuntimeError as e:\n        assert {name!r} in str(e), str(e)\n        print('raised')\n")
    res = run_code_with_env(name, value, code)
    assert res.returncode == 0 and res.stdout.count("raised") == calls, (res.stdout + res.stderr)[-4000:]


def prompt_ids(batch: int = 2, device="cpu", *, length: int, vocab: int, seed: int = 99) -> torch.Tensor:
    """Random prompt token ids [batch, length] below ``vocab`` (fixed seed, drawn on the CPU), for
    the model-level tests of the transformers adapters."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


def greedy_generate(model, ids: torch.Tensor, *, new: int):
    """``model.generate`` with greedy decoding for ``new`` tokens, the per-step logits kept (the
    adapter tests compare tokens and logits against transformers' own path)."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)


def opcheck_dtype(device: str) -> torch.dtype:
    """The dtype of an opcheck test's inputs: float32 on CPU, bfloat16 on CUDA (whose kernels take
    16-bit floats only)."""
    return torch.float32 if device == "cpu" else torch.bfloat16


def op_workspace(device: str) -> "torch.Tensor | None":
    """The ``workspace`` argument of a direct ``torch.ops.kvcore`` decode call: a fresh zeroed
    decode workspace on CUDA, None on CPU (whose kernels take none)."""
    if device != "cuda":
        return None
    return torch.zeros(kvcore.ops.DECODE_WORKSPACE_BYTES, dtype=torch.uint8, device=device)


def assert_out_lse_close(out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor, ref_lse: torch.Tensor,
                         dtype: torch.dtype) -> None:
    """An attention output stored in ``dtype`` and its fp32 lse against a reference's, within
    ``OUT_TOL[dtype]`` and ``LSE_TOL``."""
    torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


def assert_written_and_close(op: str, out: torch.Tensor, lse: "torch.Tensor | None", ref_out: torch.Tensor,
                             ref_lse: torch.Tensor, dtype: torch.dtype) -> None:
    """``op``'s NaN-poisoned ``out`` (and ``lse``, unless None) fully written and within tolerance
    of the reference."""
    assert not torch.isnan(out).any(), f"{op} left unwritten (NaN) elements in out"
    torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[dtype])
    if lse is not None:
        assert not torch.isnan(lse).any(), f"{op} left unwritten (NaN) elements in lse"
        torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


def randn(*shape, gen: torch.Generator, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Standard-normal values (never zeros), drawn on the CPU for reproducibility, then moved."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale
    return t.to(device=device, dtype=dtype)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN in place (so any element a kernel fails to write shows) and return it."""
    return t.fill_(math.nan)


def ragged_lens(batch: int, max_len: int, page_size: int, gen: torch.Generator) -> list[int]:
    """Ragged sequence lengths: 0 and 1 when there is room, one length that is not a multiple
    of ``page_size`` (when page_size > 1), ``max_len`` itself, and random lengths for the rest."""
    lens = [int(x) for x in torch.randint(min(2, max_len), max_len + 1, (batch,), generator=gen)]
    special = [max_len, 0, 1]
    if page_size > 1 and max_len > page_size + 1:
        n = int(torch.randint(page_size + 1, max_len + 1, (1,), generator=gen))
        special.append(n - 1 if n % page_size == 0 else n)  # spans pages, ends mid-page
    for i, s in enumerate(special[:batch]):
        lens[i] = s
    perm = torch.randperm(batch, generator=gen).tolist()
    return [lens[i] for i in perm]


@dataclass
class PagedKV:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor  # int32 [B, max_pages]
    seq_lens: torch.Tensor  # int32 [B]
    num_pages: int
    page_size: int


def widen_table(table: torch.Tensor, cols: int, gen: torch.Generator) -> torch.Tensor:
    """``table`` (a block table, or page lists in the last dim) widened to ``cols`` columns of
    junk (-1 and out-of-range ids), which no sequence or count of the batch reaches."""
    junk = torch.randint(10**6, 2 * 10**6, (*table.shape[:-1], cols - table.shape[-1]), generator=gen,
                         dtype=torch.int32)
    junk[..., ::2] = -1
    return torch.cat([table, junk.to(table.device)], dim=-1)


def make_paged_kv(
    lens: list[int],
    page_size: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    gen: torch.Generator,
    dtype=torch.float32,
    device="cpu",
    spare_pages: int = 3,
    extra_table_cols: int = 1,
    strided_cache: bool = False,
) -> PagedKV:
    """A paged K/V cache holding ``len(lens)`` sequences of the given lengths.

    Pages are handed out in a random permutation (never in order) with a few spare pages that no
    sequence uses; block-table entries past a sequence's pages hold junk (-1 and out-of-range
    ids), which the ops must never read. With ``strided_cache`` the caches are the two halves
    of one ``[num_pages, 2, page_size, Hkv, D]`` allocation, i.e. strided in dim 0.
    """
    pages_per_seq = [(n + page_size - 1) // page_size for n in lens]
    used = sum(pages_per_seq)
    num_pages = used + spare_pages
    max_pages = max(pages_per_seq + [0]) + extra_table_cols
    perm = torch.randperm(num_pages, generator=gen).tolist()
    table = torch.empty(len(lens), max_pages, dtype=torch.int32)
    nxt = 0
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = torch.tensor(perm[nxt : nxt + n], dtype=torch.int32)
        nxt += n
        junk = torch.randint(num_pages, num_pages + 1000, (max_pages - n,), generator=gen, dtype=torch.int32)
        junk[::2] = -1
        table[b, n:] = junk
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    if strided_cache:
        kv = randn(num_pages, 2, page_size, num_kv_heads, head_dim, gen=gen, dtype=dtype, device=device)
        k_cache, v_cache = kv[:, 0], kv[:, 1]
        assert not k_cache.is_contiguous()
    else:
        k_cache = randn(*shape, gen=gen, dtype=dtype, device=device)
        v_cache = randn(*shape, gen=gen, dtype=dtype, device=device)
    return PagedKV(
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=table.to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        num_pages=num_pages,
        page_size=page_size,
    )
