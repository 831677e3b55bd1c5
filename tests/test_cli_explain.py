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
    assert config["words"] == ["big", "cat", "sat", "mat"] and config["andor"] is None
    assert set(load_file(out / "interactions.safetensors")) == {"and", "shapley"}
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
    capsys.readouterr()
    assert main(["explain", "--model", str(model_dir / "missing"), "--text", TEXT]) == 2  # a message, no traceback
    err = capsys.readouterr().err
    assert err.startswith("sftint explain: model: expected 'default', 'gemma' or a local model folder, received")
    assert "missing" in err and "Traceback" not in err


def test_cli_debug_env_reraises(model_dir, monkeypatch):
    monkeypatch.setenv("SFTINT_DEBUG", "1")
    with pytest.raises(ValueError, match="model: expected 'default', 'gemma' or a local model folder"):
        main(["explain", "--model", str(model_dir / "missing"), "--text", TEXT])
    with pytest.raises(ValueError, match="model: expected 'default', 'gemma' or a local model folder"):
        main(["bench", "--model", str(model_dir / "missing"), "--engines", "naive"])
    # refusals that bench and track catch themselves re-raise too (they printed their one line regardless)
    with pytest.raises(ValueError, match="n_players: expected at most"):
        main(["bench", "--model", str(model_dir), "--text", "the cat", "--n-players", "5", "--engines", "naive"])
    with pytest.raises(ValueError, match="checkpoints: expected folders"):
        main(["track", "--base", str(model_dir), "--checkpoints", str(model_dir / "missing-*"), "--probes",
              str(model_dir / "config.json"), "--out", str(model_dir / "never-written")])


def test_explain_refuses_an_empty_prompt_before_loading(tmp_path, capsys):
    assert main(["explain", "--model", str(tmp_path / "never-loaded"), "--text", "  "]) == 2
    assert capsys.readouterr().err.strip() == "sftint explain: --text: expected a non-empty prompt, received '  '"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat sat"}\n{"prompt": ""}\n')
    assert main(["explain", "--model", str(tmp_path / "never-loaded"), "--file", str(prompts)]) == 2
    assert "text: expected a non-empty prompt, received '' (prompt 1)" in capsys.readouterr().err


def test_explain_dtype_and_device(model_dir, tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["explain", "--model", str(model_dir), "--text", TEXT, "--players", "1,2,3", "--dtype", "bfloat16",
                 "--device", "cpu", "--method", "naive", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["device"] == "cpu"
    saved = load_file(out / "v.safetensors")["v"]
    values = {}
    for dtype in (torch.bfloat16, torch.float32):  # the CLI loads with sdpa attention, tiny_model uses eager
        model = tiny_model("llama").to(dtype)
        game = Game.from_text(model, word_tokenizer(), TEXT, players=[1, 2, 3])
        values[dtype] = sf.evaluate(model, game, method="naive", progress=False).float()
    assert torch.allclose(saved, values[torch.bfloat16], atol=5e-3)
    assert not torch.allclose(saved, values[torch.float32], atol=1e-5)  # the bf16 model's values, not fp32's
    capsys.readouterr()
    for argv, message in [(["--device", "tpu"], "--device: expected 'cpu', 'cuda' or 'cuda:<index>', received 'tpu'"),
                          (["--dtype", "int8"], "--dtype: invalid choice")]:
        try:
            rc = main(["explain", "--model", str(model_dir), "--text", TEXT, *argv])
        except SystemExit as exc:
            rc = exc.code
        assert rc == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_resolve_device_without_cuda(device, capsys):
    from sftint_fast.models import resolve_device

    if torch.cuda.is_available():
        pytest.skip("checks the messages on a machine without CUDA")
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device here"):
        resolve_device(device)
    rc = main(["demo", "--device", device, "--out", "unused"])  # stops before loading anything
    assert rc == 2 and "--device: expected cpu (no CUDA device here)" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lp", "sgd"])
def test_explain_andor(model_dir, tmp_path, method, capsys):
    out = tmp_path / method
    niter = ["--niter", "500"] if method == "sgd" else []  # the LP has no iterations: --niter is refused with it
    assert main(["explain", "--model", str(model_dir), "--text", TEXT, "--players", "1,2,3,6", "--andor", method,
                 "--qthres", "0.1", *niter, "--top", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"AND-OR decomposition ({method})" in printed
    v = load_file(out / "v.safetensors")["v"]
    saved = load_file(out / "interactions.safetensors")
    expected = sf.and_or(v.double(), method=method, qthres=0.1, niter=500, progress=False)
    assert torch.allclose(saved["andor_and"], expected.I_and.float()) and torch.allclose(saved["andor_or"],
                                                                                        expected.I_or.float())
    top = sorted([abs(x) for x in expected.I_and[1:].tolist() + expected.I_or.tolist()], reverse=True)[:4]
    shown = [abs(float(line.split()[0])) for line in printed.split("top 4:")[1].strip().splitlines()[:4]]
    assert shown == pytest.approx(top, abs=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["andor"]["method"] == method and config["andor"]["qthres"] == 0.1
    with pytest.raises(SystemExit):
        main(["explain", "--model", str(model_dir), "--text", TEXT, "--andor", method, "--qthres", "-0.1"])
    assert "--qthres: expected a finite number >= 0, received '-0.1'" in capsys.readouterr().err


def test_explain_results_carry_their_config_and_a_killed_rerun_leaves_no_stale_config(model_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    """v.safetensors and interactions.safetensors hold the run's config (metadata "config" = config.json); a rerun
    in the same --out killed after writing v must not leave the earlier run's config.json beside the new v."""
    import safetensors.torch
    from safetensors import safe_open

    out = tmp_path / "run"
    argv = ["explain", "--model", str(model_dir), "--method", "naive", "--out", str(out), "--top", "2"]
    assert main([*argv, "--text", TEXT]) == 0
    config = json.loads((out / "config.json").read_text())
    for name in ("v.safetensors", "interactions.safetensors"):
        with safe_open(str(out / name), "pt") as f:
            assert json.loads(f.metadata()["config"]) == config
    real = safetensors.torch.save_file

    def killed_at_interactions(tensors, filename, metadata=None):
        if "and" in tensors:
            raise KeyboardInterrupt
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", killed_at_interactions)
    assert main([*argv, "--text", "a small dog ran"]) == 130  # Ctrl-C: exit 130, what was saved kept
    with safe_open(str(out / "v.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["config"])["text"] == "a small dog ran"
    stale = (out / "config.json").exists() and json.loads((out / "config.json").read_text())["text"] == TEXT
    assert not stale, "config.json still describes the earlier run while v.safetensors holds the new one"


LONG_TEXT = " ".join(["the big cat sat on the red mat"] * 6)  # 48 words: 2^48 variants fit no memory


def test_explain_too_many_players_points_at_the_cli_options(model_dir, tmp_path, capsys):
    """All 2^n variants not fitting in memory: the engine's advice "pass subsets=" is no option of the CLI."""
    assert main(["explain", "--model", str(model_dir), "--text", LONG_TEXT, "--method", "naive"]) == 2
    err = capsys.readouterr().err
    assert "n=48 players: all 2^48 variants need at least" in err and "subsets=" not in err
    assert "--n-players" in err and "--players" in err
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": LONG_TEXT}) + "\n")
    assert main(["explain", "--model", str(model_dir), "--file", str(path), "--method", "naive"]) == 2
    err = capsys.readouterr().err
    assert "all 2^48 variants" in err and "subsets=" not in err and "--n-players" in err


def test_bench_too_many_players_points_at_the_cli_options(model_dir, capsys):
    players = ",".join(map(str, range(48)))
    assert main(["bench", "--model", str(model_dir), "--text", LONG_TEXT, "--players", players]) == 2
    err = capsys.readouterr().err
    assert "all 2^48 variants" in err and "subsets=" not in err and "--sample" in err and "--n-players" in err


@pytest.mark.parametrize("source", ["text", "file"])
def test_explain_refuses_an_lp_too_large_before_evaluating(model_dir, tmp_path, monkeypatch, capsys, source):
    """11 players with --andor lp: the LP refused only after the 2^11 evaluation had run and the AND results were
    printed, and --out got nothing. It is refused now before any variant is evaluated, naming the way out."""
    def never(*args, **kwargs):
        raise AssertionError("evaluated before the refusal")

    monkeypatch.setattr(sf, "evaluate", never)
    monkeypatch.setattr(sf, "evaluate_many", never)
    text = "the big cat sat on the mat the big cat sat on"  # 12 words, all players
    if source == "text":
        argv = ["--text", text]
    else:
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps({"prompt": "the cat"}) + "\n" + json.dumps({"prompt": text}) + "\n")
        argv = ["--file", str(rows)]
    assert main(["explain", "--model", str(model_dir), *argv, "--andor", "lp", "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert "--andor lp: expected at most 10 players" in captured.err and "received 12" in captured.err
    assert "--andor sgd" in captured.err and "AND interactions" not in captured.out
    assert (source == "file") == ("prompt 1" in captured.err)


def test_explain_rerun_that_keeps_its_folder_prints_the_same_results(model_dir, tmp_path, capsys):
    # a rerun of the same command into the same --out kept the folder and printed the AND interactions and Shapley
    # values but no AND-OR decomposition, the results --andor asked for
    argv = ["explain", "--model", str(model_dir), "--text", TEXT, "--players", "1,2,3,6", "--method", "naive",
            "--andor", "lp", "--top", "4", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "kept " in second and "AND-OR decomposition (lp)" in first
    results = [line for line in first.splitlines() if not line.startswith("wrote ")]
    assert [line for line in second.splitlines() if not line.startswith("kept ")] == results


def test_explain_plot_has_a_title_that_says_what_it_explains(model_dir, tmp_path, monkeypatch):
    """interactions.png had no title: a reader could not tell which prompt, target or kind of interaction its bars
    were, unlike the tracking report's figures."""
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig) or close(fig))
    for andor, kind in (("none", "AND"), ("lp", "AND-OR")):
        out = tmp_path / andor
        assert main(["explain", "--model", str(model_dir), "--text", TEXT, "--players", "1,2,3", "--target", "the",
                     "--method", "naive", "--andor", andor, "--out", str(out), "--top", "4"]) == 0
        config = json.loads((out / "config.json").read_text())
        (ax,) = figures[-1].axes
        v = load_file(out / "v.safetensors")["v"]
        assert ax.get_title() == (f"Top {len(ax.patches)} {kind} interactions of {TEXT!r} -> target "
                                  f"{config['target_text']!r}\n(n=3 players, v(N) - v(empty) = "
                                  f"{float(v[-1] - v[0]):+.3f})")
