"""`sftint track` over saved checkpoint folders of a tiny random llama: options, resume, refusals."""
import copy
import json
import re

import pytest
import torch

import sftint_fast.engine
from conftest import interrupt_write, tiny_model
from dist_scripts.sft_callback import make_tokenizer
from sftint_fast.cli import main
from sftint_fast.sft.probes import sft_example
from sftint_fast.sft.tracker import SFTTracker

PROMPTS = ["the big cat sat on the red mat", "a small dog did run over the blue river",
           "what is the capital city of france", "why did the cow jump"]
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant {% endif %}")
COUNTS = ("/removed", "/preserved", "/emerged", "_new", "irrelevant_probes")
FAST = ["--n-players", "3", "--andor-method", "and", "--min-base-py", "0", "--bootstrap", "20"]
ONE_DRAW = ["--noise-draws", "1"]  # fast with the noise floor on; refused with --noise-floor none (nothing is drawn)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base/ and ckpt/checkpoint-{10,20,30}/ (each a small random step from the previous), probes.jsonl."""
    root = tmp_path_factory.mktemp("track")
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE  # the held-out loss is computed on chats
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(7)
    models = [model]
    for _ in range(3):
        m = copy.deepcopy(models[-1])
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        models.append(m)
    for name, m in zip(["base", "ckpt/checkpoint-10", "ckpt/checkpoint-20", "ckpt/checkpoint-30"], models):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "probes.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    (root / "heldout.jsonl").write_text(json.dumps({"prompt": "the big cat", "answer": "sat on the mat"}) + "\n")
    return root, models


def _track(root, out, checkpoints, *extra):
    floor_off = any(a == "--noise-floor" and b == "none" for a, b in zip(extra, extra[1:]))
    return main(["track", "--base", str(root / "base"), "--checkpoints", *checkpoints, "--probes",
                 str(root / "probes.jsonl"), "--out", str(out), *FAST, *([] if floor_off else ONE_DRAW), *extra])


def test_track_cli_matches_the_tracker_and_resumes(folders, tmp_path, monkeypatch, capsys):
    root, models = folders
    out = tmp_path / "run"
    rc = _track(root, out, [str(root / "ckpt" / "checkpoint-1*"), str(root / "ckpt" / "checkpoint-20")],
                "--tau", "0.1", "--noise-floor", "none", "--seed", "3", "--heldout", str(root / "heldout.jsonl"),
                "--device", "cpu")
    assert rc == 0, capsys.readouterr().err
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    config = json.loads((out / "tracker" / "config.json").read_text())["tracker"]
    assert config["tau"] == 0.1 and config["n_players"] == 3 and config["noise_floor"] is None and config["seed"] == 3
    assert config["andor_method"] == "and" and config["persistence"] == 2  # not given: the tracker's default
    assert config["hysteresis"] is True
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == [0, 10, 20]

    # the same run in Python on the models themselves gives the same report
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tracker = SFTTracker(PROMPTS, tok, n_players=3, andor_method="and", min_base_py=0.0, bootstrap=20,
                         noise_draws=1, tau=0.1, noise_floor=None, seed=3, progress=False,
                         heldout=[("the big cat", "sat on the mat")])
    for step, model in zip([0, 10, 20], models):
        tracker.add_checkpoint(model, step)
    expected = tracker.report().to_dict()
    for key in ("and/removed", "and/preserved", "and/emerged", "p_y_mean", "heldout_loss"):
        assert report["curves"][key] == pytest.approx(expected["curves"][key], rel=1e-5), key
    assert None not in report["curves"]["heldout_loss"]
    # which interactions changed: sets.json and the report's "What changed" section, with the probes' words
    sets = json.loads((out / "sets.json").read_text())
    assert sets["step"] == 20 and [p["prompt"] for p in sets["probes"]] == expected["probes"]["prompts"]
    assert sum(len(p["and"]["emerged"]) for p in sets["probes"]) == report["curves"]["and/emerged"][-1]
    md = (out / "report.md").read_text()
    assert "## What changed by step 20" in md and f"**{PROMPTS[0]}**" in md
    for p in sets["probes"]:
        assert (f"AND: {len(p['and']['removed'])} removed" in md and f"{p['and']['preserved']} preserved" in md)

    # resuming with one more checkpoint evaluates only that one
    calls = []
    real = sftint_fast.engine.evaluate_games
    monkeypatch.setattr(sftint_fast.engine, "evaluate_games", lambda m, g, **k: calls.extend(g) or real(m, g, **k))
    rc = _track(root, out, [str(root / "ckpt" / "checkpoint-*")], "--tau", "0.1", "--noise-floor", "none", "--seed",
                "3", "--heldout", str(root / "heldout.jsonl"))
    assert rc == 0
    assert json.loads((out / "report.json").read_text())["steps"] == [0, 10, 20, 30]
    assert len(calls) == len(PROMPTS)  # the probes of checkpoint 30 only (no noise draws evaluated by the engine)


def test_track_cli_refuses_another_configuration(folders, tmp_path, capsys):
    root, _ = folders
    out = tmp_path / "run"
    assert _track(root, out, [str(root / "ckpt" / "checkpoint-10")]) == 0
    capsys.readouterr()
    assert _track(root, out, [str(root / "ckpt" / "checkpoint-10")], "--tau", "0.2") == 2
    err = capsys.readouterr().err
    assert "sftint track: out_dir" in err and "another configuration" in err and "tau" in err
    # the advice names the command's option (it said "use a new out_dir", an option of the Python API only)
    assert "use a new out_dir" not in err and "rerun with that run's options or track into another --out" in err
    # --no-hysteresis turns the default set logic's hysteresis off: another configuration too
    assert _track(root, out, [str(root / "ckpt" / "checkpoint-10")], "--no-hysteresis") == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "hysteresis" in err
    other = tmp_path / "measured"
    assert _track(root, other, [str(root / "ckpt" / "checkpoint-10")], "--no-hysteresis", "--persistence", "3") == 0
    config = json.loads((other / "tracker" / "config.json").read_text())["tracker"]
    assert config["hysteresis"] is False and config["persistence"] == 3


@pytest.mark.parametrize("extra,message", [
    (["--tau", "1.5"], "tau: expected a number in the open interval (0, 1)"),
    (["--min-base-py", "2"], "min_base_py: expected a number in [0, 1]"),
    (["--device", "cuda"], "device: expected cpu (no CUDA device here)"),
])
def test_track_cli_reports_bad_options(folders, tmp_path, extra, message, capsys):
    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    root, _ = folders
    assert _track(root, tmp_path / "run", [str(root / "ckpt" / "checkpoint-10")], *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "tracker" / "config.json").exists()


def test_track_cli_reports_bad_files(folders, tmp_path, capsys):
    root, _ = folders
    (tmp_path / "heldout.jsonl").write_text(json.dumps({"prompt": "the big cat"}) + "\n")
    assert _track(root, tmp_path / "a", [str(root / "ckpt" / "checkpoint-10")], "--heldout",
                  str(tmp_path / "heldout.jsonl")) == 2
    assert 'expected an "answer" in every row, got none in rows [0]' in capsys.readouterr().err
    with pytest.raises(ValueError, match="tokenizer: expected a chat template"):
        sft_example(make_tokenizer(), "the big cat", "sat")
    (tmp_path / "checkpoint-40").write_text("not a folder")
    assert _track(root, tmp_path / "b", [str(tmp_path / "checkpoint-40")]) == 2
    assert "expected model folders, got paths that are not folders" in capsys.readouterr().err


def test_track_cli_refusals_name_the_option(folders, tmp_path, capsys):
    root, _ = folders
    checkpoint = [str(root / "ckpt" / "checkpoint-10")]
    assert main(["track", "--base", str(tmp_path / "nobase"), "--checkpoints", *checkpoint, "--probes",
                 str(root / "probes.jsonl"), "--out", str(tmp_path / "a")]) == 2
    assert "base: expected model folders, got paths that are not folders" in capsys.readouterr().err
    assert main(["track", "--base", str(root / "base"), "--checkpoints", *checkpoint, "--probes",
                 str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "a")]) == 2
    assert "--probes: expected a JSONL file of probes" in capsys.readouterr().err
    assert _track(root, tmp_path / "a", checkpoint, "--heldout", str(root)) == 2
    assert "--heldout: expected a JSONL file" in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_track_cli_rerun_after_a_refused_base_takes_the_corrected_options(folders, tmp_path, capsys):
    """A run refused at its base checkpoint (no probe has --n-players players) saved nothing to resume: the rerun
    with another --n-players in the same --out is not refused as 'a run with another configuration'."""
    root, _ = folders
    out = tmp_path / "run"
    assert _track(root, out, [str(root / "ckpt" / "checkpoint-10")], "--n-players", "20") == 2
    assert "expected at least one probe with 20 players" in capsys.readouterr().err
    assert _track(root, out, [str(root / "ckpt" / "checkpoint-10")]) == 0, capsys.readouterr().err
    assert json.loads((out / "tracker" / "config.json").read_text())["tracker"]["n_players"] == 3
    assert (out / "report.md").exists()


def test_track_cli_refuses_a_checkpoint_of_another_model(folders, tmp_path, capsys):
    root, _ = folders
    other = tmp_path / "ckpt" / "checkpoint-50"
    tiny_model("llama", vocab_size=160).save_pretrained(other)
    assert _track(root, tmp_path / "run", [str(other)]) == 2
    err = capsys.readouterr().err
    # named: under a glob (or --watch) the message alone did not say which folder holds another model
    assert f"checkpoint {other} (step 50): model: expected the base model's architecture" in err
    assert "SFTINT_DEBUG=1 shows the traceback" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["--niter", "-1"], "--niter: expected an int >= 0"),
    (["--persistence", "0"], "--persistence: expected an int >= 1"),
    (["--baseline", "zero"], "--baseline: invalid choice"),
])
def test_track_cli_rejects_bad_arguments_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["track", "--base", "b", "--checkpoints", "c", "--probes", "p", "--out", "o", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_track_cli_under_torchrun_two_ranks(folders, tmp_path):
    """`torchrun --nproc_per_node 2 -m sftint_fast.cli track`: the ranks split the probes, rank 0 alone writes and
    prints, and the report equals the single-process one. The ranks run in --watch mode (rank 0 lists the ready
    checkpoints and decides when the idle timeout ends the watch; a rank that disagreed would hang)."""
    import os
    import socket
    import subprocess
    import sys

    root, _ = folders
    args = ["track", "--base", str(root / "base"), "--checkpoints", str(root / "ckpt" / "checkpoint-*"), "--probes",
            str(root / "probes.jsonl"), *FAST, "--noise-floor", "iid", "--noise-draws", "2"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "sftint_fast.cli", *args, "--out", str(tmp_path / "two"), "--watch", "0.1",
           "--idle-timeout", "1", "--settle", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("report: ") == 1
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["steps"] == one["steps"] == [0, 10, 20, 30]
    def flat(x):
        return [z for y in x for z in flat(y)] if isinstance(x, list) else [x]

    for key, curve in one["curves"].items():
        got, want = flat(two["curves"][key]), flat(curve)
        if key == "seconds_tracking":  # timings: measured, not computed
            assert all(x > 0 for x in got + want)
            continue
        assert [x is None for x in got] == [x is None for x in want], key
        numbers = [(g, w) for g, w in zip(got, want) if w is not None]
        # the ranks evaluate other groups of games than one process does: values equal up to float rounding,
        # which reaches the continuous curves (rho, strengths) at ~1e-5 but no count of sets
        tol = {"rel": 0, "abs": 0} if key.endswith(COUNTS) else {"rel": 1e-4, "abs": 1e-7}
        assert [g for g, _ in numbers] == pytest.approx([w for _, w in numbers], nan_ok=True, **tol), key


def test_track_cli_with_a_reference_model(folders, tmp_path, capsys):
    """--reference: the reference model's interactions of the same probes give the gamma curves."""
    root, models = folders
    out = tmp_path / "ref"
    assert _track(root, out, [str(root / "ckpt" / "checkpoint-10")], "--reference", str(root / "ckpt" /
                  "checkpoint-30"), "--noise-floor", "none") == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["gamma_available"] is True
    gammas = [k for k in report["curves"] if k.endswith("_gamma")]
    assert gammas and all(report["curves"][k] is not None for k in gammas)
    without = tmp_path / "noref"
    assert _track(root, without, [str(root / "ckpt" / "checkpoint-10")], "--noise-floor", "none") == 0
    assert json.loads((without / "report.json").read_text())["gamma_available"] is False


def _save_later(events, after):
    """Runs ``events`` (``(delay_s, fn)``) in a thread, in order, once the file ``after`` exists: a training run
    saving checkpoints while the tracker watches."""
    import threading
    import time

    def run():
        deadline = time.monotonic() + 120
        while not after.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for delay, fn in events:
            time.sleep(delay)
            fn()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_track_cli_watch_follows_a_run_still_saving(folders, tmp_path, capsys):
    """--watch: checkpoints that appear later are tracked in order, each once complete (trainer_state.json, or no
    change for --settle seconds: a half-written folder is not read early), and the result equals tracking the
    finished folders in one go."""
    import shutil

    root, _ = folders
    live = tmp_path / "live"
    live.mkdir()
    src = root / "ckpt"
    out = tmp_path / "watched"

    def copy(step):
        def fn():
            tmp = tmp_path / f"tmp-{step}"
            shutil.copytree(src / f"checkpoint-{step}", tmp)
            if step == 10:  # a Trainer checkpoint: complete as soon as trainer_state.json is there
                (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            tmp.rename(live / f"checkpoint-{step}")  # copytree kept old mtimes: 20 is settled at once
        return fn

    partial = live / "checkpoint-30"

    def start_partial():  # a save in progress: config.json now, the weights a second later
        partial.mkdir()
        shutil.copy(src / "checkpoint-30" / "config.json", partial / "config.json")

    def finish_partial():
        for f in (src / "checkpoint-30").iterdir():
            if f.name != "config.json":
                shutil.copy(f, partial / f.name)

    # after the base is tracked: checkpoint-30 half-written first (read now, it would fail: no weights), then 10, 20
    thread = _save_later([(0.0, start_partial), (1.0, finish_partial), (0.2, copy(10)), (0.2, copy(20))],
                         after=out / "tracker" / "step_000000000.json")
    rc = _track(root, out, [str(live / "checkpoint-*")], "--watch", "0.2", "--settle", "3.0", "--until-step", "30")
    thread.join()
    assert rc == 0, capsys.readouterr().err
    watched = json.loads((out / "report.json").read_text())
    assert watched["steps"] == [0, 10, 20, 30]
    assert _track(root, tmp_path / "direct", [str(src / "checkpoint-*")]) == 0
    direct = json.loads((tmp_path / "direct" / "report.json").read_text())
    for key in ("and/removed", "and/preserved", "and/emerged", "p_y_mean"):
        assert watched["curves"][key] == pytest.approx(direct["curves"][key], rel=1e-6), key


def test_track_cli_watch_stops_when_idle_and_skips_a_deleted_checkpoint(folders, tmp_path, monkeypatch, capsys,
                                                                         caplog):
    import shutil
    import time

    import sftint_fast.models

    root, _ = folders
    live = tmp_path / "live"
    for step in (10, 20):
        shutil.copytree(root / "ckpt" / f"checkpoint-{step}", live / f"checkpoint-{step}")
        (live / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    real = sftint_fast.models.load_causal_lm

    def deleted_first(path, **kwargs):  # save_total_limit removed checkpoint-10 before the tracker got to it
        if str(path).endswith("checkpoint-10"):
            shutil.rmtree(path)
        return real(path, **kwargs)

    monkeypatch.setattr(sftint_fast.models, "load_causal_lm", deleted_first)
    start = time.monotonic()
    rc = _track(root, tmp_path / "run", [str(live / "checkpoint-*")], "--watch", "0.1", "--idle-timeout", "1")
    assert rc == 0, capsys.readouterr().err
    assert 1 <= time.monotonic() - start < 60
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == [0, 20]
    assert any("was deleted before it could be read" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("extra,message", [
    (["--until-step", "5"], "--until-step: expected only with --watch, received --until-step 5 without --watch"),
    (["--idle-timeout", "5"], "--idle-timeout: expected only with --watch, received --idle-timeout 5 without "
                              "--watch"),
    (["--settle", "5"], "--settle: expected only with --watch, received --settle 5 without --watch"),
    (["--stale-after", "600"], "--stale-after: expected only with --watch, received --stale-after 600 without "
                               "--watch"),
])
def test_track_cli_watch_options_need_watch(folders, tmp_path, extra, message, capsys):
    """Named by their flags, as --settle always was (--until-step / --idle-timeout were refused by run_track with its
    parameter names, 'until_step / idle_timeout ... only with watch'), before anything is written."""
    root, _ = folders
    assert _track(root, tmp_path / "run", [str(root / "ckpt" / "checkpoint-10")], *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_track_cli_writes_the_boundary_file_once_the_boundary_is_found(folders, tmp_path, monkeypatch, capsys, caplog):
    """--boundary-file: written (once) when the report has a phase boundary, not before; the rule itself is the
    tracker's (tested in test_sft_sets), here it is made to fire at the second checkpoint."""
    from sftint_fast.sft import noise

    root, _ = folders
    stop = tmp_path / "signals" / "STOP"
    ckpts = [str(root / "ckpt" / "checkpoint-10")]
    assert _track(root, tmp_path / "a", ckpts, "--boundary-file", str(stop), "--device", "cpu") == 0
    assert not stop.exists()  # the real rule finds no boundary in one small random step
    real = noise.phase_boundary
    monkeypatch.setattr(noise, "phase_boundary", lambda removed, *a, **k: 1 if len(removed) > 1 else real(removed, *a, **k))
    assert _track(root, tmp_path / "b", ckpts + [str(root / "ckpt" / "checkpoint-20")], "--boundary-file", str(stop),
                  "--device", "cpu") == 0
    written = json.loads(stop.read_text())
    assert written == {"phase_boundary": 10, "tracked_steps": [0, 10, 20], "report": str(tmp_path / "b" / "report.md")}
    assert json.loads((tmp_path / "b" / "report.json").read_text())["phase_boundary"] == 10
    stop.write_text("kept")  # an existing file is left alone (and said to stop a run at once)
    with caplog.at_level("WARNING", logger="sftint_fast.sft.demo"):
        assert _track(root, tmp_path / "c", ckpts, "--boundary-file", str(stop), "--device", "cpu") == 0
    assert stop.read_text() == "kept" and "exists already" in caplog.text


def test_track_cli_shows_each_checkpoint_on_stderr(folders, tmp_path, monkeypatch, capsys):
    """A command shows the package's INFO messages on stderr when the program configured no logging (the sftint
    entry point): each tracked checkpoint and a one-line summary of the report; not on other torchrun ranks."""
    import logging

    package = logging.getLogger("sftint_fast")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh `sftint` process (pytest adds its own)
    monkeypatch.setattr(package, "handlers", [])
    monkeypatch.setattr(package, "level", logging.NOTSET)
    root, _ = folders
    ckpts = [str(root / "ckpt" / "checkpoint-10"), str(root / "ckpt" / "checkpoint-20")]
    assert _track(root, tmp_path / "a", ckpts, "--device", "cpu", "--noise-floor", "none") == 0
    err = capsys.readouterr().err
    for step in (0, 10, 20):
        assert re.search(rf"^sftint: step {step}: tracked \S+ in [0-9.]+ s$", err, re.M), (step, err)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    c = report["curves"]
    assert (f"sftint: step 20: {c['all/removed'][-1]:.0f} removed (no noise floor), "
            f"{c['all/emerged'][-1]:.0f} emerged, {c['all/preserved'][-1]:.0f} preserved; "
            f"mean p_y {c['p_y_mean'][-1]:.3f}; phase boundary: none yet") in err
    assert len(package.handlers) == 1
    monkeypatch.setenv("RANK", "1")
    assert _track(root, tmp_path / "b", ckpts, "--device", "cpu", "--noise-floor", "none") == 0
    assert "sftint: step" not in capsys.readouterr().err and len(package.handlers) == 1  # installed once
    monkeypatch.delenv("RANK")
    assert _track(root, tmp_path / "f", ckpts, "--device", "cpu", "--noise-draws", "2") == 0
    c = json.loads((tmp_path / "f" / "report.json").read_text())["curves"]
    assert (f"sftint: step 20: {c['all/removed'][-1]:.0f} removed "
            f"({c['all/removed_new_excess_cumulative'][-1]:+.1f} beyond the floor so far), ") in capsys.readouterr().err


def test_track_cli_resume_skips_a_checkpoint_before_the_last_tracked_one(folders, tmp_path, caplog):
    """A rerun over checkpoints one of which is before the last tracked step (tracked 10 and 30, now 20 shows up):
    20 is skipped with a message, not loaded and then refused mid-run."""
    root, _ = folders
    out = tmp_path / "run"
    assert _track(root, out, [str(root / "ckpt" / "checkpoint-10"), str(root / "ckpt" / "checkpoint-30")]) == 0
    with caplog.at_level("WARNING", logger="sftint_fast.sft.demo"):
        assert _track(root, out, [str(root / "ckpt" / "checkpoint-*")]) == 0
    assert json.loads((out / "report.json").read_text())["steps"] == [0, 10, 30]
    assert "step 20 is before the last tracked step 30; skipped" in caplog.text


def test_track_cli_watch_does_not_spin_on_a_skipped_checkpoint(folders, tmp_path, monkeypatch, caplog):
    """--watch resuming a run that tracked 10 and 30: checkpoint-20 is skipped once, the loop still sleeps between
    looks and the idle timeout still ends it (it used to list and skip 20 again at once, forever)."""
    from sftint_fast.sft import demo

    root, _ = folders
    out = tmp_path / "run"
    assert _track(root, out, [str(root / "ckpt" / "checkpoint-10"), str(root / "ckpt" / "checkpoint-30")]) == 0
    calls = []
    real = demo._match

    def counted(patterns):
        calls.append(1)
        if len(calls) > 200:
            raise RuntimeError("the watch loop lists the checkpoints without pause")
        return real(patterns)

    monkeypatch.setattr(demo, "_match", counted)
    with caplog.at_level("WARNING", logger="sftint_fast.sft.demo"):
        assert _track(root, out, [str(root / "ckpt" / "checkpoint-*")], "--watch", "0.1", "--idle-timeout", "1",
                      "--settle", "0") == 0
    assert json.loads((out / "report.json").read_text())["steps"] == [0, 10, 30]
    assert caplog.text.count("step 20 is before the last tracked step 30; skipped") == 1


def test_track_cli_says_which_glob_matched_nothing(folders, tmp_path, capsys):
    """A glob that matches no folder is named as such (not as a folder misnamed), and a missing folder given next
    to existing ones is an error, not silently left out."""
    root, _ = folders
    assert _track(root, tmp_path / "a", [str(root / "ckpt" / "checkpoint-9*")]) == 2
    err = capsys.readouterr().err
    assert "got nothing for" in err and "checkpoint-9*" in err and "named like checkpoint-<step>" not in err
    missing = [str(root / "ckpt" / "checkpoint-10"), str(root / "ckpt" / "checkpoint-99")]
    assert _track(root, tmp_path / "b", missing) == 2
    assert "checkpoint-99" in capsys.readouterr().err
    assert not (tmp_path / "b" / "report.json").exists()


def test_track_cli_resume_refuses_another_base_model(folders, tmp_path, capsys):
    """A resumed run does not recompute step 0: resuming it with another --base (here a fine-tuned checkpoint of the
    same architecture) would compare the new base's checkpoints with the old base's values, so it is refused."""
    root, _ = folders
    out = tmp_path / "run"
    assert _track(root, out, [str(root / "ckpt" / "checkpoint-10")]) == 0
    record = json.loads((out / "base.json").read_text())
    assert record["base"] == str(root / "base") and len(record["fingerprint"]) == 64
    capsys.readouterr()
    argv = ["track", "--base", str(root / "ckpt" / "checkpoint-10"), "--checkpoints",
            str(root / "ckpt" / "checkpoint-20"), "--probes", str(root / "probes.jsonl"), "--out", str(out), *FAST,
            *ONE_DRAW]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "base: expected the base model this run folder tracked" in err and "checkpoint-10" in err
    assert err.strip().splitlines()[-1] == "(SFTINT_DEBUG=1 shows the traceback)"  # the library's refusal: the hint
    assert _track(root, out, [str(root / "ckpt" / "checkpoint-20")]) == 0  # the same base resumes
    assert json.loads((out / "report.json").read_text())["steps"] == [0, 10, 20]


@pytest.mark.parametrize("kill", [True, False], ids=["killed", "KeyboardInterrupt"])
def test_track_cli_interrupted_right_after_saving_its_base_still_refuses_another_base(folders, tmp_path, monkeypatch,
                                                                                       capsys, kill):
    """base.json was written after the base's step was saved: a run interrupted in between kept step 0 without it,
    and a rerun with another --base was accepted (its checkpoints compared with the first base's values)."""
    root, _ = folders
    run, killed = tmp_path / "run", tmp_path / "killed"
    fired = interrupt_write(monkeypatch, KeyboardInterrupt(), after="step_000000000.json",
                            kill=(run, killed) if kill else None)
    assert _track(root, run, [str(root / "ckpt" / "checkpoint-10")]) == 130  # Ctrl-C: exit 130, what was saved kept
    assert fired["target"] is not None
    monkeypatch.undo()
    out = killed if kill else run
    assert (out / "tracker" / "step_000000000.json").exists()
    capsys.readouterr()
    argv = ["track", "--base", str(root / "ckpt" / "checkpoint-10"), "--checkpoints",
            str(root / "ckpt" / "checkpoint-20"), "--probes", str(root / "probes.jsonl"), "--out", str(out), *FAST,
            *ONE_DRAW]
    assert main(argv) == 2
    assert "base: expected the base model this run folder tracked" in capsys.readouterr().err
    assert _track(root, out, [str(root / "ckpt" / "checkpoint-10")]) == 0  # the same base resumes
    assert json.loads((out / "report.json").read_text())["steps"] == [0, 10]


def test_track_cli_rerun_after_a_kill_removes_the_temp_files_it_left(folders, tmp_path, monkeypatch, capsys):
    """Killed while writing its report (and its tracker's step), a run leaves temp files no cleanup removed; the rerun
    gives the whole report and removes them (they piled up at every kill)."""
    root, _ = folders
    run, killed = tmp_path / "run", tmp_path / "killed"
    interrupt_write(monkeypatch, KeyboardInterrupt(), name="report.json", kill=(run, killed))
    assert _track(root, run, [str(root / "ckpt" / "checkpoint-10")]) == 130  # Ctrl-C: exit 130, what was saved kept
    monkeypatch.undo()
    assert [p.name for p in killed.iterdir() if p.name.startswith(".report.")]  # what the kill left
    (killed / "tracker" / ".step_000000020.abcdefgh.tmp.safetensors").write_bytes(b"half")
    assert _track(root, killed, [str(root / "ckpt" / "checkpoint-10")]) == 0, capsys.readouterr().err
    assert json.loads((killed / "report.json").read_text())["steps"] == [0, 10]
    assert not [p for p in killed.rglob(".*") if ".tmp" in p.name]


def test_track_cli_refuses_two_folders_of_one_step(folders, tmp_path, capsys):
    """Two runs' checkpoint-10: the second was taken as tracked already, without a word. The same folder spelled
    twice is one folder."""
    root, _ = folders
    other = tmp_path / "other" / "checkpoint-10"
    other.parent.mkdir()
    other.symlink_to(root / "ckpt" / "checkpoint-20", target_is_directory=True)  # another model, named step 10
    assert _track(root, tmp_path / "a", [str(root / "ckpt" / "checkpoint-10"), str(other)]) == 2
    err = capsys.readouterr().err
    assert "checkpoints: expected one folder per step" in err and "for step 10" in err
    assert not (tmp_path / "a" / "tracker" / "games.json").exists()
    same = [str(root / "ckpt" / "checkpoint-10"), str(root / "ckpt" / "checkpoint-10") + "/"]
    assert _track(root, tmp_path / "b", same, "--noise-floor", "none") == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "report.json").read_text())["steps"] == [0, 10]


@pytest.mark.parametrize("order", [sorted, lambda paths: sorted(paths, reverse=True)], ids=["listed", "reversed"])
def test_track_one_folder_linked_under_two_steps_is_refused_whatever_the_listing_order(tmp_path, monkeypatch, order):
    """checkpoint-20 a link to checkpoint-10: the folder was kept under the name the directory listing gave first,
    so it was tracked as step 10 or as step 20 depending on the file system's order. Now refused either way; the
    same folder spelled twice under one step is still one folder."""
    import glob

    from sftint_fast.sft import demo

    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-20").symlink_to(tmp_path / "checkpoint-10", target_is_directory=True)
    real = glob.glob
    monkeypatch.setattr(demo.glob, "glob", lambda pattern: order(real(pattern)))
    with pytest.raises(ValueError, match=r"one step per folder.*checkpoint-10.*checkpoint-20"):
        demo._match([str(tmp_path / "checkpoint-*")])
    assert demo._match([str(tmp_path / "checkpoint-10"), str(tmp_path / "checkpoint-10") + "/"]) == [
        str(tmp_path / "checkpoint-10")]


def test_track_cli_refuses_a_checkpoint_whose_trainer_state_names_another_step(folders, tmp_path, capsys):
    """A renamed checkpoint folder (checkpoint-10 holding the Trainer's state at global_step 20) was tracked as step
    10: the report put its interactions, and the training loss logged up to step 10, at a step the model never was.
    A folder whose trainer_state.json agrees with its name is tracked."""
    import shutil

    root, _ = folders
    for name, step in (("checkpoint-10", 20), ("checkpoint-20", 20)):
        folder = tmp_path / "ckpt" / name
        shutil.copytree(root / "ckpt" / "checkpoint-20", folder)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    assert _track(root, tmp_path / "a", [str(tmp_path / "ckpt" / "checkpoint-10")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-10" in err and "named for step 10" in err and "global_step 20" in err
    assert not (tmp_path / "a" / "tracker" / "step_000000010.json").exists()
    assert _track(root, tmp_path / "b", [str(tmp_path / "ckpt" / "checkpoint-20")]) == 0, capsys.readouterr().err


DELETED_ON_ONE_RANK = '''
import os, shutil, sys, time
from pathlib import Path
import sftint_fast.models
from sftint_fast.cli import main

real = sftint_fast.models.load_causal_lm
marker = Path(sys.argv[1])

def load(path, **kwargs):  # save_total_limit deletes checkpoint-20 after rank 0 read it, before rank 1 does
    if str(path).endswith("checkpoint-20"):
        if os.environ["RANK"] == "0":
            model = real(path, **kwargs)
            marker.touch()
            return model
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(path)
    return real(path, **kwargs)

sftint_fast.models.load_causal_lm = load
sys.exit(main(sys.argv[2:]))
'''


def test_track_cli_under_torchrun_ranks_agree_on_a_checkpoint_deleted_while_loading(folders, tmp_path):
    """--watch under torchrun: a checkpoint deleted after one rank loaded it and before another did is skipped by
    every rank (a rank tracking it alone would wait in the tracker's collectives for the others)."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys

    root, _ = folders
    live = tmp_path / "live"
    for step in (10, 20, 30):
        shutil.copytree(root / "ckpt" / f"checkpoint-{step}", live / f"checkpoint-{step}")
        (live / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    script = tmp_path / "driver.py"
    script.write_text(DELETED_ON_ONE_RANK)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), str(tmp_path / "loaded"), "track", "--base", str(root / "base"),
           "--checkpoints", str(live / "checkpoint-*"), "--probes", str(root / "probes.jsonl"), *FAST,
           "--noise-floor", "none", "--out", str(tmp_path / "run"), "--watch", "0.1", "--idle-timeout", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too
        stdout, stderr = proc.communicate()
        pytest.fail(f"the ranks hung: {stderr[-2000:]}")
    assert proc.returncode == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == [0, 10, 30]


def test_track_cli_watch_skips_a_checkpoint_deleted_right_after_it_was_listed(folders, tmp_path, monkeypatch, capsys,
                                                                               caplog):
    """save_total_limit deletes checkpoint-10 between the listing that found it complete and its loading: it is
    skipped like one deleted while loading, the watch goes on (it used to stop with 'not folders')."""
    import shutil

    from sftint_fast.sft import demo

    root, _ = folders
    live = tmp_path / "live"
    for step in (10, 20):
        shutil.copytree(root / "ckpt" / f"checkpoint-{step}", live / f"checkpoint-{step}")
        (live / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    real = demo._complete

    def rotated(path, settle):
        complete = real(path, settle)
        if complete and path.endswith("checkpoint-10"):
            shutil.rmtree(path)
        return complete

    monkeypatch.setattr(demo, "_complete", rotated)
    with caplog.at_level("WARNING", logger="sftint_fast.sft.demo"):
        rc = _track(root, tmp_path / "run", [str(live / "checkpoint-*")], "--watch", "0.1", "--idle-timeout", "1")
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == [0, 20]
    assert "checkpoint-10 was deleted before it could be read" in caplog.text


def test_track_cli_resume_refuses_a_tracked_step_whose_checkpoint_changed(folders, tmp_path, capsys):
    """A rerun into the same --out after the checkpoints were retrained into the same folders (other weights, the
    same step names): each step already tracked was skipped by its number, so the report silently kept the first
    training run's values. A checkpoint whose files differ from the ones tracked at its step is refused; the same
    checkpoints resume."""
    import shutil

    root, _ = folders
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt" / "checkpoint-10", ckpt / "checkpoint-10")
    out = tmp_path / "run"
    assert _track(root, out, [str(ckpt / "checkpoint-10")]) == 0
    assert _track(root, out, [str(ckpt / "checkpoint-10")]) == 0  # the same checkpoint: nothing to redo
    shutil.rmtree(ckpt / "checkpoint-10")
    shutil.copytree(root / "ckpt" / "checkpoint-20", ckpt / "checkpoint-10")  # retrained: other weights, step 10
    shutil.copytree(root / "ckpt" / "checkpoint-30", ckpt / "checkpoint-30")
    capsys.readouterr()
    assert _track(root, out, [str(ckpt / "checkpoint-*")]) == 2
    err = capsys.readouterr().err
    assert "checkpoints: expected the checkpoint this run folder tracked at step 10" in err and "another --out" in err
    assert json.loads((out / "report.json").read_text())["steps"] == [0, 10]  # nothing of the new run mixed in


def test_track_cli_too_many_players_points_at_n_players(folders, tmp_path, capsys):
    """All 2^n variants not fitting in memory: the engine's advice "pass subsets=" is no option of sftint track."""
    root, _ = folders
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": " ".join([PROMPTS[0]] * 6), "players": list(range(48))}) + "\n")
    rc = main(["track", "--base", str(root / "base"), "--checkpoints", str(root / "ckpt" / "checkpoint-10"),
               "--probes", str(probes), "--out", str(tmp_path / "run"), "--n-players", "48", "--andor-method", "and",
               "--min-base-py", "0", "--noise-floor", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "all 2^48 variants" in err and "subsets=" not in err and "--n-players" in err


def test_track_cli_watch_resume_refuses_a_tracked_step_whose_checkpoint_changed(folders, tmp_path, capsys):
    """--watch listed only steps not tracked yet, so a retrained checkpoint of a tracked step was never checked: the
    report kept the first training run's values for it and went on with the new run's later steps."""
    import shutil

    root, _ = folders
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt" / "checkpoint-10", ckpt / "checkpoint-10")
    out = tmp_path / "run"
    watch = ["--watch", "0.1", "--idle-timeout", "1", "--settle", "0"]
    assert _track(root, out, [str(ckpt / "checkpoint-*")], *watch) == 0
    assert _track(root, out, [str(ckpt / "checkpoint-*")], *watch) == 0  # the same checkpoint: nothing to redo
    shutil.rmtree(ckpt / "checkpoint-10")
    shutil.copytree(root / "ckpt" / "checkpoint-20", ckpt / "checkpoint-10")  # retrained: other weights, step 10
    shutil.copytree(root / "ckpt" / "checkpoint-30", ckpt / "checkpoint-30")
    capsys.readouterr()
    assert _track(root, out, [str(ckpt / "checkpoint-*")], *watch) == 2
    err = capsys.readouterr().err
    assert "checkpoints: expected the checkpoint this run folder tracked at step 10" in err and "another --out" in err
    assert json.loads((out / "report.json").read_text())["steps"] == [0, 10]  # nothing of the new run mixed in


def test_track_cli_watch_refuses_a_tracked_checkpoint_saved_again_while_watched(folders, tmp_path, capsys):
    """Training restarted from checkpoint-10 while the watch runs: it saves checkpoint-20 again, in place, with other
    weights, then its checkpoint-30. A tracked folder was never looked at again: the report kept the first run's
    step 20 and went on with the new run's step 30, without a word. The watch stops (exit 2) naming the folder,
    as a rerun into the same --out refuses it; the report keeps what was tracked."""
    import shutil

    root, _ = folders
    live = tmp_path / "live"
    for step in (10, 20):
        shutil.copytree(root / "ckpt" / f"checkpoint-{step}", live / f"checkpoint-{step}")
        (live / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    out = tmp_path / "run"

    def save_again():  # the restarted run's step 20: the same folder, other weights
        weights = live / "checkpoint-20" / "model.safetensors"
        weights.write_bytes((root / "ckpt" / "checkpoint-30" / "model.safetensors").read_bytes())

    def save_30():
        shutil.copytree(root / "ckpt" / "checkpoint-30", live / "checkpoint-30")
        (live / "checkpoint-30" / "trainer_state.json").write_text(json.dumps({"global_step": 30}))

    thread = _save_later([(0.3, save_again), (0.5, save_30)], after=out / "tracker" / "step_000000020.json")
    rc = _track(root, out, [str(live / "checkpoint-*")], "--watch", "0.1", "--idle-timeout", "5")
    thread.join()
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "checkpoints: expected the checkpoint this run folder tracked at step 20" in err
    assert str(live / "checkpoint-20") in err and "saved again since it was tracked" in err
    assert json.loads((out / "report.json").read_text())["steps"] == [0, 10, 20]  # nothing of the new run mixed in


def test_watch_tracked_folder_touched_but_not_changed_goes_on(folders, tmp_path, monkeypatch, capsys):
    """A tracked folder whose files are touched (trainer_state.json rewritten, a file's times changed) but whose
    config and weights are the ones tracked is not refused: the watch goes on to the next checkpoint (its files
    compared with the record once, not at every poll)."""
    import os
    import shutil
    import time

    from sftint_fast.sft import demo

    compared = []
    real = demo._tracked_refusal
    monkeypatch.setattr(demo, "_tracked_refusal", lambda *a, **k: compared.append(a[2]) or real(*a, **k))
    root, _ = folders
    live = tmp_path / "live"
    shutil.copytree(root / "ckpt" / "checkpoint-10", live / "checkpoint-10")
    (live / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    out = tmp_path / "run"

    def touch():
        (live / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10, "best": 1}))
        os.utime(live / "checkpoint-10" / "model.safetensors", (time.time(), time.time()))

    def save_20():
        shutil.copytree(root / "ckpt" / "checkpoint-20", live / "checkpoint-20")
        (live / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"global_step": 20}))

    thread = _save_later([(0.3, touch), (0.5, save_20)], after=out / "tracker" / "step_000000010.json")
    rc = _track(root, out, [str(live / "checkpoint-*")], "--watch", "0.1", "--idle-timeout", "3",
                "--until-step", "20")
    thread.join()
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["steps"] == [0, 10, 20]
    assert compared == [str(live / "checkpoint-10")]


def test_track_cli_watch_tracks_a_checkpoint_deleted_right_after_it_was_loaded(folders, tmp_path, monkeypatch,
                                                                               capsys):
    """save_total_limit deletes checkpoint-10 once the tracker has loaded it: the model in memory is tracked as
    before (the record of tracked folders read its files after the load, and the watch stopped with
    FileNotFoundError)."""
    import shutil

    import sftint_fast.models
    from sftint_fast.sft import demo

    root, _ = folders
    live = tmp_path / "live"
    for step in (10, 20):
        shutil.copytree(root / "ckpt" / f"checkpoint-{step}", live / f"checkpoint-{step}")
        (live / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    real = sftint_fast.models.load_causal_lm

    def deleted_after(path, **kwargs):
        model = real(path, **kwargs)
        if str(path).endswith("checkpoint-10"):
            shutil.rmtree(path)
        return model

    monkeypatch.setattr(sftint_fast.models, "load_causal_lm", deleted_after)
    rc = _track(root, tmp_path / "run", [str(live / "checkpoint-*")], "--watch", "0.1", "--idle-timeout", "1")
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == [0, 10, 20]
    # and the resumed watch: checkpoint-20, tracked, is deleted while its files are compared with the record
    real_fingerprint = demo._fingerprint

    def deleted_while_read(folder):
        if str(folder).endswith("checkpoint-20"):
            shutil.rmtree(folder)
        return real_fingerprint(folder)

    monkeypatch.setattr(demo, "_fingerprint", deleted_while_read)
    rc = _track(root, tmp_path / "run", [str(live / "checkpoint-*")], "--watch", "0.1", "--idle-timeout", "1")
    assert rc == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == [0, 10, 20]


@pytest.mark.parametrize("extra, message", [
    (["--tau", "1.5"], "tau: expected a number in the open interval (0, 1)"),
    (["--min-base-py", "2"], "min_base_py: expected a number in [0, 1]"),
], ids=["tau", "min-base-py"])
def test_track_cli_refuses_a_bad_option_before_loading_the_reference(folders, tmp_path, monkeypatch, extra, message,
                                                                     capsys):
    # the tracker checked its options only once constructed, after --reference had loaded (a second model, minutes
    # for a large one) and the probes file had been read
    import sftint_fast.models
    from conftest import count_calls

    root, _ = folders
    calls = count_calls(monkeypatch, {"load_causal_lm": sftint_fast.models})
    assert _track(root, tmp_path / "run", [str(root / "ckpt" / "checkpoint-10")], "--reference",
                  str(root / "ckpt" / "checkpoint-30"), *extra) == 2
    assert message in capsys.readouterr().err
    assert calls["load_causal_lm"] == 0 and not (tmp_path / "run" / "tracker").exists()


def test_track_cli_refuses_a_bad_probes_file_before_loading_the_reference(folders, tmp_path, monkeypatch, capsys):
    import sftint_fast.models
    from conftest import count_calls

    root, _ = folders
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "the big cat sat on the mat"}\n{"prompt": \n')
    calls = count_calls(monkeypatch, {"load_causal_lm": sftint_fast.models})
    assert main(["track", "--base", str(root / "base"), "--checkpoints", str(root / "ckpt" / "checkpoint-10"),
                 "--probes", str(probes), "--reference", str(root / "ckpt" / "checkpoint-30"), "--out",
                 str(tmp_path / "run"), *FAST]) == 2
    assert str(probes) in capsys.readouterr().err and calls["load_causal_lm"] == 0


@pytest.mark.parametrize("text, message", [
    ("", "expected at least one probe, got none"),
    (json.dumps({"prompt": "", "answer": "sat"}) + "\n", "rows[0]: expected a non-empty 'prompt' string"),
    (json.dumps({"prompt": "the big cat", "answer": "sat", "players": [0]}) + "\n",
     'expected {"prompt", "answer"} rows, got "players" in rows [0]'),
    (b"\xff\xfe{}\n", "expected a UTF-8 JSONL file"),
], ids=["empty", "empty-prompt", "players", "not-utf8"])
def test_track_cli_names_the_jsonl_file_a_refusal_is_about(folders, tmp_path, text, message, capsys):
    # an empty --heldout file was refused as "probes: expected at least one probe, got none", while the --probes
    # file was fine; a file that is not UTF-8 by the codec's words alone; a held-out row's "players" was accepted and
    # never used, and its rows were called probes[i]
    root, _ = folders
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert _track(root, tmp_path / "run", [str(root / "ckpt" / "checkpoint-10")], "--heldout", str(heldout)) == 2
    err = capsys.readouterr().err
    assert f"sftint track: {heldout}: " in err and message in err, err


def test_track_cli_watch_waits_for_an_earlier_checkpoint_still_being_written(folders, tmp_path, monkeypatch, caplog):
    """checkpoint-10 is still being written (config.json only, no trainer_state.json) when a complete checkpoint-20
    is listed (a copy or sync that runs out of step order): 20 waits for 10, both are tracked in step order (20 was
    tracked first, and 10, complete a moment later, skipped as before the last tracked step: lost)."""
    import shutil

    from sftint_fast.sft import demo

    root, _ = folders
    live = tmp_path / "live"
    src = root / "ckpt"
    shutil.copytree(src / "checkpoint-20", live / "checkpoint-20")
    (live / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    (live / "checkpoint-10").mkdir()
    shutil.copy(src / "checkpoint-10" / "config.json", live / "checkpoint-10" / "config.json")
    real, looks = demo._complete, []

    def finished_at_the_second_look(path, settle):
        if path.endswith("checkpoint-10"):
            looks.append(path)
            if len(looks) == 2:  # the save ends between the first look and the second
                for f in (src / "checkpoint-10").iterdir():
                    shutil.copy(f, live / "checkpoint-10" / f.name)
                (live / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
        return real(path, settle)

    monkeypatch.setattr(demo, "_complete", finished_at_the_second_look)
    with caplog.at_level("WARNING", logger="sftint_fast.sft.demo"):
        assert _track(root, tmp_path / "run", [str(live / "checkpoint-*")], "--watch", "0.1", "--idle-timeout",
                      "1") == 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"] == [0, 10, 20]
    assert "before the last tracked step" not in caplog.text
    assert "checkpoint-10 is not complete yet" in caplog.text


def test_watch_complete_is_not_fooled_by_kept_modification_times(tmp_path, monkeypatch):
    """A folder copied with its files' modification times kept (cp -a, rsync -a, shutil.copytree: a checkpoint
    synced from the training machine) is complete only once unchanged for `settle` seconds: its files' old mtimes
    made a copy still in progress (config.json there, the weights not yet) count as settled at once."""
    import os
    import time

    from sftint_fast.sft import demo

    from safetensors.torch import save_file

    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(3)}, folder / "model.safetensors")
    for name in ("config.json", "model.safetensors"):
        os.utime(folder / name, (time.time() - 3600, time.time() - 3600))  # kept from the source
    assert not demo._complete(str(folder), 30.0)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 31)
    assert demo._complete(str(folder), 30.0)


def test_watch_whole_weights_needs_every_shard_of_a_sharded_save(tmp_path):
    """A sharded save (model-0000k-of-0000N.safetensors, then model.safetensors.index.json: the Trainer writes the
    index last) cut off between two shards, or copied with the index first, counted as whole: each shard there was
    whole. Every shard the index names must be there, and numbered shards need all their numbers and the index."""
    from safetensors.torch import save_file

    from sftint_fast.sft import demo

    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    index = {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}
    save_file({"a": torch.zeros(3)}, folder / shards[0])
    assert not demo._whole_weights(folder)  # cut off after the first shard
    save_file({"b": torch.ones(3)}, folder / shards[1])
    assert not demo._whole_weights(folder)  # cut off before the index
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert demo._whole_weights(folder)
    (folder / shards[1]).unlink()  # the index copied before the last shard
    assert not demo._whole_weights(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index)[:20])  # cut off while written
    save_file({"b": torch.ones(3)}, folder / shards[1])
    assert not demo._whole_weights(folder)
    # a PyTorch .bin save: its index names its shards too
    (folder / "model.safetensors.index.json").unlink()
    for shard in shards:
        (folder / shard).unlink()
    bins = [f"pytorch_model-0000{i}-of-00002.bin" for i in (1, 2)]
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": bins[0], "b": bins[1]}}))
    torch.save({"a": torch.zeros(3)}, folder / bins[0])
    assert not demo._whole_weights(folder)
    torch.save({"b": torch.zeros(3)}, folder / bins[1])
    assert demo._whole_weights(folder)


def test_track_cli_refuses_a_truncated_checkpoint_with_its_path(folders, tmp_path, capsys):
    """A checkpoint whose safetensors file was cut off (a save killed, a copy in progress): the exit code 2 and a
    message naming the folder, not the safetensors library's traceback."""
    import shutil

    root, _ = folders
    ckpt = tmp_path / "ckpt" / "checkpoint-10"
    shutil.copytree(root / "ckpt" / "checkpoint-10", ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert _track(root, tmp_path / "run", [str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt}: expected complete weight files" in err and "Traceback" not in err


@pytest.mark.parametrize("name, value", [("watch", float("nan")), ("watch", float("inf")),
                                         ("settle", float("nan")), ("idle_timeout", float("nan")),
                                         ("settle", None)])
def test_run_track_refuses_a_time_that_is_not_finite(folders, tmp_path, name, value):
    """run_track (the API behind `sftint track`) took NaN and inf seconds: settle=nan left every folder without a
    trainer_state.json unsettled forever, idle_timeout=nan never ran out, watch=nan/inf crashed in time.sleep;
    settle=None (it has no 'no limit') escaped as a TypeError from the default of stale_after."""
    from sftint_fast.sft.demo import run_track

    root, _ = folders
    times = {"watch": 0.1, name: value}
    with pytest.raises(ValueError, match=f"{name}: expected a finite number of seconds"):
        run_track(str(root / "base"), [str(root / "ckpt" / "checkpoint-*")], str(root / "probes.jsonl"),
                  tmp_path / "run", **times)
    assert not (tmp_path / "run").exists()


def _cut_off_save(folder, src):
    """``folder`` as a save killed mid-write leaves it: config.json and the first half of the weights."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes((src / "config.json").read_bytes())
    weights = (src / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])


def test_watch_ready_skips_an_abandoned_incomplete_folder_after_the_grace_period(folders, tmp_path, monkeypatch,
                                                                                caplog):
    """An earlier checkpoint left half-written (a crashed save: config.json and cut-off weights, no
    trainer_state.json) held every later checkpoint back: once settled it even counted as complete, and its load
    stopped the watch. It is incomplete (its weights are cut off); later checkpoints wait for it while it may still
    be written, and once it has not changed for stale_after seconds it is skipped, named, and the later ones go on.
    One still changing is waited for however old it is."""
    import os
    import time

    from sftint_fast.sft import demo

    root, _ = folders
    live = tmp_path / "live"
    _cut_off_save(live / "checkpoint-10", root / "ckpt" / "checkpoint-10")
    (live / "checkpoint-20").mkdir()
    (live / "checkpoint-20" / "config.json").write_text("{}")
    (live / "checkpoint-20" / "trainer_state.json").write_text("{}")
    paths = [str(live / "checkpoint-10"), str(live / "checkpoint-20")]
    real = time.time
    clock = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + clock[0])

    def ready():
        skipped, abandoned = set(), []
        return demo._ready(paths, skipped, 30.0, 0, set(), 600.0, abandoned), skipped, abandoned

    with caplog.at_level("WARNING", logger="sftint_fast.sft.demo"):
        assert ready() == ([], set(), [])  # just written: it may still be
        clock[0] = 31.0  # settled, but its weights are cut off: still not complete
        assert not demo._complete(paths[0], 30.0) and ready() == ([], set(), [])
        assert "checkpoint-10 is not complete yet" in caplog.text and "is still incomplete" not in caplog.text
        clock[0] = 601.0
        assert ready() == ([paths[1]], {paths[0]}, [paths[0]])
    assert f"{paths[0]} is still incomplete" in caplog.text and "skipped as abandoned" in caplog.text
    now = real() + clock[0]
    os.utime(live / "checkpoint-10" / "model.safetensors", (now, now))  # a slow save still writing it
    assert ready() == ([], set(), [])
    # whole weights: complete once settled, as before
    (live / "checkpoint-10" / "model.safetensors").write_bytes(
        (root / "ckpt" / "checkpoint-10" / "model.safetensors").read_bytes())
    clock[0] = 631.0
    assert ready() == (paths, set(), [])


@pytest.mark.parametrize("left", ["cut-off weights", "config only", "empty"])
def test_track_cli_watch_goes_on_past_an_abandoned_checkpoint(folders, tmp_path, monkeypatch, capsys, caplog, left):
    """--watch over a run whose save of checkpoint-10 was cut off (the trainer crashed mid-save, or a rotation left
    it partial) and checkpoint-20 complete: 20 was held back until the idle timeout (an empty folder) or the watch
    stopped at 10's failed load (exit 2). Past --stale-after, 10 is skipped with a warning naming it, recorded in
    checkpoints.json, and 20 is tracked."""
    import shutil
    import time

    root, _ = folders
    live = tmp_path / "live"
    src = root / "ckpt" / "checkpoint-10"
    if left == "cut-off weights":
        _cut_off_save(live / "checkpoint-10", src)
    else:
        (live / "checkpoint-10").mkdir(parents=True)
        if left == "config only":
            shutil.copy(src / "config.json", live / "checkpoint-10" / "config.json")
    shutil.copytree(root / "ckpt" / "checkpoint-20", live / "checkpoint-20")
    (live / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"global_step": 20}))
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # both written an hour ago
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="sftint_fast.sft.demo"):
        rc = _track(root, out, [str(live / "checkpoint-*")], "--watch", "0.1", "--idle-timeout", "1")
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["steps"] == [0, 20]
    assert f"{live / 'checkpoint-10'} is still incomplete" in caplog.text
    skipped = json.loads((out / "checkpoints.json").read_text())["skipped"]
    assert skipped == {"10": {"path": str(live / "checkpoint-10"), "why": "abandoned incomplete"}}


@pytest.mark.parametrize("extra, message", [
    (["--stale-after", "60"], "--stale-after: expected only with --watch"),
    (["--watch", "1", "--settle", "60", "--stale-after", "60"], "stale_after: expected more seconds than settle"),
])
def test_track_cli_refuses_a_stale_after_it_cannot_use(folders, tmp_path, extra, message, capsys):
    root, _ = folders
    assert _track(root, tmp_path / "run", [str(root / "ckpt" / "checkpoint-10")], *extra) == 2
    assert message in capsys.readouterr().err


def test_sftint_help_states_the_exit_codes(capsys):
    """`sftint --help` says what each exit code means (the README alone did)."""
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    assert "exit codes: 0 done; 2 refused" in out and "SFTINT_DEBUG=1" in out and "1 ran but found less" in out


def test_watch_shares_an_os_error_of_rank_0_with_every_rank(monkeypatch):
    """Under torchrun rank 0 alone lists and checks the checkpoint folders, then broadcasts what it found. An OSError
    there (a folder it may not read) escaped on rank 0 before the broadcast, and the other ranks waited for it
    forever; it is now broadcast like a refusal, and every rank raises it."""
    from sftint_fast import distributed
    from sftint_fast.sft import demo

    sent = []
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: sent.append(obj) or obj)

    def unreadable(patterns):
        raise PermissionError(13, "Permission denied", "run/checkpoint-20")

    monkeypatch.setattr(demo, "_match", unreadable)
    tracker = SFTTracker(None, andor_method="and", noise_floor=None, progress=False)
    with pytest.raises(PermissionError, match="checkpoint-20"):
        demo._follow(tracker, ["run/checkpoint-*"], lambda step, path: False, lambda: None, watch=0.01,
                     until_step=None, idle_timeout=0.0, settle=0.0)
    assert len(sent) == 1 and isinstance(sent[0], PermissionError)  # what the other ranks receive
