"""``MaskedLMGame``: a ``shapiq.Game`` whose values come from our engine, so shapiq's exact computer and its
approximators (KernelSHAP, SPEX, …) run on masked variants of an LLM prompt.

Bit order: shapiq passes coalitions as a boolean matrix ``(k, n)``; **column i is player i of the
sftint_fast game = bit i of our bitmask** (``S = Σ_i coalition[i] · 2^i``), so player ``i`` is
``game.player_spans[i]`` / ``game.words[i]``, in the order they appear in the prompt.

Normalisation: shapiq subtracts ``normalization_value`` from every value it returns; with ``normalize=True``
(the default) that is ``v(∅)``, evaluated once at construction, so the shapiq game is ``v(S) - v(∅)``
and its Möbius transform equals ``sf.harsanyi(v - v[0])``. As in shapiq's imputers (``empty_prediction``), the
empty coalition's rows return that value, so the normalised game is exactly 0 there in any batch.

Requires the optional extra: ``pip install "sftint_fast[shapiq]"``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

try:
    import shapiq
except ImportError as error:  # the extra is optional; say how to get it
    raise ImportError('sftint_fast.integrations.shapiq needs shapiq: pip install "sftint_fast[shapiq]"') from error

from sftint_fast.engine import evaluate
from sftint_fast.game import Game

__all__ = ["MaskedLMGame", "coalitions_to_bitmasks"]


def coalitions_to_bitmasks(coalitions: np.ndarray) -> torch.Tensor:
    """Boolean coalition matrix ``(k, n)`` (column ``i`` = player ``i``) → ``(k,)`` int64 bitmasks (bit ``i``)."""
    matrix = np.asarray(coalitions)
    if matrix.ndim != 2:
        raise ValueError(f"coalitions: expected a 2-D (k, n) boolean matrix, received shape {matrix.shape}")
    if matrix.shape[1] > 62:
        raise ValueError(f"coalitions: expected at most 62 players (int64 bitmasks), received {matrix.shape[1]}")
    if not np.all((matrix == 0) | (matrix == 1)):
        raise ValueError(f"coalitions: expected 0/1 (boolean) entries, received values "
                         f"{np.unique(matrix)[:10].tolist()}")
    weights = torch.ones(matrix.shape[1], dtype=torch.int64) << torch.arange(matrix.shape[1])
    return (torch.from_numpy(matrix.astype(np.int64)) * weights).sum(-1)


class MaskedLMGame(shapiq.Game):
    """A shapiq game over the players of a :class:`~sftint_fast.game.Game`, evaluated with ``sf.evaluate``.

    Args:
        model: the causal LM the game is played on.
        game: the prompt, players, baseline, target and value function.
        normalize: subtract ``v(∅)`` (shapiq's ``normalization_value``) from every value; False = raw ``v``.
        verbose: shapiq's per-coalition progress bar (slow: one evaluation per coalition); leave False.
        **evaluate_kwargs: passed to ``sf.evaluate`` (``method``, ``batch_size``, ``compute_dtype``, …).

    >>> exact = shapiq.ExactComputer(MaskedLMGame(model, game))    # doctest: +SKIP
    >>> exact.moebius_transform()                                  # doctest: +SKIP
    """

    def __init__(self, model: Any, game: Game, *, normalize: bool = True, verbose: bool = False,
                 **evaluate_kwargs: Any) -> None:
        if not isinstance(game, Game):
            raise TypeError(f"game: expected a sftint_fast.Game, received {type(game).__name__}")
        for reserved in ("subsets", "progress"):
            if reserved in evaluate_kwargs:
                raise TypeError(f"{reserved}: set by MaskedLMGame for each call, received {reserved}=…")
        self.model = model
        self.masked_game = game
        self.evaluate_kwargs = evaluate_kwargs
        empty = float(self._evaluate(torch.zeros(1, dtype=torch.int64))[0]) if normalize else None
        self.empty_value = empty  # v(∅) for the empty rows of every batch (fp32 sums differ with the batch)
        names = list(game.words) if len(set(game.words)) == len(game.words) else None
        super().__init__(n_players=game.num_players, normalize=normalize, normalization_value=empty,
                         verbose=verbose, player_names=names)

    # shapiq's own properties take float() of a (1,) array, an error from numpy 2.4 on
    @property
    def empty_coalition_value(self) -> float:
        """The game's value (normalised when ``normalize``) of the empty coalition."""
        if self._empty_coalition_value_property is None:
            self._empty_coalition_value_property = float(np.asarray(self(self.empty_coalition)).reshape(-1)[0])
        return self._empty_coalition_value_property

    @property
    def grand_coalition_value(self) -> float:
        """The game's value (normalised when ``normalize``) of the grand coalition."""
        if self._grand_coalition_value_property is None:
            self._grand_coalition_value_property = float(np.asarray(self(self.grand_coalition)).reshape(-1)[0])
        return self._grand_coalition_value_property

    def _evaluate(self, subsets: torch.Tensor) -> np.ndarray:
        values = evaluate(self.model, self.masked_game, subsets=subsets, progress=False, **self.evaluate_kwargs)
        return values.detach().to("cpu", torch.float64).numpy()

    def value_function(self, coalitions: np.ndarray) -> np.ndarray:
        """Raw values ``v`` (not normalised; shapiq subtracts ``normalization_value``) of a ``(k, n)`` boolean
        coalition matrix → ``(k,)`` float64."""
        matrix = np.asarray(coalitions)
        if matrix.ndim == 2 and matrix.shape[1] != self.n_players:
            raise ValueError(f"coalitions: expected {self.n_players} columns (one per player), received "
                             f"{matrix.shape[1]}")
        subsets = coalitions_to_bitmasks(matrix)
        values = self._evaluate(subsets)
        if self.empty_value is not None:
            values[subsets.numpy() == 0] = self.empty_value
        return values
