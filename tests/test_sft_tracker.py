"""SFTTracker on tiny random models: resume, refusals, probes, the Trainer callback."""
import copy
import dataclasses
import json
import warnings

import pytest
import torch

import sftint_fast as sf
import sftint_fast.engine
from conftest import count_calls, interrupt_write, tiny_model
from dist_scripts.sft_callback import make_tokenizer
from sftint_fast.sft.probes import Probe, load_probes, save_probes, sft_example
from sftint_fast.sft.tracker import SFTTracker

PROMPTS = ["the big cat sat on the red mat", "a small dog did run over the blue river",
           "what is the capital city of france", "why did the cow jump"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _checkpoints(count, seed=0):
    base = tiny_model("llama", seed=seed)
    out = [base]
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(count - 1):
        m = copy.deepcopy(out[-1])
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        out.append(m)
    return out


def _tracker(tokenizer, out_dir=None, **kw):
    opts = dict(n_players=4, andor_method="and", min_base_py=0.0, bootstrap=100, progress=False,
                numerics_check=False, out_dir=out_dir)
    opts.update(kw)
    return SFTTracker(PROMPTS, tokenizer, **opts)


def _trainer(tmp_path, *, max_steps, lr, examples=16, length=12, logging_steps=500, seed=42, callbacks=None,
             save_steps=None, **extra):
    """A ``Trainer`` fine-tuning a tiny random llama on random token sequences on the CPU (batches of 4, no saving
    unless a callback asks or ``save_steps`` is given; TrainingArguments' own defaults for logging_steps and seed)."""
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama").train()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(4, 40, (length,), generator=g)), "labels": ids.clone()}
            for _ in range(examples)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=max_steps,
                             learning_rate=lr, logging_steps=logging_steps, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=seed, **({"save_strategy": "no"} if save_steps is None else
                                                              {"save_strategy": "steps", "save_steps": save_steps}),
                             **extra)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def test_resume_recomputes_nothing_and_gives_the_same_report(tokenizer, tmp_path, monkeypatch):
    models = _checkpoints(4)
    full = _tracker(tokenizer, tmp_path / "full")
    for step, m in enumerate(models):
        full.add_checkpoint(m, step * 10)
    expected = full.report().to_dict()

    first = _tracker(tokenizer, tmp_path / "run")
    for step, m in enumerate(models[:2]):
        first.add_checkpoint(m, step * 10)
    del first   # "killed" after 2 of 4 checkpoints

    calls = []
    real = sftint_fast.engine.evaluate_games
    # the tracker evaluates through sf.evaluate_many, which evaluates groups of games with evaluate_games
    monkeypatch.setattr(sftint_fast.engine, "evaluate_games", lambda m, g, **k: calls.extend(g) or real(m, g, **k))
    resumed = _tracker(tokenizer, tmp_path / "run")
    assert resumed.steps == [0, 10]
    for step, m in enumerate(models):
        resumed.add_checkpoint(m, step * 10)
    assert len(calls) == 2 * len(resumed.games)  # only the two new checkpoints were evaluated
    got = resumed.report().to_dict()
    assert all(x > 0 for x in got["curves"]["seconds_tracking"])  # the saved checkpoints' timings came back
    assert got["cost"]["checkpoints_timed"] == 3
    for report in (got, expected):  # timings differ
        report["floor_cost"] = report["cost"] = report["curves"]["seconds_tracking"] = None
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert (tmp_path / "run" / "step_000000030.safetensors").exists()


@pytest.mark.parametrize("name", ["step_000000000.safetensors", "step_000000000.json"])
@pytest.mark.parametrize("kill", [True, False], ids=["killed", "KeyboardInterrupt"])
def test_a_base_interrupted_before_it_was_saved_is_tracked_again_on_the_model_given(tokenizer, tmp_path, monkeypatch,
                                                                                      name, kill):
    """Killed while saving its base checkpoint, a run has saved the base's games (players, targets, built on that
    model) but no step: a rerun tracks the base again, so it must build them again from the base it is given (it took
    the killed run's games, built on another model: the report differed from an uninterrupted run's)."""
    first, base, later = _checkpoints(1)[0], *_checkpoints(2, seed=1)
    expected = _tracker(tokenizer, tmp_path / "full")
    for step, m in ((0, base), (10, later)):
        expected.add_checkpoint(m, step)
    run = tmp_path / "run"
    fired = interrupt_write(monkeypatch, KeyboardInterrupt(), name=name,
                            kill=(run, tmp_path / "killed") if kill else None)
    with pytest.raises(KeyboardInterrupt):
        _tracker(tokenizer, run).add_checkpoint(first, 0)
    assert fired["target"].name == name
    monkeypatch.undo()
    resumed = _tracker(tokenizer, tmp_path / "killed" if kill else run)
    assert resumed.steps == [] and resumed.games is None
    calls = []
    real = sftint_fast.engine.evaluate_games
    monkeypatch.setattr(sftint_fast.engine, "evaluate_games", lambda m, g, **k: calls.extend(g) or real(m, g, **k))
    for step, m in ((0, base), (10, later)):
        resumed.add_checkpoint(m, step)
    got, want = resumed.report().to_dict(), expected.report().to_dict()
    for report in (got, want):  # timings differ
        report["floor_cost"] = report["cost"] = report["curves"]["seconds_tracking"] = None
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    assert len(calls) == 2 * len(resumed.games)  # the base and step 10, once each


def test_refuses_mismatched_config_and_architecture(tokenizer, tmp_path):
    tracker = _tracker(tokenizer, tmp_path)
    tracker.add_checkpoint(tiny_model("llama"), 0)
    with pytest.raises(ValueError, match="another configuration.*tau"):
        _tracker(tokenizer, tmp_path, tau=0.1)
    with pytest.raises(ValueError, match="architecture"):
        tracker.add_checkpoint(tiny_model("gpt2"), 1)
    with pytest.raises(ValueError, match="vocab_size"):
        tracker.add_checkpoint(tiny_model("llama", vocab_size=200), 1)
    plain = SFTTracker(None, andor_method="and", noise_floor=None)
    plain.add_values(5, torch.zeros(3, 16))
    with pytest.raises(ValueError, match="after the last"):
        plain.add_values(4, torch.zeros(3, 16))
    with pytest.raises(ValueError, match=r"shape \(3, 16\)"):
        plain.add_values(6, torch.zeros(3, 8))
    resumed = _tracker(tokenizer, tmp_path)
    with pytest.raises(ValueError, match="architecture"):
        resumed.add_checkpoint(tiny_model("qwen2"), 5)


@pytest.mark.parametrize("text", [None, '["x"]', '{"tracker": ', ""], ids=["model", "list", "truncated", "empty"])
def test_an_out_dir_whose_config_json_is_not_a_trackers_is_refused_clearly(tokenizer, tmp_path, text):
    """An out_dir shared with a Trainer's output_dir (``save_model`` writes the model's config.json over the
    tracker's) or given a model folder by mistake: the resumed tracker raised a bare KeyError('tracker') (JSON errors
    and AttributeErrors for other files), which ``sftint track`` does not catch; now a ValueError names the folder."""
    if text is None:
        tiny_model("llama").save_pretrained(tmp_path)
    else:
        (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=f"out_dir {tmp_path}: expected the tracker's config.json"):
        _tracker(tokenizer, tmp_path)


def test_a_refused_base_checkpoint_leaves_nothing_a_retry_would_build_on(tokenizer, tmp_path):
    model = tiny_model("llama")
    tracker = _tracker(tokenizer, tmp_path / "a", min_base_py=0.99)
    for _ in range(2):  # the retry is refused too: it must not record the probes the base check dropped
        with pytest.raises(ValueError, match="no probe has base p_y >= min_base_py=0.99"):
            tracker.add_checkpoint(model, 0)
    assert tracker.steps == [] and tracker.games is None and tracker.signature is None
    # refused after its games were saved (here: a reference of the wrong shape): no games are left in out_dir for
    # a resumed tracker to take as the base's (with that model's architecture)
    run = tmp_path / "b"
    with pytest.raises(ValueError, match="reference I_and: expected shape"):
        _tracker(tokenizer, run, reference={"I_and": torch.zeros(1, 4)}).add_checkpoint(tiny_model("qwen2"), 0)
    assert not (run / "games.json").exists()
    resumed = _tracker(tokenizer, run, reference={"I_and": torch.zeros(1, 4)})
    assert resumed.games is None and resumed.signature is None
    resumed._reference_source = None  # (the config compares no dict's values) a base of another architecture
    resumed.add_checkpoint(model, 0)
    assert resumed.steps == [0] and resumed.signature["model_type"] == "llama"


def test_a_refused_base_checkpoint_leaves_the_folder_to_a_rerun_with_other_options(tokenizer, tmp_path):
    """Nothing of a run refused at its base is kept, its config.json included: a new tracker with corrected options
    takes the folder (it was refused as 'a run with another configuration'); a retry by the refused tracker itself
    writes its config.json again with its first save."""
    model, run = tiny_model("llama"), tmp_path / "run"
    with pytest.raises(ValueError, match="no probe has base p_y >= min_base_py=0.99"):
        _tracker(tokenizer, run, min_base_py=0.99).add_checkpoint(model, 0)
    assert not any(run.iterdir())
    corrected = _tracker(tokenizer, run)
    corrected.add_checkpoint(model, 0)
    assert json.loads((run / "config.json").read_text())["tracker"]["min_base_py"] == 0.0
    assert _tracker(tokenizer, run).steps == [0]  # resumed with the corrected options
    retried = _tracker(tokenizer, tmp_path / "retry", min_base_py=0.99)
    with pytest.raises(ValueError, match="min_base_py"):
        retried.add_checkpoint(model, 0)
    retried.config = dataclasses.replace(retried.config, min_base_py=0.0)
    retried.add_checkpoint(model, 0)
    assert json.loads((tmp_path / "retry" / "config.json").read_text())["tracker"]["min_base_py"] == 0.0


def test_tracker_with_sgd_sets_and_or_and_reference(tokenizer):
    models = _checkpoints(3)
    ref = tiny_model("qwen2", seed=3)
    tracker = _tracker(tokenizer, andor_method="sgd", andor_niter=50, andor_lr=1e-3, reference=(ref, tokenizer),
                       heldout=[{"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[-100, 6, 7, 8]])}],
                       persistence=1, noise_draws=2)
    for step, m in enumerate(models):
        tracker.add_checkpoint(m, step)
    rep = tracker.report()
    assert rep.gamma_available and rep.solver.startswith("sgd(niter=50")
    assert len(rep.curves["or/removed"]) == 3 and len(rep.curves["and/emerged_gamma"]) == 3
    assert all(isinstance(x, float) for x in rep.curves["heldout_loss"])
    # gamma of the base set against the reference is a fraction
    g0 = rep.curves["and/preserved_gamma"][0]
    assert 0.0 <= g0 <= 1.0
    assert rep.curves["all/removed_new_floor"][1] >= 0 and rep.floor_cost["rows_decomposed"] == 2 * len(tracker.games) * 2  # checkpoints x probes x draws


def test_probe_jsonl_roundtrip_and_validation(tmp_path):
    probes = [Probe("What is the capital city of France?", " Paris"), Probe("a b c d", players=(0, 2))]
    path = save_probes(probes, tmp_path / "p.jsonl")
    assert load_probes(path) == probes
    (tmp_path / "bad.jsonl").write_text('{"answer": "x"}\n')
    with pytest.raises(ValueError, match="prompt"):
        load_probes(tmp_path / "bad.jsonl")
    odd = [Probe("one\u2028two?", " x\u2029y"), Probe("three\x85four")]  # raw in JSON strings, not line ends
    (tmp_path / "odd.jsonl").write_text("\r\n".join(json.dumps({"prompt": p.prompt, "answer": p.answer},
                                                                ensure_ascii=False) for p in odd), encoding="utf-8")
    assert load_probes(tmp_path / "odd.jsonl") == odd


def test_save_probes_interrupted_leaves_the_earlier_file_and_no_temp_file(tmp_path, monkeypatch):
    import pathlib

    path = save_probes([Probe("the big cat")], tmp_path / "probes.jsonl")

    def interrupted(self, text, *args, **kwargs):
        pathlib.Path.write_bytes(self, text[:5].encode())
        raise OSError("no space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", interrupted)
    with pytest.raises(OSError, match="no space"):
        save_probes([Probe("a small dog")], path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["probes.jsonl"]
    assert [p.prompt for p in load_probes(path)] == ["the big cat"]


def test_probe_sources_come_in_order_and_a_missing_one_is_an_error(monkeypatch):
    import importlib.util

    from sftint_fast.sft import probes as P

    for module in ("countryinfo", "chatterbot_corpus"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (README install command)")
    both = P.confident_candidates()
    capitals = P.confident_candidates(["countries"])
    trivia = P.confident_candidates(["chatterbot"])
    assert both == capitals + trivia and len(capitals) > 200 and len(trivia) > 10
    assert all(c.prompt.startswith("Quick geography question: what is the capital city of ") for c in capitals)
    assert not any(t.prompt.startswith("Quick geography") for t in trivia)
    assert P.confident_candidates(["chatterbot", "countries"]) == trivia + capitals
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "countryinfo" else real(name, *a))
    with pytest.raises(ImportError, match=r"'countries' needs countryinfo.*countryinfo==1\.0\.1.*\['chatterbot'\]"):
        P.confident_candidates()
    assert P.confident_candidates(["chatterbot"]) == trivia  # the other source alone still works
    for bad in ("countries", [], ["countries", "wiki"], ["chatterbot", "chatterbot"]):
        with pytest.raises(ValueError, match="sources: expected"):
            P.confident_candidates(bad)


def test_callback_tracks_the_last_step_when_every_does_not_divide_it(tokenizer, tmp_path):
    """The model training ends with is tracked whatever ends it: max_steps not a multiple of ``every`` (5 with
    every=2, no saving) tracked steps 0, 2, 4 and never the final model; a StopFileCallback stopping without a save
    (step 3) the same; the step is logged once, with the final model (not the best one loaded after it)."""
    trainer = _trainer(tmp_path, max_steps=5, lr=1e-2, logging_steps=1)
    tracker = _tracker(tokenizer, persistence=1, noise_floor=None)
    sf.InteractionCallback(tracker, every=2).attach(trainer)
    trainer.train()
    assert tracker.steps == [0, 2, 4, 5]
    assert [h["step"] for h in trainer.state.log_history if "interactions/removed" in h] == [0, 2, 4, 5]

    from transformers import TrainerCallback

    stop = tmp_path / "STOP"

    class Appears(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                stop.write_text("3")

    trainer = _trainer(tmp_path, max_steps=10, lr=1e-2, callbacks=[Appears(), sf.StopFileCallback(stop, save=False)])
    tracker = _tracker(tokenizer, persistence=1, noise_floor=None)
    sf.InteractionCallback(tracker, every=2).attach(trainer)
    trainer.train()
    assert trainer.state.global_step == 3 and tracker.steps == [0, 2, 3]


def test_callback_warns_when_training_begins_before_the_steps_its_tracker_holds(tokenizer, tmp_path, caplog):
    """``trainer.train()`` a second time (global_step back to 0, the model trained on): every step up to the
    tracker's last (4) was skipped in silence, and the run tracked nothing; it is tracked the same, and said."""
    trainer = _trainer(tmp_path, max_steps=4, lr=1e-2)
    tracker = _tracker(tokenizer, persistence=1, noise_floor=None)
    sf.InteractionCallback(tracker, every=2).attach(trainer)
    trainer.train()
    with caplog.at_level("WARNING", logger="sftint_fast.sft.callback"):
        trainer.train()
    assert tracker.steps == [0, 2, 4]
    warned = [r.getMessage() for r in caplog.records if r.name == "sftint_fast.sft.callback"]
    assert len(warned) == 1 and "training begins at step 0" in warned[0] and "up to step 4" in warned[0]


def test_callback_whose_report_cannot_be_written_warns_and_training_goes_on(tokenizer, tmp_path, caplog):
    (tmp_path / "taken").write_text("a file where the report folder should be")
    trainer = _trainer(tmp_path, max_steps=2, lr=1e-2)
    tracker = _tracker(tokenizer, tmp_path / "track", persistence=1)
    callback = sf.InteractionCallback(tracker, every=2, report_dir=tmp_path / "taken" / "report").attach(trainer)
    with caplog.at_level("WARNING", logger="sftint_fast.sft.callback"):
        trainer.train()
    assert trainer.state.global_step == 2 and tracker.steps == [0, 2]
    assert callback.report_error is not None and "taken" in callback.report_error
    warned = [r.getMessage() for r in caplog.records if "could not write the report" in r.getMessage()]
    assert len(warned) == 3 and "training goes on" in warned[0] and str(tmp_path / "track") in warned[0]
    sf.plot.write_tracker_report(tracker, tmp_path / "later")  # what the warning says to run: the records are there
    assert json.loads((tmp_path / "later" / "report.json").read_text())["steps"] == [0, 2]


def test_tracking_a_checkpoint_gives_each_submodule_its_own_mode_back(tokenizer):
    """The model a training loop hands over (frozen part in eval mode) comes back in that mix, not all in train
    mode; and under no_grad, so no parameter gets a gradient."""
    model = tiny_model("llama").train()
    model.model.layers[1].eval()
    modes = [m.training for m in model.modules()]
    _tracker(tokenizer, noise_floor=None, persistence=1).add_checkpoint(model, 0)
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_a_reference_model_gets_each_submodule_its_own_mode_back(tokenizer):
    """The reference model (frozen part in eval mode, the rest in train mode) comes back in that mix."""
    ref = tiny_model("llama", seed=3).train()
    ref.model.layers[0].eval()
    modes = [m.training for m in ref.modules()]
    tracker = _tracker(tokenizer, noise_floor=None, persistence=1, reference=(ref, tokenizer))
    tracker.add_checkpoint(tiny_model("llama"), 0)
    assert [m.training for m in ref.modules()] == modes


def test_callback_with_trainer_logs_metrics(tokenizer, tmp_path):
    trainer = _trainer(tmp_path, max_steps=4, lr=1e-2, logging_steps=1)
    model = trainer.model
    tracker = _tracker(tokenizer, tmp_path / "track", persistence=1)
    callback = sf.InteractionCallback(tracker, every=2, report_dir=tmp_path / "report").attach(trainer)
    written = []
    real_write = callback._write_report
    callback._write_report = lambda state, report=None: written.append(state.global_step) or real_write(state, report)
    trainer.train()
    assert tracker.steps == [0, 2, 4]
    # the report is rewritten after each tracked checkpoint and when training ends, with the Trainer's losses
    assert written == [0, 2, 4, 4]
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["steps"] == [0, 2, 4] and saved["cost"]["run_seconds"] > 0
    log = json.loads((tmp_path / "report" / "training_log.json").read_text())
    assert [s for s, _ in log["series"]["loss"]] == [1, 2, 3, 4]
    assert {"sets.json", "counts.png", "report.md"} <= {p.name for p in (tmp_path / "report").iterdir()}
    assert "## Training loss" in (tmp_path / "report" / "report.md").read_text()
    logged = [h for h in trainer.state.log_history if "interactions/removed" in h]
    assert [h["step"] for h in logged] == [0, 2, 4]
    assert {"interactions/emerged", "interactions/removed_excess", "interactions/emerged_floor"} <= set(logged[-1])
    assert model.training  # train mode restored
    assert callback.tracker is tracker
    # what tracking cost the run: each call's seconds add up to the total, a share of the wall time
    seconds = [h["interactions/tracking_seconds"] for h in logged]
    assert all(x > 0 for x in seconds) and seconds[0] == callback.seconds_first
    assert sum(seconds[1:]) == pytest.approx(callback.seconds_tracking)  # after the base
    assert "interactions/tracking_overhead" not in logged[0]
    overhead = [h["interactions/tracking_overhead"] for h in logged[1:]]
    assert all(0 < x <= 1 for x in overhead) and callback.seconds_tracking < callback.seconds_training
    cost = tracker.report().cost
    timed = [r.meta for r in tracker.records[1:]]
    parts = ("seconds_evaluate", "seconds_heldout", "seconds_reference", "seconds_decompose", "seconds_floor")
    assert cost["checkpoints_timed"] == 2 and cost["base_seconds"] > 0
    assert cost["seconds_per_checkpoint"] == pytest.approx(sum(m[p] for m in timed for p in parts) / 2)
    assert cost["variants_per_second"] == pytest.approx(
        2 * len(tracker.games) * 2**tracker.games[0].num_players / sum(m["seconds_evaluate"] for m in timed))
    # each checkpoint's tracking covers at most what the callback measured around it (which adds the report)
    assert all(a <= b for a, b in zip(tracker.report().curves["seconds_tracking"], seconds))
    from sftint_fast.plot import markdown

    assert (f"- tracking cost: {cost['seconds_per_checkpoint']:.1f} s per checkpoint after the base (mean of 2): "
            f"evaluation {cost['seconds_evaluate']:.1f} s ({cost['variants_per_second']:.0f} variants/s)"
            in markdown(tracker.report(), figures=[]))
    with pytest.raises(ValueError, match="architecture"):
        tracker.add_checkpoint(tiny_model("gpt2"), 10)


def test_tracking_under_a_trainer_with_neftune_and_gradient_checkpointing_runs_the_trie(tokenizer, tmp_path,
                                                                                         monkeypatch):
    """The Trainer's own hooks (NEFTune's noise, gradient checkpointing's require-grads, transformers' output
    recorders after an ``output_hidden_states`` forward) do not turn the trie off: every tracked checkpoint runs it,
    without a fallback warning (a user's hook would: tests/test_hooks.py)."""
    from transformers import TrainerCallback

    from sftint_fast.engine import trie
    from sftint_fast.engine.adapters import user_hooks

    calls = count_calls(monkeypatch, {"evaluate_trie_games": trie})
    trainer = _trainer(tmp_path, max_steps=2, lr=1e-2, neftune_noise_alpha=5.0, gradient_checkpointing=True)
    with torch.no_grad():
        trainer.model(torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    trainer.model.enable_input_require_grads()
    seen = []

    class Hooks(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append((sorted({getattr(h, "__name__", "") for m in model.modules()
                                 for h in m._forward_hooks.values()}), user_hooks(model)))

    trainer.add_callback(Hooks())
    tracker = _tracker(tokenizer)
    sf.InteractionCallback(tracker, every=1).attach(trainer)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*falling back to the naive engine")
        trainer.train()
    assert tracker.steps == [0, 1, 2]
    assert seen[0][0] == ["make_inputs_require_grads", "neftune_post_forward_hook", "output_capturing_hook"]
    assert all(found == [] for _, found in seen)
    assert calls["evaluate_trie_games"] >= 3  # the trie at every checkpoint


def test_numerics_report_engine_and_precision_error(tokenizer):
    """The run reports the engine's error (trie vs naive, tiny) and what bf16 costs (vs fp32, far larger)."""
    tracker = _tracker(tokenizer, numerics_check=True)
    tracker.add_checkpoint(_checkpoints(1)[0], 0)
    numerics = tracker.report().numerics
    assert numerics["compute_dtype"] == "float32" and numerics["precision"] == "bfloat16 vs float32"
    assert numerics["engine_max_abs"] < 1e-4
    assert numerics["precision_rms"] > 10 * numerics["engine_rms"]


def test_a_trainer_in_bf16_mixed_precision_is_tracked_in_float32(tokenizer, tmp_path):
    """``bf16=True`` makes the Trainer's accelerate wrap the model's forward in bf16 autocast, and the callback is
    handed that model: the target, held-out loss and every naive evaluation ran in bf16 while the trie did not, so
    the numerics check reported the bf16 error (~0.05) as the engine's. Tracking now runs the float32 model (the
    tracker's compute_dtype), as it would on the saved checkpoint, and training keeps its autocast."""
    from accelerate.state import AcceleratorState

    heldout = [{"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]]), "labels": torch.tensor([[-100, -100, 7, 8, 9, 10]])}]
    trainer = _trainer(tmp_path, max_steps=1, lr=1e-2, bf16=True)
    base = copy.deepcopy(trainer.model).eval()
    tracker = _tracker(tokenizer, numerics_check=True, heldout=heldout)
    sf.InteractionCallback(tracker, every=10).attach(trainer)
    try:
        trainer.train()
        assert trainer.model.forward is not trainer.model.__dict__["_original_forward"]  # still the autocast one
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    plain = _tracker(tokenizer, numerics_check=True, heldout=heldout)
    plain.add_checkpoint(base, 0)
    numerics = tracker.report().numerics
    assert numerics["engine_max_abs"] < 1e-4 and numerics["precision_rms"] > 10 * numerics["engine_rms"]
    expected = plain.report().numerics
    assert numerics.keys() == expected.keys()
    for key, value in expected.items():  # numbers to rounding, the rest (dtypes, engine names) exactly
        assert numerics[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-5, abs=1e-6)), key
    assert [g.target.tolist() for g in tracker.games] == [g.target.tolist() for g in plain.games]
    assert torch.allclose(tracker.records[0].values, plain.records[0].values, atol=1e-5)
    assert tracker.records[0].heldout_loss == pytest.approx(plain.records[0].heldout_loss, rel=1e-6)


def test_a_caller_autocast_region_leaves_the_tracking_in_float32(tokenizer):
    """A training loop of one's own that calls ``add_checkpoint`` inside ``torch.autocast(bfloat16)``: the values
    were already protected, but the held-out loss ran in bf16 (off by ~1e-3 from the float32 loss of the same
    model). Everything the tracker measures now runs in its compute_dtype, whatever region it is called in."""
    heldout = [{"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]]), "labels": torch.tensor([[-100, -100, 7, 8, 9, 10]])}]
    model = _checkpoints(1)[0]
    plain = _tracker(tokenizer, heldout=heldout, noise_floor=None)
    plain.add_checkpoint(model, 0)
    tracker = _tracker(tokenizer, heldout=heldout, noise_floor=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tracker.add_checkpoint(model, 0)
        assert torch.is_autocast_enabled("cpu")  # the caller's region is left as it was
    assert tracker.records[0].heldout_loss == pytest.approx(plain.records[0].heldout_loss, rel=1e-6)
    assert torch.allclose(tracker.records[0].values, plain.records[0].values, atol=1e-5)
    assert torch.allclose(tracker.records[0].p_y, plain.records[0].p_y, atol=1e-6)


def test_numerics_under_bf16_autocast_of_a_float32_model(tokenizer):
    """compute_dtype='bfloat16' on a float32 model (``sftint track --compute-dtype bfloat16``: checkpoints load in
    float32) runs the naive engine under autocast; the numerics check crashed the base checkpoint by forcing the
    trie there. It now reports the precision error (fp32 vs the run's bf16) and says the engine was naive."""
    import warnings

    tracker = _tracker(tokenizer, numerics_check=True, compute_dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "using the naive engine" under autocast
        tracker.add_checkpoint(_checkpoints(1)[0], 0)
    numerics = tracker.report().numerics
    assert numerics["compute_dtype"] == "bfloat16" and numerics["precision"] == "bfloat16 vs float32"
    assert numerics["precision_rms"] > 0 and "engine_max_abs" not in numerics
    assert numerics["engine"].startswith("naive")


def test_numerics_on_a_sample_of_variants_and_the_base_evaluated_once(tokenizer, monkeypatch):
    """n=5: the numerics check uses 16 of the 32 variants (empty and full included) and its figures are those of
    naive/trie/bf16 on exactly them; the base checkpoint's probes are evaluated once, not twice."""
    from sftint_fast.sft.tracker import NUMERICS_VARIANTS, numerics_subsets

    subsets = numerics_subsets(5, seed=4)
    assert subsets.numel() == NUMERICS_VARIANTS == 16 and subsets.unique().numel() == 16
    assert int(subsets[0]) == 0 and int(subsets[-1]) == 31 and bool((subsets[1:] > subsets[:-1]).all())
    assert numerics_subsets(4, seed=4) is None and torch.equal(subsets, numerics_subsets(5, seed=4))

    calls = []
    real = sftint_fast.engine.evaluate_games
    monkeypatch.setattr(sftint_fast.engine, "evaluate_games", lambda m, g, **k: calls.extend(g) or real(m, g, **k))
    model = _checkpoints(1)[0]
    tracker = _tracker(tokenizer, n_players=5, numerics_check=True, seed=4)
    tracker.add_checkpoint(model, 0)
    # the kept probes once (not again for the base record), then probe 0 three times (naive, trie, bf16 numerics)
    assert len(tracker.games) == 2 and len(calls) == len(tracker.games) + 3
    monkeypatch.undo()
    numerics = tracker.report().numerics
    assert numerics["variants"] == 16
    game = tracker.games[0]
    naive = sf.evaluate(model, game, method="naive", subsets=subsets, progress=False).double()
    trie = sf.evaluate(model, game, method="trie", subsets=subsets, progress=False).double()
    bf16 = sf.evaluate(model, game, method="naive", subsets=subsets, progress=False, compute_dtype="bfloat16").double()
    assert numerics["engine_max_abs"] == pytest.approx((trie - naive).abs().max().item(), abs=1e-9)
    assert numerics["precision_max_abs"] == pytest.approx((bf16 - naive).abs().max().item(), rel=1e-6)
    assert numerics["precision_rms"] == pytest.approx((bf16 - naive).pow(2).mean().sqrt().item(), rel=1e-6)
    full = sf.evaluate(model, game, method="naive", progress=False).double()
    assert torch.allclose(tracker.records[0].values[0], full)  # the base values are the full 2^n ones


def test_reference_of_another_vocabulary_needs_a_decodable_target(tokenizer):
    """A reference with its own tokenizer gets the base target as text; a target id that decodes to nothing (here
    ids past the word-level vocabulary of the random base model) is refused with the probe and ids named. A copy of
    the base tokenizer (same vocabulary) keeps the ids."""
    from word_tokenizer import word_tokenizer

    base = _checkpoints(1)[0]
    tracker = _tracker(tokenizer, reference=(tiny_model("llama", seed=3), word_tokenizer()))
    with pytest.raises(ValueError, match=r"reference: probes\[\d\]'s target ids \[\d+\] decode to ''"):
        tracker.add_checkpoint(base, 0)
    copy_of_base = make_tokenizer()
    assert copy_of_base is not tokenizer
    tracker = _tracker(tokenizer, reference=(tiny_model("llama", seed=3), copy_of_base))
    tracker.add_checkpoint(base, 0)
    assert tracker.report().gamma_available


def test_resume_refuses_another_reference(tokenizer, tmp_path):
    """A resumed run uses the reference values it saved: another reference given on resume is refused, not ignored."""
    base = _checkpoints(1)[0]
    run = tmp_path / "run"
    _tracker(tokenizer, run, reference=(tiny_model("llama", seed=3), tokenizer)).add_checkpoint(base, 0)
    assert _tracker(tokenizer, run, reference=(tiny_model("llama", seed=3), tokenizer)).steps == [0]  # the same
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['reference_sha256'\]"):
        _tracker(tokenizer, run, reference=(tiny_model("llama", seed=4), tokenizer))


def _legacy_reference_digest(model):
    """The reference digest of sftint_fast up to its canonical one: the whole config less ``_name_or_path``."""
    import hashlib

    from sftint_fast.sft.tracker import _tensor_digest

    digest, settings = hashlib.sha256(), model.config.to_dict()
    settings.pop("_name_or_path", None)
    digest.update(repr(sorted(settings.items())).encode())
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        digest.update(f"{name}:{tuple(param.shape)}:{_tensor_digest(flat[:: max(1, flat.numel() // 1024)])};".encode())
    return digest.hexdigest()[:16]


def test_resume_accepts_the_reference_loaded_otherwise(tokenizer, tmp_path):
    """The same reference loaded with SDPA instead of eager attention and ``use_cache`` off (gradient checkpointing)
    computes the same values: a resume accepts it, also in a run folder saved with the earlier digest, which hashed
    those entries; another reference is still refused there."""
    base = _checkpoints(1)[0]
    run = tmp_path / "run"
    _tracker(tokenizer, run, reference=(tiny_model("llama", seed=3), tokenizer)).add_checkpoint(base, 0)
    other = tiny_model("llama", seed=3, attn="sdpa")
    other.config.use_cache = False
    assert _tracker(tokenizer, run, reference=(other, tokenizer)).steps == [0]
    config = json.loads((run / "config.json").read_text())
    legacy = _legacy_reference_digest(tiny_model("llama", seed=3))
    assert legacy not in (config["reference_sha256"], _legacy_reference_digest(other))
    config["reference_sha256"] = legacy  # a run saved by the earlier version
    (run / "config.json").write_text(json.dumps(config))
    assert _tracker(tokenizer, run, reference=(tiny_model("llama", seed=3), tokenizer)).steps == [0]
    with pytest.raises(ValueError, match=r"another configuration \(differs in \['reference_sha256'\]"):
        _tracker(tokenizer, run, reference=(tiny_model("llama", seed=4), tokenizer))


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (e.g. an older or custom model): full logits, sliced."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_heldout_loss_runs_the_lm_head_on_labelled_positions_only(arch):
    from conftest import tiny_model

    from sftint_fast.sft.tracker import causal_lm_loss

    model = tiny_model(arch, seed=3)
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (3, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 5:9] = ids[0, 5:9]  # answers at different places; row 2 right-padded
    labels[1, 8:12] = ids[1, 8:12]
    labels[2, 3:6] = ids[2, 3:6]
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum").item()
        rows = []
        handle = model.get_output_embeddings().register_forward_hook(lambda m, a, o: rows.append(a[0].shape[1]))
        loss, count = causal_lm_loss(model, ids, labels, mask)
        handle.remove()
        plain, plain_count = causal_lm_loss(_NoLogitsToKeep(model), ids, labels, mask)
    assert count == plain_count == 4 + 4 + 3  # every labelled token, each predicted from the position before it
    assert loss == pytest.approx(full, rel=1e-5) and plain == pytest.approx(full, rel=1e-5)
    # positions 2..4 (row 2), 4..7 (row 0), 7..10 (row 1) predict labels: 9 of the 12 rows of the LM head
    assert rows == [9]
    assert causal_lm_loss(model, ids, torch.full_like(ids, -100), mask) == (0.0, 0)


class _KwargsWrapper(torch.nn.Module):
    """Like PEFT's PeftModelForCausalLM: ``forward(**kwargs)`` passes everything on to ``get_base_model()``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_base_model(self):
        return self.inner

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_heldout_loss_sees_logits_to_keep_through_wrappers():
    from conftest import tiny_model

    from sftint_fast.sft.tracker import _takes_logits_to_keep

    model = tiny_model("llama")
    assert _takes_logits_to_keep(model) and _takes_logits_to_keep(_KwargsWrapper(model))
    assert not _takes_logits_to_keep(_NoLogitsToKeep(model))  # no **kwargs: the argument would not reach the model
    assert not _takes_logits_to_keep(_KwargsWrapper(_NoLogitsToKeep(model)))
    ddp_like = torch.nn.Module()
    ddp_like.module = _KwargsWrapper(model)
    ddp_like.forward = lambda *args, **kwargs: ddp_like.module(*args, **kwargs)
    assert _takes_logits_to_keep(ddp_like)


def _plain(**kw):
    opts = dict(andor_method="and", noise_floor=None, bootstrap=10, min_base_py=0.0, persistence=1, progress=False)
    opts.update(kw)
    return SFTTracker(None, **opts)


@pytest.mark.parametrize("option, value, error", [
    ("qthres", True, ValueError), ("min_base_py", False, ValueError), ("irrelevant_fraction", True, ValueError),
    ("boundary_removed_fraction", True, ValueError), ("numerics_check", "no", TypeError), ("progress", 1, TypeError),
])
def test_tracker_refuses_bools_for_numbers_and_non_bools_for_flags(option, value, error):
    with pytest.raises(error, match=f"{option}: expected a"):
        SFTTracker(None, **{option: value})
    with pytest.raises(ValueError, match="tau: expected a finite number >= 0, got True"):
        SFTTracker(None, tau=True, threshold_reference="absolute")  # was taken as tau = 1


def test_a_step_of_another_type_is_refused_not_skipped_as_already_recorded(tokenizer):
    values = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tracker = _plain()
    tracker.add_values(0, values)
    tracker.add_values(1, values + 0.1)
    for step in (True, 1.0):  # == 1, a recorded step: both were skipped without a word
        with pytest.raises(ValueError, match=f"step: expected an int >= 0, got {step!r}"):
            tracker.add_values(step, values)
    probed = _tracker(tokenizer)
    probed.add_values(0, values)
    probed.add_values(1, values)
    with pytest.raises(ValueError, match="step: expected an int >= 0, got True"):
        probed.add_checkpoint(tiny_model("llama"), True)
    assert tracker.steps == probed.steps == [0, 1]


def test_boolean_values_are_refused():
    with pytest.raises(TypeError, match="values: expected a tensor of numbers .*got a torch.bool tensor"):
        _plain().add_values(0, torch.ones(2, 4, dtype=torch.bool))


def test_heldout_data_without_a_labelled_token_is_refused_not_a_loss_of_zero(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="heldout: expected a non-empty list"):
        _tracker(tokenizer, heldout=[])  # was: no held-out loss, without a word
    unlabelled = [{"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.full((1, 4), -100)}]
    tracker = _tracker(tokenizer, tmp_path / "run", heldout=unlabelled)
    # was a held-out loss of 0.0 at every checkpoint: the first one became the "minimum"
    with pytest.raises(ValueError, match=r"heldout: expected at least one labelled token \(labels != -100\)"):
        tracker.add_checkpoint(tiny_model("llama"), 0)
    assert tracker.steps == [] and not (tmp_path / "run" / "games.json").exists()


def test_resume_reads_the_saved_steps_in_step_order_not_name_order(tmp_path):
    steps = [999_999_999, 1_000_000_000, 1_000_000_001]  # step_1000000000.json sorts before step_999999999.json
    tracker = _plain(out_dir=tmp_path)
    g = torch.Generator().manual_seed(0)
    for step in steps:
        tracker.add_values(step, torch.randn(2, 8, generator=g, dtype=torch.float64))
    resumed = _plain(out_dir=tmp_path)
    assert resumed.steps == steps
    assert resumed.report().to_dict()["curves"] == tracker.report().to_dict()["curves"]


@pytest.mark.parametrize("options, refused", [({"noise_floor": "iid"}, True), ({"warm_start": True}, True),
                                              ({}, False), ({"noise_floor": None}, False)],
                         ids=["iid", "warm-start", "order-matched", "no-floor"])
def test_a_run_saved_by_an_earlier_floor_algorithm_is_refused_where_its_floors_differ(tmp_path, options, refused):
    """The iid null (noise on v) and warm-started replicates changed how floors are drawn: an older run resumed kept
    its saved steps' floors beside new ones. Refused, naming the floor version; order-matched cold floors resume."""
    import json

    from sftint_fast.sft.tracker import FLOOR_VERSION

    if "warm_start" in options:
        options = {**options, "andor_method": "sgd", "andor_niter": 20}
    g = torch.Generator().manual_seed(0)
    tracker = SFTTracker(None, out_dir=tmp_path, progress=False, **{"andor_method": "and", **options})
    for step in (0, 1):
        tracker.add_values(step, torch.randn(2, 8, generator=g, dtype=torch.float64))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("floor_version") == (None if options.get("noise_floor", "x") is None else FLOOR_VERSION)
    config.pop("floor_version", None)  # as an earlier version saved it
    (tmp_path / "config.json").write_text(json.dumps(config))
    if refused:
        with pytest.raises(ValueError, match=r"another version of the floor \(saved 1, this sftint_fast 2\)"):
            SFTTracker(None, out_dir=tmp_path, progress=False, **{"andor_method": "and", **options})
    else:
        assert SFTTracker(None, out_dir=tmp_path, progress=False, **{"andor_method": "and", **options}).steps == [0, 1]


@pytest.mark.parametrize("name", ["step_000000010.safetensors", "step_000000010.json"])
def test_a_run_killed_while_saving_resumes_to_the_same_report_and_removes_its_temp_files(tmp_path, monkeypatch,
                                                                                          name):
    """Killed (no cleanup runs) while a step's file is renamed into place, a run leaves its temp file
    (``.step_000000010.<random>.tmp.safetensors``): the resumed tracker gives the uninterrupted run's report and
    removes the temp files of its own saves (they piled up in out_dir at every kill); other files stay."""
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(3, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    opts = dict(noise_floor="iid", persistence=2, noise_draws=2)
    full = _plain(out_dir=tmp_path / "full", **opts)
    for t, v in enumerate(values):
        full.add_values(t * 10, v)
    run, killed = tmp_path / "run", tmp_path / "killed"
    interrupt_write(monkeypatch, KeyboardInterrupt(), name=name, kill=(run, killed))
    first = _plain(out_dir=run, **opts)
    with pytest.raises(KeyboardInterrupt):
        for t, v in enumerate(values):
            first.add_values(t * 10, v)
    monkeypatch.undo()
    left = [p.name for p in killed.iterdir() if ".tmp" in p.name]
    assert len(left) == 1 and left[0].startswith(".step_000000010.")  # what the kill left
    (killed / ".notes.abcdefgh.tmp.txt").write_text("not the tracker's")
    resumed = _plain(out_dir=killed, **opts)
    assert resumed.steps == [0]  # step 10 counts as saved only once its JSON is in place
    for t, v in enumerate(values):
        resumed.add_values(t * 10, v)
    assert sorted(p.name for p in killed.iterdir() if ".tmp" in p.name) == [".notes.abcdefgh.tmp.txt"]
    got, want = resumed.report().to_dict(), full.report().to_dict()
    for report in (got, want):  # timings differ
        report["floor_cost"] = report["cost"] = report["curves"]["seconds_tracking"] = None
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


def _from_interactions(rows):
    """Values ``(B, 2^n)`` whose AND interactions of ``v - v(∅)`` are ``rows``."""
    return sf.inverse_harsanyi(torch.tensor(rows, dtype=torch.float64))


def test_removed_gamma_uses_the_base_checkpoints_signs():
    base = [[0.0, 1.0, 1.0, 1.0]]
    later = [[0.0, 1.0, 1.0, -0.01]]  # {0,1} is removed, and its sign flips while it is tiny
    tracker = _plain(reference={"I_and": torch.tensor(base, dtype=torch.float64)})
    tracker.add_values(0, _from_interactions(base))
    tracker.add_values(1, _from_interactions(later))
    curves = tracker.report().curves
    assert curves["and/removed"] == [0.0, 1.0]
    # the removed interaction was I_0({0,1}) = +1, salient in the reference with the same sign: gamma = 1
    assert curves["and/removed_gamma"][1] == pytest.approx(1.0)
    assert curves["and/preserved_gamma"] == pytest.approx([1.0, 1.0])


def test_gamma_with_an_absolute_threshold_uses_it_for_the_reference_too():
    # threshold_reference="absolute": tau is a magnitude, for Ω_ref as for Ω (not a share of max |I_ref|)
    tau = 0.5
    ref = [[0.0, 4.0, 0.6, 0.0]]
    rows = [[[0.0, 1.0, 0.0, 0.8]], [[0.0, 1.0, 0.7, 0.8]]]  # {1} emerges at step 1, with the reference's sign
    tracker = _plain(threshold_reference="absolute", tau=tau, reference={"I_and": torch.tensor(ref, dtype=torch.float64)})
    for step, row in enumerate(rows):
        tracker.add_values(step, _from_interactions(row))
    curves = tracker.report().curves

    def brute_gamma(inter, members):  # METHOD.md section 4, Ω_ref = {S != ∅ : |I_ref(S)| > tau}
        num = sum(abs(inter[s]) for s in members if s and abs(ref[0][s]) > tau and (inter[s] > 0) == (ref[0][s] > 0))
        return num / sum(abs(inter[s]) for s in members)

    assert curves["and/preserved_gamma"][0] == pytest.approx(brute_gamma(rows[0][0], [1, 3]))
    assert curves["and/emerged"] == [0.0, 1.0]
    assert brute_gamma(rows[1][0], [2]) == 1.0  # relative to max |I_ref| = 4, {1} (0.6 < 2) would not be shared
    assert curves["and/emerged_gamma"][1] == pytest.approx(brute_gamma(rows[1][0], [2]))
    assert curves["and/emerged_unshared_new"] == [0.0, 0.0]


def test_strength_by_order_is_averaged_over_probes():
    # probe 0: |I| 10 at order 1 only; probe 1: 1 at order 1, 3 at order 2 (all salient, all preserved)
    rows = [[0.0, 10.0, 0.0, 0.0], [0.0, 1.0, 0.0, -3.0]]
    tracker = _plain()
    tracker.add_values(0, _from_interactions(rows))
    curves = tracker.report().curves
    plus, minus = curves["and/preserved_strength_plus"][0], curves["and/preserved_strength_minus"][0]
    assert plus == pytest.approx([0.0, (1.0 + 0.25) / 2, 0.0])  # pooled would give 11/14 at order 1
    assert minus == pytest.approx([0.0, 0.0, (0.0 + 0.75) / 2])
    report = tracker.report()
    lo, hi = report.intervals["and/preserved_strength_plus"]
    assert len(lo) == len(hi) == 1 and len(lo[0]) == len(hi[0]) == 3
    # resampling two probes: the mean of order 1 lies between the probes' own 0.25 and 1.0
    assert 0.25 - 1e-12 <= lo[0][1] <= plus[1] <= hi[0][1] <= 1.0 + 1e-12
    mlo, mhi = report.intervals["and/preserved_mean_order"]
    assert mlo[0] <= report.curves["and/preserved_mean_order"][0] <= mhi[0]
    # a probe whose set is empty does not count: nothing is removed at the base, so NaN
    assert all(x != x for x in curves["and/removed_strength_plus"][0])


def test_p_y_of_an_answer_target_is_the_answer_probability(tokenizer):
    model = tiny_model("llama", seed=2)
    probes = [Probe(prompt=p, answer=a) for p, a in zip(PROMPTS[:2], ["the cat", "over"])]
    tracker = SFTTracker(probes, tokenizer, n_players=4, andor_method="and", min_base_py=0.0, progress=False,
                         numerics_check=False, target="answer", noise_floor=None)
    tracker.add_checkpoint(model, 0)
    py = tracker.records[0].p_y
    for i, (game, p) in enumerate(zip(tracker.games, py.tolist())):
        with torch.no_grad():
            logits = model(input_ids=game.input_ids[None]).logits[0].double()
        m = game.target.numel()
        rows = logits[game.prompt_length - 1: game.prompt_length - 1 + m].log_softmax(-1)
        expected = rows.gather(-1, game.target[:, None]).sum().exp().item()
        assert p == pytest.approx(expected, rel=1e-4)
        if m == 1:  # one token: sigmoid of its log-odds
            assert p == pytest.approx(torch.sigmoid(tracker.records[0].values[i, -1]).item(), rel=1e-4)
    assert any(g.target.numel() > 1 for g in tracker.games)


def test_emerged_interactions_carry_the_step_they_first_appeared():
    rows = [[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.8], [0.0, 1.0, 1.0, 0.9],
            [0.0, 1.0, 1.0, 0.9]]
    tracker = _plain(persistence=2)
    for step, row in zip((0, 10, 20, 30, 40), rows):
        tracker.add_values(step, _from_interactions([row]))
    assert tracker.emerged(step=20) == [[]]  # seen once: not confirmed yet
    assert tracker.emerged(step=30) == [[{"subset": 3, "first_step": 20, "value": pytest.approx(0.9)}]]
    assert tracker.emerged()[0][0]["first_step"] == 20  # the last checkpoint keeps its onset
    with pytest.raises(ValueError, match=r"step: expected a recorded step \[0, 10, 20, 30, 40\], received 25"):
        tracker.emerged(step=25)
    with pytest.raises(ValueError, match="kind: expected one of"):
        tracker.emerged("xor")


def test_emerged_names_the_words(tokenizer):
    tracker = _tracker(tokenizer, persistence=1, noise_floor=None)
    for step, m in enumerate(_checkpoints(3, seed=5)):
        tracker.add_checkpoint(m, step)
    report = tracker.report()
    found = tracker.emerged()
    assert sum(map(len, found)) == report.curves["and/emerged"][-1] > 0
    for game, rows in zip(tracker.games, found):
        for r in rows:
            assert r["words"] == [w for i, w in enumerate(game.words) if r["subset"] >> i & 1]
            assert 1 <= r["first_step"] <= 2


def test_removed_interactions_carry_their_base_and_current_values():
    rows = [[0.0, 1.0, 0.6, 0.3], [0.0, 1.0, 0.01, 0.3], [0.0, 1.0, 0.01, 0.3], [0.0, 1.0, 0.02, -0.001]]
    tracker = _plain(persistence=2)
    for step, row in zip((0, 10, 20, 30), rows):
        tracker.add_values(step, _from_interactions([row]))
    assert tracker.removed(step=10) == [[]]  # below the threshold once: not confirmed yet
    assert tracker.removed(step=20) == [[{"subset": 2, "base_value": pytest.approx(0.6), "value": pytest.approx(0.01)}]]
    last = tracker.removed()[0]  # {1} first (|I_0| = 0.6), then {0, 1} (0.3), whose removal is not confirmed yet
    assert [r["subset"] for r in last] == [2]
    with pytest.raises(ValueError, match="kind: expected one of"):
        tracker.removed("xor")


def test_sets_lists_what_each_probe_lost_and_gained_with_words(tokenizer):
    import json

    tracker = _tracker(tokenizer, persistence=1, noise_floor=None)
    for step, m in enumerate(_checkpoints(3, seed=3)):  # a seed whose last checkpoint has removals and emergences
        tracker.add_checkpoint(m, step)
    report = tracker.report()
    sets = json.loads(json.dumps(tracker.sets()))  # JSON-ready
    assert sets["step"] == 2 and sets["steps"] == [0, 1, 2]
    probes = sets["probes"]
    assert [p["prompt"] for p in probes] == report.probes["prompts"]
    assert [p["irrelevant"] for p in probes] == report.probes["irrelevant"][-1]
    assert [p["p_y"] for p in probes] == pytest.approx(report.probes["p_y"][-1])
    for name in ("removed", "emerged"):
        assert sum(len(p["and"][name]) for p in probes) == report.curves[f"and/{name}"][-1], name
    assert sum(p["and"]["preserved"] for p in probes) == report.curves["and/preserved"][-1]
    assert sum(len(p["and"]["removed"]) for p in probes) > 0 and sum(len(p["and"]["emerged"]) for p in probes) > 0
    for p in probes:
        for r in p["and"]["removed"]:
            assert r["words"] == [w for i, w in enumerate(p["words"]) if r["subset"] >> i & 1]
    assert tracker.sets(step=1)["step"] == 1
    from sftint_fast.plot import markdown

    md = markdown(report, figures=[], sets=sets)  # the report lists the strongest changes by their words
    shown = [r for p in probes for r in p["and"]["emerged"][:3] + p["and"]["removed"][:3]]
    assert shown and all("{" + ", ".join(r["words"]) + "}" in md for r in shown)
    from sftint_fast.plot import _signed, _words

    assert _words({"words": ["Hubble", "Telescope,", "a b"]}) == '{Hubble, "Telescope,", "a b"}'
    assert _words({"words": None, "subset": 5}) == "S=5"
    top = next(r for p in probes for r in p["and"]["removed"][:1])
    assert f"{_signed(top['base_value'])} → {_signed(top['value'])}" in md


@pytest.mark.parametrize("stop", [True, False])
def test_callback_stops_training_at_the_phase_boundary_when_asked(tokenizer, tmp_path, stop):
    """``stop_at_boundary``: the run ends (with a saved checkpoint) at the step whose report first has a phase
    boundary; without it the same boundary is only logged and training runs to ``max_steps``."""
    trainer = _trainer(tmp_path, max_steps=12, lr=3e-2, logging_steps=1, seed=0)
    # a boundary rule without the noise floor and significance, so a few real steps of this tiny run reach it
    tracker = _tracker(tokenizer, persistence=1, noise_floor=None, boundary_significant=False)
    callback = sf.InteractionCallback(tracker, every=2, stop_at_boundary=stop).attach(trainer)
    trainer.train()
    boundary = callback.phase_boundary
    assert boundary is not None and 0 < boundary < 12
    assert tracker.report().phase_boundary == boundary  # the tracker's own rule, not the callback's
    logged = [h["interactions/phase_boundary"] for h in trainer.state.log_history if "interactions/phase_boundary" in h]
    assert logged and set(logged) == {boundary}
    if stop:
        assert trainer.state.global_step == boundary and tracker.steps[-1] == boundary
        assert (tmp_path / "out" / f"checkpoint-{boundary}").is_dir()  # saved where it stopped
    else:
        assert trainer.state.global_step == 12 and tracker.steps[-1] == 12
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("checkpoint-*"))
    with pytest.raises(TypeError, match="stop_at_boundary: expected a bool"):
        sf.InteractionCallback(tracker, stop_at_boundary="yes")


def test_callback_warns_that_one_probe_never_reaches_a_significant_boundary(tokenizer, tmp_path, caplog):
    """One probe has no bootstrap interval, so the default significant boundary never comes: a run asked to stop at
    it says so at the start instead of training to the end in silence."""
    import logging

    trainer = _trainer(tmp_path, max_steps=1, lr=1e-3)
    tracker = SFTTracker(PROMPTS[:1], tokenizer, n_players=3, andor_method="and", min_base_py=0.0, bootstrap=20,
                         progress=False, numerics_check=False, noise_floor=None)
    sf.InteractionCallback(tracker, every=1000, stop_at_boundary=True).attach(trainer)
    with caplog.at_level(logging.WARNING, logger="sftint_fast.sft.callback"):
        trainer.train()
    assert "stop_at_boundary with one probe never stops" in caplog.text
    assert tracker.report().phase_boundary is None


def test_callback_resumed_past_its_boundary_does_not_stop_again(tokenizer, tmp_path, caplog):
    """Training stopped at the phase boundary and resumed from that checkpoint with the resumed tracker (on purpose:
    the user wants to go on) runs to ``max_steps``; before the fix it stopped at its first tracking, on the old
    boundary."""
    import logging

    out = tmp_path / "tracker"
    trainer = _trainer(tmp_path, max_steps=12, lr=3e-2, logging_steps=1, seed=0)
    options = dict(persistence=1, noise_floor=None, boundary_significant=False)
    callback = sf.InteractionCallback(_tracker(tokenizer, out, **options), every=2, stop_at_boundary=True)
    callback.attach(trainer)
    trainer.train()
    boundary = callback.phase_boundary
    assert boundary is not None and trainer.state.global_step == boundary < 12

    resumed = _trainer(tmp_path, max_steps=12, lr=3e-2, logging_steps=1, seed=0)
    tracker = _tracker(tokenizer, out, **options)
    assert tracker.steps[-1] == boundary
    callback = sf.InteractionCallback(tracker, every=2, stop_at_boundary=True).attach(resumed)
    with caplog.at_level(logging.WARNING, logger="sftint_fast.sft.callback"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / f"checkpoint-{boundary}"))
    assert resumed.state.global_step == 12 and tracker.steps[-1] == 12
    assert f"resumed past its phase boundary (step {boundary})" in caplog.text


def test_callback_stopping_at_a_save_does_not_save_that_checkpoint_again(tokenizer, tmp_path):
    """A boundary found when tracking a save (``on_save``) stops training there: the checkpoint is already saved,
    so it must not be saved a second time (``should_save`` left set after ``on_save`` makes the epoch-end save
    write it again)."""
    trainer = _trainer(tmp_path, max_steps=12, lr=3e-2, logging_steps=1, seed=0, save_steps=2)
    saved = []
    real_save = trainer._save_checkpoint
    trainer._save_checkpoint = lambda *a, **kw: saved.append(trainer.state.global_step) or real_save(*a, **kw)
    tracker = _tracker(tokenizer, persistence=1, noise_floor=None, boundary_significant=False)
    callback = sf.InteractionCallback(tracker, every=1000, stop_at_boundary=True).attach(trainer)  # saves only
    trainer.train()
    boundary = callback.phase_boundary
    assert boundary is not None and trainer.state.global_step == boundary == tracker.steps[-1]
    assert saved == list(range(2, boundary + 1, 2))  # each save once


def test_callback_resumed_from_an_earlier_checkpoint_skips_steps_already_tracked_past(tokenizer, tmp_path,
                                                                                      monkeypatch):
    """Training resumed from a checkpoint older than the tracker's last record (a resumed tracker): steps up to that
    record are skipped, not handed to add_checkpoint (which refuses a step before the last and would kill the run).
    With max_overhead the resumed schedule (from the resumed step) differs from the first run's."""
    import types

    from transformers import TrainerCallback

    from sftint_fast.sft import callback as callback_module

    clock = [0.0]  # tracking takes no time, steps 1 s: tracked every 2 steps from the last tracking
    monkeypatch.setattr(callback_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock[0] += 1.0

    def run(resume=None):
        trainer = _trainer(tmp_path, max_steps=10, lr=1e-3, examples=4, length=8, callbacks=[Steps()], save_steps=5)
        tracker = _tracker(tokenizer, tmp_path / "track", persistence=1, noise_floor=None)
        sf.InteractionCallback(tracker, every=2, max_overhead=0.25).attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, tracker

    _, tracker = run()
    assert tracker.steps == [0, 2, 4, 5, 7, 9, 10]  # 5 and 10: saves
    trainer, tracker = run(str(tmp_path / "out" / "checkpoint-5"))  # due at 7, then 8 (< 10): skipped
    assert trainer.state.global_step == 10 and tracker.steps == [0, 2, 4, 5, 7, 9, 10]


def test_callback_warns_when_a_resumed_run_tracks_its_base_mid_training(tokenizer, tmp_path, caplog):
    """Training resumed from checkpoint-2 (global_step 2 at on_train_begin) with a fresh tracker: its base (the
    step-0 reference of every removed and emerged set) is the step-2 model, not the pre-training one. Tracking goes
    on, and the warning says so and how to avoid it; a tracker that has its base already is not warned about."""
    from transformers import TrainerControl, TrainerState

    tracker = _tracker(tokenizer, tmp_path / "track", persistence=1, noise_floor=None)
    model = tiny_model("llama").train()
    for step in (2, 4):
        state = TrainerState(global_step=step)
        with caplog.at_level("WARNING", logger="sftint_fast.sft.callback"):
            sf.InteractionCallback(tracker, every=1000).on_train_begin(None, state, TrainerControl(), model=model)
    assert tracker.steps == [2, 4]
    warned = [r.getMessage() for r in caplog.records if r.name == "sftint_fast.sft.callback"]
    assert len(warned) == 1 and "step 2" in warned[0] and "not the pre-training model" in warned[0]
    assert str(tmp_path / "track") in warned[0] and "add_checkpoint(base_model, 0)" in warned[0]


def test_callback_spaces_tracking_to_keep_within_its_overhead_budget(tokenizer, tmp_path, monkeypatch):
    """max_overhead=0.25 with tracking at 9 s and training at 1 s per step (a fake clock): after the base and the
    first checkpoint (at `every`, to measure a step), each next one comes as soon as tracking stays within 25% of
    the wall time since the base: ((S + T) / f - W - T) / t steps on."""
    import types

    from transformers import TrainerCallback

    from sftint_fast.sft import callback as callback_module

    clock = [0.0]
    monkeypatch.setattr(callback_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Steps(TrainerCallback):  # runs before the interaction callback (added later)
        def on_step_end(self, args, state, control, **kwargs):
            clock[0] += 1.0

    trainer = _trainer(tmp_path, max_steps=100, lr=1e-3, examples=4, length=8, logging_steps=50, callbacks=[Steps()])
    tracker = _tracker(tokenizer, persistence=1, noise_floor=None)
    real = tracker.add_checkpoint

    def nine_seconds(m, step):
        real(m, step)
        clock[0] += 9.0

    monkeypatch.setattr(tracker, "add_checkpoint", nine_seconds)
    callback = sf.InteractionCallback(tracker, every=2, max_overhead=0.25).attach(trainer)
    trainer.train()
    # base at 0 (9 s, outside the budget); step 2 (S=9, W=11): k = (18/0.25 - 20) / 1 = 52 -> 54;
    # step 54 (S=18, W=72): k = (27/0.25 - 81) = 27 -> 81; step 81 (S=27, W=108): k = (36/0.25 - 117) = 27 -> 108;
    # the last step (100, where training ends) is tracked whatever the budget: (S=36, W=136): k = 180 - 145 -> 135
    assert tracker.steps == [0, 2, 54, 81, 100]
    assert callback.next_step == 135 and callback.seconds_first == 9.0 and callback.seconds_tracking == 36.0
    assert callback.seconds_tracking / callback.seconds_training == pytest.approx(36 / 136)
    logged = [h for h in trainer.state.log_history if "interactions/next_tracking_step" in h]
    assert [h["interactions/next_tracking_step"] for h in logged] == [2, 54, 81, 108, 135]
    assert [round(h["interactions/tracking_overhead"], 6) for h in logged[1:]] == [
        round(9 / 11, 6), round(18 / 72, 6), round(27 / 108, 6), round(36 / 136, 6)]
    with pytest.raises(ValueError, match=r"max_overhead: expected a share of the run's wall time in \(0, 1\)"):
        sf.InteractionCallback(tracker, max_overhead=1.0)
    with pytest.raises(TypeError, match="report_dir: expected a folder path or None, got int"):
        sf.InteractionCallback(tracker, report_dir=3)


def test_stop_file_callback_saves_and_stops_when_the_file_appears(tmp_path):
    """The training side of tracking elsewhere: the file sftint track --boundary-file writes stops the run at the
    step it appears, after saving a checkpoint."""
    from transformers import TrainerCallback

    stop = tmp_path / "STOP"

    class Tracker(TrainerCallback):  # stands for sftint track --watch finding the boundary during step 3
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                stop.write_text(json.dumps({"phase_boundary": 2}))

    callback = sf.StopFileCallback(stop)
    trainer = _trainer(tmp_path, max_steps=10, lr=1e-3, examples=4, length=8, callbacks=[Tracker(), callback])
    trainer.train()
    assert trainer.state.global_step == 3 and callback.stopped_by == {"phase_boundary": 2}
    assert (tmp_path / "out" / "checkpoint-3").is_dir()  # saved where it stopped
    with pytest.raises(ValueError, match="check_every: expected an int >= 1, got 0"):
        sf.StopFileCallback(stop, check_every=0)
    with pytest.raises(TypeError, match="path: expected a file path, got NoneType"):
        sf.StopFileCallback(None)


def test_stop_file_callback_reads_any_file_without_raising(tmp_path, monkeypatch):
    """`touch STOP`, bytes that are not UTF-8, a file it may not read, a file removed under it: the main process must
    never raise there (under DDP the other ranks wait for its answer), and a file that is there stops the run."""
    import pathlib
    import types

    stop = tmp_path / "STOP"
    state = types.SimpleNamespace(global_step=5, is_world_process_zero=True)

    def check(callback):
        control = types.SimpleNamespace(should_training_stop=False, should_save=False)
        callback.on_step_end(None, state, control)
        return control.should_training_stop, callback.stopped_by

    assert check(sf.StopFileCallback(stop)) == (False, None)
    stop.write_text("")
    assert check(sf.StopFileCallback(stop)) == (True, str(stop))
    stop.write_bytes(b"\xff\xfe stop now")
    assert check(sf.StopFileCallback(stop)) == (True, "\ufffd\ufffd stop now")
    real = pathlib.Path.read_text

    def refused(self, *a, **kw):
        if self == stop:
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "read_text", refused)
    stopped, why = check(sf.StopFileCallback(stop))
    assert stopped and "unreadable: PermissionError" in why

    def vanished(self, *a, **kw):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(pathlib.Path, "read_text", vanished)
    assert check(sf.StopFileCallback(stop)) == (False, None)  # removed between the look and the read


def test_resumed_games_keep_a_float64_baseline_exactly(tokenizer, tmp_path):
    model = tiny_model("llama").double()
    with pytest.raises(ValueError, match="float64 model"):  # the default float32 compute refuses it, clearly
        _tracker(tokenizer).add_checkpoint(model, 0)
    first = _tracker(tokenizer, tmp_path, compute_dtype="auto", numerics_check=True)  # "auto": its own dtype
    first.add_checkpoint(model, 0)
    assert first.numerics["compute_dtype"] == "auto" and first.numerics["engine_max_abs"] < 1e-5
    resumed = _tracker(tokenizer, tmp_path, compute_dtype="auto", numerics_check=True)
    assert len(resumed.games) == len(first.games) > 0
    for saved, game in zip(resumed.games, first.games):
        assert saved.baseline.dtype == game.baseline.dtype == torch.float64
        assert torch.equal(saved.baseline, game.baseline)
    resumed.add_checkpoint(model, 1)  # the resumed games still evaluate the same model to the same values
    assert torch.equal(resumed.records[-1].values, resumed.records[0].values)


class _Wrapper(torch.nn.Module):
    """What DDP, DataParallel, accelerate and a DeepSpeed engine look like to a callback: the model in ``.module``."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_a_ddp_wrapped_model_is_tracked_as_the_model_it_wraps(tokenizer):
    """Under DDP every rank calls add_checkpoint with its copy of the model, as the training loop holds it: wrapped
    (the class docstring's usage). It raised AttributeError: 'DistributedDataParallel' object has no attribute
    'get_input_embeddings'. A wrapper of a wrapper, and torch.compile's ``_orig_mod``, are looked through too."""
    models = _checkpoints(2)
    plain = _tracker(tokenizer, noise_floor=None, persistence=1)
    for step, model in enumerate(models):
        plain.add_checkpoint(model, step)
    wrapped = _tracker(tokenizer, noise_floor=None, persistence=1)
    wrapped.add_checkpoint(_Wrapper(models[0]), 0)
    compiled = torch.nn.Module()
    compiled._orig_mod = models[1]  # torch.compile's OptimizedModule keeps the model here
    wrapped.add_checkpoint(_Wrapper(_Wrapper(compiled)), 1)
    for got, want in zip(wrapped.records, plain.records):
        torch.testing.assert_close(got.values, want.values, rtol=0, atol=0)


@pytest.fixture
def process_group():
    """A one-process gloo group (an in-memory store, no port): what FSDP and DTensor need to shard a model."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"))


def _fsdp2(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _zero3(model):
    for param in model.parameters():  # DeepSpeed ZeRO-3: every rank holds a partition, the module an empty tensor
        param.ds_id, param.ds_numel, param.ds_shape = 0, param.numel(), param.shape
        param.data = torch.empty(0)
    return model


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("shard, name", [(_fsdp1, "FSDP"), (lambda m: _Wrapper(_fsdp1(m)), "FSDP"), (_fsdp2, "FSDP"),
                                         (_zero3, "ZeRO-3")], ids=["fsdp1", "fsdp1-wrapped", "fsdp2", "zero3"])
def test_a_model_sharded_across_processes_is_refused_clearly(tokenizer, tmp_path, process_group, shard, name):
    """A model whose weights are sharded across the ranks (FSDP, FSDP2 / DTensor, DeepSpeed ZeRO-3), as the Trainer
    hands it to callbacks, cannot be evaluated by one rank: it failed deep in the engine ("got mixed torch.Tensor and
    DTensor", "setStorage: ... out of bounds", or evaluated the partitions), now a ValueError saying why and what to
    do instead, before anything is saved; the callback refuses it before training, even with a resumed tracker."""
    from transformers import TrainerControl, TrainerState

    model = shard(tiny_model("llama"))
    tracker = _tracker(tokenizer, tmp_path / "track")
    with pytest.raises(ValueError, match=f"model: expected a model whose full weights are on this process, got one "
                                         f"sharded .*{name}.*sftint track"):
        tracker.add_checkpoint(model, 0)
    assert tracker.steps == [] and not list((tmp_path / "track").glob("step_*"))
    tracker.add_checkpoint(tiny_model("llama"), 0)
    callback = sf.InteractionCallback(tracker, every=1000)
    with pytest.raises(ValueError, match=f"sharded .*{name}"):
        callback.on_train_begin(None, TrainerState(global_step=0), TrainerControl(), model=model)


@pytest.mark.parametrize("options, ignored", [
    (dict(andor_method="and", qthres=0.1), "qthres"),
    (dict(andor_method="and", andor_niter=500), "andor_niter"),
    (dict(andor_method="lp", andor_lr=1e-3), "andor_lr"),
    (dict(andor_method="lp", warm_start=True), "warm_start"),
    (dict(andor_method="and", noise_floor=None, noise_draws=8), "noise_draws"),
])
def test_an_option_the_method_ignores_is_warned_about_and_a_run_saved_with_it_resumes(tmp_path, options, ignored):
    """An option given other than its default that the chosen method never reads (``qthres`` with the plain-Harsanyi
    solver, SGD settings with the LP, ``noise_draws`` without a noise floor) was dropped without a word (the CLI
    refuses them). A warning names it; the run still opens and a run saved with it still resumes (a refusal would
    lock such runs out: the option is part of their saved configuration)."""
    import warnings

    with pytest.warns(UserWarning, match=f"{ignored}=.* is ignored with "):
        tracker = SFTTracker(None, out_dir=tmp_path, progress=False, **options)
    tracker.add_values(0, torch.randn(2, 8, generator=torch.Generator().manual_seed(0)))
    with pytest.warns(UserWarning, match=f"{ignored}="):
        assert SFTTracker(None, out_dir=tmp_path, progress=False, **options).steps == [0]
    defaults = {k: v for k, v in options.items() if k in ("andor_method", "noise_floor")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SFTTracker(None, progress=False, **defaults)  # the method alone, every other option its default: no warning


def test_resume_with_a_tokenizer_that_tokenises_the_heldout_pairs_otherwise_is_refused(tmp_path, caplog):
    """The held-out loss of (prompt, answer) pairs is computed on the tokens the tracker's tokenizer gives them at each
    checkpoint: a run resumed with another chat template silently changed the loss curve (its minimum is the
    early-stopping point). The tokens are recorded and compared on resume; a run saved without them resumes."""
    first, other = make_tokenizer(), make_tokenizer()
    first.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                           "{% if add_generation_prompt %}<s> assistant {% endif %}")
    other.chat_template = first.chat_template.replace("</s> {% endfor %}", "{% endfor %}")
    pairs = [("the big cat", "sat on the mat")]
    base, step = _checkpoints(2)
    run = tmp_path / "run"
    _tracker(first, run, heldout=pairs).add_checkpoint(base, 0)
    copy_of_first = make_tokenizer()
    copy_of_first.chat_template = first.chat_template
    assert _tracker(copy_of_first, run, heldout=pairs).steps == [0]
    with pytest.raises(ValueError, match=r"differs in \['heldout_tokens_sha256'\].*tokenizer"):
        _tracker(other, run, heldout=pairs)
    config = json.loads((run / "config.json").read_text())
    del config["heldout_tokens_sha256"]  # a run saved before the tokens were recorded
    (run / "config.json").write_text(json.dumps(config))
    resumed = _tracker(other, run, heldout=pairs)
    assert resumed.steps == [0] and "cannot be checked" in caplog.text


def test_gamma_shares_an_interaction_only_where_its_sign_agrees_with_the_reference():
    # METHOD.md 4: G_S = 1[S ∈ Ω_ref]·1[sign I(S) = sign I_ref(S)]; {1} is salient in both, of opposite signs
    ref = [[0.0, 1.0, -1.0, 1.0]]
    base = [[0.0, 1.0, 1.0, 1.0]]
    tracker = _plain(reference={"I_and": torch.tensor(ref, dtype=torch.float64)})
    tracker.add_values(0, _from_interactions(base))
    assert tracker.report().curves["and/preserved_gamma"][0] == pytest.approx((1.0 + 1.0) / 3.0)


def _I3(entries):
    """``(1, 8)`` float64 interactions of 3 players, zero but at the given bitmasks."""
    out = torch.zeros(1, 8, dtype=torch.float64)
    for mask, value in entries.items():
        out[0, mask] = value
    return out


def test_phase_boundary_with_a_reference_waits_for_unshared_emergence():
    """METHOD.md 6: with a reference, the boundary needs emerged interactions *below the base's γ-share* (unshared);
    an emergence the reference shares is not one. Without a reference every emergence counts."""
    ref = _I3({0b001: 1.0, 0b010: 1.0, 0b100: 1.0})
    rows = [_I3({0b001: 1.0, 0b010: 1.0, 0b011: 1.0}),                 # base
            _I3({0b001: 1.0, 0b010: 1.0, 0b100: 1.0}),                 # {0,1} removed, {2} emerges: shared
            _I3({0b001: 1.0, 0b010: 1.0, 0b100: 1.0, 0b110: 1.0})]     # {1,2} emerges: not in the reference
    boundaries = {}
    for name, reference in (("with", {"I_and": ref}), ("without", None)):
        tracker = _plain(reference=reference, boundary_significant=False)
        for step, row in zip((0, 10, 20), rows):
            tracker.add_values(step, _from_interactions(row.tolist()))
        report = tracker.report()
        assert report.curves["and/removed_new"] == [0.0, 1.0, 0.0]
        assert report.curves["and/emerged_new"] == [0.0, 1.0, 1.0]
        boundaries[name] = report.phase_boundary
    assert boundaries == {"with": 20, "without": 10}


def test_resume_with_add_values_brings_back_the_reference_floors_and_warm_start(tmp_path):
    """Resumed after 3 of 4 checkpoints, a run's report equals the uninterrupted run's: the saved reference (given as
    interactions, read at the base only), the noise floors of the saved checkpoints (the third has one, persistence 2)
    and the SGD state that warm-starts the next checkpoint all come back from out_dir."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 8, generator=g, dtype=torch.float64)
    values = [base + 0.3 * t * torch.randn(3, 8, generator=g, dtype=torch.float64) for t in range(4)]
    reference = {"I_and": sf.harsanyi(base - base[:, :1]) + 0.2 * torch.randn(3, 8, generator=g, dtype=torch.float64)}
    opts = dict(andor_method="sgd", andor_niter=40, andor_lr=1e-2, warm_start=True, reference=reference,
                bootstrap=50, min_base_py=0.0, progress=False)
    full = SFTTracker(None, out_dir=tmp_path / "full", **opts)
    for t, v in enumerate(values):
        full.add_values(t * 10, v)
    expected = full.report().to_dict()
    assert expected["gamma_available"] and any(expected["curves"]["all/removed_new_floor"])  # what the test reads

    first = SFTTracker(None, out_dir=tmp_path / "run", **opts)
    for t, v in enumerate(values[:3]):
        first.add_values(t * 10, v)
    del first
    resumed = SFTTracker(None, out_dir=tmp_path / "run", **opts)
    assert resumed.steps == [0, 10, 20]
    resumed.add_values(30, values[3])
    got = resumed.report().to_dict()
    for report in (got, expected):  # timings differ
        report["floor_cost"] = report["cost"] = report["curves"]["seconds_tracking"] = None
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)


def test_resume_on_another_day_with_a_chat_template_that_reads_the_clock_is_not_refused(tmp_path, monkeypatch):
    """Chat templates that render today's date (Llama 3.2/3.3, Granite: ``strftime_now``) gave the held-out pairs other
    tokens on another day, so the recorded tokens refused the identical run resumed the next day ("use a new
    out_dir"). The clock is pinned for the record; another template is still refused."""
    import datetime

    import transformers.utils.chat_template_utils as templates

    tokenizer = make_tokenizer()
    # today's date, in words this tokenizer has: the parity of the day number
    today = "{{ 'sun' if (strftime_now('%s') | int // 86400) % 2 else 'moon' }}"
    tokenizer.chat_template = ("<s> " + today + " </s> {% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} "
                               "</s> {% endfor %}{% if add_generation_prompt %}<s> assistant {% endif %}")
    pairs = [("the big cat", "sat on the mat")]
    base, = _checkpoints(1)
    run = tmp_path / "run"
    _tracker(tokenizer, run, heldout=pairs).add_checkpoint(base, 0)

    class Tomorrow(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime.now(tz) + datetime.timedelta(days=1)

    monkeypatch.setattr(templates, "datetime", Tomorrow)
    assert _tracker(tokenizer, run, heldout=pairs).steps == [0]
    other = make_tokenizer()
    other.chat_template = tokenizer.chat_template.replace("</s> {% endfor %}", "{% endfor %}")
    with pytest.raises(ValueError, match=r"differs in \['heldout_tokens_sha256'\]"):
        _tracker(other, run, heldout=pairs)


def _base_and_reference_games(tokenizer, monkeypatch, probe):
    """The base game and the reference game the tracker builds for one probe (a reference model of its own)."""
    from sftint_fast.game import Game

    built = []
    real = Game.from_text.__func__
    recorded = classmethod(lambda cls, *a, **k: built.append(real(cls, *a, **k)) or built[-1])
    monkeypatch.setattr(Game, "from_text", recorded)
    tracker = SFTTracker([probe], tokenizer, n_players=2, andor_method="and", min_base_py=0.0, bootstrap=100,
                         progress=False, numerics_check=False, noise_floor=None,
                         reference=(tiny_model("llama", seed=3), tokenizer))
    tracker.add_checkpoint(_checkpoints(1)[0], 0)
    base, ref = built
    return base, ref


@pytest.mark.parametrize("players", [(2, 4), ((13, 15), (20, 23))])
def test_reference_players_are_the_probe_words_not_earlier_text_that_contains_them(tokenizer, monkeypatch, players):
    """The reference game's players are found from the base game's words: "is" (or the character span "is") must not
    be taken from inside "this", nor "sky" from inside "skyline". With the base tokenizer, the same token spans."""
    probe = Probe(prompt="this skyline is the sky", players=players)
    base, ref = _base_and_reference_games(tokenizer, monkeypatch, probe)
    assert base.words == ref.words == ("is", "sky")
    assert ref.player_spans == base.player_spans == ((2, 3), (4, 5))  # were (0, 1) "this" and (1, 2) "skyline"


def test_reference_players_are_the_probe_words_not_an_earlier_word_of_the_same_text(tokenizer, monkeypatch):
    """A word-index probe naming the second "the" of its prompt: the reference game's player is that word, not the
    first "the" (the whole-word search from the prompt's start took the first)."""
    base, ref = _base_and_reference_games(tokenizer, monkeypatch, Probe(prompt="the cat saw the dog", players=(3, 4)))
    assert base.words == ref.words == ("the", "dog")
    assert ref.player_spans == base.player_spans == ((3, 4), (4, 5))  # was (0, 1): the first "the"


def test_add_values_tracks_every_row_and_the_report_says_min_base_py_was_not_applied(caplog):
    """min_base_py drops probes where add_checkpoint builds the games; add_values tracks the rows it is given. Its
    report listed every row as kept under a min_base_py they did not meet, with nothing saying no filter ran."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 16, generator=g, dtype=torch.float64)
    tracker = SFTTracker(None, andor_method="and", bootstrap=20, noise_draws=1, progress=False)  # min_base_py 0.5
    with caplog.at_level("WARNING"):
        tracker.add_values(0, values, p_y=torch.tensor([0.9, 0.1, 0.2]))
    tracker.add_values(1, values + 0.01, p_y=torch.tensor([0.9, 0.1, 0.2]))
    assert "2 of 3 rows have a base p_y under min_base_py=0.5" in caplog.text
    report = tracker.report()
    assert report.probes["kept"] == [0, 1, 2]  # the rows tracked: all of them
    assert any("min_base_py=0.5 was not applied" in note and "2 of 3" in note for note in report.notes), report.notes
    confident = SFTTracker(None, andor_method="and", bootstrap=20, noise_draws=1, progress=False)
    confident.add_values(0, values, p_y=torch.tensor([0.9, 0.6, 0.7]))
    assert not any("min_base_py" in note for note in confident.report().notes)


def test_callback_refuses_a_tracker_writing_into_the_trainers_output_dir(tokenizer, tmp_path):
    """The Trainer's save_model writes the model's config.json into output_dir, over the tracker's config.json of
    the same name: the run went on and its resume failed later. Refused before training; a subfolder is fine."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    tracker = _tracker(tokenizer, tmp_path / "out" / ".", persistence=1, noise_floor=None)
    with pytest.raises(ValueError, match=r"expected a folder of the tracker's own, got the Trainer's output_dir"):
        sf.InteractionCallback(tracker, every=1000).on_train_begin(args, TrainerState(), TrainerControl(), model=None)
    assert tracker.steps == []
    inner = _tracker(tokenizer, tmp_path / "out" / "interactions", persistence=1, noise_floor=None)
    sf.InteractionCallback(inner, every=1000).on_train_begin(args, TrainerState(), TrainerControl(), model=None)


@pytest.mark.parametrize("players, message", [((0, 1, 2, 9), r"word indices in \[0, 8\), received 9"),
                                              (((0, 3), (4, 4)), r"non-empty character span")])
def test_a_probe_whose_players_do_not_fit_its_prompt_is_named(tokenizer, players, message):
    """A probes file row naming word 9 of an 8-word prompt (or an empty character span): the error said what was wrong
    but not which of the probes, the one thing a user needs to find it in a long probes file."""
    probes = [Probe(PROMPTS[1]), Probe(PROMPTS[0], players=players)]
    tracker = SFTTracker(probes, tokenizer, n_players=4, andor_method="and", min_base_py=0.0, progress=False,
                         numerics_check=False)
    with pytest.raises(ValueError, match=r"probes\[1\] \('the big cat sat on the red mat'\): .*" + message):
        tracker.add_checkpoint(tiny_model("llama"), 0)


def test_heldout_pairs_cut_at_the_sft_length_are_said_by_index(caplog):
    """Held-out pairs are cut to SFT_MAX_LENGTH tokens (chat template included), as the demo trains: a long answer
    was scored on its first tokens only, and one behind a long prompt not at all, without a word."""
    from sftint_fast.sft.probes import SFT_MAX_LENGTH
    from sftint_fast.sft.tracker import _heldout_tokens_digest

    tokenizer = make_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                               "{% if add_generation_prompt %}<s> assistant {% endif %}")
    words = " ".join(["the cat"] * SFT_MAX_LENGTH)
    pairs = [("the big cat", "sat on the mat"), ("the big cat", words), (words, "sat on the mat")]
    with caplog.at_level("WARNING", logger="sftint_fast.sft.tracker"):
        digest = _heldout_tokens_digest(pairs, tokenizer)
    said = [r.getMessage() for r in caplog.records if r.name == "sftint_fast.sft.tracker"]
    assert len(said) == 1 and f"pairs [1, 2] are longer than {SFT_MAX_LENGTH} tokens" in said[0], said
    assert "pairs [2] keep no answer token" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="sftint_fast.sft.tracker"):
        assert _heldout_tokens_digest(pairs[:1], tokenizer) is not None
    assert not caplog.records
    import hashlib

    expected = [sft_example(tokenizer, *pair) for pair in pairs]  # the digest is of what the loss sees
    assert digest == hashlib.sha256(repr([(e["input_ids"], e["labels"]) for e in expected]).encode()).hexdigest()[:16]
