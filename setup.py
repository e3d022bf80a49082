"""Build of kvcore._C, the compiled half of kvcore.

One source list for both builds (this file and CMakeLists.txt): every ``csrc/**/*.cpp`` always,
and every ``csrc/**/*.cu`` when a CUDA toolchain matches the installed torch. Without one the
build is CPU-only and says so loudly; ``KVCORE_REQUIRE_CUDA=1`` turns that into an error, which is
what CI uses so that CUDA code that does not compile never lands.

Environment:
  TORCH_CUDA_ARCH_LIST   GPU targets (default "9.0a": Hopper, the performance target).
  KVCORE_REQUIRE_CUDA=1  fail instead of falling back to a CPU-only build.
  KVCORE_FORCE_CPU=1     build CPU kernels only even when CUDA is available.
  MAX_JOBS               parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def _cuda_toolchain() -> tuple[bool, str]:
    """Return (usable, reason) for building the CUDA sources."""
    if os.environ.get("KVCORE_FORCE_CPU", "0") == "1":
        return False, "KVCORE_FORCE_CPU=1"
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, nvcc


def _cuda_library_includes() -> list[str]:
    # torch's CUDA wheels ship the CUDA library headers (cuBLAS, cuSPARSE, ...) under
    # site-packages/nvidia/cu13/include; torch's own headers include them.
    # Look beside torch itself too: in a venv with --system-site-packages (or any layout where
    # torch is not in this interpreter's own site-packages) the headers sit next to torch.
    import torch

    bases = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))}
    out = []
    for base in sorted(bases):
        out += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include")))
    return list(dict.fromkeys(out))


def _loaded_library(fragment: str) -> list[str]:
    """The path of a shared library this process has mapped whose path contains ``fragment``
    (after importing torch, so torch's own runtimes are there): ``[path]``, or ``[]`` (Linux)."""
    import torch  # noqa: F401  (maps the runtimes torch links against)

    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if fragment in line and ".so" in line})
    except OSError:
        return []
    return libs[:1]


def _libstdcxx_link_args() -> list[str]:
    """Link the C++ runtime that torch itself loaded, by path (Linux).

    Some toolchains (seen on the GPU host: a g++ wrapper) link libstdc++ statically into shared
    objects. The extension then carries a second copy of libstdc++ beside the one torch loads,
    and the two copies' stream/locale state collide: formatting a number into an error message
    (any TORCH_CHECK with a shape or a value in it) crashed the process. Naming the shared
    library explicitly makes the linker resolve the runtime from it, so only one copy exists.
    """
    if not sys.platform.startswith("linux"):
        return []
    return _loaded_library("/libstdc++.so")


def _openmp_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link arguments) for OpenMP where torch's own CPU ops run on it (Linux).

    at::parallel_for is a header template: in a translation unit compiled without OpenMP it runs
    the whole range on the calling thread (ATen/ParallelOpenMP.h defines INTRA_OP_PARALLEL only
    under _OPENMP), so until session 23 every CPU kernel here ran on one thread whatever
    torch.get_num_threads() said. The runtime linked is the libgomp torch itself loaded, named by
    path (some torch wheels ship it renamed, e.g. libgomp-<hash>.so.1): kvcore then shares torch's
    thread pool and torch.set_num_threads governs both. Plain -fopenmp when that copy is not found.
    """
    import torch

    if not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()):
        return [], []
    return ["-fopenmp"], (_loaded_library("/libgomp") or ["-fopenmp"])


def _extension():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    # No -std flag: BuildExtension adds the standard the installed torch needs (its headers may
    # require C++20, as torch 2.14.1 does, where an explicit -std=c++17 breaks the build).
    openmp_compile, openmp_link = _openmp_flags()
    cxx_flags = ["-O3"] + openmp_compile
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    cpu_sources = _sources("*.cpp")
    cuda_ok, why = _cuda_toolchain()
    if not cuda_ok:
        if os.environ.get("KVCORE_REQUIRE_CUDA", "0") == "1":
            sys.exit(f"kvcore: KVCORE_REQUIRE_CUDA=1 but the CUDA build is not possible: {why}")
        print(f"\n*** kvcore: building the CPU kernels only ({why}); CUDA ops will be unavailable ***\n", file=sys.stderr)
        return CppExtension("kvcore._C", cpu_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=_libstdcxx_link_args() + openmp_link)

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    print(f"kvcore: building CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    nvcc_flags = [
        "-O3",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-DKVCORE_WITH_CUDA",
    ]
    if os.environ.get("KVCORE_PTXAS_VERBOSE", "0") == "1":
        nvcc_flags.append("-Xptxas=-v")
    return CUDAExtension(
        "kvcore._C",
        cpu_sources + _sources("*.cu"),
        include_dirs=include_dirs + _cuda_library_includes(),
        extra_compile_args={"cxx": cxx_flags + ["-DKVCORE_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=_libstdcxx_link_args() + openmp_link,
    )


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    # Every package under python/ (kvcore.policies and kvcore.integrations were missing from the
    # explicit list, so only editable installs had them); tests/test_packaging.py checks it.
    packages=find_packages(where="python"),
    package_dir={"": "python"},
    ext_modules=[_extension()],
    cmdclass=_cmdclass(),
)
