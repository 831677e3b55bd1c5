"""Figures and the written report of an SFT tracking run (matplotlib, Agg backend).

``write_report(report, out_dir)`` writes ``counts.png`` (removed/preserved/emerged vs step, held-out loss on
a second axis, phase boundary marked), ``floor.png`` (observed vs floor per checkpoint, bootstrap bands),
``orders.png`` (strength by order of removed vs preserved vs emerged at the last checkpoint),
``rho_gamma.png`` (ρ and γ per set over steps), ``report.json`` and ``report.md``; given the run's
:class:`~sftint_fast.sft.training_log.TrainingLog`, its training / eval loss join the loss axis, the table and
``training_log.json``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from sftint_fast.sft.tracker import TrackReport, _atomic_write_text, _json_safe
from sftint_fast.sft.training_log import TrainingLog

SET_COLORS = {"removed": "tab:red", "preserved": "tab:gray", "emerged": "tab:blue"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_report(report: Any) -> None:
    if not isinstance(report, TrackReport):
        raise TypeError(f"report: expected a TrackReport (SFTTracker.report()), got {type(report).__name__}")


def _mark_boundary(ax: Any, report: TrackReport) -> None:
    if report.phase_boundary is not None:
        ax.axvline(report.phase_boundary, color="k", linestyle="--", linewidth=1, label="phase boundary")
    if report.heldout_loss_min_step is not None:
        ax.axvline(report.heldout_loss_min_step, color="tab:green", linestyle=":", linewidth=1, label="held-out loss min")


def plot_counts(report: TrackReport, path: str | os.PathLike, *, training: TrainingLog | None = None) -> Path:
    """Cumulative set sizes (with bootstrap bands) vs step; held-out loss (and, given the run's ``training`` log,
    the training and eval loss the ``Trainer`` logged) on a second axis."""
    _check_report(report)
    _check_training(training)
    plt = _plt()
    steps = list(report.steps)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, color in SET_COLORS.items():
        key = f"all/{name}"
        ax.plot(steps, report.curves[key], marker="o", color=color, label=name)
        lo, hi = report.intervals[key]
        ax.fill_between(steps, lo, hi, color=color, alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("salient interactions (all probes)")
    _mark_boundary(ax, report)
    losses = report.curves.get("heldout_loss", [])
    logged = {} if training is None else {name: [p for p in training.series.get(name, ()) if p[0] <= steps[-1]]
                                          for name in ("loss", *training.eval_losses)}
    if any(x is not None for x in losses) or any(logged.values()):
        ax2 = ax.twinx()
        if any(x is not None for x in losses):
            ax2.plot([s for s, x in zip(steps, losses) if x is not None], [x for x in losses if x is not None],
                     color="tab:green", marker="s", linewidth=1, label="held-out loss")
        if logged.get("loss"):
            ax2.plot(*zip(*logged["loss"]), color="tab:olive", linewidth=0.8, alpha=0.7, label="training loss (logged)")
        for i, name in enumerate(n for n in logged if n != "loss" and logged[n]):
            ax2.plot(*zip(*logged[name]), color=("tab:cyan", "tab:purple", "tab:brown", "tab:gray")[i % 4], marker="^",
                     linewidth=1, label=f"{'eval loss' if name == 'eval_loss' else name} (logged)")
        ax2.set_ylabel("loss")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Salient interactions through SFT ({report.solver})", fontsize=9)
    return _save(fig, path)


def plot_floor(report: TrackReport, path: str | os.PathLike) -> Path:
    """New removals / emergences per checkpoint: observed vs noise floor, excess with bootstrap bands."""
    _check_report(report)
    plt = _plt()
    steps = list(report.steps)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, name in zip(axes, ("removed_new", "emerged_new")):
        obs, floor = report.curves[f"all/{name}"], report.curves[f"all/{name}_floor"]
        ax.plot(steps, obs, marker="o", color="k", label="observed")
        ax.plot(steps, floor, marker="x", color="tab:orange", label="noise floor")
        lo, hi = report.intervals[f"all/{name}_floor"]
        ax.fill_between(steps, lo, hi, color="tab:orange", alpha=0.2)
        ex = report.curves[f"all/{name}_excess"]
        elo, ehi = report.intervals[f"all/{name}_excess"]
        ax.plot(steps, ex, color="tab:purple", label="excess")
        ax.fill_between(steps, elo, ehi, color="tab:purple", alpha=0.15)
        ax.axhline(0, color="gray", linewidth=0.5)
        _mark_boundary(ax, report)
        ax.set_title(name.replace("_new", " (new at this checkpoint)"), fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_orders(report: TrackReport, path: str | os.PathLike, *, index: int = -1) -> Path:
    """Strength by order (A⁺ up, A⁻ down) of removed, preserved and emerged sets at one checkpoint."""
    _check_report(report)
    if not isinstance(index, int) or not -len(report.steps) <= index < len(report.steps):
        raise ValueError(f"index: expected a checkpoint index in [{-len(report.steps)}, {len(report.steps)}), got {index!r}")
    plt = _plt()
    kinds = [k for k in ("and", "or") if f"{k}/removed_strength_plus" in report.curves]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        width = 0.27
        for j, name in enumerate(SET_COLORS):
            # NaN (no probe has the set) comes back from report.json as None
            plus = _nan(report.curves[f"{kind}/{name}_strength_plus"][index])
            minus = _nan(report.curves[f"{kind}/{name}_strength_minus"][index])
            xs = [k + (j - 1) * width for k in range(len(plus))]
            ax.bar(xs, plus, width, color=SET_COLORS[name], label=name)
            ax.bar(xs, [-m for m in minus], width, color=SET_COLORS[name], alpha=0.5)
        ax.axhline(0, color="k", linewidth=0.5)
        ax.set_xticks(range(len(plus)))  # whole orders (matplotlib's own ticks for n=1: 0.0, 0.2, 0.4, ...)
        ax.set_xlabel("order")
        ax.set_ylabel("A+ (up) / A- (down), share of the set's |I|")
        ax.set_title(f"{kind.upper()} strength by order, step {report.steps[index]}", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_rho_gamma(report: TrackReport, path: str | os.PathLike) -> Path:
    """ρ (and γ when a reference was given) of each set over steps, AND interactions."""
    _check_report(report)
    plt = _plt()
    steps = list(report.steps)
    panels = ["rho"] + (["gamma"] if report.gamma_available else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, measure in zip(axes[0], panels):
        for name, color in SET_COLORS.items():
            key = f"and/{name}_{measure}"
            ax.plot(steps, _nan(report.curves[key]), marker="o", color=color, label=name)
            if key in report.intervals:
                lo, hi = report.intervals[key]
                ax.fill_between(steps, _nan(lo), _nan(hi), color=color, alpha=0.15)
        _mark_boundary(ax, report)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_title({"rho": "uncancelled ratio ρ (AND)", "gamma": "sharing γ with the reference (AND)"}[measure],
                     fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_compare(labels: list[str], reports: list[TrackReport], logs: list[TrainingLog | None],
                 path: str | os.PathLike) -> Path:
    """Tracked runs side by side: cumulative excess removals and emergences beyond the noise floor (bootstrap band
    of the removals), held-out loss, and the training loss each run's Trainer logged (mean p_y where none did);
    each run's phase boundary dashed in its colour."""
    for report in reports:
        _check_report(report)
    for log in logs:
        _check_training(log)
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    have_train = any(log is not None and log.series.get("loss") for log in logs)
    for i, (label, report, log) in enumerate(zip(labels, reports, logs)):
        color = colors[i % len(colors)]
        label = f" {label}" if label.startswith("_") else label  # matplotlib leaves "_..." labels out of legends
        steps, c = list(report.steps), report.curves
        ax = axes[0][0]
        ax.plot(steps, c["all/removed_new_excess_cumulative"], marker="o", color=color, label=label)
        lo, hi = report.intervals["all/removed_new_excess_cumulative"]
        ax.fill_between(steps, lo, hi, color=color, alpha=0.12)
        emerged = "all/emerged_unshared_new_excess" if report.gamma_available else "all/emerged_new_excess"
        running, total = [], 0.0
        for x in c[emerged]:
            total += x
            running.append(total)
        axes[0][1].plot(steps, running, marker="o", color=color, label=label)
        losses = [(s, x) for s, x in zip(steps, c["heldout_loss"]) if x is not None]
        if losses:
            axes[1][0].plot(*zip(*losses), marker="s", color=color, label=label)
        if have_train:
            logged = [p for p in (log.series.get("loss", ()) if log is not None else ()) if p[0] <= steps[-1]]
            if logged:
                axes[1][1].plot(*zip(*logged), color=color, linewidth=0.9, label=label)
        else:
            axes[1][1].plot(steps, c["p_y_mean"], marker="o", color=color, label=label)
        if report.phase_boundary is not None:
            for ax in axes.flat:
                ax.axvline(report.phase_boundary, color=color, linestyle="--", linewidth=1)
    titles = ["excess removals beyond the noise floor (cumulative)", "excess emergence (cumulative)",
              "held-out loss", "training loss (logged)" if have_train else "mean p_y of the target"]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=9)
        if ax.get_lines():
            ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("step (dashed: phase boundary)")
    axes[0][0].axhline(0, color="gray", linewidth=0.5)
    axes[0][1].axhline(0, color="gray", linewidth=0.5)
    return _save(fig, path)


def write_report(report: TrackReport, out_dir: str | os.PathLike, *, sets: dict[str, Any] | None = None,
                 training: TrainingLog | None = None) -> Path:
    """All figures plus ``report.json`` and ``report.md`` in ``out_dir``; returns the path of report.md.

    ``sets``: :meth:`SFTTracker.sets <sftint_fast.sft.tracker.SFTTracker.sets>`, whose strongest removed and emerged
    interactions report.md then lists by their words. ``training``: the run's
    :class:`~sftint_fast.sft.training_log.TrainingLog`; its losses go into counts.png, report.md and
    ``training_log.json`` (the logged series and their values at the tracked steps; None removes an earlier
    report's ``training_log.json`` from ``out_dir``)."""
    _check_report(report)
    _check_training(training)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if training is not None:
        _atomic_write_text(out / "training_log.json", json.dumps(_json_safe(training.to_dict(report.steps)), indent=1))
    else:  # an earlier report's log in this folder would be read back (sftint compare) as this run's losses
        (out / "training_log.json").unlink(missing_ok=True)
    figures = {
        "counts.png": plot_counts(report, out / "counts.png", training=training),
        "floor.png": plot_floor(report, out / "floor.png"),
        "orders.png": plot_orders(report, out / "orders.png"),
        "rho_gamma.png": plot_rho_gamma(report, out / "rho_gamma.png"),
    }
    report.save(out / "report.json")
    md = out / "report.md"
    _atomic_write_text(md, markdown(report, figures=list(figures), sets=sets, training=training))
    return md


def write_tracker_report(tracker: Any, out_dir: str | os.PathLike, *, training: TrainingLog | None = None,
                         cost: dict[str, Any] | None = None,
                         report: TrackReport | None = None) -> tuple[TrackReport, Path]:
    """The whole report of a tracker in ``out_dir``: :func:`write_report` of ``tracker.report()`` with its sets
    (``sets.json`` and report.md's "what changed"), the run's ``training`` log, and ``cost`` entries (the training
    run's wall time, measured by the callback) added to ``report.cost``. Returns the report and report.md's path.
    ``report``: ``tracker.report()`` when the caller has it already."""
    import dataclasses

    report = tracker.report() if report is None else report
    if cost:
        report = dataclasses.replace(report, cost={**report.cost, **cost})
    tracker.save_sets(Path(out_dir) / "sets.json")
    return report, write_report(report, out_dir, sets=tracker.sets(), training=training)


def headline(report: TrackReport) -> dict[str, Any]:
    """The numbers a reader wants first, plus one sentence computed from them. Every figure covers the same
    interactions, AND and OR together: counts are summed over the kinds, and ``rho_*`` / ``gamma_*`` /
    ``mean_order_*`` (last checkpoint) are measured on each probe's AND and OR sets as one set (the ``all/``
    curves; ``report.curves["and/..."]`` / ``["or/..."]`` hold each kind's own). None where the report has no such
    curve (no reference for γ, or a report saved before the pooled measures existed)."""
    _check_report(report)
    c = report.curves

    def last(key: str) -> Any:
        return c[key][-1] if key in c else None

    excess_removed = c["all/removed_new_excess_cumulative"][-1]
    lo_removed = report.intervals["all/removed_new_excess_cumulative"][0][-1]
    emerged_key = "all/emerged_unshared_new_excess" if report.gamma_available else "all/emerged_new_excess"
    emerged_excess_total = sum(c[emerged_key])
    base = c["all/preserved"][0]
    # without a noise floor the floor counts as 0: the counts are raw, and the verdict must not name a floor
    floor = report.config.get("noise_floor") is not None
    above, beyond = ("above the noise floor", " beyond the noise floor") if floor else ("in the raw counts", "")
    if len(report.probes["kept"]) < 2:  # resampling one probe gives it back every time: the bounds are the estimate
        verdict = (f"Cumulative excess removals{beyond} are {count(excess_removed)} out of {base:.0f} "
                   "base salient interactions, from one probe: the bootstrap over probes has nothing to resample, so "
                   "there is no lower bound and no denoising stage is shown")
    else:
        # the denoising stage is an early window (METHOD.md section 6): later checkpoints' noise may sum a significant
        # removal back under 0, so the verdict takes the largest cumulative count whose lower bound is above 0, as
        # the phase-boundary rule does with its running maximum
        cumulative = c["all/removed_new_excess_cumulative"]
        lows = report.intervals["all/removed_new_excess_cumulative"][0]
        significant = [t for t in range(1, len(cumulative)) if lows[t] > 0]
        peak = max(significant, key=lambda t: (cumulative[t], -t)) if significant else None
        if peak is not None:
            verdict = (f"A denoising stage {above} is visible: cumulative excess removals{beyond} "
                       f"reached {count(cumulative[peak])} by step {report.steps[peak]} (bootstrap lower bound "
                       f"{bound(lows[peak])} > 0) out of {base:.0f} base salient interactions"
                       + ("" if peak == len(cumulative) - 1 else
                          f"; by step {report.steps[-1]} they are {count(excess_removed)} (bootstrap lower bound "
                          f"{bound(lo_removed)})"))
        else:
            verdict = (f"No denoising stage {above} is visible: cumulative excess removals are "
                       f"{count(excess_removed)} (bootstrap lower bound {bound(lo_removed)} <= 0) out of {base:.0f} "
                       "base salient interactions")
    verdict += ("; emergence" + beyond
                + (" (of interactions not shared with the reference)" if report.gamma_available else "")
                + f" totals {count(emerged_excess_total)}"
                + (f", and the phase boundary falls at step {report.phase_boundary}." if report.phase_boundary is not None
                   else ", and no phase boundary is reported."))
    if not floor:
        verdict += " No noise floor was measured (noise_floor=None): the floor counts as 0, so these are raw counts."
    return {
        "steps": list(report.steps), "base_salient": base, "removed": c["all/removed"][-1],
        "preserved": c["all/preserved"][-1], "emerged": c["all/emerged"][-1],
        "removed_excess_cumulative": excess_removed,
        "removed_excess_cumulative_lo": lo_removed if len(report.probes["kept"]) > 1 else None,
        "emerged_excess_total": emerged_excess_total, "phase_boundary": report.phase_boundary,
        "heldout_loss_min_step": report.heldout_loss_min_step, "p_y_mean": c["p_y_mean"],
        **{f"{measure}_{name}": last(f"all/{name}_{measure}")
           for measure in ("rho", "gamma", "mean_order") for name in ("removed", "emerged")},
        "verdict": verdict,
    }


def markdown(report: TrackReport, *, figures: list[str], sets: dict[str, Any] | None = None,
             examples: int = 3, training: TrainingLog | None = None) -> str:
    """The report as Markdown: headline, per-checkpoint table, what changed (with ``sets``: per probe, the
    ``examples`` strongest removed and emerged AND / OR interactions by their words), notes, figures. With
    ``training`` (the run's log), the table gains its training loss (mean since the previous tracked step) and
    eval loss, and a paragraph compares the training loss at the phase boundary with the last step's."""
    _check_report(report)
    _check_training(training)
    h = headline(report)
    c = report.curves
    logged = training.at(report.steps) if training is not None else None
    # eval_loss, or eval_<name>_loss per eval dataset: a column for each logged at or before a tracked step
    evals = [] if logged is None else [n for n in logged if n != "train_loss" and any(x is not None for x in logged[n])]
    extra_head = "" if logged is None else " train loss |" + "".join(
        " eval loss |" if n == "eval_loss" else f" {n} |" for n in evals)
    # ρ and γ are per kind (AND and OR sets are kept apart, METHOD.md section 4), the counts summed over kinds
    kinds = [k for k in ("and", "or") if f"{k}/emerged_rho" in c]
    measure_head = "".join(f" ρ emerged ({k.upper()}) | γ emerged ({k.upper()}) |" for k in kinds)
    head = ("| step | removed | preserved | emerged | new removed (floor, excess) | new emerged (floor, excess) |"
            + measure_head + " mean p_y | held-out loss |" + extra_head)
    floor = report.config["noise_floor"]  # its draws only where there was one
    floor = f"{floor} (K={report.config['noise_draws']})" if floor is not None else "none"
    lines = ["# SFT interaction tracking report", "", h["verdict"], "",
             f"- solver: {report.solver}; noise floor: {floor}; threshold: {report.config['threshold_reference']}, "
             f"tau={report.config['tau']}; hysteresis: {report.config['hysteresis']}; "
             f"persistence: {report.config['persistence']}",
             f"- probes tracked: {len(report.probes['kept'])}; gamma available: {report.gamma_available}",
             *_template_line(report.config),
             f"- phase boundary: {_opt(report.phase_boundary)}; held-out loss minimum at step: "
             f"{_loss_min_step(report)}",
             f"- floor cost: {report.floor_cost['rows_decomposed']:.0f} extra decompositions, "
             f"{report.floor_cost['seconds']:.1f} s, no forward passes",
             *_cost_line(report.cost),
             "- numerical error (engine: trie vs naive; precision: bf16 vs fp32, RMS to compare with the 'iid' "
             "floor's sd): "
             + ("not measured (numerics_check=False, or values fed with add_values)" if report.numerics is None
                else f"{report.numerics}"), "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for t, step in enumerate(report.steps):
        loss = c["heldout_loss"][t]
        measures = "".join(f" {_fmt(c[f'{k}/emerged_rho'][t])} | {_fmt(_at(c.get(f'{k}/emerged_gamma'), t))} |"
                           for k in kinds)
        lines.append(
            f"| {step} | {c['all/removed'][t]:.0f} | {c['all/preserved'][t]:.0f} | {c['all/emerged'][t]:.0f} "
            f"| {c['all/removed_new'][t]:.0f} ({c['all/removed_new_floor'][t]:.1f}, {c['all/removed_new_excess'][t]:+.1f}) "
            f"| {c['all/emerged_new'][t]:.0f} ({c['all/emerged_new_floor'][t]:.1f}, {c['all/emerged_new_excess'][t]:+.1f}) "
            f"|{measures} {c['p_y_mean'][t]:.3f} | {_fmt_loss(loss)} |"
            + ("" if logged is None else f" {_fmt_loss(logged['train_loss'][t])} |"
               + "".join(f" {_fmt_loss(logged[n][t])} |" for n in evals)))
    flagged = {name: [sum(c[f"{k}/{name}_new_irrelevant"][t] for k in kinds if f"{k}/{name}_new_irrelevant" in c)
                      for t in range(len(report.steps))] for name in ("removed", "emerged")}
    lines += ["", "removed, preserved and emerged count the probes whose target is still relevant at that checkpoint, "
              + ("summed over AND and OR" if len(kinds) > 1 else "of AND interactions only")
              + "; ρ (mean over probes) and γ (pooled) of the emerged set are given per kind, over the same probes. "
              "A probe flagged target-irrelevant (p_y under "
              f"{report.config['irrelevant_fraction']:g} of its base value) leaves these totals and measures while "
              "flagged (its changes are counted apart), so they need not be monotone when the flagged set changes "
              f"(flagged probes per checkpoint: {c['irrelevant_probes']}; their new removals per checkpoint: "
              f"{_counts(flagged['removed'])}, new emergences: {_counts(flagged['emerged'])})."]
    if logged is not None:
        lines += _training_paragraph(report, training, logged)
    if sets is not None:
        lines += _what_changed(sets, examples)
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _what_changed(sets: dict[str, Any], examples: int) -> list[str]:
    lines = ["", f"## What changed by step {sets['step']}", "",
             "Per probe, the strongest removed (salient at the base, `I` at the base → now) and emerged (`I` now, "
             "since the step it appeared) interactions; all of them are in sets.json.", ""]
    for i, probe in enumerate(sets["probes"]):
        flag = " (target now irrelevant)" if probe["irrelevant"] else ""
        # values fed with add_values have neither prompts nor words: the probe's row
        name = probe["prompt"] if probe["prompt"] is not None else probe["words"] or f"probe {i}"
        lines.append(f"- **{name}**{flag}, "
                     f"p_y {probe['p_y']:.3f}")
        for kind in ("and", "or"):
            if kind not in probe:
                continue
            sets_of = probe[kind]
            removed = [f"{_words(r)} {_signed(r['base_value'])} → {_signed(r['value'])}"
                       for r in sets_of["removed"][:examples]]
            emerged = [f"{_words(r)} {_signed(r['value'])} (step {r['first_step']})"
                       for r in sets_of["emerged"][:examples]]
            lines.append(f"  - {kind.upper()}: {len(sets_of['removed'])} removed"
                         + (f" ({'; '.join(removed)})" if removed else "")
                         + f", {len(sets_of['emerged'])} emerged" + (f" ({'; '.join(emerged)})" if emerged else "")
                         + f", {sets_of['preserved']} preserved")
    return lines


def _training_paragraph(report: TrackReport, training: TrainingLog, logged: dict[str, list]) -> list[str]:
    steps, train = list(report.steps), logged["train_loss"]
    lines = ["", "## Training loss", "",
             f"From {training.source}: 'train loss' is the mean of the training losses logged after the previous "
             "tracked step up to this one (each weighted by the steps it covers), 'eval loss' (or each eval "
             "dataset's) the last one evaluated at or before it."]
    known = [(s, x) for s, x in zip(steps, train) if x is not None]
    if report.phase_boundary is None or not known:
        return lines
    at_boundary = [(s, x) for s, x in known if s <= report.phase_boundary]
    if not at_boundary or known[-1][0] <= report.phase_boundary:
        return lines
    (before_step, before), last_step, last = at_boundary[-1], known[-1][0], known[-1][1]
    where = ("" if before_step == report.phase_boundary else
             f" (at step {before_step}, the last tracked step at or before it with a logged training loss)")
    if math.isnan(before) or math.isnan(last):
        return lines + ["", f"The denoising stage ends at step {report.phase_boundary}, where the training loss was "
                            f"{_fmt_loss(before)}{where}; by step {last_step} it was {_fmt_loss(last)}: the run diverged."]
    trend = "fell to" if last < before else "rose to" if last > before else "stayed at"
    lines += ["", f"The denoising stage ends at step {report.phase_boundary}, where the training loss was "
                 f"{_fmt(before)}{where}; by step {last_step} it {trend} {_fmt(last)} ({last - before:+.3f}). In the "
                 "paper's reading, what training adds after the denoising stage is mostly overfitted (high-order, "
                 "low-γ) interactions; "
                 + (f"the held-out loss (lowest at step {report.heldout_loss_min_step}) tells whether the lower "
                    "training loss still generalised." if report.heldout_loss_min_step is not None else
                    "the eval loss tells whether the lower training loss still generalised."
                    if any(x is not None for n in logged if n != "train_loss" for x in logged[n]) else
                    "without a held-out loss (sftint track --heldout) or an eval loss, nothing here tells whether "
                    "the lower training loss still generalised.")]
    return lines


def _template_line(config: dict[str, Any]) -> list[str]:
    """The chat template variables the probes (and held-out chats) were rendered with, when set: another
    ``enable_thinking`` scores another position, so the report says which."""
    kwargs = config.get("chat_template_kwargs")  # absent from a report.json an earlier version wrote
    if not kwargs:
        return []
    return [f"- chat template variables (chat_template_kwargs): `{json.dumps(kwargs, sort_keys=True)}`"]


def _cost_line(cost: dict[str, Any]) -> list[str]:
    if not cost.get("checkpoints_timed"):
        return []
    rate = cost.get("variants_per_second")
    return [f"- tracking cost: {cost['seconds_per_checkpoint']:.1f} s per checkpoint after the base (mean of "
            f"{cost['checkpoints_timed']}): evaluation {cost['seconds_evaluate']:.1f} s"
            + (f" ({rate:.0f} variants/s)" if rate else "")
            + f", held-out loss {cost['seconds_heldout']:.1f} s, decomposition {cost['seconds_decompose']:.1f} s, noise floor {cost['seconds_floor']:.1f} s; "
            f"the base took {_fmt_s(cost.get('base_seconds'))} (games, numerical checks)"
            + (f"; after the base, tracking took {cost['run_seconds_tracking']:.0f} s of the training run's "
               f"{cost['run_seconds']:.0f} s ({cost['run_seconds_tracking'] / cost['run_seconds']:.0%})"
               if cost.get("run_seconds") else "")]


def _opt(x: Any) -> str:
    return "none" if x is None else str(x)


def _loss_min_step(report: TrackReport) -> str:
    """The step of the lowest held-out loss, or why there is none."""
    if report.heldout_loss_min_step is not None:
        return str(report.heldout_loss_min_step)
    measured = any(x is not None for x in report.curves.get("heldout_loss", []))
    return "none (" + ("no finite held-out loss" if measured else "no held-out loss") + ")"


def _at(curve: list | None, t: int) -> Any:
    """A curve's value at checkpoint ``t``; None for a curve the report lacks (γ without a reference)."""
    return None if curve is None else curve[t]


def _counts(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.0f}" for x in xs) + "]"


def _fmt_s(x: Any) -> str:
    return "–" if x is None else f"{x:.1f} s"


def _check_training(training: Any) -> None:
    if training is not None and not isinstance(training, TrainingLog):
        raise TypeError(f"training: expected a TrainingLog (sftint_fast.sft.training_log) or None, "
                        f"got {type(training).__name__}")


def _words(row: dict[str, Any]) -> str:
    """``{a, b}``; a word holding a comma, brace or space is quoted (``{Hubble, "Telescope,"}``)."""
    if row.get("words") is None:
        return f"S={row['subset']}"
    return "{" + ", ".join(f'"{w}"' if any(c in w for c in ",{} ") else w for w in row["words"]) + "}"


def count(x: float) -> str:
    """An excess count: whole ones as integers, the fractions a mean over K floor draws gives to one decimal
    (-1/3 is "-0.3", not "-0")."""
    if abs(x - round(x)) < 1e-9:
        return f"{round(x):.0f}"
    return bound(x)


def bound(x: float | None) -> str:
    """A bootstrap bound on a count, to one decimal, where 0 decides: 0.3 is "0.3", not "0", and -0.04 is "0.0";
    "–" for None (one probe: no bound)."""
    if x is None:
        return "–"
    text = f"{x:.1f}"
    return "0.0" if text == "-0.0" else text


def _signed(x: float) -> str:
    """An interaction to 3 decimals, or to 4 significant digits where those would hide it (``|x| < 0.01``) or be
    too many (``|x| >= 1e6``): a game of tiny values is not shown as "+0.000 → -0.000"."""
    return f"{x:+.3f}" if x == 0 or 0.01 <= abs(x) < 1e6 else f"{x:+.3e}"


def _fmt(x: Any) -> str:
    """A number to 3 decimals; "–" for None or NaN (a mean over no set is undefined)."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _fmt_loss(x: Any) -> str:
    """A loss to 3 decimals; "–" when none was measured, "NaN" when it was (a diverged run shows as such)."""
    return "NaN" if isinstance(x, float) and math.isnan(x) else _fmt(x)


def _nan(xs: list) -> list[float]:
    return [math.nan if x is None else x for x in xs]


def _save(fig: Any, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    from sftint_fast._files import atomic_write

    try:
        fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:  # a failed write leaves neither a partial temp file (atomic_write) nor an open figure
        plt.close(fig)
