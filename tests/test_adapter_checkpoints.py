"""PEFT adapter checkpoints (``adapter_config.json`` only, what a LoRA ``Trainer`` saves): ``load_causal_lm`` applies
them over their base and merges, ``sftint track`` tracks them like full checkpoints, and the mismatches are refused."""
from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_model
from dist_scripts.sft_callback import make_tokenizer
from test_trie import make_game

import sftint_fast as sf
from sftint_fast.cli import main
from sftint_fast.models import is_adapter_folder, load_causal_lm, load_model, tokenizer_folder
from sftint_fast.sft.tracker import SFTTracker

peft = pytest.importorskip("peft", reason="the peft extra (pip install -e '.[peft]')")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

PROMPTS = ["the big cat sat on the red mat", "a small dog did run over the blue river",
           "what is the capital city of france", "why did the cow jump"]
FAST = ["--n-players", "3", "--andor-method", "and", "--min-base-py", "0", "--bootstrap", "20", "--noise-floor", "none",
        "--seed", "3"]


def _lora_over(base_dir, seed: int):
    """A LoRA model over the saved base (as a Trainer would build it: base loaded from its folder), random adapter."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                             init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    return peft.get_peft_model(base, config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base/ (model + tokenizer) and ckpt/checkpoint-{10,20}/ (adapter weights only, no tokenizer), with the
    in-memory PeftModels they were saved from."""
    root = tmp_path_factory.mktemp("adapters")
    tiny_model("llama", initializer_range=0.2).save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    adapted = {}
    for step, seed in [(10, 1), (20, 2)]:
        model = _lora_over(root / "base", seed)
        model.save_pretrained(root / "ckpt" / f"checkpoint-{step}")
        adapted[step] = model
    (root / "probes.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    return root, adapted


def test_an_adapter_checkpoint_loads_merged_and_matches_the_adapted_model(folders):
    root, adapted = folders
    ckpt = root / "ckpt" / "checkpoint-10"
    assert is_adapter_folder(ckpt) and not is_adapter_folder(root / "base")
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(root / "base")
    merged = load_causal_lm(ckpt)
    unmerged = load_causal_lm(ckpt, merge=False)
    assert not isinstance(merged, peft.PeftModel) and isinstance(unmerged, peft.PeftModel)
    base = load_causal_lm(root / "base")
    game = make_game("spread_n5", seed=4)
    with torch.no_grad():
        reference = sf.evaluate(adapted[10], game, method="naive", progress=False)
        got = sf.evaluate(merged, game, method="trie", progress=False)
        got_unmerged = sf.evaluate(unmerged, game, method="trie", progress=False)
        plain = sf.evaluate(base, game, method="naive", progress=False)
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_unmerged, reference, atol=2e-5, rtol=1e-5)
    assert (reference - plain).abs().max() > 1e-2  # the adapter is in the numbers


def test_load_model_takes_the_tokenizer_from_the_base_when_the_adapter_has_none(folders):
    root, _ = folders
    ckpt = root / "ckpt" / "checkpoint-20"
    assert tokenizer_folder(ckpt) == str(root / "base") and tokenizer_folder(root / "base") == str(root / "base")
    model, tok = load_model(str(ckpt))
    assert tok.convert_tokens_to_ids("cat") == make_tokenizer().convert_tokens_to_ids("cat")
    assert model.get_input_embeddings().num_embeddings == 128


def test_track_cli_on_adapter_checkpoints_matches_the_tracker_on_the_adapted_models(folders, tmp_path, capsys):
    root, adapted = folders
    out = tmp_path / "run"
    rc = main(["track", "--base", str(root / "base"), "--checkpoints", str(root / "ckpt" / "checkpoint-*"),
               "--probes", str(root / "probes.jsonl"), "--out", str(out), "--device", "cpu", *FAST])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == [0, 10, 20]

    tracker = SFTTracker(PROMPTS, make_tokenizer(), n_players=3, andor_method="and", min_base_py=0.0, bootstrap=20,
                         noise_floor=None, seed=3, progress=False)
    tracker.add_checkpoint(load_causal_lm(root / "base"), 0)
    for step in (10, 20):
        tracker.add_checkpoint(adapted[step], step)  # the unmerged PeftModel, as in the training loop
    expected = tracker.report().to_dict()
    for key in ("and/removed", "and/preserved", "and/emerged"):
        assert report["curves"][key] == expected["curves"][key], key
    assert report["curves"]["p_y_mean"] == pytest.approx(expected["curves"]["p_y_mean"], rel=1e-4)


def test_adapter_mismatches_are_refused_with_their_reason(folders, tmp_path, capsys):
    root, _ = folders
    other = tmp_path / "other-base"  # another hidden size: the adapter's LoRA matrices do not fit it
    tiny_model("llama", hidden_size=48, intermediate_size=96).save_pretrained(other)
    with pytest.raises(ValueError, match="expected an adapter trained on the base .* do not fit that model"):
        load_causal_lm(root / "ckpt" / "checkpoint-10", base=other)

    rc = main(["track", "--base", str(root / "ckpt" / "checkpoint-10"), "--checkpoints",
               str(root / "ckpt" / "checkpoint-20"), "--probes", str(root / "probes.jsonl"), "--out",
               str(tmp_path / "run"), *FAST])
    assert rc == 2 and "base: expected a full model folder (config.json), got the PEFT adapter folder" in \
        capsys.readouterr().err

    empty = tmp_path / "ckpt" / "checkpoint-30"
    empty.mkdir(parents=True)
    (empty / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"expected a model folder \(config.json\) or a PEFT adapter folder "
                                         r"\(adapter_config.json\), got \['trainer_state.json'\]"):
        load_causal_lm(empty)

    hub = tmp_path / "hub-adapter"
    hub.mkdir()
    config = json.loads((root / "ckpt" / "checkpoint-10" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"
    (hub / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="base_model_name_or_path to be a local model folder, got "
                                         "'HuggingFaceTB/SmolLM2-135M'; pass the base model folder explicitly"):
        load_model(str(hub))


def test_a_prompt_learning_adapter_is_refused(folders, tmp_path):
    root, _ = folders
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model.save_pretrained(tmp_path / "prompt")
    with pytest.raises(ValueError, match="got the prompt-learning adapter .*PROMPT_TUNING"):
        load_causal_lm(tmp_path / "prompt")


def test_track_cli_on_the_checkpoints_a_lora_trainer_saves(folders, tmp_path, capsys):
    """The real format: a transformers ``Trainer`` fine-tuning a LoRA model saves checkpoint-<step>/ folders holding
    the adapter, optimizer and trainer state; ``sftint track`` reads them and the last one is the trained model."""
    from transformers import Trainer, TrainingArguments

    root, _ = folders
    model = _lora_over(root / "base", seed=5).train()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(4, 40, (12,), generator=g)), "labels": ids.clone()} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=5e-2, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, logging_steps=1)
    Trainer(model=model, args=args, train_dataset=data).train()
    saved = sorted(p.name for p in (tmp_path / "trainer").iterdir())
    assert saved == ["checkpoint-2", "checkpoint-4"] and is_adapter_folder(tmp_path / "trainer" / "checkpoint-4")

    out = tmp_path / "run"
    rc = main(["track", "--base", str(root / "base"), "--checkpoints", str(tmp_path / "trainer" / "checkpoint-*"),
               "--probes", str(root / "probes.jsonl"), "--out", str(out), "--device", "cpu", *FAST])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["steps"] == [0, 2, 4]
    # the Trainer's log, from the last checkpoint's trainer_state.json, beside the interactions
    state = json.loads((tmp_path / "trainer" / "checkpoint-4" / "trainer_state.json").read_text())
    logged = json.loads((out / "training_log.json").read_text())
    assert logged["source"].endswith("checkpoint-4/trainer_state.json")
    assert logged["series"]["loss"] == [[e["step"], e["loss"]] for e in state["log_history"] if "loss" in e]
    assert len(logged["series"]["loss"]) == 4
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert logged["at_tracked_steps"]["train_loss"] == pytest.approx([None, sum(losses[:2]) / 2, sum(losses[2:]) / 2])
    assert "| train loss |" in (out / "report.md").read_text()
    tracker = SFTTracker(PROMPTS, make_tokenizer(), n_players=3, andor_method="and", min_base_py=0.0, bootstrap=20,
                         noise_floor=None, seed=3, progress=False, out_dir=out / "tracker")
    assert tracker.steps == [0, 2, 4]  # resumed from the CLI's files
    fresh = SFTTracker(PROMPTS, make_tokenizer(), n_players=3, andor_method="and", min_base_py=0.0, bootstrap=20,
                       noise_floor=None, seed=3, progress=False)
    fresh.add_checkpoint(load_causal_lm(root / "base"), 0)
    fresh.add_checkpoint(model.eval(), 4)  # the model the Trainer ended with, adapter unmerged
    torch.testing.assert_close(tracker.records[-1].values, fresh.records[-1].values, atol=1e-4, rtol=1e-4)
    assert (tracker.records[-1].values - tracker.records[0].values).abs().max() > 1e-2  # training moved it


def test_explain_cli_on_an_adapter_whose_base_is_given_with_base(folders, tmp_path, capsys):
    """An adapter whose config names a hub id (trained elsewhere): --base says where the base is; the saved v are
    the adapted model's."""
    import shutil

    from safetensors.torch import load_file

    root, adapted = folders
    moved = tmp_path / "moved-adapter"
    shutil.copytree(root / "ckpt" / "checkpoint-10", moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    argv = ["explain", "--model", str(moved), "--text", "the big cat sat on the red mat", "--players", "1,2,3,6",
            "--method", "naive", "--device", "cpu", "--top", "3"]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert "pass the base model folder explicitly (--base)" in capsys.readouterr().err
    assert main([*argv, "--base", str(root / "base"), "--out", str(tmp_path / "run")]) == 0
    saved = load_file(tmp_path / "run" / "v.safetensors")["v"]
    model, tok = load_model(str(moved), base=root / "base")
    game = sf.Game.from_text(model, tok, "the big cat sat on the red mat", players=[1, 2, 3, 6])
    with torch.no_grad():
        expected = sf.evaluate(adapted[10], game, method="naive", progress=False)
    torch.testing.assert_close(saved, expected, atol=1e-4, rtol=1e-4)
    assert main([*argv, "--base", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2
    assert "base: expected 'default', 'gemma' or a local model folder" in capsys.readouterr().err


def test_a_cut_off_adapter_checkpoint_is_refused_with_its_path(folders, tmp_path):
    """An adapter whose adapter_model.safetensors was cut off (a LoRA Trainer's save killed or still being copied):
    a ValueError naming the folder (it was the safetensors library's own error, naming no file, and a traceback
    out of `sftint track`), not the "do not fit that model" of a mismatched base."""
    import shutil

    root, _ = folders
    ckpt = tmp_path / "checkpoint-10"
    shutil.copytree(root / "ckpt" / "checkpoint-10", ckpt)
    weights = ckpt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"checkpoint {re.escape(str(ckpt))}: expected complete weight files"):
        load_causal_lm(ckpt, base=root / "base")
