"""Learned baseline embedding (METHOD.md section 5).

The baseline ``b`` (one embedding ``(hidden,)``, or one per player ``(n, hidden)``) is optimised to make masked
players "absent" in the sense of removing their interactions with the rest: it minimises, over random
disjoint player sets ``S1, S2, S3`` (``S1, S2`` non-empty),

    E |v(S1∪S2∪S3) - v(S1∪S3) - v(S2∪S3) + v(S3)|

with SGD (momentum 0.9). Each term costs 4 forward passes of the masked prompt (through the model's own
forward with ``inputs_embeds``, as the naive engine does), never the ``2^n`` sweep. Only the embedding
masking mode uses a baseline.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from sftint_fast.engine import _no_autocast, _unwrap_parallel
from sftint_fast.engine.naive import _accepts_logits_to_keep, check_inputs_embeds, model_device
from sftint_fast.game import Game, _describe, _eval_mode

logger = logging.getLogger(__name__)


def sample_triples(num_players: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random disjoint ``(S1, S2, S3)`` as int64 bitmasks ``(count, 3)``.

    Two distinct random players seed ``S1`` and ``S2`` (so neither is empty); every other player joins
    ``S1``, ``S2``, ``S3`` or none with probability 1/4 each.
    """
    masks = torch.zeros(count, 3, dtype=torch.int64)
    for row in range(count):
        order = torch.randperm(num_players, generator=generator)
        masks[row, 0] |= 1 << int(order[0])
        masks[row, 1] |= 1 << int(order[1])
        groups = torch.randint(0, 4, (num_players - 2,), generator=generator)
        for player, group in zip(order[2:].tolist(), groups.tolist()):
            if group < 3:
                masks[row, group] |= 1 << player
    return masks


def _subsets_of(triples: torch.Tensor) -> torch.Tensor:
    """``(k, 3)`` triples → ``(4k,)`` bitmasks ordered ``[S1∪S2∪S3, S1∪S3, S2∪S3, S3]`` per triple."""
    s1, s2, s3 = triples.unbind(-1)
    return torch.stack([s1 | s2 | s3, s1 | s3, s2 | s3, s3], dim=-1).flatten()


def _objective(model: Any, game: Game, baseline: torch.Tensor, triples: torch.Tensor) -> torch.Tensor:
    """Mean ``|v(S1∪S2∪S3) - v(S1∪S3) - v(S2∪S3) + v(S3)|`` over ``triples`` (differentiable in ``baseline``)."""
    device = model_device(model)
    subsets = _subsets_of(triples).to(device)
    with_baseline = dataclasses.replace(game, baseline=baseline)
    embeds = model.get_input_embeddings()(game.input_ids.to(device)[None])[0]
    m = game.target.numel()
    keep_kw = {"logits_to_keep": m} if _accepts_logits_to_keep(model) else {}
    inputs = with_baseline.masked_embeds(embeds, subsets)
    logits = model(inputs_embeds=inputs, use_cache=False, **keep_kw).logits
    values = game.values_from_logits(logits[:, -m:], subsets=subsets).view(-1, 4)
    return (values[:, 0] - values[:, 1] - values[:, 2] + values[:, 3]).abs().mean()


def _check_games(model: Any, games: Game | Sequence[Game], per_player: bool) -> list[Game]:
    game_list = [games] if isinstance(games, Game) else list(games)
    if not game_list or not all(isinstance(g, Game) for g in game_list):
        raise TypeError(f"games: expected a Game or a non-empty sequence of Games, got {type(games).__name__}")
    check_inputs_embeds(model)  # the objective gives the model its variants as inputs_embeds, as the naive engine
    hidden = model.get_input_embeddings().weight.shape[1]
    for index, game in enumerate(game_list):
        if game.masking != "embedding":
            raise ValueError(f"games[{index}]: a learned baseline needs masking='embedding', got {game.masking!r}")
        if game.num_players < 2:
            raise ValueError(f"games[{index}]: expected at least 2 players (S1, S2 non-empty), got {game.num_players}")
        if game.baseline.shape[-1] != hidden:
            raise ValueError(
                f"games[{index}]: baseline hidden size {game.baseline.shape[-1]} != the model's {hidden}"
            )
    if per_player and len({g.num_players for g in game_list}) > 1:
        raise ValueError(
            "per_player=True: expected every game to have the same number of players, got "
            f"{sorted({g.num_players for g in game_list})}"
        )
    return game_list


def _initial_baseline(game: Game, per_player: bool, init: torch.Tensor | None) -> torch.Tensor:
    start = game.baseline if init is None else init
    if not isinstance(start, torch.Tensor) or not start.is_floating_point():
        raise TypeError(f"init: expected a floating-point tensor, got {_describe(start)}")
    start = start.detach().float()
    if not bool(torch.isfinite(start).all()):
        raise ValueError("init: expected finite values, received NaN/inf")
    hidden = game.baseline.shape[-1]
    if per_player and start.dim() == 1:
        start = start.expand(game.num_players, hidden)
    if init is None and not per_player and start.dim() == 2:  # only the game's own rows: a caller's init is kept
        start = start.mean(0)
    expected = (game.num_players, hidden) if per_player else (hidden,)
    if tuple(start.shape) != expected:
        hint = " (per_player=True learns one row per player)" if not per_player and start.dim() == 2 else ""
        raise ValueError(f"init: expected shape {expected}{hint}, got {tuple(start.shape)}")
    return start.clone()


def baseline_objective(
    model: Any, games: Game | Sequence[Game], baseline: torch.Tensor, *, samples: int = 16, seed: int = 0
) -> float:
    """The section-5 objective of ``baseline`` averaged over ``games``, on ``samples`` triples per game drawn
    with ``seed`` (the same triples for every baseline: use it to compare baselines). The model runs in eval
    mode (each submodule's mode restored after), as in :func:`learn_baseline`."""
    if not isinstance(baseline, torch.Tensor) or not baseline.is_floating_point():
        raise TypeError(f"baseline: expected a floating-point tensor (hidden,) or (n, hidden), got "
                        f"{_describe(baseline)}")
    model = _unwrap_parallel(model)  # a training loop's DDP / DataParallel model, as sf.evaluate takes it
    game_list = _check_games(model, games, per_player=baseline.dim() == 2)
    if not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1):
        raise ValueError(f"samples: expected an int >= 1, got {samples!r}")
    _check_seed(seed)
    hidden = model.get_input_embeddings().weight.shape[1]
    for game in game_list:  # else the game's embedding check names the engine's embed_tokens_output
        if tuple(baseline.shape) not in ((hidden,), (game.num_players, hidden)):
            raise ValueError(f"baseline: expected shape ({hidden},) or ({game.num_players}, {hidden}) (the model's "
                             f"hidden size), got {tuple(baseline.shape)}")
    generator = torch.Generator().manual_seed(int(seed))
    device = model_device(model)
    total = 0.0
    # dropout would make the same baseline score differently; a caller's autocast is off, as in sf.evaluate
    with torch.no_grad(), _eval_mode(model), _no_autocast(device):
        for game in game_list:
            triples = sample_triples(game.num_players, samples, generator)
            total += float(_objective(model, game, baseline.to(device), triples))
    return total / len(game_list)


def learn_baseline(
    model: Any,
    games: Game | Sequence[Game],
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    per_player: bool = False,
    seed: int = 0,
    samples_per_epoch: int = 8,
    momentum: float = 0.9,
    init: torch.Tensor | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Learns a baseline embedding minimising METHOD.md section 5's objective.

    Args:
        model: a HF causal LM (embedding output fed back as ``inputs_embeds``).
        games: one :class:`~sftint_fast.game.Game` or several (``masking="embedding"``, ``n ≥ 2``).
        epochs: passes over ``games``; each game gets one SGD step per epoch.
        lr, momentum: SGD settings (METHOD.md: 1e-3, 0.9).
        per_player: learn one row per player ``(n, hidden)`` (all games need the same ``n``) instead of
            one ``(hidden,)`` embedding.
        seed: seeds the sampled triples.
        samples_per_epoch: triples ``(S1, S2, S3)`` per game and step (4 forward rows each).
        init: starting baseline; default the first game's (averaged over players when it is per-player and
            ``per_player=False``).
        progress: tqdm bar over epochs.

    Returns:
        float32 ``(hidden,)`` or ``(n, hidden)`` on the model's device; put it in a game with
        ``dataclasses.replace(game, baseline=b)``.

    The model's parameters get no gradients (``requires_grad`` is switched off and restored) and the model
    runs in eval mode (restored after), outside a caller's autocast region (as in ``sf.evaluate``).
    """
    for name, flag in (("per_player", per_player), ("progress", progress)):
        if not isinstance(flag, bool):  # a string is truthy: per_player="no" would learn (n, hidden)
            raise TypeError(f"{name}: expected a bool, got {flag!r}")
    model = _unwrap_parallel(model)  # a training loop's DDP / DataParallel model, as sf.evaluate takes it
    game_list = _check_games(model, games, per_player)
    if not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 0):
        raise ValueError(f"epochs: expected an int >= 0, got {epochs!r}")
    if not (isinstance(samples_per_epoch, int) and not isinstance(samples_per_epoch, bool) and samples_per_epoch >= 1):
        raise ValueError(f"samples_per_epoch: expected an int >= 1, got {samples_per_epoch!r}")
    if not (_is_real(lr) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
    if not (_is_real(momentum) and momentum >= 0 and math.isfinite(momentum)):
        raise ValueError(f"momentum: expected a finite number >= 0, got {momentum!r}")
    _check_seed(seed)
    device = model_device(model)
    start = _initial_baseline(game_list[0], per_player, init)
    generator = torch.Generator().manual_seed(int(seed))
    params = list(model.parameters())
    grad_flags = [p.requires_grad for p in params]
    try:
        # the SGD needs autograd even when the caller runs under torch.no_grad() / torch.inference_mode(); a caller's
        # autocast is off: the baseline is learned on the values sf.evaluate will score it with
        with _eval_mode(model), torch.inference_mode(False), torch.enable_grad(), _no_autocast(device):
            baseline = start.to(device).clone().requires_grad_(True)  # not an inference tensor
            optimizer = torch.optim.SGD([baseline], lr=lr, momentum=momentum)
            for p in params:
                p.requires_grad_(False)
            _descend(model, game_list, baseline, optimizer, generator, epochs, samples_per_epoch, progress)
    finally:
        for p, flag in zip(params, grad_flags):
            p.requires_grad_(flag)
    return baseline.detach()


def _is_real(x: Any) -> bool:
    # numbers.Real: numpy scalars count; a bool would pass as 1 or 0
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_seed(seed: Any) -> None:
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__} {seed!r}")


def _descend(model: Any, game_list: list[Game], baseline: torch.Tensor, optimizer: torch.optim.Optimizer,
             generator: torch.Generator, epochs: int, samples_per_epoch: int, progress: bool) -> None:
    """``epochs`` SGD passes over ``game_list``, one step per game."""
    bar = tqdm(range(epochs), desc="learn_baseline", disable=not progress)
    for epoch in bar:
        losses = []
        for game in game_list:
            triples = sample_triples(game.num_players, samples_per_epoch, generator)
            optimizer.zero_grad()
            loss = _objective(model, game, baseline, triples)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            # checked here: the next step's game would refuse the NaN/inf baseline as if the caller had passed it
            if not bool(torch.isfinite(baseline.detach()).all()):
                raise ValueError(f"learn_baseline: the learned baseline holds NaN/inf after epoch {epoch} (objective "
                                 f"{losses[-1]:.4g}): the SGD diverged; expected a smaller lr than "
                                 f"{optimizer.defaults['lr']!r}")
        mean = sum(losses) / len(losses)
        bar.set_postfix(objective=f"{mean:.4g}")
        logger.debug("learn_baseline epoch %d: objective %.6g", epoch, mean)
