"""The split-KV range arithmetic shared by the CUDA decode kernels and their launchers
(csrc/include/kvcore/split_range.h), checked on the host: tests/cpp/split_range_check.cpp is
compiled with the system C++ compiler and run. It needs no GPU and no CUDA toolkit, so the
arithmetic every CUDA decode kernel's ranges come from is checked on CPU-only machines too."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_split_ranges_cover_each_sequence_once(tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path / "split_range_check"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc' / 'include'}",
                            str(ROOT / "tests" / "cpp" / "split_range_check.cpp"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failures" in run.stdout and "checked 0 " not in run.stdout, run.stdout
