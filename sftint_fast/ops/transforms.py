"""Subset and superset transforms over the last dimension (size ``2^n``).

Bit order, used everywhere in sftint_fast: index ``S`` of the last dimension is a bitmask over the
players, **bit i set = player i present** (player 0 = least significant bit = first player in the prompt).

- ``subset_mobius(x)``:   ``out(S) = Σ_{L⊆S} (-1)^{|S|-|L|} x(L)``  (Harsanyi/AND transform)
- ``subset_zeta(x)``:     ``out(S) = Σ_{L⊆S} x(L)``                 (its inverse)
- ``superset_mobius(x)``: ``out(S) = Σ_{L⊇S} (-1)^{|L|-|S|} x(L)``
- ``superset_zeta(x)``:   ``out(S) = Σ_{L⊇S} x(L)``                 (its inverse)

Every transform is ``O(n·2^n)`` per row (an in-place butterfly; no ``2^n×2^n`` matrix), takes
float32/float64 of shape ``(..., 2^n)`` on any device and returns the same shape and dtype. The
backend is chosen per call: the C++ extension for CPU tensors, Triton for CUDA tensors when Triton
is importable, a pure-torch butterfly otherwise. All four are differentiable: each is linear and
its adjoint is another member of the family (subset ↔ superset, same sign). They (and ``sf.harsanyi``,
``sf.shapley``, ``sf.or_interactions``...) also run under ``torch.func`` (``vmap``, ``grad``, ``jacrev``): a
vmapped dimension is one more leading batch dimension, and NaN/inf anywhere in the batch is refused.
"""
from __future__ import annotations

import numbers
from typing import Literal

import torch

from sftint_fast import _ext

MAX_PLAYERS = 30
"""Default upper bound on ``n``; override per call with ``max_players=``."""

Kind = Literal["subset_mobius", "subset_zeta", "superset_mobius", "superset_zeta"]
_ADJOINT: dict[str, str] = {
    "subset_mobius": "superset_mobius",
    "superset_mobius": "subset_mobius",
    "subset_zeta": "superset_zeta",
    "superset_zeta": "subset_zeta",
}


def num_players_of(size: int) -> int:
    """``n`` for a last dimension of size ``2^n``; ValueError otherwise."""
    if size < 1 or size & (size - 1):
        raise ValueError(
            f"expected the last dimension to have size 2^n (one entry per subset of n players), got {size}"
        )
    return size.bit_length() - 1


def check_max_players(max_players: int | None) -> None:
    """``max_players=`` of the public functions: None or an int >= 0 (a string or float would fail, or pass, on
    the comparison with ``n``)."""
    if max_players is None:
        return
    if not isinstance(max_players, numbers.Integral) or isinstance(max_players, bool):
        raise TypeError(f"max_players: expected None or an int >= 0, got {type(max_players).__name__} {max_players!r}")
    if max_players < 0:
        raise ValueError(f"max_players: expected None or an int >= 0, got {max_players!r}")


def validate_game_tensor(
    x: torch.Tensor, *, name: str = "v", max_players: int | None = None, check_finite: bool = True
) -> int:
    """Checks a ``(..., 2^n)`` float tensor and returns ``n``. TypeError/ValueError say what came."""
    check_max_players(max_players)
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite: expected a bool, got {check_finite!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (..., 2^n), got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: expected dtype float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name}: expected shape (..., 2^n), got a 0-d tensor")
    n = num_players_of(x.shape[-1])
    limit = MAX_PLAYERS if max_players is None else max_players
    if n > limit:
        raise ValueError(
            f"{name}: n={n} players exceeds the limit max_players={limit} "
            f"(2^{n} values per row, {x.element_size() * 2**n / 2**30:.2f} GiB); pass max_players= to raise it"
        )
    # a meta tensor has no values to check (shape propagation)
    if check_finite and x.numel() and x.device.type != "meta":
        values, where = _plain_values(x), ""
        if values is not x:
            where = " of the batched input, under torch.func"
        if not bool(torch.isfinite(values).all()):
            bad = (~torch.isfinite(values)).nonzero()[0].tolist()
            raise ValueError(f"{name}: expected finite values, got NaN/inf (first at index {bad}{where})")
    return n


def _plain_values(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or under torch.func (vmap, grad, jacrev...) the plain tensor its wrappers hold: a check of
    that one is no data-dependent branch on a batched tensor, which vmap refuses (all of the batch is checked)."""
    functorch = getattr(torch._C, "_functorch", None)
    wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    unwrap = getattr(functorch, "get_unwrapped", None)
    if wrapped is None or unwrap is None or not torch._C._are_functorch_transforms_active():
        return x  # (a torch without these: the check runs on x, which vmap refuses with its own error)
    while wrapped(x):
        x = unwrap(x)
    return x


def _torch_butterfly(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Pure-torch fallback: n passes over a ``(rows, blocks, 2, half)`` view."""
    size = x.shape[-1]
    n = size.bit_length() - 1
    out = x.contiguous().clone()
    flat = out.view(-1, size)
    sign = -1.0 if kind.endswith("mobius") else 1.0
    superset = kind.startswith("superset")
    for i in range(n):
        half = 1 << i
        pairs = flat.view(flat.shape[0], size // (2 * half), 2, half)
        if superset:
            pairs[:, :, 0, :].add_(pairs[:, :, 1, :], alpha=sign)
        else:
            pairs[:, :, 1, :].add_(pairs[:, :, 0, :], alpha=sign)
    return out


def _raw(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Dispatch without validation or autograd (internal hot path)."""
    if x.device.type == "cpu" and _ext.has_ext():
        return getattr(torch.ops.sftint, kind)(x)
    if x.device.type == "cuda":
        from sftint_fast.ops.triton import transforms as triton_transforms

        if triton_transforms.available():
            return triton_transforms.butterfly(x, kind)
    return _torch_butterfly(x, kind)


class _Transform(torch.autograd.Function):
    """Plain autograd (ctx in forward): ~30 us less per call than the torch.func form below."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kind: str) -> torch.Tensor:  # type: ignore[override]
        ctx.kind = kind
        return _raw(x, kind)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _Transform.apply(grad.contiguous(), _ADJOINT[ctx.kind]), None


class _FuncTransform(torch.autograd.Function):
    """The same under torch.func transforms (grad, jacrev, vmap), which refuse the form with ctx in forward."""

    @staticmethod
    def forward(x: torch.Tensor, kind: str) -> torch.Tensor:  # type: ignore[override]
        return _raw(x, kind)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.kind = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _FuncTransform.apply(grad.contiguous(), _ADJOINT[ctx.kind]), None

    @staticmethod
    def vmap(info, in_dims, x: torch.Tensor, kind: str):
        # every transform acts on the last dimension only: the vmapped dimension becomes one more leading batch dim
        # (x is the only tensor input, so it is the batched one)
        return _FuncTransform.apply(x.movedim(in_dims[0], 0), kind), 0


def transform(x: torch.Tensor, kind: Kind, *, max_players: int | None = None, check_finite: bool = True) -> torch.Tensor:
    """Applies one of the four transforms (see the module docstring) to ``x`` of shape ``(..., 2^n)``."""
    if not isinstance(kind, str) or kind not in _ADJOINT:
        raise ValueError(f"kind: expected one of {sorted(_ADJOINT)}, got {kind!r}")
    validate_game_tensor(x, name="x", max_players=max_players, check_finite=check_finite)
    return apply_unchecked(x, kind)


def apply_unchecked(x: torch.Tensor, kind: str) -> torch.Tensor:
    """:func:`transform` without input validation, for internal loops that already validated."""
    if torch._C._are_functorch_transforms_active():  # its vmap rule: no per-sample fallback loop under vmap
        return _FuncTransform.apply(x, kind)
    if x.requires_grad and torch.is_grad_enabled():
        return _Transform.apply(x, kind)
    return _raw(x, kind)


def subset_mobius(x: torch.Tensor, **kw) -> torch.Tensor:
    """``out(S) = Σ_{L⊆S} (-1)^{|S|-|L|} x(L)``. ``x``: ``(..., 2^n)`` float32/64 → same shape.

    >>> subset_mobius(torch.tensor([0., 1., 2., 4.]))   # I({0})=1, I({1})=2, I({0,1})=4-1-2+0
    tensor([0., 1., 2., 1.])
    """
    return transform(x, "subset_mobius", **kw)


def subset_zeta(x: torch.Tensor, **kw) -> torch.Tensor:
    """``out(S) = Σ_{L⊆S} x(L)`` (inverse of :func:`subset_mobius`). ``(..., 2^n)`` → same shape."""
    return transform(x, "subset_zeta", **kw)


def superset_mobius(x: torch.Tensor, **kw) -> torch.Tensor:
    """``out(S) = Σ_{L⊇S} (-1)^{|L|-|S|} x(L)``. ``(..., 2^n)`` → same shape."""
    return transform(x, "superset_mobius", **kw)


def superset_zeta(x: torch.Tensor, **kw) -> torch.Tensor:
    """``out(S) = Σ_{L⊇S} x(L)`` (inverse of :func:`superset_mobius`). ``(..., 2^n)`` → same shape."""
    return transform(x, "superset_zeta", **kw)


def popcount(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``|S|`` for every bitmask ``S < size`` (int64, shape ``(size,)``)."""
    idx = torch.arange(size, device=device)
    count = torch.zeros_like(idx)
    for bit in range((size - 1).bit_length()):  # bit by bit: a (size, n) bit table would be n times the output
        count += (idx >> bit) & 1
    return count
