"""scripts/compare_tracking_options.py on a small saved run: the option grid and the re-tracked report."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from sftint_fast.interactions.harsanyi import inverse_harsanyi
from sftint_fast.sft.tracker import SFTTracker

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_tracking_options.py"


def _saved_run(root: Path, **options) -> SFTTracker:
    g = torch.Generator().manual_seed(0)
    interactions = 0.02 * torch.randn(6, 32, generator=g, dtype=torch.float64)
    interactions[:, [3, 5, 12, 31]] = 1.0
    tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=50, out_dir=root / "tracker",
                         progress=False, hysteresis=True, persistence=2, **options)
    for t in range(5):
        current = interactions.clone()
        if t >= 2:
            current[:, 12] = 0.0                                   # a real removal from step 2 on
        values = inverse_harsanyi(current) + 0.01 * torch.randn(6, 32, generator=g, dtype=torch.float64)
        tracker.add_values(t, values, heldout_loss=math.nan if t == 4 else 2.0 - 0.1 * t)  # diverged at the end
    return tracker


def test_compare_options_grid_and_report(tmp_path):
    tracker = _saved_run(tmp_path)
    out = tmp_path / "options.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--out", str(out), "--report",
                           str(tmp_path / "again")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2 * 3 * 2
    c = tracker.config
    own = next(r for r in rows if r["threshold_reference"] == c.threshold_reference and r["hysteresis"] == c.hysteresis
               and r["persistence"] == c.persistence and r["noise_floor"] == c.noise_floor)
    curves = tracker.report().curves
    # the grid's row for the run's own options re-derives the run's own counts from the saved values
    assert own["removed_observed"] == sum(curves["all/removed_new"]) > 0
    assert own["removed_floor"] == sum(curves["all/removed_new_floor"])
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["curves"]["all/removed_new"] == curves["all/removed_new"]
    assert again["curves"]["heldout_loss"][-2:] == [1.7, "nan"]  # the saved NaN loss read back as NaN, not null
    assert (tmp_path / "again" / "report.md").exists()
    # --current-defaults: the saved run used METHOD.md's marked set logic, the report this version's defaults
    marked = tmp_path / "marked"
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--only-report", "--current-defaults",
                           "--report", str(marked)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads((marked / "report.json").read_text())["config"]["persistence"] == SFTTracker(None).config.persistence


def test_compare_options_refuses_a_run_without_checkpoints(tmp_path):
    (tmp_path / "tracker").mkdir()
    (tmp_path / "tracker" / "config.json").write_text(json.dumps({"tracker": {"tau": 0.05}}))
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "expected at least 2 saved checkpoints" in done.stderr


def test_compare_options_report_keeps_the_runs_phase_boundary_rule(tmp_path):
    """--report re-tracks with "the run's own options", but left the phase-boundary rule out: a run saved with
    boundary_removed_fraction=0.5 was reported with the default 0.9 (and without a word)."""
    tracker = _saved_run(tmp_path, boundary_removed_fraction=0.5, boundary_significant=False)
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--only-report", "--report",
                           str(tmp_path / "again")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["config"]["boundary_removed_fraction"] == 0.5 and again["config"]["boundary_significant"] is False
    assert again["phase_boundary"] == tracker.report().phase_boundary


def test_compare_options_ratio_of_no_change_is_nan(tmp_path):
    """No observed change and no floor gave floor/observed = inf, the worst ratio, for an option that saw nothing."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import compare_tracking_options as script
    finally:
        sys.path.remove(str(SCRIPT.parent))
    steps = [(t, torch.zeros(2, 8, dtype=torch.float64) + torch.arange(8), None, None) for t in range(3)]
    row = script.evaluate_options(steps, {"persistence": 1}, {"andor_method": "and", "min_base_py": 0.0,
                                                              "bootstrap": 20})
    assert row["removed_observed"] == row["removed_floor"] == 0.0
    assert row["removed_floor_over_observed"] != row["removed_floor_over_observed"]  # NaN
