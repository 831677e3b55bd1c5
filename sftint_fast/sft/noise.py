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
state at the anchor ``a = t - persistence``, on K replicates of the checkpoints ``a+1 … t`` (:func:`null_values`).
Under pure noise ``v_t = v + e_t`` the exact floor would use the true ``v`` plus fresh noise; the anchor's ``v`` is
only one noisy, *selection-biased* look at it (the sets it makes salient are the ones its noise pushed up, the
next checkpoint replaces that noise rather than adding to it). So:

- an interaction is *signal* when it is above ``3σ(S)`` at the anchor and at the checkpoint before it; signal keeps
  the anchor value plus a perturbation of the observed change's size (the METHOD.md definition);
- every other interaction is redrawn: a true value from its empirical-Bayes posterior given the anchor and the
  previous checkpoint (a model's dense background of small interactions is kept by its share ``τ²/(τ²+σ²/2)``,
  ``τ²`` pooled over probes per order), shared by a draw's replicates, plus fresh noise ``N(0, σ²)`` each;
- ``σ²`` (one checkpoint's noise per coefficient) comes from the differences of consecutive checkpoints other
  than the anchor, independent of the anchor's noise, with a clipped mean square (:func:`clipped_mean_square`).

On pure-noise sequences (6 seeds x 32 probes x 8 checkpoints, n=6, persistence 1-3, with and without hysteresis)
the floor is 0.89-1.09 of the observed counts for both nulls (0.73-0.88 with the anchor's value plus noise;
persistence 3 emergences, a small count, 1.3); with a dense background as large as the low orders' noise,
removals 1.15 and emergences 0.94 (1.30 and 0.75).
Per-checkpoint 95% intervals of the excess miss 0 in 8-28% of the checks, an oracle floor in 3-11%.
The iid null's fresh noise is iid noise on ``v`` (its Harsanyi coefficients correlated, :func:`_fresh_noise`): drawn
per coefficient it put ``3^k`` times one entry's variance on ``v(S)``, and with the AND-OR solver (SGD, 15 pure-noise
runs of 12 probes, n=5, 6 checkpoints) the floor was 1.45x / 2.52x the observed removals / emergences; now 1.10x /
1.17x (the AND sets, which see each coefficient alone: 1.05x / 0.91x). With a dense background in the interaction
domain the SGD removal floor stays ~2.1x (emergences 1.04x): read SGD floors as conservative.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch

from sftint_fast.interactions.harsanyi import harsanyi, inverse_harsanyi
from sftint_fast.ops.transforms import popcount

ThresholdReference = Literal["base", "checkpoint", "absolute"]
NullKind = Literal["order_matched", "iid"]


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
    if reference not in ("base", "checkpoint", "absolute"):
        raise ValueError(f"reference: expected 'base', 'checkpoint' or 'absolute', got {reference!r}")
    if reference == "base" and base_threshold is not None:
        return base_threshold
    if reference == "absolute":
        return torch.full((interactions.shape[0], 1), float(tau), dtype=interactions.dtype, device=interactions.device)
    return tau * max_abs_nonempty(interactions)


def _raw_status(magnitude: torch.Tensor, thr: torch.Tensor, previous: torch.Tensor | None,
                hysteresis: bool) -> torch.Tensor:
    status = magnitude > thr
    if hysteresis and previous is not None:
        status = status | (previous & (magnitude >= thr / 2))
    status[:, 0] = False
    return status


def initial_state(interactions: torch.Tensor, *, tau: float, reference: ThresholdReference) -> SetState:
    """The state after the base checkpoint: ``Ω_0`` = raw status of ``interactions`` ``(B, 2^n)``."""
    if not isinstance(interactions, torch.Tensor) or interactions.dim() != 2:
        got = tuple(interactions.shape) if isinstance(interactions, torch.Tensor) else type(interactions).__name__
        raise ValueError(f"interactions: expected a (B, 2^n) tensor, got {got}")
    thr = threshold(interactions, tau=tau, reference=reference, base_threshold=None)
    raw = _raw_status(interactions.abs(), thr, None, False)
    zeros = torch.zeros_like(interactions, dtype=torch.int64)
    return SetState(raw=raw, stable=raw.clone(), run=zeros, base=raw.clone(), preserved=raw.clone(),
                    emerged=torch.zeros_like(raw), first_emerged=zeros - 1, base_threshold=thr)


def step_state(state: SetState, interactions: torch.Tensor, *, index: int, tau: float, reference: ThresholdReference,
               hysteresis: bool, persistence: int) -> SetState:
    """Advance ``state`` by the checkpoint with index ``index`` (base = 0) and interactions ``(B, 2^n)``."""
    if not isinstance(interactions, torch.Tensor) or interactions.shape != state.raw.shape:
        got = tuple(interactions.shape) if isinstance(interactions, torch.Tensor) else type(interactions).__name__
        raise ValueError(f"interactions: expected shape {tuple(state.raw.shape)} (as the state), got {got}")
    if not isinstance(persistence, int) or isinstance(persistence, bool) or persistence < 1:
        raise ValueError(f"persistence: expected an int >= 1, got {persistence!r}")
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
      the change of ``v'`` over ``S ≠ ∅`` divided by ``√2``, so that the perturbation of ``v'``
      (``n(S) - n(∅)``) has the observed RMS change of ``v'``, and the noise of ``v(∅)`` enters ``v'`` as it
      does in a real change.
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


_MEDIAN_CHI2_1 = 0.45493642311957174    # median of a squared standard normal
_CLIPPED_CHI2_1 = 0.999985               # E[z² | z² <= 25] of a standard normal: the clipped mean's bias


def clipped_mean_square(squares: torch.Tensor) -> torch.Tensor:
    """Robust and efficient ``E[x²]`` of Gaussian samples per row: ``(B, N)`` squares → ``(B, 1)``.

    From 4 samples on, the mean of the squares at most ``25/0.4549`` times their median (``|x| <= 5σ``: a few
    large real changes are not noise; a 3σ cut, with a median of a few samples, clipped noise: 2-4% low),
    divided by the Gaussian ``E[x² | |x| <= 5σ]/σ²`` (the clipped mean's bias); below 4 samples
    the plain mean (the median of fewer cannot tell a real change from noise). Near the mean's efficiency, where a
    median alone would be noisy: the orders that decide the counts have one or a few coefficients, and a noisy
    level biases the floor (the crossing probability is not linear in it: a plain median put 1.27x the observed
    emergences in the pure-noise floor, a plain mean let one planted change drown the planted emergence).
    """
    if squares.shape[-1] < 4:
        return squares.mean(-1, keepdim=True)
    cut = squares.quantile(0.5, dim=-1, keepdim=True) * (25 / _MEDIAN_CHI2_1)
    kept = squares <= cut
    return (squares * kept).sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp(min=1) / _CLIPPED_CHI2_1


def noise_level(differences: Sequence[torch.Tensor], *, kind: NullKind) -> torch.Tensor:
    """Variance of every Harsanyi coefficient of one checkpoint's noise, ``(B, 2^n)``.

    ``differences`` are ``(B, 2^n)`` differences ``v_i - v_j`` of two checkpoints each; under the null each holds
    two checkpoints' independent noise, so one checkpoint's noise has half their energy. Estimated by
    :func:`clipped_mean_square`, pooled over the differences and, for ``"order_matched"``, over the coefficients
    of each order; for ``"iid"`` over the entries ``S ≠ ∅`` of ``v'`` (whose difference carries four times one
    entry's variance, the noise of ``v(∅)`` entering every ``v'(S)``), times ``2^k`` at order ``k``. Entry 0 is 0.
    """
    if not differences:
        raise ValueError("noise_level: expected at least one difference of two checkpoints, got none")
    if kind not in ("order_matched", "iid"):
        raise ValueError(f"kind: expected 'order_matched' or 'iid', got {kind!r}")
    stack = torch.stack([d - d[:, :1] for d in differences])                            # (m, B, 2^n)
    size = stack.shape[-1]
    order = popcount(size)
    if kind == "iid":
        entries = stack[..., 1:].pow(2).transpose(0, 1).reshape(stack.shape[1], -1)
        out = clipped_mean_square(entries) / 4 * (2.0 ** order).to(stack.dtype)
        out[:, 0] = 0
        return out
    change = harsanyi(stack.reshape(-1, size)).reshape(stack.shape)
    out = torch.zeros_like(change[0])
    for k in range(1, int(order.max()) + 1):
        sel = order == k
        pooled = change[..., sel].pow(2).transpose(0, 1).reshape(change.shape[1], -1)
        out[:, sel] = clipped_mean_square(pooled) / 2
    return out


def shrinkage(interactions: torch.Tensor, sigma2: torch.Tensor, noise_level_mask: torch.Tensor) -> torch.Tensor:
    """Empirical-Bayes weight ``w = τ_k² / (τ_k² + σ²(S))`` of every anchor interaction, ``(B, 2^n)``.

    ``τ_k²`` is the variance of the true interactions of order ``k`` among the positions in ``noise_level_mask``,
    pooled over all probes (one coefficient of the top order per probe cannot tell it apart from noise):
    ``max(0, mean(I² - σ²))``. A model's dense background of small interactions keeps a share ``w`` of its anchor
    value in the null replicates; pure noise (``τ = 0``) keeps none.
    """
    order = popcount(interactions.shape[-1])
    tau2 = torch.zeros_like(interactions)
    for k in range(1, int(order.max()) + 1):
        sel = (order == k) & noise_level_mask
        count = int(sel.sum())
        if count:
            excess = ((interactions.pow(2) - sigma2) * sel).sum() / count
            tau2[:, order == k] = excess.clamp(min=0)
    total = tau2 + sigma2
    return torch.where(total > 0, tau2 / total.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros_like(total))


def _fresh_noise(sigma2: torch.Tensor, kind: NullKind, shape: tuple[int, ...],
                 generator: torch.Generator) -> torch.Tensor:
    """One checkpoint's noise in the interaction domain, ``shape`` = ``(draws, B, 2^n)``, of variance ``sigma2``
    (:func:`noise_level`) per coefficient. ``"order_matched"``: independent per coefficient (METHOD.md: noise in the
    interaction domain, random positions and signs). ``"iid"``: the Harsanyi transform of iid Gaussian noise on ``v``
    (sd ``s``, ``sigma2 = 2^k s²`` at order ``k``), whose coefficients share entries of ``v``: drawn independently, they
    put ``(3^k - 1) s²`` on ``v'(S)`` instead of ``2 s²``, a floor about twice the observed counts under pure noise with
    an AND-OR solver (which reads ``v`` as a whole; the AND sets only see each coefficient's own spread)."""
    if kind == "iid":
        if shape[-1] < 2:
            return torch.zeros(shape, dtype=sigma2.dtype)
        s = (sigma2[:, 1:2] / 2).sqrt()                                             # order 1: sigma2 = 2 s^2
        return harsanyi(s * torch.randn(shape, generator=generator, dtype=sigma2.dtype))
    return sigma2.sqrt() * torch.randn(shape, generator=generator, dtype=sigma2.dtype)


def null_values(anchor: torch.Tensor, later: Sequence[torch.Tensor], *, earlier: Sequence[torch.Tensor] = (),
                kind: NullKind, draws: int, generator: torch.Generator, keep: float = 3.0,
                evidence: int = 2) -> torch.Tensor:
    """Null replicates of the checkpoints after ``anchor``: ``(B, 2^n)`` and ``p`` later ``v`` →
    ``(p, draws, B, 2^n)``.

    ``later[j]`` is the observed ``v_{a+j+1}``, ``earlier`` the checkpoints before the anchor in order (empty at the
    base), the last of them ``v_{a-1}``. An anchor interaction is *signal* when it is above ``keep · σ(S)`` at the
    anchor and, where there is one, at ``v_{a-1}`` too (one noisy checkpoint alone is selection-biased: the sets it
    makes salient are the ones its noise pushed up). Signal keeps its anchor value plus a change of the observed
    size (:func:`null_perturbations` of ``v_{a+j+1} - v_a``, METHOD.md 7.1). Every other interaction is redrawn
    from the null itself: a true value ``μ ~ N(w·Ī, w·σ²/m)``, ``Ī`` the mean of the anchor and the ``m - 1``
    checkpoints before it (``m <= evidence``; more evidence lags a real drift), ``w`` from :func:`shrinkage`,
    shared by the ``p`` replicates of a draw, plus fresh noise of variance ``σ²`` per replicate
    (:func:`_fresh_noise`: ``"iid"`` as iid noise on ``v``). ``σ²``
    (:func:`noise_level`) comes from the differences of consecutive checkpoints other than the anchor
    (``v_{a-1}``, ``later…``), independent of the anchor's noise under the null; with no such pair (the base,
    persistence 1) from ``v_{a+1} - v_a``.
    """
    if not later:
        raise ValueError("null_values: expected at least one later checkpoint, got none")
    if evidence < 1:
        raise ValueError(f"null_values: expected evidence >= 1 (checkpoints averaged for the true value), "
                         f"got {evidence}")
    previous = earlier[-1] if len(earlier) else None
    chain = ([previous] if previous is not None else []) + list(later)
    differences = [b - a for a, b in zip(chain[:-1], chain[1:])] or [later[0] - anchor]
    sigma2 = noise_level(differences, kind=kind)
    sigma = sigma2.sqrt()
    interactions = harsanyi(anchor - anchor[:, :1])
    # the true value's evidence: the anchor and up to evidence - 1 checkpoints before it, most recent first
    looks = [interactions] + [harsanyi(v - v[:, :1]) for v in list(earlier)[::-1][:max(evidence - 1, 1)]]
    signal = interactions.abs() > keep * sigma
    if previous is not None:
        signal &= looks[1].abs() > keep * sigma
    looks = looks[:evidence]
    observed, m = torch.stack(looks).mean(0), len(looks)                         # noise variance sigma^2 / m
    weight = shrinkage(observed, sigma2 / m, ~signal)
    shape = (draws,) + tuple(interactions.shape)
    # the true value's uncertainty, w·σ²/m per coefficient, drawn as the noise is (iid: correlated as on v)
    centre = weight * observed + (weight / m).sqrt() * _fresh_noise(sigma2, kind, shape, generator)
    out = []
    for v in later:
        change = harsanyi(null_perturbations(v - anchor, kind=kind, draws=draws, generator=generator))
        fresh = centre + _fresh_noise(sigma2, kind, shape, generator)
        fake = torch.where(signal, interactions + change, fresh)
        fake[..., 0] = 0
        out.append(inverse_harsanyi(fake) + anchor[:, :1])
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------
# Probe-level bootstrap


def bootstrap_indices(num_probes: int, *, resamples: int, seed: int) -> torch.Tensor:
    """``(resamples, num_probes)`` probe indices drawn with replacement (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(num_probes, 1), (resamples, num_probes), generator=generator)


#: decimals a sum over probes is rounded to: counts minus floors (means of a few draws) are exact rationals, and a
#: sum that is 0 must not read as 2e-16 > 0 (a significant removal, a phase boundary) from float roundoff
SUM_DECIMALS = 9


def probe_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over the last dimension (the probes), in float64, rounded to :data:`SUM_DECIMALS`."""
    return torch.round(values.double().sum(dim=-1), decimals=SUM_DECIMALS)


def bootstrap_sum(values: torch.Tensor, indices: torch.Tensor, *,
                  level: float = 0.95) -> tuple[list[float], list[float]]:
    """Interval of the probe sum of ``values`` ``(T, B)`` per checkpoint: two lists of length ``T``."""
    if values.shape[1] == 0:
        zeros = [0.0] * values.shape[0]
        return zeros, list(zeros)
    return _quantiles(probe_sum(values[:, indices]), level)


def bootstrap_ratio(numerator: torch.Tensor, denominator: torch.Tensor, indices: torch.Tensor, *,
                    level: float = 0.95) -> tuple[list[float], list[float]]:
    """Interval of ``Σ_b num / Σ_b den`` over resampled probes (``(T, B)`` each); NaN where undefined."""
    if numerator.shape[1] == 0:
        nans = [math.nan] * numerator.shape[0]
        return nans, list(nans)
    ratio = numerator[:, indices].sum(-1).double() / denominator[:, indices].sum(-1).double()
    return _quantiles(ratio, level)


def bootstrap_nanmean(values: torch.Tensor, indices: torch.Tensor, *,
                      level: float = 0.95) -> tuple[list[float], list[float]]:
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

    Why "unshared": METHOD.md counts emerged interactions "with γ-share below the base model's". One
    interaction's own share is ``G_S`` in {0, 1} (section 4), and the base model's γ is a fraction in [0, 1], so
    ``G_S < γ_base`` holds exactly for the unshared ones (``G_S = 0``) whenever the base shares anything at all
    (γ_base > 0, every real run). Without a reference, every emerged interaction counts.
    """
    if isinstance(removed_fraction, bool) or not isinstance(removed_fraction, (int, float)):
        raise TypeError(f"removed_fraction: expected a number in (0, 1], got {removed_fraction!r}")
    if not 0 < removed_fraction <= 1:
        raise ValueError(f"removed_fraction: expected a number in (0, 1], got {removed_fraction!r}")
    curves = (cumulative_removed_excess, cumulative_removed_excess_lo, emerged_excess, emerged_excess_lo)
    if len({len(curve) for curve in curves}) > 1:
        raise ValueError(f"phase_boundary: expected four curves of one length (one value per checkpoint), got "
                         f"lengths {[len(curve) for curve in curves]}")
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
