"""Plain, obviously correct references for every fast op (tests compare against these).

They enumerate subsets explicitly and are only meant for small ``n``.
"""
from __future__ import annotations

import torch


def brute_transform(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Subset/superset Möbius or zeta by explicit subset sums, in float64. ``(..., 2^n)`` → same shape."""
    size = x.shape[-1]
    xd = x.to(torch.float64)
    out = torch.zeros_like(xd)
    mobius = kind.endswith("mobius")
    superset = kind.startswith("superset")
    for s in range(size):
        for t in range(size):
            related = (t & s) == t if not superset else (t & s) == s
            if not related:
                continue
            sign = (-1) ** (bin(s ^ t).count("1")) if mobius else 1
            out[..., s] += sign * xd[..., t]
    return out


def brute_or_interactions(v_or: torch.Tensor) -> torch.Tensor:
    """``I_or(S) = -Σ_{L⊆S} (-1)^{|S|-|L|} v_or(N\\L)`` for ``S≠∅``, ``I_or(∅) = v_or(∅)`` (float64)."""
    size = v_or.shape[-1]
    full = size - 1
    vd = v_or.to(torch.float64)
    out = torch.zeros_like(vd)
    for s in range(1, size):
        for sub in range(size):
            if sub & s == sub:
                out[..., s] -= (-1) ** bin(s ^ sub).count("1") * vd[..., full ^ sub]
    out[..., 0] = vd[..., 0]
    return out


def brute_shapley(v: torch.Tensor) -> torch.Tensor:
    """Shapley values from the permutation-weighted marginal formula (float64). ``(..., 2^n)`` → ``(..., n)``."""
    import math

    size = v.shape[-1]
    n = size.bit_length() - 1
    vd = v.to(torch.float64)
    phi = torch.zeros(*vd.shape[:-1], n, dtype=torch.float64)
    for i in range(n):
        for s in range(size):
            if s >> i & 1:
                continue
            k = bin(s).count("1")
            w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            phi[..., i] += w * (vd[..., s | (1 << i)] - vd[..., s])
    return phi
