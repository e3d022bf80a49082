"""kvcore.integrations.transformers on tiny random-weight DeepSeek-V2/V3 (MLA) models built here.

Checks: greedy tokens identical to transformers' eager path and logits within tolerance (query
LoRA or not, interleaved or half-split RoPE, YaRN with its cos/sin factor and softmax mscale);
teacher-forced logits of a chunked prefill plus decode steps (CPU fp32; CUDA bf16 with DeepSeek's
512 + 64 latent, the widths the CUDA kernels are built for); the cache holds one latent row per
token and layer, equal to what transformers' own DeepSeek modules cache; decode runs kvcore's
absorbed ``mla_decode``; disable() restores the original forward; refusals.

CPU dims: kv_lora_rank 32 + rope 8 (the CPU ops take any width); MoE after one dense layer.
"""

from __future__ import annotations

import functools

import copy
import types

import pytest
import torch
from conftest import assert_generate_refuses_padding, greedy_generate, prompt_ids

from kvcore import ops

transformers = pytest.importorskip("transformers")
kvt = pytest.importorskip("kvcore.integrations.transformers")
kvm = pytest.importorskip("kvcore.integrations.transformers_mla")

VOCAB = 96
PROMPT = 21  # partial last page with page_size 4
NEW = 6

# Tiny, but with every MLA piece: query LoRA, RoPE part, v_head != qk_nope, MoE layer (layer 1).
CPU_DIMS = dict(hidden_size=64, num_attention_heads=4, kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=12)
# CUDA: DeepSeek's latent layout (512 + 64: the kernels' instantiation), small model around it.
CUDA_DIMS = dict(hidden_size=256, num_attention_heads=4, kv_lora_rank=512, q_lora_rank=64, qk_nope_head_dim=32,
                 qk_rope_head_dim=64, v_head_dim=32)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0}


def _config(arch: str, device: str = "cpu", **overrides):
    dims = CUDA_DIMS if torch.device(device).type == "cuda" else CPU_DIMS
    common = dict(vocab_size=VOCAB, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                  num_key_value_heads=dims["num_attention_heads"], n_routed_experts=4, num_experts_per_tok=2,
                  n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=128, **dims)
    common.update(overrides)
    if arch == "deepseek_v2":
        return transformers.DeepseekV2Config(**common)
    if arch == "deepseek_v3":
        return transformers.DeepseekV3Config(n_group=2, topk_group=1, **common)
    raise AssertionError(arch)


def _model(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32, **overrides):
    torch.manual_seed(1234)
    config = _config(arch, device, **overrides)
    cls = transformers.DeepseekV2ForCausalLM if arch == "deepseek_v2" else transformers.DeepseekV3ForCausalLM
    return cls(config).to(device=device, dtype=dtype).eval()


_prompt = functools.partial(prompt_ids, length=PROMPT, vocab=VOCAB)


_greedy = functools.partial(greedy_generate, new=NEW)


def _eager(model):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


CASES = [
    pytest.param("deepseek_v2", {}, id="v2-qlora"),
    pytest.param("deepseek_v2", {"q_lora_rank": None}, id="v2-noqlora"),
    # DeepSeek-V2's own YaRN: mscale == mscale_all_dim (cos/sin factor 1), softmax scale x mscale^2.
    pytest.param("deepseek_v2", {"rope_parameters": {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}},
                 id="v2-yarn"),
    pytest.param("deepseek_v3", {}, id="v3-interleaved"),
    pytest.param("deepseek_v3", {"rope_interleave": False, "q_lora_rank": None}, id="v3-halfsplit-noqlora"),
    # mscale != mscale_all_dim: cos/sin scaled by attention_scaling != 1 as well.
    pytest.param("deepseek_v3", {"rope_parameters": {**YARN, "mscale": 2.0, "mscale_all_dim": 1.0}}, id="v3-yarn"),
]


@pytest.mark.parametrize(("arch", "overrides"), CASES)
def test_greedy_matches_eager(arch, overrides):
    model = _model(arch, **overrides)
    eager = _eager(model)
    ids = _prompt()
    want = _greedy(eager, ids)
    kvt.enable(model)
    got = _greedy(model, ids)
    cache = model.kvcore_cache
    assert isinstance(cache, kvm.KVCoreMLACache)
    assert cache.cached_tokens() == PROMPT + NEW - 1  # the last token is never fed back
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"logits of step {step}")


def test_yarn_case_changes_scale_and_rope():
    """The YaRN cases above exercise both corrections (else they would test nothing beyond default RoPE)."""
    v2 = _model("deepseek_v2", rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})
    v3 = _model("deepseek_v3", rope_parameters={**YARN, "mscale": 2.0, "mscale_all_dim": 1.0})
    qk_head = CPU_DIMS["qk_nope_head_dim"] + CPU_DIMS["qk_rope_head_dim"]
    assert abs(v2.model.layers[0].self_attn.scaling - qk_head**-0.5) > 1e-3
    assert abs(v3.model.rotary_emb.attention_scaling - 1.0) > 1e-3
    assert PROMPT + NEW > YARN["original_max_position_embeddings"]


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_chunked_prefill_and_decode_teacher_forced(device, arch):
    """Two prefill chunks (the second attends over cached latents) and decode steps on one
    KVCoreMLACache give the logits of a no-cache eager forward over the same tokens."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = _model(arch, device, dtype)
    eager = _eager(model)
    ids = _prompt(device=device, length=PROMPT + NEW)
    kvt.enable(model)
    cache = kvm.KVCoreMLACache(model.config, max_cache_len=PROMPT + NEW, page_size=4)
    kw = {**cache.forward_kwargs(model), "use_cache": True}
    with torch.no_grad():
        parts = [model(ids[:, :9], **kw).logits, model(ids[:, 9:PROMPT], **kw).logits]
        for t in range(PROMPT, PROMPT + NEW):
            parts.append(model(ids[:, t : t + 1], **kw).logits)
        want = eager(ids, use_cache=False).logits
    got = torch.cat(parts, dim=1)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    assert cache.get_seq_length() == cache.cached_tokens() == PROMPT + NEW


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_generate_cuda_bf16_logits(arch):
    """generate on CUDA (bf16, latent 512 + 64): each step's logits match a no-cache eager forward
    over the generated sequence (greedy tokens may differ from eager's in bf16, so teacher-forced).
    The 2 x 40-token prefill is past the fused projection's 64 tokens (cuBLAS + epilogue path)."""
    prompt = 40
    model = _model(arch, "cuda", torch.bfloat16)
    eager = _eager(model)
    ids = _prompt(device="cuda", length=prompt)
    kvt.enable(model)
    got = _greedy(model, ids)
    assert model.kvcore_cache.latent.latent(0).is_cuda
    assert model.kvcore_cache.cached_tokens() == prompt + NEW - 1
    with torch.no_grad():
        full = eager(got.sequences, use_cache=False).logits
    for step, logits in enumerate(got.logits):
        torch.testing.assert_close(logits.float(), full[:, prompt - 1 + step].float(), atol=6e-2, rtol=2e-2,
                                   msg=f"logits of step {step}")


def _latent_rows(cache, layer, length):
    latent = cache.latent.latent(layer)
    rows = []
    for seq_id in cache.seq_ids:
        pages = cache.latent.pages_of(seq_id)
        rows.append(torch.cat([latent[p] for p in pages])[:length])
    return torch.stack(rows)  # [B, length, R + P]


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_cache_holds_one_latent_row_per_token_and_layer(arch):
    """The pages hold kv_lora_rank + rope values per token and layer, equal to the latents that
    transformers' own DeepSeek modules put in their DynamicCache; cache_bytes is pages x page bytes."""
    model = _model(arch)
    eager = _eager(model)
    ids = _prompt()
    kvt.enable(model)
    cache = kvm.KVCoreMLACache(model.config, max_cache_len=PROMPT, page_size=4)
    dynamic = transformers.DynamicCache(config=eager.config)
    with torch.no_grad():
        model(ids, **cache.forward_kwargs(model), use_cache=True)
        eager(ids, **{kvt._cache_kwarg(eager): dynamic}, use_cache=True)
    c = model.config
    width = c.kv_lora_rank + c.qk_rope_head_dim
    layers = c.num_hidden_layers
    latent = cache.latent
    assert latent.num_layers == layers
    for layer in range(layers):
        assert latent.latent(layer).shape == (latent.num_pages, 4, width)
    pages = -(-PROMPT // 4)
    assert latent.used_pages == 2 * pages
    assert cache.cache_bytes() == latent.used_pages * 4 * layers * width * 4  # page bytes: 4 tokens x L x width x fp32
    mem = cache.memory_comparison()
    held = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in dynamic.layers)
    assert mem["latent_bytes"] == held  # transformers 5's DynamicCache holds the same latent, unpaged
    assert mem["per_head_kv_bytes"] == 2 * PROMPT * layers * c.num_attention_heads * (
        c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * 4
    half = c.qk_rope_head_dim // 2
    for layer in range(layers):
        rows = _latent_rows(cache, layer, PROMPT)
        c_kv = dynamic.layers[layer].keys[:, 0]   # [B, T, R] normalised c_KV
        k_pe = dynamic.layers[layer].values[:, 0]  # [B, T, P] roped k_pe
        if arch == "deepseek_v3":
            # V3's interleaved RoPE returns the rotated pairs de-interleaved (evens, then odds);
            # kvcore keeps them in place. Same dot products, other column order.
            k_pe = torch.stack([k_pe[..., :half], k_pe[..., half:]], dim=-1).flatten(-2)
        torch.testing.assert_close(rows[..., : c.kv_lora_rank], c_kv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rows[..., c.kv_lora_rank :], k_pe, atol=1e-5, rtol=1e-5)


def test_decode_runs_kvcore_mla_ops(monkeypatch):
    """Every step projects the latents with kvcore.mla_latent_project; every decode step (one new
    token per sequence) attends with kvcore.mla_decode (absorbed form), once per layer."""
    calls = {"mla_decode": 0, "mla_latent_project": 0}
    for name in calls:
        real = getattr(ops, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    model = _model("deepseek_v2")
    kvt.enable(model)
    _greedy(model, _prompt())
    layers = model.config.num_hidden_layers
    assert calls["mla_latent_project"] == layers * NEW  # the prefill and NEW - 1 decode steps
    assert calls["mla_decode"] == layers * (NEW - 1)


def test_disable_restores_original_forward():
    model = _model("deepseek_v3")
    attn = model.model.layers[0].self_attn
    original_generate = model.generate
    assert "forward" not in attn.__dict__
    kvt.enable(model)
    kvt.enable(model)  # twice: patched once
    assert "forward" in attn.__dict__ and model.generate is not original_generate
    kvt.disable(model, attn_implementation="eager")
    assert "forward" not in attn.__dict__ and "_kvcore_mla" not in attn.__dict__
    assert model.generate == original_generate
    assert model.config._attn_implementation == "eager"
    ids = _prompt()
    out = _greedy(model, ids)
    assert isinstance(out.past_key_values, transformers.DynamicCache)
    assert torch.equal(out.sequences, _greedy(_eager(model), ids).sequences)


def test_other_caches_use_the_original_forward():
    """With kvcore enabled, use_cache=False and a DynamicCache run the module's own forward (over
    the kvcore attention function's plain SDPA) and give eager's logits."""
    model = _model("deepseek_v2")
    eager = _eager(model)
    ids = _prompt()
    kvt.enable(model)
    with torch.no_grad():
        want = eager(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids, use_cache=False).logits, want, atol=1e-4, rtol=1e-4)
        dynamic = transformers.DynamicCache(config=model.config)
        kw = {kvt._cache_kwarg(model): dynamic, "use_cache": True}
        first = model(ids[:, :10], **kw).logits
        second = model(ids[:, 10:], **kw).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), want, atol=1e-4, rtol=1e-4)


def test_refusals():
    model = _model("deepseek_v2")
    with pytest.raises(ValueError, match="eviction policies are not supported for MLA"):
        kvt.enable(model, policy="snapkv", budget=8)
    with pytest.raises(ValueError, match="eviction policies are not supported for MLA"):
        kvt.enable(model, budget=8)
    # (infllm went to the InfLLM adapter first and failed later, deep in a shape check)
    with pytest.raises(ValueError, match="eviction policies are not supported for MLA models, nor retrieval"):
        kvt.enable(model, policy="infllm", budget=64)
    with pytest.raises(ValueError, match="layer_to_store .* not supported for MLA"):
        kvt.enable(model, layer_to_store=[0, 0])
    with pytest.raises(ValueError, match="page_size"):
        kvt.enable(model, page_size=0)
    assert "forward" not in model.model.layers[0].self_attn.__dict__  # a refused enable changes nothing
    with pytest.raises(ValueError, match="KVCoreMLACache"):
        kvt.KVCoreCache(model.config, max_cache_len=8)
    # A KVCoreMLACache given to a model that is not enabled: the original forward's update() says so.
    cache = kvm.KVCoreMLACache(model.config, max_cache_len=PROMPT)
    with pytest.raises(NotImplementedError, match="enable"), torch.no_grad():
        model(_prompt(), **cache.forward_kwargs(model), use_cache=True)
    dynamic = _config("deepseek_v3", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported"):
        kvt.check_supported(dynamic)
    with pytest.raises(ValueError, match="rope type 'dynamic' is not supported"):
        kvm.KVCoreMLACache(dynamic, max_cache_len=8)
    with pytest.raises(ValueError, match="attention_bias"):
        kvt.enable(_model("deepseek_v3", attention_bias=True))
    fp8 = _model("deepseek_v2")
    fp8.model.layers[1].self_attn.kv_b_proj.weight.data = fp8.model.layers[1].self_attn.kv_b_proj.weight.data.to(
        torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"layer 1: kv_b_proj.weight must be .* FP8"):
        kvt.enable(fp8)
    assert "forward" not in fp8.model.layers[0].self_attn.__dict__  # checked before patching anything
    # Remote-code DeepSeek modules (trust_remote_code) have another forward: refused by class.
    remote = types.SimpleNamespace(config=_config("deepseek_v3"), modules=lambda: iter([torch.nn.Linear(2, 2)]))
    with pytest.raises(ValueError, match="DeepseekV2Attention / DeepseekV3Attention"):
        kvt.enable(remote)


def test_padding_refused():
    model = _model("deepseek_v3")
    kvt.enable(model)
    assert_generate_refuses_padding(model, _prompt())


def test_mla_config_from_transformers():
    model = _model("deepseek_v3", rope_parameters={**YARN, "mscale": 2.0, "mscale_all_dim": 1.0},
                   rope_interleave=False)
    attn = model.model.layers[0].self_attn
    cfg = kvm.mla_config(model.config, attn)
    assert cfg.kv_lora_rank == 32 and cfg.qk_rope_head_dim == 8 and cfg.latent_dim == 40
    assert cfg.q_lora_rank == 24 and cfg.num_heads == 4 and cfg.v_head_dim == 12
    assert cfg.scale == attn.scaling and not cfg.interleaved_rope
    assert cfg.rms_norm_eps == attn.kv_a_layernorm.variance_epsilon


def test_generate_command_mla(capsys):
    from kvcore import generate

    result = generate.run("deepseek_v2", layers=2, context=20, new_tokens=3, hidden=64, heads=2, vocab=VOCAB,
                          page_size=8, chunk=12, progress=False)
    assert result["seen_tokens"] == 22 and result["cached_tokens"] == 22
    # 2 layers x 576 fp32 values per token; 22 tokens in 3 pages of 8.
    assert result["cache_bytes"] == result["cache_bytes_full"] == 3 * 8 * 2 * 576 * 4
    assert result["latent_bytes"] == 22 * 2 * 576 * 4
    assert result["per_head_kv_bytes"] == 22 * 2 * 2 * (64 + 64 + 64) * 4
    assert len(result["tokens"][0]) == 3
    assert generate.main(["--arch", "deepseek_v3", "--layers", "1", "--context", "12", "--new-tokens", "2",
                          "--hidden", "64", "--heads", "2", "--vocab", str(VOCAB)]) == 0
    printed = capsys.readouterr().out
    assert "kvcore latent pages" in printed and "per-head K and V" in printed and "tokens[0]: [" in printed
    with pytest.raises(SystemExit):
        generate.main(["--arch", "deepseek_v2", "--policy", "snapkv", "--budget", "8"])
    assert "takes neither --policy" in capsys.readouterr().err

