"""RMSNorm as one Triton launch (the trie's layer loop on CUDA): HF's is seven kernels with float32 intermediates.

Same numbers as the HF module it stands in for: statistics in float32, and the rounding to the storage dtype where
HF rounds it (Llama / Qwen2 / Mistral: the normalized row, before the weight multiply; Gemma-3: after ``1 + w``;
OLMo-2/3: after the weight multiply).
What is left is float32 reduction order and the last bit of ``rsqrt``. Tests:
``tests/test_triton_elementwise.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sftint_fast.ops.triton import check_float, check_interpreter, on_device

#: Elements a program holds (rows x padded columns): 86-95 registers on sm_90, no spills (Triton 3.9's ptxas).
_TILE = 4096


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_rows, n_cols, stride_x, stride_y, eps,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, GEMMA: tl.constexpr, OLMO: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(x * x, 1) / n_cols + eps)[:, None]
    if GEMMA:  # (x * (1 + w)).to(dtype)
        y = normed * (1.0 + w)[None, :]
    elif OLMO:  # (w * x).to(dtype)
        y = normed * w[None, :]
    else:      # w * x.to(dtype)
        y = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, gemma: bool = False,
             olmo: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x [..., H]`` with ``weight [H]``, as HF computes it.

    ``gemma=False`` (Llama, Qwen2, Qwen3, Mistral, SmolLM3): ``weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)``, in
    the promoted dtype of ``weight`` and ``x``. ``gemma=True`` (Gemma-3):
    ``(x * rsqrt(mean(x²) + eps) * (1 + weight)).to(x.dtype)``. ``olmo=True`` (OLMo-2, OLMo-3):
    ``(weight * (x * rsqrt(mean(x²) + eps))).to(x.dtype)``, the product in float32.
    Statistics in float32.
    """
    if gemma and olmo:
        raise ValueError("gemma and olmo: expected at most one of the two norm forms, received both")
    check_float("x", x)
    check_float("weight", weight)
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight: expected shape ({x.shape[-1] if x.dim() else '?'},) (x's last dimension), got "
                         f"{tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected device {x.device} (that of x), got {weight.device}")
    check_interpreter(x.device)
    cols = x.shape[-1]
    rows_in = x.reshape(-1, cols)
    if rows_in.stride(-1) != 1:
        rows_in = rows_in.contiguous()
    out_dtype = x.dtype if gemma or olmo or weight.dtype == x.dtype else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(rows_in.shape, dtype=out_dtype, device=x.device)
    n_rows = rows_in.shape[0]
    if n_rows and cols:
        block = triton.next_power_of_2(cols)
        rows = max(1, min(_TILE // block, triton.next_power_of_2(n_rows)))
        with on_device(x.device):
            _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
                rows_in, weight.contiguous(), y, n_rows, cols, rows_in.stride(0), y.stride(0), float(eps),
                ROWS=rows, BLOCK=block, GEMMA=bool(gemma), OLMO=bool(olmo))
    return y.view(*x.shape[:-1], cols)
