"""sftint_fast: fast AND-OR interaction explanations of LLMs, and tracking them through SFT.

Bit order, used everywhere: a subset of the ``n`` players is a bitmask, **bit i set = player i
present** (player 0 = least significant bit = first player in the prompt). A game's output ``v`` has
length ``2^n`` and ``v[S]`` is the model's value on the prompt with exactly the players in ``S`` kept.

The public API is imported lazily (``sf.evaluate`` loads the engine only when first used).
"""
from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

_API: dict[str, str] = {
    # interactions
    "harsanyi": "sftint_fast.interactions.harsanyi",
    "inverse_harsanyi": "sftint_fast.interactions.harsanyi",
    "shapley": "sftint_fast.interactions.harsanyi",
    "or_interactions": "sftint_fast.interactions.harsanyi",
    "inverse_or_interactions": "sftint_fast.interactions.harsanyi",
    "subset_mobius": "sftint_fast.ops.transforms",
    "subset_zeta": "sftint_fast.ops.transforms",
    "superset_mobius": "sftint_fast.ops.transforms",
    "superset_zeta": "sftint_fast.ops.transforms",
    "and_or": "sftint_fast.interactions.andor",
    "AndOrResult": "sftint_fast.interactions.result",
    "salient": "sftint_fast.interactions.measures",
    "salient_sets": "sftint_fast.interactions.measures",
    "strength_by_order": "sftint_fast.interactions.measures",
    "uncancelled_ratio": "sftint_fast.interactions.measures",
    "sharing": "sftint_fast.interactions.measures",
    "top_interactions": "sftint_fast.interactions.measures",
    # game and engine
    "Game": "sftint_fast.game",
    "evaluate": "sftint_fast.engine",
    "evaluate_many": "sftint_fast.engine",
    "evaluate_games": "sftint_fast.engine",
    "group_games": "sftint_fast.engine",
    "plan_trie": "sftint_fast.engine.plan",
    "learn_baseline": "sftint_fast.baseline",
    "load_default": "sftint_fast.models",
    "load_causal_lm": "sftint_fast.models",
    # SFT tracking
    "load_probes": "sftint_fast.sft.probes",
    "save_probes": "sftint_fast.sft.probes",
    "confident_probes": "sftint_fast.sft.probes",
    "SFTTracker": "sftint_fast.sft.tracker",
    "TrackReport": "sftint_fast.sft.tracker",
    "InteractionCallback": "sftint_fast.sft.callback",
    "StopFileCallback": "sftint_fast.sft.callback",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'sftint_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if os.environ.get("SFTINT_REQUIRE_EXT", "0") == "1":
    from sftint_fast import _ext

    _ext.has_ext()
