#!/usr/bin/env bash
# The test command (README, CI): install the build and test requirements, build kvcore in place
# (CPU kernels always; CUDA kernels too when nvcc matches torch's CUDA), run the test suite.
# CUDA tests run when a GPU is present and are skipped otherwise. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch numpy ninja pybind11 setuptools wheel pytest hypothesis
# Optional extra, installed so that tests/test_transformers_integration.py runs in CI.
python3 -m pip install -q 'transformers>=4.56'
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ "${CI:-}" = true ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  export KVCORE_REQUIRE_CUDA=1  # CI: CUDA code that does not compile must fail the run
fi
python3 -m pip install -q --no-build-isolation --no-deps -e .
python3 -c 'import kvcore; print("kvcore", kvcore.__version__, "CUDA kernels built:", kvcore.cuda_kernels_built())'
python3 -m pytest tests -q -p no:cacheprovider "$@"
