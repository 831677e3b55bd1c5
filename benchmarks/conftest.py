"""Benchmark options: a quick size by default (runs on a 2-core CPU in minutes), `--full` for the issue sizes."""
import os

os.environ.setdefault("TRITON_INTERPRET", "0")

import platform  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False, help="run the full benchmark sizes")
    parser.addoption("--tiny", action="store_true", default=False,
                     help="GPU benchmarks: tiny shapes, runs on CPU (with TRITON_INTERPRET=1) as a dry run")


@pytest.fixture
def full(request) -> bool:
    return bool(request.config.getoption("--full"))


@pytest.fixture
def tiny(request) -> bool:
    return bool(request.config.getoption("--tiny"))


@pytest.fixture
def env_info() -> dict:
    """Device, versions and threads, recorded in every benchmark's extra_info."""
    import transformers

    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # a lent GPU machine has its own packages (no registry): the benchmarks still run and report
    import time

    class _PlainBenchmark:
        """The part of pytest-benchmark's fixture the benchmarks use: ``extra_info``, calling it, ``pedantic``.
        Each timed call's seconds go to ``extra_info["plain_benchmark_seconds"]`` and are printed."""

        def __init__(self, name: str) -> None:
            self.name = name
            self.extra_info: dict = {}

        def _time(self, fn, args, kwargs, rounds: int, iterations: int):
            seconds, result = [], None
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(iterations):
                    result = fn(*args, **kwargs)
                seconds.append((time.perf_counter() - start) / iterations)
            self.extra_info["plain_benchmark_seconds"] = seconds
            print(f"{self.name}: min {min(seconds):.6f} s over {rounds} round(s) (pytest-benchmark not installed)")
            return result

        def __call__(self, fn, *args, **kwargs):
            return self._time(fn, args, kwargs, rounds=3, iterations=1)

        def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
            if setup is not None:
                setup()
            for _ in range(warmup_rounds):
                target(*args, **(kwargs or {}))
            return self._time(target, args, kwargs or {}, rounds, iterations)

    @pytest.fixture
    def benchmark(request):
        return _PlainBenchmark(request.node.name)


_TABLES = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def summary_tables(request) -> dict:
    """``{title: [header, row, ...]}``: the rows benchmarks add here are printed as tables at the end of the run
    (with or without ``-s``)."""
    return request.config.stash.setdefault(_TABLES, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for title, rows in config.stash.get(_TABLES, {}).items():
        if len(rows) < 2:
            continue
        cells = [[str(cell) for cell in row] for row in rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        terminalreporter.write_sep("=", title)
        for row in cells:
            terminalreporter.write_line("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
