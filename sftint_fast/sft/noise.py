"""Set logic, noise floors, bootstrap and the phase-boundary rule (METHOD.md sections 6 and 7).

Everything here works on plain tensors, one row per probe, the last dimension indexed by bitmask
(bit ``i`` set = player ``i`` present). Nothing here evaluates a model or runs a decomposition; the
tracker feeds interactions in and gets sets, null perturbations and intervals out.

Definitions (per probe, AND and OR kept apart by the caller):

- **threshold** ``thr``: ``tau · max_{S≠∅} |I_0(S)|`` of the base checkpoint (``"base"``, default),
  ``tau · max_{S≠∅} |I_t(S)|`` of each checkpoint (``"checkpoint"``, the paper's) or ``tau`` itself
  (``"absolute"``). Order 0 is never salient.
- **raw status** with hysteresis: ``S`` enters when ``|I(S)| > thr`` and, once in, leaves only when
  ``|I(S)| < thr/2``. Without hysteresis the raw status is ``|I(S)| > thr``.
- **stable status** ``Ω_t`` with persistence ``p``: it follows the raw status only after the raw status
  has differed from it at ``p`` consecutive checkpoints; the change is stamped with the first of them
  (its *onset*). ``Ω_0`` is the raw status of the base.
- removed ``R_t = Ω_0 \\ Ω_t``; preserved ``P_t = P_{t-1} ∩ Ω_t`` (``P_0 = Ω_0``); emerged
  ``E_t = Ω_t \\ P_t``, so an interaction that leaves and comes back is emerged, not preserved. Each
  emerged interaction keeps the onset index of the first time it became emerged.

Noise floor (METHOD.md 7.1, refined): the floor re-runs the decomposition and the set logic, from the observed
state at the anchor ``a = t - persistence``, on K replicates of the checkpoints ``a+1 … t`` built from the
anchor's ``v`` (:func:`null_values`). The anchor's values are themselves one noisy checkpoint: under pure noise
``v_t - v_a = e_t - e_a``, the next checkpoint *replaces* the anchor's noise instead of adding to it. Adding a
change-sized perturbation to every anchor value therefore (a) keeps the interactions that the anchor's noise
pushed over τ (observed removals regress to the mean, the floor's do not: removal excess on pure noise) and
(b) puts two checkpoints' noise on top of one (the floor's emergence is several times the observed one). So the
anchor's interactions at the noise level (``|I_a(S)| <= 3σ(S)``, ``σ²`` = one checkpoint's noise variance,
half the change's robust energy per order, :func:`noise_level`) are replaced by fresh noise of one checkpoint's
size; interactions clearly above the noise keep their anchor value plus a change of the observed size, as in
the unrefined definition. The iid null puts its noise on ``v(∅)`` too, as a real change does. On a pure-noise
sequence (32 probes, n=6, 8 checkpoints) the floor is within ~10-25% of the observed counts per checkpoint;
what is left: the floor's emergence is ~10% low when the base has a dense background of small interactions
(zeroed, not resampled), and the order-matched removal floor at the first floored checkpoint is ~20% low (its
per-order energies of high orders, one or a few coefficients, carry the base's noise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from sftint_fast.interactions.harsanyi import harsanyi, inverse_harsanyi
from sftint_fast.ops.transforms import popcount

ThresholdReference = Literal["base", "checkpoint", "absolute"]
NullKind = Literal["order_matched", "iid"]
_MEDIAN_CHI2_1 = 0.45493642311957174   # median of a squared standard normal


@dataclass(frozen=True)
class SetState:
    """Set membership of every interaction of every probe after one checkpoint.

    All fields are ``(B, 2^n)`` tensors: bool sets, ``run`` int64 (consecutive checkpoints at which the raw
    status has differed from the stable one), ``first_emerged`` int64 (onset checkpoint index of the first
    emergence, ``-1`` = never emerged). ``base_threshold`` is ``(B, 1)``.
    """

    raw: torch.Tensor
    stable: torch.Tensor
    run: torch.Tensor
    base: torch.Tensor
    preserved: torch.Tensor
    emerged: torch.Tensor
    first_emerged: torch.Tensor
    base_threshold: torch.Tensor

    @property
    def removed(self) -> torch.Tensor:
        """``R_t = Ω_0 \\ Ω_t`` as a ``(B, 2^n)`` bool tensor."""
        return self.base & ~self.stable


def max_abs_nonempty(interactions: torch.Tensor) -> torch.Tensor:
    """``max_{S≠∅} |I(S)|`` per row: ``(B, 2^n)`` → ``(B, 1)``."""
    return interactions[:, 1:].abs().amax(dim=-1, keepdim=True)


def threshold(interactions: torch.Tensor, *, tau: float, reference: ThresholdReference,
              base_threshold: torch.Tensor | None) -> torch.Tensor:
    """Per-probe salience threshold ``(B, 1)`` for the interactions ``(B, 2^n)`` of one checkpoint."""
    if reference == "base" and base_threshold is not None:
        return base_threshold
    if reference == "absolute":
        return torch.full((interactions.shape[0], 1), float(tau), dtype=interactions.dtype)
    return tau * max_abs_nonempty(interactions)


def _raw_status(magnitude: torch.Tensor, thr: torch.Tensor, previous: torch.Tensor | None, hysteresis: bool) -> torch.Tensor:
    status = magnitude > thr
    if hysteresis and previous is not None:
        status = status | (previous & (magnitude >= thr / 2))
    status[:, 0] = False
    return status


def initial_state(interactions: torch.Tensor, *, tau: float, reference: ThresholdReference) -> SetState:
    """The state after the base checkpoint: ``Ω_0`` = raw status of ``interactions`` ``(B, 2^n)``."""
    thr = threshold(interactions, tau=tau, reference=reference, base_threshold=None)
    raw = _raw_status(interactions.abs(), thr, None, False)
    zeros = torch.zeros_like(interactions, dtype=torch.int64)
    return SetState(raw=raw, stable=raw.clone(), run=zeros, base=raw.clone(), preserved=raw.clone(),
                    emerged=torch.zeros_like(raw), first_emerged=zeros - 1, base_threshold=thr)


def step_state(state: SetState, interactions: torch.Tensor, *, index: int, tau: float, reference: ThresholdReference,
               hysteresis: bool, persistence: int) -> SetState:
    """Advance ``state`` by the checkpoint with index ``index`` (base = 0) and interactions ``(B, 2^n)``."""
    thr = threshold(interactions, tau=tau, reference=reference, base_threshold=state.base_threshold)
    raw = _raw_status(interactions.abs(), thr, state.raw, hysteresis)
    differs = raw != state.stable
    run = torch.where(differs, state.run + 1, torch.zeros_like(state.run))
    flip = run >= persistence
    stable = torch.where(flip, raw, state.stable)
    run = torch.where(flip, torch.zeros_like(run), run)
    preserved = state.preserved & stable
    emerged = stable & ~preserved
    onset = index - persistence + 1
    first = torch.where(emerged & (state.first_emerged < 0), torch.full_like(run, onset), state.first_emerged)
    return replace(state, raw=raw, stable=stable, run=run, preserved=preserved, emerged=emerged, first_emerged=first)


def new_changes(before: SetState, after: SetState) -> tuple[torch.Tensor, torch.Tensor]:
    """Interactions newly removed and newly emerged between two states: two ``(B, 2^n)`` bool tensors."""
    return after.removed & ~before.removed, after.emerged & ~before.emerged


# ----------------------------------------------------------------------------------------------------------
# Null perturbations


def null_perturbations(delta: torch.Tensor, *, kind: NullKind, draws: int, generator: torch.Generator) -> torch.Tensor:
    """Random perturbations of ``v`` of the size of an observed change, ``(B, 2^n)`` → ``(draws, B, 2^n)``.

    ``delta`` is the observed change of ``v``; only its change of ``v' = v - v(∅)`` matters.

    - ``"iid"``: Gaussian noise on every ``v(S)``, ``v(∅)`` included, with the per-probe sd equal to the RMS of
      the change of ``v'`` over ``S ≠ ∅`` divided by ``√2``, so that the perturbation of ``v'`` (``n(S) - n(∅)``)
      has the observed RMS change of ``v'``, and the noise of ``v(∅)`` enters ``v'`` as it does in a real change.
    - ``"order_matched"``: in the interaction domain, the observed change's Harsanyi values of each order
      are moved to random positions of that order with random signs (the energy per order is kept
      exactly), then mapped back to ``v`` with the inverse transform (entry 0 stays 0).
    """
    delta = delta - delta[:, :1]
    rows, size = delta.shape
    if kind == "iid":
        sd = delta[:, 1:].pow(2).mean(dim=-1, keepdim=True).sqrt() / math.sqrt(2)
        return torch.randn((draws, rows, size), generator=generator, dtype=delta.dtype) * sd
    if kind != "order_matched":
        raise ValueError(f"noise_floor: expected 'order_matched' or 'iid', got {kind!r}")
    change = harsanyi(delta)
    order = popcount(size)
    out = torch.zeros((draws, rows, size), dtype=delta.dtype)
    for k in range(1, int(order.max()) + 1):
        positions = torch.nonzero(order == k).squeeze(-1)
        values = change[:, positions].expand(draws, rows, -1)
        perm = torch.rand((draws, rows, positions.numel()), generator=generator).argsort(dim=-1)
        signs = torch.randint(0, 2, (draws, rows, positions.numel()), generator=generator).to(delta.dtype) * 2 - 1
        out[..., positions] = values.gather(-1, perm) * signs
    return inverse_harsanyi(out)


def noise_level(delta: torch.Tensor, *, kind: NullKind) -> torch.Tensor:
    """Variance of every Harsanyi coefficient of one checkpoint's noise, ``(B, 2^n)`` → ``(B, 2^n)``.

    Under the null a change ``v_t - v_a = e_t - e_a`` is the difference of two checkpoints' independent noise,
    so one checkpoint's noise has half the change's energy. Estimated robustly, so that a few large real
    changes do not pass for noise: the median square (over the coefficients of each order for
    ``"order_matched"``; over the entries ``S ≠ ∅`` of the change of ``v'``, times ``2^k / 2`` at order ``k``, for
    ``"iid"``, whose noise of ``v(∅)`` doubles the variance of ``v'``) divided by ``2 · 0.4549`` (the median of a
    squared standard normal is 0.4549). Entry 0 is 0.
    """
    delta = delta - delta[:, :1]
    size = delta.shape[-1]
    order = popcount(size)
    if kind == "iid":
        per_entry = delta[:, 1:].pow(2).median(dim=-1, keepdim=True).values / (4 * _MEDIAN_CHI2_1)
        out = per_entry * (2.0 ** order).to(delta.dtype)
        out[:, 0] = 0
        return out
    change = harsanyi(delta)
    out = torch.zeros_like(change)
    for k in range(1, int(order.max()) + 1):
        sel = order == k
        out[:, sel] = change[:, sel].pow(2).median(dim=-1, keepdim=True).values / (2 * _MEDIAN_CHI2_1)
    return out


def null_values(anchor: torch.Tensor, changes: list[torch.Tensor], *, kind: NullKind, draws: int,
                generator: torch.Generator, keep: float = 3.0) -> torch.Tensor:
    """Null replicates of the checkpoints after ``anchor``: ``(B, 2^n)`` and ``p`` changes → ``(p, draws, B, 2^n)``.

    ``changes[j]`` is the observed ``v_{a+j+1} - v_a``. Each replicate is the anchor's ``v`` plus noise of the
    size of that change (:func:`null_perturbations`), except for the anchor's interactions at the noise level
    (``|I_a(S)| <= keep · σ(S)``, ``σ²`` from :func:`noise_level` averaged over the changes): those are themselves
    one checkpoint's noise, which the next checkpoint replaces rather than adds to, so the replicate holds fresh
    noise of one checkpoint's size (the perturbation divided by ``√2``) instead of the anchor's value plus noise.
    Interactions clearly above the noise keep their anchor value plus a change of the observed size.
    """
    interactions = harsanyi(anchor - anchor[:, :1])
    sigma2 = torch.stack([noise_level(d, kind=kind) for d in changes]).mean(dim=0)
    signal = interactions.abs() > keep * sigma2.sqrt()
    out = []
    for delta in changes:
        noise = harsanyi(null_perturbations(delta, kind=kind, draws=draws, generator=generator))
        fake = torch.where(signal, interactions + noise, noise / math.sqrt(2))
        fake[..., 0] = 0
        out.append(inverse_harsanyi(fake) + anchor[:, :1])
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------
# Probe-level bootstrap


def bootstrap_indices(num_probes: int, *, resamples: int, seed: int) -> torch.Tensor:
    """``(resamples, num_probes)`` probe indices drawn with replacement (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(num_probes, 1), (resamples, num_probes), generator=generator)


def bootstrap_sum(values: torch.Tensor, indices: torch.Tensor, *, level: float = 0.95) -> tuple[list[float], list[float]]:
    """Interval of the probe sum of ``values`` ``(T, B)`` per checkpoint: two lists of length ``T``."""
    if values.shape[1] == 0:
        zeros = [0.0] * values.shape[0]
        return zeros, list(zeros)
    sums = values[:, indices].sum(dim=-1).double()
    return _quantiles(sums, level)


def bootstrap_ratio(numerator: torch.Tensor, denominator: torch.Tensor, indices: torch.Tensor, *,
                    level: float = 0.95) -> tuple[list[float], list[float]]:
    """Interval of ``Σ_b num / Σ_b den`` over resampled probes (``(T, B)`` each); NaN where undefined."""
    if numerator.shape[1] == 0:
        nans = [math.nan] * numerator.shape[0]
        return nans, list(nans)
    ratio = numerator[:, indices].sum(-1).double() / denominator[:, indices].sum(-1).double()
    return _quantiles(ratio, level)


def bootstrap_nanmean(values: torch.Tensor, indices: torch.Tensor, *, level: float = 0.95) -> tuple[list[float], list[float]]:
    """Interval of the mean over probes of ``values`` ``(T, B)``, ignoring NaN (probes with an empty set)."""
    if values.shape[1] == 0:
        nans = [math.nan] * values.shape[0]
        return nans, list(nans)
    return _quantiles(values[:, indices].double().nanmean(dim=-1), level)


def _quantiles(samples: torch.Tensor, level: float) -> tuple[list[float], list[float]]:
    alpha = (1 - level) / 2
    lo = torch.nanquantile(samples, alpha, dim=-1)
    hi = torch.nanquantile(samples, 1 - alpha, dim=-1)
    return lo.tolist(), hi.tolist()


# ----------------------------------------------------------------------------------------------------------
# Phase boundary


def phase_boundary(
    cumulative_removed_excess: list[float],
    cumulative_removed_excess_lo: list[float],
    emerged_excess: list[float],
    emerged_excess_lo: list[float],
    *,
    removed_fraction: float = 0.9,
    require_significant: bool = True,
) -> int | None:
    """Index of the first checkpoint that ends the denoising stage (METHOD.md section 6), or None.

    The rule: the cumulative excess removed count has reached ``removed_fraction`` of its running maximum
    *and* the excess count of newly emerged (unshared) interactions is growing (> 0) at that checkpoint.
    With ``require_significant`` the running maximum must have a bootstrap lower bound above 0 and the
    emerged excess too, so noise alone gives no boundary. Index 0 (the base) is never a boundary.
    """
    if not 0 < removed_fraction <= 1:
        raise ValueError(f"removed_fraction: expected a number in (0, 1], got {removed_fraction!r}")
    best = -math.inf
    best_lo = -math.inf
    for t in range(1, len(cumulative_removed_excess)):
        value = cumulative_removed_excess[t]
        if value > best:
            best, best_lo = value, cumulative_removed_excess_lo[t]
        removal_done = best > 0 and value >= removed_fraction * best and (best_lo > 0 or not require_significant)
        growing = emerged_excess[t] > 0 and (emerged_excess_lo[t] > 0 or not require_significant)
        if removal_done and growing:
            return t
    return None
