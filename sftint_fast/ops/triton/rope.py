"""Rotate-half rotary embedding as one Triton launch per tensor (the trie's layer loop on CUDA): HF's
``apply_rotary_pos_emb`` is five kernels per tensor.

Same numbers as HF: it rounds ``x * cos``, ``rotate_half(x) * sin`` and their sum to the dtype, and so does this
kernel. Tests: ``tests/test_triton_elementwise.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sftint_fast.ops.triton import check_float, check_interpreter, on_device

#: Elements of a program's tiles: it holds six of them (x1, x2 and the products), so 2048, not 4096 (128-181
#: registers per thread on sm_90, fewer resident warps for a memory-bound op): 56-96 registers, no spills.
_TILE = 2048


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_tokens, n_heads, stride_xt, stride_xh, stride_ct, stride_st,
                 stride_yt, stride_yh, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    # y = x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1):
    # on the halves, y1 = x1 c1 - x2 s1 and y2 = x2 c2 + x1 s2
    toks = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    heads = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    t_ok = toks < n_tokens
    mask = t_ok[:, None, None] & (heads < n_heads)[None, :, None] & (d < HALF)[None, None, :]
    x_off = toks[:, None, None] * stride_xt + heads[None, :, None] * stride_xh + d[None, None, :]
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
    t_mask = t_ok[:, None] & (d < HALF)[None, :]
    c_off = toks[:, None] * stride_ct + d[None, :]
    s_off = toks[:, None] * stride_st + d[None, :]
    c1 = tl.load(cos_ptr + c_off, mask=t_mask, other=0.0).to(tl.float32)[:, None, :]
    c2 = tl.load(cos_ptr + c_off + HALF, mask=t_mask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(sin_ptr + s_off, mask=t_mask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(sin_ptr + s_off + HALF, mask=t_mask, other=0.0).to(tl.float32)[:, None, :]
    dt = y_ptr.dtype.element_ty  # HF rounds each product to the dtype, then their sum
    y1 = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
    y2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    y_off = toks[:, None, None] * stride_yt + heads[None, :, None] * stride_yh + d[None, None, :]
    tl.store(y_ptr + y_off, y1.to(dt), mask=mask)
    tl.store(y_ptr + y_off + HALF, y2.to(dt), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of ``x [N, heads, D]`` with per-token tables ``cos, sin [N, D]``:
    ``x * cos + rotate_half(x) * sin`` (HF's ``apply_rotary_pos_emb``), with its roundings, in ``x``'s dtype."""
    check_float("x", x)
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"x: expected shape [N, heads, D] with D even, got {tuple(x.shape)}")
    expected = (x.shape[0], x.shape[2])
    for name, table in (("cos", cos), ("sin", sin)):
        check_float(name, table)
        if tuple(table.shape) != expected or table.device != x.device:
            raise ValueError(f"{name}: expected shape {expected} on {x.device}, got {tuple(table.shape)} on "
                             f"{table.device}")
    check_interpreter(x.device)
    tensors = [t if t.stride(-1) == 1 else t.contiguous() for t in (x, cos, sin)]
    x, cos, sin = tensors
    n_tokens, n_heads, dim = x.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if y.numel():
        half = dim // 2
        block_h, block_d = triton.next_power_of_2(n_heads), triton.next_power_of_2(half)
        block_t = max(1, min(_TILE // (block_h * block_d), 64))
        with on_device(x.device):
            _rope_kernel[(triton.cdiv(n_tokens, block_t),)](
                x, cos, sin, y, n_tokens, n_heads, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                y.stride(0), y.stride(1), HALF=half, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d)
    return y
