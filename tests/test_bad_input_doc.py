"""docs/bad_input.md lists exactly the bad-input cases the op tests check, op by op (tests/test_ops.py,
tests/test_block_transformer.py for token_decoder_attention, tests/test_block_sparse.py for
block_sparse_decode, tests/test_mla.py for the MLA ops, tests/test_eviction.py for attention_scores
and compact_kv, tests/test_retrieval.py for infllm_unit_scores and topk_rows), and its matrix (op x kind
of bad input) has a test in every cell."""

from __future__ import annotations

import importlib
import pathlib
import re

from test_block_sparse import BAD_SPARSE
from test_block_transformer import BAD_TOKEN_DECODER
from test_eviction import BAD_COMPACT, BAD_SCORES
from test_mla import BAD_MLA_DECODE, BAD_PROJECT
from test_ops import BAD_APPEND, BAD_DECODE, BAD_MERGE
from test_retrieval import BAD_TOPK, BAD_UNIT_SCORES

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "bad_input.md"
CASES = {
    "gqa_decode": BAD_DECODE,
    "append_paged_kv": BAD_APPEND,
    "merge_attention_states": BAD_MERGE,
    "token_decoder_attention": BAD_TOKEN_DECODER,
    "block_sparse_decode": BAD_SPARSE,
    "mla_latent_project": BAD_PROJECT,
    "mla_decode": BAD_MLA_DECODE,
    "attention_scores": BAD_SCORES,
    "compact_kv": BAD_COMPACT,
    "infllm_unit_scores": BAD_UNIT_SCORES,
    "topk_rows": BAD_TOPK,
}
# The kinds of bad input every op is checked against (issue 8); "other" holds the rest.
KINDS = ["dtype", "device", "rank", "shape mismatch", "non-contiguous", "out-of-range page index",
         "seq_len over capacity", "NaN in q (or other inputs)", "other"]


def _section(text: str, heading: str) -> str:
    """The text under a '## ' heading that starts with ``heading``, up to the next '## '."""
    parts = re.split(r"^## ", text, flags=re.M)
    found = [p for p in parts if p.startswith(heading)]
    assert len(found) == 1, f"docs/bad_input.md needs exactly one '## {heading}...' section"
    return found[0]


def _table_rows(section: str) -> list[list[str]]:
    rows = [line.strip() for line in section.splitlines() if line.strip().startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_bad_input_doc_matches_the_tests():
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| `(\w+)` \|", _section(DOC.read_text(), "Cases"), flags=re.M)
    documented = {(op, case): error for op, case, error in rows}
    tested = {}
    for op, cases in CASES.items():
        for c in cases:
            tested[(op, c.name)] = c.error.__name__
    assert documented == tested, (
        f"docs/bad_input.md and tests/test_ops.py disagree: only documented {sorted(set(documented) - set(tested))}, "
        f"only tested {sorted(set(tested) - set(documented))}, "
        f"error differs {sorted(k for k in set(documented) & set(tested) if documented[k] != tested[k])}"
    )


def _test_exists(ref: str) -> bool:
    module, _, func = ref.partition("::")
    return callable(getattr(importlib.import_module(module.removesuffix(".py")), func, None))


def test_bad_input_matrix_has_a_test_in_every_cell():
    header, _sep, *body = _table_rows(_section(DOC.read_text(), "The matrix"))
    assert header == ["op"] + KINDS, f"matrix columns must be {['op'] + KINDS}, got {header}"
    assert sorted(row[0] for row in body) == sorted(CASES), "the matrix needs one row per op"
    for op, *cells in body:
        names = {c.name for c in CASES[op]}
        placed: dict[str, str] = {}
        for kind, cell in zip(KINDS, cells):
            refs = re.findall(r"`([^`]+)`", cell)
            if not refs:
                assert cell.startswith("n/a: ") and len(cell) > 10, f"{op} x {kind}: empty cell without an 'n/a: why'"
                continue
            for ref in refs:
                if "::" in ref:
                    assert _test_exists(ref), f"{op} x {kind}: {ref} is not a test function"
                else:
                    assert ref in names, f"{op} x {kind}: {ref} is not a bad-input case of {op} in tests/test_ops.py"
                    assert ref not in placed, f"{op}: {ref} sits in two cells ({placed.get(ref)} and {kind})"
                    placed[ref] = kind
        assert set(placed) == names, f"{op}: cases in no matrix cell: {sorted(names - set(placed))}"
