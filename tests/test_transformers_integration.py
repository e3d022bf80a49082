"""kvcore.integrations.transformers on tiny random-weight Llama / Mistral / Qwen2 models built here.

Checks: greedy tokens identical to transformers' eager path and logits within tolerance (no
policy); chunked prefill over cached tokens; each policy leaves the budgeted number of tokens per
layer (StreamingLLM: exactly the sinks + recent K/V); CLA shares storage; unsupported
architectures and padded batches are refused.
"""

from __future__ import annotations

import functools

import copy
import types

import pytest
import torch
from conftest import assert_generate_refuses_padding, greedy_generate, prompt_ids, record_check_calls

transformers = pytest.importorskip("transformers")
kvt = pytest.importorskip("kvcore.integrations.transformers")

VOCAB = 96
PROMPT = 24
NEW = 6


def _config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "mistral":
        # A window shorter than the prompt, so both prefill and decode must apply it.
        return transformers.MistralConfig(**common, sliding_window=10)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    raise AssertionError(arch)


def _model(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32, layers: int = 2):
    torch.manual_seed(1234)
    config = _config(arch)
    config.num_hidden_layers = layers
    if torch.device(device).type == "cuda":
        config.head_dim = 64  # the CUDA decode kernels take head dims 64, 128 and 256 (hidden 64 / 4 heads is 16)
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM}[arch]
    return model_cls(config).to(device=device, dtype=dtype).eval()


_prompt = functools.partial(prompt_ids, length=PROMPT, vocab=VOCAB)


_greedy = functools.partial(greedy_generate, new=NEW)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_matches_eager(arch):
    model = _model(arch)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids = _prompt()
    want = _greedy(eager, ids)
    kvt.enable(model)
    got = _greedy(model, ids)
    assert isinstance(model.kvcore_cache, kvt.KVCoreCache)
    assert model.kvcore_cache.cached_tokens() == PROMPT + NEW - 1  # the last token is never fed back
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"logits of step {step}")


def test_teacher_forced_logits(device):
    """kvcore's decode logits equal a no-cache eager forward over the same tokens (CUDA: bf16)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = _model("llama", device, dtype)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids = _prompt(device=device)
    kvt.enable(model)
    got = _greedy(model, ids)
    with torch.no_grad():
        full = eager(got.sequences, use_cache=False).logits
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    for step, logits in enumerate(got.logits):
        torch.testing.assert_close(logits.float(), full[:, PROMPT - 1 + step].float(), **tol)


@pytest.mark.parametrize("mask_elements", [None, 16], ids=["one-sdpa-call", "row-chunks"])
def test_chunked_prefill_matches_one_pass(mask_elements, monkeypatch):
    """Two forward calls on one KVCoreCache (the second runs SDPA over gathered cached tokens);
    with a 16-entry mask budget the windowed SDPA of both calls runs in chunks of query rows."""
    if mask_elements is not None:
        monkeypatch.setattr(kvt, "_SDPA_MASK_ELEMENTS", mask_elements)
    model = _model("mistral")  # the sliding window must also hold across the chunk boundary
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    ids = _prompt()
    kvt.enable(model)
    cache = kvt.KVCoreCache(model.config, max_cache_len=PROMPT, page_size=4)
    with torch.no_grad():
        first = model(ids[:, :14], **cache.forward_kwargs(model), use_cache=True).logits
        second = model(ids[:, 14:], **cache.forward_kwargs(model), use_cache=True).logits
        want = eager(ids, use_cache=False).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), want, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == PROMPT and cache.cached_tokens() == PROMPT


@pytest.mark.parametrize("past,window", [(0, 5), (9, None), (9, 4), (9, 30), (3, 1)])
@pytest.mark.parametrize("mask_elements", [1, 40, 1 << 26])
def test_prefill_sdpa_row_chunks_match_one_masked_softmax(past, window, mask_elements, monkeypatch):
    """The adapter's prefill SDPA (``_sdpa``) over query rows in chunks, each against the keys its
    rows can attend, equals one softmax over the whole causal (and windowed) mask: chunks of one
    row, of a few rows, and a single call."""
    monkeypatch.setattr(kvt, "_SDPA_MASK_ELEMENTS", mask_elements)
    gen = torch.Generator().manual_seed(past * 31 + (window or 0))
    batch, hq, hkv, new, d = 2, 4, 2, 13, 8
    q = torch.randn(batch, hq, new, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, hkv, past + new, d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, hkv, past + new, d + 3, generator=gen, dtype=torch.float64)  # (MLA: V's dim differs)
    got = kvt._sdpa(q, k, v, past, 0.3, window)
    q_pos = torch.arange(past, past + new).view(-1, 1)
    k_pos = torch.arange(past + new).view(1, -1)
    allowed = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window is not None else True)
    logits = torch.einsum("bhtd,bhsd->bhts", q, k.repeat_interleave(hq // hkv, dim=1)) * 0.3
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    want = torch.einsum("bhts,bhsd->bthd", probs, v.repeat_interleave(hq // hkv, dim=1))
    assert got.shape == (batch, new, hq, d + 3)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("past,window", [(0, 100), (300, None), (300, 64)])
def test_prefill_sdpa_row_chunks_cuda_bf16(past, window, monkeypatch):
    """On CUDA in bf16 (SDPA's fused kernels, with the row chunks' key slices as strided views):
    chunks of rows within 4,096 mask entries against a single call of the whole mask."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    batch, hq, hkv, new, d = 2, 8, 2, 200, 64
    q = torch.randn(batch, hq, new, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, hkv, past + new, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, hkv, past + new, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(kvt, "_SDPA_MASK_ELEMENTS", 1 << 30)
    whole = kvt._sdpa(q, k, v, past, 0.125, window)
    monkeypatch.setattr(kvt, "_SDPA_MASK_ELEMENTS", 4096)
    assert kvt._sdpa_chunk_rows(past, new, window) < new
    chunked = kvt._sdpa(q, k, v, past, 0.125, window)
    torch.testing.assert_close(chunked.float(), whole.float(), atol=2e-2, rtol=2e-2)


def test_prefill_sdpa_row_chunk_sizes():
    """How many query rows a masked SDPA call of the adapter takes: the mask stays within
    ``_SDPA_MASK_ELEMENTS`` entries (at least one row), so a 32k-token windowed prefill no longer
    builds a [32k, 32k] mask."""
    budget = kvt._SDPA_MASK_ELEMENTS
    for past, new, window in [(0, 32768, 4096), (0, 32768, 1), (32768, 32768, None), (100, 50, None),
                              (0, 10, 4), (10**9, 3, None)]:
        rows = kvt._sdpa_chunk_rows(past, new, window)
        assert 1 <= rows <= new
        span = past + new if window is None else rows + window - 1
        assert rows == 1 or rows * span <= budget, (past, new, window, rows)
    assert kvt._sdpa_chunk_rows(0, 10, 4) == 10  # small prefills stay one call
    assert kvt._sdpa_chunk_rows(0, 32768, 4096) < 32768


def test_decode_steps_do_not_recheck_the_adapters_own_indices(monkeypatch):
    """The adapter's append and decode calls pass slots and step tables it built itself, so they
    skip the ops' content checks (on a GPU each is a device->host sync, two a layer a step); the
    tokens are the same as with the checks."""
    from kvcore import ops

    ids = _prompt()
    model = _model("llama")
    kvt.enable(model)
    want = _greedy(model, ids)
    calls = record_check_calls(monkeypatch, "_check_block_table_contents", "_check_slots")
    got = _greedy(model, ids)
    assert calls == []
    assert torch.equal(got.sequences, want.sequences)
    # (the patched checks do run where the indices are a caller's)
    paged = model.kvcore_cache.paged
    k = torch.randn(1, paged.num_kv_heads, paged.head_dim)
    ops.append_paged_kv(k, k, *paged.kv(0), torch.tensor([0]))
    assert calls == ["_check_slots"]


@pytest.mark.parametrize("policy", [None, "snapkv", "h2o"])
def test_paired_kv_layout_gives_the_separate_layouts_results(policy):
    """kv_layout="paired" (K and V of a page side by side in one [pages, 2, ...] buffer): a chunked
    prefill (the second chunk gathers the cached tokens), the policy's compaction and the decode
    steps give the tokens and logits of the separate layout."""
    ids = _prompt()

    def run(kv_layout):
        model = _model("llama")
        kwargs = dict(policy=policy, budget=12, window=4) if policy else {}
        kvt.enable(model, page_size=4, kv_layout=kv_layout, **kwargs)
        cache = kvt.KVCoreCache(model.config, max_cache_len=PROMPT, page_size=4, kv_layout=kv_layout)
        with torch.no_grad():
            first = model(ids[:, :14], **cache.forward_kwargs(model), use_cache=True).logits
            second = model(ids[:, 14:], **cache.forward_kwargs(model), use_cache=True).logits
        out = _greedy(model, ids)
        return torch.cat([first, second], dim=1), cache.paged.kv_layout, model.kvcore_cache.paged.kv_layout, out

    want_chunks, *want_layouts, want = run("separate")
    got_chunks, *got_layouts, got = run("paired")
    assert want_layouts == ["separate"] * 2 and got_layouts == ["paired"] * 2
    torch.testing.assert_close(got_chunks, want_chunks, atol=0, rtol=0)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=f"logits of step {step}")


def test_kv_layout_option_is_checked():
    with pytest.raises(ValueError, match="kv_layout must be 'separate' or 'paired'"):
        kvt.enable(_model("llama"), kv_layout="interleaved")
    with pytest.raises(ValueError, match="kv_layout='paired' applies to the K/V page cache"):
        kvt.enable(_model("llama"), "infllm", 64, kv_layout="paired")


@pytest.mark.parametrize("policy", [p for p in kvt.POLICIES if p != "pyramidkv"])  # per-layer budgets: own tests
def test_policy_keeps_budget(policy):
    budget, page = 10, 4
    model = _model("llama", layers=3)
    kvt.enable(model, policy=policy, budget=budget, page_size=page, window=4)
    ids = _prompt()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
    cache = model.kvcore_cache
    assert out.shape == (2, PROMPT + 1)
    assert cache.get_seq_length() == PROMPT  # positions keep counting the evicted tokens
    paged = cache.paged
    for seq_id in cache.seq_ids:
        assert paged.seq_len(seq_id) == budget
        assert len(paged.pages_of(seq_id)) == -(-budget // page)  # the rest went back to the pool
    assert paged.used_pages == 2 * -(-budget // page)
    # Decoding after eviction reads the compacted pages: it continues and the cache grows by one.
    more = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert more.shape == (2, PROMPT + 4)
    assert model.kvcore_cache.cached_tokens() == budget + 3


@pytest.mark.parametrize("policy, kept", [("snapkv", 4), ("pyramidkv", 4), ("corm", 4), ("tova", 1), ("h2o", None),
                                          ("streaming_llm", None), ("knorm", None)])
def test_prefill_keeps_only_the_queries_its_policy_reads(policy, kept):
    """While the prefill's last layer runs, the earlier layers' queries the cache holds for the
    eviction are the trailing ones its policy reads (window 4 here; none for streaming_llm and
    knorm), as copies that do not keep the layers' full query tensors alive; h2o holds each
    earlier layer's scores [B, Hkv, S] instead, taken at that layer."""
    model = _model("llama", layers=3)
    kvt.enable(model, policy=policy, budget=10, page_size=4, window=4)
    seen, scores = {}, {}

    def look(_module, _args, kwargs):
        cache = model.kvcore_cache
        seen.update({store: (None if q is None else tuple(q.shape), None if q is None else q._base is None)
                     for store, q in cache._policy_q.items()})
        scores.update({store: tuple(sc.shape) for store, sc in cache._policy_scores.items()})

    hook = model.model.layers[2].self_attn.register_forward_pre_hook(look, with_kwargs=True)
    try:
        ids = _prompt()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    config = model.config
    if policy == "h2o":
        assert not seen and sorted(scores) == [0, 1]
        assert all(sc[:2] == (2, config.num_key_value_heads) and sc[2] >= PROMPT for sc in scores.values())
    else:
        assert sorted(seen) == [0, 1] and not scores
    for shape, owns_storage in seen.values():
        if kept is None:
            assert shape is None
        else:
            assert shape == (2, config.num_attention_heads, kept, config.hidden_size // config.num_attention_heads)
            assert owns_storage
    assert model.kvcore_cache.cached_tokens() < PROMPT  # the eviction ran on what was kept


def test_streaming_llm_keeps_sinks_and_recent():
    budget, sinks = 12, 4
    model = _model("qwen2")
    ids = _prompt()
    kvt.enable(model)
    full = kvt.KVCoreCache(model.config, max_cache_len=PROMPT)
    kept = kvt.KVCoreCache(model.config, max_cache_len=PROMPT, policy="streaming_llm", budget=budget,
                           policy_kwargs={"num_sinks": sinks})
    with torch.no_grad():
        model(ids, **full.forward_kwargs(model), use_cache=True)
        model(ids, **kept.forward_kwargs(model), use_cache=True)
    positions = list(range(sinks)) + list(range(PROMPT - (budget - sinks), PROMPT))
    for layer in range(model.config.num_hidden_layers):
        for name, index in (("k", 0), ("v", 1)):
            want = _dense(full, layer, index, PROMPT)[:, positions]
            got = _dense(kept, layer, index, budget)
            assert torch.equal(got, want), f"layer {layer} {name}"


def _dense(cache, layer, index, length):
    store = cache.paged.kv(layer)[index]
    rows = []
    for seq_id in cache.seq_ids:
        pages = cache.paged.pages_of(seq_id)
        rows.append(torch.cat([store[p] for p in pages])[:length])
    return torch.stack(rows)  # [B, length, Hkv, D]


def test_cla_shares_storage():
    model = _model("llama", layers=4)
    ids = _prompt()
    kvt.enable(model, layer_to_store=[0, 0, 1, 1])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    shared = model.kvcore_cache
    paged = shared.paged
    assert paged.num_stores == 2
    assert paged.kv(1)[0] is paged.kv(0)[0] and paged.kv(3)[1] is paged.kv(2)[1]
    assert paged.kv(2)[0] is not paged.kv(0)[0]
    kvt.enable(model)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert model.kvcore_cache.cache_bytes() == 2 * shared.cache_bytes()
    assert out.shape == (2, PROMPT + 3)


def test_cla_layer_reads_producer_kv():
    """A sharing layer attends over its producer's K/V: with layer 1's K/V projections scrambled,
    the output is unchanged (they are never used)."""
    model = _model("llama", layers=2)
    ids = _prompt()
    kvt.enable(model, layer_to_store=[0, 0])
    a = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0,
                       output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        attn = model.model.layers[1].self_attn
        attn.k_proj.weight.normal_()
        attn.v_proj.weight.normal_()
    b = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0,
                       output_logits=True, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("layer_to_store", [None, [0, 0, 1, 1]], ids=["own", "cla"])
def test_update_holds_a_layers_states_only_for_its_stores_later_layers(layer_to_store):
    """A step keeps the states a layer passed to ``update`` only while a later layer of the same
    store still has to read them: a prefill does not keep every layer's K/V alive at once."""
    import weakref

    config = _config("llama")
    config.num_hidden_layers = 4
    cache = kvt.KVCoreCache(config, max_cache_len=32, page_size=4, layer_to_store=layer_to_store)
    shape = (2, config.num_key_value_heads, 5, config.hidden_size // config.num_attention_heads)
    gen = torch.Generator().manual_seed(7)
    alive = []
    for layer in range(4):
        k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        got_k, got_v = cache.update(k, v, layer)
        produced = layer_to_store is None or layer in (0, 2)
        want_v = v if produced else alive[-1]()
        assert got_v is want_v  # a sharing layer gets its producer's states
        alive.append(weakref.ref(v))
        del k, v, got_k, got_v, want_v
        if layer_to_store is None:
            assert alive[-1]() is None, f"layer {layer}'s values outlived its update"
        else:
            # each store's producer values (layers 0 and 2) live until its consumer (1, 3) has read them
            assert (alive[0]() is not None) == (layer == 0)
            if layer >= 2:
                assert (alive[2]() is not None) == (layer == 2)
    assert not cache._step_kv


def test_unsupported_architectures_refused():
    deepseek = types.SimpleNamespace(config=transformers.DeepseekV3Config())
    with pytest.raises(ValueError, match="DeepseekV2Attention / DeepseekV3Attention"):  # MLA: no DeepSeek modules
        kvt.enable(deepseek)
    gpt2 = types.SimpleNamespace(config=transformers.GPT2Config())
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        kvt.enable(gpt2)


def test_bad_options_refused():
    model = _model("llama")
    with pytest.raises(ValueError, match="policy must be None or one of"):
        kvt.enable(model, policy="nope", budget=4)
    with pytest.raises(ValueError, match="budget must be an int >= 1"):
        kvt.enable(model, policy="snapkv")
    with pytest.raises(ValueError, match="budget .* needs a policy"):
        kvt.enable(model, budget=8)
    with pytest.raises(ValueError, match="sliding window"):
        kvt.enable(_model("mistral"), policy="snapkv", budget=8)


def test_padding_refused():
    model = _model("llama")
    kvt.enable(model)
    assert_generate_refuses_padding(model, _prompt())


def test_generate_command(capsys):
    from kvcore import generate

    result = generate.run("llama", layers=2, context=40, new_tokens=4, policy="snapkv", budget=16, hidden=64,
                          heads=4, kv_heads=2, vocab=VOCAB, page_size=8, chunk=16, progress=False)
    # Chunked prefill: the policy ran once, after the last chunk, over all 40 prompt tokens.
    assert result["seen_tokens"] == 43 and result["cached_tokens"] == 16 + 3
    assert result["cache_bytes"] < result["cache_bytes_full"]
    assert len(result["tokens"]) == 1 and len(result["tokens"][0]) == 4
    assert generate.main(["--layers", "1", "--context", "24", "--new-tokens", "3", "--hidden", "64", "--heads", "4",
                          "--kv-heads", "1", "--vocab", str(VOCAB), "--chunk", "10"]) == 0
    printed = capsys.readouterr().out
    assert "cache bytes without policy" in printed and "tokens/s" in printed and "tokens[0]: [" in printed
    with pytest.raises(SystemExit):
        generate.main(["--cuda-graph"])  # on the default CPU device: refused by the parser
    assert "--cuda-graph needs a CUDA --device" in capsys.readouterr().err


@pytest.mark.parametrize("context", [33, 34], ids=["last-chunk-1-token", "last-chunk-2-tokens"])
def test_policy_runs_after_a_one_token_last_chunk(context):
    # Chunks of 32: context 33 ends with a 1-token chunk, which (a multi-token step being the
    # prefill's mark) once skipped the eviction for good; both must keep the budget.
    from kvcore import generate

    result = generate.run("llama", layers=2, context=context, new_tokens=3, policy="snapkv", budget=16, hidden=64,
                          heads=4, kv_heads=2, vocab=VOCAB, page_size=8, chunk=32, progress=False)
    assert result["seen_tokens"] == context + 2 and result["cached_tokens"] == 16 + 2


def test_generate_command_refuses_empty_runs(capsys):
    from kvcore import generate

    for flag in ("--context", "--new-tokens", "--chunk"):
        with pytest.raises(SystemExit):
            generate.main([flag, "0"])
        assert f"{flag} must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="new_tokens must be an int >= 1"):
        generate.run("llama", new_tokens=0)


def test_enable_checks_policy_options_up_front():
    model = _model("llama")
    with pytest.raises(ValueError, match=r"num_sinks must be an int in \[0, budget = 2\]"):
        kvt.enable(model, policy="streaming_llm", budget=2)  # the default 4 sinks do not fit
    with pytest.raises(ValueError, match=r"recent must be an int in \[0, budget = 8\]"):
        kvt.enable(model, policy="h2o", budget=8, recent=9)


def test_base_model_runs_on_kvcore_with_its_own_cache():
    # A base model has no generate to wrap: enable() switches its attention, and the caller's
    # KVCoreCache serves prefill and decode, matching the same model on sdpa.
    torch.manual_seed(1234)
    base = transformers.LlamaModel(_config("llama")).eval()
    ids = _prompt()
    with torch.no_grad():
        want = base(ids, use_cache=False).last_hidden_state
        kvt.enable(base)
        assert not hasattr(base, "_kvcore_original_generate")
        cache = kvt.KVCoreCache(base.config, max_cache_len=PROMPT + 1)
        kw = cache.forward_kwargs(base)
        first = base(ids[:, :-1], use_cache=True, **kw).last_hidden_state
        last = base(ids[:, -1:], use_cache=True, **kw).last_hidden_state
    torch.testing.assert_close(torch.cat([first, last], dim=1), want, atol=1e-4, rtol=1e-4)
    kvt.disable(base)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", [None, "snapkv", "pyramidkv"])
def test_generate_command_cuda_graph(policy):
    """The generate command's decode through DecodeGraph gives the eager decode's tokens."""
    from kvcore import generate

    kw = dict(layers=2, context=40, new_tokens=8, policy=policy, budget=16 if policy else None, hidden=256, heads=4,
              kv_heads=2, vocab=VOCAB, page_size=8, chunk=16, dtype="bfloat16", device="cuda", progress=False)
    eager = generate.run("llama", **kw)
    graph = generate.run("llama", **kw, cuda_graph=True)
    assert graph["tokens"] == eager["tokens"]
    assert graph["cached_tokens"] == eager["cached_tokens"] and graph["seen_tokens"] == eager["seen_tokens"]
    assert graph["cached_tokens_per_layer"] == eager["cached_tokens_per_layer"]
    assert graph["cache_bytes"] == eager["cache_bytes"]


def _filled(model, policy=None, budget=None, length=PROMPT, seed=5, batch=2, **policy_kwargs):
    """A KVCoreCache filled through update() alone (no forward) with seeded random K/V per layer
    (contiguous ``[B, Hkv, T, D]``, not the token-major layout a model's roped keys have)."""
    cfg = model.config
    cache = kvt.KVCoreCache(cfg, max_cache_len=length + 4, page_size=4, policy=policy, budget=budget,
                            policy_kwargs=policy_kwargs)
    gen = torch.Generator().manual_seed(seed)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(batch, cfg.num_key_value_heads, length, head_dim, generator=gen)
        v = torch.randn(batch, cfg.num_key_value_heads, length, head_dim, generator=gen)
        cache.update(k, v, layer)
    return cache


def test_update_with_contiguous_states_batch_one():
    """update() of contiguous [1, Hkv, T, D] states (a strided view after the token-major reshape)
    stores them token by token."""
    model = _model("llama")
    gen = torch.Generator().manual_seed(5)
    cfg = model.config
    k = torch.randn(1, cfg.num_key_value_heads, PROMPT, cfg.hidden_size // cfg.num_attention_heads, generator=gen)
    v = torch.randn(k.shape, generator=gen)
    cache = _filled(model, batch=1)
    assert cache.cached_tokens() == PROMPT
    assert torch.equal(_dense(cache, 0, 0, PROMPT), k.transpose(1, 2))
    assert torch.equal(_dense(cache, 0, 1, PROMPT), v.transpose(1, 2))


def test_apply_policy_on_a_filled_cache_matches_snapkv():
    """KVCoreCache.apply_policy (used by the e2e bench on a synthesized prefill state) keeps, per
    layer, exactly what kvcore.policies.eviction.snapkv selects with that layer's queries."""
    from kvcore.policies import eviction

    budget, window = 10, 4
    model = _model("llama", layers=3)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    full = _filled(model)
    kept = _filled(model, "snapkv", budget, window=window)
    assert kept.cached_tokens() == PROMPT and kept.get_seq_length() == PROMPT
    gen = torch.Generator().manual_seed(6)
    queries = [torch.randn(2, cfg.num_attention_heads, 7, head_dim, generator=gen) for _ in range(3)]
    kept.apply_policy(queries)
    assert kept.get_seq_length() == PROMPT  # positions keep counting the evicted tokens
    for seq_id in kept.seq_ids:
        assert kept.paged.seq_len(seq_id) == budget
    block_table = full.paged.block_table(full.seq_ids)
    seq_lens = full.paged.seq_lens(full.seq_ids)
    for layer in range(3):
        k_cache, _ = full.paged.kv(layer)
        q_window = queries[layer][:, :, -window:, :].transpose(1, 2).contiguous()
        idx, counts = eviction.snapkv(q_window, k_cache, block_table, seq_lens, budget, scale=head_dim ** -0.5)
        assert counts.tolist() == [budget, budget]
        for index in (0, 1):
            dense = _dense(full, layer, index, PROMPT)  # [B, S, Hkv, D]
            want = torch.stack([torch.stack([dense[b, idx[b, h], h] for h in range(dense.shape[2])], dim=1)
                                for b in range(2)])
            assert torch.equal(_dense(kept, layer, index, budget), want), f"layer {layer} {'kv'[index]}"
    # A decode step reads the compacted pages and the cache grows by one.
    kvt.enable(model)
    with torch.no_grad():
        logits = model(torch.zeros(2, 1, dtype=torch.long), **kept.forward_kwargs(model), use_cache=True).logits
    assert torch.isfinite(logits).all() and kept.cached_tokens() == budget + 1
    with pytest.raises(ValueError, match="already ran"):
        kept.apply_policy(queries)


def test_apply_policy_refuses_bad_calls():
    model = _model("llama")
    with pytest.raises(ValueError, match="nothing is cached"):
        kvt.KVCoreCache(model.config, max_cache_len=8, policy="snapkv", budget=4).apply_policy([None, None])
    with pytest.raises(ValueError, match="built with a policy"):
        _filled(model).apply_policy()
    cache = _filled(model, "snapkv", 8)
    with pytest.raises(ValueError, match="scores with queries"):
        cache.apply_policy()
    with pytest.raises(ValueError, match="one tensor per layer"):
        cache.apply_policy([torch.randn(2, 4, 3, 16)])
    with pytest.raises(ValueError, match=r"queries\[1\] must be"):
        cache.apply_policy([torch.randn(2, 4, 3, 16), torch.randn(3, 4, 3, 16)])
    streaming = _filled(model, "streaming_llm", 8)
    streaming.apply_policy()  # needs no queries
    assert streaming.cached_tokens() == 8


# ---- DecodeGraph: the decode step captured in a CUDA graph (CPU: the same static-buffer step, eager)


@pytest.mark.parametrize("policy", [None, "snapkv"])
def test_decode_graph_matches_eager_steps(device, policy):
    """DecodeGraph's steps give the logits of the eager decode steps on an identical cache, across
    page boundaries and re-captures (headroom 5 tokens, page 4), with and without eviction."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = _model("llama", device, dtype)
    kvt.enable(model)
    ids = _prompt(device=device)
    budget = 16 if policy else None
    caches = [kvt.KVCoreCache(model.config, max_cache_len=PROMPT + 20, page_size=4, policy=policy, budget=budget)
              for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids, **cache.forward_kwargs(model), use_cache=True)
    eager_cache, graph_cache = caches
    assert eager_cache.cached_tokens() == graph_cache.cached_tokens() == (budget or PROMPT)
    graph = kvt.DecodeGraph(model, graph_cache, headroom=5, capture=device != "cpu")
    token = ids[:, -1:]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    for step in range(12):
        with torch.no_grad():
            want = model(token, **eager_cache.forward_kwargs(model), use_cache=True).logits
        got = graph(token)
        assert got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=f"logits of step {step}")
        token = want[:, -1].argmax(-1, keepdim=True)
    assert graph_cache.get_seq_length() == eager_cache.get_seq_length() == PROMPT + 12
    assert graph_cache.cached_tokens() == eager_cache.cached_tokens()
    if device != "cpu":
        # The table holds the cached tokens + 5, rounded up to whole pages of 4: 8 steps fit
        # (24 -> 32 tokens, or 16 -> 24 after eviction), then one re-capture for the rest.
        assert graph.captures == 2
    for layer in range(model.config.num_hidden_layers):
        n = eager_cache.cached_tokens()
        for index in (0, 1):
            torch.testing.assert_close(_dense(graph_cache, layer, index, n), _dense(eager_cache, layer, index, n),
                                       atol=0, rtol=0)


def test_decode_graph_refuses_bad_use():
    model = _model("llama")
    cache = kvt.KVCoreCache(model.config, max_cache_len=PROMPT + 4, page_size=4)
    with pytest.raises(ValueError, match="enable"):
        kvt.DecodeGraph(model, cache, capture=False)
    kvt.enable(model)
    with pytest.raises(ValueError, match="prefilled"):
        kvt.DecodeGraph(model, cache, capture=False)
    with torch.no_grad():
        model(_prompt(), **cache.forward_kwargs(model), use_cache=True)
    with pytest.raises(ValueError, match="CUDA"):
        kvt.DecodeGraph(model, cache)  # capture=True on a CPU cache
    with pytest.raises(ValueError, match="headroom"):
        kvt.DecodeGraph(model, cache, headroom=0, capture=False)
    with pytest.raises(ValueError, match="KVCoreCache"):
        kvt.DecodeGraph(model, transformers.DynamicCache(), capture=False)
    graph = kvt.DecodeGraph(model, cache, capture=False)
    with pytest.raises(ValueError, match="input_ids"):
        graph(torch.zeros(2, 2, dtype=torch.int64))
    assert cache.get_seq_length() == PROMPT  # a refused call changes nothing


# ---- PyramidKV: per-layer budgets, so each layer's store holds its own number of tokens


def _pyramid_budgets(layers, prompt, budget, window):
    from kvcore.policies import eviction

    return [eviction.pyramidkv_budget(layer, layers, prompt, budget, window) for layer in range(layers)]


def _page_bytes(cache):
    elem = torch.empty((), dtype=cache.paged.dtype).element_size()
    return 2 * cache.page_size * cache.num_kv_heads * cache.head_dim * elem  # K+V of one store's page


def test_pyramidkv_keeps_each_layers_budget():
    """After the prefill each layer's store holds its schedule's budget (layer 0 the most), frees the
    rest of its pages, and cache_bytes counts each store's own pages."""
    budget, window, page, layers = 12, 4, 4, 4
    model = _model("llama", layers=layers)
    kvt.enable(model, policy="pyramidkv", budget=budget, page_size=page, window=window)
    ids = _prompt()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert out.shape == (2, PROMPT + 1)
    cache = model.kvcore_cache
    want = _pyramid_budgets(layers, PROMPT, budget, window)
    assert want == [20, 15, 10, 5]  # the schedule of this case: hi = 16, lo = 1, step 5, + window 4
    assert cache.cached_tokens_per_layer() == want
    assert [cache.cached_tokens(layer) for layer in range(layers)] == want
    assert cache.cached_tokens() == max(want)  # the old call: the largest store's count
    assert cache.get_seq_length() == PROMPT
    paged = cache.paged
    assert paged.stores_split
    pages = [-(-n // page) for n in want]
    for seq_id in cache.seq_ids:
        for store, n in enumerate(want):
            assert paged.seq_len(seq_id, store) == n and len(paged.pages_of(seq_id, store)) == pages[store]
    assert paged.used_pages_per_store() == [2 * p for p in pages]
    assert cache.cache_bytes() == sum(2 * p for p in pages) * _page_bytes(cache)


def test_pyramidkv_kept_sets_match_the_torch_form():
    """apply_policy on a filled cache keeps, per layer, what pyramidkv_torch picks on the same
    queries and keys (and the schedule's count)."""
    from kvcore.policies import torch_forms

    budget, window, layers = 10, 4, 3
    model = _model("llama", layers=layers)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    full = _filled(model)
    kept = _filled(model, "pyramidkv", budget, window=window)
    gen = torch.Generator().manual_seed(6)
    queries = [torch.randn(2, cfg.num_attention_heads, 7, head_dim, generator=gen) for _ in range(layers)]
    kept.apply_policy(queries)
    want = _pyramid_budgets(layers, PROMPT, budget, window)
    assert kept.cached_tokens_per_layer() == want and len(set(want)) == layers
    seq_lens = torch.full((2,), PROMPT, dtype=torch.int32)
    for layer in range(layers):
        keys = _dense(full, layer, 0, PROMPT).permute(0, 2, 1, 3)  # [B, Hkv, S, D]
        q_window = queries[layer][:, :, -window:, :].transpose(1, 2).contiguous()
        idx = torch_forms.pyramidkv_torch(q_window, keys, seq_lens, budget, layer, layers, scale=head_dim ** -0.5)
        for index in (0, 1):
            dense = _dense(full, layer, index, PROMPT)  # [B, S, Hkv, D]
            expect = torch.stack([torch.stack([dense[b, idx[b][h], h] for h in range(dense.shape[2])], dim=1)
                                  for b in range(2)])
            assert expect.shape[1] == want[layer]
            got = _dense_store(kept, layer, index, want[layer])
            assert torch.equal(got, expect), f"layer {layer} {'kv'[index]}"


def _dense_store(cache, layer, index, length):
    """``_dense`` of ``layer``'s store after the stores were split (each has its own pages)."""
    store_id = cache.paged.store_of(layer)
    store = cache.paged.kv(layer)[index]
    rows = [torch.cat([store[p] for p in cache.paged.pages_of(seq_id, store_id)])[:length] for seq_id in cache.seq_ids]
    return torch.stack(rows)  # [B, length, Hkv, D]


def _kept_attention_reference(model, cache):
    """An attention function (registered for the test) that attends, per layer, to that layer's kept
    keys (read densely from the cache's pages once, now) plus the call's own new keys, causally."""
    kept = {layer: (_dense_store(cache, layer, 0, n), _dense_store(cache, layer, 1, n))
            for layer, n in enumerate(cache.cached_tokens_per_layer())}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        k_kept, v_kept = kept[module.layer_idx]  # [B, n, Hkv, D]
        k = torch.cat([k_kept.transpose(1, 2), key], dim=2)
        v = torch.cat([v_kept.transpose(1, 2), value], dim=2)
        groups = query.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        new, total = query.shape[2], k.shape[2]
        mask = torch.arange(total).view(1, -1) <= (total - new + torch.arange(new)).view(-1, 1)
        logits = (query @ k.transpose(-1, -2)) * scaling
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        return (probs @ v).transpose(1, 2).contiguous(), None

    return attention


def test_pyramidkv_decode_matches_dense_attention_over_kept_keys():
    """The steps after eviction (a decode step, then a 3-token step that gathers each store's own
    past) give the logits of a dense torch attention over each layer's kept keys."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    budget, window, layers = 12, 4, 4
    model = _model("llama", layers=layers)
    kvt.enable(model)
    ids = _prompt()
    cache = kvt.KVCoreCache(model.config, max_cache_len=PROMPT + 8, page_size=4, policy="pyramidkv", budget=budget,
                            policy_kwargs={"window": window})
    with torch.no_grad():
        model(ids, **cache.forward_kwargs(model), use_cache=True)
    assert cache.cached_tokens_per_layer() == _pyramid_budgets(layers, PROMPT, budget, window)
    ref_model = copy.deepcopy(model)
    ALL_ATTENTION_FUNCTIONS.register("kvcore_pyramid_ref", _kept_attention_reference(model, cache))
    ALL_MASK_ATTENTION_FUNCTIONS.register("kvcore_pyramid_ref", lambda *a, **k: None)
    ref_model.set_attn_implementation("kvcore_pyramid_ref")
    steps = torch.tensor([[5, 7, 9, 11], [6, 8, 10, 12]])  # one token, then three in one call
    with torch.no_grad():
        got1 = model(steps[:, :1], **cache.forward_kwargs(model), use_cache=True).logits
        got3 = model(steps[:, 1:], **cache.forward_kwargs(model), use_cache=True).logits
        pos = torch.arange(PROMPT, PROMPT + 4).expand(2, -1)
        want = ref_model(steps, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(torch.cat([got1, got3], dim=1), want, atol=1e-4, rtol=1e-4)
    assert cache.cached_tokens_per_layer() == [n + 4 for n in _pyramid_budgets(layers, PROMPT, budget, window)]
    assert cache.get_seq_length() == PROMPT + 4


def test_pyramidkv_decode_graph_matches_eager_steps(device):
    """DecodeGraph on a pyramidkv cache (per-store lengths and tables, [S, B] static buffers) gives
    the eager steps' logits across page boundaries (each store crosses them at its own step) and
    re-captures; the stores end with the same pages' contents."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    budget, window, layers = 12, 4, 4
    model = _model("llama", device, dtype, layers=layers)
    kvt.enable(model)
    ids = _prompt(device=device)
    caches = [kvt.KVCoreCache(model.config, max_cache_len=PROMPT + 20, page_size=4, policy="pyramidkv",
                              budget=budget, policy_kwargs={"window": window}) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            model(ids, **cache.forward_kwargs(model), use_cache=True)
    eager_cache, graph_cache = caches
    start = _pyramid_budgets(layers, PROMPT, budget, window)
    assert eager_cache.cached_tokens_per_layer() == graph_cache.cached_tokens_per_layer() == start
    graph = kvt.DecodeGraph(model, graph_cache, headroom=5, capture=device != "cpu")
    token = ids[:, -1:]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    steps = 12
    for step in range(steps):
        with torch.no_grad():
            want = model(token, **eager_cache.forward_kwargs(model), use_cache=True).logits
        got = graph(token)
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=f"logits of step {step}")
        token = want[:, -1].argmax(-1, keepdim=True)
    assert graph_cache.cached_tokens_per_layer() == eager_cache.cached_tokens_per_layer() == [n + steps for n in start]
    assert graph_cache.cache_bytes() == eager_cache.cache_bytes()
    if device != "cpu":
        # Width: the longest store (20) + 5 -> 7 pages = 28 tokens: 8 steps fit, then one re-capture.
        assert graph.captures == 2
    for layer in range(layers):
        n = eager_cache.cached_tokens(layer)
        for index in (0, 1):
            torch.testing.assert_close(_dense_store(graph_cache, layer, index, n),
                                       _dense_store(eager_cache, layer, index, n), atol=0, rtol=0)


def test_pyramidkv_generate_runs_past_page_boundaries(device):
    """generate() with pyramidkv: several decode steps over page boundaries; a twin cache fed the same
    tokens through DecodeGraph (captured on CUDA) gives generate's logits at every step."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    budget, layers, new = 12, 4, 10
    model = _model("llama", device, dtype, layers=layers)  # (qwen2's config fixes layer_types at 2 layers)
    kvt.enable(model, policy="pyramidkv", budget=budget, page_size=4, window=4)
    ids = _prompt(device=device)
    out = _greedy(model, ids, new=new)
    cache = model.kvcore_cache
    start = _pyramid_budgets(layers, PROMPT, budget, 4)
    assert cache.cached_tokens_per_layer() == [n + new - 1 for n in start]
    twin = kvt.KVCoreCache(model.config, max_cache_len=PROMPT + new, page_size=4, policy="pyramidkv", budget=budget,
                           policy_kwargs={"window": 4})
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    with torch.no_grad():
        first = model(ids, **twin.forward_kwargs(model), use_cache=True).logits[:, -1]
    torch.testing.assert_close(first.float(), out.logits[0].float(), **tol)
    graph = kvt.DecodeGraph(model, twin, headroom=3, capture=device != "cpu")
    for step in range(1, new):  # teacher-forced with generate's tokens
        got = graph(out.sequences[:, PROMPT + step - 1: PROMPT + step])[:, -1]
        torch.testing.assert_close(got.float(), out.logits[step].float(), **tol, msg=f"logits of step {step}")
    assert twin.cached_tokens_per_layer() == cache.cached_tokens_per_layer()
    assert twin.cache_bytes() == cache.cache_bytes()


def test_pyramidkv_with_shared_stores_uses_the_producers_budget():
    """CLA / MLKV: a store's budget is its producer layer's in the schedule over all the model's layers."""
    budget, window, layers = 12, 4, 4
    model = _model("llama", layers=layers)
    kvt.enable(model, policy="pyramidkv", budget=budget, page_size=4, window=window, layer_to_store=[0, 0, 1, 1])
    ids = _prompt()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    cache = model.kvcore_cache
    per_layer = _pyramid_budgets(layers, PROMPT, budget, window)
    want = [per_layer[0] + 2] * 2 + [per_layer[2] + 2] * 2  # producers: layers 0 and 2
    assert cache.cached_tokens_per_layer() == want
    assert cache.cache_bytes() == 2 * (-(-want[0] // 4) + -(-want[2] // 4)) * _page_bytes(cache)


def test_pyramidkv_bad_options_refused():
    with pytest.raises(ValueError, match="budget must be >= 2"):
        kvt.enable(_model("llama"), policy="pyramidkv", budget=1)
    with pytest.raises(ValueError, match=">= 2 layers"):
        kvt.enable(_model("llama", layers=1), policy="pyramidkv", budget=8)
    with pytest.raises(ValueError, match="beta"):
        kvt.enable(_model("llama"), policy="pyramidkv", budget=8, beta=0)
    with pytest.raises(ValueError, match="sliding window"):
        kvt.enable(_model("mistral"), policy="pyramidkv", budget=8)


def test_generate_command_pyramidkv(capsys):
    """python -m kvcore.generate --policy pyramidkv: per-layer counts after a chunked prefill. The
    policy's window is budget - 1 = 15 queries, as in an unchunked prefill: the last chunk has 8,
    the held chunk before it the rest (it was capped at the last chunk's 8 before session 22)."""
    from kvcore import generate

    result = generate.run("llama", layers=2, context=40, new_tokens=4, policy="pyramidkv", budget=16, hidden=64,
                          heads=4, kv_heads=2, vocab=VOCAB, page_size=8, chunk=16, progress=False)
    want = _pyramid_budgets(2, 40, 16, 15)
    assert want == [17, 15]
    assert result["cached_tokens_per_layer"] == [n + 3 for n in want]
    assert result["cached_tokens"] == want[0] + 3 and result["seen_tokens"] == 43
    # batch 1: (3 + 3) pages of K+V, 8 tokens x 2 heads x head dim 16 in fp32 each.
    assert result["cache_bytes"] == (-(-20 // 8) + -(-18 // 8)) * (2 * 8 * 2 * 16 * 4)
    assert generate.main(["--layers", "2", "--context", "40", "--new-tokens", "3", "--hidden", "64", "--heads", "4",
                          "--kv-heads", "2", "--vocab", str(VOCAB), "--chunk", "16", "--policy", "pyramidkv",
                          "--budget", "16"]) == 0
    assert "held per layer: [" in capsys.readouterr().out
