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

Adding a group is one new module and one line in ``GROUPS``.
"""

from __future__ import annotations

import importlib

GROUPS = {
    "decode": ".decode",
    "block": ".block_sparse",
}


def load_group(name: str):
    """Import and return the module of a registered benchmark group."""
    try:
        target = GROUPS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark group {name!r}; known: {', '.join(GROUPS)}") from None
    return importlib.import_module(target, __name__)


__all__ = ["GROUPS", "load_group"]
