"""Options a command would ignore are refused (exit 2, a message naming both options), before any model loads."""
import json

import pytest

import sftint_fast.sft.demo
from sftint_fast.cli import main

TEXT = "the big cat sat on the mat"


def _never(*args, **kwargs):
    raise AssertionError("the command ran instead of refusing its options")


@pytest.mark.parametrize("argv,message", [
    (["--pick", "last"], "--pick: expected only with --n-players"),
    (["--qthres", "0.1"], "--qthres: expected only with --andor sgd or lp"),
    (["--niter", "50"], "--niter: expected only with --andor sgd or lp"),
], ids=["pick-without-n-players", "qthres-without-andor", "niter-without-andor"])
def test_explain_refuses_options_it_would_ignore(tmp_path, argv, message, capsys):
    assert main(["explain", "--model", str(tmp_path / "not-loaded"), "--text", TEXT, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "model:" not in err


@pytest.mark.parametrize("command", ["explain", "bench", "probes"])
def test_base_is_refused_with_a_full_model(model_dir, tmp_path, command, capsys):
    extra = {"explain": ["--text", TEXT], "bench": ["--text", TEXT], "probes": ["--out", str(tmp_path / "p.jsonl")]}
    rc = main([command, "--model", str(model_dir), "--base", str(model_dir), *extra[command]])
    assert rc == 2
    assert "--base: expected only with a PEFT adapter --model (adapter_config.json), received the full model" in (
        capsys.readouterr().err)


def test_bench_refuses_pick_with_explicit_players(tmp_path, capsys):
    assert main(["bench", "--model", str(tmp_path / "not-loaded"), "--players", "0,1", "--pick", "last"]) == 2
    err = capsys.readouterr().err
    assert "--pick: expected only with --n-players or --players all" in err and "model:" not in err


@pytest.mark.parametrize("argv", [["--probes", "4"], ["--probe-sources", "countries"]], ids=["count", "sources"])
def test_demo_refuses_probe_choice_options_with_a_probes_file(tmp_path, monkeypatch, argv, capsys):
    monkeypatch.setattr(sftint_fast.sft.demo, "run_demo", _never)
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": TEXT}) + "\n")
    assert main(["demo", "--probes-file", str(probes), *argv, "--out", str(tmp_path / "run")]) == 2
    assert f"{argv[0]}: expected only without --probes-file" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--qthres", "0.1"], ["--niter", "100"], ["--andor-lr", "1e-5"]],
                         ids=["qthres", "niter", "lr"])
def test_track_refuses_and_or_options_with_andor_method_and(tmp_path, monkeypatch, argv, capsys):
    monkeypatch.setattr(sftint_fast.sft.demo, "run_track", _never)
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": TEXT}) + "\n")
    assert main(["track", "--base", str(tmp_path), "--checkpoints", str(tmp_path), "--probes", str(probes),
                 "--out", str(tmp_path / "run"), "--andor-method", "and", *argv]) == 2
    assert f"{argv[0]}: expected only with --andor-method sgd or lp" in capsys.readouterr().err


def test_demo_refuses_niter_with_andor_method_and(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sftint_fast.sft.demo, "run_demo", _never)
    assert main(["demo", "--andor-method", "and", "--niter", "100", "--out", str(tmp_path / "run")]) == 2
    assert "--niter: expected only with --andor-method sgd" in capsys.readouterr().err


def test_explain_refuses_niter_with_andor_lp(tmp_path, capsys):
    assert main(["explain", "--model", str(tmp_path / "not-loaded"), "--text", TEXT, "--andor", "lp",
                 "--niter", "500"]) == 2
    err = capsys.readouterr().err
    assert "--niter: expected only with --andor sgd, received --niter 500 with --andor lp" in err
    assert "model:" not in err


@pytest.mark.parametrize("argv, message", [
    (["--andor-method", "lp", "--niter", "100"], "--niter: expected only with --andor-method sgd"),
    (["--andor-method", "lp", "--andor-lr", "1e-5"], "--andor-lr: expected only with --andor-method sgd"),
    (["--noise-floor", "none", "--noise-draws", "2"], "--noise-draws: expected only with --noise-floor "
                                                      "order_matched or iid, received --noise-draws 2"),
    (["--settle", "5"], "--settle: expected only with --watch, received --settle 5 without --watch"),
    (["--stale-after", "2.5"], "--stale-after: expected only with --watch, received --stale-after 2.5 without"),
    (["--andor-method", "and", "--qthres", "0.1"], "received --qthres 0.1 with --andor-method and"),
], ids=["niter-lp", "lr-lp", "noise-draws-without-floor", "settle-without-watch", "stale-after-without-watch",
        "qthres-and"])
def test_track_refuses_options_the_lp_or_a_missing_noise_floor_ignores(tmp_path, monkeypatch, argv, message,
                                                                       capsys):
    monkeypatch.setattr(sftint_fast.sft.demo, "run_track", _never)
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": TEXT}) + "\n")
    assert main(["track", "--base", str(tmp_path), "--checkpoints", str(tmp_path), "--probes", str(probes),
                 "--out", str(tmp_path / "run"), *argv]) == 2
    assert message in capsys.readouterr().err


def _probes_folder_and_file(tmp_path):
    """A one-prompt probes file, an empty folder and an empty file under ``tmp_path``."""
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": TEXT}) + "\n")
    folder, file = tmp_path / "a-folder", tmp_path / "a-file"
    folder.mkdir()
    file.write_text("")
    return probes, folder, file


@pytest.mark.parametrize("command, kind", [("explain", "folder"), ("bench", "file"), ("probes", "file"),
                                           ("track", "folder"), ("demo", "folder")])
def test_an_out_that_cannot_be_written_is_refused_before_anything_runs(tmp_path, monkeypatch, command, kind, capsys):
    # was found only after the evaluation, the AND-OR decomposition, the timing or the probe scan, in a message
    # naming a temp file ("[Errno 21] Is a directory: '.bench.x1.tmp.json' -> 'out'")
    monkeypatch.setattr(sftint_fast.sft.demo, "run_track", _never)
    monkeypatch.setattr(sftint_fast.sft.demo, "run_demo", _never)
    probes, folder, file = _probes_folder_and_file(tmp_path)
    extra = {"explain": ["--model", str(tmp_path / "not-loaded"), "--text", TEXT],
             "bench": ["--model", str(tmp_path / "not-loaded")], "probes": ["--model", str(tmp_path / "not-loaded")],
             "track": ["--base", str(tmp_path), "--checkpoints", str(tmp_path), "--probes", str(probes)], "demo": []}
    wrong, expected = (file, "a folder") if kind == "folder" else (folder, "a file")
    dangling = tmp_path / "a-link"
    dangling.symlink_to(tmp_path / "gone")  # a folder could not be made there, a file would replace the link
    for out, got in ((wrong, "is a file" if kind == "folder" else "is a folder"), (file / "sub", "is inside the file"),
                     (dangling, f"is a link to {str(tmp_path / 'gone')!r}, which does not exist")):
        assert main([command, *extra[command], "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"sftint {command}: --out: expected {expected} to write, {str(out)!r} {got}" in err, err
        assert "model:" not in err


@pytest.mark.parametrize("command", ["explain", "bench"])
def test_n_players_is_refused_with_explicit_players(tmp_path, command, capsys):
    # was refused only once the model had loaded, by the library's names ("n_players: expected None when players is
    # an explicit list")
    assert main([command, "--model", str(tmp_path / "not-loaded"), "--text", TEXT, "--players", "0,2",
                 "--n-players", "2"]) == 2
    err = capsys.readouterr().err
    assert "--n-players: expected only with --players all" in err and "received --n-players 2 with --players 0,2" in err
    assert "model:" not in err


def test_explain_file_refuses_n_players_that_chooses_no_row_players(tmp_path, capsys):
    # every row's players came from --players 0,2 or the row itself: --n-players was dropped without a word
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": TEXT}) + "\n" + json.dumps({"prompt": TEXT, "players": "1,3"}) + "\n")
    assert main(["explain", "--model", str(tmp_path / "not-loaded"), "--file", str(path), "--players", "0,2",
                 "--n-players", "2"]) == 2
    err = capsys.readouterr().err
    assert "--n-players: expected only with --players all" in err
    assert "with --players 0,2 and the players the --file rows name" in err and "model:" not in err
    path.write_text(json.dumps({"prompt": TEXT, "players": [0, 1]}) + "\n")
    assert main(["explain", "--model", str(tmp_path / "not-loaded"), "--file", str(path), "--n-players", "2"]) == 2
    err = capsys.readouterr().err
    assert "received --n-players 2 with the players the --file rows name" in err and "model:" not in err


def test_bench_refuses_seed_without_sample(tmp_path, capsys):
    # --seed only seeds the --sample draw: without it the option was accepted and ignored
    assert main(["bench", "--model", str(tmp_path / "not-loaded"), "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "--seed: expected only with --sample, received --seed 3 without --sample" in err and "model:" not in err


@pytest.mark.parametrize("command", ["explain", "bench"])
@pytest.mark.parametrize("players, message", [
    ("2,1", "strictly increasing word indices, received '2,1'"),
    ("0,0", "strictly increasing word indices, received '0,0'"),
    ("-1", "word indices >= 0, received '-1'"),
], ids=["unsorted", "repeated", "negative"])
def test_word_indices_that_no_prompt_accepts_are_refused_before_loading(tmp_path, command, players, message, capsys):
    # were refused by the game only once the model had loaded
    assert main([command, "--model", str(tmp_path / "not-loaded"), "--text", TEXT, f"--players={players}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sftint {command}: --players: expected") and message in err and "model:" not in err


def test_track_refuses_a_boundary_file_that_cannot_be_written_before_anything_runs(tmp_path, monkeypatch, capsys):
    # was found only once the phase boundary was, after tracking the checkpoints up to it ("[Errno 20] Not a
    # directory"), or, a folder, never written while a StopFileCallback watching it stopped its run at once
    monkeypatch.setattr(sftint_fast.sft.demo, "run_track", _never)
    probes, folder, file = _probes_folder_and_file(tmp_path)
    for path, got in ((folder, "is a folder"), (file / "STOP", "is inside the file")):
        assert main(["track", "--base", str(tmp_path), "--checkpoints", str(tmp_path), "--probes", str(probes),
                     "--out", str(tmp_path / "run"), "--boundary-file", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"sftint track: --boundary-file: expected a file to write, {str(path)!r} {got}" in err, err


def test_bench_refuses_bfloat16_autocast_with_a_trie_engine_before_loading(tmp_path, capsys):
    # the default engines (naive,trie) with --compute-dtype bfloat16 on the default --dtype float32 were refused by
    # compare_engines only once the model had loaded, advising to "load the model in bfloat16" (no option's name)
    assert main(["bench", "--model", str(tmp_path / "not-loaded"), "--compute-dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert ("--compute-dtype: expected bfloat16 only with --engines naive or --dtype bfloat16 (on a float32 model it "
            "runs under autocast, which only the naive engine supports), received --compute-dtype bfloat16 with "
            "--dtype float32 and --engines naive,trie") in err
    assert "model:" not in err
    for ok in (["--engines", "naive"], ["--dtype", "bfloat16"]):  # these reach the model
        assert main(["bench", "--model", str(tmp_path / "not-loaded"), "--compute-dtype", "bfloat16", *ok]) == 2
        assert "model:" in capsys.readouterr().err


def test_every_option_with_a_default_names_it_in_its_help():
    """``sftint <command> --help`` gave no default for 11 options (probes --count / --n-players / --max-tries, bench
    --repeat, explain --top / --andor / --method, --masking and --players of explain and bench: the last two had no
    help at all), though the README quotes them (probes' --min-py 0.5, bench's --repeat median)."""
    import argparse

    from sftint_fast.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [f"{name} {action.option_strings[0]}" for name, parser in commands.items() for action in parser._actions
              if action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
              and "default" not in (action.help or "")]
    assert silent == []


@pytest.mark.parametrize("command,argv,message", [
    ("explain", ["--text", TEXT, "--players", "x"], "--players: expected 'all' or comma-separated word indices"),
    ("explain", ["--text", " "], "--text: expected a non-empty prompt"),
    ("explain", ["--text", TEXT, "--device", "tpu"], "--device: expected"),
    ("bench", ["--text", TEXT, "--players", "0,x"], "--players: expected 'all' or comma-separated word indices"),
    ("bench", ["--text", TEXT, "--device", "tpu"], "--device: expected"),
    ("demo", ["--out", "unused", "--device", "tpu"], "--device: expected"),
], ids=["explain-players", "explain-text", "explain-device", "bench-players", "bench-device", "demo-device"])
def test_an_options_refusal_names_its_command(tmp_path, command, argv, message, capsys):
    """An option refused before any model loads is printed as every other refusal: 'sftint <command>: ...' (it
    was the bare '--players: ...', without the command that refused it)."""
    extra = [] if command == "demo" else ["--model", str(tmp_path / "not-loaded")]
    assert main([command, *extra, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sftint {command}: {message}") and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("argv,resumes", [
    (["explain", "--text", TEXT], False),
    (["explain", "--file", "rows.jsonl", "--out", "runs/x"], True),
    (["probes", "--out", "p.jsonl"], False),
], ids=["explain-text", "explain-file-out", "probes"])
def test_ctrl_c_ends_with_a_line_and_exit_130(tmp_path, monkeypatch, capsys, argv, resumes):
    """Ctrl-C (KeyboardInterrupt) in a command: one line saying so, and whether a rerun resumes from the saved files,
    exit 130, no traceback; SFTINT_DEBUG=1 re-raises it."""
    import sftint_fast.cli

    def interrupted(*args, **kwargs):  # Ctrl-C while the model loads
        raise KeyboardInterrupt

    monkeypatch.setattr(sftint_fast.cli, "_load", interrupted)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": TEXT}) + "\n")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    try:
        rc = main([argv[0], "--model", str(tmp_path / "m"), *argv[1:]])
    except KeyboardInterrupt:  # (not let through: pytest would stop the whole session)
        pytest.fail("the KeyboardInterrupt escaped main")
    assert rc == 130
    err = capsys.readouterr().err
    assert err.startswith(f"sftint {argv[0]}: interrupted") and "Traceback" not in err
    assert ("the same command resumes from it" in err) == resumes and (not resumes or "runs/x" in err)
    monkeypatch.setenv("SFTINT_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        main([argv[0], "--model", str(tmp_path / "m"), *argv[1:]])
