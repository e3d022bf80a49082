"""The ``e2e`` bench group (python -m kvcore.bench --group e2e) on CPU: a tiny random-weight Llama,
one decode step on transformers' sdpa + DynamicCache, on kvcore, and on kvcore with SnapKV."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
kvcore = pytest.importorskip("kvcore")
if not hasattr(kvcore, "gqa_decode"):
    pytest.skip("kvcore is not built (no gqa_decode)", allow_module_level=True)

from kvcore.bench import GROUPS, e2e  # noqa: E402
from kvcore.bench.harness import RunContext, Timer  # noqa: E402

CPU = torch.device("cpu")
ROW_KEYS = {"group", "impl", "case", "ms", "gbps", "pct_copy", "tflops", "pct_gemm"}
EXTRA_KEYS = {"cache_bytes", "cache_pool_bytes", "cache_tokens", "step_peak_bytes", "speedup", "tokens_per_s"}


def _ctx():
    return RunContext(CPU, Timer(CPU, warmup_ms=1.0, rep_ms=5.0, min_reps=3), copy_gbps=10.0, gemm_tflops=0.05)


def test_registered_and_cases_match_the_issue():
    assert GROUPS["e2e"] == ".e2e"
    target, b1 = e2e.cases(torch.device("cuda"), False)
    # Issue 7: Llama-3-8B shape, B8, 32k context, bf16.
    assert (target.layers, target.hidden, target.intermediate, target.vocab) == (32, 4096, 14336, 128256)
    assert (target.num_q_heads, target.num_kv_heads, target.head_dim) == (32, 8, 128)
    assert (target.batch, target.seq_len, target.dtype) == (8, 32768, torch.bfloat16)
    assert (b1.batch, b1.seq_len) == (1, 32768)
    assert e2e.impls(torch.device("cuda")) == ["transformers-sdpa", "kvcore", "kvcore-graph", "kvcore-snapkv2048",
                                               "kvcore-snapkv2048-graph"]
    assert e2e.snapkv_budget("kvcore-snapkv2048") == 2048 and e2e.snapkv_budget("kvcore") is None
    assert e2e.snapkv_budget("kvcore-snapkv2048-graph") == 2048 and e2e.snapkv_budget("kvcore-graph") is None
    assert [e2e.uses_graph(n) for n in ("kvcore", "kvcore-graph", "kvcore-snapkv64", "kvcore-snapkv64-graph")] == [
        False, True, False, True]
    assert set(e2e.impls(CPU)) <= set(e2e.known_impls())
    # Llama-3-8B has 8.03B parameters; a step reads all but the 0.53B embedding table.
    assert target.weight_params + target.vocab * target.hidden == 8_030_261_248
    kv = 8 * 32769 * 32 * 2 * 8 * 128 * 2  # B x (held + new) x layers x K,V x Hkv x D x bf16
    assert target.step_bytes(32768) == target.weight_params * 2 + 8 * 4096 * 2 + kv
    assert target.kv_bytes_per_token() * 8 * 32768 == 32 * 2**30  # the 32 GiB cache of the brief
    (tiny,) = e2e.cases(CPU, True)
    assert (tiny.layers, tiny.hidden, tiny.seq_len) == (2, 64, 256)


def test_model_is_built_on_the_device_in_the_dtype():
    case = e2e.E2ECase(1, 64, layers=2, hidden=64, intermediate=96, num_q_heads=4, num_kv_heads=2, head_dim=16,
                       vocab=100)
    model = e2e.build_model(case, torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "sdpa"


def test_cpu_case_rows():
    (case,) = e2e.cases(CPU, True)
    names = e2e.impls(CPU)
    rows = e2e.run(case, names, _ctx(), steps=3)
    assert [r["impl"] for r in rows] == names
    by = {r["impl"]: r for r in rows}
    for r in rows:
        assert set(r) >= ROW_KEYS | EXTRA_KEYS, r
        assert "error" not in r, r
        assert r["group"] == "e2e" and r["case"] == case.name
        assert r["ms"] > 0 and r["gbps"] > 0 and r["tokens_per_s"] > 0 and r["speedup"] > 0, r
    sdpa, kv, snap = by["transformers-sdpa"], by["kvcore"], by["kvcore-snapkv64"]
    full = case.batch * case.seq_len * case.kv_bytes_per_token()
    assert sdpa["cache_bytes"] == full and sdpa["cache_tokens"] == case.seq_len
    assert kv["cache_bytes"] == full  # 256 tokens fill 16 whole pages
    assert kv["cache_pool_bytes"] >= full and kv["cache_tokens"] == case.seq_len
    assert snap["cache_tokens"] == 64 and snap["cache_bytes"] == full * 64 // case.seq_len
    assert sdpa["speedup"] == 1.0
    assert "rel. error vs sdpa" in kv["notes"] and "SnapKV run on the synthesized" in snap["notes"]


def test_a_wrong_kvcore_step_is_an_error_row(monkeypatch):
    """The sanity check inside the bench: a decode that mixes up sequences gives error rows, no time."""
    from kvcore.integrations import transformers as kvt

    real = kvt.ops.gqa_decode
    monkeypatch.setattr(kvt.ops, "gqa_decode", lambda *a, **k: real(*a, **k).flip(0))
    (case,) = e2e.cases(CPU, True)
    rows = {r["impl"]: r for r in e2e.run(case, e2e.impls(CPU), _ctx(), steps=2)}
    assert rows["transformers-sdpa"]["ms"] > 0
    for name in ("kvcore", "kvcore-snapkv64"):
        assert rows[name]["ms"] is None and "disagrees with transformers-sdpa" in rows[name]["error"], rows[name]


def test_budget_not_below_context_is_skipped():
    case = e2e.E2ECase(1, 48, layers=1, hidden=64, intermediate=96, num_q_heads=4, num_kv_heads=2, head_dim=16,
                       vocab=100, dtype=torch.float32)
    (row,) = e2e.run(case, ["kvcore-snapkv64"], _ctx(), steps=2)
    assert row["ms"] is None and "skipped: budget 64 >= context 48" in row["notes"]


def test_group_cpu_json(tmp_path):
    """`python -m kvcore.bench --group e2e` on CPU writes the committed JSON shape with every row timed."""
    from kvcore.bench.__main__ import main

    result = main(["--group", "e2e", "--device", "cpu", "--out", str(tmp_path), "--no-plot"])
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(result))
    assert {r["impl"] for r in data["rows"]} == set(e2e.impls(CPU))
    for r in data["rows"]:
        assert r["group"] == "e2e" and "error" not in r and r["ms"] > 0, r


def test_graph_rows_skipped_on_cpu():
    (case,) = e2e.cases(CPU, True)
    rows = e2e.run(case, ["kvcore-graph", "kvcore-snapkv64-graph"], _ctx(), steps=2)
    for row in rows:
        assert row["ms"] is None and "skipped: CUDA graphs need a CUDA device" in row["notes"], row


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_rows_on_cuda():
    """The CUDA-graph rows on a tiny bf16 model (D64: a head dim the CUDA decode kernel takes):
    timed, their first replay checked against the sdpa step, captured once while timed."""
    dev = torch.device("cuda")
    case = e2e.E2ECase(2, 256, layers=2, hidden=256, intermediate=512, num_q_heads=4, num_kv_heads=2, head_dim=64,
                       vocab=128)
    ctx = RunContext(dev, Timer(dev, warmup_ms=1.0, rep_ms=5.0, min_reps=3), copy_gbps=1000.0, gemm_tflops=100.0)
    names = ["transformers-sdpa", "kvcore", "kvcore-graph", "kvcore-snapkv64", "kvcore-snapkv64-graph"]
    rows = {r["impl"]: r for r in e2e.run(case, names, ctx, steps=3)}
    for name in names:
        assert "error" not in rows[name] and rows[name]["ms"] > 0, rows[name]
    assert "rel. error vs sdpa" in rows["kvcore-graph"]["notes"]
    assert rows["kvcore-snapkv64-graph"]["cache_tokens"] == 64
    assert rows["kvcore-snapkv64-graph"]["notes"].startswith("DecodeGraph")


def test_pyramidkv_row():
    """``kvcore-pyramidkv<N>`` (not a default row): the policy runs on the synthesized cache, each layer
    keeps its schedule's count; cache_tokens is their mean, cache_bytes each store's own pages."""
    from kvcore.policies import eviction

    (case,) = e2e.cases(CPU, True)
    assert "kvcore-pyramidkv64" in e2e.known_impls() and "kvcore-pyramidkv2048-graph" in e2e.known_impls()
    assert e2e.policy_budget("kvcore-pyramidkv64-graph") == ("pyramidkv", 64) and e2e.uses_graph("kvcore-pyramidkv64-graph")
    assert e2e.policy_budget("kvcore-snapkv64") == ("snapkv", 64) and e2e.snapkv_budget("kvcore-pyramidkv64") is None
    (row,) = e2e.run(case, ["kvcore-pyramidkv64"], _ctx(), steps=2)
    assert "error" not in row and row["ms"] > 0, row
    per_layer = [eviction.pyramidkv_budget(layer, case.layers, case.seq_len, 64, e2e.SNAPKV_WINDOW)
                 for layer in range(case.layers)]
    assert len(set(per_layer)) == case.layers  # the stores hold different counts
    assert row["cache_tokens"] == round(sum(per_layer) / case.layers)
    pages = sum(-(-n // case.page_size) for n in per_layer)
    assert row["cache_bytes"] == case.batch * pages * case.page_size * case.kv_bytes_per_token() // case.layers
    assert "PyramidKV run on the synthesized" in row["notes"] and "tokens held per layer" in row["notes"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pyramidkv_rows_on_cuda():
    dev = torch.device("cuda")
    case = e2e.E2ECase(2, 256, layers=2, hidden=256, intermediate=512, num_q_heads=4, num_kv_heads=2, head_dim=64,
                       vocab=128)
    ctx = RunContext(dev, Timer(dev, warmup_ms=1.0, rep_ms=5.0, min_reps=3), copy_gbps=1000.0, gemm_tflops=100.0)
    names = ["kvcore-pyramidkv64", "kvcore-pyramidkv64-graph"]
    rows = {r["impl"]: r for r in e2e.run(case, names, ctx, steps=3)}
    for name in names:
        assert "error" not in rows[name] and rows[name]["ms"] > 0, rows[name]
    assert rows["kvcore-pyramidkv64"]["cache_bytes"] == rows["kvcore-pyramidkv64-graph"]["cache_bytes"]
    assert rows["kvcore-pyramidkv64-graph"]["notes"].startswith("DecodeGraph")
