"""Tests of the benchmark harness (python -m kvcore.bench) on CPU.

The end-to-end runs need the compiled kvcore ops and skip without them; everything else (report
rendering, timing helpers, the decode group with a stand-in kvcore module) loads the bench
package on its own, so it runs even when ``import kvcore`` fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "python" / "kvcore" / "bench"


def _kvcore_import_error():
    try:
        import kvcore  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"import kvcore failed ({type(exc).__name__}: {exc}); build the package first"
    if not hasattr(kvcore, "gqa_decode"):
        return "kvcore has no gqa_decode"
    return None


KVCORE_MISSING = _kvcore_import_error()
needs_kvcore = pytest.mark.skipif(KVCORE_MISSING is not None, reason=str(KVCORE_MISSING))


def _load_bench():
    """The bench package: kvcore.bench when kvcore imports, else the same files loaded alone."""
    if KVCORE_MISSING is None:
        return importlib.import_module("kvcore.bench")
    name = "_kvcore_bench_isolated"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, BENCH_DIR / "__init__.py", submodule_search_locations=[str(BENCH_DIR)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    pkg = _load_bench()
    return types.SimpleNamespace(
        pkg=pkg,
        harness=importlib.import_module(pkg.__name__ + ".harness"),
        report=importlib.import_module(pkg.__name__ + ".report"),
        peers=importlib.import_module(pkg.__name__ + ".peers"),
        decode=importlib.import_module(pkg.__name__ + ".decode"),
    )


# ------------------------------------------------------------------------------------------
# A synthetic result, as a GPU run would write it
# ------------------------------------------------------------------------------------------


def _row(impl, case, ms, pct, **extra):
    row = {
        "group": "decode",
        "impl": impl,
        "case": case,
        "ms": ms,
        "gbps": None if ms is None else 3021.0 * pct / 100,
        "pct_copy": pct,
        "tflops": None if ms is None else 11.3,
        "pct_gemm": None if ms is None else 1.5,
    }
    row.update(extra)
    return row


CASE_A = "B16 Hq32 Hkv8 D128 S8192 page16"
CASE_B = "B1 Hq32 Hkv8 D128 S131072 page16"


@pytest.fixture()
def synthetic():
    return {
        "gpu": "NVIDIA H100 80GB HBM3",
        "torch": "2.11.0+cu130",
        "date": "2026-11-30",
        "copy_gbps": 3021.0,
        "gemm_tflops": 755.5,
        "kvcore_version": "0.1.0",
        "device_name": "NVIDIA H100 80GB HBM3",
        "rows": [
            _row("kvcore", CASE_A, 0.190, 93.5),
            _row("sdpa-cudnn", CASE_A, 0.188, 94.5),
            _row("flashinfer", CASE_A, None, None, notes="skipped: import flashinfer failed"),
            _row("torch", CASE_A, 0.274, 65.0),
            _row("kvcore", CASE_B, None, None, error="wrong result: max abs error 0.5"),
            _row("sdpa-cudnn", CASE_B, 0.195, 92.0, notes="K/V expanded to Hq"),
            _row("flashinfer", CASE_B, None, None, notes="skipped: import flashinfer failed"),
            _row("torch", CASE_B, 12.5, 53.0),
        ],
    }


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def test_markdown_table(bench, synthetic):
    md = bench.report.markdown(synthetic)
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| case |"))
    assert header == "| case | kvcore | sdpa-cudnn | flashinfer | torch |"
    row_a = next(line for line in lines if line.startswith(f"| {CASE_A} |"))
    assert "0.190 (93.5%)" in row_a and "0.188 (94.5%)" in row_a and "0.274 (65.0%)" in row_a
    row_b = next(line for line in lines if line.startswith(f"| {CASE_B} |"))
    assert "ERROR" in row_b and "12.5 (53.0%)" in row_b
    # Skip reasons, notes and errors become numbered footnotes; the same text is numbered once.
    assert "flashinfer: skipped: import flashinfer failed" in md
    assert md.count("flashinfer: skipped: import flashinfer failed") == 1
    assert "kvcore: error: wrong result" in md
    assert "3,021 GB/s" in md and "756 TFLOP/s" in md
    assert "NVIDIA H100 80GB HBM3" in md


def test_format_cell(bench):
    fmt = bench.report.format_cell
    assert fmt(None) == ""
    assert fmt({"ms": None}) == "-"
    assert fmt({"ms": 1.0, "pct_copy": None}) == "1.00"
    assert fmt({"ms": 0.0123, "pct_copy": 7.3}) == "0.012 (7.3%)"
    assert fmt({"ms": 12.34, "pct_copy": 99.0}) == "12.3 (99.0%)"
    assert fmt({"ms": 2.0, "pct_copy": 50.0, "error": "x"}) == "ERROR"


def test_json_roundtrip_and_validation(bench, synthetic, tmp_path):
    path = bench.report.write_json(synthetic, str(tmp_path / "r.json"))
    again = bench.report.load_json(path)
    assert again == synthetic
    bad = dict(synthetic)
    del bad["copy_gbps"]
    with pytest.raises(ValueError, match="copy_gbps"):
        bench.report.validate(bad)
    bad_row = dict(synthetic, rows=[{"group": "decode", "impl": "kvcore"}])
    with pytest.raises(ValueError, match="missing keys"):
        bench.report.write_json(bad_row, str(tmp_path / "bad.json"))


def test_write_all_without_plot(bench, synthetic, tmp_path):
    paths = bench.report.write_all(synthetic, str(tmp_path / "out"), "h100-2026-11-30", plot=False)
    assert set(paths) == {"json", "md"}
    assert Path(paths["json"]).name == "h100-2026-11-30.json"
    assert Path(paths["md"]).read_text().startswith("### decode")


def test_plot_skipped_without_matplotlib(bench, synthetic, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` fail
    assert bench.report.plot_png(synthetic, str(tmp_path / "x.png")) is None
    assert "matplotlib" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


def test_plot_png(bench, synthetic, tmp_path):
    pytest.importorskip("matplotlib")
    path = bench.report.plot_png(synthetic, str(tmp_path / "x.png"))
    assert path and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------
# harness
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "full, short",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H100 PCIe", "h100"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA RTX A6000", "rtxa6000"),
        ("NVIDIA GH200 480GB", "gh200"),
    ],
)
def test_gpu_short_name(bench, full, short):
    assert bench.harness.gpu_short_name(full) == short


def test_progress_bar(bench):
    stream = io.StringIO()
    bar = bench.harness.ProgressBar(4, stream=stream, force=True)
    bar.update(1, label="decode B1 kvcore")
    out = io.StringIO()
    bar.write("a message", file=out)
    bar.update(3)
    bar.close()
    text = stream.getvalue()
    assert "\r" in text and "4/4" in text and "decode B1 kvcore" in text
    assert out.getvalue() == "a message\n"
    quiet = io.StringIO()
    off = bench.harness.ProgressBar(2, stream=quiet, force=False)
    off.update(2)
    off.close()
    assert quiet.getvalue() == ""


def test_cpu_timer_and_rates(bench):
    timer = bench.harness.Timer(torch.device("cpu"), warmup_ms=1, rep_ms=5, min_reps=3)
    ms = timer(lambda: sum(range(1000)))
    assert 0 < ms < 1000
    r = bench.harness.rates(2.0, 4e9, 8e12, 4000.0, 800.0)
    assert math.isclose(r["gbps"], 2000.0)
    assert math.isclose(r["pct_copy"], 50.0)
    assert math.isclose(r["tflops"], 4000.0)
    assert math.isclose(r["pct_gemm"], 500.0)
    assert bench.harness.rates(1.0, 1e9, 1e9, None, None)["pct_gemm"] is None
    assert bench.harness.round_sig(0.123456, 3) == 0.123
    assert bench.harness.round_sig(None) is None


def test_yardsticks_on_cpu(bench):
    timer = bench.harness.Timer(torch.device("cpu"), warmup_ms=1, rep_ms=5, min_reps=2)
    assert bench.harness.copy_bandwidth_gbps(torch.device("cpu"), timer, nbytes=4 * 2**20) > 0
    assert bench.harness.gemm_tflops(torch.device("cpu"), timer, n=64) > 0


# ------------------------------------------------------------------------------------------
# decode group, with stand-in kvcore modules (no compiled ops needed)
# ------------------------------------------------------------------------------------------


def test_decode_case_accounting(bench):
    case = bench.decode.DecodeCase(16, 32, 8, 128, 8192)
    assert case.name == "B16 Hq32 Hkv8 D128 S8192 page16"
    assert case.nbytes == 16 * 8192 * 8 * 128 * 2 * 2 + 2 * 16 * 32 * 128 * 2
    assert case.flops == 4 * 16 * 32 * 8192 * 128
    assert bench.decode.DecodeCase(2, 8, 2, 64, 512, dtype=torch.float32).name.endswith(" fp32")
    quick = bench.decode.cases(torch.device("cpu"), quick=True)
    assert quick and all(c.seq_len <= 4096 for c in quick)


def test_grid_on_gpu_matches_design(bench):
    names = [c.name for c in bench.decode.cases(torch.device("cuda"), quick=False)]
    assert "B16 Hq32 Hkv8 D128 S8192 page16" in names
    assert "B1 Hq32 Hkv8 D128 S131072 page16" in names
    assert "B32 Hq64 Hkv8 D128 S8192 page16" in names
    assert "B64 Hq32 Hkv8 D128 S4096 page16 ragged" in names
    assert "B8 Hq32 Hkv8 D128 S8192 page16 table131072" in names
    assert "B16 Hq32 Hkv8 D128 S8192 page16 in-order" in names
    assert len(names) == 16
    quick = [c.name for c in bench.decode.cases(torch.device("cuda"), quick=True)]
    assert "B16 Hq32 Hkv8 D128 S1024 page16 paired" in quick


def test_paired_case_keeps_values_and_puts_each_pages_v_after_its_k(bench):
    """pages_paired: k_cache and v_cache are the halves of one [pages, 2, page, Hkv, D] buffer
    (handed to FlashInfer whole), with the values, table and bytes of the separate layout."""
    separate = bench.decode.DecodeCase(3, 8, 2, 64, 100, dtype=torch.float32)
    paired = bench.decode.DecodeCase(3, 8, 2, 64, 100, dtype=torch.float32, pages_paired=True)
    assert paired.name == "B3 Hq8 Hkv2 D64 S100 page16 paired fp32" and paired.nbytes == separate.nbytes
    a = bench.decode.make_inputs(separate, torch.device("cpu"))
    b = bench.decode.make_inputs(paired, torch.device("cpu"))
    assert a.kv_pairs is None and b.kv_pairs.shape == (21, 2, 16, 2, 64)
    assert b.k_cache.data_ptr() == b.kv_pairs.data_ptr()
    assert b.v_cache.data_ptr() == b.kv_pairs[:, 1].data_ptr()
    assert b.k_cache.stride(0) == b.v_cache.stride(0) == 2 * 16 * 2 * 64
    assert torch.equal(a.k_cache, b.k_cache) and torch.equal(a.v_cache, b.v_cache)
    assert torch.equal(a.block_table, b.block_table) and torch.equal(a.q, b.q)
    torch.testing.assert_close(bench.peers.reference_output(b), bench.peers.reference_output(a))


def test_in_order_case_lays_each_sequence_out_consecutively(bench):
    """pages_in_order lays each sequence's pages out consecutively; q, the caches and the bytes
    are those of the random order, and the reference follows the table."""
    shuffled = bench.decode.DecodeCase(3, 8, 2, 64, 100, dtype=torch.float32)
    ordered = bench.decode.DecodeCase(3, 8, 2, 64, 100, dtype=torch.float32, pages_in_order=True)
    assert ordered.name == "B3 Hq8 Hkv2 D64 S100 page16 in-order fp32" and ordered.nbytes == shuffled.nbytes
    a = bench.decode.make_inputs(shuffled, torch.device("cpu"))
    b = bench.decode.make_inputs(ordered, torch.device("cpu"))
    assert torch.equal(b.block_table.flatten(), torch.arange(b.block_table.numel(), dtype=torch.int32))
    assert not torch.equal(a.block_table, b.block_table)
    assert torch.equal(a.q, b.q) and torch.equal(a.k_cache, b.k_cache) and torch.equal(a.v_cache, b.v_cache)
    # sequence s reads pages s * 7 .. s * 7 + 6 (100 tokens, page 16): the reference over that table
    # is the reference over the shuffled table's caches renumbered to match
    order = a.block_table.flatten().long()
    renumbered = bench.peers.DecodeInputs(a.q, a.k_cache[order], a.v_cache[order], b.block_table, a.seq_lens, a.scale)
    torch.testing.assert_close(bench.peers.reference_output(renumbered), bench.peers.reference_output(a))


def test_wide_table_case_pads_with_stale_pages(bench):
    """table_tokens widens the block table; the bytes and flops stay those of the lengths, and
    every column past a sequence's pages names an allocated page (stale, never attended)."""
    case = bench.decode.DecodeCase(2, 8, 2, 64, 512, dtype=torch.float32, table_tokens=4096)
    narrow = bench.decode.DecodeCase(2, 8, 2, 64, 512, dtype=torch.float32)
    assert case.nbytes == narrow.nbytes and case.flops == narrow.flops
    inputs = bench.decode.make_inputs(case, torch.device("cpu"))
    assert inputs.block_table.shape == (2, 4096 // 16)
    assert int(inputs.block_table.min()) >= 0 and int(inputs.block_table.max()) < inputs.k_cache.shape[0]
    base = bench.decode.make_inputs(narrow, torch.device("cpu"))
    assert torch.equal(inputs.block_table[:, : 512 // 16], base.block_table)


def test_ragged_case_counts_its_own_lengths(bench):
    """A ragged case's lengths are fixed by its shape, lie in [1, seq_len], and are what its bytes,
    FLOPs and inputs use; the reference takes each sequence over its own pages, and the contiguous
    peers skip it with the reason."""
    case = bench.decode.DecodeCase(5, 8, 2, 64, 100, page_size=16, dtype=torch.float32, ragged=True)
    assert case.name == "B5 Hq8 Hkv2 D64 S100 page16 ragged fp32"
    lens = case.seq_lens()
    assert lens == case.seq_lens() and len(lens) == 5 and all(1 <= n <= 100 for n in lens)
    assert len(set(lens)) > 1
    assert case.nbytes == sum(lens) * 2 * 64 * 2 * 4 + 2 * 5 * 8 * 64 * 4
    assert case.flops == 4 * 8 * sum(lens) * 64
    inp = bench.decode.make_inputs(case, torch.device("cpu"), seed=3)
    assert inp.seq_lens.tolist() == lens
    ref = bench.peers.reference_output(inp)
    for b, n in enumerate(lens):  # token t of sequence b: page block_table[b, t // 16], row t % 16
        rows = [(int(inp.block_table[b, t // 16]), t % 16) for t in range(n)]
        k = torch.stack([inp.k_cache[pg, r] for pg, r in rows], 1).double()  # [Hkv, n, D]
        v = torch.stack([inp.v_cache[pg, r] for pg, r in rows], 1).double()
        for h in range(8):
            p = torch.softmax(k[h // 4] @ inp.q[b, h].double() * inp.scale, dim=0)
            torch.testing.assert_close(ref[b, h].double(), p @ v[h // 4], atol=1e-5, rtol=1e-5)
    with pytest.raises(bench.peers.Skip, match="one sequence length"):
        bench.peers.build("torch", inp)


def test_inputs_are_paged_and_random(bench):
    case = bench.decode.DecodeCase(3, 8, 2, 64, 100, page_size=16, dtype=torch.float32)
    inp = bench.decode.make_inputs(case, torch.device("cpu"), seed=1)
    pages = sorted(inp.block_table.flatten().tolist())
    assert pages == list(range(inp.k_cache.shape[0]))  # a permutation of every page
    assert inp.block_table.flatten().tolist() != pages  # shuffled
    assert bool((inp.k_cache != 0).all()) and inp.k_cache.std() > 0.5
    k, v = inp.contiguous_kv()
    assert k.shape == (3, 2, 100, 64)
    # Token 37 of sequence 1 lives at page block_table[1, 2], row 5.
    page = int(inp.block_table[1, 37 // 16])
    assert torch.equal(k[1, :, 37], inp.k_cache[page, 37 % 16])
    assert torch.equal(v[1, :, 37], inp.v_cache[page, 37 % 16])


def test_grouped_attention_matches_per_head_loop(bench):
    torch.manual_seed(0)
    q = torch.randn(2, 8, 16, dtype=torch.float64)
    k = torch.randn(2, 2, 40, 16, dtype=torch.float64)
    v = torch.randn(2, 2, 40, 16, dtype=torch.float64)
    out = bench.peers.grouped_attention(q, k, v, 0.25)
    for b in range(2):
        for h in range(8):
            kh = h // 4
            p = torch.softmax((k[b, kh] @ q[b, h]) * 0.25, dim=0)
            torch.testing.assert_close(out[b, h], p @ v[b, kh])


def _fake_kvcore(mode: str):
    """A stand-in kvcore module whose gqa_decode is right, wrong, partial or failing."""
    state = {"validation": True, "calls_with_validation": 0}
    mod = types.ModuleType("kvcore")

    def gqa_decode(q, k_cache, v_cache, block_table, seq_lens, *, scale=None, out=None, workspace=None, **kw):
        if state["validation"]:
            state["calls_with_validation"] += 1
        if mode == "raise":
            raise RuntimeError("no kernel for this shape")
        b, hq, d = q.shape
        s = int(seq_lens[0])
        page = k_cache.shape[1]
        idx = block_table[:, : (s + page - 1) // page].long()
        k = k_cache[idx].reshape(b, -1, k_cache.shape[2], d)[:, :s].permute(0, 2, 1, 3)
        v = v_cache[idx].reshape(b, -1, v_cache.shape[2], d)[:, :s].permute(0, 2, 1, 3)
        res = _grouped(q, k, v, scale)
        if mode == "wrong":
            res = res + 0.25
        if mode == "partial":
            out[:, :-1] = res[:, :-1]  # the last head is never written
        else:
            out.copy_(res)
        return out

    def set_validation(enabled):
        previous, state["validation"] = state["validation"], bool(enabled)
        return previous

    mod.gqa_decode = gqa_decode
    mod.set_validation = set_validation
    mod.validation_enabled = lambda: state["validation"]
    mod.state = state
    return mod


def _grouped(q, k, v, scale):
    b, hq, d = q.shape
    hkv = k.shape[1]
    s = torch.einsum("bhgd,bhsd->bhgs", q.float().reshape(b, hkv, hq // hkv, d), k.float()) * scale
    return torch.einsum("bhgs,bhsd->bhgd", torch.softmax(s, -1), v.float()).reshape(b, hq, d).to(q.dtype)


def _ctx(bench):
    h = bench.harness
    timer = h.Timer(torch.device("cpu"), warmup_ms=1, rep_ms=5, min_reps=2)
    return h.RunContext(torch.device("cpu"), timer, copy_gbps=10.0, gemm_tflops=0.1, quick=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_run_times_a_correct_kernel(bench, monkeypatch, dtype):
    fake = _fake_kvcore("right")
    monkeypatch.setitem(sys.modules, "kvcore", fake)
    case = bench.decode.DecodeCase(2, 8, 2, 64, 200, dtype=dtype)
    rows = bench.decode.run(case, ["kvcore", "torch", "sdpa-math"], _ctx(bench))
    assert [r["impl"] for r in rows] == ["kvcore", "torch", "sdpa-math"]
    for r in rows:
        assert r["case"] == case.name and r["group"] == "decode"
        assert "error" not in r, r
        assert r["ms"] > 0 and r["gbps"] > 0 and r["pct_copy"] > 0 and r["tflops"] > 0
        assert math.isclose(r["gbps"], case.nbytes / (r["ms"] * 1e-3) / 1e9, rel_tol=2e-3)  # ms and gbps keep 4 significant digits
    # The check ran with validation on; timing turned it off and then restored it.
    assert fake.state["calls_with_validation"] == 1
    assert fake.state["validation"] is True


@pytest.mark.parametrize("mode, message", [("wrong", "max abs error"), ("partial", "NaN"), ("raise", "call failed")])
def test_decode_run_refuses_a_wrong_kernel(bench, monkeypatch, mode, message):
    monkeypatch.setitem(sys.modules, "kvcore", _fake_kvcore(mode))
    case = bench.decode.DecodeCase(2, 8, 2, 64, 64, dtype=torch.float32)
    (row,) = bench.decode.run(case, ["kvcore"], _ctx(bench))
    assert row["ms"] is None and row["pct_copy"] is None
    assert message in row["error"]


def test_decode_run_records_a_skip(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "kvcore", types.ModuleType("kvcore"))  # no gqa_decode
    case = bench.decode.DecodeCase(1, 4, 1, 64, 32, dtype=torch.float32)
    rows = bench.decode.run(case, ["kvcore", "flashinfer", "torch"], _ctx(bench))
    assert rows[0]["ms"] is None and rows[0]["notes"].startswith("skipped:")
    assert rows[1]["ms"] is None and rows[1]["notes"].startswith("skipped:")
    assert rows[2]["ms"] > 0


def test_sdpa_falls_back_to_expanded_kv(bench, monkeypatch):
    """A backend that refuses enable_gqa is retried with K/V expanded to Hq, and says so."""
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def no_gqa(q, k, v, *args, enable_gqa=False, **kw):
        if enable_gqa:
            raise RuntimeError("No available kernel. Aborting execution.")
        assert k.shape[1] == q.shape[1]
        return real_sdpa(q, k, v, *args, **kw)

    monkeypatch.setattr(bench.peers.F, "scaled_dot_product_attention", no_gqa)
    case = bench.decode.DecodeCase(2, 8, 2, 64, 48, dtype=torch.float32)
    (row,) = bench.decode.run(case, ["sdpa-math"], _ctx(bench))
    assert row["ms"] > 0 and "error" not in row
    assert "expanded" in row["notes"] and "No available kernel" in row["notes"]
    assert math.isclose(row["gbps"], case.nbytes / (row["ms"] * 1e-3) / 1e9, rel_tol=2e-3)


# ------------------------------------------------------------------------------------------
# End to end, with the compiled ops
# ------------------------------------------------------------------------------------------


def test_h2o_rows_that_keep_the_score_are_credited_its_bytes():
    from kvcore.bench import decode, eviction_cache

    dc = decode.DecodeCase(16, 32, 8, 128, 8192)
    plain, scored = eviction_cache.H2oCase(dc), eviction_cache.H2oCase(dc, with_score=True)
    assert plain.nbytes == dc.nbytes and plain.name == scored.name
    assert scored.nbytes - dc.nbytes == 2 * 4 * 16 * 8 * 8192  # the fp32 score read and written per key
    assert 0.015 < (scored.nbytes - dc.nbytes) / dc.nbytes < 0.016  # +1.56% at D 128 bf16


def test_the_check_scales_with_the_reference():
    """A decode output over S random keys is ~S^-1/2: at S 131072 an absolute 2e-2 passed zeros."""
    from kvcore.bench.runner import check_result

    gen = torch.Generator().manual_seed(7)
    small = torch.randn(4, 32, 128, generator=gen) * 0.006  # max |ref| ~0.02, as at B1 S131072
    assert check_result(small + 1e-5, small, 2e-2) is None
    assert "max abs error" in check_result(torch.zeros_like(small), small, 2e-2)
    assert "max abs error" in check_result(small * 0.9, small, 2e-2)  # e.g. a tenth of the keys dropped
    big = torch.randn(4, 32, 128, generator=gen) * 3  # outputs of size >= 1 keep the absolute tolerance
    assert check_result(big + 0.015, big, 2e-2) is None and "max abs error" in check_result(big + 0.03, big, 2e-2)
    # A tuple of outputs (an in-place op's caches and lengths, a side output) checked pair by pair.
    assert check_result((small, big), (small, big), 2e-2) is None
    assert "(output 1)" in check_result((small, torch.zeros_like(big)), (small, big), 2e-2)
    assert "2 outputs, expected 1" in check_result((small, big), small, 2e-2)


@needs_kvcore
def test_a_second_run_on_the_same_day_does_not_replace_the_first(tmp_path):
    from kvcore.bench.__main__ import _free_stem

    assert _free_stem(str(tmp_path), "h200-2026-12-05") == "h200-2026-12-05"
    (tmp_path / "h200-2026-12-05.json").write_text("{}")
    assert _free_stem(str(tmp_path), "h200-2026-12-05") == "h200-2026-12-05-2"
    (tmp_path / "h200-2026-12-05-2.json").write_text("{}")
    assert _free_stem(str(tmp_path), "h200-2026-12-05") == "h200-2026-12-05-3"
    assert _free_stem(str(tmp_path), "h100-2026-12-05") == "h100-2026-12-05"


@needs_kvcore
def test_quick_cpu_bench_end_to_end(tmp_path, capsys):
    from kvcore.bench.__main__ import main

    result = main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-plot"])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("cpu-") and files[0].endswith(".json")
    data = json.loads((tmp_path / files[0]).read_text())
    assert data == json.loads(json.dumps(result))
    for key in ("gpu", "torch", "date", "copy_gbps", "gemm_tflops", "rows"):
        assert key in data
    assert data["gpu"] == "cpu" and data["copy_gbps"] > 0
    for row in data["rows"]:
        assert set(row) >= {"group", "impl", "case", "ms", "gbps", "pct_copy", "tflops", "pct_gemm"}
    for impl in ("kvcore", "torch"):
        timed = [r for r in data["rows"] if r["impl"] == impl]
        # Every case of each group that has this implementation (e2e has no "torch" peer).
        groups = {r["group"] for r in timed}
        assert {r["case"] for r in timed} == {r["case"] for r in data["rows"] if r["group"] in groups}
        for r in timed:
            assert "error" not in r, r
            if impl == "torch" and "ragged" in r["case"].split():
                # the contiguous-K/V form needs one length for the batch: a skip that says so
                assert r["ms"] is None and "one sequence length" in r["notes"], r
                continue
            assert r["ms"] > 0 and r["gbps"] > 0 and r["pct_copy"] > 0, r
    out = capsys.readouterr().out
    assert "| case | kvcore |" in out
    assert (tmp_path / files[1]).read_text().startswith("### decode")


@needs_kvcore
def test_cli_help_and_bad_impl(capsys):
    from kvcore.bench.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--quick" in capsys.readouterr().out
    # The real command line, once: an unknown implementation is refused before any measuring.
    env = dict(os.environ, KVCORE_BENCH_PROGRESS="0")
    bad = subprocess.run(
        [sys.executable, "-m", "kvcore.bench", "--device", "cpu", "--impl", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode != 0 and "unknown --impl" in bad.stderr


# ------------------------------------------------------------------------------------------
# Group "block": block-sparse decode (block_sparse.py); the Block Transformer's token-decoder
# prefill attention (block_transformer.py) follows
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def block_bench():
    pkg = _load_bench()
    return importlib.import_module(pkg.__name__ + ".block_sparse")


def test_block_case_accounting(block_bench):
    case = block_bench.BlockSparseCase(16, 32, 8, 128, 32768, page_size=16)
    assert case.name == "B16 Hq32 Hkv8 D128 S32768 page16 sel37x128"
    assert case.selected_tokens == 37 * 128
    assert case.nbytes == 16 * 8 * 37 * 128 * 128 * 2 * 2 + 2 * 16 * 32 * 128 * 2
    assert case.flops == 4 * 16 * 32 * 37 * 128 * 128
    with pytest.raises(ValueError):
        block_bench.BlockSparseCase(1, 8, 2, 64, 1000)  # not a whole number of blocks
    with pytest.raises(ValueError):
        block_bench.BlockSparseCase(1, 8, 2, 64, 1024, blocks=9)  # only 8 blocks exist
    quick = block_bench.cases(torch.device("cpu"), quick=True)
    assert quick and all(c.seq_len <= 4096 for c in quick)
    assert block_bench.GROUP == "block"


def test_block_grid_on_gpu_matches_issue(block_bench):
    names = [c.name for c in block_bench.cases(torch.device("cuda"), quick=False)]
    assert names == [
        "B16 Hq32 Hkv8 D128 S32768 page128 sel37x128",
        "B16 Hq32 Hkv8 D128 S32768 page16 sel37x128",
        "B1 Hq32 Hkv8 D128 S131072 page128 sel37x128",
        "B1 Hq32 Hkv8 D128 S131072 page16 sel37x128",
    ]
    # The issue's byte counts: 310 MB at B16 S32768 and 19 MB at B1 S131072 (selected K/V).
    cases = block_bench.cases(torch.device("cuda"), quick=False)
    assert int(cases[0].nbytes / 1e6) == 310 and int(cases[2].nbytes / 1e6) == 19


@pytest.mark.parametrize("page_size", [128, 16])
def test_block_inputs_select_distinct_blocks(block_bench, page_size):
    case = block_bench.BlockSparseCase(2, 8, 2, 64, 1024, page_size=page_size, blocks=3, dtype=torch.float32)
    inp = block_bench.make_inputs(case, torch.device("cpu"), seed=3)
    per_block = 128 // page_size
    assert inp.sel_pages.shape == (2, 2, 3 * per_block) and bool((inp.sel_counts == 3 * per_block).all())
    for b in range(2):
        for h in range(2):
            blocks = inp.blocks[b, h].tolist()
            assert len(set(blocks)) == 3 and blocks == sorted(blocks)
            expected = [x * per_block + i for x in blocks for i in range(per_block)]
            assert inp.sel_pages[b, h].tolist() == expected
    # gather_selected reads the selected tokens of each head from the paged cache.
    k_sel, v_sel = inp.gather_selected()
    k_all, v_all = inp.contiguous_kv()
    for b in range(2):
        for h in range(2):
            pos = torch.cat([torch.arange(x * 128, (x + 1) * 128) for x in inp.blocks[b, h].tolist()])
            assert torch.equal(k_sel[b, h], k_all[b, h, pos]) and torch.equal(v_sel[b, h], v_all[b, h, pos])


@pytest.mark.parametrize("page_size", [128, 16])
def test_block_bsr_layout_for_flashinfer(block_bench, page_size):
    """The BSR form handed to FlashInfer, evaluated here in plain torch, is the same attention."""
    case = block_bench.BlockSparseCase(2, 8, 2, 64, 1024, page_size=page_size, blocks=3, dtype=torch.float32)
    inp = block_bench.make_inputs(case, torch.device("cpu"), seed=4)
    lay = block_bench.bsr_layout(inp)
    assert lay.R == 1 and lay.C == page_size and lay.num_kv_heads == 1 and lay.M == 4 and lay.q.shape == (4, 4, 64)
    out = torch.empty(lay.M, lay.num_qo_heads, 64)
    for row in range(lay.M):
        blocks = lay.indices[lay.indptr[row] : lay.indptr[row + 1]].long()
        keys = (blocks.view(-1, 1) * lay.C + torch.arange(lay.C)).flatten()
        assert int(keys.max()) < lay.N
        k, v = lay.k[keys, 0], lay.v[keys, 0]
        p = torch.softmax(lay.q[row] @ k.T * inp.scale, dim=-1)
        out[row] = p @ v
    torch.testing.assert_close(out.view(2, 8, 64), block_bench.reference_output(inp), atol=1e-5, rtol=1e-5)


def _fake_block_kvcore(mode: str):
    """A stand-in kvcore whose block_sparse_decode is right, wrong or missing."""
    state = {"validation": True}
    mod = types.ModuleType("kvcore")
    mod.gqa_decode = lambda *a, **k: None  # peers.import_kvcore looks for it

    def block_sparse_decode(q, k_cache, v_cache, block_table, seq_lens, sel_pages, sel_counts, *, scale, out,
                            workspace=None):
        b, hkv, n = sel_pages.shape
        phys = block_table.long().gather(1, sel_pages.reshape(b, -1).long()).view(b, hkv, n)
        heads = torch.arange(hkv).view(1, hkv, 1)
        k = k_cache.permute(0, 2, 1, 3)[phys, heads].reshape(b, hkv, -1, q.shape[2])
        v = v_cache.permute(0, 2, 1, 3)[phys, heads].reshape(b, hkv, -1, q.shape[2])
        res = _grouped(q, k, v, scale)
        out.copy_(res + 0.25 if mode == "wrong" else res)
        return out

    def set_validation(enabled):
        previous, state["validation"] = state["validation"], bool(enabled)
        return previous

    if mode != "missing":
        mod.block_sparse_decode = block_sparse_decode
    mod.set_validation = set_validation
    mod.decode_workspace = lambda device: None
    mod.state = state
    return mod


@pytest.mark.parametrize("mode", ["right", "wrong", "missing"])
def test_block_run_checks_before_timing(bench, block_bench, monkeypatch, mode):
    fake = _fake_block_kvcore(mode)
    monkeypatch.setitem(sys.modules, "kvcore", fake)
    case = block_bench.BlockSparseCase(2, 8, 2, 64, 1024, page_size=16, blocks=3, dtype=torch.float32)
    rows = block_bench.run(case, ["kvcore", "torch", "gather+sdpa", "flashinfer"], _ctx(bench))
    assert [r["impl"] for r in rows] == ["kvcore", "torch", "gather+sdpa", "flashinfer"]
    assert all(r["group"] == "block" and r["case"] == case.name for r in rows)
    for r in rows[1:3]:
        assert "error" not in r and r["ms"] > 0
        assert math.isclose(r["gbps"], case.nbytes / (r["ms"] * 1e-3) / 1e9, rel_tol=2e-3)
    assert rows[3]["ms"] is None and rows[3]["notes"].startswith("skipped:")  # no CUDA here
    kv = rows[0]
    if mode == "right":
        assert "error" not in kv and kv["ms"] > 0
        assert fake.state["validation"] is True  # turned off for timing, then restored
    elif mode == "wrong":
        assert kv["ms"] is None and "max abs error" in kv["error"]
    else:
        assert kv["ms"] is None and "no block_sparse_decode" in kv["notes"]


@needs_kvcore
def test_block_group_cpu_end_to_end(tmp_path):
    from kvcore.bench.__main__ import main

    result = main(["--group", "block", "--device", "cpu", "--out", str(tmp_path), "--no-plot"])
    (json_path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    data = json.loads(json_path.read_text())
    assert data == json.loads(json.dumps(result))
    for key in ("gpu", "torch", "date", "copy_gbps", "gemm_tflops", "rows"):
        assert key in data
    cases = {c.name for c in importlib.import_module("kvcore.bench.block_sparse").cases(torch.device("cpu"), True)}
    token_cases = {c.name for c in importlib.import_module("kvcore.bench.block_transformer").cases(torch.device("cpu"), True)}
    # The group runs both modules; their rows share the group name.
    assert {r["case"] for r in data["rows"]} == cases | token_cases
    assert {r["group"] for r in data["rows"]} == {"block"}
    for impl in ("kvcore", "gather+sdpa", "torch"):
        timed = [r for r in data["rows"] if r["impl"] == impl and r["case"] in cases]
        assert {r["case"] for r in timed} == cases
        for r in timed:
            assert "error" not in r, r
            assert r["ms"] > 0 and r["gbps"] > 0 and r["pct_copy"] > 0, r
    for r in data["rows"]:
        if r["impl"] == "flex_attention":  # eager on CPU: timed, or skipped with the reason
            assert "error" not in r and (r["ms"] or r["notes"].startswith("skipped:")), r


# ------------------------------------------------------------------------------------------
# Group "block", Block Transformer part: token-decoder prefill attention
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bt_bench():
    pkg = _load_bench()
    return importlib.import_module(pkg.__name__ + ".block_transformer")


def test_block_transformer_cases_count_bytes_and_flops(bt_bench):
    case = bt_bench.TokenDecoderCase(32, 12, 12, 64, 8192, 4, 2)
    n = 32 * 8192 // 4
    assert case.blocks == n
    assert case.nbytes == (2 * n * 4 * 12 + 2 * n * 6 * 12) * 64 * 2
    assert case.flops == 4 * n * 12 * 64 * (3 + 4 + 5 + 6)  # P + i + 1 keys for row i
    names = [c.name for c in bt_bench.cases(torch.device("cuda"), quick=False)]
    assert names == ["token-decoder B32 H12 D64 S8192 L4 P2", "token-decoder B8 H16 D128 S16384 L16 P2"]
    assert all(c.blocks <= 512 for c in bt_bench.cases(torch.device("cpu"), quick=True))
    with pytest.raises(ValueError, match="multiple of block_length"):
        bt_bench.TokenDecoderCase(1, 4, 4, 64, 30, 4, 2)


def test_block_transformer_peers_agree_with_masked_attention(bt_bench):
    """The plain-torch and SDPA forms equal per-row dense attention over the allowed keys."""
    case = bt_bench.TokenDecoderCase(1, 4, 2, 64, 16, 4, 3, dtype=torch.float32)
    inp = bt_bench.make_inputs(case, torch.device("cpu"), seed=2)
    ref = bt_bench.reference_output(inp)
    g = case.num_q_heads // case.num_kv_heads
    for n in range(case.blocks):
        for i in range(case.block_length):
            keys = case.prefix + i + 1
            for h in range(case.num_q_heads):
                p = torch.softmax((inp.k[n, :keys, h // g] @ inp.q[n, i, h]) * inp.scale, dim=0)
                torch.testing.assert_close(ref[n, i, h], p @ inp.v[n, :keys, h // g], atol=1e-5, rtol=1e-5)
    sdpa = bt_bench.build_sdpa_tiny(inp)[0].fn()
    torch.testing.assert_close(sdpa.float(), ref, atol=1e-5, rtol=1e-5)


def _fake_kvcore_td(mode: str):
    """A stand-in kvcore whose token_decoder_attention is right or wrong."""
    state = {"validation": True}
    mod = types.ModuleType("kvcore")

    def token_decoder_attention(q, k, v, block_lens=None, *, scale=None, out=None, **kw):
        import importlib as _il

        bt = _il.import_module(_load_bench().__name__ + ".block_transformer")
        mask = bt.token_decoder_mask(q.shape[1], k.shape[1] - q.shape[1], q.device)
        res = bt.tiny_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale)
        out.copy_(res + (0.5 if mode == "wrong" else 0.0))
        return out

    def set_validation(enabled):
        previous, state["validation"] = state["validation"], bool(enabled)
        return previous

    mod.token_decoder_attention = token_decoder_attention
    mod.set_validation = set_validation
    mod.cuda_kernels_built = lambda: False
    mod.state = state
    return mod


@pytest.mark.parametrize("mode", ["right", "wrong"])
def test_block_transformer_run_checks_before_timing(bt_bench, bench, monkeypatch, mode):
    fake = _fake_kvcore_td(mode)
    monkeypatch.setitem(sys.modules, "kvcore", fake)
    case = bt_bench.TokenDecoderCase(1, 4, 4, 64, 32, 4, 2, dtype=torch.float32)
    rows = bt_bench.run(case, ["kvcore", "torch", "flex_attention"], _ctx(bench))
    assert [r["impl"] for r in rows] == ["kvcore", "torch", "flex_attention"]
    assert all(r["group"] == "block" and r["case"] == case.name for r in rows)
    if mode == "right":
        assert rows[0]["ms"] > 0 and "error" not in rows[0]
        assert math.isclose(rows[0]["gbps"], case.nbytes / (rows[0]["ms"] * 1e-3) / 1e9, rel_tol=2e-3)
    else:
        assert rows[0]["ms"] is None and "max abs error" in rows[0]["error"]
    assert rows[1]["ms"] > 0
    assert rows[2]["ms"] is None and rows[2]["notes"].startswith("skipped:")  # flex: CUDA only
    assert fake.state["validation"] is True  # restored after timing


@needs_kvcore
def test_block_group_cpu_json(tmp_path):
    """`python -m kvcore.bench --group block` on CPU: the committed JSON shape, every impl timed."""
    from kvcore.bench.__main__ import main

    result = main(["--group", "block", "--device", "cpu", "--out", str(tmp_path), "--no-plot"])
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(result))
    for key in ("gpu", "torch", "date", "copy_gbps", "gemm_tflops", "rows"):
        assert key in data
    bt_rows = [r for r in data["rows"] if r["case"].startswith("token-decoder")]
    assert bt_rows and all(r["group"] == "block" for r in bt_rows)
    assert {r["impl"] for r in bt_rows} == {"kvcore", "sdpa-tiny", "torch"}
    for r in bt_rows:
        assert set(r) >= {"group", "impl", "case", "ms", "gbps", "pct_copy", "tflops", "pct_gemm"}
        assert "error" not in r, r
        assert r["ms"] > 0 and r["gbps"] > 0 and r["pct_copy"] > 0 and r["tflops"] > 0, r


# ------------------------------------------------------------------------------------------
# Group "retrieval": the InfLLM retrieve-and-attend step (kvcore.bench.retrieval)
# ------------------------------------------------------------------------------------------


def test_retrieval_cases_count_bytes_and_flops():
    mod = importlib.import_module("kvcore.bench.retrieval")
    (full, *_) = mod.cases(torch.device("cuda"), False)
    # The issue's shape: B1 Hq32/Hkv8/D128, 8192 units of 128 (1M tokens), topk 16, n_local 4096.
    assert (full.batch, full.num_q_heads, full.num_kv_heads, full.head_dim) == (1, 32, 8, 128)
    assert (full.units, full.block, full.topk, full.n_local, full.hit) == (8192, 128, 16, 4096, 1.0)
    assert {c.hit for c in mod.cases(torch.device("cuda"), False)} == {1.0, 0.9, 0.5}
    attended = 128 + 16 * 128 + 4096
    assert full.nbytes == 8192 * 8 * 128 * 2 + attended * 8 * 128 * 2 * 2 + 2 * 32 * 128 * 2
    assert full.flops == 2 * 8 * 8192 * 128 + 4 * 32 * attended * 128


@needs_kvcore
def test_retrieval_group_cpu_json(tmp_path):
    """`python -m kvcore.bench --group retrieval` on CPU: the committed JSON shape; both timed on
    every case (kvcore also with units reloaded; torch always with every unit resident)."""
    from kvcore.bench.__main__ import main

    result = main(["--group", "retrieval", "--device", "cpu", "--out", str(tmp_path), "--no-plot"])
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(result))
    for key in ("gpu", "torch", "date", "copy_gbps", "gemm_tflops", "rows"):
        assert key in data
    cases = {c.name: c for c in importlib.import_module("kvcore.bench.retrieval").cases(torch.device("cpu"), True)}
    assert {r["case"] for r in data["rows"]} == set(cases)
    assert {r["group"] for r in data["rows"]} == {"retrieval"}
    for r in data["rows"]:
        assert set(r) >= {"group", "impl", "case", "ms", "gbps", "pct_copy", "tflops", "pct_gemm"}
        assert "error" not in r, r
        if r["impl"] == "kvcore-graph":  # CUDA graphs: skipped on the CPU, with the reason
            assert r["ms"] is None and "skipped" in (r["notes"] or ""), r
            continue
        assert r["ms"] > 0 and r["gbps"] > 0 and r["pct_copy"] > 0, r
    assert {r["impl"] for r in data["rows"]} == {"kvcore", "kvcore-graph", "torch"}
    assert any("reloaded" in (r["notes"] or "") for r in data["rows"] if r["impl"] == "kvcore")


# ------------------------------------------------------------------------------------------
# Group "eviction", scoring part: SnapKV window scores (kvcore.bench.eviction_scores)
# ------------------------------------------------------------------------------------------


def test_eviction_scores_cases_count_bytes_and_flops():
    mod = importlib.import_module("kvcore.bench.eviction_scores")
    full = mod.cases(torch.device("cuda"), False)
    # The issue's shape: SnapKV scoring B1 Hq32/Hkv8/D128, w64, S 32768 and 131072.
    assert [(c.batch, c.num_q_heads, c.num_kv_heads, c.head_dim, c.window) for c in full] == [(1, 32, 8, 128, 64)] * 2
    assert [c.seq_len for c in full] == [32768, 131072]
    big = full[1]
    assert big.nbytes == 131072 * 8 * 128 * 2 + 64 * 32 * 128 * 2 + 8 * 131072 * 4
    assert big.flops == 2 * 32 * 64 * 131072 * 128
    assert len({c.name for c in full + mod.cases(torch.device("cpu"), True)}) == 4


@needs_kvcore
def test_eviction_scores_torch_forms_match_reference():
    """The timed torch forms and the lse helper agree with kvcore.reference on a small case."""
    from kvcore import reference

    mod = importlib.import_module("kvcore.bench.eviction_scores")
    case = mod.ScoresCase(2, 8, 2, 64, 200, 12, page_size=8, dtype=torch.float32)
    inputs = mod.make_inputs(case, torch.device("cpu"))
    ref = reference.attention_scores(inputs.q, inputs.k_cache, inputs.block_table, inputs.seq_lens,
                                     reduction="sum", pooling="avg", pool_kernel=5)
    torch.testing.assert_close(mod.torch_scores(inputs).double(), ref, atol=1e-4, rtol=1e-4)
    with_lse = reference.attention_scores(inputs.q, inputs.k_cache, inputs.block_table, inputs.seq_lens,
                                          lse=inputs.lse, reduction="sum", pooling="avg", pool_kernel=5)
    torch.testing.assert_close(with_lse, ref, atol=1e-4, rtol=1e-4)


def test_eviction_scores_tolerance_is_three_percent_of_the_largest_score():
    """runner.check_result with score_tolerance allows 3% of max |ref| whether the scores are small
    (the H100 run's 0.01, where scaling twice had failed a 0.2% error) or above 1."""
    from kvcore.bench.runner import check_result

    mod = importlib.import_module("kvcore.bench.eviction_scores")
    gen = torch.Generator().manual_seed(3)
    for size in (0.0026, 0.01, 1.0, 40.0):
        ref = torch.rand(4, 300, generator=gen) * size
        tol = mod.score_tolerance(ref)
        top = float(ref.abs().max())
        assert check_result(ref + 0.02 * top, ref, tol) is None, size
        assert "max abs error" in check_result(ref + 0.04 * top, ref, tol), size


@needs_kvcore
def test_eviction_scores_group_cpu_rows():
    """The scoring module on CPU: every default implementation timed and checked on every quick
    case, rows in the committed shape (peak_extra_bytes is None off CUDA)."""
    from kvcore.bench.harness import RunContext, Timer

    mod = importlib.import_module("kvcore.bench.eviction_scores")
    device = torch.device("cpu")
    ctx = RunContext(device, Timer(device, warmup_ms=1, rep_ms=5, min_reps=2), 10.0, 1.0, quick=True)
    rows = [r for case in mod.cases(device, True) for r in mod.run(case, mod.impls(device), ctx)]
    assert {r["group"] for r in rows} == {"eviction"}
    assert {r["case"] for r in rows} == {c.name for c in mod.cases(device, True)}
    for r in rows:
        assert set(r) >= {"group", "impl", "case", "ms", "gbps", "pct_copy", "tflops", "pct_gemm"}
        assert "error" not in r, r
        if r["impl"] == "torch-bf16" and "fp32" in r["case"]:
            assert r["ms"] is None and "skipped" in r["notes"]
            continue
        assert r["ms"] > 0 and r["gbps"] > 0, r
        assert "peak_extra_bytes" in r and r["peak_extra_bytes"] is None
    assert {r["impl"] for r in rows} == {"kvcore", "kvcore-lse", "torch", "torch-bf16"}


def test_eviction_group_registered():
    from importlib import util

    spec = util.spec_from_file_location("_bench_init_only", BENCH_DIR / "__init__.py")
    init = util.module_from_spec(spec)
    spec.loader.exec_module(init)
    assert init.GROUPS["eviction"][0] == ".eviction_scores"


def _load_shard_tests():
    """bench/shard_tests.py (the device calls' test dealer), loaded from its file."""
    path = Path(__file__).resolve().parents[1] / "bench" / "shard_tests.py"
    spec = importlib.util.spec_from_file_location("_shard_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shard_tests_deal_every_file_once_and_find_the_subprocess_tests():
    """By file, every test file lands in exactly one group; by test, deal() places every item
    once and evens the groups out; the subprocess tests it finds are test functions of their
    file that call a subprocess helper (directly or through a helper of the file), and include
    the known kernel-switch tests."""
    st = _load_shard_tests()
    root = str(Path(__file__).resolve().parents[1])
    files = st.test_files(root)
    groups = st.shards(4, root)
    dealt = [f for g in groups for f in g]
    assert sorted(dealt) == files and len(set(dealt)) == len(dealt)

    items = [(w, "file" if w % 2 else "node", f"item{i}") for i, w in enumerate([90, 70, 50, 40, 30, 20, 11, 5])]
    parts = st.deal(items, 3)
    names = [n for fs, ns in parts for n in fs + ns]
    assert sorted(names) == sorted(name for _, _, name in items)
    load = [sum(w for w, _, n in items if n in fs + ns) for fs, ns in parts]
    assert max(load) - min(load) <= 90  # no group heavier than the lightest by more than one item

    found = st.subprocess_tests(root)
    assert "tests/test_ops.py::test_gqa_decode_with_tma_loader_in_subprocess" in found
    assert "tests/test_mla.py::test_mla_decode_cuda_wgmma_switch_in_subprocess" in found  # through a helper
    assert "tests/test_token_decoder_variant.py::test_variant_passes_the_token_decoder_cuda_tests_in_subprocess" in found
    for node in found:
        path, func = node.split("::")
        assert (Path(root) / path).read_text().count(f"def {func}(") == 1
        # GPU calls deselect the slow switch re-runs with -k "not in_subprocess"
        assert func.endswith("_in_subprocess"), f"{node} runs tests in a subprocess: name it *_in_subprocess"
