"""The gated MLP's ``silu(gate) * up`` as one Triton launch (the trie's layer loop on CUDA; torch: two kernels).

Same numbers as torch: ``silu`` in float32, rounded to the dtype before the multiply. Tests:
``tests/test_triton_elementwise.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sftint_fast.ops.triton import check_float, check_interpreter, on_device


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dt = y_ptr.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # torch rounds silu's output before the multiply
    tl.store(y_ptr + offs, (act * u).to(dt), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the gated MLP's inner product), ``silu`` rounded to the dtype first, as torch does."""
    check_float("gate", gate)
    if not isinstance(up, torch.Tensor) or up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        got = f"{up.dtype} {tuple(up.shape)} on {up.device}" if isinstance(up, torch.Tensor) else type(up).__name__
        raise ValueError(f"up: expected {gate.dtype} of shape {tuple(gate.shape)} on {gate.device} (those of gate), "
                         f"got {got}")
    check_interpreter(gate.device)
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = y.numel()
    if n:
        block = 1024
        with on_device(gate.device):
            _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, y, n, BLOCK=block)
    return y
