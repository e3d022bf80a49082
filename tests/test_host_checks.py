"""Arithmetic the kernels share, checked on the host by small C++ programs (tests/cpp/): each is
compiled with the system C++ compiler against the library's own header and run. They need no GPU,
no CUDA toolkit and no kvcore build, so they run on every machine, CI's included.

- split_range_check.cpp: csrc/include/kvcore/split_range.h, how every split-KV decode kernel
  (CUDA) cuts a sequence's keys into its splits: the ranges cover each sequence once, in whole
  tiles of at most split_tokens, and a sequence that fills its block table is cut as before.
- split_plan_check.cpp: csrc/include/kvcore/split_plan.h, the automatic split count with
  gqa_decode's host-side length hint: a full hint plans as none, any hint stays in bounds, and
  the picks on the H100 rows sessions 26 and 27 measured (best forced count or within 3%, two
  rows noted).
- half_bits_check.cpp: csrc/common/cpu_half_bits.h, the CPU kernels' fp16 -> fp32 row
  conversion, on all 65,536 bit patterns at every vector width (the baseline, AVX2 and AVX-512
  copies), also compiled with -mavx2 -mfma -mf16c, and with -mavx512f added, where this CPU has
  them (the instructions the AVX2 and AVX-512 copies use, vcvtph2ps in both forms among them).
- lane_sum_check.cpp: csrc/common/cpu_attention.h's lane sums (lane_sum at 16, 32 and 64 bytes,
  lane_sums16) in their shuffle forms and the scalar fallback of compilers without
  __builtin_shufflevector, against the documented tree bit for bit; also under AVX-512 flags.
"""

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


def _cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def _has_avx2() -> bool:
    return {"avx2", "fma", "f16c"} <= _cpu_flags()


def _has_avx512() -> bool:
    return _has_avx2() and {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= _cpu_flags()


CHECKS = [
    pytest.param("split_range_check.cpp", "csrc/include", [], id="split_range"),
    pytest.param("split_plan_check.cpp", "csrc/include", [], id="split_plan"),
    pytest.param("half_bits_check.cpp", "csrc", [], id="half_bits"),
    pytest.param("half_bits_check.cpp", "csrc", ["-mavx2", "-mfma", "-mf16c"], id="half_bits-avx2",
                 marks=pytest.mark.skipif(not _has_avx2(), reason="this CPU lacks AVX2, FMA or F16C")),
    pytest.param("half_bits_check.cpp", "csrc", ["-mavx2", "-mfma", "-mf16c", "-mavx512f"], id="half_bits-avx512",
                 marks=pytest.mark.skipif(not _has_avx512(), reason="this CPU lacks AVX-512 (F, BW, DQ, VL)")),
    pytest.param("lane_sum_check.cpp", "csrc", [], id="lane_sum"),
    pytest.param("lane_sum_check.cpp", "csrc", ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq",
                                                "-mavx512vl"], id="lane_sum-avx512",
                 marks=pytest.mark.skipif(not _has_avx512(), reason="this CPU lacks AVX-512 (F, BW, DQ, VL)")),
]


@pytest.mark.parametrize("source, include, flags", CHECKS)
def test_host_check_program(source, include, flags, tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path / source.replace(".cpp", "")
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-psabi", "-Werror", *flags,
                            f"-I{ROOT / include}", str(ROOT / "tests" / "cpp" / source), "-o", str(exe)],
                           capture_output=True, text=True, timeout=180)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 failures" in run.stdout and "checked 0 " not in run.stdout, run.stdout
    if source == "half_bits_check.cpp" and "-mf16c" in flags:  # the AVX2 copy's vcvtph2ps path ran too
        assert "with the F16C path" in run.stdout, run.stdout
    if source == "half_bits_check.cpp" and "-mavx512f" in flags:  # and the AVX-512 copy's zmm form
        assert "with the AVX-512 F16C path" in run.stdout, run.stdout
