"""Measures on interactions of one model (METHOD.md section 4).

Every function takes interactions ``I`` of shape ``(..., 2^n)`` indexed by bitmask (bit ``i`` = player ``i``)
and works row-wise over the leading dims. For AND-OR results, pass ``I_and`` and ``I_or`` separately (they
are separate sets); to threshold both against one joint maximum, pass ``reference_max=``.

Choices fixed here *(ours)*:

- The salient threshold is ``tau·max_{S≠∅} |I(S)|``: order 0 is excluded from the set *and* from the max
  (``I(∅)`` is an offset, not an interaction).
- :func:`sharing` sums over the compared model's own salient set ``Ω`` by default, so a model compared with
  itself has ``γ = 1``; ``over="all"`` sums over every ``S``.
- Ratios over empty sets (no salient interaction, all-zero ``I``) are NaN for ``ρ`` and ``γ`` and 0 for the
  strength by order.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from sftint_fast.ops import transforms as T


class RankedInteraction(NamedTuple):
    """One entry of :func:`top_interactions`."""

    mask: int
    words: tuple[str, ...]
    value: float

    def __str__(self) -> str:
        return "{" + ", ".join(self.words) + f"}}: {self.value:+.4g}"


def _check_tau(tau: float) -> None:
    # numbers.Real: a numpy scalar (np.float32) is a number too
    if not (isinstance(tau, numbers.Real) and not isinstance(tau, bool) and 0 < tau < 1):
        raise ValueError(f"tau: expected a number in the open interval (0, 1), got {tau!r}")


def _check(interactions: torch.Tensor, name: str = "I") -> int:
    # NaN would compare False against every threshold: an empty salient set instead of an error
    return T.validate_game_tensor(interactions, name=name)


def salient(
    interactions: torch.Tensor, tau: float = 0.05, *, reference_max: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Membership of the salient set ``Ω = {S≠∅ : |I(S)| > tau·max_{S'≠∅} |I(S')|}``.

    Args:
        interactions: ``(..., 2^n)``.
        tau: relative threshold in ``(0, 1)``.
        reference_max: ``(...)`` tensor or a number replacing ``max |I|`` (e.g. the base model's, or the joint
            max of ``I_and`` and ``I_or``).

    Returns:
        bool ``(..., 2^n)``: True at index ``S`` when bitmask ``S`` is salient; index 0 is always False.

    >>> salient(torch.tensor([5., 1., -0.04, 0.5]), 0.05).tolist()
    [False, True, False, True]
    """
    _check(interactions)
    _check_tau(tau)
    magnitude = interactions.abs()
    if reference_max is None:
        top = magnitude[..., 1:].amax(-1) if magnitude.shape[-1] > 1 else magnitude.new_zeros(magnitude.shape[:-1])
    else:
        is_bool_tensor = isinstance(reference_max, torch.Tensor) and reference_max.dtype == torch.bool
        if isinstance(reference_max, bool) or is_bool_tensor:
            raise TypeError(f"reference_max: expected a number or a float tensor (a max |I|), got {reference_max!r}")
        top = torch.as_tensor(reference_max, dtype=magnitude.dtype, device=magnitude.device)
        if not _broadcasts(top.shape, magnitude.shape[:-1]):
            raise ValueError(
                f"reference_max: expected a number or a tensor of shape {tuple(magnitude.shape[:-1])}, "
                f"got shape {tuple(top.shape)}"
            )
        bad = top[~(torch.isfinite(top) & (top >= 0))]
        if bad.numel():
            raise ValueError(f"reference_max: expected finite values >= 0 (a max |I|), got {bad.flatten()[0].item()}")
    members = magnitude > float(tau) * top.unsqueeze(-1)
    members[..., 0] = False
    return members


def _broadcasts(shape: torch.Size, target: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def salient_sets(
    interactions: torch.Tensor, tau: float = 0.05, *, reference_max: torch.Tensor | float | None = None
) -> list[torch.Tensor]:
    """The salient bitmasks of each row: a list (one per row of the flattened leading dims; one entry for a
    ``(2^n,)`` input) of int64 tensors in increasing order. See :func:`salient`."""
    members = salient(interactions, tau, reference_max=reference_max)
    return [row.nonzero().flatten() for row in members.reshape(-1, members.shape[-1])]


def strength_by_order(interactions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A⁺(k) = Σ_{|S|=k, I>0} I(S)`` and ``A⁻(k) = Σ_{|S|=k, I<0} |I(S)|``, each divided by ``Σ_S |I(S)|``.

    ``(..., 2^n)`` → two ``(..., n+1)`` tensors (order 0 included); rows with ``Σ|I| = 0`` give zeros.
    Average over samples yourself (``.mean(0)``).

    >>> plus, minus = strength_by_order(torch.tensor([1., 2., -1., -4.]))
    >>> plus.tolist(), minus.tolist()
    ([0.125, 0.25, 0.0], [0.0, 0.125, 0.5])
    """
    n = _check(interactions)
    order = T.popcount(interactions.shape[-1], device=interactions.device)
    total = interactions.abs().sum(-1, keepdim=True)
    scale = torch.where(total > 0, 1 / total, torch.zeros_like(total))
    shape = (*interactions.shape[:-1], n + 1)
    index = order.expand_as(interactions)
    plus = interactions.new_zeros(shape).scatter_add_(-1, index, interactions.clamp(min=0))
    minus = interactions.new_zeros(shape).scatter_add_(-1, index, (-interactions).clamp(min=0))
    return plus * scale, minus * scale


def _membership(subset_mask: torch.Tensor, interactions: torch.Tensor) -> torch.Tensor:
    """Bool ``(..., 2^n)`` from a bool mask (broadcastable) or a 1-D int64 list of bitmasks."""
    size = interactions.shape[-1]
    if not isinstance(subset_mask, torch.Tensor):
        raise TypeError(
            f"subset_mask: expected a bool tensor (..., 2^n) or int64 bitmasks, got {type(subset_mask).__name__}"
        )
    if subset_mask.dtype == torch.bool:
        if not _broadcasts(subset_mask.shape, interactions.shape):
            raise ValueError(
                f"subset_mask: expected a bool tensor broadcastable to {tuple(interactions.shape)}, "
                f"got shape {tuple(subset_mask.shape)}"
            )
        return subset_mask.to(interactions.device)
    if subset_mask.dtype in (torch.int64, torch.int32) and subset_mask.dim() <= 1:
        if subset_mask.numel() and (int(subset_mask.min()) < 0 or int(subset_mask.max()) >= size):
            raise ValueError(f"subset_mask: expected bitmasks in [0, {size}), got values outside")
        members = torch.zeros(size, dtype=torch.bool, device=interactions.device)
        members[subset_mask.to(interactions.device, torch.int64)] = True
        return members
    raise TypeError(
        f"subset_mask: expected a bool tensor (..., 2^n) or a 1-D int64 tensor of bitmasks, "
        f"got dtype {subset_mask.dtype} shape {tuple(subset_mask.shape)}"
    )


def uncancelled_ratio(interactions: torch.Tensor, subset_mask: torch.Tensor) -> torch.Tensor:
    """``ρ = |Σ_{S∈Ω'} I(S)| / Σ_{S∈Ω'} |I(S)|`` per row.

    Args:
        interactions: ``(..., 2^n)``.
        subset_mask: the set ``Ω'``: a bool tensor broadcastable to ``(..., 2^n)`` (e.g. from :func:`salient`)
            or a 1-D int64 tensor of bitmasks (the same set for every row).

    Returns:
        ``(...)``; NaN where ``Ω'`` is empty or all its ``I`` are 0.

    >>> uncancelled_ratio(torch.tensor([0., 2., -1., 3.]), torch.tensor([1, 2]))
    tensor(0.3333)
    """
    _check(interactions)
    members = _membership(subset_mask, interactions).to(interactions.dtype)
    return (interactions * members).sum(-1).abs() / (interactions.abs() * members).sum(-1)


def sharing(
    interactions: torch.Tensor,
    reference: torch.Tensor,
    tau: float = 0.05,
    *,
    over: Literal["salient", "all"] = "salient",
    reference_max: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Share ``γ`` of the interactions that a reference model also has (METHOD.md section 4).

    ``G_S = 1[S ∈ Ω_ref]·1[sign I(S) = sign I_ref(S)]`` and ``γ = Σ_S |I(S)|·G_S / Σ_S |I(S)|``, the sums
    running over the salient set ``Ω`` of ``interactions`` (``over="salient"``, default, so ``γ = 1`` for a
    model compared with itself) or over every ``S`` (``over="all"``). Order 0 is never salient, so ``G_∅ = 0``: with
    ``over="all"`` the empty set's ``|I(∅)|`` counts in the denominator only (zero for ``v - v[0]``).

    Args:
        interactions, reference: ``(..., 2^n)`` of the same shape (same prompts and players).
        tau: salient threshold in ``(0, 1)`` for both ``Ω`` and ``Ω_ref``.
        reference_max: passed to :func:`salient` for ``Ω_ref`` (``max |I_ref|`` by default).

    Returns:
        ``(...)`` in ``[0, 1]``; NaN where the summed set is empty.

    >>> sharing(torch.tensor([0., 4., -2., 1.]), torch.tensor([0., 3., 2., 0.]))
    tensor(0.5714)
    """
    _check(interactions)
    _check(reference, "I_ref")
    if interactions.shape != reference.shape:
        raise ValueError(
            f"sharing: expected I and I_ref of the same shape, "
            f"got {tuple(interactions.shape)} and {tuple(reference.shape)}"
        )
    _check_tau(tau)
    if over not in ("salient", "all"):
        raise ValueError(f"over: expected 'salient' or 'all', got {over!r}")
    shared = salient(reference, tau, reference_max=reference_max) & (interactions.sign() == reference.sign())
    weight = interactions.abs()
    if over == "salient":
        weight = weight * salient(interactions, tau)
    return (weight * shared).sum(-1) / weight.sum(-1)


def top_interactions(
    interactions: torch.Tensor,
    k: int,
    words: Sequence[str] | Sequence[Sequence[str]],
    *,
    include_empty: bool = False,
) -> list[RankedInteraction] | list[list[RankedInteraction]]:
    """The ``k`` largest ``|I(S)|`` with ``S`` rendered as the tuple of its players' words.

    Args:
        interactions: ``(2^n,)`` or ``(B, 2^n)``.
        k: how many (fewer when there are fewer subsets).
        words: ``n`` strings (player ``i`` = bit ``i``), or one such sequence per row for ``(B, 2^n)``.
        include_empty: also rank ``S = ∅``.

    Returns:
        a list of :class:`RankedInteraction` ``(mask, words, value)`` by decreasing ``|I|`` for a 1-D input,
        one such list per row for a 2-D input.

    >>> [str(r) for r in top_interactions(torch.tensor([9., 1., -3., 2.]), 2, ["a", "b"])]
    ['{b}: -3', '{a, b}: +2']
    """
    n = _check(interactions)
    if interactions.dim() > 2:
        raise ValueError(f"I: expected shape (2^n,) or (B, 2^n), got {tuple(interactions.shape)}")
    if not (isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 0):
        raise ValueError(f"k: expected an int >= 0, got {k!r}")
    if not isinstance(include_empty, bool):
        raise TypeError(f"include_empty: expected a bool, got {include_empty!r}")
    rows = interactions.reshape(-1, interactions.shape[-1]).detach().cpu()
    if isinstance(words, str) or not isinstance(words, Sequence):
        raise TypeError(f"words: expected a sequence of {n} strings (or one per row), got {type(words).__name__}")
    per_row = (
        list(words) if interactions.dim() == 2 and len(words) and not isinstance(words[0], str) else [words] * len(rows)
    )
    if len(per_row) != len(rows):
        raise ValueError(f"words: expected one word list per row ({len(rows)}), got {len(per_row)}")
    out = []
    for row, row_words in zip(rows, per_row):
        if len(row_words) != n:
            raise ValueError(f"words: expected {n} words (one per player), got {len(row_words)}")
        odd = [w for w in row_words if not isinstance(w, str)]
        if odd:  # RankedInteraction.__str__ joins them: a non-string would fail only when printed
            raise TypeError(f"words: expected strings (one per player), got {type(odd[0]).__name__} {odd[0]!r}")
        start = 0 if include_empty else 1
        magnitude = row[start:].abs()
        order = torch.argsort(magnitude, descending=True, stable=True)[:k] + start
        out.append(
            [
                RankedInteraction(int(m), tuple(row_words[i] for i in range(n) if int(m) >> i & 1), float(row[m]))
                for m in order
            ]
        )
    return out if interactions.dim() == 2 else out[0]
