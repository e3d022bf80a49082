"""Block Transformer: token_decoder_attention against kvcore.reference, its bad inputs, the decode
form through gqa_decode, and the end-to-end model (kvcore.block) against its plain-torch oracle.

Outputs are poisoned (NaN) before every op call; inputs are fresh random normals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

import kvcore
from conftest import HAS_CUDA, LSE_TOL, NO_CUDA_REASON, OUT_TOL, assert_written_and_close, poison, randn
from kvcore import reference
from kvcore.block import BlockTransformerConfig, BlockTransformerWeights, KvcoreBlockTransformer, TorchBlockTransformer
from test_ops import OPCHECK_UTILS, BadCase, _other_device, _set, _set_item, _set_kw

cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]


# ============================================================================================
# token_decoder_attention vs reference
# ============================================================================================


@dataclass(frozen=True)
class TDCase:
    blocks: int
    block_length: int  # L
    prefix: int  # P
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    lens: str = "full"  # "full" (block_lens=None) | "ragged" (0, partial and full blocks) | "given_full"
    with_lse: bool = True
    layout: str = "contiguous"  # "contiguous" | "strided" (q, k, v are block-strided views)
    scale: Optional[float] = None

    def id(self) -> str:
        g = self.num_q_heads // self.num_kv_heads
        parts = [f"N{self.blocks}", f"L{self.block_length}", f"P{self.prefix}", f"Hkv{self.num_kv_heads}g{g}",
                 f"D{self.head_dim}", self.lens]
        if not self.with_lse:
            parts.append("nolse")
        if self.layout != "contiguous":
            parts.append(self.layout)
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        return "-".join(parts)


# The two benchmark shapes (small N), GQA groups 1..16, head dims 64/128/256, P = 0 (the prefix
# rows' own call) and P > L, L = 1, ragged block lengths, block-strided views, and a block larger
# than the CUDA kernel's prefetch stage (its in-step load path) and N large enough for the CUDA
# grid to give every CTA several blocks.
TD_CASES = [
    TDCase(9, 4, 2, 12, 12, 64),
    TDCase(5, 16, 2, 16, 16, 128, lens="ragged"),
    TDCase(7, 8, 1, 8, 2, 64, lens="ragged", layout="strided"),
    TDCase(4, 4, 4, 16, 1, 128, with_lse=False),
    TDCase(3, 2, 0, 6, 3, 256, lens="given_full"),
    TDCase(6, 1, 3, 4, 2, 64, lens="ragged", scale=0.5),
    TDCase(5, 3, 5, 6, 2, 128, lens="ragged", layout="strided", with_lse=False),
    TDCase(3, 32, 4, 8, 2, 128, lens="ragged"),
    TDCase(700, 4, 2, 4, 4, 64, lens="ragged"),
    TDCase(4, 16, 2, 4, 4, 256, lens="ragged", scale=1.0),
    # Paths of the tensor-core CUDA kernel (each also runs on CPU; their index math is emulated in
    # bench/experiments/token_decoder_emulate.py): odd head counts with G 5, so an
    # m-tile of 16 rows ends inside a token's heads; P 0 with a single (head, m-tile) unit (output
    # columns split across warps); L 40 > 16 (three m-tiles and three key tiles of 16); G 4 with
    # L G = 48; the L4 benchmark shape with enough blocks that every CTA's ring of stages wraps
    # several times; a block too large for three stages (the two-stage ring, also wrapping).
    TDCase(5, 5, 3, 15, 3, 64, lens="ragged"),
    TDCase(4, 16, 0, 2, 1, 256, lens="ragged"),
    TDCase(3, 40, 7, 2, 2, 64, lens="ragged", layout="strided"),
    TDCase(2, 12, 2, 8, 2, 128, lens="ragged"),
    TDCase(1600, 4, 2, 12, 12, 64, lens="ragged"),
    TDCase(300, 48, 16, 2, 1, 256, lens="ragged", with_lse=False),
    # Head packing (L G <= 8: several KV heads share an m-tile): 16 virtual keys per head (P + L
    # = 9); L G = 6 in slots of 8 rows with an odd number of heads in the chunk.
    TDCase(4, 2, 7, 12, 3, 64, lens="ragged"),
    TDCase(3, 3, 2, 6, 3, 64, lens="ragged", layout="strided"),
]


def _block_lens(case: TDCase, gen, device) -> Optional[torch.Tensor]:
    if case.lens == "full":
        return None
    if case.lens == "given_full":
        return torch.full((case.blocks,), case.block_length, dtype=torch.int32, device=device)
    lens = torch.randint(0, case.block_length + 1, (case.blocks,), generator=gen, dtype=torch.int32)
    lens[0] = case.block_length
    if case.blocks > 1:
        lens[1] = 0
    if case.blocks > 2 and case.block_length > 1:
        lens[2] = case.block_length - 1
    return lens.to(device)


def _td_inputs(case: TDCase, gen, dtype, device):
    n, l, p, hq, hkv, d = (case.blocks, case.block_length, case.prefix, case.num_q_heads, case.num_kv_heads,
                           case.head_dim)
    if case.layout == "strided":
        # Blocks of a larger allocation: q a slice of [N, L + 1, Hq, D], k/v the halves of [N, 2, P + L, Hkv, D].
        q = randn(n, l + 1, hq, d, gen=gen, dtype=dtype, device=device)[:, 1:]
        kv = randn(n, 2, p + l, hkv, d, gen=gen, dtype=dtype, device=device)
        k, v = kv[:, 0], kv[:, 1]
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous()) or n == 1
    else:
        q = randn(n, l, hq, d, gen=gen, dtype=dtype, device=device)
        k = randn(n, p + l, hkv, d, gen=gen, dtype=dtype, device=device)
        v = randn(n, p + l, hkv, d, gen=gen, dtype=dtype, device=device)
    return q, k, v


def _check_td(out, lse, ref_out, ref_lse, dtype, block_lens):
    assert_written_and_close("token_decoder_attention", out, lse, ref_out, ref_lse, dtype)
    if block_lens is not None:
        # Padding rows: exactly 0 and -inf.
        rows = torch.arange(out.shape[1], device=out.device)[None, :] >= block_lens.long()[:, None]
        assert bool((out[rows] == 0).all())
        if lse is not None:
            assert bool(torch.isneginf(lse[rows]).all())


@pytest.mark.parametrize("case", TD_CASES, ids=TDCase.id)
def test_token_decoder_attention_matches_reference(device, dtype, case, gen):
    q, k, v = _td_inputs(case, gen, dtype, device)
    block_lens = _block_lens(case, gen, device)
    before = (q.clone(), k.clone(), v.clone())
    out = poison(torch.empty(q.shape, dtype=dtype, device=device))
    lse = poison(torch.empty(q.shape[:3], dtype=torch.float32, device=device)) if case.with_lse else None
    result = kvcore.token_decoder_attention(q, k, v, block_lens, scale=case.scale, out=out, lse=lse)
    if case.with_lse:
        assert isinstance(result, tuple) and result[0] is out and result[1] is lse
    else:
        assert result is out
    ref_out, ref_lse = reference.token_decoder_attention(q, k, v, block_lens, scale=case.scale)
    _check_td(out, lse, ref_out, ref_lse, dtype, block_lens)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1]) and torch.equal(v, before[2])


def test_token_decoder_attention_allocates_outputs(device, dtype, gen):
    case = TDCase(3, 4, 2, 4, 2, 64)
    q, k, v = _td_inputs(case, gen, dtype, device)
    out = kvcore.token_decoder_attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == q.shape
    out2, lse = kvcore.token_decoder_attention(q, k, v, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (3, 4, 4)
    ref_out, ref_lse = reference.token_decoder_attention(q, k, v)
    _check_td(out, None, ref_out, ref_lse, dtype, None)
    _check_td(out2, lse, ref_out, ref_lse, dtype, None)


def test_reference_is_masked_dense_attention(gen):
    """The reference equals per-row dense attention over exactly the keys the mask allows."""
    q = randn(2, 3, 4, 16, gen=gen, dtype=torch.float64)
    k = randn(2, 5, 2, 16, gen=gen, dtype=torch.float64)
    v = randn(2, 5, 2, 16, gen=gen, dtype=torch.float64)
    lens = torch.tensor([3, 1], dtype=torch.int32)
    out, lse = reference.token_decoder_attention(q, k, v, lens, scale=0.3)
    assert reference.token_decoder_mask(3, 2).tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]
    for n in range(2):
        for i in range(3):
            if i >= int(lens[n]):
                assert bool((out[n, i] == 0).all()) and bool(torch.isneginf(lse[n, i]).all())
                continue
            o, s = reference.dense_attention(q[n, i], k[n, : 2 + i + 1], v[n, : 2 + i + 1], scale=0.3)
            torch.testing.assert_close(out[n, i].double(), o, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(lse[n, i].double(), s, atol=1e-6, rtol=1e-6)


# ---- the decode form: one token against its block's prefix and tokens so far = gqa_decode ----


def test_token_decoder_decode_is_gqa_decode_on_one_page_per_block(device, dtype, gen):
    """k, v [N, P + L, Hkv, D] *are* a paged cache with page_size P + L and one page per block:
    decoding token i of every block with gqa_decode (seq_len P + i + 1) gives the prefill op's row i."""
    n, l, p, hq, hkv, d = 5, 8, 2, 8, 2, 64
    q = randn(n, l, hq, d, gen=gen, dtype=dtype, device=device)
    k = randn(n, p + l, hkv, d, gen=gen, dtype=dtype, device=device)
    v = randn(n, p + l, hkv, d, gen=gen, dtype=dtype, device=device)
    out, lse = kvcore.token_decoder_attention(q, k, v, return_lse=True)
    block_table = torch.arange(n, dtype=torch.int32, device=device)[:, None]
    for i in range(l):
        seq_lens = torch.full((n,), p + i + 1, dtype=torch.int32, device=device)
        o, s = kvcore.gqa_decode(q[:, i], k, v, block_table, seq_lens, return_lse=True)
        torch.testing.assert_close(o.float(), out[:, i].float(), **OUT_TOL[dtype])
        torch.testing.assert_close(s, lse[:, i], **LSE_TOL)


# ============================================================================================
# opcheck
# ============================================================================================


def test_opcheck_token_decoder_attention(device, gen):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = _td_inputs(TDCase(4, 4, 2, 4, 2, 64), gen, dtype, device)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=device)
    lens = torch.tensor([4, 0, 2, 3], dtype=torch.int32, device=device)
    for block_lens, with_lse in [(None, True), (lens, False), (lens, True)]:
        args = (q, k, v, block_lens, 0.125, out, lse if with_lse else None)
        torch.library.opcheck(torch.ops.kvcore.token_decoder_attention.default, args, test_utils=OPCHECK_UTILS)


# ============================================================================================
# Bad input: the right error, naming the argument, and nothing written
# ============================================================================================


def _td_args(device: str, gen) -> SimpleNamespace:
    # bf16 works on both devices. N 3 blocks, L 4, P 2, Hq 4, Hkv 2, D 64.
    return SimpleNamespace(
        q=randn(3, 4, 4, 64, gen=gen, dtype=torch.bfloat16, device=device),
        k=randn(3, 6, 2, 64, gen=gen, dtype=torch.bfloat16, device=device),
        v=randn(3, 6, 2, 64, gen=gen, dtype=torch.bfloat16, device=device),
        block_lens=torch.tensor([4, 1, 0], dtype=torch.int32, device=device),
        out=poison(torch.empty(3, 4, 4, 64, dtype=torch.bfloat16, device=device)),
        lse=poison(torch.empty(3, 4, 4, dtype=torch.float32, device=device)),
        kw={},
    )


def _both_heads(n: int):
    def mutate(a: SimpleNamespace, device: str) -> None:
        a.q = a.q[:, :, :n].contiguous()
        a.out = a.out[:, :, :n].contiguous()
        a.lse = a.lse[:, :, :n].contiguous()

    return mutate


BAD_TOKEN_DECODER = [
    # dtypes
    BadCase("q_fp64", _set("q", lambda t, a, d: t.double()), RuntimeError, r"\bq must be"),
    BadCase("k_dtype", _set("k", lambda t, a, d: t.half()), RuntimeError, r"\bk must have dtype"),
    BadCase("v_dtype", _set("v", lambda t, a, d: t.half()), RuntimeError, r"\bv must have dtype"),
    BadCase("out_dtype", _set("out", lambda t, a, d: poison(t.float())), RuntimeError, r"\bout must have dtype"),
    BadCase("lse_dtype", _set("lse", lambda t, a, d: poison(t.bfloat16())), RuntimeError, r"\blse must have dtype"),
    BadCase("block_lens_int64", _set("block_lens", lambda t, a, d: t.long()), RuntimeError,
            r"block_lens must have dtype"),
    # ranks and shapes
    BadCase("q_rank", _set("q", lambda t, a, d: t[0]), ValueError, r"\bq must be 4-D"),
    BadCase("k_rank", _set("k", lambda t, a, d: t[0]), RuntimeError, r"\bk must be 4-D"),
    BadCase("block_lens_rank", _set("block_lens", lambda t, a, d: t.view(3, 1)), RuntimeError,
            r"block_lens must be 1-D"),
    BadCase("heads_not_dividing", _both_heads(3), RuntimeError, r"num_q_heads \(3\) must be a multiple of num_kv_heads \(2\)"),
    BadCase("k_fewer_rows_than_block", _set("k", lambda t, a, d: t[:, :3]), RuntimeError, r"\bk must have prefix \+ block_length"),
    BadCase("k_blocks", _set("k", lambda t, a, d: t[:2]), RuntimeError, r"\bk must have blocks"),
    BadCase("v_shape", _set("v", lambda t, a, d: t[:, :5]), RuntimeError, r"\bv must have the shape of k"),
    BadCase("head_dim_mismatch", _set("k", lambda t, a, d: t[..., :32]), RuntimeError, r"head_dim"),
    BadCase("out_shape", _set("out", lambda t, a, d: t[:, :3].contiguous()), RuntimeError, r"\bout must have the shape"),
    BadCase("out_not_contiguous",
            _set("out", lambda t, a, d: poison(torch.empty(3, 4, 4, 128, dtype=t.dtype, device=d))[..., :64]),
            RuntimeError, r"\bout must be contiguous"),
    BadCase("lse_shape", _set("lse", lambda t, a, d: t[:, :, :3].contiguous()), RuntimeError, r"\blse must have shape"),
    BadCase("block_lens_length", _set("block_lens", lambda t, a, d: t[:2].contiguous()), RuntimeError,
            r"block_lens must have shape"),
    BadCase("q_inner_strided", _set("q", lambda t, a, d: torch.repeat_interleave(t, 2, dim=3)[..., ::2]),
            RuntimeError, r"\bq must be densely packed"),
    BadCase("k_inner_strided", _set("k", lambda t, a, d: t.transpose(1, 2).contiguous().transpose(1, 2)),
            RuntimeError, r"\bk must be densely packed"),
    # index contents (validation on)
    BadCase("block_len_past_block", _set_item("block_lens", 1, lambda a: 5), ValueError, r"block_lens\[1\] = 5"),
    BadCase("block_len_negative", _set_item("block_lens", 2, lambda a: -1), ValueError, r"block_lens\[2\] = -1"),
    # scalars
    BadCase("scale_zero", _set_kw("scale", 0.0), ValueError, r"scale"),
    BadCase("scale_nan", _set_kw("scale", math.nan), ValueError, r"scale"),
    BadCase("scale_past_float32", _set_kw("scale", 1e39), ValueError, r"scale must be .*float32's range"),
    # devices
    BadCase("k_other_device", _set("k", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"\bk must be on the same device", cuda_only=True),
    BadCase("block_lens_other_device", _set("block_lens", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"block_lens must be on the same device", cuda_only=True),
    BadCase("out_other_device", _set("out", lambda t, a, d: t.to(_other_device(d))), RuntimeError,
            r"\bout must be on the same device", cuda_only=True),
    BadCase("head_dim_32_on_cuda",
            lambda a, d: (setattr(a, "q", a.q[..., :32].contiguous()), setattr(a, "k", a.k[..., :32].contiguous()),
                          setattr(a, "v", a.v[..., :32].contiguous()), setattr(a, "out", a.out[..., :32].contiguous())),
            RuntimeError, r"head_dim must be 64, 128 or 256", cuda_only=True, kernel_limit=True),
    BadCase("head_dim_zero", lambda a, d: [setattr(a, n, getattr(a, n)[..., :0].contiguous())
                                           for n in ("q", "k", "v", "out")],
            RuntimeError, r"q's head_dim \(last dim\) must be positive, got 0"),
]


@pytest.mark.parametrize("bad", [c.param() for c in BAD_TOKEN_DECODER])
def test_token_decoder_attention_bad_input(device, bad, gen):
    bad.skip_unless_applies(device)
    a = _td_args(device, gen)
    bad.mutate(a, device)
    with pytest.raises(bad.error, match=bad.match):
        kvcore.token_decoder_attention(a.q, a.k, a.v, a.block_lens, out=a.out, lse=a.lse, **a.kw)
    assert bool(torch.isnan(a.out).all()), "out was written by a call that failed"
    assert bool(torch.isnan(a.lse).all()), "lse was written by a call that failed"


@pytest.mark.parametrize("scale", [0.0, -1.0, math.nan, math.inf], ids=["zero", "negative", "nan", "inf"])
def test_token_decoder_attention_op_rejects_bad_scale(device, scale, gen):
    a = _td_args(device, gen)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.kvcore.token_decoder_attention(a.q, a.k, a.v, a.block_lens, scale, a.out, a.lse)
    assert bool(torch.isnan(a.out).all()) and bool(torch.isnan(a.lse).all())


def test_token_decoder_bad_lens_without_validation(device, no_validation, gen):
    """Out-of-range block_lens clamp to [0, L] in the kernel: no error, no out-of-bounds access."""
    a = _td_args(device, gen)
    bad = torch.tensor([10**6, -5, 3], dtype=torch.int32, device=device)
    kvcore.token_decoder_attention(a.q, a.k, a.v, bad, out=a.out, lse=a.lse)
    clamped = torch.tensor([4, 0, 3], dtype=torch.int32, device=device)
    ref_out, ref_lse = reference.token_decoder_attention(a.q, a.k, a.v, clamped)
    _check_td(a.out, a.lse, ref_out, ref_lse, torch.bfloat16, clamped)


def test_token_decoder_nan_with_packed_heads(device, dtype, gen):
    """L4 G1 (the CUDA kernel packs 4 KV heads into one 16-row tile, pairing two heads' keys in a
    P V step): NaN in one head's V element reaches only the rows of that head that attend it;
    NaN K/V past block_lens reach nothing; NaN in a prefix K row poisons that head's valid rows
    (out and lse). tests/test_nan.py covers the unpacked kernel path (L8 G4)."""
    q = randn(3, 4, 4, 64, gen=gen, dtype=dtype, device=device)
    k = randn(3, 6, 4, 64, gen=gen, dtype=dtype, device=device)
    v = randn(3, 6, 4, 64, gen=gen, dtype=dtype, device=device)
    lens = torch.tensor([4, 2, 3], dtype=torch.int32, device=device)
    ref_out, ref_lse = reference.token_decoder_attention(q, k, v, lens)  # NaN-free inputs
    v[0, 2 + 3, 1, 9] = math.nan  # block 0, token 3, KV head 1: element 9 of row 3 of head 1
    k[1, 2 + 2 :, 2] = math.nan  # block 1: tokens past block_lens (2)
    v[1, 2 + 2 :] = math.nan
    k[2, 1, 3, 0] = math.nan  # block 2, prefix slot 1, KV head 3: rows 0..2 of head 3
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(q.shape[:3], dtype=torch.float32, device=device))
    kvcore.token_decoder_attention(q, k, v, lens, out=out, lse=lse)
    nan_lse = torch.zeros(3, 4, 4, dtype=torch.bool, device=device)
    nan_lse[2, :3, 3] = True
    nan_out = nan_lse[..., None].expand(-1, -1, -1, 64).clone()
    nan_out[0, 3, 1, 9] = True
    assert torch.equal(torch.isnan(out), nan_out)
    assert torch.equal(torch.isnan(lse), nan_lse)
    torch.testing.assert_close(out.float()[~nan_out], ref_out[~nan_out], **OUT_TOL[dtype])
    torch.testing.assert_close(lse[~nan_lse], ref_lse[~nan_lse], **LSE_TOL)
    pad = torch.arange(4, device=device)[None, :] >= lens.long()[:, None]
    assert bool((out[pad] == 0).all()) and bool(torch.isneginf(lse[pad]).all())


@pytest.mark.parametrize("head_dim, group", [(65, 1), (24, 3), (128, 2)], ids=["D65g1", "D24g3", "D128g2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_token_decoder_bitwise_at_any_block_position_cpu(dtype, head_dim, group, gen):
    """The CPU kernel takes a KV group's query rows (token, head) 4 at a time; a row's out and lse
    must not depend on which block of 4 it falls in. Token i + 1 with prefix P is token i with
    prefix P + 1 (same q row, same keys), but the rows sit at other places in the blocks. Head dims
    off the vector widths reach the scalar tail of P V, whose GCC-vectorised form once fused only
    some keys' products (session 26's review)."""
    n, l, p, hkv = 3, 9, 2, 2
    hq = hkv * group
    k = randn(n, p + l + 1, hkv, head_dim, gen=gen, dtype=dtype)
    v = randn(n, p + l + 1, hkv, head_dim, gen=gen, dtype=dtype)
    q = randn(n, l + 1, hq, head_dim, gen=gen, dtype=dtype)
    out_a, lse_a = kvcore.token_decoder_attention(q, k, v, out=poison(torch.empty_like(q)),
                                                  lse=poison(torch.empty(n, l + 1, hq)))
    out_b, lse_b = kvcore.token_decoder_attention(q[:, 1:].contiguous(), k, v, out=poison(torch.empty_like(q[:, 1:])),
                                                  lse=poison(torch.empty(n, l, hq)))
    assert torch.equal(out_a[:, 1:], out_b) and torch.equal(lse_a[:, 1:], lse_b)
    ref_out, ref_lse = reference.token_decoder_attention(q, k, v)
    _check_td(out_a, lse_a, ref_out, ref_lse, dtype, None)


# ============================================================================================
# The model: kvcore path == plain-torch path
# ============================================================================================

SMALL = BlockTransformerConfig(vocab_size=97, d_model=64, num_heads=4, num_kv_heads=2, head_dim=64, block_length=4,
                               expansion_ratio=2, block_layers=2, token_layers=2, mlp_hidden=128, max_blocks=16)


def _prompt(batch: int, length: int, seed: int, cfg=SMALL) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 9])
def test_model_prefill_logits_match_torch(prompt_len):
    w = BlockTransformerWeights.random(SMALL, seed=3)
    tokens = _prompt(3, prompt_len, seed=prompt_len)
    ours = KvcoreBlockTransformer(w).prefill(tokens)
    oracle = TorchBlockTransformer(w, compute_dtype=torch.float64).forward(tokens)
    assert ours.shape == (3, prompt_len, SMALL.vocab_size)
    torch.testing.assert_close(ours.double(), oracle, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("expansion_ratio, block_length, groups", [(2, 4, 2), (1, 2, 1), (3, 8, 4)])
def test_model_decode_steps_match_torch(expansion_ratio, block_length, groups):
    """Teacher-forced decode across several block boundaries: every step's logits equal the
    oracle's full recomputation, and the caches hold what cache_report says."""
    cfg = BlockTransformerConfig(vocab_size=50, d_model=8 * block_length, num_heads=2 * groups, num_kv_heads=2,
                                 head_dim=64, block_length=block_length, expansion_ratio=expansion_ratio,
                                 block_layers=2, token_layers=1, mlp_hidden=64, max_blocks=12)
    w = BlockTransformerWeights.random(cfg, seed=block_length)
    model = KvcoreBlockTransformer(w, max_batch=2)
    oracle = TorchBlockTransformer(w, compute_dtype=torch.float64)
    seq = _prompt(2, block_length + 1, seed=7, cfg=cfg)
    model.prefill(seq)
    stream = _prompt(2, 2 * block_length + 2, seed=8, cfg=cfg)
    for t in range(stream.shape[1]):
        logits = model.decode_step(stream[:, t])
        seq = torch.cat([seq, stream[:, t : t + 1]], dim=1)
        torch.testing.assert_close(logits.double(), oracle.forward(seq)[:, -1], atol=1e-4, rtol=1e-4)
        report = model.cache_report()
        t_len = seq.shape[1]
        assert report["context_tokens"] == t_len
        assert report["global_entries"] == 1 + t_len // block_length
        assert report["token_cache_entries"] == expansion_ratio + t_len % block_length
        assert report["token_cache_pages"] == 2  # one page per sequence, whatever the length


def test_model_greedy_generation_matches_torch():
    w = BlockTransformerWeights.random(SMALL, seed=11)
    prompt = _prompt(2, 6, seed=12)
    ours = KvcoreBlockTransformer(w).generate(prompt, 11)
    oracle = TorchBlockTransformer(w, compute_dtype=torch.float64).generate(prompt, 11)
    assert ours.shape == (2, 11)
    assert torch.equal(ours, oracle)


def test_model_cache_report_sizes():
    """The global cache holds one entry per block (block_length times fewer than a token-level
    cache of the same layers); the token decoder only ever holds the current block."""
    cfg = SMALL
    w = BlockTransformerWeights.random(cfg, seed=5)
    model = KvcoreBlockTransformer(w, max_batch=2)
    model.prefill(_prompt(2, 4 * cfg.block_length, seed=6))
    r = model.cache_report()
    entry = 2 * cfg.block_layers * cfg.num_kv_heads * cfg.head_dim * 4  # K+V, fp32, all block layers
    assert r["global_entries"] == 1 + 4  # start + 4 complete blocks
    assert r["global_bytes"] == 5 * entry
    assert r["token_level_entries"] == 16 and r["token_level_bytes"] == 16 * entry
    assert r["block_entries_saving"] == cfg.block_length
    assert r["token_cache_entries"] == cfg.expansion_ratio  # a fresh block: its prefix only
    assert r["token_cache_capacity"] == cfg.expansion_ratio + cfg.block_length
    for _ in range(3 * cfg.block_length + 1):
        model.decode_step(torch.zeros(2, dtype=torch.long))
    r = model.cache_report()
    assert r["context_tokens"] == 7 * cfg.block_length + 1
    assert r["global_entries"] == 1 + 7 and r["block_entries_saving"] == pytest.approx((7 * 4 + 1) / 7)
    assert r["token_cache_entries"] == cfg.expansion_ratio + 1
    assert r["token_cache_pages"] == 2 and model.token_cache.free_pages == 0
    assert r["token_cache_bytes"] <= (cfg.expansion_ratio + cfg.block_length) * 2 * cfg.token_layers * cfg.num_kv_heads * cfg.head_dim * 4


def test_model_bad_arguments():
    with pytest.raises(ValueError, match="d_model"):
        BlockTransformerConfig(d_model=30, block_length=4)
    with pytest.raises(ValueError, match="num_heads"):
        BlockTransformerConfig(num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="expansion_ratio"):
        BlockTransformerConfig(expansion_ratio=0)
    model = KvcoreBlockTransformer(BlockTransformerWeights.random(SMALL), max_batch=2)
    with pytest.raises(RuntimeError, match="prefill"):
        model.decode_step(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):
        model.prefill(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        model.prefill(torch.full((1, 3), SMALL.vocab_size))
    with pytest.raises(ValueError, match="batch"):
        model.prefill(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="max_blocks"):
        model.prefill(torch.zeros(1, SMALL.max_blocks * SMALL.block_length, dtype=torch.long))
    model.prefill(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="ids"):
        model.decode_step(torch.zeros(3, dtype=torch.long))


def test_model_bf16_tracks_fp64_oracle(device):
    """bf16 end to end (on CUDA: the token_decoder_attention and gqa_decode CUDA kernels): prefill
    and decode logits stay within bf16 error of the fp64 oracle along the generated trajectory
    (measured on CPU: <= 0.045 over three seeds; a wrong kernel is off by O(1))."""
    w = BlockTransformerWeights.random(SMALL, seed=21, dtype=torch.bfloat16, device=device)
    model = KvcoreBlockTransformer(w, max_batch=2)
    oracle = TorchBlockTransformer(w.to(device="cpu"), compute_dtype=torch.float64)
    seq = _prompt(2, 7, seed=22)
    logits = model.prefill(seq.to(device))
    torch.testing.assert_close(logits.double().cpu(), oracle.forward(seq), atol=0.15, rtol=0.05)
    for _ in range(2 * SMALL.block_length + 1):
        nxt = logits[:, -1].argmax(-1) if logits.dim() == 3 else logits.argmax(-1)
        logits = model.decode_step(nxt)
        seq = torch.cat([seq, nxt.cpu()[:, None]], dim=1)
        torch.testing.assert_close(logits.double().cpu(), oracle.forward(seq)[:, -1], atol=0.15, rtol=0.05)


# ============================================================================================
# torch.compile and CUDA graphs
# ============================================================================================


def _td_step(q, k, v, block_lens, out, lse):
    kvcore.token_decoder_attention(q, k, v, block_lens, out=out, lse=lse)
    return out.float() * 2.0  # something after the op, so the compiled graph reads its result


def test_token_decoder_attention_compiles_fullgraph(device, gen):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = _td_inputs(TDCase(5, 4, 2, 8, 2, 64), gen, dtype, device)
    lens = torch.tensor([4, 1, 0, 3, 4], dtype=torch.int32, device=device)
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(q.shape[:3], dtype=torch.float32, device=device))
    torch._dynamo.reset()
    result = torch.compile(_td_step, fullgraph=True)(q, k, v, lens, out, lse)
    ref_out, ref_lse = reference.token_decoder_attention(q, k, v, lens)
    torch.testing.assert_close(result / 2.0, ref_out, **OUT_TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_token_decoder_attention_graph_replay(gen):
    """Captured once in a CUDA graph (validation off automatically during capture), replayed with
    new q/k/v contents and new block_lens."""
    case = TDCase(300, 16, 2, 16, 16, 128)
    q, k, v = _td_inputs(case, gen, torch.bfloat16, "cuda")
    lens = torch.full((case.blocks,), case.block_length, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device="cuda")
    kvcore.token_decoder_attention(q, k, v, lens, out=out, lse=lse)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kvcore.token_decoder_attention(q, k, v, lens, out=out, lse=lse)
    for _ in range(2):
        q2, k2, v2 = _td_inputs(case, gen, torch.bfloat16, "cuda")
        q.copy_(q2), k.copy_(k2), v.copy_(v2)
        lens.copy_(torch.randint(0, case.block_length + 1, (case.blocks,), generator=gen, dtype=torch.int32))
        out.fill_(math.nan), lse.fill_(math.nan)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = reference.token_decoder_attention(q, k, v, lens)
        _check_td(out, lse, ref_out, ref_lse, torch.bfloat16, lens)
