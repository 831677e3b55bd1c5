"""Subset/superset Möbius and zeta butterflies over the last dimension (size ``2^n``), in Triton.

Same math and bit order as :mod:`sftint_fast.ops.transforms` (index ``S`` = bitmask, bit ``i`` = player
``i``). Each launch applies a group of ``R`` consecutive bits ``i .. i+R-1`` in registers: a program loads a
tile of ``2^R × U`` elements (``2^R`` positions along those bits times ``U`` contiguous indices below bit
``i``), runs the ``R`` butterfly steps on the tile and stores it once. The first launch covers the low bits
(``U = 1``, the tile is one contiguous block of ``2^R`` values); later launches cover the remaining high bits
a few at a time with ``U`` contiguous columns, so every load is coalesced and each element is read and
written ``⌈n / R⌉`` times instead of ``n`` times.
"""
from __future__ import annotations

import os

import torch

from sftint_fast.ops.triton import check_interpreter, on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's CUDA wheels ship triton; without it the dispatcher keeps the torch butterfly
    triton = tl = None

_LOW_BITS = 10   # first launch: 1024 contiguous values per program
_HIGH_BITS = 4   # later launches: 16 strided rows ...
_HIGH_COLS = 64  # ... × 64 contiguous columns

_SIGN_SUPERSET = {
    "subset_mobius": (-1.0, False),
    "subset_zeta": (1.0, False),
    "superset_mobius": (-1.0, True),
    "superset_zeta": (1.0, True),
}


def available(x: torch.Tensor | None = None) -> bool:
    """True when :func:`butterfly` can run on ``x``: Triton is importable and ``x`` is on CUDA, or
    ``TRITON_INTERPRET=1`` is set (CPU tensors). ``x=None`` asks about CUDA tensors."""
    if triton is None:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1" or x is None or x.is_cuda


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


@_jit
def _butterfly_kernel(
    x_ptr, stride, tiles_per_row, cols_per_stride,
    R: tl.constexpr, U: tl.constexpr, SIGN: tl.constexpr, SUPERSET: tl.constexpr,
):
    """Bits ``i .. i+R-1`` (``stride = 2^i``) of one ``2^R × U`` tile; row-major flat index = ``s·U + u``."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // tiles_per_row
    tile = pid % tiles_per_row
    outer = tile // cols_per_stride
    col0 = (tile % cols_per_stride) * U
    flat = tl.arange(0, (1 << R) * U)
    s = (flat // U).to(tl.int64)
    u = (flat % U).to(tl.int64)
    # int64 throughout: at n = 31 a row's size and stride << R reach 2^31 (int32 arguments would wrap)
    size = tl.cast(tiles_per_row, tl.int64) * (U << R)  # tl.cast: an argument equal to 1 arrives as a constexpr
    stride64 = tl.cast(stride, tl.int64)
    offs = row * size + outer * (stride64 << R) + s * stride64 + col0 + u
    x = tl.load(x_ptr + offs)
    for b in tl.static_range(R):
        # view the tile as [outer, 2, inner]: the middle axis is bit b of s (bit i+b of the index)
        x3 = tl.reshape(x, ((1 << (R - b - 1)), 2, (1 << b) * U))
        half = tl.arange(0, 2)[None, :, None]
        if SUPERSET:
            partner = tl.sum(tl.where(half == 1, x3, 0.0), axis=1)
            x3 = tl.where(half == 0, x3 + SIGN * partner[:, None, :], x3)
        else:
            partner = tl.sum(tl.where(half == 0, x3, 0.0), axis=1)
            x3 = tl.where(half == 1, x3 + SIGN * partner[:, None, :], x3)
        x = tl.reshape(x3, ((1 << R) * U,))
    tl.store(x_ptr + offs, x)


def _launch(out: torch.Tensor, kind: str) -> None:
    """In place on a contiguous ``(rows, 2^n)`` view: one launch per group of bits."""
    rows, size = out.shape
    n = size.bit_length() - 1
    sign, superset = _SIGN_SUPERSET[kind]
    bit = 0
    while bit < n:
        if bit == 0:
            group, cols = min(n, _LOW_BITS), 1
        else:
            group, cols = min(n - bit, _HIGH_BITS), min(1 << bit, _HIGH_COLS)
        stride = 1 << bit
        tiles_per_row = size // ((1 << group) * cols)
        _butterfly_kernel[(rows * tiles_per_row,)](
            out, stride, tiles_per_row, stride // cols, R=group, U=cols, SIGN=sign, SUPERSET=superset,
        )
        bit += group


def butterfly(x: torch.Tensor, kind: str) -> torch.Tensor:
    """One of the four transforms of :mod:`sftint_fast.ops.transforms` on ``x`` of shape ``(..., 2^n)``.

    ``x``: float32/float64 on CUDA (or CPU under ``TRITON_INTERPRET=1``); returns a new tensor of the same
    shape and dtype, ``x`` is not modified. ``kind``: ``"subset_mobius"``, ``"subset_zeta"``,
    ``"superset_mobius"`` or ``"superset_zeta"``.

    >>> butterfly(torch.tensor([0., 1., 2., 4.], device="cuda"), "subset_mobius")
    tensor([0., 1., 2., 1.], device='cuda:0')
    """
    if not available(x):
        raise ValueError(f"x: expected a CUDA tensor with triton installed (or TRITON_INTERPRET=1), got {x.device}")
    check_interpreter(x.device)
    if not isinstance(kind, str) or kind not in _SIGN_SUPERSET:
        raise ValueError(f"kind: expected one of {sorted(_SIGN_SUPERSET)}, got {kind!r}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x: expected dtype float32 or float64, got {x.dtype}")
    size = x.shape[-1] if x.dim() else 0
    if size < 1 or size & (size - 1):
        raise ValueError(f"x: expected shape (..., 2^n), got {tuple(x.shape)}")
    out = x.contiguous().clone()
    if out.numel() and size > 1:
        with on_device(out.device):
            _launch(out.view(-1, size), kind)
    return out
