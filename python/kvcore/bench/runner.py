"""Checking and timing one implementation of one case: shared by every benchmark group.

A group module builds its inputs and fp32 reference, then calls :func:`time_implementation` per
implementation name with a ``build`` callable that returns the implementation's ready-to-time
variants (``peers.Prepared``) or raises ``peers.Skip``. Each variant is run once with its output
NaN-poisoned and checked against the reference before it is timed; the fastest correct variant
makes the row. A peer that fails in setup is skipped with the reason, a wrong result is an error
row: neither stops the run.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .harness import RunContext, make_row
from .peers import Prepared, Skip, _first_line


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |out - ref|; raises ValueError for a shape mismatch or any NaN/inf in ``out``."""
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != expected {tuple(ref.shape)}")
    bad = int((~torch.isfinite(out)).sum().item())
    if bad:
        raise ValueError(f"{bad} of {out.numel()} output elements are NaN/inf (unwritten?)")
    return (out.float() - ref).abs().max().item()


def check_result(out, ref, tol: float) -> Optional[str]:
    """None when ``out`` matches ``ref`` (a tensor, or a tuple of them compared pairwise), else what
    is wrong. Each pair must agree within ``tol x min(1, max |ref|)``: ``tol`` is an absolute error
    for outputs of size ~1 and shrinks with smaller ones, since a decode output over S keys of
    random values is ~S^-1/2 (max |ref| 0.018 at S 131072), where an absolute 2e-2 once passed an
    all-zero output and one that dropped a quarter of the keys."""
    outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    refs = tuple(ref) if isinstance(ref, (tuple, list)) else (ref,)
    if len(outs) != len(refs):
        return f"wrong result: {len(outs)} outputs, expected {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        which = "" if len(outs) == 1 else f" (output {i})"
        try:
            err = max_abs_error(o, r)
        except Exception as exc:  # noqa: BLE001
            return f"wrong result{which}: {exc}"
        scale = r.abs().max().item() if r.numel() else 0.0
        limit = tol * min(1.0, scale) if scale > 0 else tol
        if not err < limit:  # also catches NaN
            return (f"wrong result{which}: max abs error {err:.3g} vs fp32 reference (tolerance {limit:.3g} = "
                    f"{tol:g} x min(1, max |ref| {scale:.3g}))")
    return None


def time_variant(var: Prepared, ref, tol: float, ctx: RunContext) -> tuple:
    """(ms, None) for a correct variant, or (None, error message). ``ref``: the reference of what the
    variant's first call gives (``var.result()`` when set, else ``fn()``'s return)."""
    with var.context():
        if var.out is not None:
            var.out.fill_(float("nan"))  # unwritten elements must fail the check
        try:
            if var.setup is not None:
                var.setup()
            out = var.fn()
            if var.result is not None:
                out = var.result()
            ctx.synchronize()
        except Exception as exc:  # noqa: BLE001
            return None, f"call failed: {_first_line(exc)}"
        problem = check_result(out, ref, tol)
        del out
        if problem is not None:
            return None, problem
        var.before_timing()
        try:
            return ctx.timer(var.fn, var.setup), None
        except Exception as exc:  # noqa: BLE001
            return None, f"failed while timing: {_first_line(exc)}"
        finally:
            var.after_timing()


def time_implementation(group: str, name: str, case, build: Callable[[], Sequence[Prepared]], ref: torch.Tensor,
                        tol: float, ctx: RunContext) -> dict:
    """One result row for implementation ``name`` on ``case`` (which has ``name``, ``nbytes`` and
    ``flops``): timed, skipped (with the reason) or an error (with what went wrong)."""
    try:
        variants = build()
    except Skip as exc:
        ctx.log(f"  skip {name} on {case.name}: {exc}")
        return make_row(group, name, case.name, ctx, notes=f"skipped: {exc}")
    except Exception as exc:  # noqa: BLE001 - a peer that breaks in setup is skipped, not fatal
        reason = _first_line(exc)
        ctx.log(f"  skip {name} on {case.name}: setup failed: {reason}")
        return make_row(group, name, case.name, ctx, notes=f"skipped: setup failed: {reason}")

    best: Optional[tuple] = None
    errors = []
    try:
        for var in variants:
            ms, err = time_variant(var, ref, tol, ctx)
            if err is not None:
                errors.append(f"{var.notes}: {err}" if var.notes and len(variants) > 1 else err)
            elif best is None or ms < best[0]:
                best = (ms, var.notes)
    finally:
        del variants
    if best is None:
        message = "; ".join(errors)
        ctx.log(f"  ERROR {name} on {case.name}: {message}")
        return make_row(group, name, case.name, ctx, error=message)
    notes = best[1]
    if errors:
        notes = "; ".join(filter(None, [notes, "other variants failed: " + "; ".join(errors)]))
    return make_row(group, name, case.name, ctx, ms=best[0], nbytes=case.nbytes, flops=case.flops, notes=notes)


def time_all(group: str, case, impl_names: Sequence[str], ctx: RunContext,
             build_for: Callable[[str], Callable[[], Sequence[Prepared]]], ref: torch.Tensor, tol: float,
             ref_for: Optional[Callable[[str], torch.Tensor]] = None) -> list:
    """One row per implementation of ``impl_names`` on ``case`` (timed, skipped or an error), with
    the progress bar kept current. ``build_for(name)`` gives the ``build`` callable of
    :func:`time_implementation`; ``ref_for(name)``, when given, the reference in that
    implementation's output layout (default: ``ref`` for all)."""
    rows = []
    for name in impl_names:
        ctx.progress.set_label(f"{group} {case.name} {name}")
        want = ref_for(name) if ref_for is not None else ref
        rows.append(time_implementation(group, name, case, build_for(name), want, tol, ctx))
        ctx.progress.update(1)
    return rows


def builder_for(builders: dict, name: str, inputs) -> Callable[[], Sequence[Prepared]]:
    """A ``build`` callable for :func:`time_implementation` from a name -> builder table."""

    def build() -> Sequence[Prepared]:
        if name not in builders:
            raise Skip(f"unknown implementation {name!r}")
        return builders[name](inputs)

    return build


def run_case(group: str, case, impl_names: Sequence[str], ctx: RunContext, builders: dict,
             make_inputs: Callable, reference: Callable[[object], torch.Tensor], tol: float,
             ref_in_layout: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None) -> list:
    """A group's ``run`` for one case: inputs from ``make_inputs(case, device, seed=...)``, the
    reference from ``reference(inputs)``, then :func:`time_all` over ``builders`` (a name ->
    builder table); ``ref_in_layout(name, ref)``, when given, the reference in an
    implementation's output layout. The inputs are freed before returning, whatever happened."""
    inputs = make_inputs(case, ctx.device, seed=ctx.seed)
    try:
        ref = reference(inputs)
        ref_for = None if ref_in_layout is None else (lambda name: ref_in_layout(name, ref))
        return time_all(group, case, impl_names, ctx, lambda name: builder_for(builders, name, inputs), ref, tol,
                        ref_for=ref_for)
    finally:
        del inputs
        ctx.free_memory()


__all__ = ["builder_for", "check_result", "max_abs_error", "run_case", "time_all", "time_implementation", "time_variant"]
