"""docs/bad_input.md lists exactly the bad-input cases the op tests check, op by op (tests/test_ops.py,
and tests/test_block_transformer.py for token_decoder_attention)."""

from __future__ import annotations

import pathlib
import re

from test_block_transformer import BAD_TOKEN_DECODER
from test_ops import BAD_APPEND, BAD_DECODE, BAD_MERGE

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "bad_input.md"


def test_bad_input_doc_matches_the_tests():
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| `(\w+)` \|", DOC.read_text(), flags=re.M)
    documented = {(op, case): error for op, case, error in rows}
    tested = {}
    for op, cases in (("gqa_decode", BAD_DECODE), ("append_paged_kv", BAD_APPEND), ("merge_attention_states", BAD_MERGE),
                      ("token_decoder_attention", BAD_TOKEN_DECODER)):
        for c in cases:
            tested[(op, c.name)] = c.error.__name__
    assert documented == tested, (
        f"docs/bad_input.md and tests/test_ops.py disagree: only documented {sorted(set(documented) - set(tested))}, "
        f"only tested {sorted(set(tested) - set(documented))}, "
        f"error differs {sorted(k for k in set(documented) & set(tested) if documented[k] != tested[k])}"
    )
