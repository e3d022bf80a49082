"""The ``e2e`` group: one decode step of a whole transformers model on kvcore vs transformers' own path.

Issue 7's performance target: a Llama-3-8B-shaped model (32 layers, hidden 4096, intermediate
14336, Hq32/Hkv8/D128, vocab 128256, random weights, bf16, the full forward), batch 8, 32k
context on an H100: the decode step with kvcore at least 1.5x faster than transformers' sdpa path
with its default cache (``DynamicCache``), and with SnapKV at a 2048 budget at least 4x faster.

Implementations (rows), on one model and the same synthesized context:

* ``transformers-sdpa``: ``attn_implementation="sdpa"`` with a ``DynamicCache`` (transformers'
  default: each step concatenates the new token onto every layer's K/V, then SDPA).
* ``kvcore``: :func:`kvcore.integrations.transformers.enable` with a :class:`KVCoreCache` (paged
  cache, ``append_paged_kv`` + ``gqa_decode``), no policy.
* ``kvcore-snapkv<N>`` (``N`` = budget, 2048 on CUDA): the same with SnapKV at budget ``N``.
* ``kvcore-pyramidkv<N>`` (not run by default; ``--impl``): the same with PyramidKV, ``N`` the
  mean of its per-layer budgets (each layer's store holds its own count; the row's
  ``cache_tokens`` is their mean over the layers, rounded).
* ``kvcore-graph``, ``kvcore-snapkv<N>-graph`` (CUDA only): the same two, with the decode step
  captured once in a CUDA graph and replayed (:class:`kvcore.integrations.transformers.DecodeGraph`;
  each call stages the new lengths, positions and tokens on the host, then replays). The eager
  step is bound by the host (H200, B8: 28-41 ms of wall time for 7-14 ms of kernels, measured
  with ``bench/experiments/e2e_profile.py``); the graph rows show the step without that.

How the state is made (assumptions):

* The model is built from a ``LlamaConfig`` directly on the device in the bench dtype (no CPU
  init, no download); its random init (transformers' normal(0, 0.02)) gives attention logits of
  std ~1.3 against unit-variance keys, so the softmax over 32k tokens is not degenerate.
* No prefill runs through the model. Each layer's K/V for B x S tokens is drawn at random (unit
  normal, seeded per layer so every cache gets the same numbers; K counts as already roped) and
  written through each cache's own ``update(k, v, layer)``: ``DynamicCache`` and ``KVCoreCache``
  (so the paged layout is the integration's). The next position is S for both (each cache's
  ``get_seq_length``; the model derives the positions itself).
* SnapKV: when the policy ops (``attention_scores``, ``compact_kv``) have a kernel on the device,
  the real policy runs on the synthesized full cache through ``KVCoreCache.apply_policy`` with a
  random observation window of 32 queries per layer (std ~1.3, the model's query scale); the
  pool stays sized for the full context, the sequences hold ``N`` tokens. Otherwise the kvcore
  cache is filled with ``N`` tokens per sequence directly (positions then start at ``N``; the
  step's work is the same) and the row's notes say so.
* One config's cache is freed before the next is built (B8 S32k is 32 GiB per cache in bf16;
  the weights are 16 GB).

Timing: one decode step = ``model(input_ids [B, 1], cache, use_cache=True)`` returning logits,
after warm-up, median of ``STEPS`` (CUDA events, L2 flushed by a read before each call; the
harness ``Timer`` with fixed repetition counts). The cache is *allowed to grow* by one token per
call (at most ``STEPS + 8`` calls on a case, 0.05% of 32k), kvcore's index validation off as a
serving engine runs it.

Correctness before timing: on the fresh state the first kvcore step's logits and every layer's
attention output (``self_attn`` output, hooked) are compared with the sdpa step's (relative
Frobenius error; tolerances ``REL_TOL``: tight at layer 0, looser deeper and for the logits); a
disagreement turns the kvcore rows into error rows (no time). ``kvcore-graph``'s first replay is
checked the same way on its logits (hooks do not run inside a graph). The policy rows are checked
for finite logits only (they attend to fewer tokens on purpose).

Row numbers: ``ms`` per step; bytes = the floor one step must read (the weights except the
embedding table, B embedding rows, the K/V held, the new token's K/V) for ``gbps``/``pct_copy``;
FLOPs = 2 x B x weights + 4 x B x Hq x D x held x layers. Extra fields: ``cache_bytes`` (K/V held
after the state is built: DynamicCache tensors, kvcore pages held), ``cache_pool_bytes`` (kvcore:
the page pool allocated), ``cache_tokens`` (held per sequence), ``step_peak_bytes`` (CUDA:
``max_memory_allocated`` during the timed steps), ``speedup`` (transformers-sdpa ms / this ms, eager
rows only: there is no graph-replayed sdpa row to set a graph replay against),
``tokens_per_s`` (B / step time).

Cases: CUDA: the target (B8 S32768) and B1 S32768 on the 8B shape; quick CUDA: 4 layers of it at
B2 S8192; CPU: a tiny fp32 model (2 layers, hidden 64, Hq4/Hkv2, S 256, budget 64) so CI runs
it in seconds. Needs the ``transformers`` extra (a row is skipped with the reason otherwise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from . import peers
from .harness import RunContext, Timer, dtype_suffix, make_row, round_sig

GROUP = "e2e"

SDPA = "transformers-sdpa"
KVCORE = "kvcore"
KVCORE_GRAPH = "kvcore-graph"
_SNAP = re.compile(r"^kvcore-(snapkv|pyramidkv)(\d+)(-graph)?$")

#: Timed steps per implementation and case (median); the warm-up adds at most 8 calls.
STEPS = 10
#: Relative error (Frobenius) allowed between kvcore's and sdpa's outputs: (layer 0's attention,
#: later layers' attention and the logits). Layer 0 sees identical inputs on both paths, so only
#: rounding separates them (bf16: 0.003 measured); later layers inherit the earlier differences
#: and grow slowly with depth (bf16, 12 layers: 0.016 attention, 0.025 logits, CPU). A layout or
#: indexing error gives O(1) (a different average of unrelated random V rows).
REL_TOL = {torch.float32: (1e-3, 1e-3), torch.bfloat16: (0.02, 0.25), torch.float16: (0.02, 0.25)}
#: SnapKV observation window (queries per layer) used when the real policy runs.
SNAPKV_WINDOW = 32


@dataclass(frozen=True)
class E2ECase:
    batch: int
    seq_len: int
    layers: int = 32
    hidden: int = 4096
    intermediate: int = 14336
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    vocab: int = 128256
    page_size: int = 16
    dtype: torch.dtype = torch.bfloat16

    @property
    def name(self) -> str:
        s = (f"llama L{self.layers} h{self.hidden} Hq{self.num_q_heads} Hkv{self.num_kv_heads} D{self.head_dim} "
             f"B{self.batch} S{self.seq_len}")
        s += dtype_suffix(self.dtype)
        return s

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def config(self) -> Any:
        import transformers

        return transformers.LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.num_q_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim, max_position_embeddings=max(8192, 2 * self.seq_len), tie_word_embeddings=False,
        )

    @property
    def weight_params(self) -> int:
        """Parameters read by one step (every weight but the embedding table; norms included)."""
        h, hq, hkv, d = self.hidden, self.num_q_heads, self.num_kv_heads, self.head_dim
        attn = h * hq * d * 2 + h * hkv * d * 2
        mlp = 3 * h * self.intermediate
        return self.layers * (attn + mlp + 2 * h) + h + self.vocab * h

    def kv_bytes_per_token(self) -> int:
        """K+V bytes of one token of one sequence over all layers."""
        return self.layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    def step_bytes(self, held: int) -> int:
        """Bytes one decode step must move with ``held`` cached tokens per sequence."""
        weights = self.weight_params * self.itemsize + self.batch * self.hidden * self.itemsize
        return weights + self.batch * (held + 1) * self.kv_bytes_per_token()

    def step_flops(self, held: int) -> int:
        attn = 4 * self.batch * self.num_q_heads * self.head_dim * (held + 1) * self.layers
        return 2 * self.batch * self.weight_params + attn


def cases(device: torch.device, quick: bool) -> list:
    """CUDA: the issue's target (B8 S32768) and B1 S32768 on the Llama-3-8B shape (quick: 4 layers,
    B2 S8192); CPU: a tiny fp32 model (2 layers, hidden 64, S 256)."""
    device = torch.device(device)
    if device.type == "cuda" and not quick:
        return [E2ECase(8, 32768), E2ECase(1, 32768)]
    if device.type == "cuda":
        return [E2ECase(2, 8192, layers=4)]
    return [E2ECase(2, 256, layers=2, hidden=64, intermediate=128, num_q_heads=4, num_kv_heads=2, head_dim=16,
                    vocab=256, dtype=torch.float32)]


def impls(device: torch.device) -> list:
    """Implementations run by default, in report column order (the SnapKV budget is in the name)."""
    if torch.device(device).type == "cuda":
        return [SDPA, KVCORE, KVCORE_GRAPH, "kvcore-snapkv2048", "kvcore-snapkv2048-graph"]
    return [SDPA, KVCORE, "kvcore-snapkv64"]  # CUDA graphs need a GPU


def known_impls() -> list:
    snap = [f"kvcore-{p}{n}{g}" for p in ("snapkv", "pyramidkv") for n in (2048, 1024, 64) for g in ("", "-graph")]
    return [SDPA, KVCORE, KVCORE_GRAPH] + snap


def uses_graph(impl: str) -> bool:
    """Whether ``impl`` replays a captured CUDA graph (``kvcore-graph``, ``kvcore-snapkv<N>-graph``)."""
    return impl == KVCORE_GRAPH or (_SNAP.match(impl) is not None and impl.endswith("-graph"))


def snapkv_budget(impl: str) -> Optional[int]:
    """The budget of a ``kvcore-snapkv<N>`` implementation name, None for the others."""
    m = _SNAP.match(impl)
    return int(m.group(2)) if m and m.group(1) == "snapkv" else None


def policy_budget(impl: str) -> Optional[tuple]:
    """``(policy, budget)`` of a ``kvcore-snapkv<N>`` / ``kvcore-pyramidkv<N>`` name, None for the others."""
    m = _SNAP.match(impl)
    return (m.group(1), int(m.group(2))) if m else None


# --------------------------------------------------------------------------------------------
# Model and synthesized state
# --------------------------------------------------------------------------------------------


def build_model(case: E2ECase, device: torch.device, seed: int = 0) -> Any:
    """A random-weight ``LlamaForCausalLM`` built on ``device`` in ``case.dtype`` (no CPU init), sdpa."""
    import transformers

    config = case.config()
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    # _from_config builds under the dtype (no fp32 copy of 8B parameters); the device context puts
    # every parameter and buffer straight on the device, where the random init runs.
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=case.dtype, attn_implementation="sdpa")
    return model.eval()


def _layer_kv(case: E2ECase, layer: int, tokens: int, device: torch.device, seed: int) -> tuple:
    """Layer ``layer``'s synthesized K and V ``[B, Hkv, tokens, D]``; the same numbers on every call."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + layer)
    shape = (case.batch, case.num_kv_heads, tokens, case.head_dim)
    k = torch.randn(shape, dtype=case.dtype, device=device, generator=gen)
    v = torch.randn(shape, dtype=case.dtype, device=device, generator=gen)
    return k, v


def fill_cache(cache: Any, case: E2ECase, tokens: int, device: torch.device, seed: int) -> None:
    """Write ``tokens`` synthesized tokens per sequence into every layer of a transformers Cache
    through its own ``update`` (one layer at a time, so only one layer's draw is alive)."""
    for layer in range(case.layers):
        k, v = _layer_kv(case, layer, tokens, device, seed)
        cache.update(k, v, layer)
        del k, v


def _dynamic_cache_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _window_queries(case: E2ECase, device: torch.device, seed: int) -> list:
    """Random stand-ins for each layer's last ``SNAPKV_WINDOW`` prefill queries ``[B, Hq, W, D]``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 77)
    shape = (case.batch, case.num_q_heads, SNAPKV_WINDOW, case.head_dim)
    return [torch.randn(shape, dtype=case.dtype, device=device, generator=gen) * 1.3 for _ in range(case.layers)]


def _policy_ops_missing(device: torch.device) -> list:
    if device.type != "cuda":
        return []
    return [op for op in ("attention_scores", "compact_kv")
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"kvcore::{op}", "CUDA")]


# --------------------------------------------------------------------------------------------
# One step, its check, its timing
# --------------------------------------------------------------------------------------------


class _Step:
    """One decode step of ``model`` on ``cache`` with fixed input tokens; optionally records every
    layer's attention output (for the check against the sdpa path)."""

    def __init__(self, model: Any, cache: Any, tokens: torch.Tensor) -> None:
        self.model = model
        self.tokens = tokens
        from ..integrations.transformers import _cache_kwarg

        self.kwargs = {_cache_kwarg(model): cache, "use_cache": True}

    def __call__(self) -> torch.Tensor:
        return self.model(input_ids=self.tokens, **self.kwargs).logits

    def traced(self) -> tuple:
        """(logits [B, V] fp32, [attention output of each layer, fp32])."""
        outs: list = []
        hooks = [layer.self_attn.register_forward_hook(lambda _m, _a, out: outs.append(out[0].float()))
                 for layer in self.model.model.layers]
        try:
            logits = self()[:, -1].float()
        finally:
            for h in hooks:
                h.remove()
        return logits, outs


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _check(got: tuple, want: tuple, tol: tuple) -> tuple:
    """(None, summary) when kvcore's logits and attention outputs match sdpa's, else (error, summary)."""
    logits, attn = got
    ref_logits, ref_attn = want
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        return f"{bad} logits are NaN/inf", ""
    if not attn or len(attn) != len(ref_attn):
        return f"{len(attn)} attention outputs recorded, sdpa had {len(ref_attn)}", ""
    errs = [_rel_err(a, b) for a, b in zip(attn, ref_attn)]
    worst = max(range(len(errs)), key=errs.__getitem__)
    logit_err = _rel_err(logits, ref_logits)
    summary = f"rel. error vs sdpa: logits {logit_err:.2g}, attention {errs[worst]:.2g} (layer {worst})"
    first_tol, deep_tol = tol
    summary += f", layer 0 {errs[0]:.2g}"
    if not (errs[0] < first_tol and logit_err < deep_tol and errs[worst] < deep_tol):
        return (f"disagrees with transformers-sdpa on the same state ({summary}; tolerance {first_tol:g} at layer 0, "
                f"{deep_tol:g} elsewhere)"), summary
    return None, summary


def _timer(device: torch.device, steps: int) -> Timer:
    # Fixed repetition counts (at most steps + 7 calls on CUDA, steps + 2 on CPU) so the caches'
    # room for growth is known in advance.
    return Timer(device, warmup_ms=0.0, rep_ms=0.0, min_reps=steps, max_reps=steps)


def _time_step(step: _Step, ctx: RunContext, steps: int) -> tuple:
    """(ms, peak bytes or None) of ``steps`` timed calls."""
    device = ctx.device
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = _timer(device, steps)(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    return ms, peak


def _row(case: E2ECase, impl: str, ctx: RunContext, ms: Optional[float], held: int, *, cache_bytes: Optional[int],
         pool_bytes: Optional[int] = None, peak: Optional[int] = None, notes: Optional[str] = None,
         error: Optional[str] = None) -> dict:
    row = make_row(GROUP, impl, case.name, ctx, ms=ms, nbytes=case.step_bytes(held), flops=case.step_flops(held),
                   notes=notes, error=error)
    row.update(cache_bytes=cache_bytes, cache_pool_bytes=pool_bytes, cache_tokens=held, step_peak_bytes=peak,
               speedup=None, tokens_per_s=None if row["ms"] is None else round_sig(case.batch / (ms * 1e-3), 4))
    return row


# --------------------------------------------------------------------------------------------
# Running one case
# --------------------------------------------------------------------------------------------


def run(case: E2ECase, impl_names: Sequence[str], ctx: RunContext, steps: int = STEPS) -> list:
    """One row per implementation of ``impl_names`` on ``case`` (timed, skipped or an error)."""
    rows: dict = {}
    try:
        import transformers  # noqa: F401

        from ..integrations import transformers as kvt
    except Exception as exc:  # noqa: BLE001
        for name in impl_names:
            rows[name] = make_row(GROUP, name, case.name, ctx, notes=f"skipped: transformers: {peers._first_line(exc)}")
            ctx.progress.update(1)
        return [rows[n] for n in impl_names]

    device, seed = ctx.device, ctx.seed
    room = case.seq_len + steps + 16  # tokens per sequence a kvcore cache must hold: context + every call
    tol = REL_TOL.get(case.dtype, REL_TOL[torch.bfloat16])
    model = cache = step = None
    try:
        with torch.no_grad():
            model = build_model(case, device, seed)
            gen = torch.Generator().manual_seed(seed + 5)
            tokens = torch.randint(0, case.vocab, (case.batch, 1), generator=gen).to(device)
            wants_kvcore = any(n in (KVCORE, KVCORE_GRAPH) or policy_budget(n) for n in impl_names)

            # transformers' path: it is also the reference of kvcore's first step.
            reference = None
            if SDPA in impl_names or wants_kvcore:
                ctx.progress.set_label(f"{GROUP} {case.name} {SDPA}")
                cache = transformers.DynamicCache(config=model.config)
                fill_cache(cache, case, case.seq_len, device, seed)
                nbytes = _dynamic_cache_bytes(cache)
                step = _Step(model, cache, tokens)
                reference = step.traced()
                if SDPA in impl_names:
                    ms, peak = _time_step(step, ctx, steps)
                    rows[SDPA] = _row(case, SDPA, ctx, ms, case.seq_len, cache_bytes=nbytes, peak=peak,
                                      notes="DynamicCache (grows by concatenation), attn_implementation='sdpa'")
                    ctx.progress.update(1)
                del step, cache
                ctx.free_memory()

            kvt.enable(model)
            saved_validation = peers.import_kvcore().set_validation(True)
            try:
                check_error = None
                if KVCORE in impl_names or wants_kvcore:
                    ctx.progress.set_label(f"{GROUP} {case.name} {KVCORE}")
                    cache = kvt.KVCoreCache(model.config, max_cache_len=room, page_size=case.page_size)
                    fill_cache(cache, case, case.seq_len, device, seed)
                    kw = dict(cache_bytes=cache.cache_bytes(), pool_bytes=cache.paged.memory_report()["allocated_bytes"])
                    step = _Step(model, cache, tokens)
                    check_error, summary = _check(step.traced(), reference, tol)
                    if KVCORE in impl_names:
                        if check_error:
                            ctx.log(f"  ERROR {KVCORE} on {case.name}: {check_error}")
                            rows[KVCORE] = _row(case, KVCORE, ctx, None, case.seq_len, error=check_error, **kw)
                        else:
                            peers.import_kvcore().set_validation(False)
                            ms, peak = _time_step(step, ctx, steps)
                            peers.import_kvcore().set_validation(True)
                            rows[KVCORE] = _row(case, KVCORE, ctx, ms, case.seq_len, peak=peak,
                                                notes=f"KVCoreCache page {case.page_size}, gqa_decode; {summary}", **kw)
                        ctx.progress.update(1)
                    del step, cache
                    ctx.free_memory()

                if KVCORE_GRAPH in impl_names:
                    ctx.progress.set_label(f"{GROUP} {case.name} {KVCORE_GRAPH}")
                    rows[KVCORE_GRAPH] = _run_graph(case, model, tokens, ctx, steps, room, check_error, reference[0],
                                                    tol[1])
                    ctx.progress.update(1)
                    ctx.free_memory()

                for name in impl_names:
                    policy = policy_budget(name)
                    if policy is None:
                        continue
                    ctx.progress.set_label(f"{GROUP} {case.name} {name}")
                    rows[name] = _run_snapkv(case, name, policy[1], model, tokens, ctx, steps, room, check_error,
                                             graph=uses_graph(name), policy=policy[0])
                    ctx.progress.update(1)
                    ctx.free_memory()
            finally:
                peers.import_kvcore().set_validation(saved_validation)
                kvt.disable(model, "sdpa")
    except Exception as exc:  # noqa: BLE001 - an out-of-memory or a break in setup is a row, not a crash
        message = f"failed: {peers._first_line(exc)}"
        ctx.log(f"  ERROR e2e on {case.name}: {message}")
        for name in impl_names:
            if name not in rows:
                rows[name] = make_row(GROUP, name, case.name, ctx, error=message)
                ctx.progress.update(1)
    finally:
        # Drop every reference to the model and caches (an exception may have left a 32 GiB cache
        # here, or in the adapter's note for the next attention call) before the next case.
        model = cache = step = None
        kvt._note.entry = None
        ctx.free_memory()

    # Eager rows only: transformers' sdpa path has no graph row here, so a graph replay's time over
    # its eager step would credit kvcore with the host overhead the graph removes (None for those).
    base = rows.get(SDPA, {}).get("ms")
    for impl, row in rows.items():
        if base and row.get("ms") and not uses_graph(impl):
            row["speedup"] = round_sig(base / row["ms"], 3)
    return [rows[n] for n in impl_names if n in rows] + [
        make_row(GROUP, n, case.name, ctx, notes=f"skipped: unknown implementation {n!r}")
        for n in impl_names if n not in rows
    ]


def _graph_skip(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else "skipped: CUDA graphs need a CUDA device"


def _time_graph(cache: Any, model: Any, tokens: torch.Tensor, ctx: RunContext, steps: int) -> tuple:
    """(logits of the first replay [B, V] fp32, ms, peak bytes) of a DecodeGraph on ``cache``."""
    from ..integrations import transformers as kvt

    graph = kvt.DecodeGraph(model, cache, headroom=steps + 16)  # no re-capture while timed
    first = graph(tokens)[:, -1].float()  # warm-up, capture, replay
    ms, peak = _time_step(lambda: graph(tokens), ctx, steps)
    if graph.captures != 1:
        raise RuntimeError(f"the step was captured {graph.captures} times while timed (expected once)")
    return first, ms, peak


def _run_graph(case: E2ECase, model: Any, tokens: torch.Tensor, ctx: RunContext, steps: int, room: int,
               check_error: Optional[str], ref_logits: torch.Tensor, tol: float) -> dict:
    from ..integrations import transformers as kvt

    skip = _graph_skip(ctx.device)
    if skip:
        return make_row(GROUP, KVCORE_GRAPH, case.name, ctx, notes=skip)
    if check_error:
        return _row(case, KVCORE_GRAPH, ctx, None, case.seq_len, cache_bytes=None,
                    error=f"kvcore's eager step failed its check: {check_error}")
    cache = kvt.KVCoreCache(model.config, max_cache_len=room, page_size=case.page_size)
    fill_cache(cache, case, case.seq_len, ctx.device, ctx.seed)
    kw = dict(cache_bytes=cache.cache_bytes(), pool_bytes=cache.paged.memory_report()["allocated_bytes"])
    first, ms, peak = _time_graph(cache, model, tokens, ctx, steps)
    err = _rel_err(first, ref_logits)
    if not err < tol:
        return _row(case, KVCORE_GRAPH, ctx, None, case.seq_len,
                    error=f"first replay's logits disagree with transformers-sdpa (rel. error {err:.2g} >= {tol:g})", **kw)
    return _row(case, KVCORE_GRAPH, ctx, ms, case.seq_len, peak=peak,
                notes=f"DecodeGraph (CUDA graph replay) on KVCoreCache page {case.page_size}; first replay's logits "
                      f"rel. error vs sdpa {err:.2g}", **kw)


def _run_snapkv(case: E2ECase, name: str, budget: int, model: Any, tokens: torch.Tensor, ctx: RunContext,
                steps: int, room: int, check_error: Optional[str], graph: bool = False, policy: str = "snapkv") -> dict:
    from ..integrations import transformers as kvt

    title = {"snapkv": "SnapKV", "pyramidkv": "PyramidKV"}[policy]
    device, seed = ctx.device, ctx.seed
    skip = _graph_skip(device) if graph else None
    if skip:
        return make_row(GROUP, name, case.name, ctx, notes=skip)
    if budget >= case.seq_len:
        return make_row(GROUP, name, case.name, ctx, notes=f"skipped: budget {budget} >= context {case.seq_len}")
    if check_error:
        return _row(case, name, ctx, None, budget, cache_bytes=None,
                    error=f"kvcore's no-policy step failed its check: {check_error}")
    missing = _policy_ops_missing(device)
    if not missing:
        cache = kvt.KVCoreCache(model.config, max_cache_len=room, page_size=case.page_size, policy=policy,
                                budget=budget, policy_kwargs={"window": SNAPKV_WINDOW})
        fill_cache(cache, case, case.seq_len, device, seed)
        queries = _window_queries(case, device, seed)
        cache.apply_policy(queries, scaling=case.head_dim ** -0.5)
        del queries
        how = (f"{title} run on the synthesized {case.seq_len}-token cache (window {SNAPKV_WINDOW} random queries, "
               f"kernel 5 avg pooling), pool sized for the full context")
    else:
        cache = kvt.KVCoreCache(model.config, max_cache_len=budget + steps + 16, page_size=case.page_size)
        fill_cache(cache, case, budget, device, seed)
        how = (f"no CUDA kernel for {', '.join(missing)}: cache synthesized with {budget} tokens per sequence "
               f"(the policy's mean output size; positions start at {budget}), {title} scoring not run")
    per_layer = cache.cached_tokens_per_layer()
    held = round(sum(per_layer) / len(per_layer))  # the step reads every layer's own count: their mean
    if len(set(per_layer)) > 1:
        how += f"; tokens held per layer {min(per_layer)}..{max(per_layer)}"
    kw = dict(cache_bytes=cache.cache_bytes(), pool_bytes=cache.paged.memory_report()["allocated_bytes"])
    kvcore = peers.import_kvcore()
    previous = kvcore.set_validation(False)
    try:
        if graph:
            logits, ms, peak = _time_graph(cache, model, tokens, ctx, steps)
            how = "DecodeGraph (CUDA graph replay); " + how
        else:
            step = _Step(model, cache, tokens)
            logits = step()
            ms, peak = _time_step(step, ctx, steps)
    finally:
        kvcore.set_validation(previous)
    bad = int((~torch.isfinite(logits)).sum())
    del logits
    if bad:
        return _row(case, name, ctx, None, held, error=f"{bad} logits are NaN/inf", **kw)
    return _row(case, name, ctx, ms, held, peak=peak, notes=how, **kw)


__all__ = ["E2ECase", "GROUP", "build_model", "cases", "fill_cache", "impls", "known_impls", "policy_budget", "run",
           "snapkv_budget", "uses_graph"]
