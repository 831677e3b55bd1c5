"""Result container of the AND-OR decomposition, saved as safetensors + JSON."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_TENSORS = ("I_and", "I_or", "p", "q", "objective")


@dataclass(frozen=True)
class AndOrResult:
    """Output of :func:`sftint_fast.and_or`.

    Attributes:
        I_and: ``(..., 2^n)`` AND interactions, indexed by bitmask (bit ``i`` = player ``i``); order 0 holds
            ``I_and(∅) + I_or(∅)`` (METHOD.md reporting convention).
        I_or: ``(..., 2^n)`` OR interactions; ``I_or[..., 0] == 0`` after folding.
        p, q: ``(..., 2^n)`` the learned split and the bounded noise term.
        objective: ``(K,)`` or ``(K, B)`` the optimised ``Σ|I_and| + Σ|I_or|`` (before folding) per recorded
            step and row.
        config: plain JSON-able dict of the options and per-row facts (``q_bound``, ``v_empty``, ...).
    """

    I_and: torch.Tensor
    I_or: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor
    objective: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"I_and": ..., "I_or": ..., "p": ..., "q": ..., "objective": ..., "config": {...}}``."""
        out: dict[str, Any] = {name: getattr(self, name) for name in _TENSORS}
        out["config"] = dict(self.config)
        return out

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Writes ``<path>.safetensors`` (tensors) and ``<path>.json`` (config), each atomically.

        A trailing ``.safetensors`` or ``.json`` on ``path`` is dropped. Returns both paths.
        """
        from safetensors.torch import save_file

        base = _base(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        tensors_path = base.with_name(base.name + ".safetensors")
        json_path = base.with_name(base.name + ".json")
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in _TENSORS}
        # encoded before anything is touched: a config JSON cannot encode must not cost an earlier save its files
        text = json.dumps(self.config, indent=1, sort_keys=True)
        # an earlier save's JSON goes first: a save interrupted between the two files must not leave this result's
        # tensors beside another result's config (load then refuses the folder instead of mixing them)
        json_path.unlink(missing_ok=True)
        _atomic_write(tensors_path, lambda tmp: save_file(tensors, tmp))
        _atomic_write(json_path, lambda tmp: Path(tmp).write_text(text))
        return tensors_path, json_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> AndOrResult:
        """Reads what :meth:`save` wrote (same ``path``; tensors on CPU)."""
        from safetensors.torch import load_file

        base = _base(path)
        tensors_path = base.with_name(base.name + ".safetensors")
        json_path = base.with_name(base.name + ".json")
        for required in (tensors_path, json_path):
            if not required.exists():
                raise FileNotFoundError(f"AndOrResult.load: expected {required} (written by save), not found")
        tensors = load_file(str(tensors_path))
        missing = [name for name in _TENSORS if name not in tensors]
        if missing:
            raise ValueError(f"AndOrResult.load: {tensors_path} lacks tensors {missing}, has {sorted(tensors)}")
        config = json.loads(json_path.read_text())
        _check_config_matches(config, tensors, json_path, tensors_path)
        return cls(**{name: tensors[name] for name in _TENSORS}, config=config)


def _check_config_matches(config: Any, tensors: dict[str, torch.Tensor], json_path: Path, tensors_path: Path) -> None:
    """ValueError unless ``config`` is a dict whose recorded ``shape`` and ``dtype`` (where present) are those of the
    tensors: files of two results side by side (one copied or renamed over the other) must not load as one."""
    if not isinstance(config, dict):
        raise ValueError(f"AndOrResult.load: expected {json_path} to hold a config dict, got {type(config).__name__}")
    first = tensors["I_and"]
    for key, value in (("shape", list(first.shape)), ("dtype", str(first.dtype).replace("torch.", ""))):
        if key in config and config[key] != value:
            raise ValueError(f"AndOrResult.load: {json_path} records {key} {config[key]!r} but {tensors_path} holds "
                             f"{value!r}: the two files belong to different results")


def _base(path: str | os.PathLike) -> Path:
    base = Path(path)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    return base


def _atomic_write(target: Path, write) -> None:
    """Writes through ``write(tmp_path)`` into a temp file beside ``target``, then renames it over."""
    from sftint_fast._files import atomic_write

    atomic_write(target, lambda tmp: write(str(tmp)))
