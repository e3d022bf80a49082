"""PagedKVCache: page allocation, cross-layer sharing (CLA / MLKV), and decode through the ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import record_check_calls
from kvcore import reference
from kvcore.cache import OutOfPagesError, PagedKVCache


def _ops_unavailable_reason() -> str | None:
    try:
        from kvcore import ops  # noqa: F401

        torch.ops.kvcore.append_paged_kv  # noqa: B018  (raises if the extension is not loaded)
        torch.ops.kvcore.gqa_decode  # noqa: B018
    except (ImportError, AttributeError, RuntimeError) as exc:
        return f"compiled kvcore ops are not importable ({type(exc).__name__}: {exc})"
    return None


_OPS_REASON = _ops_unavailable_reason()
needs_ops = pytest.mark.skipif(_OPS_REASON is not None, reason=_OPS_REASON or "")


def _cache(**kwargs) -> PagedKVCache:
    args = dict(num_layers=4, num_kv_heads=2, head_dim=8, num_pages=8, page_size=4, dtype=torch.float32)
    args.update(kwargs)
    return PagedKVCache(args.pop("num_layers"), args.pop("num_kv_heads"), args.pop("head_dim"), **args)


def _expected_slots(cache: PagedKVCache, seq_id: int, start: int, stop: int) -> list[int]:
    pages = cache.pages_of(seq_id)
    ps = cache.page_size
    return [pages[p // ps] * ps + p % ps for p in range(start, stop)]


def _state(cache: PagedKVCache):
    return (
        cache.free_pages,
        {s: (cache.seq_len(s), cache.pages_of(s)) for s in cache.seq_ids},
    )


# ------------------------------------------------------------------------------ allocation


def test_reserve_allocates_pages_and_returns_slots():
    cache = _cache(page_size=4, num_pages=8)
    a, b = cache.add_sequence(), cache.add_sequence()
    assert a != b and cache.seq_len(a) == 0 and cache.pages_of(a) == []

    slots = cache.reserve([a, b], [6, 3])
    assert slots.dtype == torch.int64 and slots.device == cache.device
    assert cache.seq_len(a) == 6 and cache.seq_len(b) == 3
    assert len(cache.pages_of(a)) == 2 and len(cache.pages_of(b)) == 1
    assert slots.tolist() == _expected_slots(cache, a, 0, 6) + _expected_slots(cache, b, 0, 3)
    assert cache.used_pages == 3 and cache.free_pages == 5

    # Continue a with 3 tokens: 2 fill its last page, the third opens a new page. Order follows
    # seq_ids (b before a here).
    slots = cache.reserve([b, a], [1, 3])
    assert cache.seq_len(a) == 9 and len(cache.pages_of(a)) == 3
    assert slots.tolist() == _expected_slots(cache, b, 3, 4) + _expected_slots(cache, a, 6, 9)
    assert cache.used_pages == 4

    # Every slot handed out so far is distinct and each page belongs to one sequence.
    all_pages = cache.pages_of(a) + cache.pages_of(b)
    assert len(set(all_pages)) == len(all_pages)
    assert all(0 <= p < cache.num_pages for p in all_pages)


def test_reserve_zero_tokens_and_empty_call():
    cache = _cache()
    a = cache.add_sequence()
    slots = cache.reserve([a], [0])
    assert slots.shape == (0,) and slots.dtype == torch.int64
    assert cache.pages_of(a) == [] and cache.used_pages == 0
    assert cache.reserve([], []).shape == (0,)


def test_free_returns_pages_and_they_are_reused():
    cache = _cache(page_size=4, num_pages=6)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.reserve([a, b], [9, 4])  # a: 3 pages, b: 1 page
    a_pages = cache.pages_of(a)
    assert cache.free_pages == 2

    cache.free(a)
    assert cache.free_pages == 5 and cache.used_pages == 1
    assert a not in cache.seq_ids

    c = cache.add_sequence()
    assert c not in (a, b)  # ids are never reused
    cache.reserve([c], [20])  # 5 pages: the 2 never used + a's 3
    assert set(a_pages) <= set(cache.pages_of(c))
    assert cache.free_pages == 0
    assert sorted(cache.pages_of(b) + cache.pages_of(c)) == list(range(6))

    with pytest.raises(KeyError, match="unknown sequence id"):
        cache.free(a)  # double free
    with pytest.raises(KeyError, match="unknown sequence id"):
        cache.free(12345)
    with pytest.raises(KeyError, match="unknown sequence id"):
        cache.reserve([a], [1])
    with pytest.raises(KeyError, match="unknown sequence id"):
        cache.block_table([a])


def test_reserve_out_of_pages_raises_and_changes_nothing():
    cache = _cache(page_size=4, num_pages=5)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.reserve([a, b], [5, 3])  # 2 + 1 pages, 2 free
    before = _state(cache)
    table_before = cache.block_table([a, b]).clone()

    with pytest.raises(OutOfPagesError, match="pages"):
        cache.reserve([a, b], [4, 6])  # a: 9 tokens -> 1 more page, b: 9 -> 2 more; 2 free
    with pytest.raises(RuntimeError):
        cache.reserve([b], [100])
    assert _state(cache) == before
    assert torch.equal(cache.block_table([a, b]), table_before)

    # Exactly what is left still fits, and gives the slots a fresh request would.
    slots = cache.reserve([a, b], [3, 5])  # a: 5+3=8 -> 2 pages (no new), b: 3+5=8 -> 2 pages
    assert slots.tolist() == _expected_slots(cache, a, 5, 8) + _expected_slots(cache, b, 3, 8)
    assert cache.free_pages == 1
    cache.reserve([a], [4])
    assert cache.free_pages == 0
    with pytest.raises(OutOfPagesError):
        cache.reserve([a], [1])


def test_reserve_bad_arguments_change_nothing():
    cache = _cache()
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.reserve([a], [3])
    before = _state(cache)
    with pytest.raises(ValueError, match="num_tokens"):
        cache.reserve([a, b], [1])
    with pytest.raises(ValueError, match=r"num_tokens\[1\]"):
        cache.reserve([a, b], [1, -2])
    with pytest.raises(ValueError, match=r"num_tokens\[0\]"):
        cache.reserve([a], [1.5])
    with pytest.raises(ValueError, match="seq_ids"):
        cache.reserve([a, a], [1, 1])
    with pytest.raises(KeyError, match="unknown sequence id"):
        cache.reserve([a, 99], [1, 1])
    # a bare id or count where the list goes names the argument (not "'int' object is not iterable")
    with pytest.raises(TypeError, match=r"seq_ids must be a sequence with one entry per sequence"):
        cache.reserve(a, [1])
    with pytest.raises(TypeError, match=r"num_tokens must be a sequence with one entry per sequence"):
        cache.reserve([a], 1)
    with pytest.raises(TypeError, match=r"seq_ids must be a sequence"):
        cache.reserve(torch.tensor(a), [1])
    assert _state(cache) == before
    for read in (cache.block_table, cache.seq_lens, cache.block_table_per_store, cache.seq_lens_per_store,
                 cache.held_bytes):
        with pytest.raises(TypeError, match=r"seq_ids must be a sequence"):
            read(a)
    with pytest.raises(TypeError, match=r"seq_ids must be a sequence"):
        cache.decode(0, torch.zeros(1, 4, 16), a)


def test_sequence_ids_accept_integer_likes():
    """Sequence ids (and truncate's new_len) may be any integer-like: numpy integers and the 0-d
    tensors a 1-D integer tensor iterates into; a twin cache driven with plain ints agrees."""
    ints, likes = _cache(num_pages=8, page_size=4), _cache(num_pages=8, page_size=4)
    a, b = ints.add_sequence(), ints.add_sequence()
    assert (likes.add_sequence(), likes.add_sequence()) == (a, b)
    ids = torch.tensor([a, b])  # iterates into 0-d int64 tensors
    assert torch.equal(likes.reserve(ids, [6, 3]), ints.reserve([a, b], [6, 3]))
    assert torch.equal(likes.reserve(np.array([a, b]), [2, 5]), ints.reserve([a, b], [2, 5]))
    assert torch.equal(likes.reserve(ids.flip(0), [1, 1]), ints.reserve([b, a], [1, 1]))
    assert torch.equal(likes.block_table(ids), ints.block_table([a, b]))
    assert torch.equal(likes.seq_lens(ids), ints.seq_lens([a, b]))
    assert torch.equal(likes.block_table_per_store(ids), ints.block_table_per_store([a, b]))
    assert torch.equal(likes.seq_lens_per_store(ids), ints.seq_lens_per_store([a, b]))
    assert likes.held_bytes(ids) == ints.held_bytes([a, b])
    assert likes.seq_len(ids[0]) == ints.seq_len(a) == 9 and likes.pages_of(np.int32(b)) == ints.pages_of(b)
    assert likes.truncate(ids[0], np.int64(5)) == ints.truncate(a, 5) == 1
    assert likes.truncate(np.int64(b), torch.tensor(9)) == ints.truncate(b, 9) == 0
    assert _state(likes) == _state(ints)
    with pytest.raises(ValueError, match="seq_ids must not repeat"):
        likes.reserve(torch.tensor([a, a]), [1, 1])
    for bad in (float(a), True, "0", None):
        with pytest.raises(KeyError, match="unknown sequence id"):
            likes.reserve([bad], [1])
        with pytest.raises(KeyError, match="unknown sequence id"):
            likes.seq_lens([bad])
    for bad in (5.0, np.float64(5.0), True, torch.tensor(5.0)):
        with pytest.raises(ValueError, match=r"new_len must be an int in \[0, 5\]"):
            likes.truncate(a, bad)
    likes.free(ids[0])
    ints.free(a)
    with pytest.raises(KeyError, match="unknown sequence id"):
        likes.free(np.int64(a))  # double free
    assert _state(likes) == _state(ints)


def test_block_table_and_seq_lens():
    cache = _cache(page_size=4, num_pages=8)
    a, b, c = cache.add_sequence(), cache.add_sequence(), cache.add_sequence()
    cache.reserve([a, b], [9, 2])
    table = cache.block_table([a, b, c])
    assert table.dtype == torch.int32 and table.shape == (3, 3) and table.device == cache.device
    assert table[0].tolist() == cache.pages_of(a)
    assert table[1].tolist() == cache.pages_of(b) + [0, 0]
    assert table[2].tolist() == [0, 0, 0]
    lens = cache.seq_lens([c, a, b])
    assert lens.dtype == torch.int32 and lens.tolist() == [0, 9, 2]
    # Only empty sequences: still one column.
    assert cache.block_table([c]).shape == (1, 1)
    assert cache.block_table([b]).shape == (1, 1)


# ------------------------------------------------------------------------ layer sharing


def test_no_sharing_by_default():
    cache = _cache(num_layers=3)
    assert cache.num_stores == 3 and cache.layer_to_store == (0, 1, 2)
    assert all(cache.is_producer(layer) for layer in range(3))
    assert cache.kv(0)[0] is not cache.kv(1)[0]
    assert cache.memory_report()["saving"] == 1.0


def test_cla_share_two():
    cache = _cache(num_layers=4, cla_share=2)
    assert cache.num_stores == 2 and cache.layer_to_store == (0, 0, 1, 1)
    assert [cache.is_producer(layer) for layer in range(4)] == [True, False, True, False]
    assert [cache.producer_of(layer) for layer in range(4)] == [0, 0, 2, 2]
    k0, v0 = cache.kv(0)
    k1, v1 = cache.kv(1)
    assert k0 is k1 and v0 is v1  # really the same storage
    assert cache.kv(2)[0] is not k0 and k0 is not v0
    assert k0.shape == (8, 4, 2, 8) and k0.dtype == torch.float32


def test_cla_share_not_dividing_num_layers():
    cache = _cache(num_layers=5, cla_share=2)
    assert cache.layer_to_store == (0, 0, 1, 1, 2) and cache.num_stores == 3
    assert cache.is_producer(4)


def test_explicit_mlkv_map():
    cache = _cache(num_layers=6, layer_to_store=[0, 0, 0, 1, 1, 2])
    assert cache.num_stores == 3
    assert [cache.producer_of(layer) for layer in range(6)] == [0, 0, 0, 3, 3, 5]
    assert cache.kv(1)[0] is cache.kv(2)[0] is cache.kv(0)[0]
    assert cache.kv(4)[1] is cache.kv(3)[1]
    assert cache.kv(5)[0] is not cache.kv(3)[0]
    # A non-monotone map is fine as long as every store is used; the first layer produces.
    cache = _cache(num_layers=4, layer_to_store=[1, 0, 1, 0])
    assert [cache.producer_of(layer) for layer in range(4)] == [0, 1, 0, 1]


@pytest.mark.parametrize(
    "kwargs,dtype,stores",
    [
        (dict(num_layers=4), torch.float32, 4),
        (dict(num_layers=4, cla_share=2), torch.float32, 2),
        (dict(num_layers=6, cla_share=3), torch.bfloat16, 2),
        (dict(num_layers=6, layer_to_store=[0, 0, 0, 1, 1, 2]), torch.float16, 3),
    ],
)
def test_memory_report(kwargs, dtype, stores):
    cache = _cache(dtype=dtype, **kwargs)
    a = cache.add_sequence()
    cache.reserve([a], [5])
    rep = cache.memory_report()
    elem = torch.empty((), dtype=dtype).element_size()
    layers = kwargs["num_layers"]
    per_store = 2 * cache.num_kv_heads * cache.head_dim * elem
    assert rep["num_layers"] == layers and rep["num_stores"] == stores
    assert rep["page_size"] == 4 and rep["num_pages"] == 8
    assert rep["bytes_per_token"] == stores * per_store
    assert rep["bytes_per_token_one_store_per_layer"] == layers * per_store
    assert rep["saving"] == pytest.approx(layers / stores)
    assert rep["allocated_bytes"] == stores * 2 * 8 * 4 * cache.num_kv_heads * cache.head_dim * elem
    # What the stores really occupy (distinct tensors only).
    distinct = {id(t): t for layer in range(layers) for t in cache.kv(layer)}
    assert rep["allocated_bytes"] == sum(t.numel() * t.element_size() for t in distinct.values())
    assert rep["used_pages"] == 2 and rep["free_pages"] == 6


def test_paired_layout_allocates_the_same_bytes_in_one_buffer_a_store():
    separate = _cache(num_layers=4, cla_share=2)
    paired = _cache(num_layers=4, cla_share=2, kv_layout="paired")
    assert paired.memory_report() == separate.memory_report()
    for layer in range(4):
        k, v = paired.kv(layer)
        assert k.shape == v.shape == separate.kv(layer)[0].shape
        assert k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        assert k.untyped_storage().nbytes() == 2 * k.numel() * k.element_size()
    assert paired.kv(0)[0].untyped_storage().data_ptr() != paired.kv(2)[0].untyped_storage().data_ptr()
    assert repr(paired).endswith(", kv_layout=paired)") and "kv_layout" not in repr(separate)


def test_sharing_allocates_fewer_bytes():
    plain = _cache(num_layers=8).memory_report()
    shared = _cache(num_layers=8, cla_share=2).memory_report()
    mlkv = _cache(num_layers=8, layer_to_store=[0, 0, 0, 0, 1, 1, 1, 1]).memory_report()
    assert shared["allocated_bytes"] * 2 == plain["allocated_bytes"]
    assert mlkv["allocated_bytes"] * 4 == plain["allocated_bytes"]
    assert mlkv["saving"] == 4.0


def test_non_producer_append_raises_naming_the_producer():
    cache = _cache(num_layers=4, cla_share=2)
    a = cache.add_sequence()
    slots = cache.reserve([a], [2])
    k = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="producer layer 2"):
        cache.append(3, k, k, slots)
    with pytest.raises(ValueError, match="producer layer 0"):
        cache.append(1, k, k, slots)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(num_layers=0), "num_layers"),
        (dict(num_kv_heads=0), "num_kv_heads"),
        (dict(head_dim=-1), "head_dim"),
        (dict(num_pages=0), "num_pages"),
        (dict(page_size=0), "page_size"),
        (dict(page_size=2.5), "page_size"),
        (dict(cla_share=0), "cla_share"),
        (dict(dtype=torch.int32), "dtype"),
        (dict(device="not-a-device"), "device"),
        (dict(cla_share=2, layer_to_store=[0, 0, 1, 1]), "cla_share"),
        (dict(layer_to_store=[0, 0, 1]), "layer_to_store"),
        (dict(layer_to_store=[0, 0, 2, 2]), "layer_to_store"),
        (dict(layer_to_store=[0, -1, 0, 1]), "layer_to_store"),
        (dict(layer_to_store=[0, 1, "a", 1]), "layer_to_store"),
        (dict(kv_layout="interleaved"), "kv_layout"),
    ],
)
def test_constructor_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        _cache(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn, torch.int32, "bfloat16"])
def test_constructor_rejects_dtypes_no_op_supports(dtype):
    with pytest.raises(ValueError, match=r"dtype must be bfloat16, float16 or float32, got"):
        _cache(dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constructor_rejects_float32_on_cuda(dtype):
    # Checked before any memory is allocated, so this runs without a GPU too.
    with pytest.raises(ValueError, match=r"dtype must be bfloat16 or float16 on CUDA \(float32 is CPU-only"):
        _cache(dtype=dtype, device="cuda")


def test_layer_bad_arguments():
    cache = _cache(num_layers=2)
    a = cache.add_sequence()
    slots = cache.reserve([a], [2])
    k = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(0))
    for bad in (-1, 2, 1.0, None):
        with pytest.raises(ValueError, match="layer"):
            cache.kv(bad)
    with pytest.raises(ValueError, match="layer"):
        cache.append(5, k, k, slots)
    with pytest.raises(ValueError, match="k must be"):
        cache.append(0, k[:, :1], k, slots)
    with pytest.raises(ValueError, match="v must be"):
        cache.append(0, k, k[..., :4], slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        cache.append(0, k, k, slots[:1])
    with pytest.raises(ValueError, match="q must be"):
        cache.decode(0, torch.randn(2, 4, 8), [a])


def test_repr():
    cache = _cache(num_layers=4, cla_share=2)
    text = repr(cache)
    assert text.startswith("PagedKVCache(") and "stores=2" in text and "layers=4" in text


# --------------------------------------------------------------- end to end through the ops


# device / dtype come from tests/conftest.py: cpu with fp32/bf16/fp16, cuda (skipped without a
# GPU) with bf16/fp16.
@needs_ops
@pytest.mark.parametrize("kv_layout", ["separate", "paired"])
def test_end_to_end_ragged_decode_matches_reference(device, dtype, kv_layout):
    gen = torch.Generator().manual_seed(1234)
    num_layers, num_q_heads, num_kv_heads, head_dim, page_size = 4, 8, 2, 64, 16
    cache = PagedKVCache(
        num_layers, num_kv_heads, head_dim, num_pages=24, page_size=page_size, dtype=dtype,
        device=device, cla_share=2, kv_layout=kv_layout,
    )
    k0, v0 = cache.kv(0)
    assert k0.is_contiguous() == (kv_layout == "separate")
    if kv_layout == "paired":  # one buffer a store: a page's V right after its K
        assert v0.data_ptr() - k0.data_ptr() == page_size * num_kv_heads * head_dim * k0.element_size()
        assert k0.stride(0) == v0.stride(0) == 2 * page_size * num_kv_heads * head_dim
    producers = [layer for layer in range(num_layers) if cache.is_producer(layer)]
    assert producers == [0, 2]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    # Mirror of what each store should hold: per store, per sequence, contiguous K/V.
    mirror: dict[int, dict[int, list[torch.Tensor]]] = {}
    seqs = [cache.add_sequence() for _ in range(3)]
    for s in seqs:
        mirror[s] = {layer: [] for layer in producers}

    # Step 0 is a ragged prefill (one sequence still empty); later steps decode one token per
    # sequence, with extra tokens for some; mid-way a sequence is freed and a new one reuses its
    # pages (stale KV in those pages must never be read).
    schedule = [[5, 37, 0], [1, 1, 1], [1, 17, 16], "swap", [3, 1, 1], [1, 1, 1]]
    for step in schedule:
        if step == "swap":
            cache.free(seqs[0])
            del mirror[seqs[0]]
            seqs[0] = cache.add_sequence()
            mirror[seqs[0]] = {layer: [] for layer in producers}
            continue
        slots = cache.reserve(seqs, step)
        for layer in producers:
            k = rand(sum(step), num_kv_heads, head_dim)
            v = rand(sum(step), num_kv_heads, head_dim)
            k_cache, v_cache = cache.kv(layer)
            want_k, want_v = reference.append_paged_kv(k, v, k_cache, v_cache, slots)
            cache.append(layer, k, v, slots)
            torch.testing.assert_close(k_cache, want_k, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(v_cache, want_v, rtol=0, atol=0, equal_nan=True)
            offset = 0
            for s, n in zip(seqs, step):
                mirror[s][layer].append(torch.stack([k[offset : offset + n], v[offset : offset + n]]))
                offset += n

        bt, lens = cache.block_table(seqs), cache.seq_lens(seqs)
        assert lens.tolist() == [sum(kv.shape[1] for kv in mirror[s][0]) for s in seqs]
        tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
        for layer in range(num_layers):
            q = rand(len(seqs), num_q_heads, head_dim)
            # Odd layers also exercise the window / soft cap / scale arguments.
            kwargs = {"window_left": 7, "logit_soft_cap": 5.0, "scale": 0.1} if layer % 2 else {}
            out, lse = cache.decode(layer, q, seqs, return_lse=True, **kwargs)
            assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:2]
            want_out, want_lse = reference.gqa_decode(q, *cache.kv(layer), bt, lens, **kwargs)
            torch.testing.assert_close(out.float(), want_out, **tol)
            torch.testing.assert_close(lse, want_lse, rtol=1e-3, atol=1e-3)
            if kwargs:
                continue
            # Independent of paging: dense attention over the mirrored contiguous KV of the
            # producer layer (a shared layer reads exactly its producer's KV).
            for row, s in enumerate(seqs):
                kv = torch.cat(mirror[s][cache.producer_of(layer)], dim=1)
                want, want_s = reference.dense_attention(q[row], kv[0], kv[1])
                torch.testing.assert_close(out[row].double(), want, **tol)
                torch.testing.assert_close(lse[row].double(), want_s, rtol=1e-3, atol=1e-3)


@needs_ops
def test_trusted_indices_skip_validation_in_this_thread_only():
    """ops._trusted_indices(): validation off for this thread inside (nested too), as before after."""
    import threading

    from kvcore import ops

    assert ops.validation_enabled()
    seen = []
    with ops._trusted_indices():
        assert not ops.validation_enabled()
        with ops._trusted_indices():
            assert not ops.validation_enabled()
        assert not ops.validation_enabled()
        other = threading.Thread(target=lambda: seen.append(ops.validation_enabled()))
        other.start()
        other.join()
    assert seen == [True] and ops.validation_enabled()
    with pytest.raises(RuntimeError):
        with ops._trusted_indices():
            raise RuntimeError("inside")
    assert ops.validation_enabled()


@needs_ops
def test_decode_does_not_recheck_its_own_table(monkeypatch):
    """PagedKVCache.decode builds the block table and lengths from its allocator, so it skips the
    content checks (a device->host sync each on a GPU); a direct gqa_decode call still runs them."""
    from kvcore import ops

    cache = _cache(num_layers=1)
    seqs = [cache.add_sequence() for _ in range(2)]
    slots = cache.reserve(seqs, [5, 9])
    gen = torch.Generator().manual_seed(5)
    kv = torch.randn(14, 2, 8, generator=gen)
    cache.append(0, kv, kv.flip(0), slots)
    q = torch.randn(2, 4, 8, generator=gen)
    calls = record_check_calls(monkeypatch, "_check_block_table_contents")
    out = cache.decode(0, q, seqs)
    assert calls == []
    want = ops.gqa_decode(q, *cache.kv(0), cache.block_table(seqs), cache.seq_lens(seqs))
    assert calls == ["_check_block_table_contents"] and torch.equal(out, want)


@needs_ops
def test_decode_passes_the_host_lengths_as_plan_seq_lens(monkeypatch):
    """PagedKVCache.decode hands gqa_decode the lengths it holds on the host (plan_seq_lens, for
    the split plan) unless the caller gives its own, which it forwards unchanged."""
    import kvcore.ops

    cache = _cache(num_layers=1, num_pages=8, page_size=4)
    ids = [cache.add_sequence(), cache.add_sequence(), cache.add_sequence()]
    slots = cache.reserve(ids, [7, 0, 10])
    gen = torch.Generator().manual_seed(5)
    cache.append(0, torch.randn(17, 2, 8, generator=gen), torch.randn(17, 2, 8, generator=gen), slots)
    seen = []
    real = kvcore.ops.gqa_decode

    def spy(*args, **kwargs):
        seen.append(kwargs.get("plan_seq_lens"))
        return real(*args, **kwargs)

    monkeypatch.setattr(kvcore.ops, "gqa_decode", spy)
    q = torch.randn(3, 4, 8, generator=gen)
    cache.decode(0, q, ids)
    cache.decode(0, q, ids, plan_seq_lens=[1, 2, 3])
    assert seen == [[7, 0, 10], [1, 2, 3]]
    with pytest.raises(ValueError, match="plan_seq_lens must have 3 entries"):
        cache.decode(0, q, ids, plan_seq_lens=[1, 2])


@needs_ops
def test_decode_with_tensor_sequence_ids_matches_reference():
    gen = torch.Generator().manual_seed(4321)
    cache = _cache(num_layers=1, num_pages=8, page_size=4)
    ids = torch.tensor([cache.add_sequence(), cache.add_sequence()])
    lens = [7, 10]
    slots = cache.reserve(ids, lens)
    k = torch.randn(sum(lens), 2, 8, generator=gen)
    v = torch.randn(sum(lens), 2, 8, generator=gen)
    cache.append(0, k, v, slots)
    q = torch.randn(2, 4, 8, generator=gen)
    out = cache.decode(0, q, ids)
    for row, (start, n) in enumerate(((0, 7), (7, 10))):
        for h in range(2):
            want, _ = reference.dense_attention(q[row, 2 * h: 2 * h + 2], k[start: start + n, h: h + 1],
                                                v[start: start + n, h: h + 1])
            torch.testing.assert_close(out[row, 2 * h: 2 * h + 2].double(), want, rtol=1e-4, atol=1e-5)


@needs_ops
def test_end_to_end_mlkv_map_shares_writes():
    gen = torch.Generator().manual_seed(99)
    cache = PagedKVCache(3, 1, 64, num_pages=4, page_size=8, dtype=torch.float32, layer_to_store=[0, 0, 0])
    a = cache.add_sequence()
    slots = cache.reserve([a], [11])
    k = torch.randn(11, 1, 64, generator=gen)
    v = torch.randn(11, 1, 64, generator=gen)
    cache.append(0, k, v, slots)
    q = torch.randn(1, 4, 64, generator=gen)
    outs = [cache.decode(layer, q, [a]) for layer in range(3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    want, _ = reference.dense_attention(q[0], k, v)
    torch.testing.assert_close(outs[0][0].double(), want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ per-store lengths (split_stores)


def test_split_stores_gives_each_store_its_own_pages_and_lengths():
    cache = _cache(num_layers=4, cla_share=2, num_pages=6, page_size=4)  # 2 stores
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.reserve([a, b], [10, 5])
    shared = (cache.pages_of(a), cache.pages_of(b))
    with pytest.raises(ValueError, match="split_stores"):
        cache.truncate(a, 4, store=1)  # before the split a store's pages are every store's
    with pytest.raises(ValueError, match="split_stores"):
        cache.reserve([a], [1], store=0)
    assert not cache.stores_split and cache.used_pages == 5
    cache.split_stores()
    assert cache.stores_split
    # A copy of the shared state in every store.
    for store in (0, 1):
        assert (cache.pages_of(a, store), cache.pages_of(b, store)) == shared
    assert cache.seq_len(a) == 10 and cache.used_pages == 10 and cache.used_pages_per_store() == [5, 5]
    assert cache.truncate(a, 3, store=1) == 2  # 3 pages -> 1 in store 1 only
    assert cache.seq_len(a, 0) == 10 and cache.seq_len(a, 1) == 3
    assert cache.used_pages_per_store() == [5, 3] and cache.free_pages == 1 + 3
    with pytest.raises(ValueError, match="pass store="):
        cache.seq_len(a)  # the stores disagree now
    with pytest.raises(ValueError, match="pass store="):
        cache.reserve([a], [1])
    assert cache.seq_len(b) == 5  # b still agrees in both stores

    # Growing every store at once: each store's new token goes at its own length.
    slots = cache.reserve_per_store([a, b], [2, 1])
    assert slots.shape == (2, 3)
    assert slots[0].tolist() == _slots_in(cache, a, 0, 10, 12) + _slots_in(cache, b, 0, 5, 6)
    assert slots[1].tolist() == _slots_in(cache, a, 1, 3, 5) + _slots_in(cache, b, 1, 5, 6)
    lens = cache.seq_lens_per_store([a, b])
    assert lens.dtype == torch.int32 and lens.tolist() == [[12, 6], [5, 6]]
    tables = cache.block_table_per_store([a, b])
    assert tables.shape == (2, 2, 3)
    for store in (0, 1):
        assert torch.equal(tables[store, :, : cache.block_table([a, b], store).shape[1]],
                           cache.block_table([a, b], store))
        assert cache.seq_lens([a, b], store).tolist() == lens[store].tolist()
    # Store 0 ran out (a needs a 4th page, b holds 2): all or nothing over the stores.
    before = [(cache.seq_len(s, st), cache.pages_of(s, st)) for s in (a, b) for st in (0, 1)]
    with pytest.raises(OutOfPagesError, match="store 0"):
        cache.reserve_per_store([a, b], [1, 3])
    assert [(cache.seq_len(s, st), cache.pages_of(s, st)) for s in (a, b) for st in (0, 1)] == before
    assert cache.reserve_per_store([], []).shape == (2, 0)
    # One store grows alone; free returns every store's pages.
    cache.reserve([a], [4], store=1)
    assert cache.seq_len(a, 1) == 9
    cache.free(a)
    cache.free(b)
    assert cache.used_pages == 0 and cache.free_pages == 12
    cache.split_stores()  # a second call changes nothing
    c = cache.add_sequence()
    assert cache.seq_len(c, 0) == cache.seq_len(c, 1) == 0


def _slots_in(cache, seq_id, store, start, stop):
    pages = cache.pages_of(seq_id, store)
    ps = cache.page_size
    return [pages[p // ps] * ps + p % ps for p in range(start, stop)]


def test_held_bytes_counts_each_stores_pages():
    cache = _cache(num_layers=3, num_pages=8, page_size=4, dtype=torch.float16)  # 3 stores
    a = cache.add_sequence()
    cache.reserve([a], [9])  # 3 pages
    page_bytes = 2 * 4 * cache.num_kv_heads * cache.head_dim * 2  # K+V of one store's page
    assert cache.held_bytes() == 3 * 3 * page_bytes == 3 * 4 * cache.memory_report()["bytes_per_token"]
    cache.split_stores()
    cache.truncate(a, 4, store=1)
    cache.truncate(a, 0, store=2)
    assert cache.held_bytes([a]) == (3 + 1 + 0) * page_bytes
    report = cache.memory_report()
    assert report["stores_split"] and report["used_pages_per_store"] == [3, 1, 0]
    with pytest.raises(ValueError, match="store must be an int"):
        cache.seq_len(a, 3)
    with pytest.raises(ValueError, match=r"new_len must be an int in \[0, 4\]"):
        cache.truncate(a, 5, store=1)


@needs_ops
def test_decode_after_split_reads_the_layers_store():
    """PagedKVCache.decode uses the layer's store's table and lengths once the stores are split."""
    torch.manual_seed(0)
    cache = _cache(num_layers=2, num_pages=8, page_size=4)
    a = cache.add_sequence()
    slots = cache.reserve([a], [7])
    keys = [torch.randn(7, 2, 8) for _ in range(2)]
    values = [torch.randn(7, 2, 8) for _ in range(2)]
    for layer in range(2):
        cache.append(layer, keys[layer], values[layer], slots)
    cache.split_stores()
    cache.truncate(a, 3, store=1)  # layer 1 keeps its first 3 tokens
    q = torch.randn(1, 4, 8)
    for layer, n in ((0, 7), (1, 3)):
        got = cache.decode(layer, q, [a])
        want = reference.gqa_decode(q, keys[layer][:n].unsqueeze(0).contiguous(),
                                    values[layer][:n].unsqueeze(0).contiguous(),
                                    torch.zeros(1, 1, dtype=torch.int32), torch.tensor([n], dtype=torch.int32))[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
