"""The README's Python examples, executed from the README's own text, compute what they say.

Blocks 1-3 (the API, block-sparse decode and Block Transformer examples) run as written: on CUDA
where present, else on the CPU kernels (block 1 picks its device). Blocks 4-6 (the transformers
integration) are snippets that name a `model`; they run here on a tiny random-weight Llama built
by this file. Block 5 captures a CUDA graph and runs on CUDA only.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from conftest import HAS_CUDA, LSE_TOL, NO_CUDA_REASON, OUT_TOL
from kvcore import reference

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_readme_has_the_six_examples_this_file_runs():
    """A new or removed example must come with its check here."""
    assert len(BLOCKS) == 6, [b.splitlines()[0] for b in BLOCKS]
    assert "kvcore.PagedKVCache" in BLOCKS[0] and "block_sparse_decode" in BLOCKS[1]
    assert "KvcoreBlockTransformer" in BLOCKS[2] and 'policy="snapkv"' in BLOCKS[3]
    assert "DecodeGraph" in BLOCKS[4] and 'policy="infllm"' in BLOCKS[5]


def test_api_and_block_sparse_examples_match_the_reference():
    ns: dict = {}
    exec(BLOCKS[0], ns)
    cache, seqs, q = ns["cache"], ns["seqs"], ns["q"]
    assert ns["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    k_cache, v_cache = cache.kv(0)
    assert cache.kv(1)[0] is k_cache  # CLA: layer 1 reads layer 0's store
    table, lens = cache.block_table(seqs), cache.seq_lens(seqs)
    assert lens.tolist() == [100, 37]
    want_out, want_lse = reference.gqa_decode(q, k_cache, v_cache, table, lens)
    torch.testing.assert_close(ns["out"].float(), want_out.float(), **OUT_TOL[torch.bfloat16])
    torch.testing.assert_close(ns["lse"].float(), want_lse.float(), **LSE_TOL)

    exec(BLOCKS[1], ns)
    want_out, want_lse = reference.block_sparse_decode(q, k_cache, v_cache, table, lens, ns["sel_pages"],
                                                       ns["sel_counts"])
    torch.testing.assert_close(ns["out"].float(), want_out.float(), **OUT_TOL[torch.bfloat16])
    torch.testing.assert_close(ns["lse"].float(), want_lse.float(), **LSE_TOL)
    assert (ns["sel_counts"] > 0).all()  # every head attends to its sinks and window at least


def test_block_transformer_example_matches_the_plain_torch_model():
    # The example draws its prompt from torch's global generator (the weights have their own):
    # seeding it first lets the oracle decode the very prompt the example used.
    torch.manual_seed(5)
    ns: dict = {}
    exec(BLOCKS[2], ns)
    from kvcore.block import TorchBlockTransformer

    torch.manual_seed(5)
    prompt = torch.randint(0, 97, (2, 10))
    want = TorchBlockTransformer(ns["w"], compute_dtype=torch.float64).generate(prompt, 16)
    assert ns["new_tokens"].shape == (2, 16)
    assert torch.equal(ns["new_tokens"], want)
    assert ns["model"].cache_report()["context_tokens"] == 10 + 16 - 1  # the last token is not fed back


# ---- the transformers examples (blocks 4-6) on a tiny random-weight Llama --------------------------

transformers = pytest.importorskip("transformers")


def _tiny_llama(device: str = "cpu", dtype: torch.dtype = torch.float32):
    torch.manual_seed(7)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if device == "cuda":
        config.head_dim = 64  # the CUDA decode kernels take head dims 64, 128 and 256
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def test_snapkv_example_runs_and_caches_every_token():
    model = _tiny_llama()
    # Token ids from 1: the example passes no attention mask, and transformers would take the pad
    # id (0 here) for padding, which the adapter refuses.
    input_ids = torch.randint(1, 96, (1, 24), generator=torch.Generator().manual_seed(3))
    ns = {"model": model, "input_ids": input_ids}
    exec(BLOCKS[3], ns)
    out = ns["out"]
    assert out.shape == (1, 24 + 64) and torch.equal(out[:, :24], input_ids)
    # The budget (1024) is above the prompt, so nothing is evicted: the cache holds the prompt and
    # every generated token but the last (never fed back).
    assert model.kvcore_cache.cached_tokens() == 24 + 64 - 1


@pytest.mark.parametrize("line", range(3))
def test_infllm_example_configurations_run(line):
    kvt = pytest.importorskip("kvcore.integrations.transformers")
    model = _tiny_llama()
    ns = {"model": model, "kvt": kvt}
    exec(BLOCKS[5].strip().splitlines()[line], ns)
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(4))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 44) and torch.equal(out[:, :40], ids)
    assert type(model.kvcore_cache).__name__ == "InfLLMKVCache"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_decode_graph_example_runs():
    kvt = pytest.importorskip("kvcore.integrations.transformers")
    model = _tiny_llama("cuda", torch.bfloat16)
    kvt.enable(model)
    prompt = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(6)).cuda()
    ns = {"model": model, "kvt": kvt, "prompt": prompt, "prompt_len": 20}
    exec(BLOCKS[4], ns)
    # Every replay appended its token: the prompt and 255 decoded tokens are cached (equality with
    # the eager step is test_transformers_integration's and test_cuda_graph's business).
    assert ns["cache"].cached_tokens() == 20 + 255
    assert ns["token"].shape == (2, 1) and 0 <= int(ns["token"].min()) and int(ns["token"].max()) < 96
