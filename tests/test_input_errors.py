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
    for n_players in (0, 2.5, True, "8"):  # 0 and 2.5 chose probes the tracker then refused; "8" a bare TypeError
        with pytest.raises(ValueError, match=f"n_players: expected an int >= 1, got {n_players!r}"):
            P.confident_probes(None, None, count=1, n_players=n_players, candidates=["a b c"])
    with pytest.raises(ValueError, match="max_length: expected an int >= 1, got 0"):
        P.sft_example(None, "q", "a", max_length=0)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        list(P.heldout_batches([{"input_ids": [[1]], "labels": [[1]]}], None, batch_size=0))
    with pytest.raises(ValueError, match="examples: expected at least one example, got none"):
        P.pad_batch([], 0)
    with pytest.raises(ValueError, match=r"examples\[0\]: expected 'labels' as long as 'input_ids' \(3\), got 2"):
        P.pad_batch([{"input_ids": [1, 2, 3], "labels": [1, 2]}], 0)


ONE_DIMENSIONAL = r"heldout\[0\]: expected 'input_ids' of shape \(batch, length\), got \(3,\)"


@pytest.mark.parametrize("batch, message", [
    # pre-shifted labels: each position would be scored against the token after next, without an error
    ({"input_ids": [[1, 2, 3]], "labels": [[-100, 2]]},
     r"heldout\[0\]: expected 'labels' of the shape of 'input_ids' \(1, 3\), got \(1, 2\)"),
    ({"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, ONE_DIMENSIONAL),
    ({"input_ids": [[1, 2, 3]]}, r"heldout\[0\]: expected a batch with 'input_ids' and 'labels', got \['input_ids'\]"),
    ({"input_ids": [[1, 2, 3]], "labels": [[-100, 2, 3]], "attention_mask": [[1, 1]]},
     r"heldout\[0\]: expected 'attention_mask' of the shape of 'input_ids' \(1, 3\), got \(1, 2\)"),
], ids=["labels-shorter", "one-dimensional", "no-labels", "mask-shorter"])
def test_heldout_batches_refuse_misshapen_batches(batch, message):
    with pytest.raises(ValueError, match=message):
        list(P.heldout_batches([batch], None))


@pytest.mark.parametrize("item, message", [
    ("  ", r"probes\[0\]: expected a non-empty prompt string"),
    ({"prompt": "a b", "answer": 5}, r"probes\[0\]: expected an 'answer' string, got 5"),
    ({"prompt": "a b", "players": ["x"]}, r"probes\[0\]: expected 'players' as a list of word indices"),
    ({"prompt": "a b", "players": 3}, r"probes\[0\]: expected 'players' as a list of word indices"),
    # a misspelt or foreign key was dropped: the probe was tracked with the base target / the first words as players
    ({"prompt": "a b", "anwser": " c"},
     r"probes\[0\]: expected keys 'prompt', 'answer', 'players', got also \['anwser'\]"),
    ({"prompt": "a b", "target": " c"}, r"got also \['target'\] \(a probe's target text is its 'answer'\)"),
    # a Probe object with no players: tracked as dropped, but saved without players and reloaded with the first words
    (P.Probe("a b", players=()),
     r"probes\[0\]: expected 'players' as a list of word indices .* at least one, got \(\)"),
    (P.Probe("a b", players=(0.5,)), r"probes\[0\]: expected 'players' as a list of word indices"),
], ids=["blank-prompt", "answer-int", "players-words", "players-int", "misspelt-key", "explain-target-key",
        "probe-no-players", "probe-float-player"])
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


@pytest.mark.parametrize("n", [1, 3])
def test_plot_orders_ticks_are_the_whole_orders(tmp_path, monkeypatch, n):
    """With n=1 the order axis was ticked 0.0, 0.2, 0.4, ...: an order is a whole number of players."""
    tracker = _plain()
    for step in range(2):
        tracker.add_values(step, _values(n=n, seed=step))
    shown = []
    real = plot._save
    monkeypatch.setattr(plot, "_save", lambda fig, path: shown.append([list(ax.get_xticks()) for ax in fig.axes])
                        or real(fig, path))
    plot.plot_orders(tracker.report(), tmp_path / "orders.png")
    assert shown == [[list(range(n + 1))]]


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


# ------------------------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
def llama_game():
    from conftest import tiny_model
    from word_tokenizer import word_tokenizer

    model = tiny_model("llama")
    return model, sf.Game.from_text(model, word_tokenizer(), "the cat sat")


@pytest.mark.parametrize("options, error, message", [
    ({"subsets": torch.tensor([0, 9])}, ValueError, r"subsets: expected bitmasks in \[0, 2\^3\) for 3 players, "
                                                    r"received \[9\]"),
    ({"subsets": torch.tensor([-1])}, ValueError, r"received \[-1\]"),
    ({"subsets": torch.tensor([0.5])}, TypeError, "subsets: expected a 1-D integer tensor"),
    ({"subsets": torch.tensor([True])}, TypeError, "subsets: expected a 1-D integer tensor"),
    ({"subsets": torch.tensor([[0, 1]])}, TypeError, "subsets: expected a 1-D integer tensor"),
    ({"subsets": [0, 1]}, TypeError, "subsets: expected a 1-D int64 tensor of bitmasks, received list"),
    ({"batch_size": -1}, ValueError, "batch_size: expected a positive int or None, received -1"),
    ({"batch_size": 0}, ValueError, "batch_size: expected a positive int or None, received 0"),
], ids=["above-2^n", "negative", "float", "bool", "2-D", "list", "batch-negative", "batch-zero"])
def test_naive_engine_checks_subsets_and_batch_size(llama_game, options, error, message):
    """evaluate_naive silently read bits past n (9 -> v(1)), -1 as every player, 0.5 as 0, and with batch_size=-1
    returned uninitialised memory."""
    from sftint_fast.engine.naive import evaluate_naive

    model, game = llama_game
    options = {"subsets": torch.arange(8), **options}
    with pytest.raises(error, match=message):
        evaluate_naive(model, game, progress=False, **options)


def test_naive_never_batches_games_with_different_numbers_of_players(llama_game):
    """Same length, different n: the naive engine batched them with the first game's 2^n bitmasks, so the others got
    a v of the wrong length (a game of 2 players got 8 values, bits past n ignored)."""
    model, game = llama_game
    two = dataclasses_replace(game, player_spans=((0, 1), (2, 3)), words=("the", "sat"))
    with pytest.raises(ValueError, match=r"games\[1\]: expected the layout of games\[0\] \(length, targets, masking, "
                                         r"players\[, spans\]\)"):
        sf.evaluate_games(model, [game, two], method="naive", progress=False)
    many = sf.evaluate_many(model, [game, two], method="naive", progress=False)
    assert [v.shape for v in many] == [(8,), (4,)]
    assert torch.equal(many[1], sf.evaluate(model, two, method="naive", progress=False))


def dataclasses_replace(game, **changes):
    import dataclasses

    return dataclasses.replace(game, **changes)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, g: sf.group_games(m, [g, g], group_size=True), ValueError,
     "group_size: expected a positive int or None, received True"),
    (lambda m, g: sf.group_games(m, [g, g], method="naive", batch_size=0), ValueError,
     "batch_size: expected a positive int or None, received 0"),
    (lambda m, g: sf.group_games(m, [g, g], max_memory="1GB"), ValueError,
     "max_memory: expected a positive finite number of bytes or None, received '1GB'"),
    (lambda m, g: sf.group_games(m, [g, g], method="naive", compute_dtype="fp16"), ValueError,
     "compute_dtype: expected None, 'float32', 'bfloat16' or 'tf32', received 'fp16'"),
    (lambda m, g: sf.group_games(m, [g, g], method="naive", attention_backend="cuda"), ValueError,
     "attention_backend: expected 'auto', 'torch' or 'triton', received 'cuda'"),
    (lambda m, g: sf.evaluate_games(m, g, progress=False), TypeError,
     "games: expected a sequence of sftint_fast.Game, received Game"),
    (lambda m, g: sf.evaluate(m, g, subsets=torch.tensor([0, 1], device="meta"), progress=False), TypeError,
     "subsets: expected a 1-D integer tensor of bitmasks, received shape \\(2,\\) dtype torch.int64 on meta"),
    (lambda m, g: sf.evaluate(m, dataclasses_replace(g, baseline=torch.zeros(64)), method="naive", progress=False),
     ValueError, r"games\[0\].baseline: expected rows of the model's hidden size 32, received shape \(64,\)"),
    # nothing to evaluate (no subsets, no games) returned [] / an empty v for any method, backend or compute_dtype
    (lambda m, g: sf.evaluate(m, g, subsets=torch.tensor([], dtype=torch.int64), method="fast", progress=False),
     ValueError, "method: expected 'auto', 'naive' or 'trie', received 'fast'"),
    (lambda m, g: sf.evaluate(m, g, subsets=torch.tensor([], dtype=torch.int64), compute_dtype="fp16"), ValueError,
     "compute_dtype: expected None, 'float32', 'bfloat16' or 'tf32', received 'fp16'"),
    (lambda m, g: sf.evaluate_games(m, [], attention_backend="cuda"), ValueError,
     "attention_backend: expected 'auto', 'torch' or 'triton', received 'cuda'"),
], ids=["group-size-bool", "group-batch-zero", "group-max-memory-str", "group-compute-dtype", "group-backend",
        "games-one-game", "subsets-meta", "baseline-other-model", "empty-subsets-method", "empty-subsets-dtype",
        "no-games-backend"])
def test_engine_entry_points_check_their_options(llama_game, call, error, message):
    model, game = llama_game
    with pytest.raises(error, match=message):
        call(model, game)


@pytest.mark.parametrize("method", ["naive", "trie"])
def test_evaluate_many_names_the_callers_index_of_a_game_for_another_model(llama_game, method, tmp_path):
    """evaluate_many checked each group's games with their index in the group: the 4th game of [3 players, 1 player,
    3 players, bad ids] was named games[1] (the 2nd of its layout), a game the caller had not got wrong."""
    model, game = llama_game
    one = dataclasses_replace(game, player_spans=((0, 1),), words=("the",))
    bad = dataclasses_replace(game, input_ids=torch.tensor([3, 200, 5]))
    for out_dir in (None, tmp_path):  # the grouped path and the sharded one
        with pytest.raises(ValueError, match=r"games\[3\].input_ids: expected token ids in \[0, 128\).* received "
                                             r"\[200\] at positions \[1\]"):
            sf.evaluate_many(model, [game, one, game, bad], method=method, progress=False, out_dir=out_dir)


@pytest.mark.parametrize("method", ["naive", "trie"])
def test_a_model_on_the_meta_device_is_refused(llama_game, method):
    from conftest import tiny_model

    with pytest.raises(ValueError, match="model: expected its weights on a real device .* the meta device"):
        sf.evaluate(tiny_model("llama").to("meta"), llama_game[1], method=method, progress=False)


def test_all_variants_trie_refuses_memory_before_building_node_ids(llama_game, monkeypatch):
    """sf.evaluate passed the trie all 2^n bitmasks, whose plan sorted them level by level (272 MiB for n=22 under a
    49 MiB budget) before finding that its KV store did not fit; the plan of n alone refuses first."""
    from sftint_fast.engine import plan as plan_module

    calls = []
    real = plan_module._level_nodes
    monkeypatch.setattr(plan_module, "_level_nodes", lambda *a: calls.append(a) or real(*a))
    n = 18
    game = sf.Game(input_ids=torch.arange(4, 4 + n), player_spans=tuple((i, i + 1) for i in range(n)),
                   words=("w",) * n, target=torch.tensor([5]), baseline=torch.zeros(32), prompt_length=n)
    with pytest.raises(plan_module.TrieMemoryError, match=r"n=18.*needs at least .* max_memory is .*\(4194304 bytes\)"):
        sf.evaluate(llama_game[0], game, method="trie", max_memory=4 << 20, progress=False)
    assert calls == []
    small = sf.evaluate(llama_game[0], llama_game[1], method="trie", progress=False)  # all variants, no subsets
    assert torch.equal(small, sf.evaluate(llama_game[0], llama_game[1], method="trie", subsets=torch.arange(8),
                                          progress=False))


@pytest.mark.parametrize("options, error, message", [
    ({"batch_size": True}, ValueError, "batch_size: expected a positive int or None, received True"),
    ({"batch_size": 1.5}, ValueError, "batch_size: expected a positive int or None, received 1.5"),
    ({"max_memory": NAN}, ValueError, "max_memory: expected a positive finite number of bytes or None, received nan"),
    ({"max_memory": math.inf}, ValueError, "max_memory: expected a positive finite number"),
    ({"max_memory": -1}, ValueError, "max_memory: expected a positive finite number"),
    ({"num_targets": 0}, ValueError, "num_targets: expected a positive int or None, received 0"),
    ({"pass_tokens": True}, ValueError, "pass_tokens: expected a positive int or None, received True"),
    ({"subsets": [0, 1]}, TypeError, "subsets must be a 1-D int64 tensor, got list"),
], ids=["batch-bool", "batch-float", "memory-nan", "memory-inf", "memory-negative", "targets-zero", "pass-bool",
        "subsets-list"])
def test_plan_trie_checks_its_options(llama_game, options, error, message):
    model, game = llama_game
    with pytest.raises(error, match=message):
        sf.plan_trie(game, model=model, **options)


@pytest.mark.parametrize("options, error, message", [
    ({"attention_backend": "auto"}, ValueError, "attention_backend: expected 'torch' or 'triton', received 'auto'"),
    ({"subsets": [0, 1]}, TypeError, "subsets must be an int64 tensor of bitmasks, got list"),
    ({"batch_size": True}, ValueError, "batch_size: expected a positive int or None, received True"),
], ids=["backend-auto", "subsets-list", "batch-bool"])
def test_evaluate_trie_checks_its_options(llama_game, options, error, message):
    from sftint_fast.engine.trie import evaluate_trie

    model, game = llama_game
    with pytest.raises(error, match=message):
        evaluate_trie(model, game, progress=False, **options)


@pytest.mark.parametrize("change, message", [
    ({"scale": math.inf}, "scale: expected a positive float, got inf"),
    ({"softcap": math.inf}, "softcap: expected None or a positive float, got inf"),
    ({"sliding_window": True}, "sliding_window: expected None or an int >= 1, got True"),
    ({"sliding_window": 1.5}, "sliding_window: expected None or an int >= 1, got 1.5"),
    ({"node_ids": torch.tensor([0.0, 1.0])}, "node_ids: expected an int64 tensor, got torch.float32"),
    ({"level_offsets": torch.tensor([0.0, 1.0])}, "level_offsets: expected an int64 tensor, got torch.float32"),
    ({"q": torch.randn(2, 3, 4, 8, dtype=torch.float64)}, r"k_store: expected the floating dtype and device of q "
                                                          r"\(torch.float64 on cpu\), got torch.float32 on cpu"),
    ({"level": 1.0}, "level: expected an int >= 0, got 1.0"),
], ids=["scale-inf", "softcap-inf", "window-bool", "window-float", "node-ids-float", "table-float", "dtype-mismatch",
        "level-float"])
def test_torch_subset_attention_checks_dtypes_and_options(change, message):
    """inf scale / softcap gave NaN rows silently, a bool or fractional window was used as a number, and the wrong
    dtypes failed deep inside torch (NotImplementedError, RuntimeError, IndexError)."""
    from sftint_fast.ops.subset_attention import subset_attention

    store = torch.randn(7, 2, 8)
    args = {"q": torch.randn(2, 3, 4, 8), "k_store": store, "v_store": store, "node_ids": torch.tensor([0, 1]),
            "level_offsets": torch.tensor([0, 1]), "level_lens": torch.tensor([1, 3]),
            "player_lens": torch.tensor([0, 2]), "level_positions": torch.tensor([0, 1]), "level": 1,
            "scale": 8 ** -0.5}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        subset_attention(**args)


def test_compare_engines_refuses_what_is_not_a_game(llama_game):
    from sftint_fast.bench import compare_engines

    with pytest.raises(TypeError, match="game: expected a sftint_fast.Game, received str"):
        compare_engines(llama_game[0], "the cat sat", ["naive"])


@pytest.mark.parametrize("method", ["naive", "trie"])
def test_a_game_longer_than_a_learned_position_table_is_refused(method):
    """GPT-2 (learned absolute positions, n_positions=16) raised IndexError: index out of range in self, in both
    engines, for a prompt longer than 16 tokens; a Llama (RoPE) past max_position_embeddings still runs."""
    from conftest import tiny_model
    from word_tokenizer import word_tokenizer

    text = " ".join(["the cat sat on the mat"] * 4)  # 24 tokens
    gpt2, tok = tiny_model("gpt2", n_positions=16), word_tokenizer()
    with pytest.raises(ValueError, match=r"text: expected at most 16 tokens \(the model's learned position table "
                                         r"transformer.wpe\), received 24"):
        sf.Game.from_text(gpt2, tok, text, players=[0, 1, 2])
    game = sf.Game.from_text(gpt2, tok, text, players=[0, 1, 2], target="dog")
    with pytest.raises(ValueError, match=r"games\[0\]: expected at most 16 tokens \(the model's learned position "
                                         r"table transformer.wpe\), received 24 \(prompt 24 \+ target\[:-1\] 0\)"):
        sf.evaluate(gpt2, game, method=method, progress=False)
    short = sf.Game.from_text(gpt2, tok, "the cat sat on the mat", players=[0, 1, 2])
    assert sf.evaluate(gpt2, short, method=method, progress=False).shape == (8,)
    llama = tiny_model("llama", max_position_embeddings=16)
    long = sf.Game.from_text(llama, tok, text, players=[0, 1, 2])
    assert torch.isfinite(sf.evaluate(llama, long, method=method, progress=False)).all()


def test_a_model_that_cannot_be_upcast_is_told_to_run_in_its_own_dtype():
    """compute_dtype='float32' (the tracker's default) on a bfloat16 model only said "convert the model", which a
    quantized model cannot do: the message also names compute_dtype=None / the tracker's 'auto'."""
    import copy

    from conftest import tiny_model
    from word_tokenizer import word_tokenizer

    model = copy.deepcopy(tiny_model("llama")).to(torch.bfloat16)
    game = sf.Game.from_text(model, word_tokenizer(), "the cat sat")
    with pytest.raises(ValueError, match=r"compute_dtype='float32' on a torch.bfloat16 model.*compute_dtype=None "
                                         r"\(the tracker's compute_dtype='auto'"):
        sf.evaluate(model, game, compute_dtype="float32")
    assert torch.isfinite(sf.evaluate(model, game, compute_dtype=None)).all()
