"""What the ``transformers`` ``Trainer`` logged during the run being tracked: its losses beside the interactions.

The interactions say where the denoising stage ends; the training loss says whether training was still lowering
it then. A ``Trainer`` keeps its log in ``trainer_state.json`` (``log_history``: ``{"step", "loss", "grad_norm",
"learning_rate", ...}`` per logging step, ``{"step", "eval_loss", ...}`` per evaluation, ``eval_<name>_loss`` per
eval dataset when it was given several), saved in every checkpoint folder. :func:`read_training_log` reads it from
the checkpoints being tracked; :meth:`TrainingLog.at` summarises it at the tracked steps.

>>> log = TrainingLog.from_history([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.0},
...                                 {"step": 3, "eval_loss": 2.5}], source="example")
>>> log.at([0, 2, 3])
{'train_loss': [None, 2.5, 1.0], 'eval_loss': [None, None, 2.5]}
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

logger = logging.getLogger(__name__)

SERIES = ("loss", "eval_loss", "learning_rate", "grad_norm")
#: eval_loss, and the eval_<name>_loss a Trainer logs per eval dataset when given a dict of them
EVAL_LOSS = re.compile(r"eval_(?:.+_)?loss")
_WARNED: set[str] = set()


@dataclass(frozen=True)
class TrainingLog:
    """Per series (``loss`` = training loss, ``eval_loss`` or ``eval_<name>_loss`` per eval dataset,
    ``learning_rate``, ``grad_norm``), the ``(step, value)`` pairs logged, in step order; ``source``: where they were
    read."""

    series: dict[str, tuple[tuple[int, float], ...]]
    source: str

    @classmethod
    def from_history(cls, history: Any, *, source: str) -> TrainingLog:
        """From a ``log_history`` list (``trainer.state.log_history`` or ``trainer_state.json``'s)."""
        if not isinstance(history, list):
            raise ValueError(f"{source}: expected log_history to be a list of dicts, got {type(history).__name__}")
        series: dict[str, list[tuple[int, float]]] = {name: [] for name in SERIES}
        for i, entry in enumerate(history):
            if not isinstance(entry, dict):
                raise ValueError(f"{source}: expected log_history[{i}] to be a dict, got {type(entry).__name__}")
            step = entry.get("step")
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"{source}: expected log_history[{i}]['step'] to be an int >= 0, got {step!r}")
            evals = [k for k in entry if k not in SERIES and isinstance(k, str) and EVAL_LOSS.fullmatch(k)]
            for name in (*SERIES, *evals):
                value = entry.get(name)
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{source}: expected log_history[{i}][{name!r}] to be a number, got {value!r}")
                series.setdefault(name, []).append((step, float(value)))  # NaN kept: a diverged run shows as such
        return cls({name: tuple(sorted(pairs, key=lambda p: p[0])) for name, pairs in series.items() if pairs},
                   source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainingLog:
        """From a ``trainer_state.json``."""
        return _read_log(Path(path))[1]

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingLog:
        """Reads ``training_log.json`` (what :meth:`to_dict` gave, as the tracking report writes it)."""
        target = Path(path)
        try:
            data = json.loads(target.read_text())
            series = {str(name): tuple((int(s), float(v if v is not None else math.nan)) for s, v in pairs)
                      for name, pairs in data["series"].items()}
            return cls(series, str(data["source"]))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                AttributeError) as err:
            raise ValueError(f"{target}: expected a training log (training_log.json of sftint track / demo), "
                             f"could not read it: {err!r}") from None

    @property
    def eval_losses(self) -> list[str]:
        """The eval loss series logged: ``eval_loss`` first, then each ``eval_<name>_loss``."""
        return sorted((name for name in self.series if EVAL_LOSS.fullmatch(name)), key=lambda n: (n != "eval_loss", n))

    def at(self, steps: Sequence[int]) -> dict[str, list[float | None]]:
        """The training loss at each tracked step as the mean of the values logged after the previous tracked step
        up to this one (the step's own logged loss is one noisy batch), each weighted by the steps since the log
        before it (a ``Trainer`` logs the mean loss since its previous log: with ``logging_first_step``, step 1's
        covers one step), and the last eval loss logged at or before it (``eval_loss``, and each
        ``eval_<name>_loss`` of the log); None where nothing was logged. ``steps``: ints >= 0 in increasing order
        (the tracked steps)."""
        steps = list(steps)
        bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 0]
        if bad:
            raise ValueError(f"steps: expected ints >= 0, got {bad[0]!r}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            # each window runs from the previous step: out of order, a window is empty or holds the wrong losses
            raise ValueError(f"steps: expected strictly increasing steps (the tracked checkpoints), got {steps}")
        evals = ["eval_loss", *(name for name in self.eval_losses if name != "eval_loss")]
        out: dict[str, list[float | None]] = {"train_loss": [], **{name: [] for name in evals}}
        train = self.series.get("loss", ())
        covered = [s - before for (s, _), before in zip(train, [0, *(s for s, _ in train)])]
        previous = -1
        for step in steps:
            window = [(v, w) for (s, v), w in zip(train, covered) if previous < s <= step]
            total = sum(w for _, w in window)
            if total > 0:
                out["train_loss"].append(math.fsum(v * w for v, w in window) / total)
            else:  # no window, or only losses logged again at the step of one before it
                out["train_loss"].append(math.fsum(v for v, _ in window) / len(window) if window else None)
            for name in evals:
                before = [v for s, v in self.series.get(name, ()) if s <= step]
                out[name].append(before[-1] if before else None)
            previous = step
        return out

    def to_dict(self, steps: Sequence[int] | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"source": self.source,
                                "series": {name: [list(p) for p in pairs] for name, pairs in self.series.items()}}
        if steps is not None:
            data["at_tracked_steps"] = {"steps": list(steps), **self.at(steps)}
        return data


def read_training_log(folders: Iterable[str | os.PathLike]) -> TrainingLog | None:
    """The log of the checkpoint folders' training run: the ``trainer_state.json`` of the latest one (highest
    ``global_step``: its history holds the others'); None when no folder has a readable one. The log only adds to
    the report, so a ``trainer_state.json`` that is not a Trainer's log is skipped with a warning that says why
    (:meth:`TrainingLog.from_file` raises instead). Warns when two checkpoints' histories disagree at a step both
    logged (checkpoints of different runs tracked as one)."""
    if isinstance(folders, (str, os.PathLike)):  # iterable too: read char by char, "./x" would find ./trainer_state.json
        raise TypeError(f"folders: expected an iterable of checkpoint folders, got {type(folders).__name__} "
                        f"{os.fspath(folders)!r}; pass [folder] for one")
    states = []
    for folder in folders:
        path = Path(folder) / "trainer_state.json"
        if not path.is_file():
            continue
        try:
            states.append((*_read_log(path), path))
        except ValueError as err:
            if str(err) not in _WARNED:  # once per problem, not at every report a watched run rewrites
                _WARNED.add(str(err))
                logger.warning("the training log is left out of the report: %s", err)
    if not states:
        return None
    states.sort(key=lambda s: s[0])
    latest = states[-1][1]
    losses = dict(latest.series.get("loss", ()))
    for _, log, path in states[:-1]:
        clash = [s for s, v in log.series.get("loss", ()) if s in losses and not _same(v, losses[s])]
        if clash:
            logger.warning("%s and %s logged different training losses at step %d: the checkpoints come from "
                           "different training runs; the report shows the latest one's log", path, latest.source,
                           clash[0])
    return latest


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6)


def _read_log(path: Path) -> tuple[int, TrainingLog]:
    state = _read_state(path)
    step = state.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{path}: expected an int global_step, got {step!r}")
    return step, TrainingLog.from_history(state.get("log_history"), source=str(path))


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: expected a Trainer state (JSON), could not read it: {err}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a Trainer state (a JSON object), got {type(state).__name__}")
    return state
