"""The Trainer's log (trainer_state.json) beside the interactions: reading it, its values at the tracked steps, and
what the report shows of it."""
import dataclasses
import json
import logging
import math
import random
import re

import pytest
import torch

from sftint_fast.interactions.harsanyi import inverse_harsanyi
from sftint_fast.sft.tracker import SFTTracker
from sftint_fast.sft.training_log import TrainingLog, read_training_log


def _history(steps=20, seed=0, eval_every=5):
    rng = random.Random(seed)
    history = []
    for s in range(1, steps + 1):
        history.append({"epoch": s / 10, "grad_norm": rng.uniform(0.5, 2), "learning_rate": 1e-4,
                        "loss": 3.0 - 0.1 * s + rng.uniform(-0.2, 0.2), "step": s})
        if s % eval_every == 0:
            history.append({"epoch": s / 10, "eval_loss": 2.5 - 0.05 * s, "eval_runtime": 0.1, "step": s})
    history.append({"step": steps, "train_loss": 2.0, "train_runtime": 1.0, "total_flos": 0.0})
    return history


def _write_state(folder, history, global_step):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": global_step, "log_history": history}))
    return folder


def test_values_at_the_tracked_steps_are_window_means_and_the_last_eval():
    history = _history()
    rng = random.Random(1)
    rng.shuffle(history)  # the order of the entries does not matter
    log = TrainingLog.from_history(history, source="test")
    assert set(log.series) == {"loss", "eval_loss", "learning_rate", "grad_norm"}
    assert [s for s, _ in log.series["loss"]] == list(range(1, 21))
    tracked = [0, 3, 4, 10, 17, 25]
    got = log.at(tracked)
    losses = {e["step"]: e["loss"] for e in history if "loss" in e}
    evals = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    previous = -1
    for t, step in enumerate(tracked):
        window = [losses[s] for s in range(previous + 1, step + 1) if s in losses]
        if window:
            assert got["train_loss"][t] == pytest.approx(sum(window) / len(window))
        else:
            assert got["train_loss"][t] is None
        seen = [s for s in evals if s <= step]
        assert got["eval_loss"][t] == (evals[max(seen)] if seen else None)
        previous = step
    assert got["train_loss"][0] is None and got["eval_loss"][:2] == [None, None]
    data = log.to_dict(tracked)
    assert data["at_tracked_steps"]["steps"] == tracked and data["series"]["loss"][0] == [1, losses[1]]
    json.dumps(data)  # plain JSON


def test_a_diverged_run_keeps_its_nan_loss():
    log = TrainingLog.from_history([{"step": 1, "loss": 2.0}, {"step": 2, "loss": float("nan")}], source="x")
    assert math.isnan(log.at([2])["train_loss"][0])


@pytest.mark.parametrize("steps, message", [
    ([2, 1], r"strictly increasing steps .*got \[2, 1\]"),
    ([1, 2, 2], r"strictly increasing steps"),
    ([0, True], "expected ints >= 0, got True"),
    ([0, 1.5], "expected ints >= 0, got 1.5"),
    ([-1, 2], "expected ints >= 0, got -1"),
], ids=["unsorted", "duplicate", "bool", "float", "negative"])
def test_at_refuses_steps_that_are_not_increasing_ints(steps, message):
    # each window runs from the previous step: out of order or repeated, a step got None or another step's losses
    log = TrainingLog.from_history([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}], source="x")
    with pytest.raises(ValueError, match=message):
        log.at(steps)
    with pytest.raises(ValueError, match=message):
        log.to_dict(steps)


@pytest.mark.parametrize("history, message", [
    ({"step": 1}, "expected log_history to be a list of dicts, got dict"),
    ([{"step": 1, "loss": 1.0}, 3], r"log_history\[1\] to be a dict, got int"),
    ([{"loss": 1.0}], r"log_history\[0\]\['step'\] to be an int >= 0, got None"),
    ([{"step": -2, "loss": 1.0}], r"to be an int >= 0, got -2"),
    ([{"step": 1, "loss": "low"}], r"log_history\[0\]\['loss'\] to be a number, got 'low'"),
])
def test_bad_histories_are_refused(history, message):
    with pytest.raises(ValueError, match=message):
        TrainingLog.from_history(history, source="state.json")


def test_read_takes_the_latest_checkpoint_and_warns_about_mixed_runs(tmp_path, caplog):
    history = _history()
    a = _write_state(tmp_path / "checkpoint-10", [e for e in history if e["step"] <= 10], 10)
    b = _write_state(tmp_path / "checkpoint-20", history, 20)
    plain = tmp_path / "checkpoint-30"
    plain.mkdir()  # saved without a Trainer
    assert read_training_log([tmp_path / "nothing", plain]) is None
    with caplog.at_level(logging.WARNING):
        log = read_training_log([b, plain, a])
    assert log.source == str(b / "trainer_state.json") and len(log.series["loss"]) == 20
    assert "different training runs" not in caplog.text
    other = _write_state(tmp_path / "other" / "checkpoint-10", _history(steps=10, seed=5), 10)
    with caplog.at_level(logging.WARNING):
        assert read_training_log([other, b]).source == log.source
    assert "logged different training losses at step 1" in caplog.text


@pytest.mark.parametrize("folders", ["checkpoint-10", "./checkpoint-10"])
def test_read_refuses_one_folder_given_for_a_list(tmp_path, monkeypatch, folders):
    # a string is iterable: read char by char it would look for ./trainer_state.json (the "." of "./")
    monkeypatch.chdir(tmp_path)
    _write_state(tmp_path, _history(steps=4), 4)
    _write_state(tmp_path / "checkpoint-10", _history(steps=10), 10)
    with pytest.raises(TypeError, match="folders: expected an iterable of checkpoint folders, got str"):
        read_training_log(folders)
    from pathlib import Path

    with pytest.raises(TypeError, match="got PosixPath"):
        read_training_log(Path(folders))


@pytest.mark.parametrize("text, message", [
    ("{not json", r"checkpoint-2/trainer_state.json: expected a Trainer state \(JSON\), could not read it"),
    ("[1, 2]", r"checkpoint-2/trainer_state.json: expected a Trainer state \(a JSON object\), got list"),
    (json.dumps({"global_step": "2", "log_history": []}), "expected an int global_step, got '2'"),
    (json.dumps({"global_step": 2}), "expected log_history to be a list of dicts, got NoneType"),
])
def test_unreadable_states_name_the_file(tmp_path, caplog, text, message):
    """TrainingLog.from_file refuses them; the tracking report leaves the log out, with a warning saying why."""
    bad = tmp_path / "checkpoint-2"
    bad.mkdir()
    (bad / "trainer_state.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        TrainingLog.from_file(bad / "trainer_state.json")
    good = _write_state(tmp_path / "checkpoint-1", [{"step": 1, "loss": 2.0}], 1)
    with caplog.at_level(logging.WARNING):
        assert read_training_log([good, bad]).source == str(good / "trainer_state.json")
    assert "the training log is left out of the report" in caplog.text
    assert len(re.findall(message, caplog.text)) == 1


def _report(steps=(0, 5, 10, 15, 20)):
    g = torch.Generator().manual_seed(3)
    I = 0.3 * torch.randn(4, 2**4, generator=g, dtype=torch.float64)
    tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=50, noise_draws=1)
    for t in steps:
        tracker.add_values(t, inverse_harsanyi(I) + 0.01 * torch.randn(I.shape, generator=g, dtype=torch.float64))
    return tracker.report()


def test_report_shows_the_logged_losses(tmp_path):
    from sftint_fast.plot import markdown, write_report

    report = dataclasses.replace(_report(), phase_boundary=10)
    history = _history()
    log = TrainingLog.from_history(history, source="run/checkpoint-20/trainer_state.json")
    md = write_report(report, tmp_path, training=log).read_text()
    saved = json.loads((tmp_path / "training_log.json").read_text())
    assert saved == json.loads(json.dumps(log.to_dict(report.steps)))
    at = log.at(report.steps)
    header = next(line for line in md.splitlines() if line.startswith("| step"))
    assert header.endswith("| held-out loss | train loss | eval loss |")
    row = next(line for line in md.splitlines() if line.startswith("| 15 |"))
    assert row.endswith(f"| {at['train_loss'][3]:.3f} | {at['eval_loss'][3]:.3f} |")
    assert "## Training loss" in md and "From run/checkpoint-20/trainer_state.json" in md
    before, last = at["train_loss"][2], at["train_loss"][4]
    assert (f"ends at step 10, where the training loss was {before:.3f}; by step 20 it fell to {last:.3f} "
            f"({last - before:+.3f})") in md
    # no boundary: the table and the source, no comparison; no log: the report as before
    plain = markdown(dataclasses.replace(report, phase_boundary=None), figures=[], training=log)
    assert "## Training loss" in plain and "ends at step" not in plain
    no_eval = TrainingLog.from_history([e for e in history if "eval_loss" not in e], source="x")
    assert "the eval loss tells whether" in md
    assert "without a held-out loss (sftint track --heldout) or an eval loss" in markdown(report, figures=[],
                                                                                            training=no_eval)
    assert "the held-out loss (lowest at step 5) tells" in markdown(
        dataclasses.replace(report, heldout_loss_min_step=5), figures=[], training=no_eval)
    header = next(line for line in markdown(report, figures=[], training=no_eval).splitlines()
                  if line.startswith("| step"))
    assert header.endswith("| held-out loss | train loss |")
    assert "train loss" not in markdown(report, figures=[])
    assert "tracking cost" not in md and report.cost == {"checkpoints_timed": 0, "base_seconds": None}  # add_values
    with pytest.raises(TypeError, match="training: expected a TrainingLog"):
        markdown(report, figures=[], training=history)


def test_module_example():
    import doctest

    from sftint_fast.sft import training_log

    assert doctest.testmod(training_log).failed == 0


def test_the_training_loss_of_a_window_weighs_each_logged_loss_by_the_steps_it_covers():
    """A Trainer logs at step s the mean loss since its previous log: with logging_first_step, step 1's loss (one
    step) counted as much as step 10's (nine steps), 2.267 instead of 1.950 for steps 1-20."""
    log = TrainingLog.from_history([{"step": 1, "loss": 3.0}, {"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.8}],
                                   source="x")
    got = log.at([0, 20])["train_loss"]
    assert got[0] is None and got[1] == pytest.approx((3.0 + 9 * 2.0 + 10 * 1.8) / 20)
    assert log.at([1, 20])["train_loss"] == [3.0, pytest.approx((9 * 2.0 + 10 * 1.8) / 19)]
    regular = TrainingLog.from_history([{"step": s, "loss": float(s)} for s in (5, 10, 15)], source="x")
    assert regular.at([15])["train_loss"] == [10.0]  # equal intervals: the plain mean


def test_eval_losses_of_several_eval_datasets_are_read_and_shown(tmp_path):
    """A Trainer given a dict of eval datasets logs eval_<name>_loss, no eval_loss: the report showed no eval loss
    at all and said there was none."""
    from sftint_fast.plot import markdown, write_report

    history = [{"step": s, "loss": 3.0 - 0.1 * s} for s in range(1, 21)]
    history += [{"step": s, "eval_chat_loss": 2.0 - 0.01 * s, "eval_code_loss": 2.5 + 0.01 * s,
                 "eval_chat_runtime": 0.1} for s in (5, 10, 15, 20)]
    log = TrainingLog.from_history(history, source="x")
    assert set(log.series) == {"loss", "eval_chat_loss", "eval_code_loss"}
    got = log.at([0, 5, 10, 15, 20])
    assert got["eval_loss"] == [None] * 5
    assert got["eval_chat_loss"] == [None, 1.95, 1.9, 1.85, 1.8] and got["eval_code_loss"][-1] == 2.7
    report = dataclasses.replace(_report(), phase_boundary=10)
    md = markdown(report, figures=[], training=log)
    header = next(line for line in md.splitlines() if line.startswith("| step"))
    assert header.endswith("| held-out loss | train loss | eval_chat_loss | eval_code_loss |")
    row = next(line for line in md.splitlines() if line.startswith("| 15 |"))
    assert row.endswith("| 1.850 | 2.650 |")
    assert "the eval loss tells whether" in md
    write_report(report, tmp_path, training=log)
    assert TrainingLog.load(tmp_path / "training_log.json") == log
    with pytest.raises(ValueError, match=r"log_history\[0\]\['eval_chat_loss'\] to be a number"):
        TrainingLog.from_history([{"step": 1, "eval_chat_loss": "low"}], source="x")
