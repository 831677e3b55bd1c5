"""Bad input to the public API gets a ValueError/TypeError that names the argument (no model is loaded)."""
import json
import math

import pytest
import torch

import sftint_fast as sf
from sftint_fast import distributed as D
from sftint_fast import plot
from sftint_fast.cli import main
from sftint_fast.sft import noise as N
from sftint_fast.sft import probes as P
from sftint_fast.sft.tracker import SFTTracker

NAN = float("nan")


def _plain(**kw):
    opts = dict(andor_method="and", noise_floor=None, bootstrap=10, min_base_py=0.0, persistence=1, progress=False)
    opts.update(kw)
    return SFTTracker(None, **opts)


def _values(rows=2, n=2, seed=0):
    return torch.randn(rows, 2**n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------- measures


@pytest.mark.parametrize("measure", ["salient", "strength_by_order", "sharing", "uncancelled_ratio"])
def test_measures_reject_non_finite_interactions(measure):
    bad = torch.tensor([[0.0, 1.0, NAN, 0.5]])
    call = {
        "salient": lambda: sf.salient(bad, 0.05),
        "strength_by_order": lambda: sf.strength_by_order(bad),
        "sharing": lambda: sf.sharing(bad, torch.ones(1, 4)),
        "uncancelled_ratio": lambda: sf.uncancelled_ratio(bad, torch.tensor([1, 3])),
    }[measure]
    with pytest.raises(ValueError, match="I: expected finite values, got NaN/inf"):
        call()


@pytest.mark.parametrize("reference_max", [-1.0, NAN, torch.tensor([1.0, -2.0])], ids=["negative", "nan", "tensor"])
def test_salient_rejects_negative_or_nan_reference_max(reference_max):
    with pytest.raises(ValueError, match="reference_max: expected finite values >= 0"):
        sf.salient(torch.tensor([[0.0, 1.0, 0.0, 0.5], [0.0, 2.0, 1.0, 0.0]]), 0.05, reference_max=reference_max)


# -------------------------------------------------------------------------------------------- tracker


@pytest.mark.parametrize("option, value, message", [
    ("tau", 0.0, "tau: expected a number in the open interval"),
    ("min_base_py", 2.0, r"min_base_py: expected a number in \[0, 1\]"),
    ("irrelevant_fraction", 5.0, r"irrelevant_fraction: expected a number in \[0, 1\]"),
    ("boundary_removed_fraction", 0.0, r"boundary_removed_fraction: expected a number in \(0, 1\]"),
    ("boundary_removed_fraction", 1.5, r"boundary_removed_fraction: expected a number in \(0, 1\]"),
])
def test_tracker_rejects_out_of_range_options_before_writing_out_dir(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        SFTTracker(None, out_dir=tmp_path / "run", **{option: value})
    assert not (tmp_path / "run" / "config.json").exists()


def test_tracker_tau_above_one_only_with_an_absolute_threshold():
    with pytest.raises(ValueError, match=r"tau: expected a number in the open interval \(0, 1\) with "
                                         r"threshold_reference='checkpoint', got 1.5"):
        SFTTracker(None, tau=1.5, threshold_reference="checkpoint")
    assert SFTTracker(None, tau=1.5, threshold_reference="absolute").config.tau == 1.5


@pytest.mark.parametrize("option, value, error, message", [
    ("andor_niter", -1, ValueError, "andor_niter: expected an int >= 0"),
    ("andor_niter", 1.5, ValueError, "andor_niter: expected an int >= 0"),
    ("andor_lr", -1e-3, ValueError, "andor_lr: expected a finite number > 0"),
    ("andor_lr", NAN, ValueError, "andor_lr: expected a finite number > 0"),
    ("seed", "0", TypeError, "seed: expected an int"),
    ("hysteresis", "no", TypeError, "hysteresis: expected a bool"),
    ("baseline", "zero", ValueError, "baseline: expected 'pad', 'unk' or a tensor"),
    ("reference", 5, TypeError, r"reference: expected \(model, tokenizer\)"),
])
def test_tracker_checks_solver_and_model_options_at_construction(option, value, error, message):
    with pytest.raises(error, match=message):
        SFTTracker(None, **{option: value})


@pytest.mark.parametrize("p_y, error, message", [
    ([0.5, 0.6], TypeError, r"p_y: expected a torch.Tensor \(2,\), got list"),
    (torch.tensor([NAN, 0.5]), ValueError, r"p_y: expected probabilities in \[0, 1\], got nan"),
    (torch.tensor([0.5, 2.0]), ValueError, r"p_y: expected probabilities in \[0, 1\], got 2.0"),
], ids=["list", "nan", "above-one"])
def test_add_values_checks_p_y(p_y, error, message):
    with pytest.raises(error, match=message):
        _plain().add_values(0, _values(), p_y=p_y)


def test_add_values_uses_a_dict_reference_and_refuses_a_model_reference():
    values = _values()
    tracker = _plain(reference={"I_and": sf.harsanyi(values - values[:, :1])})
    tracker.add_values(0, values)
    report = tracker.report()
    assert report.gamma_available and report.curves["and/preserved_gamma"][0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"reference: a \(model, tokenizer\) reference is evaluated by add_checkpoint"):
        _plain(reference=(object(), object())).add_values(0, values)
    with pytest.raises(ValueError, match="reference I_and: expected finite values"):
        _plain(reference={"I_and": torch.full((2, 4), NAN)}).add_values(0, values)


def test_add_values_checks_heldout_loss_and_the_minimum_ignores_nan():
    with pytest.raises(TypeError, match="heldout_loss: expected a number or None, got str"):
        _plain().add_values(0, _values(), heldout_loss="0.5")
    tracker = _plain()
    for step, loss in enumerate([NAN, 1.0, 0.5]):
        tracker.add_values(step, _values(seed=step), heldout_loss=loss)
    assert tracker.report().heldout_loss_min_step == 2


# --------------------------------------------------------------------------------------------- noise


def test_set_logic_rejects_unknown_options_and_mismatched_shapes():
    interactions = _values()
    with pytest.raises(ValueError, match="reference: expected 'base', 'checkpoint' or 'absolute', got 'bse'"):
        N.initial_state(interactions, tau=0.05, reference="bse")
    with pytest.raises(ValueError, match=r"interactions: expected a \(B, 2\^n\) tensor, got \(4,\)"):
        N.initial_state(interactions[0], tau=0.05, reference="base")
    state = N.initial_state(interactions, tau=0.05, reference="base")
    with pytest.raises(ValueError, match=r"interactions: expected shape \(2, 4\) \(as the state\), got \(1, 4\)"):
        N.step_state(state, interactions[:1], index=1, tau=0.05, reference="base", hysteresis=False, persistence=1)
    with pytest.raises(ValueError, match="persistence: expected an int >= 1, got 0"):
        N.step_state(state, interactions, index=1, tau=0.05, reference="base", hysteresis=False, persistence=0)
    with pytest.raises(ValueError, match="kind: expected 'order_matched' or 'iid', got 'gaussian'"):
        N.noise_level([interactions], kind="gaussian")


# -------------------------------------------------------------------------------------------- probes


def test_probe_helpers_reject_non_positive_sizes():
    with pytest.raises(ValueError, match="count: expected an int >= 1, got -1"):
        P.chat_probes([("a b c", "x"), ("d e f", "y")], count=-1, min_words=1)
    with pytest.raises(ValueError, match="count: expected an int >= 1, got 0"):
        P.confident_probes(None, None, count=0, candidates=[])
    with pytest.raises(ValueError, match=r"min_py: expected a probability in \[0, 1\], got 2"):
        P.confident_probes(None, None, count=1, min_py=2, candidates=[])
    with pytest.raises(ValueError, match="max_length: expected an int >= 1, got 0"):
        P.sft_example(None, "q", "a", max_length=0)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        list(P.heldout_batches([{"input_ids": [[1]], "labels": [[1]]}], None, batch_size=0))
    with pytest.raises(ValueError, match="examples: expected at least one example, got none"):
        P.pad_batch([], 0)
    with pytest.raises(ValueError, match=r"examples\[0\]: expected 'labels' as long as 'input_ids' \(3\), got 2"):
        P.pad_batch([{"input_ids": [1, 2, 3], "labels": [1, 2]}], 0)


@pytest.mark.parametrize("item, message", [
    ("  ", r"probes\[0\]: expected a non-empty prompt string"),
    ({"prompt": "a b", "answer": 5}, r"probes\[0\]: expected an 'answer' string, got 5"),
    ({"prompt": "a b", "players": ["x"]}, r"probes\[0\]: expected 'players' as a list of word indices"),
    ({"prompt": "a b", "players": 3}, r"probes\[0\]: expected 'players' as a list of word indices"),
], ids=["blank-prompt", "answer-int", "players-words", "players-int"])
def test_as_probes_rejects_malformed_entries(item, message):
    with pytest.raises(ValueError, match=message):
        P.as_probes([item])


# ----------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv, message", [
    (["explain", "--text", "a b", "--top", "-1"], "argument --top: expected an int >= 0, received '-1'"),
    (["explain", "--text", "a b", "--n-players", "0"], "argument --n-players: expected an int >= 1, received '0'"),
    (["demo", "--steps", "-1"], "argument --steps: expected an int >= 1, received '-1'"),
    (["demo", "--every", "0"], "argument --every: expected an int >= 1, received '0'"),
    (["demo", "--lr", "0"], "argument --lr: expected a finite number > 0, received '0'"),
    (["demo", "--niter", "-5"], "argument --niter: expected an int >= 0, received '-5'"),
    (["demo", "--probe-sources", "countries,wiki"],
     "argument --probe-sources: expected distinct names among countries,chatterbot, received 'countries,wiki'"),
    (["demo", "--probe-sources", "chatterbot,chatterbot"], "argument --probe-sources: expected distinct names"),
], ids=["top", "n-players", "steps", "every", "lr", "niter", "sources", "sources-twice"])
def test_cli_rejects_bad_numbers_before_loading_a_model(argv, message, tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the command ran")

    monkeypatch.setattr("sftint_fast.sft.demo.run_demo", never)
    if argv[0] == "explain":
        argv = argv + ["--model", str(tmp_path / "missing")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- plot


def test_plot_rejects_a_report_dict_and_a_bad_index(tmp_path):
    tracker = _plain()
    for step in range(2):
        tracker.add_values(step, _values(seed=step))
    report = tracker.report()
    with pytest.raises(TypeError, match=r"report: expected a TrackReport \(SFTTracker.report\(\)\), got dict"):
        plot.write_report(report.to_dict(), tmp_path)
    with pytest.raises(ValueError, match=r"index: expected a checkpoint index in \[-2, 2\), got 5"):
        plot.plot_orders(report, tmp_path / "orders.png", index=5)
    assert math.isfinite(plot.headline(report)["base_salient"])


def test_a_figure_that_cannot_be_written_leaves_no_temp_file_and_is_closed(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    import matplotlib.pyplot as plt

    tracker = _plain()
    for step in range(2):
        tracker.add_values(step, _values(seed=step))
    report = tracker.report()

    def full_disk(self, fname, **kwargs):
        open(fname, "wb").close()  # a partly written file, as a full disk leaves it
        raise OSError("No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    before = plt.get_fignums()
    with pytest.raises(OSError, match="No space left"):
        plot.plot_orders(report, tmp_path / "orders.png")
    assert list(tmp_path.iterdir()) == [] and plt.get_fignums() == before


# ------------------------------------------------------------------------------------ tracker resume


def test_tracker_resume_refuses_another_baseline_tensor(tmp_path):
    run = tmp_path / "run"
    _plain(out_dir=run, baseline=torch.zeros(4)).add_values(0, _values())
    assert _plain(out_dir=run, baseline=torch.zeros(4, dtype=torch.float64)).steps == [0]
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['baseline_sha256'\]; .*"
                                         r"'baseline_sha256': \('[0-9a-f]{16}', '[0-9a-f]{16}'\)"):
        _plain(out_dir=run, baseline=torch.ones(4))
    # a run saved before the digest was recorded resumes with any tensor (its baseline is unknown)
    config = json.loads((run / "config.json").read_text())
    del config["baseline_sha256"]
    (run / "config.json").write_text(json.dumps(config))
    assert _plain(out_dir=run, baseline=torch.ones(4)).steps == [0]


def test_tracker_resume_refuses_other_heldout_batches(tmp_path, caplog):
    run = tmp_path / "run"
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[-100, 6, 7, 8]])}
    other = {"input_ids": torch.tensor([[9, 9, 9, 9]]), "labels": torch.tensor([[-100, 9, 9, 9]])}
    _plain(out_dir=run, heldout=[batch]).add_values(0, _values())
    assert _plain(out_dir=run, heldout=[{k: v.clone() for k, v in batch.items()}]).steps == [0]
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['heldout_sha256'\]"):
        _plain(out_dir=run, heldout=[other])
    # a run saved before the digest was recorded resumes with a warning (its batches are unknown)
    config = json.loads((run / "config.json").read_text())
    del config["heldout_sha256"]
    (run / "config.json").write_text(json.dumps(config))
    assert _plain(out_dir=run, heldout=[other]).steps == [0]
    assert "the given batches cannot be checked" in caplog.text


def test_tracker_step_that_could_not_be_saved_is_not_recorded_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import safetensors.torch

    run = tmp_path / "run"
    tracker = _plain(out_dir=run)
    tracker.add_values(0, _values())
    real = safetensors.torch.save_file

    def disk_full(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        tracker.add_values(1, _values(seed=1))
    assert tracker.steps == [0] and len(tracker.states) == 1
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "step_000000000.json",
                                                     "step_000000000.safetensors"]
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    tracker.add_values(1, _values(seed=1))  # the retry records and saves it (it was skipped as already recorded)
    assert _plain(out_dir=run).steps == [0, 1]


# --------------------------------------------------------------------------------------- distributed


@pytest.mark.parametrize("call, error, message", [
    (lambda: D.assign_shards([1.0], True), ValueError, "num_ranks: expected a positive int, received True"),
    (lambda: D.shard_indices(-2), ValueError, r"costs: expected a number of items >= 0 or one cost per item, received -2"),
    (lambda: D.shard_indices(True), TypeError, r"costs: expected a number of items >= 0 or one cost per item, received True"),
    (lambda: D.assign_shards([1.0, NAN], 2), ValueError, r"costs\[1\]: expected a finite number >= 0, received nan"),
    (lambda: D.assign_shards([1.0, -3.0], 2), ValueError, r"costs\[1\]: expected a finite number >= 0, received -3.0"),
], ids=["ranks-bool", "count-negative", "count-bool", "cost-nan", "cost-negative"])
def test_sharding_rejects_bool_ranks_negative_counts_and_bad_costs(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ------------------------------------------------------------------------------------------ and_or


@pytest.mark.parametrize("call, error, message", [
    (lambda v: sf.and_or(v, niter=True, progress=False), ValueError, "niter: expected an int >= 0, got True"),
    (lambda v: sf.and_or(v, niter=2, seed="x", progress=False), TypeError, "seed: expected an int, got str"),
    (lambda v: sf.and_or(v, niter=2, seed=True, progress=False), TypeError, "seed: expected an int, got bool"),
    (lambda v: sf.top_interactions(v, True, ["a", "b"]), ValueError, "k: expected an int >= 0, got True"),
    (lambda v: sf.and_or(v, qthres=True, niter=2, progress=False), ValueError,
     "qthres: expected a finite number >= 0, got True"),
    (lambda v: sf.and_or(v, lr=True, niter=2, progress=False), ValueError, "lr: expected a finite number > 0, got True"),
], ids=["niter-bool", "seed-str", "seed-bool", "k-bool", "qthres-bool", "lr-bool"])
def test_and_or_and_top_interactions_reject_bools_and_non_int_seeds(call, error, message):
    with pytest.raises(error, match=message):
        call(torch.tensor([0.0, 1.0, 1.0, 3.0], dtype=torch.float64))


@pytest.mark.parametrize("call, error, message", [
    (lambda v: sf.and_or(v, niter=2, baseline_offset="no", progress=False), TypeError,
     "baseline_offset: expected a bool, got 'no'"),
    (lambda v: sf.and_or(v, niter=2, progress="no"), TypeError, "progress: expected a bool, got 'no'"),
    (lambda v: sf.and_or(v, niter=2, max_players="5", progress=False), TypeError,
     "max_players: expected None or an int >= 0, got str '5'"),
    (lambda v: sf.and_or(v, method="lp", max_players=True, progress=False), TypeError,
     "max_players: expected None or an int >= 0, got bool True"),
    (lambda v: sf.and_or(v, niter=2, max_players=-1, progress=False), ValueError,
     "max_players: expected None or an int >= 0, got -1"),
    (lambda v: sf.harsanyi(v, max_players=2.5), TypeError, "max_players: expected None or an int >= 0, got float"),
    (lambda v: sf.subset_zeta(v, max_players="3"), TypeError, "max_players: expected None or an int >= 0, got str"),
    (lambda v: sf.subset_mobius(v, check_finite=None), TypeError, "check_finite: expected a bool, got None"),
    (lambda v: sf.top_interactions(v, 2, ["a", "b"], include_empty="no"), TypeError,
     "include_empty: expected a bool, got 'no'"),
], ids=["offset-str", "progress-str", "max-players-str", "max-players-bool-lp", "max-players-negative",
        "harsanyi-max-players-float", "zeta-max-players-str", "check-finite-none", "include-empty-str"])
def test_interaction_functions_type_check_flags_and_max_players(call, error, message):
    """A string flag is truthy (it would silently turn the option on) and a string limit fails on '>': both are
    refused with what was expected."""
    with pytest.raises(error, match=message):
        call(torch.tensor([0.0, 1.0, 1.0, 3.0], dtype=torch.float64))


def test_tracker_resume_refuses_other_reference_interactions(tmp_path):
    run = tmp_path / "run"
    _plain(out_dir=run, reference={"I_and": torch.zeros(2, 4)}).add_values(0, _values())
    assert _plain(out_dir=run, reference={"I_and": torch.zeros(2, 4)}).steps == [0]
    with pytest.raises(ValueError, match=r"differs in \['reference_sha256'\]"):
        _plain(out_dir=run, reference={"I_and": torch.ones(2, 4)})
    config = json.loads((run / "config.json").read_text())  # a run saved before the digest existed
    del config["reference_sha256"]
    (run / "config.json").write_text(json.dumps(config))
    assert _plain(out_dir=run, reference={"I_and": torch.ones(2, 4)}).steps == [0]  # with a warning


# ------------------------------------------------------------------------------------ model cache


@pytest.fixture
def fake_gguf(monkeypatch):
    """_convert_gguf over a tiny model and tokenizer instead of dequantising a GGUF file."""
    import transformers
    from conftest import tiny_model
    from word_tokenizer import word_tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: word_tokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_model("llama"))


def test_converting_the_bundled_model_uses_a_copy_another_process_finished_first(tmp_path, fake_gguf):
    from sftint_fast.models import _convert_gguf

    out = tmp_path / "smollm2"
    _convert_gguf(tmp_path, "x.gguf", out)
    before = sorted(p.name for p in out.iterdir())
    assert "config.json" in before
    _convert_gguf(tmp_path, "x.gguf", out)  # a second process that started before the first one finished
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]  # no temp folder left


def test_converting_into_a_stale_cache_folder_says_what_to_do(tmp_path, fake_gguf):
    from sftint_fast.models import _convert_gguf

    out = tmp_path / "smollm2"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"half")  # no config.json: not a converted model
    with pytest.raises(OSError, match=r"expected no folder or a converted model \(config.json\) there, found "
                                      r"\['model.safetensors'\]; delete the folder"):
        _convert_gguf(tmp_path, "x.gguf", out)
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]
