"""Deal the tests into N groups of about equal expected run time, one line per group, for
bench/gpu_stages.sh's `ptests` / `xtests` stages (parallel pytest processes on one GPU).

By file (`ptests`, the default): one line of test files per group. The weight of a file is its
size, times 4 when it re-runs other files in subprocesses (the kernel-switch tests:
run_tests_with_env / run_script_with_env), which makes it far slower than its size says. Largest
first into the lightest group.

By test (`--by-test`, the `xtests` stage): the subprocess tests (test functions that call
run_tests_with_env / run_script_with_env, found in the source) are 20-160 s each on the GPU and
most of the suite's time, so each of their collected node ids (one per parametrization) is dealt
on its own; the files' other tests are dealt by file. A line is then `FILES | NODE_IDS`, and the
file part must run with `--deselect` of every subprocess test (`--subprocess-tests` prints them),
since they run as node ids.

    python bench/shard_tests.py 4
    python bench/shard_tests.py --by-test 8
    python bench/shard_tests.py --subprocess-tests
"""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys

SUBPROCESS_FACTOR = 4

# Files whose size says far too little, weighted from a GPU run instead (session 9's ptests: at
# ~0.6 ms of run time per weight unit, test_token_decoder_variant.py's subprocess re-runs took
# ~137 s, about test_mla.py's share; its size gave it a tenth of that, and its shard ran out of
# time while the other three finished in 102-210 s).
MEASURED = {"test_token_decoder_variant.py": 230000}

# By test: a subprocess test's weight in the same units (~0.6 ms each), by test function name.
# Session 16's xtests (8 processes on one H200): the token-decoder variant re-runs 170-276 s
# each, gqa_decode's switch re-runs 33-38 s, the agreement checks 14-25 s. Session 18's call 2
# (8 processes, these nodes one or two to a process): the token-decoder variant re-runs 105-174 s
# (stages=2|3 105, the kernel variants 170-174), the MLA switch re-runs 46-80 s, MLA's H16 old
# path 76 s, the fused max-64 projection 35 s, attention_scores' variant re-run 44 s and its
# agreement check 36 s.
NODE_WEIGHT = 70000
NODE_MEASURED = {
    "test_variant_passes_the_token_decoder_cuda_tests_in_subprocess": 280000,
    "test_mla_decode_cuda_wgmma_switch_in_subprocess": 110000,
    "test_mla_decode_cuda_h16_old_path_in_subprocess": 130000,
    "test_mla_latent_project_cuda_fused_max_64_in_subprocess": 60000,
    "test_variant_agrees_with_the_default_kernel_in_subprocess": 35000,
}
SUBPROCESS_CALLS = ("run_tests_with_env", "run_script_with_env")


def weight(path: str) -> int:
    if os.path.basename(path) in MEASURED:
        return MEASURED[os.path.basename(path)]
    text = open(path).read()
    size = len(text)
    return size * SUBPROCESS_FACTOR if any(c + "(" in text for c in SUBPROCESS_CALLS) else size


def test_files(root: str = ".") -> list[str]:
    return sorted(os.path.relpath(f, root) for f in glob.glob(os.path.join(root, "tests", "test_*.py")))


def deal(items: list[tuple[int, str, str]], n: int) -> list[tuple[list[str], list[str]]]:
    """items: (weight, kind 'file' or 'node', name); largest first into the lightest group."""
    groups: list[tuple[int, list[str], list[str]]] = [(0, [], []) for _ in range(n)]
    for w, kind, name in sorted(items, key=lambda t: t[0], reverse=True):
        i = min(range(n), key=lambda j: groups[j][0])
        tot, files, nodes = groups[i]
        groups[i] = (tot + w, files + [name] if kind == "file" else files, nodes + [name] if kind == "node" else nodes)
    return [(files, nodes) for _, files, nodes in groups if files or nodes]


def shards(n: int, root: str = ".") -> list[list[str]]:
    items = [(weight(os.path.join(root, f)), "file", f) for f in test_files(root)]
    return [files for files, _ in deal(items, n)]


def subprocess_tests(root: str = ".") -> list[str]:
    """Node-id prefixes (file::function) of the test functions that call a subprocess helper,
    directly or through a module-level function of their file that does."""
    found = []
    for f in test_files(root):
        tree = ast.parse(open(os.path.join(root, f)).read())
        funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        called = {n.name: {c.func.id for c in ast.walk(n) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
                  for n in funcs}
        spawners = set(SUBPROCESS_CALLS) | {name for name, calls in called.items()
                                            if not name.startswith("test_") and calls & set(SUBPROCESS_CALLS)}
        found += [f"{f}::{name}" for name, calls in called.items() if name.startswith("test_") and calls & spawners]
    return found


def collect(prefixes: list[str], root: str = ".") -> list[str]:
    """The node ids (one per parametrization) pytest collects for the prefixes, CUDA-marked."""
    if not prefixes:
        return []
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                          *prefixes], cwd=root, capture_output=True, text=True)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if not ids and out.returncode not in (0, 5):
        sys.exit(f"pytest --collect-only failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return ids


def shards_by_test(n: int, root: str = ".") -> list[tuple[list[str], list[str]]]:
    items = []
    for f in test_files(root):
        w = len(open(os.path.join(root, f)).read())
        items.append((w, "file", f))
    for node in collect(subprocess_tests(root), root):
        func = node.split("::")[1].split("[")[0]
        items.append((NODE_MEASURED.get(func, NODE_WEIGHT), "node", node))
    return deal(items, n)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--subprocess-tests"]:
        print("\n".join(subprocess_tests()))
        return
    by_test = argv[:1] == ["--by-test"]
    args = argv[1:] if by_test else argv
    n = int(args[0]) if args else 4
    if n < 1:
        sys.exit("the number of groups must be >= 1")
    if by_test:
        for files, nodes in shards_by_test(n):
            print(" ".join(files) + " | " + " ".join(nodes))
    else:
        for group in shards(n):
            print(" ".join(group))


if __name__ == "__main__":
    main(sys.argv[1:])
