"""``sftint compare``: tracked SFT runs side by side (full fine-tuning vs LoRA, learning rates, data...).

Each run is the output folder of ``sftint track`` or ``sftint demo`` (``report.json``, and ``training_log.json``
where the checkpoints carried the ``Trainer``'s log). :func:`compare_runs` writes ``compare.md`` (one row of
headline numbers per run, and what makes the runs comparable or not), ``compare.json`` and ``compare.png``
(excess removals and emergences beyond the noise floor, held-out and training loss against the step, each run's
phase boundary marked).

Runs are comparable when they start from the same base values: the same base model, probes, players and targets
give the same base ``p_y`` of every probe. Runs that do not, or that were tracked with other options (threshold,
noise floor, solver...), are compared anyway, with the differences listed first.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from sftint_fast.sft.tracker import TrackReport, _atomic_write_text, _json_safe, loss_to_json
from sftint_fast.sft.training_log import TrainingLog

BASE_RTOL = 1e-4  # base p_y of the same probes on the same base model: equal up to the engine's reordering
LOSSES = ("heldout_loss_first", "heldout_loss_last", "train_loss_last")  # NaN in compare.json as "nan", not null


def load_run(folder: str | os.PathLike) -> tuple[TrackReport, TrainingLog | None]:
    """A run folder's report and, when it has one, its training log."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"run: expected the output folder of sftint track / demo, got {str(path)!r}, not a folder")
    log = path / "training_log.json"
    return TrackReport.load(path), TrainingLog.load(log) if log.is_file() else None


def compare_runs(runs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                 labels: Sequence[str] | None = None) -> tuple[dict[str, Any], Path]:
    """Compares tracked runs; writes compare.md, compare.json and compare.png to ``out``. Returns the comparison
    (``rows``: one dict of headline numbers per run; ``differences``: what keeps them from being comparable) and
    the path of compare.md. ``labels``: one name per run (default: the folders' names)."""
    from sftint_fast.plot import headline

    # a single path is a sequence of characters: one folder per character, refused only as "not a folder"
    if isinstance(runs, (str, os.PathLike)):
        raise TypeError(f"runs: expected a sequence of run folders, got one path {str(runs)!r}")
    if isinstance(labels, str):
        raise TypeError(f"labels: expected a sequence of names (one per run), got one string {labels!r}")
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise ValueError(f"runs: expected at least two run folders to compare, got {len(runs)}")
    resolved = [r.resolve() for r in runs]
    twice = next((str(r) for i, r in enumerate(runs) if resolved[i] in resolved[:i]), None)
    if twice is not None:  # a run compared with itself, however spelled and whatever its labels
        raise ValueError(f"runs: expected distinct run folders, got {twice!r} twice")
    if labels is None:
        labels = [r.name or str(r) for r in runs]
        if len(set(labels)) < len(labels):
            labels = [str(r) for r in runs]
    labels = [str(x) for x in labels]
    if len(labels) != len(runs):
        raise ValueError(f"labels: expected one label per run ({len(runs)}), got {len(labels)}: {labels}")
    if not all(x.strip() for x in labels):  # a row and a legend entry no one can tell apart
        raise ValueError(f"labels: expected non-empty names, got {labels}")
    if len(set(labels)) < len(labels):
        raise ValueError(f"labels: expected distinct labels, got {labels}")
    loaded = [load_run(r) for r in runs]
    rows = []
    for label, folder, (report, log) in zip(labels, runs, loaded):
        h = headline(report)
        c = report.curves
        # None: not measured; NaN (a diverged run) is the last loss when it was the last measured
        losses = [(s, x) for s, x in zip(report.steps, c["heldout_loss"]) if x is not None]
        train = log.at(report.steps)["train_loss"] if log is not None else []
        train = [x for x in train if x is not None]  # the last tracked step may have no log entry since the one before
        rows.append({
            "label": label, "folder": str(folder), "steps": list(report.steps), "last_step": report.steps[-1],
            "probes": len(report.probes["kept"]), "base_salient": h["base_salient"], "removed": h["removed"],
            "emerged": h["emerged"], "removed_excess_cumulative": h["removed_excess_cumulative"],
            "removed_excess_cumulative_lo": h["removed_excess_cumulative_lo"],
            "emerged_excess_total": h["emerged_excess_total"], "phase_boundary": report.phase_boundary,
            "heldout_loss_first": losses[0][1] if losses else None,
            "heldout_loss_last": losses[-1][1] if losses else None,
            "heldout_loss_min_step": report.heldout_loss_min_step,
            "train_loss_last": train[-1] if train else None, "p_y_first": c["p_y_mean"][0],
            "p_y_last": c["p_y_mean"][-1],
            "rho_emerged": h["rho_emerged"], "gamma_emerged": h["gamma_emerged"], "solver": report.solver,
            "noise_floor": report.config.get("noise_floor"),
            "seconds_per_checkpoint": report.cost.get("seconds_per_checkpoint"),
        })
    differences = _differences(labels, [r for r, _ in loaded], [_heldout_examples(r) for r in runs])
    result = {"rows": rows, "differences": differences}
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    saved = {**result, "rows": [{**row, **{k: loss_to_json(row[k]) for k in LOSSES}} for row in rows]}
    _atomic_write_text(target / "compare.json", json.dumps(_json_safe(saved), indent=1))
    from sftint_fast.plot import plot_compare

    plot_compare(labels, [r for r, _ in loaded], [log for _, log in loaded], target / "compare.png")
    md = target / "compare.md"
    _atomic_write_text(md, _markdown(rows, differences))
    return result, md


def _heldout_examples(folder: Path) -> Any:
    """Which held-out examples the run's held-out loss came from, as its tracker recorded them (``tracker/config.json``
    of sftint track / demo: digests of the examples); None where the folder has no such record or no held-out data."""
    try:
        saved = json.loads((folder / "tracker" / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(saved, dict) or saved.get("heldout") is None:
        return None
    return [saved.get("heldout"), saved.get("heldout_sha256")]


def _differences(labels: list[str], reports: list[TrackReport], heldout: list[Any]) -> list[str]:
    """What keeps the runs from being comparable: options tracked with, base values, and (``heldout``:
    :func:`_heldout_examples` per run) the held-out examples of their held-out loss."""
    out = []
    first = reports[0]
    keys = sorted({k for r in reports for k in r.config} - {"seed"})  # seeds: sampling, not another method
    for key in keys:
        values = [r.config.get(key) for r in reports]
        if any(v != values[0] for v in values[1:]):
            out.append(f"option {key}: " + ", ".join(f"{label} {v!r}" for label, v in zip(labels, values)))
    if any(r.steps != first.steps for r in reports[1:]):
        persistence = first.config.get("persistence")
        out.append("tracked steps: " + ", ".join(f"{label} {list(r.steps)}" for label, r in zip(labels, reports))
                   + (f" (a change counts once it lasts {persistence} checkpoints, so other step grids count "
                      "differently)" if isinstance(persistence, int) and persistence > 1 else ""))
    if any(r.gamma_available != first.gamma_available for r in reports[1:]):
        out.append("reference model (γ, and emergence counted unshared with it): "
                   + ", ".join(f"{label} {'yes' if r.gamma_available else 'no'}" for label, r in zip(labels, reports)))
    # γ and the emergence unshared with the reference are measured against it: another reference, other numbers
    known = [(label, r.reference) for label, r in zip(labels, reports) if (r.reference or {}).get("sha256")]
    for label, reference in known[1:]:
        if reference["sha256"] != known[0][1]["sha256"]:
            out.append(f"{label} was tracked against another reference than {known[0][0]} ({reference['source']}, "
                       f"sha256 {reference['sha256']} vs {known[0][1]['source']}, {known[0][1]['sha256']}), so its γ "
                       "and its emergence unshared with the reference are not measured alike")
    # the held-out loss columns sit side by side: losses over other examples are not those of the same data
    measured = [(label, h) for label, h in zip(labels, heldout) if h is not None]
    for label, examples in measured[1:]:
        if examples != measured[0][1]:
            out.append(f"{label} measured its held-out loss on other held-out examples than {measured[0][0]}, so their "
                       "held-out losses are not comparable")
    base, prompts, words = first.probes["p_y"][0], first.probes.get("prompts"), first.probes.get("words")
    for label, report in zip(labels[1:], reports[1:]):
        other, theirs = report.probes["p_y"][0], report.probes.get("prompts")
        if prompts is not None and theirs is not None and list(theirs) != list(prompts):
            new = [x for x in theirs if x not in set(prompts)]
            out.append(f"{label} tracks other probes than {labels[0]} ({len(theirs)} vs {len(prompts)}; "
                       + (f"{len(new)} not among {labels[0]}'s, e.g. {new[0]!r}" if new else "the same prompts in "
                          "another order or number") + "), so its counts are not those of the same interactions")
        elif len(other) != len(base) or any(
                a is None or b is None or not math.isclose(a, b, rel_tol=BASE_RTOL, abs_tol=1e-6)
                for a, b in zip(base, other)):
            out.append(f"{label} starts from other base values than {labels[0]} (base p_y of its {len(other)} probes "
                       f"vs {len(base)}): another base model, probe set, players or targets, so its counts are not "
                       f"those of the same interactions")
        theirs_words = report.probes.get("words")
        if prompts is not None and prompts == theirs and words is not None and theirs_words not in (None, words):
            # players leave the unmasked prompt, and so the base p_y, as they are: only their words tell them apart
            changed = [(a, b) for a, b in zip(words, theirs_words) if a != b]
            out.append(f"{label} tracks other players than {labels[0]} in {len(changed)} of {len(words)} probes "
                       f"(e.g. {changed[0][1]} vs {changed[0][0]}), so its counts are not those of the same "
                       "interactions")
    return out


def _markdown(rows: list[dict[str, Any]], differences: list[str]) -> str:
    from sftint_fast.plot import bound, count

    lines = ["# Tracked SFT runs compared", ""]
    if differences:
        lines += ["**Not like for like**: " + ("; ".join(differences)) + ".", ""]
    else:
        lines += ["The runs start from the same base values and were tracked with the same options.", ""]
    lines += ["| run | steps | probes | base salient | removed | emerged | excess removals (lo) | excess emergence "
              "| phase boundary | held-out loss first → last (min at) | train loss last | p_y first → last "
              "| tracking s/checkpoint |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['steps'][0]}–{r['last_step']} ({len(r['steps'])}) | {r['probes']} "
            f"| {r['base_salient']:.0f} | {r['removed']:.0f} | {r['emerged']:.0f} "
            f"| {count(r['removed_excess_cumulative'])} ({bound(r['removed_excess_cumulative_lo'])}) "
            f"| {count(r['emerged_excess_total'])} | {_opt(r['phase_boundary'])} "
            f"| {_loss(r['heldout_loss_first'])} → {_loss(r['heldout_loss_last'])} "
            f"({_opt(r['heldout_loss_min_step'])}) "
            f"| {_loss(r['train_loss_last'])} | {r['p_y_first']:.3f} → {r['p_y_last']:.3f} "
            f"| {_num(r['seconds_per_checkpoint'])} |")
    lines += ["", "Excess removals: removals beyond the noise floor, summed over the checkpoints, with the bootstrap "
              "lower bound (a denoising stage shows as a lower bound above 0; one that later checkpoints' excess "
              "summed back under it shows in the run's report.md verdict); excess emergence likewise for new "
              "interactions (unshared with the reference where one was given). Each run's own report.md has the "
              "details.", "", "![compare.png](compare.png)"]
    # the floor counts as 0 there (the runs' own verdicts say so): "beyond the noise floor" would misname raw counts
    floorless = [r["label"] for r in rows if r["noise_floor"] is None]
    if floorless:
        lines[-2:-2] = [f"No noise floor was measured for {', '.join(floorless)}: "
                        f"{'its' if len(floorless) == 1 else 'their'} excess counts are raw counts (noise_floor=None).",
                        ""]
    return "\n".join(lines) + "\n"


def _opt(x: Any) -> str:
    return "–" if x is None else str(x)


def _loss(x: Any) -> str:
    """"NaN" for a loss that was measured NaN (a diverged run), else as :func:`_num`."""
    return "NaN" if isinstance(x, float) and math.isnan(x) else _num(x)


def _num(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
