"""`sftint explain --file prompts.jsonl` on a tiny random model: one process (resumable) and 2 gloo ranks."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import sftint_fast as sf
import sftint_fast.engine
from sftint_fast.cli import main
from sftint_fast.game import Game

from conftest import count_calls, interrupt_write, tiny_model
from word_tokenizer import word_tokenizer


ROWS = [{"prompt": "the big cat sat on the mat"},
        {"prompt": "what is the capital of france", "players": [0, 3, 5], "target": "paris"},
        {"prompt": "a small dog ran fast", "players": "1,2,4"},
        {"prompt": "the red sun and the blue moon", "target": "sky"}]
FILES = ("v.safetensors", "interactions.safetensors", "config.json", "interactions.png")


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    return path


def _expected():
    model, tok = tiny_model("llama"), word_tokenizer()
    out = []
    for row in ROWS:
        players = row.get("players", "words")
        if isinstance(players, str) and players != "words":
            players = [int(x) for x in players.split(",")]
        game = Game.from_text(model, tok, row["prompt"], players=players, target=row.get("target"))
        out.append((game, sf.evaluate(model, game, method="naive", progress=False)))
    return out


def _check_outputs(out, expected):
    for i, (game, v) in enumerate(expected):
        folder = out / f"prompt_{i:04d}"
        assert sorted(p.name for p in folder.iterdir()) == sorted(FILES), folder
        saved_v = load_file(folder / "v.safetensors")["v"]
        # the CLI loads the saved model (its own attention implementation): equal up to float rounding
        assert torch.allclose(saved_v, v, atol=1e-5), (i, (saved_v - v).abs().max())
        assert torch.allclose(load_file(folder / "interactions.safetensors")["and"], sf.harsanyi(saved_v - saved_v[0]))
        config = json.loads((folder / "config.json").read_text())
        assert config["text"] == ROWS[i]["prompt"] and config["words"] == list(game.words)
        assert config["target"] == game.target.tolist()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("prompt_")) == [
        f"prompt_{i:04d}" for i in range(len(expected))]


def test_explain_file_writes_one_folder_per_prompt_and_resumes(model_dir, prompts, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["explain", "--model", str(model_dir), "--file", str(prompts), "--method", "naive", "--out", str(out),
            "--top", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert all(f"[{i}] {row['prompt']}" in printed for i, row in enumerate(ROWS))
    _check_outputs(out, _expected())
    assert len(list((out / "shards").glob("shard-*.safetensors"))) == len(ROWS)

    calls = []
    real = sftint_fast.engine.evaluate_games
    monkeypatch.setattr(sftint_fast.engine, "evaluate_games", lambda m, g, **k: calls.extend(g) or real(m, g, **k))
    (out / "shards" / sorted(p.name for p in (out / "shards").glob("shard-*"))[0]).unlink()
    assert main(argv) == 0
    assert len(calls) == 1  # only the deleted shard's game was evaluated again
    _check_outputs(out, _expected())
    assert "also holds" not in capsys.readouterr().err
    shorter = tmp_path / "shorter.jsonl"  # the same run folder with fewer rows: the older rows' folders are named
    shorter.write_text(json.dumps(ROWS[0]) + "\n")
    assert main(argv[:4] + [str(shorter)] + argv[5:]) == 0
    err = capsys.readouterr().err
    assert f"also holds {', '.join(f'prompt_{i:04d}' for i in range(1, len(ROWS)))} from an earlier run" in err


def test_explain_file_rerun_keeps_complete_folders_without_redoing_and_or(model_dir, prompts, tmp_path, capsys,
                                                                           monkeypatch):
    """A rerun in the same --out redid every prompt's AND-OR decomposition, even for complete folders of the same
    config; now only an incomplete folder (no config.json) or one of another config is redone."""
    out = tmp_path / "run"
    argv = ["explain", "--model", str(model_dir), "--file", str(prompts), "--method", "naive", "--out", str(out),
            "--top", "3", "--andor", "sgd", "--niter", "5"]
    calls = count_calls(monkeypatch, {"and_or": sf})
    assert main(argv) == 0 and calls["and_or"] == len(ROWS)
    folders = [out / f"prompt_{i:04d}" for i in range(len(ROWS))]
    written = {f: {name: (f / name).stat().st_mtime_ns for name in FILES} for f in folders}
    capsys.readouterr()

    calls["and_or"] = 0
    assert main(argv) == 0
    assert calls["and_or"] == 0
    assert capsys.readouterr().out.count("kept ") == len(ROWS)
    assert {f: {name: (f / name).stat().st_mtime_ns for name in FILES} for f in folders} == written  # not rewritten

    (folders[2] / "config.json").unlink()  # what a run killed while writing that folder leaves
    assert main(argv) == 0
    assert calls["and_or"] == 1
    assert sorted(p.name for p in folders[2].iterdir()) == sorted(FILES)
    assert json.loads((folders[2] / "config.json").read_text())["andor"]["niter"] == 5
    assert all((f / "config.json").stat().st_mtime_ns == written[f]["config.json"] for f in folders if f != folders[2])
    _check_outputs(out, _expected())

    calls["and_or"] = 0  # another AND-OR config: every folder is redone
    assert main(argv[:-1] + ["6"]) == 0
    assert calls["and_or"] == len(ROWS)
    assert all(json.loads((f / "config.json").read_text())["andor"]["niter"] == 6 for f in folders)

    calls["and_or"] = 0  # another --top: the printout and the figure change, so every folder is redone
    assert main(argv[:-1] + ["6", "--top", "2"]) == 0
    assert calls["and_or"] == len(ROWS)
    assert all(json.loads((f / "config.json").read_text())["top"] == 2 for f in folders)


def test_explain_file_on_a_full_disk_says_which_file_and_resumes(model_dir, prompts, tmp_path, capsys, monkeypatch):
    """The disk filling up while a prompt's results were written ended the command with safetensors' own error (no
    OSError) as a traceback naming no file; now it is the one-line refusal naming the file, the prompts written
    before stay complete, and a rerun with space again redoes only the rest."""
    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "run"
    argv = ["explain", "--model", str(model_dir), "--file", str(prompts), "--method", "naive", "--out", str(out),
            "--top", "3", "--andor", "sgd", "--niter", "5"]
    real = safetensors.torch.serialize_file

    def serialize_file(tensors, filename, metadata=None):
        if "prompt_0002" in str(filename):  # full from there on
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "serialize_file", serialize_file)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(out / "prompt_0002" / "v.safetensors") in err
    assert "Traceback" not in err
    assert not (out / "prompt_0002" / "config.json").exists()
    monkeypatch.undo()
    calls = count_calls(monkeypatch, {"and_or": sf})
    assert main(argv) == 0
    assert calls["and_or"] == len(ROWS) - 2 and capsys.readouterr().out.count("kept ") == 2
    _check_outputs(out, _expected())


def test_explain_file_rerun_after_a_kill_removes_the_temp_files_it_left(model_dir, prompts, tmp_path, monkeypatch,
                                                                       capsys):
    """Killed while it writes a prompt's results (or a shard), a run leaves temp files that no cleanup removed: the
    rerun completed the folders but kept them beside the results, one more at every kill (the tracker's run folder
    was cleaned, this one not). Now the rerun removes them."""
    run, killed = tmp_path / "run", tmp_path / "killed"
    argv = ["explain", "--model", str(model_dir), "--file", str(prompts), "--method", "naive", "--top", "3", "--out"]
    fired = interrupt_write(monkeypatch, KeyboardInterrupt(), name="interactions.safetensors", kill=(run, killed))
    assert main(argv + [str(run)]) == 130  # Ctrl-C: exit 130, what was saved kept
    monkeypatch.undo()
    assert fired["target"] == run / "prompt_0000" / "interactions.safetensors"
    left = [p.name for p in (killed / "prompt_0000").iterdir() if p.name.startswith(".interactions.")]
    assert left  # what the kill left: the temp file it was renaming
    shard = sorted((killed / "shards").glob("shard-*.safetensors"))[0]  # one killed while its shard was written
    (shard.parent / f".{shard.stem}.abcdefgh.tmp.safetensors").write_bytes(b"half")
    shard.unlink()
    capsys.readouterr()
    assert main(argv + [str(killed)]) == 0, capsys.readouterr().err
    _check_outputs(killed, _expected())
    assert not [p for p in killed.rglob(".*") if ".tmp" in p.name]
    assert len(list((killed / "shards").iterdir())) == len(ROWS)


@pytest.mark.parametrize("line,message", [('{"text": "a"}', '"prompt" string'), ("not json", "invalid JSON"),
                                          ('{"prompt": "a cat", "players": "x,y"}', "players"),
                                          ('{"prompt": "a cat", "extra": 1}', "extra"),
                                          ('{"prompt": "a cat sat", "players": [0, 1.5]}', "players")])
def test_explain_file_rejects_bad_rows(model_dir, tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    assert main(["explain", "--model", str(model_dir), "--file", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # the file's refusal, named by its line or row, ends as a library's refusal of a probes file does
    assert message in lines[-2] and ("bad.jsonl:2" in lines[-2] or "(prompt 1)" in lines[-2])
    assert lines[-2].startswith("sftint explain: --file: ") and lines[-1] == "(SFTINT_DEBUG=1 shows the traceback)"


def test_explain_file_refusals_of_the_options_stay_one_line(tmp_path, monkeypatch, capsys):
    """A bad --players is the option's refusal (one line, as --text's), even when every --file row names its own."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "a cat sat", "players": [0, 1]}) + "\n")
    assert main(["explain", "--model", str(tmp_path / "not-loaded"), "--file", str(path), "--players", "x"]) == 2
    assert capsys.readouterr().err.strip() == ("sftint explain: --players: expected 'all' or comma-separated word "
                                               "indices, received 'x'")
    path.write_text(json.dumps({"prompt": "a cat sat", "players": "x"}) + "\n")  # the row's: SFTINT_DEBUG raises it
    monkeypatch.setenv("SFTINT_DEBUG", "1")
    with pytest.raises(ValueError, match=r"players: expected 'all' or comma-separated word indices, received 'x' "
                                         r"\(prompt 0\)"):
        main(["explain", "--model", str(tmp_path / "not-loaded"), "--file", str(path)])


def test_explain_file_names_the_row_a_game_error_comes_from(model_dir, tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"prompt": "a small dog", "players": [0, 9]}) + "\n")
    assert main(["explain", "--model", str(model_dir), "--file", str(path), "--method", "naive"]) == 2
    err = capsys.readouterr().err
    assert "prompt 1 ('a small dog')" in err and "received 9" in err


def test_explain_file_rows_with_their_own_players_keep_them_under_n_players(model_dir, tmp_path, capsys):
    """--n-players / --pick choose the players of rows that name none; a row's own players are kept (they were
    refused: 'n_players: expected None when players is an explicit list')."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n")
    out = tmp_path / "out"
    assert main(["explain", "--model", str(model_dir), "--file", str(path), "--n-players", "2", "--pick", "last",
                 "--method", "naive", "--out", str(out)]) == 0, capsys.readouterr().err
    words = [json.loads((out / f"prompt_{i:04d}" / "config.json").read_text())["words"] for i in range(2)]
    assert words == [["sat", "mat"], ["what", "capital", "france"]]


def test_explain_file_null_players_and_target_are_the_command_options(model_dir, tmp_path, capsys):
    """A row's "players": null was refused while "target": null took the greedy token over --target: a null field
    now means what a missing one does (the command's --players / --n-players / --target)."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": ROWS[0]["prompt"], "players": None, "target": None}) + "\n"
                    + json.dumps({"prompt": ROWS[0]["prompt"]}) + "\n")
    out = tmp_path / "out"
    assert main(["explain", "--model", str(model_dir), "--file", str(path), "--n-players", "2", "--target", "paris",
                 "--method", "naive", "--out", str(out)]) == 0, capsys.readouterr().err
    configs = [json.loads((out / f"prompt_{i:04d}" / "config.json").read_text()) for i in range(2)]
    assert configs[0]["words"] == configs[1]["words"] == ["big", "cat"]
    assert configs[0]["target_text"] == configs[1]["target_text"] == "paris"


def test_explain_file_rerun_with_other_n_players_keeps_rows_with_their_own_players(model_dir, tmp_path, capsys,
                                                                                  monkeypatch):
    """config.json recorded the command's --n-players / --pick for a row with its own players, so a rerun with another
    --n-players redid that row's AND-OR decomposition although its game had not changed."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n")
    out = tmp_path / "out"
    argv = ["explain", "--model", str(model_dir), "--file", str(path), "--method", "naive", "--out", str(out),
            "--andor", "sgd", "--niter", "5"]
    calls = count_calls(monkeypatch, {"and_or": sf})
    assert main(argv + ["--n-players", "2"]) == 0 and calls["and_or"] == 2
    own = json.loads((out / "prompt_0001" / "config.json").read_text())
    assert own["n_players"] is None and own["pick"] == "first" and own["words"] == ["what", "capital", "france"]
    assert main(argv + ["--n-players", "3", "--pick", "last"]) == 0
    assert calls["and_or"] == 3  # only the row whose players --n-players chooses was redone
    assert "kept " + str(out / "prompt_0001") in capsys.readouterr().out
    assert json.loads((out / "prompt_0000" / "config.json").read_text())["n_players"] == 3


def test_explain_file_refuses_a_missing_file_by_its_option(model_dir, tmp_path, capsys):
    assert main(["explain", "--model", str(model_dir), "--file", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--file: expected a JSONL file of prompts" in err and "missing.jsonl' does not exist" in err


def test_read_prompts_keeps_rows_with_unicode_line_separators(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085 raw inside strings: still one row each."""
    from sftint_fast.cli import _read_prompts

    rows = [{"prompt": "one\u2028two"}, {"prompt": "three\x85four", "target": "x\u2029y"}, {"prompt": "five"}]
    path = tmp_path / "unicode.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    assert _read_prompts(str(path)) == rows


def test_read_prompts_accepts_a_file_that_starts_with_a_byte_order_mark(tmp_path):
    """A JSONL saved by a Windows editor starts with a UTF-8 BOM: it was refused as invalid JSON on line 1."""
    from sftint_fast.cli import _read_prompts
    from sftint_fast.sft.probes import load_probes

    path = tmp_path / "bom.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n", encoding="utf-8-sig")
    assert _read_prompts(str(path)) == ROWS[:2]
    probes = tmp_path / "bom-probes.jsonl"  # a probe's answer is "answer" (load_probes refuses explain's "target")
    probes.write_text("\n".join(json.dumps({"prompt": r["prompt"]}) for r in ROWS[:2]) + "\n", encoding="utf-8-sig")
    assert [p.prompt for p in load_probes(probes)] == [r["prompt"] for r in ROWS[:2]]


def test_explain_needs_text_or_file(model_dir):
    with pytest.raises(SystemExit):
        main(["explain", "--model", str(model_dir)])
    with pytest.raises(SystemExit):
        main(["explain", "--model", str(model_dir), "--text", "a cat", "--file", "x.jsonl"])


def test_explain_file_under_torchrun_two_ranks(model_dir, prompts, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "sftint_fast.cli", "explain", "--model", str(model_dir),
           "--file", str(prompts), "--method", "naive", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    _check_outputs(out, _expected())
    assert len(list((out / "shards").glob("shard-*.safetensors"))) == len(ROWS)
    assert proc.stdout.count("[0] ") == 1  # printed once, by rank 0
    assert "games (rank 1)" in proc.stderr  # rank 1 evaluated its own share


def test_explain_file_under_torchrun_ranks_do_not_wait_out_rank_0_writing(model_dir, prompts, tmp_path):
    """Once the values are gathered, rank 0 alone decomposes, plots and writes every prompt's folder (serially), while
    the other ranks waited at a barrier bound by the process group's timeout (gloo 30 min, NCCL 10 min): a file of
    many prompts made them raise a timeout, and torchrun tore down rank 0 mid-way. They now leave once the values are
    gathered (the run here: a 15 s timeout, rank 0 taking 5 s per prompt)."""
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    script = Path(__file__).parent / "dist_scripts" / "explain_slow_writer.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1", SLOW_WRITE="5")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), "--pg-timeout", "15", "explain", "--model", str(model_dir),
           "--file", str(prompts), "--method", "naive", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    _check_outputs(out, _expected())
