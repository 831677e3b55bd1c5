"""Which tracking options separate real change from noise best, on a saved run's real checkpoints.

Re-runs the SFT tracker (METHOD.md section 7) on the game values saved by a run (``<run>/tracker/step_*.safetensors``,
e.g. from ``sftint demo``) with every combination of threshold reference, hysteresis, persistence and noise null,
with no forward passes. For each combination it reports the observed new removals/emergences summed over the
checkpoints, their noise floors, and floor/observed (lower = the counts say more than noise).

    python scripts/compare_tracking_options.py RUN_DIR [--out options.json] [--report DIR]

``--report DIR`` also re-tracks the saved values with the run's own options (``--current-defaults``: this version's
default set logic), with this version's noise floor, and writes the report (report.md, report.json, plots) to DIR.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from sftint_fast.sft.tracker import SFTTracker, loss_from_json


def load_run(run: Path) -> list[tuple[int, torch.Tensor, torch.Tensor, float | None]]:
    steps = []
    for path in sorted((run / "tracker").glob("step_*.safetensors")):
        tensors = load_file(str(path))
        meta = json.loads(path.with_suffix(".json").read_text())
        step = int(path.stem.split("_")[1])
        steps.append((step, tensors["values"], tensors["p_y"], loss_from_json(meta.get("heldout_loss"))))
    if len(steps) < 2:
        raise ValueError(f"{run}: expected at least 2 saved checkpoints under tracker/, got {len(steps)}")
    return steps


def retrack(steps, options: dict, base_config: dict) -> SFTTracker:
    tracker = SFTTracker(None, **{**base_config, **options}, progress=False)
    for step, values, p_y, loss in steps:
        tracker.add_values(step, values, p_y=p_y, heldout_loss=loss)
    return tracker


def evaluate_options(steps, options: dict, base_config: dict) -> dict:
    curves = retrack(steps, options, base_config).report().curves
    out = dict(options)
    for change in ("removed", "emerged"):
        observed = sum(curves[f"all/{change}_new"])
        floor = sum(curves[f"all/{change}_new_floor"])
        out.update({f"{change}_observed": observed, f"{change}_floor": floor,
                    # no change and no floor: no ratio (inf, the worst, is for a floor where nothing changed)
                    f"{change}_floor_over_observed": floor / observed if observed else float("inf") if floor
                    else float("nan")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--report", type=Path, default=None, help="write the run's own options' report here")
    parser.add_argument("--only-report", action="store_true", help="skip the options grid")
    parser.add_argument("--current-defaults", action="store_true",
                        help="the report uses this version's default set logic, not the run's saved options")
    args = parser.parse_args()
    saved = json.loads((args.run / "tracker" / "config.json").read_text())
    config = saved["tracker"]
    base_config = {k: config[k] for k in ("qthres", "tau", "andor_method", "andor_niter", "andor_lr", "warm_start",
                                           "seed", "noise_draws", "min_base_py", "irrelevant_fraction", "bootstrap",
                                           "boundary_removed_fraction", "boundary_significant")
                   if k in config}
    steps = load_run(args.run)
    if args.report:
        from sftint_fast.plot import write_report

        keys = ("threshold_reference", "hysteresis", "persistence", "noise_floor")
        own = {} if args.current_defaults else {k: config[k] for k in keys if k in config}
        path = write_report(retrack(steps, own, base_config).report(), args.report)
        print(f"report: {path}", flush=True)
    if args.only_report:
        return
    grid = itertools.product(["base", "checkpoint"], [True, False], [1, 2, 3], ["order_matched", "iid"])
    rows = []
    for reference, hysteresis, persistence, null in grid:
        options = dict(threshold_reference=reference, hysteresis=hysteresis, persistence=persistence,
                       noise_floor=null)
        rows.append(evaluate_options(steps, options, base_config))
        r = rows[-1]
        print(f"{reference:10s} hyst={hysteresis!s:5s} pers={persistence} {null:13s} "
              f"removed {r['removed_observed']:6.1f} floor {r['removed_floor']:6.1f} ({r['removed_floor_over_observed']:.2f})  "
              f"emerged {r['emerged_observed']:6.1f} floor {r['emerged_floor']:6.1f} ({r['emerged_floor_over_observed']:.2f})",
              flush=True)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
