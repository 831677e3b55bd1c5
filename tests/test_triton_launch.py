"""How kernels are launched on a GPU, checked on the CPU: the device they run on and the matmul precision they follow.

Triton launches on the *current* CUDA device and its current stream, not on the tensors' device; and torch's float32
matmul precision has two APIs, of which reading the legacy one raises once the new one was used.
"""
import contextlib

import pytest
import torch

from sftint_fast.engine import _compute_context

from conftest import tiny_model


@pytest.mark.parametrize("caller", ["ieee", "tf32"])
def test_compute_dtype_tf32_with_the_new_precision_api(caller):
    """``compute_dtype="tf32"`` on CUDA switches TF32 on and restores the caller's setting, also when the caller used
    torch's new ``fp32_precision`` API (reading the legacy ``allow_tf32`` then raises a RuntimeError)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API (< 2.9)")
    previous = matmul.fp32_precision
    model = tiny_model("llama")
    try:
        matmul.fp32_precision = caller
        with _compute_context(model, "tf32", torch.device("cuda")):
            assert matmul.fp32_precision == "tf32"
        assert matmul.fp32_precision == caller
    finally:
        matmul.fp32_precision = previous


def test_on_device_makes_the_tensors_gpu_current():
    from sftint_fast.ops.triton import on_device

    guard = on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(on_device(torch.device("cpu")), contextlib.nullcontext)


def _ops():
    """(module, kernel name, call) for every Triton op, on small CPU tensors (the interpreter)."""
    from sftint_fast.ops.triton import rms_norm, rope, silu_mul, subset_attention, transforms

    i64 = dict(dtype=torch.int64)
    x = torch.randn(3, 2, 8)
    attention_args = (torch.randn(2, 2, 2, 16), torch.randn(7, 1, 16), torch.randn(7, 1, 16),
                      *(torch.tensor(pair, **i64) for pair in ([0, 1], [0, 3], [3, 2], [0, 1], [0, 3])))
    return [
        (rms_norm, "_rms_norm_kernel", lambda: rms_norm.rms_norm(x, torch.ones(8), 1e-6)),
        (rope, "_rope_kernel", lambda: rope.rope(x, torch.randn(3, 8), torch.randn(3, 8))),
        (silu_mul, "_silu_mul_kernel", lambda: silu_mul.silu_mul(x, x)),
        (transforms, "_butterfly_kernel", lambda: transforms.butterfly(torch.randn(2, 16), "subset_mobius")),
        (subset_attention, "_subset_attention_kernel",
         lambda: subset_attention.subset_attention(*attention_args, level=1, scale=0.25)),
    ]


@pytest.mark.parametrize("index", range(5), ids=["rms_norm", "rope", "silu_mul", "butterfly", "subset_attention"])
def test_every_kernel_launches_on_its_tensors_device(index, monkeypatch):
    """Each launcher makes its tensors' device current around the launch (Triton launches on the current device: a
    model on ``cuda:1`` while ``cuda:0`` is current had its kernels run on ``cuda:0``, reading another GPU's memory
    outside the stream order of the torch ops around them)."""
    module, name, call = _ops()[index]
    entered, launched = [], []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        yield
        entered.append(None)

    kernel = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append(len(entered) % 2 == 1)  # inside an entered, not yet exited guard
                return kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(module, "on_device", recording)
    monkeypatch.setattr(module, name, Spy())
    call()
    assert launched and all(launched)
    assert entered[0] == torch.device("cpu")
