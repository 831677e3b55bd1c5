"""InteractionCallback with TRL's SFTTrainer (issue 7): skipped only when TRL is not installed."""
import pytest
import torch

import sftint_fast as sf
from conftest import tiny_model
from test_sft_tracker import _tracker
from test_sft_tracker import tokenizer  # noqa: F401  (the module-scoped fixture, shared)

trl = pytest.importorskip("trl")


def test_callback_with_trl_sft_trainer_logs_metrics(tokenizer, tmp_path):  # noqa: F811
    from datasets import Dataset

    model = tiny_model("llama").train()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(4, 40, (12,), generator=g).tolist()} for _ in range(16)]
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": True},
                         remove_unused_columns=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer)
    tracker = _tracker(tokenizer, tmp_path / "track", persistence=1)
    sf.InteractionCallback(tracker, every=2).attach(trainer)
    trainer.train()
    assert tracker.steps == [0, 2, 4]
    logged = [h for h in trainer.state.log_history if "interactions/removed" in h]
    assert [h["step"] for h in logged] == [0, 2, 4]
    assert {"interactions/emerged", "interactions/removed_excess"} <= set(logged[-1])
    assert any("loss" in h for h in trainer.state.log_history)  # the Trainer's own loss log survives
    assert model.training
