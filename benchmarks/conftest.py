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
