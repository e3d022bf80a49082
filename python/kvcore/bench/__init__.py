"""kvcore microbenchmarks; run them with ``python -m kvcore.bench`` (see ``__main__`` for options).

Benchmark groups are modules registered in ``GROUPS`` (name -> module, relative to this package).
A group module provides:

* ``GROUP``: its name, as written in the result rows;
* ``cases(device, quick) -> list``: the cases to run, each with a ``name`` (the row's "case");
* ``impls(device) -> list[str]``: implementations run by default, in report column order;
* ``known_impls() -> list[str]``: every implementation ``--impl`` may select;
* ``run(case, impl_names, ctx) -> list[dict]``: one row per implementation for one case
  (``ctx`` is a ``harness.RunContext``; rows are made with ``harness.make_row``) and one
  ``ctx.progress.update()`` per implementation.

Adding a group is one new module and one line in ``GROUPS``; a group may also list several
modules (a tuple), which run one after the other and write rows under the same group name.
"""

from __future__ import annotations

import importlib

GROUPS = {
    "decode": ".decode",
    "block": (".block_sparse", ".block_transformer"),
}
GROUPS["mla"] = ".mla"  # MLA absorbed decode and fused latent projection (kvcore.bench.mla)


def group_modules(name: str) -> list:
    """Import and return every module of a registered benchmark group, in run order (a group is
    one module, or a tuple of modules whose rows share the group's name, e.g. ``block``)."""
    try:
        target = GROUPS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark group {name!r}; known: {', '.join(GROUPS)}") from None
    targets = (target,) if isinstance(target, str) else tuple(target)
    return [importlib.import_module(t, __name__) for t in targets]


def load_group(name: str):
    """Import and return the (first) module of a registered benchmark group; see :func:`group_modules`."""
    return group_modules(name)[0]


__all__ = ["GROUPS", "group_modules", "load_group"]
GROUPS["retrieval"] = ".retrieval"  # InfLLM retrieve-and-attend decode step vs the torch pipeline (kvcore.bench.retrieval)
GROUPS["e2e"] = ".e2e"  # a whole transformers model decode step: kvcore (+SnapKV) vs sdpa + DynamicCache (kvcore.bench.e2e)
GROUPS["eviction"] = (".eviction_scores", ".eviction_cache")
