"""A transformers ``TrainerCallback`` that runs an :class:`~sftint_fast.sft.tracker.SFTTracker` during training.

Usage::

    tracker = sf.SFTTracker(probes, tokenizer, out_dir="run/interactions")
    callback = sf.InteractionCallback(tracker, every=50)
    callback.attach(trainer)          # = trainer.add_callback(callback) + logging through trainer.log
    trainer.train()

Callbacks are not handed the ``Trainer``; ``attach`` keeps a reference so the scalars go through
``trainer.log`` (``state.log_history`` plus every reporting callback: console, TensorBoard, W&B). Without it,
the scalars are appended to ``state.log_history`` and the module logger only.

Under ``torchrun`` (DDP) attach the callback on every rank, as the ``Trainer`` itself runs on every rank:
each rank evaluates its share of the probes on the unwrapped model (``model.module``; ``torch.compile``'s
``_orig_mod``), and the scalars are computed and logged on the main process (``state.is_world_process_zero``) only.
A model sharded across the ranks (FSDP, DeepSpeed ZeRO-3) is refused before training: track the saved checkpoints
with ``sftint track --watch``.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sftint_fast import distributed
from sftint_fast.sft.tracker import SFTTracker, unwrap_model

logger = logging.getLogger(__name__)


class InteractionCallback(TrainerCallback):
    """Runs ``tracker.add_checkpoint`` at step 0, every ``every`` steps, on every save and at the step training
    ends (the final model, whatever ended it).

    The model is evaluated in eval mode under ``torch.no_grad`` and its train mode is restored; with ``bf16``/``fp16``
    its own forward runs, not the Trainer's autocast one (the tracker's ``compute_dtype`` sets the precision).
    Logged scalars (``interactions/<name>``): ``removed``, ``preserved``, ``emerged`` (cumulative set sizes),
    ``removed_new``, ``removed_floor``, ``removed_excess``, ``emerged_new``, ``emerged_floor`` and
    ``emerged_excess`` (this checkpoint's new changes, their noise floor and the excess over it; counts summed over
    AND and OR), ``gamma_emerged``/``gamma_removed``/``gamma_preserved`` (with a reference) and
    ``rho_emerged``/``rho_removed`` (like the counts, of AND and OR together; ``report.curves["and/..."]`` and
    ``["or/..."]`` hold each kind's), ``p_y_mean``, ``heldout_loss``,
    ``irrelevant_probes`` (probes whose target became irrelevant), and ``phase_boundary`` (the
    step that ended the denoising stage, METHOD.md section 6) once there is one; ``tracking_seconds`` (this
    checkpoint's tracking) and ``tracking_overhead``: the share of the wall time since the base was tracked
    (before the first training step, a fixed cost) spent tracking the later checkpoints. The callback's attributes
    ``seconds_first``, ``seconds_tracking`` and ``seconds_training`` hold the base's seconds and the totals behind
    that share.

    ``max_overhead``: the share ``f`` of that wall time tracking may take (e.g. 0.1). Tracking then runs when due
    rather than every ``every`` steps: after each checkpoint the next one is set the fewest steps later (at least
    ``every``) that keep tracking within ``f`` at the measured speeds of tracking and of training (``next_step``;
    logged as ``interactions/next_tracking_step``): the early, expensive checkpoints spread the later ones out.
    Saves are still tracked when they happen. Under DDP the main process decides.

    ``report_dir``: the main process writes the whole report there (report.md and .json, figures, sets.json, the
    ``Trainer``'s losses in training_log.json, the run's cost) after every tracked checkpoint, so a run stopped
    early still has one, and again when training ends.

    ``stop_at_boundary``: when the phase boundary is found, save a checkpoint and stop training there
    (``control.should_save`` / ``should_training_stop``): the interactions say SFT has stopped removing noise and
    started adding overfitted interactions. Off by default (the boundary is only logged). Under DDP the main
    process decides and every rank follows. ``phase_boundary`` is the boundary found, or None. A boundary the
    tracker already had when training began (a resumed tracker: training stopped there and is resumed on purpose)
    does not stop training again; only a new one does.
    """

    def __init__(self, tracker: SFTTracker, every: int = 50, *, trainer: Any = None,
                 stop_at_boundary: bool = False, max_overhead: float | None = None,
                 report_dir: str | os.PathLike | None = None) -> None:
        if not isinstance(tracker, SFTTracker):
            raise TypeError(f"tracker: expected an SFTTracker, got {type(tracker).__name__}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every: expected an int >= 1, got {every!r}")
        if not isinstance(stop_at_boundary, bool):
            raise TypeError(f"stop_at_boundary: expected a bool, got {type(stop_at_boundary).__name__}")
        if max_overhead is not None and (isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float))
                                         or not 0 < max_overhead < 1):
            raise ValueError(f"max_overhead: expected a share of the run's wall time in (0, 1) or None, got "
                             f"{max_overhead!r}")
        if report_dir is not None and not isinstance(report_dir, (str, os.PathLike)):
            raise TypeError(f"report_dir: expected a folder path or None, got {type(report_dir).__name__}")
        self.tracker = tracker
        self.every = every
        self.report_dir = None if report_dir is None else Path(report_dir)
        self.report_error: str | None = None  # why the last report could not be written, if it could not
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self.next_step: int | None = None  # with max_overhead: the step the next tracking is due at
        self._last: tuple[int, float] | None = None  # (step, time) the last tracking ended
        self.trainer = trainer
        self.stop_at_boundary = stop_at_boundary
        self.seconds_tracking = 0.0  # after the first tracking (the base), on the main process
        self.seconds_first: float | None = None  # the first tracking's (the base's) seconds
        self._clock: float | None = None  # when the first tracking ended: the wall time the budget counts from
        self.phase_boundary: int | None = None
        self._boundary_before: int | None = None  # the boundary a resumed tracker had when training began

    def attach(self, trainer: Any) -> "InteractionCallback":
        """Adds this callback to ``trainer`` and logs through ``trainer.log``; returns self."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    @property
    def seconds_training(self) -> float:
        """Wall time since the first tracking of this run ended (the base, before any training step; tracking
        after it included)."""
        return 0.0 if self._clock is None else time.perf_counter() - self._clock

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        out_dir, output_dir = self.tracker.out_dir, getattr(args, "output_dir", None)
        if out_dir is not None and output_dir is not None and os.path.realpath(out_dir) == os.path.realpath(output_dir):
            raise ValueError(f"out_dir: expected a folder of the tracker's own, got the Trainer's output_dir "
                             f"{str(output_dir)!r}, where save_model writes the model's config.json over the "
                             f"tracker's; use e.g. {os.path.join(str(output_dir), 'interactions')!r}")
        if model is not None:  # a sharded model (FSDP, ZeRO-3) is refused before training, whatever the tracker holds
            unwrap_model(model)
        if self.stop_at_boundary:  # collective under torch.distributed: every rank, whatever its tracker holds
            before = None
            if state.is_world_process_zero and self.tracker.records:
                before = self.tracker.report().phase_boundary
            self._boundary_before = distributed.broadcast_object(before)
            if self._boundary_before is not None and state.is_world_process_zero:
                logger.warning("the tracker resumed past its phase boundary (step %d): training goes on, and stops "
                               "only at a new boundary (stop_at_boundary=True)", self._boundary_before)
        if state.global_step > 0 and not self.tracker.records and model is not None and state.is_world_process_zero:
            where = "" if self.tracker.out_dir is None else f" (out_dir {self.tracker.out_dir})"
            logger.warning("training resumed at step %d with a tracker that has no records%s: its base (the step-0 "
                           "reference of every removed and emerged set) is the step-%d model, not the pre-training "
                           "model. To compare with the pre-training model, track that first "
                           "(tracker.add_checkpoint(base_model, 0)) or resume the tracker of the run that began at "
                           "step 0 (the same out_dir)", state.global_step, where, state.global_step)
        if self.tracker.steps and state.global_step < self.tracker.steps[-1] and state.is_world_process_zero:
            logger.warning("training begins at step %d, and the tracker holds steps up to step %d: those steps are "
                           "not tracked again (a second trainer.train(), or a resume from an earlier checkpoint); "
                           "tracking goes on after step %d", state.global_step, self.tracker.steps[-1],
                           self.tracker.steps[-1])
        self._track(state, control, model, state.global_step)
        if (self.stop_at_boundary and state.is_world_process_zero and self.tracker.records
                and self.tracker.records[0].values.shape[0] < 2 and self.tracker.config.boundary_significant):
            logger.warning("stop_at_boundary with one probe never stops: one probe gives no bootstrap interval, so "
                           "no boundary is significant (track more probes, or boundary_significant=False)")
        if self._clock is None:  # the base was tracked before (a resumed tracker): the budget starts here
            self._clock = time.perf_counter()
        if self.max_overhead is not None and self.next_step is None:
            self.next_step = state.global_step + self.every
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.max_overhead is None:
            due = state.global_step % self.every == 0
        else:
            due = self.next_step is not None and state.global_step >= self.next_step
        if due:
            self._track(state, control, model, state.global_step)
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        # training ends (max_steps, an early stop, a stop file): track the final model, whatever ``every`` and the
        # saves left out; here, before ``load_best_model_at_end`` swaps in another model (on_train_end is too late)
        if control.should_training_stop:
            self._track(state, control, model, state.global_step)
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        should_save = control.should_save  # this step's checkpoint is saved: stopping here needs no other save
        self._track(state, control, model, state.global_step)
        control.should_save = should_save
        return control

    def _track(self, state: Any, control: Any, model: Any, step: int) -> None:
        # a resumed tracker may hold steps past a checkpoint training resumed from: add_checkpoint refuses those
        if model is None or (self.tracker.steps and step <= self.tracker.steps[-1]):
            return
        t0 = time.perf_counter()
        self.tracker.add_checkpoint(model, step)   # collective under torch.distributed: every rank
        boundary = None
        interval = None
        if state.is_world_process_zero:
            report = self.tracker.report()
            boundary = report.phase_boundary
            metrics = scalars(self.tracker, report)
            if self.report_dir is not None:  # part of what tracking costs
                self._write_report(state, report)
            seconds = time.perf_counter() - t0
            metrics["interactions/tracking_seconds"] = seconds
            if self._clock is None:  # the first tracking (the base): a fixed cost, outside the budget
                self.seconds_first = seconds
            else:
                self.seconds_tracking += seconds
                metrics["interactions/tracking_overhead"] = self.seconds_tracking / max(self.seconds_training, 1e-9)
            if self.max_overhead is not None:
                interval = self._interval(step, t0, seconds)
                metrics["interactions/next_tracking_step"] = step + interval
            if self.trainer is not None:
                # trainer.log clears control.should_log: keep the Trainer's own pending log (its loss, gathered
                # across ranks under DDP, so skipping it on one rank would desynchronise the collectives)
                should_log = control.should_log
                self.trainer.log(dict(metrics))
                control.should_log = should_log
            else:
                state.log_history.append({**metrics, "step": step})
            logger.info("step %d: %s", step, metrics)
        if self.max_overhead is not None:
            self.next_step = step + distributed.broadcast_object(interval)  # the main process decides
        self._last = (step, time.perf_counter())
        if self._clock is None:
            self._clock = self._last[1]
        if not self.stop_at_boundary:
            self.phase_boundary = boundary if state.is_world_process_zero else None
            return
        self.phase_boundary = boundary = distributed.broadcast_object(boundary)  # the main process decides
        if boundary is not None and boundary != self._boundary_before and not control.should_training_stop:
            logger.warning("step %d: the denoising stage ended at step %d (phase boundary); saving and stopping "
                           "training (stop_at_boundary=True)", step, boundary)
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.report_dir is not None and state.is_world_process_zero and self.tracker.records:
            self._write_report(state)  # with the Trainer's whole log
        return control

    def _write_report(self, state: Any, report: Any = None) -> None:
        from sftint_fast.plot import write_tracker_report
        from sftint_fast.sft.training_log import TrainingLog

        try:  # a report that cannot be written (disk, an odd log entry) must not end a training run
            training = TrainingLog.from_history(state.log_history, source="the Trainer's log_history")
            cost = {"run_seconds": self.seconds_training, "run_seconds_tracking": self.seconds_tracking,
                    "run_seconds_base": self.seconds_first} if self._clock is not None else None
            write_tracker_report(self.tracker, self.report_dir, training=training, cost=cost, report=report)
            self.report_error = None
        except Exception as err:  # noqa: BLE001 -- reported, and the tracked records are saved by the tracker
            self.report_error = f"{type(err).__name__}: {err}"
            logger.warning("step %d: could not write the report to %s (%s); training goes on, the tracked "
                           "checkpoints are kept by the tracker%s", state.global_step, self.report_dir,
                           self.report_error, "" if self.tracker.out_dir is None else
                           f" in {self.tracker.out_dir} (sftint_fast.plot.write_tracker_report writes it later)")

    def _interval(self, step: int, started: float, seconds: float) -> int:
        """Steps until the next tracking so that tracking keeps within ``max_overhead`` of the wall time since the
        first tracking: with ``S`` s spent tracking (this one included) in ``W`` s of wall time, ``T`` s for this
        tracking and ``t`` s per training step (measured since the last tracking ended), the next tracking ``k``
        steps on keeps ``(S + T) / (W + k t + T) <= f`` for ``k >= ((S + T) / f - W - T) / t``. Never fewer than
        ``every``; ``every`` until ``t`` is known (after the first tracking)."""
        if self._clock is None or self._last is None or step <= self._last[0]:
            return self.every
        per_step = (started - self._last[1]) / (step - self._last[0])
        if per_step <= 0:
            return self.every
        spent, wall = self.seconds_tracking, self.seconds_training
        needed = ((spent + seconds) / self.max_overhead - wall - seconds) / per_step
        return max(self.every, math.ceil(needed - 1e-9))


class StopFileCallback(TrainerCallback):
    """Stops training (saving a checkpoint first) once a file appears: the other half of tracking on another
    device, where ``sftint track --watch ... --boundary-file PATH`` writes ``PATH`` when it finds the phase
    boundary, so a training run that does not track itself still stops where the denoising stage ended.

    Checked after every ``check_every`` steps (a ``stat`` call). Under DDP the main process looks and every rank
    follows (a rank seeing the file a step later than another would hang the next step's collectives).
    ``stopped_by``: what the file held (JSON, or its text), once it stopped training.
    """

    def __init__(self, path: str | os.PathLike, *, check_every: int = 1, save: bool = True) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a file path, got {type(path).__name__}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every: expected an int >= 1, got {check_every!r}")
        self.path = Path(path)
        self.check_every = check_every
        self.save = bool(save)
        self.stopped_by: Any = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.check_every or control.should_training_stop:
            return control
        found = None
        if state.is_world_process_zero and self.path.is_file():
            import json

            try:  # nothing here may raise on the main process alone: the other ranks wait in the broadcast
                text = self.path.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:  # removed since is_file(): not there after all
                text = None
            except OSError as err:  # there but unreadable (permissions): its presence is the signal
                text = f"{self.path} (unreadable: {type(err).__name__}: {err})"
            if text is not None:
                try:
                    found = json.loads(text)
                except ValueError:
                    found = text.strip()
                if found is None or found == "":
                    found = str(self.path)
        found = distributed.broadcast_object(found)  # the main process decides
        if found is not None:
            logger.warning("step %d: %s appeared (%s); %sstopping training", state.global_step, self.path, found,
                           "saving and " if self.save else "")
            self.stopped_by = found
            control.should_training_stop = True
            control.should_save = control.should_save or self.save
        return control


def scalars(tracker: SFTTracker, report: Any = None) -> dict[str, float]:
    """The latest checkpoint's headline numbers, keyed ``interactions/<name>`` (NaN-free: missing ones dropped);
    ``report``: the tracker's report when already computed."""
    report = tracker.report() if report is None else report
    curves = report.curves
    names = {
        "removed": "all/removed", "preserved": "all/preserved", "emerged": "all/emerged",
        "removed_new": "all/removed_new", "removed_floor": "all/removed_new_floor",
        "removed_excess": "all/removed_new_excess", "emerged_new": "all/emerged_new",
        "emerged_floor": "all/emerged_new_floor", "emerged_excess": "all/emerged_new_excess",
        "rho_emerged": "all/emerged_rho", "rho_removed": "all/removed_rho",
        "gamma_emerged": "all/emerged_gamma", "gamma_removed": "all/removed_gamma",
        "gamma_preserved": "all/preserved_gamma", "p_y_mean": "p_y_mean", "heldout_loss": "heldout_loss",
        "irrelevant_probes": "irrelevant_probes",
    }
    out = {}
    for short, key in names.items():
        if key in curves:
            value = curves[key][-1]
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                out[f"interactions/{short}"] = float(value)
    if report.phase_boundary is not None:
        out["interactions/phase_boundary"] = float(report.phase_boundary)
    return out

