"""Deal the test files into N groups of about equal expected run time, one line of paths per
group, for bench/gpu_stages.sh's `ptests` stage (parallel pytest processes on one GPU).

The weight of a file is its size, times 4 when it re-runs other files in subprocesses (the
kernel-switch tests: run_tests_with_env / run_script_with_env), which makes it far slower than
its size says. Largest first into the lightest group.

    python bench/shard_tests.py 4
"""

from __future__ import annotations

import glob
import os
import sys

SUBPROCESS_FACTOR = 4

# Files whose size says far too little, weighted from a GPU run instead (session 9's ptests: at
# ~0.6 ms of run time per weight unit, test_token_decoder_variant.py's subprocess re-runs took
# ~137 s, about test_mla.py's share; its size gave it a tenth of that, and its shard ran out of
# time while the other three finished in 102-210 s).
MEASURED = {"test_token_decoder_variant.py": 230000}


def weight(path: str) -> int:
    if os.path.basename(path) in MEASURED:
        return MEASURED[os.path.basename(path)]
    text = open(path).read()
    size = len(text)
    return size * SUBPROCESS_FACTOR if ("run_tests_with_env(" in text or "run_script_with_env(" in text) else size


def shards(n: int, root: str = ".") -> list[list[str]]:
    files = sorted(glob.glob(os.path.join(root, "tests", "test_*.py")))
    groups: list[tuple[int, list[str]]] = [(0, []) for _ in range(n)]
    for f in sorted(files, key=weight, reverse=True):
        i = min(range(n), key=lambda j: groups[j][0])
        groups[i] = (groups[i][0] + weight(f), groups[i][1] + [os.path.relpath(f, root)])
    return [g for _, g in groups if g]


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    if n < 1:
        sys.exit("the number of groups must be >= 1")
    for group in shards(n):
        print(" ".join(group))
