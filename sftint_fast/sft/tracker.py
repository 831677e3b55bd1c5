"""Checkpoint-by-checkpoint tracking of AND-OR interactions through SFT (METHOD.md sections 6 and 7).

``SFTTracker.add_checkpoint(model, step)`` evaluates every probe's game on ``model``, decomposes the
values, updates the removed / preserved / emerged sets (:mod:`sftint_fast.sft.noise` has the set logic),
measures a noise floor for the changes and saves the checkpoint under ``out_dir``. ``report()`` returns a
frozen :class:`TrackReport` with every curve, bootstrap intervals and the phase boundary.

Games (players, baseline, target) are built once, from the first (base) checkpoint, and fixed for the run.
``add_values`` feeds game values directly (used by the offline path and by tests on synthetic games).

Under ``torch.distributed`` (``torchrun``, DDP) every rank calls ``add_checkpoint`` with its copy of the
model: the probes are split across the ranks and their values gathered to every rank
(:func:`sftint_fast.evaluate_many`), every rank then decomposes the same values so all ranks hold the same
records, and only the main process writes ``out_dir`` (a folder every rank can read, for resuming).
The model may come wrapped as a training loop holds it (DDP, accelerate, ``torch.compile``: :func:`unwrap_model`);
one sharded across processes (FSDP, DeepSpeed ZeRO-3) is refused. Under accelerate's mixed precision (a ``Trainer``
with ``bf16``/``fp16``) every evaluation runs the model's own forward, not the autocast one: the game values in
``compute_dtype``, the held-out loss in the model's dtype.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from sftint_fast import distributed
from sftint_fast.interactions.harsanyi import harsanyi
from sftint_fast.ops.transforms import popcount
from sftint_fast.sft import noise as N
from sftint_fast.sft.probes import SFT_MAX_LENGTH, Probe, as_probes, heldout_batches, sft_example

logger = logging.getLogger(__name__)
#: The noise floor's algorithm, saved in ``config.json``: a run resumed under another one would report its saved
#: steps' floors beside floors drawn another way. 2: warm-started SGD replicates, the iid null as noise on ``v``
#: (absent = 1, the earlier one; order-matched cold-start floors are the same up to rounding).
FLOOR_VERSION = 2

AndOrMethod = Literal["sgd", "lp", "and"]
#: the files a tracker writes in its out_dir
_TRACKER_FILE = re.compile(r"config\.json|games\.(?:json|safetensors)|reference\.safetensors"
                           r"|step_\d+\.(?:json|safetensors)")
SETS = ("removed", "preserved", "emerged")
#: Variants of the first probe that the numerics check evaluates three times (naive, trie, the other precision).
NUMERICS_VARIANTS = 16


@dataclass(frozen=True)
class TrackerConfig:
    """Every option that changes what the tracker computes (saved with each run, compared on resume)."""

    n_players: int = 8
    baseline: str = "pad"
    qthres: float = 0.04
    tau: float = 0.05
    andor_method: str = "sgd"
    andor_niter: int = 20000
    andor_lr: float = 1e-6
    warm_start: bool = False
    seed: int = 0
    noise_floor: str | None = "order_matched"
    noise_draws: int = 3
    threshold_reference: str = "base"
    hysteresis: bool = True
    persistence: int = 2
    compute_dtype: str = "float32"
    engine_method: str = "auto"
    min_base_py: float = 0.5
    irrelevant_fraction: float = 0.1
    boundary_removed_fraction: float = 0.9
    boundary_significant: bool = True
    bootstrap: int = 1000
    chat: bool = False
    target: str = "base"
    chat_template_kwargs: dict[str, Any] | None = None

    def validate(self) -> None:
        choices = {
            "andor_method": ("sgd", "lp", "and"),
            "noise_floor": ("order_matched", "iid", None),
            "threshold_reference": ("base", "checkpoint", "absolute"),
            "compute_dtype": ("float32", "tf32", "bfloat16", "auto"),
            "engine_method": ("auto", "naive", "trie"),
            "target": ("base", "answer"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        positive_ints = ("n_players", "noise_draws", "persistence", "bootstrap")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        for name in ("tau", "qthres", "min_base_py", "irrelevant_fraction", "boundary_removed_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        # checked here, not where they are used: a bad option found at the first checkpoint or at report()
        # would already be saved in out_dir/config.json, and a corrected tracker refused as another run
        if self.tau == 0 or (self.threshold_reference != "absolute" and self.tau >= 1):
            interval = "> 0" if self.threshold_reference == "absolute" else "in the open interval (0, 1)"
            raise ValueError(f"tau: expected a number {interval} with threshold_reference="
                             f"{self.threshold_reference!r}, got {self.tau!r}")
        for name in ("min_base_py", "irrelevant_fraction"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name}: expected a number in [0, 1], got {getattr(self, name)!r}")
        if not 0 < self.boundary_removed_fraction <= 1:
            raise ValueError(f"boundary_removed_fraction: expected a number in (0, 1], got {self.boundary_removed_fraction!r}")
        if not isinstance(self.andor_niter, int) or isinstance(self.andor_niter, bool) or self.andor_niter < 0:
            raise ValueError(f"andor_niter: expected an int >= 0, got {self.andor_niter!r}")
        lr = self.andor_lr
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"andor_lr: expected a finite number > 0, got {lr!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed: expected an int, got {type(self.seed).__name__}")
        if not -2**63 <= self.seed < 2**64:  # torch.Generator.manual_seed's range (the bootstrap's generator)
            raise ValueError(f"seed: expected an int in [-2**63, 2**64), got {self.seed}")
        for name in ("warm_start", "hysteresis", "boundary_significant", "chat"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        from sftint_fast.game import check_chat_template_kwargs

        check_chat_template_kwargs(self.chat_template_kwargs, chat=self.chat)

    def ignored(self) -> dict[str, str]:
        """Options set other than their defaults that the chosen methods never read, each with the reason."""
        unread = {}
        if self.andor_method != "sgd":
            reason = (f"andor_method={self.andor_method!r}: the tracked sets are not SGD's (only solver_overlap() "
                      "reads it)")
            unread.update(andor_niter=reason, andor_lr=reason,
                          warm_start=f"andor_method={self.andor_method!r} (a warm start is SGD's)")
        if self.andor_method == "and":
            unread["qthres"] = ("andor_method='and': AND interactions alone, no OR part or noise term q (only "
                                "solver_overlap() reads it)")
        if self.noise_floor is None:
            unread["noise_draws"] = "noise_floor=None (no noise floor is drawn)"
        default = TrackerConfig()
        return {name: reason for name, reason in unread.items() if getattr(self, name) != getattr(default, name)}

    @property
    def kinds(self) -> tuple[str, ...]:
        """Interaction kinds tracked: AND and OR, or AND alone for the plain-Harsanyi solver."""
        return ("and",) if self.andor_method == "and" else ("and", "or")


@dataclass(frozen=True)
class TrackReport:
    """All curves of one tracked run (plain lists, index = checkpoint) and the phase boundary.

    ``curves`` maps names to per-checkpoint lists; names are ``<kind>/<quantity>`` with kind ``and``, ``or``
    or ``all``. ``and/`` and ``or/`` cover one kind's sets (METHOD.md keeps them apart); ``all/`` covers both: its
    counts are the kinds' counts summed, and its set measures (``all/<set>_rho``, ``_gamma``, ``_mean_abs``,
    ``_mean_order``, ``_strength_*``) those of each probe's AND and OR sets taken together as one set of
    interactions, so that they describe the interactions ``all/<set>`` counts (``all/<set>_gamma`` only where
    the reference has every kind). Counts and set measures (ρ, γ, mean ``|I|``, order) cover the probes whose
    target is still relevant at that checkpoint; ``<kind>/<count>_irrelevant`` counts the flagged probes' apart
    (METHOD.md section 7.5). ``intervals`` maps a curve name to ``(lo, hi)`` bootstrap lists.
    ``probes`` holds per-probe tables (``p_y``, ``gain`` = ``v(N)−v(∅)``, ``irrelevant`` flags), each
    ``[checkpoint][probe]``; ``kept`` the probes' indices, or every row's for values fed with
    :meth:`SFTTracker.add_values` (``min_base_py`` dropped none of them: ``notes`` says so where it would have).
    ``phase_boundary`` is a step (not an index) or None. ``reference``: the reference the γ curves were measured
    against (``source``, and ``sha256``: its model's config and weights, or its interactions' values), None without.
    """

    steps: tuple[int, ...]
    config: dict[str, Any]
    curves: dict[str, list]
    intervals: dict[str, tuple[list[float], list[float]]]
    probes: dict[str, Any]
    phase_boundary: int | None
    heldout_loss_min_step: int | None
    solver: str
    gamma_available: bool
    floor_cost: dict[str, float]
    numerics: dict[str, Any] | None
    notes: tuple[str, ...] = field(default_factory=tuple)
    cost: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["intervals"] = {k: [list(lo), list(hi)] for k, (lo, hi) in self.intervals.items()}
        out["steps"] = list(self.steps)
        out["notes"] = list(self.notes)
        if "heldout_loss" in out["curves"]:
            out["curves"]["heldout_loss"] = [loss_to_json(x) for x in out["curves"]["heldout_loss"]]
        return _json_safe(out)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrackReport:
        """Reads what :meth:`save` wrote (``report.json``, or a run folder holding one); non-finite numbers come
        back as None, as they were saved, except held-out losses (NaN or inf: :func:`loss_to_json`)."""
        target = Path(path)
        if target.is_dir():
            target = target / "report.json"
        try:
            data = json.loads(target.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{target}: expected a tracking report (report.json of sftint track / demo), could not "
                             f"read it: {err}") from None
        names = [f.name for f in fields(cls)]
        optional = {"notes", "cost", "reference"}  # fields with defaults (reports saved before they existed)
        missing = [name for name in names if name not in optional and name not in data] if isinstance(data, dict) \
            else names
        if missing:
            raise ValueError(f"{target}: expected a tracking report (report.json of sftint track / demo), missing "
                             f"{missing}")
        try:
            curves = dict(data["curves"])
            if "heldout_loss" in curves:
                curves["heldout_loss"] = [loss_from_json(x) for x in curves["heldout_loss"]]
            return cls(**{**{k: data[k] for k in names if k in data}, "steps": tuple(data["steps"]),
                          "intervals": {k: (list(lo), list(hi)) for k, (lo, hi) in data["intervals"].items()},
                          "notes": tuple(data.get("notes", ())), "curves": curves})
        except (TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{target}: expected a tracking report (report.json of sftint track / demo), got a "
                             f"malformed one: {err}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Writes ``report.json`` (or ``path`` when it names a .json file) atomically; returns the path."""
        target = Path(path)
        if target.suffix != ".json":
            target = target / "report.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(target, json.dumps(self.to_dict(), indent=1))
        return target


@dataclass
class _Record:
    """What is saved per checkpoint: everything the report needs without recomputation."""

    step: int
    values: torch.Tensor                       # (B, 2^n) float64
    interactions: dict[str, torch.Tensor]     # kind -> (B, 2^n) float64
    p_y: torch.Tensor                          # (B,)
    heldout_loss: float | None
    floors: dict[str, torch.Tensor]           # "<kind>/<count>" -> (K, B)
    extra: dict[str, torch.Tensor]            # solver state (p, q) for warm starts
    meta: dict[str, Any]


def numerics_subsets(num_players: int, seed: int) -> torch.Tensor | None:
    """The variants the numerics check evaluates: None (all) for ``2^n <= NUMERICS_VARIANTS``, else the empty and
    full sets plus random others (:func:`sftint_fast.bench.sample_subsets` of ``seed``), sorted."""
    from sftint_fast.bench import sample_subsets

    total = 1 << num_players
    if total <= NUMERICS_VARIANTS:
        return None
    drawn = sample_subsets(num_players, NUMERICS_VARIANTS, seed=seed)
    others = drawn[(drawn != 0) & (drawn != total - 1)][:NUMERICS_VARIANTS - 2]
    return torch.cat([torch.tensor([0, total - 1]), others]).sort().values


class SFTTracker:
    """Tracks the salient AND/OR interactions of fixed probes across the checkpoints of one SFT run.

    Args:
        probes: prompts (strings, dicts ``{"prompt", "answer"?, "players"?}`` or :class:`Probe`), or None
            when values are fed with :meth:`add_values`.
        tokenizer: the base model's tokenizer (None with ``probes=None``).
        n_players: players per probe (the first ``n`` content words unless the probe names them).
        baseline: ``"pad"``/``"unk"``/tensor, taken from the base model and fixed.
        qthres, andor_method, andor_niter, andor_lr, warm_start: the decomposition (``"and"`` = plain
            Harsanyi, no OR part). One set other than its default that the method ignores (``qthres`` with ``"and"``,
            the SGD settings with ``"lp"``, ``noise_draws`` with ``noise_floor=None``) is warned about
            (:meth:`TrackerConfig.ignored`).
        tau, threshold_reference, hysteresis, persistence: the set logic (module :mod:`~sftint_fast.sft.noise`);
            ``tau`` in ``(0, 1)`` (a share of ``max |I|``), or any number ``> 0`` with ``"absolute"``. The defaults
            are METHOD.md's (hysteresis on, persistence 2); ``hysteresis=False, persistence=3`` gave a lower floor
            relative to the observed changes on three real SmolLM2 runs (README, "Tracking SFT").
        reference: ``(model, tokenizer)`` of a reference model, or its saved interactions (a dict or a
            safetensors path with ``I_and`` and optionally ``I_or`` of shape ``(B, 2^n)``); γ needs one.
        heldout: ``(prompt, answer)`` pairs or batches ``{"input_ids", "labels"}`` for the held-out loss.
        out_dir: each checkpoint is saved there; a new tracker on the same folder resumes (ValueError when its
            options differ, or its tokenizer gives the held-out pairs other tokens; a tensor ``baseline`` is
            compared by the sha256 of its float64 values, except for runs saved before that digest was recorded,
            which resume with any tensor and a warning). A reference model is compared by its weights and config
            less the entries that change no value (``use_cache``, ``dtype``, the attention implementation): the
            same reference loaded otherwise resumes; a run saved by an earlier version, whose digest hashed those
            entries, resumes with the reference as it was loaded then.
        noise_floor: ``"order_matched"``, ``"iid"`` or None; ``noise_draws`` draws per checkpoint.
        compute_dtype, engine_method: passed to :func:`sftint_fast.evaluate`; ``compute_dtype="auto"`` runs each
            model in its own dtype (a float64 or bfloat16 model as it is). It alone sets the precision of the game
            values, also inside an autocast region or a ``Trainer``'s ``bf16``/``fp16`` mixed precision.
        min_base_py: probes whose base target probability is lower are dropped at the base checkpoint (by
            :meth:`add_checkpoint`; :meth:`add_values` tracks every row it is given).
        irrelevant_fraction: a probe whose ``p_y`` falls under this fraction of its base value is flagged
            and its changes are counted apart.
        boundary_removed_fraction, boundary_significant: the phase-boundary rule
            (:func:`~sftint_fast.sft.noise.phase_boundary`); with ``boundary_significant`` its counts need a
            probe-bootstrap lower bound above 0, which one probe cannot give (its report then has no boundary, and
            a note says why).
        bootstrap: probe-level bootstrap resamples behind ``report().intervals``.
        seed: seeds the noise-floor draws, the bootstrap and the variants of the numerics check.
        chat: wrap each probe in the tokenizer's chat template (as a user message, generation prompt added).
        chat_template_kwargs: with ``chat``, the chat template's variables (saved with the run, compared on resume),
            e.g. ``{"enable_thinking": False}`` for a thinking model (Qwen3, SmolLM3): left unset, its probes' target
            is scored where the model opens ``<think>`` (a warning says so). The reference model's games and the
            held-out ``(prompt, answer)`` pairs use them too (a template whose generation prompt so rendered does not
            start its assistant turn is refused: the answer's tokens could not be told apart).
        target: ``"base"``: the base model's greedy next token, fixed for the run; ``"answer"``: each probe's
            answer text, teacher-forced (every probe needs one).
        numerics_check: at the base checkpoint, measure the engine's (trie vs naive) and the precision's
            (bf16 vs fp32) error on the first probe (``report().numerics``).
        progress: tqdm bars while evaluating and decomposing.
    """

    def __init__(
        self,
        probes: Sequence[Any] | None,
        tokenizer: Any = None,
        *,
        n_players: int = 8,
        baseline: Literal["pad", "unk"] | torch.Tensor = "pad",
        qthres: float = 0.04,
        tau: float = 0.05,
        andor_method: AndOrMethod = "sgd",
        andor_niter: int = 20000,
        andor_lr: float = 1e-6,
        warm_start: bool = False,
        reference: Any = None,
        heldout: Sequence[Any] | None = None,
        out_dir: str | os.PathLike | None = None,
        seed: int = 0,
        noise_floor: Literal["order_matched", "iid"] | None = "order_matched",
        noise_draws: int = 3,
        threshold_reference: N.ThresholdReference = "base",
        hysteresis: bool = True,
        persistence: int = 2,
        compute_dtype: Literal["float32", "tf32", "bfloat16", "auto"] = "float32",
        engine_method: Literal["auto", "naive", "trie"] = "auto",
        min_base_py: float = 0.5,
        irrelevant_fraction: float = 0.1,
        boundary_removed_fraction: float = 0.9,
        boundary_significant: bool = True,
        bootstrap: int = 1000,
        chat: bool = False,
        target: Literal["base", "answer"] = "base",
        chat_template_kwargs: dict[str, Any] | None = None,
        numerics_check: bool = True,
        progress: bool = True,
    ) -> None:
        self.config = TrackerConfig(
            n_players=n_players, baseline=baseline if isinstance(baseline, str) else "tensor", qthres=qthres,
            tau=tau, andor_method=andor_method, andor_niter=andor_niter, andor_lr=andor_lr, warm_start=warm_start,
            seed=seed, noise_floor=noise_floor, noise_draws=noise_draws, threshold_reference=threshold_reference,
            hysteresis=hysteresis, persistence=persistence, compute_dtype=compute_dtype, engine_method=engine_method,
            min_base_py=min_base_py, irrelevant_fraction=irrelevant_fraction,
            boundary_removed_fraction=boundary_removed_fraction, boundary_significant=boundary_significant,
            bootstrap=bootstrap, chat=chat, target=target,
            chat_template_kwargs=dict(chat_template_kwargs) if isinstance(chat_template_kwargs, dict)
            else chat_template_kwargs,
        )
        self.config.validate()
        for name, reason in self.config.ignored().items():
            # a warning, not a refusal: the option is part of the saved configuration, and a run saved with it resumes
            warnings.warn(f"{name}={getattr(self.config, name)!r} is ignored with {reason}", UserWarning, stacklevel=2)
        if not isinstance(baseline, torch.Tensor) and baseline not in ("pad", "unk"):
            raise ValueError(f"baseline: expected 'pad', 'unk' or a tensor, got {baseline!r}")
        if not (reference is None or isinstance(reference, (str, os.PathLike, dict))
                or (isinstance(reference, (tuple, list)) and len(reference) == 2)):
            raise TypeError(f"reference: expected (model, tokenizer), a dict of tensors or a safetensors path, got "
                            f"{type(reference).__name__}")
        if probes is not None and tokenizer is None:
            raise ValueError("tokenizer: expected the base model's tokenizer when probes are given, got None")
        for name, flag in (("numerics_check", numerics_check), ("progress", progress)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {flag!r}")
        if heldout is not None and not isinstance(heldout, (str, bytes, dict)):
            heldout = list(heldout)  # once: an iterator is read here
        if heldout is not None and (isinstance(heldout, (str, bytes, dict)) or not heldout):
            # an empty list would silently give no held-out loss; a string or one batch would be iterated
            raise ValueError(f"heldout: expected a non-empty list of (prompt, answer) pairs or batches "
                             f"{{'input_ids', 'labels'}}, or None, got {heldout!r}")
        self.probes: list[Probe] = as_probes(probes) if probes is not None else []
        self.tokenizer = tokenizer
        self._baseline = baseline
        self._reference_source = reference
        self._reference_sha: str | None = None  # _reference_digest of a (model, tokenizer) reference, once
        self._heldout = list(heldout) if heldout is not None else None
        # the held-out loss of (prompt, answer) pairs is computed on the tokens this tokenizer gives them, at every
        # checkpoint: recorded, so that a run resumed with another tokenizer (or chat template) is not mixed in
        self._heldout_tokens = _heldout_tokens_digest(self._heldout, tokenizer, self.config.chat_template_kwargs)
        self.numerics_check = numerics_check
        self.progress = progress
        self.out_dir = Path(out_dir) if out_dir is not None else None

        self.games: list[Any] | None = None
        self.kept: list[int] | None = None
        self.signature: dict[str, Any] | None = None
        self.records: list[_Record] = []
        self._costs: dict[str, float] | None = None  # add_checkpoint's timings, for the record add_values makes
        self.states: list[dict[str, N.SetState]] = []
        self.reference: dict[str, torch.Tensor] | None = None
        self.numerics: dict[str, Any] | None = None
        if self.out_dir is not None:
            self._open_out_dir()

    # ------------------------------------------------------------------------------------------------ public

    @property
    def steps(self) -> list[int]:
        """Steps of the checkpoints recorded so far (saved ones included after a resume)."""
        return [r.step for r in self.records]

    def add_checkpoint(self, model: Any, step: int) -> None:
        """Evaluate every probe on ``model`` (the first call: the base model) and record checkpoint ``step``.

        Runs under ``torch.no_grad`` with the model in eval mode and restores its train mode. A step already
        saved under ``out_dir`` is skipped. Under ``torch.distributed`` it is collective: call it on every
        rank with the same ``step`` (the probes are evaluated across the ranks). ``model`` may be wrapped as a training
        loop holds it (DDP, accelerate, torch.compile: :func:`unwrap_model`). Raises ValueError for a model of another
        vocabulary size or architecture than the base, one sharded across processes (FSDP, DeepSpeed ZeRO-3), or a
        step not after the last one.
        """
        if not self.probes:
            raise ValueError("add_checkpoint: this tracker has no probes; pass probes (and a tokenizer) or use add_values")
        _check_step_type(step)
        if step in self.steps:
            logger.info("step %d is already recorded; skipped", step)
            return
        self._check_step(step)
        model = unwrap_model(model)
        signature = _model_signature(model)
        if self.signature is not None and signature != self.signature:
            diff = {k: (self.signature.get(k), signature.get(k)) for k in signature if signature.get(k) != self.signature.get(k)}
            raise ValueError(f"model: expected the base model's architecture {self.signature}, got a model that differs in "
                             f"(base, given): {diff}")
        base, reference = self.games is None, self.reference
        try:
            self._track_checkpoint(model, step, signature)
        except BaseException:
            if base and step not in self.steps:
                self._forget_base(reference)
            raise

    def _track_checkpoint(self, model: Any, step: int, signature: dict[str, Any]) -> None:
        from sftint_fast.baseline import _eval_mode

        t0 = time.perf_counter()
        with _eval_mode(model):  # every submodule's own mode back after: a frozen (eval) part stays in eval
            with torch.no_grad():
                if self.games is None:  # the base: its values come with the probes that are kept
                    self.signature = signature
                    values = self._build_games(model)
                else:
                    values = self._evaluate(model)
                py = self._target_probability(model, values)
                t1 = time.perf_counter()
                loss = self._heldout_loss(model) if self._heldout else None
                t2 = time.perf_counter()
                if not self.records and self._reference_source is not None and self.reference is None:
                    self.reference = self._reference_interactions(values)
        self._costs = {"seconds_evaluate": t1 - t0, "seconds_heldout": t2 - t1, "variants": int(values.numel()),
                       "seconds_reference": time.perf_counter() - t2}
        try:
            self.add_values(step, values, heldout_loss=loss, p_y=py)
        finally:
            self._costs = None

    def add_values(self, step: int, values: torch.Tensor, *, heldout_loss: float | None = None,
                   p_y: torch.Tensor | None = None) -> None:
        """Record checkpoint ``step`` from game values ``(B, 2^n)`` (one row per probe, bitmask-indexed).

        ``p_y`` ``(B,)`` defaults to ``sigmoid(v(N))`` (the target probability for a one-token log-odds game).
        The first call is the base checkpoint; it also reads a ``reference`` given as saved interactions (a
        ``(model, tokenizer)`` reference needs :meth:`add_checkpoint`). Every row given is tracked: ``min_base_py``
        drops probes only where :meth:`add_checkpoint` builds the games (rows under it are warned about here and
        noted in the report).
        """
        _check_step_type(step)
        if step in self.steps:
            logger.info("step %d is already recorded; skipped", step)
            return
        self._check_step(step)
        values = _check_values(values, self.records[0].values.shape if self.records else None)
        py = torch.sigmoid(values[:, -1]) if p_y is None else _check_p_y(p_y, values.shape[0])
        heldout_loss = _check_loss(heldout_loss)
        if not self.records and self.reference is None and self._reference_source is not None:
            if not isinstance(self._reference_source, (str, os.PathLike, dict)):
                raise ValueError("reference: a (model, tokenizer) reference is evaluated by add_checkpoint; with "
                                 "add_values pass its interactions (a dict or a safetensors path with 'I_and')")
            self.reference = self._reference_interactions(values)
        t0 = time.perf_counter()
        previous = self.records[-1] if self.records else None
        interactions, extra = self._decompose(values, init=previous.extra if previous and self.config.warm_start else None)
        decompose_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        floors, rows = self._floors(values)
        floor_s = time.perf_counter() - t1
        meta = {"step": int(step), "solver": self.solver, "seconds_decompose": decompose_s, "seconds_floor": floor_s,
                "floor_rows_decomposed": rows, "heldout_loss": heldout_loss, **(self._costs or {})}
        record = _Record(step=int(step), values=values, interactions=interactions, p_y=py, heldout_loss=heldout_loss,
                         floors=floors, extra=extra, meta=meta)
        if not self.records and self.games is None:
            below = int((py < self.config.min_base_py).sum())
            if below:
                logger.warning("add_values tracks every row it is given: %d of %d rows have a base p_y under "
                               "min_base_py=%g (it drops probes only in add_checkpoint)", below, py.shape[0],
                               self.config.min_base_py)
        self._ingest(record)
        if len(self.records) == 1:
            self._warn_zero_thresholds()
        if self._writes:
            try:
                self._save_record(record)
            except BaseException:  # not saved: not recorded (a retry of this step would be skipped, and lost)
                self.records.pop()
                self.states.pop()
                raise

    def _warn_zero_thresholds(self) -> None:
        """A probe whose base interactions are all 0 (a constant game) gets the threshold ``τ · 0 = 0``: every later
        non-zero interaction, rounding noise included, would count as salient and emerge. Said once, at the base."""
        c = self.config
        if c.threshold_reference == "absolute" or self.records[0].values.shape[-1] < 2:
            return
        for kind in c.kinds:
            rows = (self.states[0][kind].base_threshold[:, 0] == 0).nonzero().flatten().tolist()
            if rows:
                names = [self.kept[r] for r in rows] if self.kept is not None else rows
                warnings.warn(f"{kind.upper()} interactions of probe(s) {names} are all 0 at the base (a constant "
                              f"game): their salience threshold is tau * 0 = 0, so any non-zero interaction at a "
                              f"later checkpoint counts as emerged; drop these probes or use "
                              f"threshold_reference='absolute'", UserWarning, stacklevel=3)

    @property
    def solver(self) -> str:
        """Which decomposition produced the sets, e.g. ``"sgd(niter=20000, lr=1e-06)"``."""
        c = self.config
        if c.andor_method == "sgd":
            return f"sgd(niter={c.andor_niter}, lr={c.andor_lr:g}{', warm start' if c.warm_start else ''})"
        return "lp(highs)" if c.andor_method == "lp" else "and(harsanyi only)"

    def solver_overlap(self) -> dict[str, float]:
        """Jaccard overlap of the base model's salient sets from the LP and SGD solvers, per kind."""
        if not self.records:
            raise ValueError("solver_overlap: expected a recorded base checkpoint, got none")
        values = self.records[0].values
        out = {}
        sets = {}
        for method in ("lp", "sgd"):
            inter, _ = _decompose(values, method=method, config=self.config, progress=self.progress)
            reference = "absolute" if self.config.threshold_reference == "absolute" else "checkpoint"  # = base here
            sets[method] = {k: N.initial_state(inter[k], tau=self.config.tau, reference=reference).base
                            for k in ("and", "or")}
        for kind in ("and", "or"):
            a, b = sets["lp"][kind], sets["sgd"][kind]
            union = (a | b).sum().item()
            out[kind] = (a & b).sum().item() / union if union else math.nan
        return out

    def emerged(self, kind: str = "and", step: int | None = None) -> list[list[dict[str, Any]]]:
        """The emerged set ``E_t`` of checkpoint ``step`` (default: the last), per probe: one dict per interaction
        with its ``subset`` bitmask, the players' ``words`` (when the tracker built the games), ``first_step`` (the
        checkpoint where it first appeared: its onset, ``persistence - 1`` checkpoints before the one that
        confirmed it) and its ``value`` ``I(S)`` at ``step``; strongest first."""
        t, state = self._state_at("emerged", kind, step)
        inters, steps = self.records[t].interactions[kind], self.steps
        return self._rows(state.emerged, lambda b, mask: {
            "first_step": steps[int(state.first_emerged[b, mask])], "value": float(inters[b, mask])}, key="value")

    def removed(self, kind: str = "and", step: int | None = None) -> list[list[dict[str, Any]]]:
        """The removed set ``R_t = Ω_0 \\ Ω_t`` of checkpoint ``step`` (default: the last), per probe: one dict per
        interaction with its ``subset`` bitmask, the players' ``words`` (when the tracker built the games), its
        ``base_value`` ``I_0(S)`` (where it was salient) and its ``value`` ``I_t(S)`` at ``step``; strongest at the
        base first."""
        t, state = self._state_at("removed", kind, step)
        base, now = self.records[0].interactions[kind], self.records[t].interactions[kind]
        return self._rows(state.removed, lambda b, mask: {
            "base_value": float(base[b, mask]), "value": float(now[b, mask])}, key="base_value")

    def sets(self, step: int | None = None) -> dict[str, Any]:
        """Which interactions SFT removed and which emerged by checkpoint ``step`` (default: the last), per probe
        and kind, with their words: a JSON-ready dict (``sftint track`` / ``demo`` save it as ``sets.json``).

        ``{"step", "steps", "probes": [{"prompt", "words", "p_y", "irrelevant", "<kind>": {"preserved": count,
        "removed": [...], "emerged": [...]}}]}``, the lists as :meth:`removed` and :meth:`emerged` give them.
        """
        t, _ = self._state_at("sets", self.config.kinds[0], step)
        py, base_py = self.records[t].p_y.double(), self.records[0].p_y.double()
        irrelevant = (py < self.config.irrelevant_fraction * base_py).tolist()
        out = []
        for b in range(py.shape[0]):
            built = self.games is not None and self.kept is not None
            out.append({"prompt": self.probes[self.kept[b]].prompt if built else None,
                        "words": list(self.games[b].words) if self.games is not None else None,
                        "p_y": float(py[b]), "irrelevant": bool(irrelevant[b])})
        for kind in self.config.kinds:
            removed, emerged = self.removed(kind, self.steps[t]), self.emerged(kind, self.steps[t])
            preserved = self.states[t][kind].preserved.sum(-1).tolist()
            for b, row in enumerate(out):
                row[kind] = {"preserved": int(preserved[b]), "removed": removed[b], "emerged": emerged[b]}
        return {"step": self.steps[t], "steps": self.steps, "probes": out}

    def save_sets(self, path: str | os.PathLike, step: int | None = None) -> Path:
        """Writes :meth:`sets` as JSON to ``path`` (atomically); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(path, json.dumps(self.sets(step), indent=1))
        return path

    def _state_at(self, what: str, kind: str, step: int | None) -> tuple[int, Any]:
        if not self.records:
            raise ValueError(f"{what}: expected at least the base checkpoint, got none")
        if kind not in self.config.kinds:
            raise ValueError(f"kind: expected one of {list(self.config.kinds)}, received {kind!r}")
        steps = self.steps
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise ValueError(f"step: expected a recorded step {steps}, received {step!r}")
        t = steps.index(step)
        return t, self.states[t][kind]

    def _rows(self, members: torch.Tensor, fields: Any, *, key: str) -> list[list[dict[str, Any]]]:
        out = []
        for b in range(members.shape[0]):
            words = list(self.games[b].words) if self.games is not None else None
            rows = []
            for mask in members[b].nonzero().flatten().tolist():
                row = {"subset": mask, **fields(b, mask)}
                if words is not None:
                    row["words"] = [w for i, w in enumerate(words) if mask >> i & 1]
                rows.append(row)
            out.append(sorted(rows, key=lambda r: -abs(r[key])))
        return out

    def report(self) -> TrackReport:
        """All curves so far, their probe-bootstrap intervals and the phase boundary."""
        if not self.records:
            raise ValueError("report: expected at least the base checkpoint, got none")
        return _build_report(self)

    # --------------------------------------------------------------------------------------------- internals

    def _forget_base(self, reference: Any) -> None:
        """Undoes what a refused base checkpoint set up (games, signature, numerics, a reference it evaluated), in
        memory and in ``out_dir``: a retry builds them again from the model it is given, with its checks."""
        self.games = self.kept = self.signature = self.numerics = None
        names = ["games.json", "games.safetensors"]
        if reference is None and self.reference is not None:
            self.reference = None
            names.append("reference.safetensors")
        if self._writes:
            if not self.records:  # the folder keeps nothing of this run: a rerun with corrected options may take it
                names.append("config.json")
            for name in names:
                (self.out_dir / name).unlink(missing_ok=True)

    @property
    def _writes(self) -> bool:
        """Whether this process saves to ``out_dir`` (the main process only, under ``torch.distributed``)."""
        return self.out_dir is not None and distributed.is_main_process()

    def _check_step(self, step: int) -> None:
        _check_step_type(step)
        if self.records and step <= self.records[-1].step:
            raise ValueError(f"step: expected a step after the last recorded one ({self.records[-1].step}), got {step}")

    def _decompose(self, values: torch.Tensor, *, init: dict[str, torch.Tensor] | None) -> tuple[dict, dict]:
        return _decompose(values, method=self.config.andor_method, config=self.config, progress=self.progress, init=init)

    def _floors(self, values: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        """Null counts for the checkpoint about to be added (METHOD.md 7.1); ``(K, B)`` per count."""
        c = self.config
        t = len(self.records)
        if c.noise_floor is None or t < c.persistence:
            return {}, 0
        anchor = t - c.persistence
        later = [r.values for r in self.records[anchor + 1:]] + [values]
        earlier = [r.values for r in self.records[:anchor]]
        # seeded per checkpoint so a resumed run draws exactly what an uninterrupted one would
        generator = torch.Generator().manual_seed((c.seed * 1_000_003 + t) % 2**64)  # manual_seed takes < 2**64
        fakes = N.null_values(self.records[anchor].values, later, earlier=earlier, kind=c.noise_floor,
                              draws=c.noise_draws, generator=generator)                    # (p, K, B, 2^n)
        p, k, b, size = fakes.shape
        if c.warm_start and c.andor_method == "sgd":
            # the observed chain's decomposition: each replicate warm-started from the one before it, the first from
            # the anchor's (p, q); a cold start would change sets the observed chain keeps (a floor too low)
            parts, init = [], {name: x.repeat(k, 1) for name, x in self.records[anchor].extra.items()}
            for j in range(p):
                part, init = _decompose(fakes[j].reshape(k * b, size), method="sgd", config=c, progress=False,
                                        init=init)
                parts.append(part)
            inter = {kind: torch.cat([part[kind] for part in parts]) for kind in c.kinds}
        else:
            inter, _ = _decompose(fakes.reshape(p * k * b, size), method=c.andor_method, config=c, progress=False)
        counts: dict[str, torch.Tensor] = {}
        for kind in c.kinds:
            fake = inter[kind].reshape(p, k * b, size)
            start = _repeat_state(self.states[anchor][kind], k)
            state = start
            before = start
            for j in range(p):
                before = state
                state = N.step_state(state, fake[j], index=anchor + j + 1, tau=c.tau, reference=c.threshold_reference,
                                     hysteresis=c.hysteresis, persistence=c.persistence)
            removed, emerged = N.new_changes(before, state)
            counts[f"{kind}/removed_new"] = removed.sum(-1).reshape(k, b).double()
            counts[f"{kind}/emerged_new"] = emerged.sum(-1).reshape(k, b).double()
            if self.reference is not None:
                shared = _shared(fake[-1], self.reference, kind, c.tau, threshold_reference=c.threshold_reference,
                                 _repeat=k)
                counts[f"{kind}/emerged_unshared_new"] = (emerged & ~shared).sum(-1).reshape(k, b).double()
        return counts, p * k * b

    def _ingest(self, record: _Record) -> None:
        c = self.config
        t = len(self.records)
        states = {}
        for kind in c.kinds:
            inter = record.interactions[kind]
            if t == 0:
                states[kind] = N.initial_state(inter, tau=c.tau, reference=c.threshold_reference)
            else:
                states[kind] = N.step_state(self.states[-1][kind], inter, index=t, tau=c.tau, reference=c.threshold_reference,
                                            hysteresis=c.hysteresis, persistence=c.persistence)
        self.records.append(record)
        self.states.append(states)

    # ---------------------------------------------------------------------------------------- model side

    def _build_games(self, model: Any) -> torch.Tensor:
        """Builds the probes' games on the base model, drops those under ``min_base_py``; returns the kept
        games' values ``(B, 2^n)`` (the base checkpoint's, evaluated once)."""
        from sftint_fast.game import Game

        c = self.config
        games, kept = [], []
        for i, probe in enumerate(self.probes):
            target = probe.answer if c.target == "answer" else None
            if c.target == "answer" and not probe.answer:
                raise ValueError(f"probes[{i}]: target='answer' needs an answer, got none for {probe.prompt!r}")
            players: Any = "words" if probe.players is None else probe.players
            kwargs: dict[str, Any] = {"n_players": c.n_players} if probe.players is None else {}
            if probe.players is not None and probe.players and isinstance(probe.players[0], (tuple, list)):
                kwargs["span_unit"] = "chars"
            try:
                game = Game.from_text(model, self.tokenizer, probe.prompt, players=players, baseline=self._baseline,
                                      target=target, chat=c.chat, chat_template_kwargs=c.chat_template_kwargs,
                                      **kwargs)
            except (ValueError, TypeError) as err:
                if isinstance(err, TypeError) or not str(err).startswith("n_players"):
                    # which probe: the message alone does not say which row of a probes file to mend
                    kind = TypeError if isinstance(err, TypeError) else ValueError
                    raise kind(f"probes[{i}] ({probe.prompt[:40]!r}): {err}") from err
                logger.warning("probe %d dropped (%s): %r", i, err, probe.prompt)
                continue
            if game.num_players != c.n_players:
                logger.warning("probe %d has %d players, expected %d; dropped: %r", i, game.num_players, c.n_players,
                               probe.prompt)
                continue
            games.append(game)
            kept.append(i)
        if not games:
            raise ValueError(f"probes: expected at least one probe with {c.n_players} players, got none")
        self.games, self.kept = games, kept
        values = self._evaluate(model)
        py = self._target_probability(model, values)
        keep = (py >= c.min_base_py).tolist()
        if not any(keep):
            raise ValueError(f"probes: no probe has base p_y >= min_base_py={c.min_base_py} (got p_y {py.tolist()}); "
                             "use confident probes or lower min_base_py")
        dropped = [self.kept[i] for i, k in enumerate(keep) if not k]
        if dropped:
            logger.info("dropped %d probe(s) with base p_y < %g: %s", len(dropped), c.min_base_py, dropped)
        self.games = [g for g, k in zip(self.games, keep) if k]
        self.kept = [i for i, k in zip(self.kept, keep) if k]
        if self.numerics_check:
            self.numerics = self._numerics(model)
        if self._writes:
            self._save_games()
        return values[torch.tensor(keep)]

    def _evaluate(self, model: Any) -> torch.Tensor:
        return self._evaluate_games(model, self.games)

    def _target_probability(self, model: Any, values: torch.Tensor) -> torch.Tensor:
        """``p_y = p(y | x)`` of each game's target on the unmasked prompt, ``(B,)`` float64.

        A one-token target's is ``sigmoid(v(N))`` (``v`` is its log-odds). An answer of ``m > 1`` tokens
        (``target="answer"``) has ``v(N) = Σ_k logit p(y_k | x, y_<k)``, which is no probability; its ``p_y`` is
        ``Π_k p(y_k | x, y_<k)``, from one more forward pass of the full prompt per probe."""
        import dataclasses

        import sftint_fast as sf

        py = torch.sigmoid(values[:, -1].double())
        longer = [i for i, g in enumerate(self.games) if g.target.numel() > 1]
        if not longer:
            return py
        full = torch.tensor([(1 << self.games[0].num_players) - 1])
        games = [dataclasses.replace(self.games[i], value=_answer_log_prob(self.games[i].target)) for i in longer]
        rows = sf.evaluate_many(model, games, method="naive", subsets=full, progress=False,
                                compute_dtype=self._compute_dtype)
        py[longer] = torch.stack([row.cpu().double()[0] for row in rows]).exp()
        return py

    @property
    def _compute_dtype(self) -> str | None:
        """The ``compute_dtype`` passed to the engine: ``"auto"`` runs the model in its own dtype (None)."""
        return None if self.config.compute_dtype == "auto" else self.config.compute_dtype

    def _evaluate_games(self, model: Any, games: Sequence[Any]) -> torch.Tensor:
        """``(len(games), 2^n)`` float64 CPU values, split across the ranks under ``torch.distributed``."""
        import sftint_fast as sf

        rows = sf.evaluate_many(model, games, method=self.config.engine_method, progress=False,
                                compute_dtype=self._compute_dtype)
        return torch.stack([row.cpu() for row in rows]).double()

    def _numerics(self, model: Any) -> dict[str, Any] | None:
        """Numerical error of the run, on the first probe (METHOD.md section 7.7): the engine's own error
        (trie vs naive in the run's compute dtype) and the precision's (bfloat16 vs float32: the error of a
        bf16 run, or what bf16 would cost an fp32 run), to be read beside the noise floor.

        Both are measured on :data:`NUMERICS_VARIANTS` variants (the empty and full sets, and random others drawn
        from the run's seed; all ``2^n`` when there are no more): bf16 autocast on a CPU is ~5x slower than fp32,
        and all 64 variants of one chat probe took 75 s there. ``variants`` in the result says how many were used;
        the max is over them."""
        import sftint_fast as sf
        from sftint_fast.engine import _uses_autocast
        from sftint_fast.engine.adapters import get_adapter

        game = self.games[0]
        dtype = self._compute_dtype
        subsets = numerics_subsets(game.num_players, self.config.seed)
        out: dict[str, Any] = {"probe": 0, "compute_dtype": self.config.compute_dtype,
                               "variants": 1 << game.num_players if subsets is None else int(subsets.numel())}
        naive = sf.evaluate(model, game, method="naive", subsets=subsets, progress=False, compute_dtype=dtype).double()
        trie_runs = get_adapter(model) is not None
        if trie_runs and _uses_autocast(model, dtype):
            # bf16 autocast of a float32 model: the run evaluates with the naive engine (the trie cannot run so)
            out["engine"] = "naive (the trie engine does not run under bfloat16 autocast)"
        elif trie_runs:
            trie = sf.evaluate(model, game, method="trie", subsets=subsets, progress=False,
                               compute_dtype=dtype).double()
            out.update(engine_max_abs=(trie - naive).abs().max().item(),
                       engine_rms=(trie - naive).pow(2).mean().sqrt().item())
        own = next(model.parameters()).dtype
        other = "float32" if dtype == "bfloat16" or (dtype is None and own == torch.bfloat16) else "bfloat16"
        try:
            alt = sf.evaluate(model, game, method="naive", subsets=subsets, progress=False,
                              compute_dtype=other).double()
        except ValueError as exc:  # e.g. a model whose dtype rules out the other precision
            out["precision"] = f"unavailable: {exc}"
        else:
            out.update(precision="bfloat16 vs float32", precision_max_abs=(alt - naive).abs().max().item(),
                       precision_rms=(alt - naive).pow(2).mean().sqrt().item())
        return out

    def _heldout_loss(self, model: Any) -> float:
        from sftint_fast.engine import _no_autocast

        device = next(model.parameters()).device
        total, count = 0.0, 0
        for batch in heldout_batches(self._heldout, self.tokenizer,
                                     chat_template_kwargs=self.config.chat_template_kwargs):
            ids = batch["input_ids"].to(device)
            labels = batch["labels"].to(device)
            mask = batch.get("attention_mask")
            with _no_autocast(device):  # the model's own dtype, also inside a caller's autocast region
                loss, tokens = causal_lm_loss(model, ids, labels, None if mask is None else mask.to(device))
            total += loss
            count += tokens
        if count == 0:  # a loss of 0.0 would be taken for the best checkpoint
            raise ValueError("heldout: expected at least one labelled token (labels != -100) in the held-out data, "
                             "got none")
        return total / count

    def _reference_interactions(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        source = self._reference_source
        if isinstance(source, (str, os.PathLike)):
            from safetensors.torch import load_file

            source = load_file(str(source))
        if isinstance(source, dict):
            ref = {}
            for k in self.config.kinds:
                v = source.get(f"I_{k}")
                if v is None:
                    continue
                if not isinstance(v, torch.Tensor):
                    raise TypeError(f"reference I_{k}: expected a torch.Tensor {tuple(values.shape)}, got {type(v).__name__}")
                if v.shape != values.shape:
                    raise ValueError(f"reference I_{k}: expected shape {tuple(values.shape)}, got {tuple(v.shape)}")
                if not bool(torch.isfinite(v).all()):
                    raise ValueError(f"reference I_{k}: expected finite values, got NaN/inf")
                ref[k] = v.detach().double().cpu()
            if "and" not in ref:
                raise ValueError("reference: expected saved interactions with an 'I_and' tensor")
        else:  # (model, tokenizer), the type checked in __init__
            ref_values = self._reference_values(*source)
            ref, _ = _decompose(ref_values, method=self.config.andor_method, config=self.config, progress=self.progress)
        if self._writes:
            _atomic_save_tensors(self.out_dir / "reference.safetensors", {f"I_{k}": v.contiguous() for k, v in ref.items()})
        return ref

    def _reference_values(self, model: Any, tokenizer: Any) -> torch.Tensor:
        """The same prompts, words and target text on the reference model (its own tokens)."""
        from sftint_fast.baseline import _eval_mode
        from sftint_fast.game import Game
        from sftint_fast.players import word_char_spans

        model = unwrap_model(model)
        games = []
        # the same vocabulary (the same tokenizer, or another copy of it): the same ids; another one: the same
        # target text in its own tokens
        same_vocab = tokenizer is self.tokenizer or tokenizer.get_vocab() == self.tokenizer.get_vocab()
        with _eval_mode(model):  # every submodule's own mode back after: a frozen (eval) part stays in eval
            for i, game in zip(self.kept, self.games):
                prompt, named = self.probes[i].prompt, self.probes[i].players
                # character-span probes keep their spans and word-index probes take their words' (a player's text may
                # also occur earlier in the prompt); only players chosen by n_players are searched for
                if named and isinstance(named[0], (tuple, list)):
                    spans = list(named)
                elif named:
                    words = word_char_spans(prompt)
                    spans = [words[w] for w in named]
                else:
                    spans = _char_spans(prompt, game.words)
                target = game.target if same_vocab else self.tokenizer.decode(game.target.tolist())
                if not same_vocab and not target.strip():
                    raise ValueError(f"reference: probes[{i}]'s target ids {game.target.tolist()} decode to "
                                     f"{target!r}, which the reference model's tokenizer cannot be given; use "
                                     "probes with answers (target='answer') or a reference of the same vocabulary")
                chat = bool(self.config.chat and getattr(tokenizer, "chat_template", None))
                ref_game = Game.from_text(model, tokenizer, prompt, players=spans, span_unit="chars",
                                          baseline=self._baseline if isinstance(self._baseline, str) else "pad",
                                          target=target, chat=chat,
                                          chat_template_kwargs=self.config.chat_template_kwargs if chat else None)
                games.append(ref_game)
            return self._evaluate_games(model, games)

    # -------------------------------------------------------------------------------------- persistence

    def _reference_fingerprint(self) -> str | None:
        """:func:`_reference_digest` of the reference given (its model's is computed once)."""
        if isinstance(self._reference_source, (tuple, list)):
            if self._reference_sha is None:
                self._reference_sha = _reference_digest(self._reference_source)
            return self._reference_sha
        return _reference_digest(self._reference_source)

    def _reference_record(self) -> dict[str, Any] | None:
        """What the report records of the reference (:attr:`TrackReport.reference`): a model's fingerprint, or that
        of the interactions used (the same for a dict and a file of the same values), so runs tracked against
        other references tell apart."""
        if self.reference is None:
            return None
        source = self._reference_source
        digest = (self._reference_fingerprint() if isinstance(source, (tuple, list))
                  else _reference_digest({f"I_{k}": v for k, v in self.reference.items()}))
        return {"source": _describe_reference(source), "sha256": digest}

    def _config_blob(self) -> dict[str, Any]:
        blob = {"tracker": asdict(self.config), "probes": [asdict(p) for p in self.probes],
                "heldout": _digest(self._heldout), "reference": _describe_reference(self._reference_source)}
        if isinstance(self._baseline, torch.Tensor):
            # the config records only "tensor"; the digest tells a resumed run's tensor from another one
            blob["baseline_sha256"] = _tensor_digest(self._baseline)
        heldout = _heldout_digest(self._heldout)
        if heldout is not None:
            # "heldout" records only the keys of batches given as dicts; this tells their tensors apart
            blob["heldout_sha256"] = heldout
        if self._heldout_tokens is not None:
            blob["heldout_tokens_sha256"] = self._heldout_tokens
        if self.config.noise_floor is not None:
            blob["floor_version"] = FLOOR_VERSION
        reference = self._reference_fingerprint()
        if reference is not None:
            # "reference" records only "interactions" or the model's type: a resumed run uses the reference values
            # it saved, so another reference given on resume would be ignored without this
            blob["reference_sha256"] = reference
        return blob

    def _open_out_dir(self) -> None:
        from sftint_fast._files import remove_stale_temps

        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        # the one process that writes out_dir, so no other write is under way (under torchrun before the process
        # group is set up, every rank writes config.json: none removes another's temp file)
        if distributed.is_main_process() and (distributed.is_distributed() or os.environ.get("WORLD_SIZE", "1") == "1"):
            stale = remove_stale_temps(out, lambda name: _TRACKER_FILE.fullmatch(name) is not None)
            if stale:
                logger.info("out_dir %s: removed %d temp file(s) of an interrupted save: %s", out, len(stale), stale)
        path = out / "config.json"
        blob = _json_safe(self._config_blob())
        if not path.exists():
            if distributed.is_main_process():
                _atomic_write_text(path, json.dumps(blob, indent=1))
            return
        saved = _read_saved_config(path)
        if ("baseline_sha256" in blob and "baseline_sha256" not in saved
                and saved.get("tracker", {}).get("baseline") == "tensor"):
            logger.warning("out_dir %s: saved without the digest of its baseline tensor (an older run); the given "
                           "baseline tensor cannot be checked against it", out)
            del blob["baseline_sha256"]
        if "heldout_sha256" in blob and "heldout_sha256" not in saved and saved.get("heldout") == blob.get("heldout"):
            logger.warning("out_dir %s: saved without the digest of its held-out batches (an older run); the given "
                           "batches cannot be checked against them", out)
            del blob["heldout_sha256"]
        if ("heldout_tokens_sha256" in blob and "heldout_tokens_sha256" not in saved
                and saved.get("heldout") == blob.get("heldout")):
            logger.warning("out_dir %s: saved without the tokens of its held-out pairs (an older run); the given "
                           "tokenizer cannot be checked against the one its held-out loss was computed with", out)
            del blob["heldout_tokens_sha256"]
        if ("reference_sha256" in blob and "reference_sha256" not in saved
                and saved.get("reference") == blob.get("reference")):
            logger.warning("out_dir %s: saved without the digest of its reference (an older run); the given reference "
                           "cannot be checked against the one it saved, which is the one used", out)
            del blob["reference_sha256"]
        if ("reference_sha256" in blob and saved.get("reference_sha256") not in (None, blob["reference_sha256"])
                and isinstance(self._reference_source, (tuple, list))
                and saved["reference_sha256"] == _reference_digest(self._reference_source, legacy=True)):
            # saved by an earlier version, whose digest hashed the whole config (use_cache, dtype, ...): the same
            # reference given as loaded then
            blob["reference_sha256"] = saved["reference_sha256"]
        if "chat_template_kwargs" not in saved["tracker"] and blob["tracker"].get("chat_template_kwargs") is None:
            del blob["tracker"]["chat_template_kwargs"]  # an earlier version's run: the template's defaults, as now
        if ("floor_version" in blob and "floor_version" not in saved and self.config.noise_floor == "order_matched"
                and not self.config.warm_start):
            del blob["floor_version"]  # an earlier version's floors, drawn as now (up to rounding)
        if saved != blob:
            diff = sorted(k for k in set(saved) | set(blob) if saved.get(k) != blob.get(k))
            detail = {}
            if "tracker" in diff:
                detail = {k: (saved["tracker"].get(k), blob["tracker"].get(k)) for k in blob["tracker"]
                          if saved["tracker"].get(k) != blob["tracker"].get(k)}
            if "baseline_sha256" in diff:
                detail["baseline_sha256"] = (saved.get("baseline_sha256"), blob.get("baseline_sha256"))
            for key in ("heldout_sha256", "heldout_tokens_sha256", "reference_sha256", "floor_version"):
                if key in diff:
                    detail[key] = (saved.get(key), blob.get(key))
            hint = ("; the tokenizer gives the held-out pairs other tokens than the run's (another tokenizer or chat "
                    "template?)" if "heldout_tokens_sha256" in diff and saved.get("heldout") == blob.get("heldout")
                    else "")
            if diff == ["floor_version"]:
                hint = (f"; its noise floors were drawn by another version of the floor (saved "
                        f"{saved.get('floor_version', 1)}, this sftint_fast {FLOOR_VERSION}), and its saved steps' "
                        "floors would be reported beside floors drawn another way")
            raise ValueError(f"out_dir {out}: holds a run with another configuration (differs in {diff}; "
                             f"tracker options (saved, given): {detail}{hint}); use a new out_dir")
        self._load_saved()

    def _save_config(self) -> None:
        """Writes ``config.json`` again where a refused base checkpoint removed it (:meth:`_forget_base`): before the
        first file a retry saves."""
        path = self.out_dir / "config.json"
        if not path.exists():
            _atomic_write_text(path, json.dumps(_json_safe(self._config_blob()), indent=1))

    def _load_saved(self) -> None:
        from safetensors.torch import load_file

        out = self.out_dir
        # in step order, not the names' (a step of 10 digits sorts before one of 9)
        saved = sorted(out.glob("step_*.json"), key=_saved_step)
        if not saved:
            # games (and a reference) of a base checkpoint that was never saved (a run killed while tracking its
            # base): the base is tracked again, and builds them again from the model it is given
            return
        games_json = out / "games.json"
        if games_json.exists():
            self._load_games(games_json, load_file(str(out / "games.safetensors")))
        if (out / "reference.safetensors").exists():
            self.reference = {k[2:]: v for k, v in load_file(str(out / "reference.safetensors")).items()}
        for meta_path in saved:
            meta = json.loads(meta_path.read_text())
            meta["heldout_loss"] = loss_from_json(meta.get("heldout_loss"))
            tensors = load_file(str(meta_path.with_suffix(".safetensors")))
            record = _Record(
                step=meta["step"], values=tensors["values"],
                interactions={k: tensors[f"I_{k}"] for k in self.config.kinds}, p_y=tensors["p_y"],
                heldout_loss=meta["heldout_loss"],
                floors={k[len("floor:"):]: v for k, v in tensors.items() if k.startswith("floor:")},
                extra={k[len("extra:"):]: v for k, v in tensors.items() if k.startswith("extra:")}, meta=meta)
            self._ingest(record)
        if self.records:
            logger.info("resumed %s: %d checkpoint(s) already saved (steps %s)", out, len(self.records), self.steps)

    def _save_games(self) -> None:
        self._save_config()
        meta = {"kept": self.kept, "signature": self.signature, "numerics": self.numerics,
                "games": [{"player_spans": g.player_spans, "words": g.words, "masking": g.masking,
                           "prompt_length": g.prompt_length} for g in self.games]}
        tensors = {}
        for i, g in enumerate(self.games):
            tensors[f"{i}:input_ids"] = g.input_ids.contiguous()
            tensors[f"{i}:target"] = g.target.contiguous()
            tensors[f"{i}:baseline"] = g.baseline.detach().cpu().contiguous()  # its own dtype: float64 stays exact
        _atomic_save_tensors(self.out_dir / "games.safetensors", tensors)
        _atomic_write_text(self.out_dir / "games.json", json.dumps(_json_safe(meta), indent=1))

    def _load_games(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        from sftint_fast.game import Game

        meta = json.loads(path.read_text())
        self.kept, self.signature, self.numerics = meta["kept"], meta["signature"], meta["numerics"]
        self.games = [Game(input_ids=tensors[f"{i}:input_ids"], player_spans=tuple(tuple(s) for s in g["player_spans"]),
                           words=tuple(g["words"]), target=tensors[f"{i}:target"], baseline=tensors[f"{i}:baseline"],
                           masking=g["masking"], prompt_length=g["prompt_length"])
                      for i, g in enumerate(meta["games"])]

    def _save_record(self, record: _Record) -> None:
        self._save_config()
        tensors = {"values": record.values, "p_y": record.p_y}
        tensors.update({f"I_{k}": v for k, v in record.interactions.items()})
        tensors.update({f"floor:{k}": v for k, v in record.floors.items()})
        tensors.update({f"extra:{k}": v for k, v in record.extra.items()})
        base = self.out_dir / f"step_{record.step:09d}"
        # tensors first, JSON last: a step counts as saved only once its JSON exists
        _atomic_save_tensors(base.with_suffix(".safetensors"), {k: v.contiguous() for k, v in tensors.items()})
        meta = {**record.meta, "heldout_loss": loss_to_json(record.heldout_loss)}  # a NaN loss is no missing one
        _atomic_write_text(base.with_suffix(".json"), json.dumps(_json_safe(meta), indent=1))


# ------------------------------------------------------------------------------------------------ helpers


def _read_saved_config(path: Path) -> dict[str, Any]:
    """The run configuration a tracker saved in ``out_dir/config.json``; ValueError for another file of that name (a
    model's, where out_dir is also a ``Trainer``'s output_dir or a model folder), which would be compared as a run."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"out_dir {path.parent}: expected the tracker's config.json, could not read it: "
                         f"{err}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("tracker"), dict):
        got = (f"one without the tracker's options (keys {sorted(saved)[:8]})" if isinstance(saved, dict)
               else f"a JSON {type(saved).__name__}")
        raise ValueError(f"out_dir {path.parent}: expected the tracker's config.json, got {got}: a model's config.json "
                         "(a Trainer's output_dir or a model folder?); give the tracker a folder of its own")
    return saved


def _saved_step(path: Path) -> int:
    step = path.stem[len("step_"):]
    if not step.isdigit():
        raise ValueError(f"{path}: expected a saved checkpoint named step_<step>.json, got {path.name!r}")
    return int(step)


def _decompose(values: torch.Tensor, *, method: str, config: TrackerConfig, progress: bool,
               init: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Interactions per kind ``(B, 2^n)`` of the games ``values - values[:, :1]``, and solver state."""
    if method == "and":
        return {"and": harsanyi(values - values[:, :1])}, {}
    import sftint_fast as sf

    warm = (init["p"], init["q"]) if init and "p" in init else None
    res = sf.and_or(values, qthres=config.qthres, niter=config.andor_niter, lr=config.andor_lr, method=method,
                    progress=progress, seed=config.seed, init=warm if method == "sgd" else None)
    extra = {"p": res.p.double(), "q": res.q.double()} if config.warm_start and method == "sgd" else {}
    return {"and": res.I_and.double(), "or": res.I_or.double()}, extra


def _repeat_state(state: N.SetState, k: int) -> N.SetState:
    return N.SetState(**{name: getattr(state, name).repeat(k, 1) for name in state.__dataclass_fields__})


def _answer_log_prob(target: torch.Tensor):
    """A game value: ``Σ_k log p(target_k)`` from the scored positions' logits ``(B, m, V)``."""

    def value(logits: torch.Tensor) -> torch.Tensor:
        ids = target.to(logits.device).view(1, -1, 1).expand(logits.shape[0], -1, 1)
        return torch.log_softmax(logits.float(), -1).gather(-1, ids).squeeze(-1).sum(-1)

    return value


def _shared(interactions: torch.Tensor, reference: dict[str, torch.Tensor], kind: str, tau: float, *,
            threshold_reference: str = "base", _repeat: int = 1) -> torch.Tensor:
    """``G_S = 1[S ∈ Ω_ref] · 1[sign I(S) = sign I_ref(S)]`` as a bool ``(B, 2^n)`` tensor.

    ``Ω_ref`` is the reference model's salient set: ``|I_ref(S)| > τ·max|I_ref|`` (its own base), or ``> τ`` with
    ``threshold_reference="absolute"``, where ``τ`` is a magnitude."""
    if kind not in reference:
        return torch.zeros_like(interactions, dtype=torch.bool)
    ref = reference[kind].repeat(_repeat, 1)
    salient = N.initial_state(ref, tau=tau, reference="absolute" if threshold_reference == "absolute"
                              else "checkpoint").base
    return salient & (torch.sign(interactions) == torch.sign(ref))


def _check_step_type(step: Any) -> None:
    # before the already-recorded test: True == 1 and 1.0 == 1 would otherwise be skipped as "already recorded"
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")


def _check_values(values: torch.Tensor, expected: torch.Size | None) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values: expected a torch.Tensor (B, 2^n), got {type(values).__name__}")
    if values.dtype == torch.bool:  # isfinite passes it and double() makes it 0/1 values
        raise TypeError("values: expected a tensor of numbers (game values), got a torch.bool tensor")
    if values.dim() != 2 or values.shape[0] < 1 or values.shape[-1] < 2 or values.shape[-1] & (values.shape[-1] - 1):
        raise ValueError(f"values: expected shape (B, 2^n) with at least one probe (B >= 1) and n >= 1, got "
                         f"shape {tuple(values.shape)}")
    if expected is not None and values.shape != expected:
        raise ValueError(f"values: expected shape {tuple(expected)} (as the base checkpoint), got {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError("values: expected finite values, got NaN/inf")
    return values.detach().double().cpu()


def _check_p_y(p_y: torch.Tensor, rows: int) -> torch.Tensor:
    if not isinstance(p_y, torch.Tensor):
        raise TypeError(f"p_y: expected a torch.Tensor ({rows},), got {type(p_y).__name__}")
    py = p_y.detach().double().reshape(-1).cpu()
    if py.shape[0] != rows:
        raise ValueError(f"p_y: expected shape ({rows},), got {tuple(p_y.shape)}")
    outside = py[~((py >= 0) & (py <= 1))]
    if outside.numel():
        raise ValueError(f"p_y: expected probabilities in [0, 1], got {outside[0].item()}")
    return py


def causal_lm_loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed next-token cross-entropy of a causal LM over the labelled tokens (``labels != -100``), and their count.

    Only the positions that predict a label go through the LM head when the model's forward takes
    ``logits_to_keep`` (HF causal LMs): an answer-only loss then never materialises ``batch x length x vocab``
    logits (2 GB in fp32 for 8 x 512 tokens of a 128k vocabulary). Other models get the full logits, sliced.
    """
    shift_labels = labels[:, 1:]
    keep = (shift_labels != -100).any(0).nonzero().flatten()  # position t predicts labels[:, t + 1]
    if keep.numel() == 0:
        return 0.0, 0
    kwargs = {"logits_to_keep": keep} if _takes_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
    if not kwargs:
        logits = logits[:, keep]
    if logits.shape[1] != keep.numel():
        raise ValueError(f"model: expected logits for {keep.numel()} kept positions, got shape {tuple(logits.shape)}")
    targets = shift_labels[:, keep]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss.item(), int((targets != -100).sum())


def _takes_logits_to_keep(model: Any) -> bool:
    """Whether ``model(..., logits_to_keep=...)`` reaches an HF causal LM that takes it: the model itself, or through
    wrappers whose forward passes ``**kwargs`` on (PEFT's ``get_base_model()``, DDP's ``.module``)."""
    import inspect

    from sftint_fast.engine.adapters import wrapped_models

    for layer in wrapped_models(model):
        try:
            params = inspect.signature(layer.forward).parameters
        except (TypeError, ValueError):
            return False
        if "logits_to_keep" in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False  # the argument would not reach a wrapped model
    return False


def _check_loss(loss: Any) -> float | None:
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return float(loss)
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(f"heldout_loss: expected a number or None, got {type(loss).__name__}")
    return float(loss)


def unwrap_model(model: Any) -> Any:
    """The model to evaluate: ``model`` without the wrappers that hold it whole, in ``.module`` (DDP, DataParallel,
    accelerate, a DeepSpeed engine) or ``._orig_mod`` (torch.compile); a PEFT model stays as it is (the engine runs
    its adapters). ValueError for a model whose weights are sharded across processes (FSDP, FSDP2 / DTensor,
    DeepSpeed ZeRO-3): no process holds the model to evaluate, and the ranks evaluate different probes."""
    sharded = _sharded_by(model)
    if sharded is not None:
        raise ValueError(f"model: expected a model whose full weights are on this process, got one sharded across "
                         f"processes by {sharded}; track the checkpoints the run saves instead (sftint track --watch, "
                         "with StopFileCallback to stop at the phase boundary), or pass a gathered full copy")
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module) or inner is model:
            break
        model = inner
    return model


def _sharded_by(model: Any) -> str | None:
    """What shards ``model``'s weights across processes, or None."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without torch.distributed: nothing can be sharded
        return None
    if not isinstance(model, torch.nn.Module):
        return None
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            return "FSDP (FullyShardedDataParallel)"
        if isinstance(module, FSDPModule):
            return "FSDP2 (fully_shard)"
    for param in model.parameters():
        if isinstance(param, DTensor):
            return "DTensor parameters (FSDP2 or tensor parallelism)"
        if hasattr(param, "ds_id"):
            return "DeepSpeed ZeRO-3 (partitioned parameters)"
    return None


def _model_signature(model: Any) -> dict[str, Any]:
    embed = model.get_input_embeddings()
    cfg = getattr(model, "config", None)
    return {"vocab_size": int(embed.num_embeddings), "hidden_size": int(embed.embedding_dim),
            "model_type": getattr(cfg, "model_type", type(model).__name__),
            "num_layers": getattr(cfg, "num_hidden_layers", None)}


def _char_spans(prompt: str, words: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of the players ``words`` (whole whitespace words of ``prompt``, in order): each found as whole
    words, not inside a longer one ("is" is not the end of "this")."""
    spans, cursor = [], 0
    for word in words:
        text = word.strip()
        found = re.compile(r"(?<!\S)" + re.escape(text) + r"(?!\S)").search(prompt, cursor) if text else None
        if found is None:
            raise ValueError(f"reference: could not find the player {word!r} in the prompt {prompt!r} after offset {cursor}")
        spans.append(found.span())
        cursor = found.end()
    return spans


def _describe_reference(source: Any) -> str | None:
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (tuple, list)):
        return f"model:{getattr(getattr(source[0], 'config', None), 'model_type', type(source[0]).__name__)}"
    return "interactions"


def _reference_digest(source: Any, *, legacy: bool = False) -> str | None:
    """A fingerprint of a reference given as interactions (their values) or as ``(model, tokenizer)`` (its config and
    a strided sample of every parameter: another model of the same type differs); None for a path or none.

    A model's config is hashed less the entries that change no value (:data:`distributed._FINGERPRINT_CONFIG_SKIP`:
    ``use_cache``, ``dtype``, the attention implementation, where it was loaded from, ..., in its sub-configs too), so
    the same reference loaded with SDPA instead of eager attention, or with ``use_cache`` off, is the same reference.
    ``legacy``: the digest of sftint_fast before that (only ``_name_or_path`` left out), which run folders saved then
    hold in their config.json; a resume accepts either (:meth:`SFTTracker._open_out_dir`)."""
    if isinstance(source, dict):
        digest = hashlib.sha256()
        for key in sorted(source):
            digest.update(f"{key}:{_tensor_digest(torch.as_tensor(source[key]))};".encode())
        return digest.hexdigest()[:16]
    if isinstance(source, (tuple, list)) and source and hasattr(source[0], "named_parameters"):
        model = source[0]
        digest = hashlib.sha256()
        config = getattr(model, "config", None)
        settings = config.to_dict() if hasattr(config, "to_dict") else {}
        if legacy:
            settings.pop("_name_or_path", None)  # where it was loaded from: the same model moved is the same reference
        else:
            settings = distributed._config_entries(config, settings)
        digest.update(repr(sorted(settings.items())).encode())
        with torch.no_grad():
            for name, param in model.named_parameters():
                flat = param.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 1024)]
                digest.update(f"{name}:{tuple(param.shape)}:{_tensor_digest(sample)};".encode())
        return digest.hexdigest()[:16]
    return None


def _digest(items: Any) -> str | None:
    if items is None:
        return None
    return hashlib.sha256(repr([x if isinstance(x, (tuple, list, str)) else sorted(x) for x in items]).encode()).hexdigest()[:16]


def _heldout_digest(items: Any) -> str | None:
    """sha256 of held-out data with batches given as dicts of tensors, their keys and values (None without any)."""
    if items is None or not any(isinstance(x, dict) for x in items):
        return None
    digest = hashlib.sha256()
    for x in items:
        if isinstance(x, dict):
            for key in sorted(x):
                digest.update(f"{key}:{_tensor_digest(torch.as_tensor(x[key]))};".encode())
        else:
            digest.update(f"{x!r};".encode())
    return digest.hexdigest()[:16]


def _heldout_tokens_digest(items: Any, tokenizer: Any,
                           chat_template_kwargs: dict[str, Any] | None = None) -> str | None:
    """sha256 of the token ids and labels ``tokenizer`` gives held-out ``(prompt, answer)`` pairs, their chats
    rendered with ``chat_template_kwargs`` (None without any pair, or a tokenizer without a chat template: the
    held-out loss refuses that one, at the checkpoint)."""
    pairs = [x for x in items or [] if not isinstance(x, dict)]
    if not pairs or getattr(tokenizer, "chat_template", None) is None:
        return None
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(f"heldout: expected (prompt, answer) pairs or batches {{'input_ids', 'labels'}}, got "
                             f"{pair!r}")
    # one example per pair, unpadded: another pad token leaves the loss as it is; a template that renders today's
    # date (strftime_now: Llama 3.2/3.3, Granite) renders a fixed one here, or the same run resumed on another day
    # would be refused
    if isinstance(tokenizer.chat_template, str) and "strftime_now" in tokenizer.chat_template:
        tokenizer = _FixedClock(tokenizer)
    examples = [sft_example(tokenizer, *pair, max_length=1 << 62, chat_template_kwargs=chat_template_kwargs)
                for pair in pairs]
    cut = [i for i, e in enumerate(examples) if len(e["input_ids"]) > SFT_MAX_LENGTH]
    examples = [{k: e[k][:SFT_MAX_LENGTH] for k in ("input_ids", "labels")} for e in examples]  # what the loss sees
    if cut:  # the loss is taken on what is left, as the demo trains; an answer cut off entirely counts for nothing
        lost = [i for i in cut if all(label == -100 for label in examples[i]["labels"])]
        logger.warning("held-out pairs %s are longer than %d tokens (chat template included): their loss is taken on "
                       "their first %d tokens%s", _few(cut), SFT_MAX_LENGTH, SFT_MAX_LENGTH,
                       f"; pairs {_few(lost)} keep no answer token and do not count" if lost else "")
    return hashlib.sha256(repr([(e["input_ids"], e["labels"]) for e in examples]).encode()).hexdigest()[:16]


def _few(indices: list[int], limit: int = 10) -> str:
    """``[0, 3, 7]``, or the first ``limit`` and how many more."""
    return str(indices) if len(indices) <= limit else f"{indices[:limit]} (and {len(indices) - limit} more)"


class _FixedClock:
    """``tokenizer`` whose chat template reads a fixed date from ``strftime_now`` (a macro of the template shadows
    transformers' global of that name: the renderer passes no callable)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        fixed = "{% macro strftime_now(format) %}1970-01-01{% endmacro %}" + self._tokenizer.chat_template
        return self._tokenizer.apply_chat_template(*args, chat_template=fixed, **kwargs)


def _tensor_digest(x: torch.Tensor) -> str:
    """sha256 of the shape and float64 values: equal values give equal digests whatever the dtype or device."""
    values = x.detach().to("cpu", torch.float64).contiguous()
    digest = hashlib.sha256(repr(tuple(values.shape)).encode())
    digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def loss_to_json(loss: float | None) -> float | str | None:
    """A held-out loss for strict JSON: a NaN or infinite one (a diverged run) as the string ``"nan"``, ``"inf"`` or
    ``"-inf"``, where :func:`_json_safe` would write null, which reads back as "not measured"."""
    return str(loss) if isinstance(loss, float) and not math.isfinite(loss) else loss


def loss_from_json(loss: Any) -> float | None:
    """What :func:`loss_to_json` wrote, back as a number (None: not measured)."""
    if isinstance(loss, str):
        if loss not in ("nan", "inf", "-inf"):
            raise ValueError(f"heldout_loss: expected a number, null, 'nan', 'inf' or '-inf', got {loss!r}")
        return float(loss)
    return loss


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, torch.Tensor):
        return _json_safe(x.tolist())
    return x


def _atomic_write_text(target: Path, text: str) -> None:
    from sftint_fast._files import atomic_write

    atomic_write(target, lambda tmp: tmp.write_text(text))


def _atomic_save_tensors(target: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    from sftint_fast._files import atomic_write

    atomic_write(target, lambda tmp: save_file(tensors, str(tmp)))


# ------------------------------------------------------------------------------------------------- report


def _build_report(tracker: SFTTracker) -> TrackReport:
    c = tracker.config
    records, states = tracker.records, tracker.states
    steps = tuple(r.step for r in records)
    T = len(records)
    B, size = records[0].values.shape
    n = size.bit_length() - 1
    order = popcount(size).double()
    boot = N.bootstrap_indices(B, resamples=c.bootstrap, seed=c.seed)
    py = torch.stack([r.p_y for r in records])                                  # (T, B)
    gain = torch.stack([r.values[:, -1] - r.values[:, 0] for r in records])
    irrelevant = py < c.irrelevant_fraction * py[:1]
    relevant = (~irrelevant).double()
    curves: dict[str, list] = {}
    intervals: dict[str, tuple[list[float], list[float]]] = {}

    def put_sum(name: str, per_probe: torch.Tensor) -> None:
        curves[name] = N.probe_sum(per_probe).tolist()
        intervals[name] = N.bootstrap_sum(per_probe, boot)

    totals: dict[str, torch.Tensor] = {}
    # per set, each kind's (values, member, shared) measured: pooled below into the "all/" measures
    pooled: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {name: [] for name in SETS}
    for kind in c.kinds:
        inters = torch.stack([r.interactions[kind] for r in records])          # (T, B, 2^n)
        shared = None
        if tracker.reference is not None:
            # a kind the reference lacks shares nothing (G_S = 0, as the noise floor counts it): its emergences are
            # unshared; it has no γ
            shared = torch.stack([_shared(inters[t], tracker.reference, kind, c.tau,
                                          threshold_reference=c.threshold_reference) for t in range(T)])
        gamma_shared = shared if kind in (tracker.reference or {}) else None
        sets = {name: torch.stack([getattr(s[kind], name) for s in states]) for name in SETS}
        for name, member in sets.items():
            # a removed interaction is measured where it was salient: the base checkpoint's I, and its G_S
            base_only = name == "removed"
            values = inters[:1].expand_as(inters) if base_only else inters
            set_shared = (gamma_shared[:1].expand_as(gamma_shared) if base_only and gamma_shared is not None
                          else gamma_shared)
            put_sum(f"{kind}/{name}", member.sum(-1).double() * relevant)
            put_sum(f"{kind}/{name}_irrelevant", member.sum(-1).double() * (1 - relevant))
            # the measures describe the probes the counts count: a flagged probe's sets are left out of both
            member = member & ~irrelevant.unsqueeze(-1)
            _set_measures(curves, intervals, f"{kind}/{name}", values, member, order, n, boot, set_shared)
            pooled[name].append((values, member, set_shared))
        new = {"removed_new": torch.zeros(T, B), "emerged_new": torch.zeros(T, B)}
        if shared is not None:
            new["emerged_unshared_new"] = torch.zeros(T, B)
        for t in range(1, T):
            removed, emerged = N.new_changes(states[t - 1][kind], states[t][kind])
            new["removed_new"][t] = removed.sum(-1)
            new["emerged_new"][t] = emerged.sum(-1)
            if shared is not None:
                new["emerged_unshared_new"][t] = (emerged & ~shared[t]).sum(-1)
        for name, observed in new.items():
            observed = observed.double()
            floor = torch.zeros(T, B, dtype=torch.float64)
            floor_sd = [0.0] * T
            for t, r in enumerate(records):
                draws = r.floors.get(f"{kind}/{name}")
                if draws is not None:
                    floor[t] = draws.mean(0)
                    floor_sd[t] = (draws * relevant[t]).sum(-1).std(unbiased=False).item()
            excess = observed - floor
            put_sum(f"{kind}/{name}", observed * relevant)
            put_sum(f"{kind}/{name}_floor", floor * relevant)
            curves[f"{kind}/{name}_floor_sd"] = floor_sd
            put_sum(f"{kind}/{name}_excess", excess * relevant)
            put_sum(f"{kind}/{name}_excess_cumulative", (excess * relevant).cumsum(0))
            put_sum(f"{kind}/{name}_irrelevant", observed * (1 - relevant))
            for suffix, tensor in (("", observed), ("_floor", floor), ("_excess", excess)):
                key = f"{name}{suffix}"
                totals[key] = totals.get(key, 0) + tensor
        for name in SETS:
            totals[name] = totals.get(name, 0) + sets[name].sum(-1).double()
    for key, tensor in totals.items():
        put_sum(f"all/{key}", tensor * relevant)
        if key.endswith("_excess"):
            put_sum(f"all/{key}_cumulative", (tensor * relevant).cumsum(0))
    # the measures of the sets the "all/" counts count: a probe's AND and OR sets side by side, one set of
    # interactions (METHOD.md section 4's ρ and γ of a set Ω'); γ only where the reference has every kind
    for name, parts in pooled.items():
        shares = [shared for _, _, shared in parts]
        _set_measures(curves, intervals, f"all/{name}", torch.cat([v for v, _, _ in parts], -1),
                      torch.cat([m for _, m, _ in parts], -1), order.repeat(len(parts)), n, boot,
                      None if any(x is None for x in shares) else torch.cat(shares, -1))

    has_ref = tracker.reference is not None
    emerged_key = "emerged_unshared_new_excess" if has_ref else "emerged_new_excess"
    boundary_index = N.phase_boundary(
        curves["all/removed_new_excess_cumulative"], intervals["all/removed_new_excess_cumulative"][0],
        curves[f"all/{emerged_key}"], intervals[f"all/{emerged_key}"][0],
        removed_fraction=c.boundary_removed_fraction, require_significant=c.boundary_significant,
    )
    # one probe's bootstrap resamples are all that probe: its interval has zero width and proves nothing
    one_probe = c.boundary_significant and B < 2
    if one_probe:
        boundary_index = None
    losses = [r.heldout_loss for r in records]
    curves["heldout_loss"] = losses
    finite = [(loss, s) for loss, s in zip(losses, steps) if loss is not None and math.isfinite(loss)]
    curves["p_y_mean"] = py.mean(-1).tolist()
    intervals["p_y_mean"] = N.bootstrap_nanmean(py, boot)
    curves["irrelevant_probes"] = irrelevant.sum(-1).tolist()
    notes = []
    if not has_ref:
        notes.append("gamma unavailable: no reference model or reference interactions were given")
    if c.noise_floor is None:
        notes.append("noise floor disabled: excess counts equal observed counts")
    if one_probe:
        notes.append("no phase boundary: one probe gives no bootstrap interval, so no count can be significant "
                     "(boundary_significant=False applies the rule to the counts alone)")
    below = int((py[0] < c.min_base_py).sum())
    if tracker.kept is None and below:
        notes.append(f"min_base_py={c.min_base_py:g} was not applied: the values were fed with add_values, which "
                     f"tracks every row it is given; {below} of {B} probes have a base p_y under it")
    if c.persistence > 1:
        notes.append(f"persistence {c.persistence}: a change is counted at the checkpoint that confirms it, "
                     f"{c.persistence - 1} checkpoint(s) after its onset")
    floor_cost = {"rows_decomposed": float(sum(r.meta.get("floor_rows_decomposed", 0) for r in records)),
                  "seconds": float(sum(r.meta.get("seconds_floor", 0.0) for r in records)),
                  "seconds_decompose_observed": float(sum(r.meta.get("seconds_decompose", 0.0) for r in records)),
                  "forward_passes": 0.0}
    curves["seconds_tracking"] = [_tracking_seconds(r.meta) for r in records]
    probes_table = {"kept": tracker.kept if tracker.kept is not None else list(range(B)),
                    "p_y": py.tolist(), "gain": gain.tolist(), "irrelevant": irrelevant.tolist()}
    if tracker.games is not None:
        probes_table["words"] = [list(g.words) for g in tracker.games]
        probes_table["prompts"] = [tracker.probes[i].prompt for i in tracker.kept]
    return TrackReport(
        steps=steps, config={**asdict(c), "solver": tracker.solver}, curves=curves, intervals=intervals,
        probes=probes_table, phase_boundary=None if boundary_index is None else steps[boundary_index],
        heldout_loss_min_step=min(finite)[1] if finite else None, solver=tracker.solver, gamma_available=has_ref,
        floor_cost=floor_cost, numerics=tracker.numerics, notes=tuple(notes), cost=_tracking_cost(records),
        reference=tracker._reference_record(),
    )


_COST_PARTS = ("seconds_evaluate", "seconds_heldout", "seconds_reference", "seconds_decompose", "seconds_floor")


def _tracking_seconds(meta: dict[str, Any]) -> float | None:
    """Seconds add_checkpoint spent on one checkpoint (None for values recorded by add_values alone)."""
    if "seconds_evaluate" not in meta:
        return None
    return float(sum(meta.get(part, 0.0) for part in _COST_PARTS))


def _tracking_cost(records: Sequence[_Record]) -> dict[str, Any]:
    """What tracking one checkpoint costs, averaged over the checkpoints after the base (the base also builds the
    games and measures the numerical error): seconds per part and in all, and variants evaluated per second."""
    timed = [r.meta for r in records[1:] if "seconds_evaluate" in r.meta]
    out: dict[str, Any] = {"checkpoints_timed": len(timed),
                           "base_seconds": _tracking_seconds(records[0].meta) if records else None}
    if not timed:
        return out
    for part in _COST_PARTS:
        out[part] = math.fsum(m.get(part, 0.0) for m in timed) / len(timed)
    out["seconds_per_checkpoint"] = math.fsum(_tracking_seconds(m) for m in timed) / len(timed)
    evaluate = math.fsum(m["seconds_evaluate"] for m in timed)
    out["variants_per_second"] = sum(m.get("variants", 0) for m in timed) / evaluate if evaluate > 0 else None
    return out


def _set_measures(curves: dict, intervals: dict, prefix: str, values: torch.Tensor, member: torch.Tensor,
                  order: torch.Tensor, n: int, boot: torch.Tensor, shared: torch.Tensor | None) -> None:
    """Mean |I|, ρ, γ and mean order of one set over checkpoints (pooled over probes), and its strength by order
    (per probe, averaged over probes); ``member`` holds only the probes to measure (the caller leaves out those
    whose target became irrelevant)."""
    m = member.double()
    mag = values.abs() * m                                                       # (T, B, 2^n)
    abs_sum = mag.sum(-1)
    count = m.sum(-1)
    curves[f"{prefix}_mean_abs"] = _ratio(abs_sum.sum(-1), count.sum(-1))
    intervals[f"{prefix}_mean_abs"] = N.bootstrap_ratio(abs_sum, count, boot)
    rho = (values * m).sum(-1).abs() / abs_sum
    rho = torch.where(count > 0, rho, torch.full_like(rho, math.nan))
    curves[f"{prefix}_rho"] = rho.nanmean(-1).tolist()
    intervals[f"{prefix}_rho"] = N.bootstrap_nanmean(rho, boot)
    curves[f"{prefix}_mean_order"] = _ratio((mag * order).sum(-1).sum(-1), abs_sum.sum(-1))
    intervals[f"{prefix}_mean_order"] = N.bootstrap_ratio((mag * order).sum(-1), abs_sum, boot)
    if shared is not None:
        g = (mag * shared.double()).sum(-1)
        curves[f"{prefix}_gamma"] = _ratio(g.sum(-1), abs_sum.sum(-1))
        intervals[f"{prefix}_gamma"] = N.bootstrap_ratio(g, abs_sum, boot)
    # METHOD.md section 4: A+(k), A-(k) normalised by the probe's Σ|I| over the set, then averaged over probes
    # (those whose set is not empty; NaN where no probe has one)
    denom = abs_sum.unsqueeze(-1)                                                # (T, B, 1)
    plus = torch.stack([((values.clamp(min=0) * m) * (order == k)).sum(-1) for k in range(n + 1)], -1)
    minus = torch.stack([(((-values).clamp(min=0) * m) * (order == k)).sum(-1) for k in range(n + 1)], -1)
    nonempty = (abs_sum > 0).unsqueeze(-1)
    nan = torch.full_like(plus, math.nan)
    for sign, strength in (("plus", plus), ("minus", minus)):
        per_probe = torch.where(nonempty, strength / denom, nan)                # (T, B, n+1)
        curves[f"{prefix}_strength_{sign}"] = per_probe.nanmean(1).tolist()
        # intervals like the curves': (lo, hi), each a list over checkpoints of lists over orders
        bounds = [N.bootstrap_nanmean(per_probe[..., k], boot) for k in range(n + 1)]
        intervals[f"{prefix}_strength_{sign}"] = tuple([list(row) for row in zip(*(b[i] for b in bounds))]
                                                       for i in (0, 1))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> list[float]:
    return [a / b if b > 0 else math.nan for a, b in zip(num.tolist(), den.tolist())]
