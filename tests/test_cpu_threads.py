"""The CPU kernels run on torch's intra-op threads.

at::parallel_for is a header template that runs its whole range on the calling thread in code
compiled without OpenMP when torch itself uses OpenMP (its Linux wheels): until session 23 the
extension was built that way and every CPU kernel ran on one thread. These tests check the build
(the extension is compiled with OpenMP where torch uses it) and that results at several thread
counts each match the reference, and repeat bit for bit at a fixed count (the documented rule).
"""

from __future__ import annotations

import sys

import pytest
import torch

import kvcore
from conftest import LSE_TOL, OUT_TOL, make_paged_kv, randn
from kvcore import reference


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="torch does not run its CPU ops on OpenMP here")
def test_extension_links_the_openmp_runtime():
    """Where torch's parallel_for is OpenMP, kvcore._C must be compiled with -fopenmp, or its
    parallel_for calls run serially: compiled so, they start parallel regions through GOMP_parallel
    (an undefined symbol of the extension, resolved in the libgomp torch loaded), and only that
    one libgomp is mapped."""
    with open(kvcore._C.__file__, "rb") as f:
        assert b"GOMP_parallel" in f.read(), "kvcore._C was compiled without -fopenmp: its CPU kernels run on one thread"
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "/libgomp" in line}
    assert len(runtimes) == 1, f"more than one OpenMP runtime loaded: {sorted(runtimes)}"


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("lens", [[1500, 0, 1, 333, 70], [3000]], ids=["ragged5", "one"])
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_gqa_decode_matches_reference_at_each_thread_count(threads, lens, restore_threads):
    """At 1-4 threads, ragged sequences (one empty, one of a single token) and one long sequence
    (cut into 2 x threads parts, so the parts run on different threads and are merged): each
    result matches the reference, and a second call at the same count gives the same bits
    (outputs poisoned before each call)."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(100 + threads + len(lens))
    kv = make_paged_kv(lens, 16, 2, 64, gen=gen, dtype=torch.bfloat16)
    q = randn(len(lens), 8, 64, gen=gen, dtype=torch.bfloat16)
    ref_out, ref_lse = reference.gqa_decode(q.float(), kv.k_cache.float(), kv.v_cache.float(), kv.block_table,
                                            kv.seq_lens)
    results = []
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        lse = torch.full((len(lens), 8), float("nan"))
        kvcore.gqa_decode(q, kv.k_cache, kv.v_cache, kv.block_table, kv.seq_lens, out=out, lse=lse)
        torch.testing.assert_close(out.float(), ref_out, **OUT_TOL[torch.bfloat16])
        torch.testing.assert_close(lse, ref_lse, **LSE_TOL)
        results.append((out, lse))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
