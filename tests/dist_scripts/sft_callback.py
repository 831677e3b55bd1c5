"""Train a tiny random llama for 3 steps with ``InteractionCallback``; launched by tests/test_sft_ddp.py.

Plain ``python`` = one process, global batch 8; under ``torchrun --nproc_per_node 2`` = gloo DDP on CPU,
4 examples per rank (the same global batch of the same 8 examples every step). Rank 0 writes the logged
``interactions/*`` metrics per step to ``--out``; every rank writes ``<out>.rank<r>.json`` with the games it
evaluated, its tracker's steps and a checksum of its recorded values.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import tiny_model  # noqa: E402

import sftint_fast as sf  # noqa: E402
import sftint_fast.engine  # noqa: E402
from sftint_fast import distributed  # noqa: E402

WORDS = ("the a cat dog sat on mat quickly red blue green big small house tree river what is capital city of "
         "france paris why how when where who did run jump over under sky sun moon star").split()
PROMPTS = ["the big cat sat on the red mat", "a small dog did run over the blue river",
           "what is the capital city of france", "why did the cow jump", "the sun and the moon sat over a tree"]
EXAMPLES = 8


def make_tokenizer():
    """A word-level tokenizer over ``WORDS`` (ids 4..), with <pad>/<s>/</s>/<unk> at 0..3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def main() -> None:
    from transformers import Trainer, TrainingArguments

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", required=True, help="folder for the Trainer output and the tracker's out_dir")
    parser.add_argument("--stop-at-boundary", action="store_true",
                        help="up to 10 steps, a boundary rule without floor/significance, stop_at_boundary=True")
    parser.add_argument("--max-overhead", type=float, default=None,
                        help="up to 12 steps, InteractionCallback(max_overhead=...): tracked when due")
    parser.add_argument("--stop-file", default=None,
                        help="up to 12 steps; rank 0 writes this file at step 2; StopFileCallback stops every rank")
    args = parser.parse_args()
    distributed.init_from_env("gloo")
    world = distributed.world_size()
    evaluated: list[str] = []
    real = sftint_fast.engine.evaluate_games  # what evaluate_many runs on each group of games

    def counting_evaluate_games(model, games, **kwargs):
        evaluated.extend(" ".join(game.words) for game in games)
        return real(model, games, **kwargs)

    sftint_fast.engine.evaluate_games = counting_evaluate_games
    model = tiny_model("llama").train()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(4, 40, (12,), generator=g)), "labels": ids.clone()}
            for _ in range(EXAMPLES)]
    targs = TrainingArguments(output_dir=str(Path(args.work) / "trainer"), per_device_train_batch_size=EXAMPLES // world,
                              max_steps=10 if args.stop_at_boundary else 12 if (args.max_overhead or args.stop_file) else 3, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                              use_cpu=True, disable_tqdm=True, ddp_backend="gloo" if world > 1 else None, seed=0)
    stopper = None
    if args.stop_file:
        from transformers import TrainerCallback

        class WriteAtStep2(TrainerCallback):  # only the main process writes it, and only it looks
            def on_step_end(self, a, state, control, **kwargs):
                if state.global_step == 2 and distributed.is_main_process():
                    Path(args.stop_file).write_text('{"phase_boundary": 1}')

        stopper = sf.StopFileCallback(args.stop_file)
    trainer = Trainer(model=model, args=targs, train_dataset=data,
                      callbacks=[WriteAtStep2(), stopper] if stopper else None)
    tracker = sf.SFTTracker(PROMPTS, make_tokenizer(), n_players=4, andor_method="and", min_base_py=0.0,
                            bootstrap=50, progress=False, numerics_check=False, persistence=1,
                            out_dir=Path(args.work) / "track",
                            **({"noise_floor": None, "boundary_significant": False} if args.stop_at_boundary else {}))
    callback = sf.InteractionCallback(tracker, every=1, stop_at_boundary=args.stop_at_boundary,
                                      max_overhead=args.max_overhead).attach(trainer)
    trainer.train()
    rank = distributed.rank()
    values = torch.stack([r.values for r in tracker.records])
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps({
        "evaluated": evaluated, "steps": tracker.steps, "games": len(tracker.games),
        "global_step": trainer.state.global_step, "phase_boundary": callback.phase_boundary,
        "next_step": callback.next_step, "stopped_by": stopper.stopped_by if stopper else None,
        "values_sum": values.sum().item(), "values_abs_sum": values.abs().sum().item()}))
    if distributed.is_main_process():
        logged = {h["step"]: {k: v for k, v in h.items() if k.startswith("interactions/")}
                  for h in trainer.state.log_history if "interactions/removed" in h}
        losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
        Path(args.out).write_text(json.dumps({"metrics": logged, "losses": losses}, indent=1))
    del trainer, callback, model  # the DDP wrapper holds the process group
    distributed.shutdown()


if __name__ == "__main__":
    main()
