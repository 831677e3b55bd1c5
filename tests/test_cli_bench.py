"""`sftint bench` and `sftint_fast.bench`: the engines timed side by side on a tiny random model."""
import json
from unittest import mock

import pytest
import torch

import sftint_fast as sf
from sftint_fast import bench
from sftint_fast.cli import main
from sftint_fast.engine.plan import plan_trie
from sftint_fast.game import Game

from conftest import requires_triton, tiny_model
from word_tokenizer import word_tokenizer

TEXT = "the big cat sat on the mat and the dog ran"


@pytest.fixture(scope="module")
def game_and_model():
    model = tiny_model("llama")
    return Game.from_text(model, word_tokenizer(), TEXT, players=[1, 2, 3, 6, 9]), model


def test_bench_cli_writes_a_consistent_report(model_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(model_dir), "--text", TEXT, "--engines", "naive,trie,trie-torch",
               "--sample", "20", "--seed", "3", "--repeat", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ideal ratio" in printed and "trie/torch" in printed and "trie-torch" in printed
    report = json.loads(out.read_text())
    assert report["reference"] == "naive" and list(report["engines"]) == ["naive", "trie", "trie-torch"]
    assert report["game"]["variants"] == 20 and report["game"]["num_players"] == 6  # default: first 6 content words
    assert report["config"]["sample"] == 20 and report["config"]["engines"] == ["naive", "trie", "trie-torch"]

    model, tok = tiny_model("llama"), word_tokenizer()
    game = Game.from_text(model, tok, TEXT, players="words", n_players=6)
    assert report["game"]["words"] == list(game.words)
    subsets = bench.sample_subsets(6, 20, seed=3)
    assert report["plan"]["ideal_ratio"] == pytest.approx(plan_trie(game, subsets=subsets).ideal_ratio)
    naive_s = report["engines"]["naive"]["seconds"]
    for name, entry in report["engines"].items():
        assert len(entry["runs"]) == 2 and entry["seconds"] > 0
        assert entry["speedup"] == pytest.approx(naive_s / entry["seconds"])
        assert entry["variants_per_s"] == pytest.approx(20 / entry["seconds"])
        assert entry["max_abs_diff"] < 1e-5, name
        assert entry["backend"] == (None if name == "naive" else "torch")


def test_compare_engines_reports_a_wrong_engine(game_and_model):
    game, model = game_and_model
    real = sf.engine.evaluate

    def skewed(model, game, **kwargs):  # a broken trie: off by 0.5 on every variant after the first
        v = real(model, game, **kwargs)
        return v + 0.5 * (torch.arange(v.numel()) > 0) if kwargs["method"] == "trie" else v

    with mock.patch("sftint_fast.engine.evaluate", skewed):
        report = bench.compare_engines(model, game, ["naive", "trie"], warmup=False)
    assert report["engines"]["naive"]["max_abs_diff"] == 0
    assert report["engines"]["trie"]["max_abs_diff"] == pytest.approx(0.5, abs=1e-5)
    assert report["game"]["variants"] == 32


def test_compare_engines_uses_the_first_engine_as_reference(game_and_model):
    game, model = game_and_model
    subsets = torch.tensor([0, 5, 31])
    report = bench.compare_engines(model, game, ["trie", "naive"], subsets=subsets)
    assert report["reference"] == "trie" and report["engines"]["trie"]["speedup"] == 1.0
    assert report["engines"]["naive"]["max_abs_diff"] < 1e-5
    assert "against 'trie'" in bench.format_report(report)


@requires_triton
def test_compare_engines_with_the_triton_kernel(game_and_model):
    game, model = game_and_model
    report = bench.compare_engines(model, game, ["naive", "trie-triton"], subsets=torch.tensor([0, 7, 18, 31]))
    assert report["engines"]["trie-triton"]["backend"] == "triton"
    assert report["engines"]["trie-triton"]["max_abs_diff"] < 1e-5


def test_sample_subsets_distinct_sorted_reproducible():
    a = bench.sample_subsets(10, 100, seed=1)
    assert a.dtype == torch.int64 and a.numel() == 100 and a.unique().numel() == 100
    assert bool((a[1:] > a[:-1]).all()) and int(a.max()) < 1024
    assert torch.equal(a, bench.sample_subsets(10, 100, seed=1))
    assert not torch.equal(a, bench.sample_subsets(10, 100, seed=2))
    big = bench.sample_subsets(40, 50, seed=0)  # drawn without a 2^40 permutation
    assert big.unique().numel() == 50 and int(big.max()) < 1 << 40
    assert torch.equal(bench.sample_subsets(3, 8), torch.arange(8))


@pytest.mark.parametrize("engines,repeat,match", [
    ("naive", 1, "non-empty list"), ([], 1, "non-empty list"), (["naive", "fast"], 1, r"received \['fast'\]"),
    (["trie", "trie"], 1, "each engine once"), (["naive"], 0, "repeat: expected an int >= 1"),
    (["naive"], True, "repeat: expected an int >= 1"),
])
def test_compare_engines_rejects_bad_options(game_and_model, engines, repeat, match):
    game, model = game_and_model
    with pytest.raises(ValueError, match=match):
        bench.compare_engines(model, game, engines, repeat=repeat)


def test_compare_engines_rejects_bad_subsets(game_and_model):
    game, model = game_and_model
    with pytest.raises(TypeError, match="subsets: expected a 1-D int64 tensor of bitmasks, received list"):
        bench.compare_engines(model, game, subsets=[0, 1])
    with pytest.raises(ValueError, match=r"count: expected an int in \[1, 2\^4 = 16\], received 17"):
        bench.sample_subsets(4, 17)


@pytest.mark.parametrize("argv,message", [
    (["--engines", "naive,fast"], "--engines: expected distinct comma-separated names"),
    (["--engines", "naive,naive"], "--engines: expected distinct comma-separated names"),
    (["--engines", "naive,,trie"], "--engines: expected distinct comma-separated names"),
    (["--engines", "naive,trie,"], "--engines: expected distinct comma-separated names"),
    (["--repeat", "0"], "--repeat: expected an int >= 1, received '0'"),
    (["--sample", "-3"], "--sample: expected an int >= 1"),
])
def test_bench_cli_rejects_bad_arguments_before_loading(argv, message, capsys):
    with mock.patch("sftint_fast.models.load_model", side_effect=AssertionError("loaded a model")):
        with pytest.raises(SystemExit) as exc:
            main(["bench", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message,library", [
    (["--sample", "100"], "--sample: expected at most 2^6 = 64 variants, received 100", False),
    (["--n-players", "30"], "n_players: expected at most", True),
    (["--players", "1,x"], "players: expected 'all' or comma-separated word indices", False),
])
def test_bench_cli_reports_bad_game_options(model_dir, argv, message, library, capsys):
    """The command's own refusals are one line; one raised inside the library (Game.from_text) adds the
    SFTINT_DEBUG hint, as every other command prints it."""
    rc = main(["bench", "--model", str(model_dir), "--text", TEXT, *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and message in lines[-2 if library else -1]
    assert (lines[-1] == "(SFTINT_DEBUG=1 shows the traceback)") == library


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_bench_cli_cuda_without_a_device(model_dir, capsys):
    rc = main(["bench", "--model", str(model_dir), "--text", TEXT, "--device", "cuda"])
    assert rc == 2 and "expected cpu (no CUDA device here)" in capsys.readouterr().err


def test_bench_cli_triton_on_cpu_needs_the_interpreter(model_dir, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc = main(["bench", "--model", str(model_dir), "--text", TEXT, "--device", "cpu", "--engines", "naive,trie-triton"])
    err = capsys.readouterr().err
    assert rc == 2 and "'trie-triton' runs on a CUDA model (or under TRITON_INTERPRET=1)" in err
    assert err.strip().splitlines()[-1] == "(SFTINT_DEBUG=1 shows the traceback)"  # compare_engines' refusal


def test_bench_cli_compute_dtype(model_dir, tmp_path, capsys):
    out = tmp_path / "tf32.json"
    assert main(["bench", "--model", str(model_dir), "--text", TEXT, "--compute-dtype", "tf32", "--sample", "8",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["compute_dtype"] == "tf32" == report["config"]["compute_dtype"]
    assert "(compute tf32)" in capsys.readouterr().out
    # bf16 autocast runs the naive engine only: the trie refuses it before anything is timed
    assert main(["bench", "--model", str(model_dir), "--text", TEXT, "--compute-dtype", "bfloat16"]) == 2
    captured = capsys.readouterr()
    assert "only the naive engine supports), received --compute-dtype bfloat16 with --dtype float32" in captured.err
    assert "naive:" not in captured.err  # nothing ran


def test_measure_reads_rss_without_psutil(monkeypatch):
    """A --no-deps install (the GPU machine) may lack psutil: /proc/self/statm gives the same resident size."""
    import sys

    with_psutil = bench._rss_reader()()
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    reader = bench._rss_reader()
    assert abs(reader() - with_psutil) < 64 << 20
    _, seconds, peak = bench.measure(lambda: torch.ones(64 << 20, dtype=torch.uint8).add_(1).sum())
    assert seconds > 0 and peak >= 32 << 20  # the 64 MiB tensor shows in the sampled peak


def test_compare_engines_validates_subsets_before_timing(game_and_model):
    game, model = game_and_model
    report = bench.compare_engines(model, game, ["naive", "trie"], subsets=torch.tensor([0, 5, 31], dtype=torch.int32))
    assert report["game"]["variants"] == 3 and report["engines"]["trie"]["max_abs_diff"] < 1e-5
    with pytest.raises(TypeError, match="subsets: expected a 1-D integer tensor"):
        bench.compare_engines(model, game, subsets=torch.tensor(5))


@pytest.mark.parametrize("pick", ["first", "last"])
def test_bench_default_players_without_enough_content_words_are_the_first_or_last_words(model_dir, tmp_path, pick):
    text = "the cat sat on the mat and the dog ran"  # 10 words, 5 content words
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(model_dir), "--text", text, "--engines", "naive,trie", "--pick", pick,
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    words = Game.from_text(tiny_model("llama"), word_tokenizer(), text).words
    assert report["game"]["words"] == list(words[:6] if pick == "first" else words[-6:])


def test_format_report_numbers_read_back_as_the_report_has_them():
    """Every number of the printed table, read back, is the report's to its printed precision: a GPU engine timed at
    0.42 ms printed "0.000" seconds (beside 152381 variants/s)."""
    entry = {"method": "trie", "backend": "triton", "runs": [0.00042], "seconds": 0.00042,
             "variants_per_s": 64 / 0.00042, "peak_bytes": 3 * 2**20, "max_abs_diff": 2.5e-7, "speedup": 0.03 / 0.00042}
    report = {"device": "cuda:0", "dtype": "float32", "compute_dtype": None, "threads": 16, "repeat": 1,
              "game": {"num_players": 6, "seq_len": 11, "variants": 64, "words": [], "masking": "embedding"},
              "plan": {"trie_tokens": 175, "naive_tokens": 704, "ideal_ratio": 704 / 175}, "reference": "naive",
              "engines": {"naive": {"method": "naive", "backend": None, "runs": [0.03], "seconds": 0.03,
                                    "variants_per_s": 64 / 0.03, "peak_bytes": 2**30, "max_abs_diff": 0.0,
                                    "speedup": 1.0},
                          "trie": entry}}
    lines = bench.format_report(report).splitlines()
    header = lines[2].split()
    assert header[:2] == ["engine", "seconds"]
    for line, (name, e) in zip(lines[3:5], report["engines"].items()):
        cells = line.split()
        assert cells[0] == (name if e["backend"] is None else f"trie/{e['backend']}")
        shown = {"seconds": float(cells[1]), "variants_per_s": float(cells[2]), "speedup": float(cells[3].rstrip("x")),
                 "peak_bytes": float(cells[-2]) * 2**20, "max_abs_diff": float(cells[-1])}
        for key, value in shown.items():
            assert value == pytest.approx(e[key], rel=0.01, abs=1e-12), (name, key, cells)
        if name == "trie":
            assert float(cells[4]) == pytest.approx(e["speedup"] / report["plan"]["ideal_ratio"], abs=0.005)


def test_bench_cli_writes_strict_json_when_an_engine_gives_nan(model_dir, tmp_path, capsys):
    """A model whose values are NaN (fp16 overflow, a broken checkpoint) makes max_abs_diff NaN: --out wrote it as
    the bare token NaN, which strict JSON readers (jq, JSON.parse) refuse; it is the string "nan" now."""
    real = sf.engine.evaluate

    def broken(model, game, **kwargs):
        v = real(model, game, **kwargs)
        return torch.full_like(v, float("nan")) if kwargs["method"] == "trie" else v

    out = tmp_path / "bench.json"
    with mock.patch("sftint_fast.engine.evaluate", broken):
        assert main(["bench", "--model", str(model_dir), "--text", TEXT, "--sample", "4", "--out", str(out)]) == 0
    assert " nan" in capsys.readouterr().out  # the table shows it

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    report = json.loads(out.read_text(), parse_constant=refuse)
    assert report["engines"]["trie"]["max_abs_diff"] == "nan" and report["engines"]["naive"]["max_abs_diff"] == 0
