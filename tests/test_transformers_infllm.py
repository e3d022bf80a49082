"""policy="infllm" of kvcore's transformers adapter (kvcore.integrations.transformers_infllm) on a
tiny random-weight Llama (and one Qwen2, MQA) built here.

Checks: with every unit retrieved and resident, greedy generation equals transformers' eager
path and the no-policy adapter (tokens, logits within tolerance); with a small topk, decode steps
across unit boundaries keep sinks + window + at most max_cached_block units on the device and
offload the rest, and the first decode step equals dense attention over exactly the retrieved
tokens; the budget -> parameters mapping; refusals; ``python -m kvcore.generate --policy infllm``.
"""

from __future__ import annotations

import functools

import copy

import pytest
import torch
from conftest import greedy_generate, prompt_ids

transformers = pytest.importorskip("transformers")
kvt = pytest.importorskip("kvcore.integrations.transformers")
kvi = pytest.importorskip("kvcore.integrations.transformers_infllm")

from kvcore import reference as ref  # noqa: E402

VOCAB = 96
PROMPT = 64
NEW = 12
# Units of 8 tokens, whole sink pages (the one-call decode step), a 16-token window, execution
# blocks of 32 (two prefill chunks; the second retrieves units formed by the first). The geometry
# test_retrieval.py runs on CPU and CUDA. A 64-token prompt forms 5 units; 11 tokens fed back 1 more.
GEOM = dict(block_size=8, n_init=8, n_local=16, exc_block_size=32)


def _model(device: str = "cpu", dtype: torch.dtype = torch.float32, layers: int = 2):
    torch.manual_seed(1234)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256)
    if torch.device(device).type == "cuda":
        config.head_dim = 64  # the CUDA decode kernels take head dims 64, 128 and 256
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


_prompt = functools.partial(prompt_ids, length=PROMPT, vocab=VOCAB)


_greedy = functools.partial(greedy_generate, new=NEW)


def test_all_units_retrieved_matches_eager_and_plain_adapter():
    """topk >= units and every unit resident: InfLLM's chunked prefill and retrieval decode attend
    to every token, so generation is the model's own (eager) and the no-policy adapter's."""
    model = _model()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    plain = copy.deepcopy(model)
    ids = _prompt()
    want = _greedy(eager, ids)
    kvt.enable(plain)
    base = _greedy(plain, ids)
    kvt.enable(model, policy="infllm", topk=16, max_cached_block=16, **GEOM)
    got = _greedy(model, ids)
    cache = model.kvcore_cache
    assert isinstance(cache, kvi.InfLLMKVCache)
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.sequences, base.sequences)
    for step, (a, b, c) in enumerate(zip(got.logits, want.logits, base.logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"logits of step {step} vs eager")
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4, msg=f"logits of step {step} vs plain adapter")
    seen = PROMPT + NEW - 1  # the last token is never fed back
    assert cache.get_seq_length() == seen
    for layer in range(model.config.num_hidden_layers):
        rep = cache.memory_report(layer)
        assert rep["seen"] == seen and rep["units"] == (seen - 8 - 16) // 8 == 6  # retrieval really ran
        assert rep["offloaded_units"] == 0 and rep["device_tokens"] == seen


def test_qwen2_all_units_retrieved_matches_eager():
    """Qwen2 (biased q/k/v projections; its sliding_window value is unused without use_sliding_window)."""
    torch.manual_seed(1234)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256)
    model = transformers.Qwen2ForCausalLM(config).eval()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids = _prompt()
    want = _greedy(eager, ids, new=4)
    kvt.enable(model, policy="infllm", topk=16, max_cached_block=16, **GEOM)
    got = _greedy(model, ids, new=4)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert model.kvcore_cache.memory_report(1)["units"] == 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_all_units_retrieved_teacher_forced_cuda():
    """CUDA, bf16: every decode step's logits equal a no-cache eager forward over the same tokens."""
    model = _model("cuda", torch.bfloat16)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids = _prompt(device="cuda")
    kvt.enable(model, policy="infllm", topk=16, max_cached_block=16, **GEOM)
    got = _greedy(model, ids)
    assert model.kvcore_cache.memory_report(1)["units"] == 6
    with torch.no_grad():
        full = eager(got.sequences, use_cache=False).logits
    for step, logits in enumerate(got.logits):
        torch.testing.assert_close(logits.float(), full[:, PROMPT - 1 + step].float(), atol=6e-2, rtol=2e-2,
                                   msg=f"logits of step {step}")


def _dense_layer0(model, tokens):
    """Layer 0's post-RoPE K and V ``[B, S, Hkv, D]`` of ``tokens`` from the plain paged adapter (they
    depend on the tokens only, not on how earlier layers attended)."""
    cache = kvt.KVCoreCache(model.config, max_cache_len=tokens.shape[1], page_size=4)
    with torch.no_grad():
        model(tokens, **cache.forward_kwargs(model), use_cache=True)
    out = []
    for index in (0, 1):
        store = cache.paged.kv(0)[index]
        rows = [torch.cat([store[p] for p in cache.paged.pages_of(s)])[: tokens.shape[1]] for s in cache.seq_ids]
        out.append(torch.stack(rows))
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_small_topk_offloads_and_attends_to_the_selected_units(device):
    """topk 2 of 5-8 units, 3 cached on the device: after each of 26 decode steps (3 units form) every layer holds the
    sinks, the window (n_local .. n_local + block_size - 1 tokens) and at most 3 units on the device,
    all units in the CPU store (the K/V of their tokens); the first decode step of layer 0 equals
    dense attention over the sinks + the top-2 units by the reference unit score + the window."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    model = _model(device, dtype)
    kvt.enable(model)
    ids = _prompt(device=device)
    steps = 26
    cache = kvi.InfLLMKVCache(model.config, max_cache_len=PROMPT + steps, topk=2, max_cached_block=3, **GEOM)
    assert cache.budget == 8 + 16 + 2 * 8
    kwargs = cache.forward_kwargs(model)
    with torch.no_grad():
        logits = model(ids, **kwargs, use_cache=True).logits
    mem = cache.layers_memory[0]
    assert mem.num_units == 5 and mem.misses > 0  # the second prefill chunk loaded units

    seen = {}
    original = mem.decode

    def spy(q, k, v, **kw):
        if not seen:
            seen.update(q=q.clone(), units=mem.num_units, repr=mem.repr_keys[:, : mem.num_units].clone())
            seen["out"] = original(q, k, v, **kw)
            return seen["out"]
        return original(q, k, v, **kw)

    mem.decode = spy
    token = logits[:, -1:].argmax(-1)
    tokens = [token]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(token, **kwargs, use_cache=True).logits
            assert torch.isfinite(logits).all()
            token = logits[:, -1:].argmax(-1)
            tokens.append(token)
            for layer in range(model.config.num_hidden_layers):
                rep = cache.memory_report(layer)
                m = cache.layers_memory[layer]
                assert rep["seen"] == m.length == cache.get_seq_length()
                assert rep["sink_tokens"] == 8 and 16 <= rep["recent_tokens"] < 16 + 8
                assert rep["units"] == (rep["seen"] - 8 - 16) // 8
                assert rep["resident_units"] <= 3 and rep["offloaded_units"] == rep["units"] - rep["resident_units"]
                assert rep["device_tokens"] == 8 + rep["recent_tokens"] + 8 * rep["resident_units"]
    assert cache.get_seq_length() == PROMPT + steps and cache.memory_report(0)["units"] == 8  # 3 units formed
    assert cache.memory_report(0)["offloaded_units"] >= 5

    # The first decode step of layer 0 against dense attention over exactly the selected tokens.
    n = PROMPT  # the step's token position; it attends to positions 0 .. n
    keys, vals = _dense_layer0(model, torch.cat([ids, tokens[0]], dim=1))
    q, units, out = seen["q"], seen["units"], seen["out"]
    hkv, group = 2, 2
    scores = ref.infllm_unit_scores(q, seen["repr"])  # [B, U]: one set of units for all heads
    recent_start = 8 + units * 8
    for b in range(2):
        top = sorted(scores[b].topk(2).indices.tolist())
        pos = torch.tensor(list(range(8)) + [8 + u * 8 + i for u in top for i in range(8)]
                           + list(range(recent_start, n + 1)))
        for h in range(hkv):
            heads = slice(h * group, (h + 1) * group)
            want, _ = ref.dense_attention(q[b, heads], keys[b, pos, h:h + 1], vals[b, pos, h:h + 1], mem.scale)
            torch.testing.assert_close(out[b, heads].double(), want, **tol)
    # The CPU store holds every unit's K/V as the model computed them (the dense run's projections
    # see other matrix shapes, so not bitwise).
    for layer_u in range(units):
        span = slice(8 + layer_u * 8, 16 + layer_u * 8)
        torch.testing.assert_close(mem.store_k[:, layer_u].to(keys.device), keys[:, span], **tol)
        torch.testing.assert_close(mem.store_v[:, layer_u].to(vals.device), vals[:, span], **tol)


def test_budget_maps_to_infllm_parameters():
    full = kvi.infllm_config(6272)  # InfLLM's own configuration
    assert full == dict(n_init=128, n_local=4096, block_size=128, topk=16, repr_topk=4, max_cached_block=32,
                        exc_block_size=512)
    assert kvi.infllm_config(1024) == dict(n_init=16, n_local=752, block_size=16, topk=16, repr_topk=4,
                                           max_cached_block=32, exc_block_size=64)
    assert kvi.infllm_config(100_000)["block_size"] == 128
    small = kvi.infllm_config(40, topk=2, block_size=8, n_init=8)
    assert small["n_local"] == 16 and small["max_cached_block"] == 4
    assert kvi.infllm_config(**GEOM, topk=2)["max_cached_block"] == 4  # n_local without a budget
    model = _model()
    kvt.enable(model, policy="infllm", budget=200, cache_strategy="decay", repr_score="prob")
    ids = _prompt(length=24)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 26)
    cache = model.kvcore_cache
    assert cache.budget == 200 and cache.params["block_size"] == 4 and cache.params["cache_strategy"] == "decay"
    assert cache.layers_memory[0].repr_score == "prob"


def test_refusals():
    model = _model()
    with pytest.raises(ValueError, match="layer_to_store"):
        kvt.enable(model, policy="infllm", budget=512, layer_to_store=[0, 0])
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=10))
    with pytest.raises(ValueError, match="sliding window"):
        kvt.enable(mistral, policy="infllm", budget=512)
    with pytest.raises(ValueError, match="needs budget"):
        kvt.enable(model, policy="infllm")
    with pytest.raises(ValueError, match="too small"):
        kvt.enable(model, policy="infllm", budget=10)
    with pytest.raises(ValueError, match="does not match"):
        kvt.enable(model, policy="infllm", budget=100, **GEOM)
    with pytest.raises(ValueError, match=r"unknown option.*'window'"):
        kvt.enable(model, policy="infllm", budget=512, window=4)
    with pytest.raises(ValueError, match="topk must be an int"):
        kvt.enable(model, policy="infllm", budget=512, topk=0)
    with pytest.raises(ValueError, match="max_cached_block"):
        kvt.enable(model, policy="infllm", budget=512, topk=8, max_cached_block=4)
    with pytest.raises(ValueError, match="repr_topk"):
        kvt.enable(model, policy="infllm", budget=512, block_size=4, repr_topk=5)
    with pytest.raises(ValueError, match="page_size"):
        kvt.enable(model, policy="infllm", budget=512, page_size=8)
    with pytest.raises(ValueError, match="cache_strategy"):
        kvt.enable(model, policy="infllm", budget=512, cache_strategy="fifo")
    with pytest.raises(ValueError, match="policy must be None or one of"):
        kvt.enable(model, policy="infllmx", budget=512)
    # A refused enable leaves the model as it was (no kvcore attention yet), and a context past
    # max_cache_len is refused at the step, not written out of bounds.
    assert model.config._attn_implementation != kvt.ATTN_IMPLEMENTATION
    kvt.enable(model, policy="infllm", budget=512)
    cache = kvi.InfLLMKVCache(model.config, max_cache_len=8, budget=512)
    with pytest.raises(ValueError, match="max_tokens"), torch.no_grad():
        model(_prompt(length=12), **cache.forward_kwargs(model), use_cache=True)
    with pytest.raises(ValueError, match="KVCoreCache"):
        kvt.DecodeGraph(model, cache, capture=False)
    # disable() restores the model.
    kvt.disable(model)
    assert not hasattr(model, "_kvcore_original_generate")


def test_generate_command_infllm(capsys):
    from kvcore import generate

    result = generate.run("llama", layers=2, context=160, new_tokens=4, policy="infllm", budget=98, hidden=64,
                          heads=4, kv_heads=2, vocab=VOCAB, chunk=64, progress=False)
    # budget 98: block 2, n_init 2, topk 16, n_local 64 -> (163 - 2 - 64) // 2 = 48 units, 32 cached
    assert result["seen_tokens"] == 163
    assert 2 + 64 + 32 * 2 <= result["cached_tokens"] < 2 + 66 + 32 * 2
    assert result["host_bytes"] > 0 and len(result["tokens"][0]) == 4
    assert generate.main(["--layers", "1", "--context", "40", "--new-tokens", "3", "--hidden", "64", "--heads", "4",
                          "--kv-heads", "2", "--vocab", str(VOCAB), "--chunk", "16", "--policy", "infllm",
                          "--budget", "60"]) == 0
    printed = capsys.readouterr().out
    assert "policy infllm (budget 60)" in printed and "CPU unit store" in printed and "tokens[0]: [" in printed
    with pytest.raises(ValueError, match="cuda_graph"):
        generate.run("llama", layers=1, context=8, new_tokens=2, policy="infllm", budget=60, hidden=64, heads=4,
                     kv_heads=2, vocab=VOCAB, cuda_graph=True, progress=False)
