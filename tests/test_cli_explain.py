"""`sftint explain` on a tiny random model saved with a word-level tokenizer."""
import json

import pytest
import torch
from safetensors.torch import load_file

import sftint_fast as sf
from sftint_fast.cli import main
from sftint_fast.game import Game

from conftest import tiny_model
from word_tokenizer import word_tokenizer

TEXT = "the big cat sat on the mat"


def test_explain_writes_results(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["explain", "--model", str(model_dir), "--text", TEXT, "--players", "1,2,3,6", "--target", "the big",
               "--method", "naive", "--out", str(out), "--top", "5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "AND interactions" in printed and "Shapley values" in printed
    model, tok = tiny_model("llama"), word_tokenizer()
    game = Game.from_text(model, tok, TEXT, players=[1, 2, 3, 6], target="the big")
    v = sf.evaluate(model, game, method="naive", progress=False)
    saved_v = load_file(out / "v.safetensors")["v"]
    assert torch.allclose(saved_v, v, atol=1e-6)
    saved = load_file(out / "interactions.safetensors")
    assert torch.allclose(saved["and"], sf.harsanyi(saved_v - saved_v[0]))
    assert torch.allclose(saved["shapley"].sum(), saved_v[-1] - saved_v[0], atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["words"] == ["big", "cat", "sat", "mat"]
    assert config["target"] == game.target.tolist() and config["input_ids"] == game.input_ids.tolist()
    assert (out / "interactions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    top = sf.top_interactions(saved["and"], 1, config["words"])[0]
    assert "{" + ", ".join(top.words) + "}" in printed


def test_explain_n_players_chat_and_bad_players(model_dir, capsys):
    assert main(["explain", "--model", str(model_dir), "--text", TEXT, "--n-players", "2", "--chat", "--top", "3"]) == 0
    shapley_lines = capsys.readouterr().out.split("Shapley values:")[1].split()
    assert shapley_lines[1::2] == ["big", "cat"]  # the first two content words
    assert main(["explain", "--model", str(model_dir), "--text", TEXT, "--n-players", "2", "--pick", "last"]) == 0
    assert capsys.readouterr().out.split("Shapley values:")[1].split()[1::2] == ["sat", "mat"]  # the last two
    assert main(["explain", "--model", str(model_dir), "--text", TEXT, "--players", "a,b"]) == 2
    with pytest.raises(ValueError, match="model"):
        main(["explain", "--model", str(model_dir / "missing"), "--text", TEXT])
