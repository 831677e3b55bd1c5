"""Triton kernels, one op per module. Imported lazily, when an op runs on CUDA (or under TRITON_INTERPRET=1)."""
from __future__ import annotations

import contextlib
import functools
import os

import torch


@functools.cache
def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run our kernels here, or ``None`` when it can.

    Triton's interpreter before 3.7 turns a loop bound into a Python int with ``int(array)``, which numpy 2.4
    rejects for the 1-element arrays the interpreter holds scalars in (3.7 squeezes them first), so every kernel
    with a data-dependent loop fails with numpy's "only 0-dimensional arrays can be converted" message. Compiled
    kernels (CUDA) are not affected.
    """
    import numpy
    import triton

    def version(text: str) -> tuple[int, int]:
        major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"Triton's interpreter (TRITON_INTERPRET=1) needs numpy<2.4 with triton<3.7: got triton "
                f"{triton.__version__} and numpy {numpy.__version__}; install 'numpy<2.4' or triton>=3.7")
    return None


def check_interpreter(device) -> None:
    """Raise a clear ``RuntimeError`` when a kernel cannot run on ``device``: tensors off CUDA without Triton's
    interpreter (compiled kernels would fail on their pointers), or an interpreter that cannot run them here."""
    kind = getattr(device, "type", device)
    if kind == "cuda":
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"Triton kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter "
                           f"(TRITON_INTERPRET=1, set before triton is imported); got {kind} tensors without it: "
                           f"move the model to a GPU or use attention_backend='torch'")
    problem = interpreter_problem()
    if problem is not None:
        raise RuntimeError(problem)


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context to launch a kernel on ``device``'s tensors in: Triton launches on the *current* CUDA device and its
    current stream, so tensors on another GPU (a model on ``cuda:1`` while ``cuda:0`` is current) need their device
    made current (else the kernel runs on the wrong GPU, unordered with the torch ops that wrote its inputs)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


#: Model dtypes the kernels load (a float64 model runs the torch attention).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_float(name: str, t: object) -> None:
    """``TypeError`` unless ``t`` is a float16, bfloat16 or float32 tensor (what the kernels load)."""
    if not isinstance(t, torch.Tensor) or t.dtype not in KERNEL_DTYPES:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name}: expected a float16, bfloat16 or float32 tensor, got {got}")

