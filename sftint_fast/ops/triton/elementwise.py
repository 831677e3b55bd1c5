"""The trie engine's elementwise ops on CUDA, fused in Triton: RMSNorm, rotary embedding, the SiLU gate.

Why: in the layer loop of a small model the GEMMs of a bf16 pass finish in microseconds, and HF's elementwise
code costs more than they do. Its RMSNorm is seven kernels with float32 intermediates (each a full read and
write of the activations), rotate-half RoPE five per tensor, the gated MLP's ``act(gate) * up`` two: about 22 of
the ~48 launches of a layer, and most of its memory traffic. Each op here is one launch that reads its inputs
once and writes its output once.

Same numbers as the HF code each op replaces: float32 inside, and a rounding to the storage dtype exactly where
the HF code rounds (Llama's RMSNorm rounds the normalized row before the weight multiply, Gemma-3's after it; RoPE
rounds ``x * cos``, ``rotate_half(x) * sin`` and their sum; the gate rounds ``silu(gate)`` before the multiply).
Differences left are float32 reduction order and the last bit of ``exp``/``rsqrt``. Tests compare every op with
the HF modules (``tests/test_triton_elementwise.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sftint_fast.ops.triton import check_interpreter

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Elements a program of the row-wise kernels holds (rows x padded columns). RoPE holds six tiles of half that
#: (x1, x2 and their products), so its programs take half as many: 128-170 registers per thread on sm_90 at 4096
#: (fewer resident warps for a memory-bound op), 56-96 at 2048; no kernel here spills (Triton 3.9's ptxas, bf16/fp32).
_TILE = 4096
_ROPE_TILE = 2048


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_rows, n_cols, stride_x, stride_y, eps,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, GEMMA: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    normed = x * tl.rsqrt(tl.sum(x * x, 1) / n_cols + eps)[:, None]
    if GEMMA:  # (x * (1 + w)).to(dtype)
        y = normed * (1.0 + w)[None, :]
    else:      # w * x.to(dtype)
        y = normed.to(x_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


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


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dt = y_ptr.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # torch rounds silu's output before the multiply
    tl.store(y_ptr + offs, (act * u).to(dt), mask=mask)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name}: expected a float16, bfloat16 or float32 tensor, got {got}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, gemma: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x [..., H]`` with ``weight [H]``, as HF computes it.

    ``gemma=False`` (Llama, Qwen2, Mistral): ``weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)``, in the promoted
    dtype of ``weight`` and ``x``. ``gemma=True`` (Gemma-3):
    ``(x * rsqrt(mean(x²) + eps) * (1 + weight)).to(x.dtype)``.
    Statistics in float32.
    """
    _check_float("x", x)
    _check_float("weight", weight)
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
    out_dtype = x.dtype if gemma or weight.dtype == x.dtype else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(rows_in.shape, dtype=out_dtype, device=x.device)
    n_rows = rows_in.shape[0]
    if n_rows and cols:
        block = triton.next_power_of_2(cols)
        rows = max(1, min(_TILE // block, triton.next_power_of_2(n_rows)))
        _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
            rows_in, weight.contiguous(), y, n_rows, cols, rows_in.stride(0), y.stride(0), float(eps),
            ROWS=rows, BLOCK=block, GEMMA=bool(gemma))
    return y.view(*x.shape[:-1], cols)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of ``x [N, heads, D]`` with per-token tables ``cos, sin [N, D]``:
    ``x * cos + rotate_half(x) * sin`` (HF's ``apply_rotary_pos_emb``), with its roundings, in ``x``'s dtype."""
    _check_float("x", x)
    if x.dim() != 3 or x.shape[-1] % 2:
        raise ValueError(f"x: expected shape [N, heads, D] with D even, got {tuple(x.shape)}")
    expected = (x.shape[0], x.shape[2])
    for name, table in (("cos", cos), ("sin", sin)):
        _check_float(name, table)
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
        block_t = max(1, min(_ROPE_TILE // (block_h * block_d), 64))
        _rope_kernel[(triton.cdiv(n_tokens, block_t),)](
            x, cos, sin, y, n_tokens, n_heads, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
            y.stride(0), y.stride(1), HALF=half, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d)
    return y


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (the gated MLP's inner product), ``silu`` rounded to the dtype first, as torch does."""
    _check_float("gate", gate)
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
        _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, y, n, BLOCK=block)
    return y
