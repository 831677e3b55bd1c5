"""AND (Harsanyi) interactions, their inverse, Shapley values and the OR transform.

Bit order: index ``S`` of the last dimension is a bitmask, bit ``i`` set = player ``i`` present.
All functions take ``(..., 2^n)`` float32/float64 tensors (any leading batch dims, CPU or CUDA) and
are differentiable.
"""
from __future__ import annotations

import torch

from sftint_fast.ops import transforms as T


def harsanyi(v: torch.Tensor, *, max_players: int | None = None) -> torch.Tensor:
    """AND interactions ``I(S) = Σ_{L⊆S} (-1)^{|S|-|L|} v(L)``. ``v``: ``(..., 2^n)`` → same shape.

    Pass ``v - v[..., :1]`` to get interactions of the game normalised to ``v(∅) = 0``.

    >>> harsanyi(torch.tensor([0., 1., 2., 4.]))
    tensor([0., 1., 2., 1.])
    """
    T.validate_game_tensor(v, name="v", max_players=max_players)  # errors name the caller's argument, not "x"
    return T.apply_unchecked(v, "subset_mobius")


def inverse_harsanyi(interactions: torch.Tensor, *, max_players: int | None = None) -> torch.Tensor:
    """``v(T) = Σ_{S⊆T} I(S)``, the inverse of :func:`harsanyi`. ``(..., 2^n)`` → same shape."""
    T.validate_game_tensor(interactions, name="interactions", max_players=max_players)
    return T.apply_unchecked(interactions, "subset_zeta")


def shapley_from_harsanyi(interactions: torch.Tensor) -> torch.Tensor:
    """``φ_i = Σ_{S∋i} I(S)/|S|``. ``(..., 2^n)`` → ``(..., n)``."""
    n = T.validate_game_tensor(interactions, name="interactions", max_players=64)
    size = interactions.shape[-1]
    order = T.popcount(size, device=interactions.device).to(interactions.dtype)
    scaled = interactions / order.clamp(min=1)
    lead = interactions.shape[:-1]
    # the subsets containing player i are the upper halves of the blocks of 2^(i+1) indices (no (2^n, n) matrix)
    phi = [scaled.reshape(*lead, size >> (i + 1), 2, 1 << i)[..., 1, :].sum((-2, -1)) for i in range(n)]
    return torch.stack(phi, -1) if phi else scaled.new_zeros((*lead, 0))


def shapley(v: torch.Tensor, *, max_players: int | None = None) -> torch.Tensor:
    """Shapley values of each player from the game ``v`` of shape ``(..., 2^n)`` → ``(..., n)``.

    Efficiency: ``shapley(v).sum(-1) == v[..., -1] - v[..., 0]``.
    """
    interactions = harsanyi(v, max_players=max_players)
    return shapley_from_harsanyi(interactions)


def or_interactions(v_or: torch.Tensor, *, max_players: int | None = None) -> torch.Tensor:
    """OR interactions ``I_or(S) = -Σ_{L⊆S} (-1)^{|S|-|L|} v_or(N\\L)`` for ``S≠∅``, ``I_or(∅) = v_or(∅)``.

    ``v_or``: ``(..., 2^n)`` → same shape. Universal matching on ``v_or`` alone:
    ``v_or(T) = I_or(∅) + Σ_{S∩T≠∅, S≠∅} I_or(S)``.
    """
    T.validate_game_tensor(v_or, name="v_or", max_players=max_players)
    return _or_transform(v_or)


def _or_transform(v_or: torch.Tensor) -> torch.Tensor:
    # v_or(N \ L) is v_or read backwards: the complement of bitmask L is (2^n - 1) - L.
    out = -T.apply_unchecked(v_or.flip(-1), "subset_mobius")
    return torch.cat([v_or[..., :1], out[..., 1:]], dim=-1)


def inverse_or_interactions(or_interactions_: torch.Tensor, *, max_players: int | None = None) -> torch.Tensor:
    """Recovers ``v_or`` from OR interactions (the universal-matching sum). ``(..., 2^n)`` → same shape."""
    T.validate_game_tensor(or_interactions_, name="or_interactions", max_players=max_players)
    empty = or_interactions_[..., :1]
    rest = torch.cat([torch.zeros_like(empty), or_interactions_[..., 1:]], dim=-1)
    # Σ_{S∩T≠∅} I(S) = Σ_S I(S) - Σ_{S⊆N\T} I(S)
    total = rest.sum(-1, keepdim=True)
    within_complement = T.apply_unchecked(rest, "subset_zeta").flip(-1)
    return empty + total - within_complement
