"""Möbius transform on a batch of rows: C++ butterfly vs the torch fallback vs the dense 2^n×2^n matmul
that existing interaction code uses. Ratios are measured in one run, on the same inputs."""
import statistics
import time

import pytest
import torch

from sftint_fast import _ext
from sftint_fast.ops import transforms as T

DENSE_LIMIT_BYTES = 4 * 2**30


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _memcpy_bandwidth() -> float:
    """Bytes/s of a plain tensor copy (read + write), the machine's practical limit for a memory-bound pass."""
    src = torch.empty(64 * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), 7)
    return 2 * src.numel() * src.element_size() / seconds


@pytest.mark.skipif(not _ext.extension_status()[0], reason="needs the C++ extension")
@pytest.mark.parametrize("n", [10, 12, 14, 16])
def test_mobius_batch64(benchmark, n, full, env_info):
    if n > 12 and not full:
        pytest.skip("n > 12 only with --full")
    rows = 64
    v = torch.randn(rows, 2**n, generator=torch.Generator().manual_seed(n))
    repeats = 5 if n >= 14 else 20

    fast = benchmark.pedantic(lambda: torch.ops.sftint.subset_mobius(v), rounds=repeats, warmup_rounds=1)
    cpp_s = _median_seconds(lambda: torch.ops.sftint.subset_mobius(v), repeats)
    torch_s = _median_seconds(lambda: T._torch_butterfly(v, "subset_mobius"), repeats)
    torch.testing.assert_close(fast, T._torch_butterfly(v.double(), "subset_mobius").float(), rtol=1e-4, atol=1e-3)

    from sftint_fast import _C

    info = dict(env_info, n=n, rows=rows, dtype="float32", isa=_C.butterfly_isa(), cpp_ms=cpp_s * 1e3,
                torch_fallback_ms=torch_s * 1e3, speedup_vs_torch=torch_s / cpp_s)
    # Pass-equivalent: as if each of the n passes read and wrote every element once, plus the output copy.
    bytes_touched = (2 * n + 2) * v.numel() * v.element_size()
    info["achieved_GBps"] = bytes_touched / cpp_s / 1e9
    # What the C++ kernel moves to and from memory: the input read once, the output written once (a row's
    # passes run in cache), the same traffic as the memcpy it is compared with.
    info["io_GBps"] = 2 * v.numel() * v.element_size() / cpp_s / 1e9
    info["memcpy_GBps"] = _memcpy_bandwidth() / 1e9
    if info["isa"] != "generic":  # the portable 128-bit kernels, for CPUs without the fast instruction set
        _C.set_butterfly_isa("generic")
        try:
            info["cpp_generic_ms"] = _median_seconds(lambda: torch.ops.sftint.subset_mobius(v), repeats) * 1e3
        finally:
            _C.set_butterfly_isa("auto")

    dense_bytes = 4 * 4**n
    if dense_bytes <= DENSE_LIMIT_BYTES:
        matrix = torch.ops.sftint.subset_mobius(torch.eye(2**n))  # row L: coefficient of v(L) in each I(S)
        dense_s = _median_seconds(lambda: v @ matrix, max(3, repeats // 4))
        torch.testing.assert_close(v @ matrix, fast, rtol=1e-3, atol=1e-2)
        info.update(dense_ms=dense_s * 1e3, speedup_vs_dense=dense_s / cpp_s)
        del matrix
    else:
        info["dense"] = f"skipped: the matrix needs {dense_bytes / 2**30:.0f} GiB"
    benchmark.extra_info.update(info)
    print({k: (round(x, 3) if isinstance(x, float) else x) for k, x in info.items()})
