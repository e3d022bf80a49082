"""What a non-editable install gets: the source distribution and the wheel's Python packages.

The suite itself runs on an editable install (tests/run.sh), which reads python/ and csrc/ in
place, so neither of these would show there: an sdist without the headers fails at its first
``#include`` on the user's machine, and a wheel without a subpackage fails at its import.

Both checks run setup.py's own commands on a copy of the build inputs (no compiler involved):
``sdist`` for the archive's contents and ``build_py`` for the packages a wheel would carry.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "CMakeLists.txt", "csrc", "python", "docs"]


def _py_files(base: Path) -> set[str]:
    return {p.relative_to(base).as_posix() for p in base.rglob("*.py") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def build_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the build inputs without build products (the in-place _C library, caches)."""
    dst = tmp_path_factory.mktemp("pkg") / "src"
    dst.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for name in BUILD_INPUTS:
        src = ROOT / name
        if not src.exists():
            continue  # (the checks below say what is missing)
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=ignore)
        else:
            shutil.copy2(src, dst / name)
    return dst


def _setup(tree: Path, *args: str) -> None:
    # KVCORE_FORCE_CPU: these commands compile nothing, and the check must not depend on nvcc.
    # KVCORE_REQUIRE_CUDA (set by tests/run.sh under CI) would turn that forced CPU build into an error.
    env = {k: v for k, v in os.environ.items() if k != "KVCORE_REQUIRE_CUDA"}
    env["KVCORE_FORCE_CPU"] = "1"
    res = subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=tree, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, f"setup.py {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


def test_sdist_carries_every_build_input(build_tree: Path, tmp_path: Path) -> None:
    _setup(build_tree, "sdist", "-d", str(tmp_path))
    (archive,) = tmp_path.glob("kvcore-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    inside = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}

    csrc = {p.relative_to(build_tree).as_posix() for p in (build_tree / "csrc").rglob("*") if p.is_file()}
    assert any(n.endswith(".cuh") for n in csrc) and any(n.endswith(".cu") for n in csrc), "csrc copy is incomplete"
    needed = csrc | {"setup.py", "pyproject.toml", "CMakeLists.txt", "README.md"}
    needed |= {f"python/kvcore/{n}" for n in _py_files(build_tree / "python" / "kvcore")}
    missing = sorted(needed - inside)
    assert not missing, f"the sdist lacks {len(missing)} build inputs, e.g. {missing[:10]}"
    assert not [n for n in inside if n.endswith((".so", ".o", ".pyc"))], "the sdist carries build products"


def test_wheel_packages_cover_every_module(build_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "lib"
    _setup(build_tree, "build_py", "-d", str(out))
    want = _py_files(build_tree / "python")
    got = _py_files(out)
    missing = sorted(want - got)
    assert not missing, f"a wheel would lack {missing}"
    # The two subpackages an explicit package list once left out.
    assert {"kvcore/policies/__init__.py", "kvcore/integrations/__init__.py"} <= got


def test_unloadable_library_says_how_to_build(tmp_path: Path) -> None:
    # A build against another torch fails at load time with an undefined symbol; the import error
    # must say how to rebuild. Simulated by refusing kvcore._C's import in a fresh interpreter.
    script = tmp_path / "load.py"
    script.write_text(
        "import importlib.abc, sys\n"
        "class Refuse(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'kvcore._C':\n"
        "            raise ImportError('undefined symbol: _ZN3c10simulated')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import kvcore\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: kvcore's compiled library (kvcore._C) could not be loaded"), res.stderr[-2000:]
    assert "undefined symbol: _ZN3c10simulated" in last and "pip install --no-build-isolation" in last
