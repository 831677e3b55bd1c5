"""InteractionCallback inside a Trainer under 2-process gloo DDP (torchrun, CPU) vs the same run in one process."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "dist_scripts" / "sft_callback.py"
COUNTS = ("removed", "preserved", "emerged", "removed_new", "emerged_new", "irrelevant_probes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp: Path, nproc: int, *extra: str) -> tuple[dict, list[dict]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                     "--master_port", str(_free_port())]
    out = tmp / "metrics.json"
    proc = subprocess.run(launcher + [str(SCRIPT), "--out", str(out), "--work", str(tmp), *extra], env=env,
                          capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        raise AssertionError(f"{nproc or 1} process(es) failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(max(nproc, 1))]
    return json.loads(out.read_text()), ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single = _run(tmp_path_factory.mktemp("single"), 0)
    ddp_dir = tmp_path_factory.mktemp("ddp")
    return single, _run(ddp_dir, 2), ddp_dir


def test_ddp_callback_logs_the_single_process_metrics(runs):
    (single, _), (ddp, _), _ = runs
    assert sorted(single["metrics"]) == sorted(ddp["metrics"]) == ["0", "1", "2", "3"]
    # the Trainer's own loss is still logged at every tracked step (trainer.log must not swallow it)
    assert sorted(single["losses"]) == sorted(ddp["losses"]) == ["1", "2", "3"]
    def computed(metrics):  # all but the timings
        return {k: v for k, v in metrics.items() if not k.startswith("interactions/tracking_")}

    assert computed(single["metrics"]["0"]) == computed(ddp["metrics"]["0"])  # base model: the same, bit for bit
    for step, expected in single["metrics"].items():
        got = ddp["metrics"][step]
        assert set(got) == set(expected), step
        for name, value in expected.items():
            if name.startswith("interactions/tracking_"):  # timings: measured, not computed
                assert got[name] > 0 and value > 0, (step, name)
            elif name.removeprefix("interactions/") in COUNTS:
                assert got[name] == value, (step, name)
            else:  # DDP averages two half-batch gradients: weights equal up to float rounding
                assert math.isclose(got[name], value, rel_tol=1e-3, abs_tol=1e-6), (step, name, got[name], value)


def test_ddp_callback_shards_probes_and_keeps_ranks_in_step(runs):
    (_, (one,)), (_, ranks), ddp_dir = runs
    games = set(one["evaluated"])
    per_rank = [set(r["evaluated"]) for r in ranks]
    assert all(per_rank) and not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == games
    assert sum(len(r["evaluated"]) for r in ranks) == len(one["evaluated"])  # every probe once per checkpoint
    assert [r["steps"] for r in ranks] == [one["steps"]] * 2 == [[0, 1, 2, 3]] * 2
    assert ranks[0]["values_sum"] == ranks[1]["values_sum"]  # every rank holds the same gathered values
    assert math.isclose(ranks[0]["values_abs_sum"], one["values_abs_sum"], rel_tol=1e-5)
    assert sorted(p.name for p in (ddp_dir / "track").glob("step_*.json")) == [
        f"step_{s:09d}.json" for s in range(4)]


def test_ddp_stop_at_boundary_stops_every_rank_at_the_same_step(tmp_path):
    """The main process finds the phase boundary and every rank stops there (a rank that went on would hang in the
    next step's collectives, so the run finishing at all is part of the check)."""
    _, ranks = _run(tmp_path, 2, "--stop-at-boundary")
    boundary = ranks[0]["phase_boundary"]
    assert boundary is not None and 0 < boundary < 10
    assert [r["phase_boundary"] for r in ranks] == [boundary] * 2
    assert [r["global_step"] for r in ranks] == [boundary] * 2
    assert [r["steps"][-1] for r in ranks] == [boundary] * 2


def test_ddp_max_overhead_keeps_every_rank_on_the_main_process_schedule(tmp_path):
    """With max_overhead the main process sets each next tracking step from its own timings and every rank follows
    (a rank tracking at another step would hang in the collectives, so finishing is part of the check)."""
    main_log, ranks = _run(tmp_path, 2, "--max-overhead", "0.3")
    steps = ranks[0]["steps"]
    assert ranks[1]["steps"] == steps and ranks[1]["next_step"] == ranks[0]["next_step"]
    scheduled = [main_log["metrics"][str(s)]["interactions/next_tracking_step"] for s in steps]
    final = ranks[0]["global_step"]  # the step training ended at: tracked whatever the schedule
    assert steps[-1] == final and scheduled[-2] >= final and scheduled[-1] == ranks[0]["next_step"]
    assert steps[1:-1] == scheduled[:-2]  # tracked when due, no other
    assert all(b - a >= 1 for a, b in zip(steps, steps[1:]))


def test_ddp_stop_file_stops_every_rank_at_the_step_the_main_process_sees_it(tmp_path):
    """Only the main process looks for the file (written at step 2); every rank stops there."""
    _, ranks = _run(tmp_path, 2, "--stop-file", str(tmp_path / "STOP"))
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert [r["stopped_by"] for r in ranks] == [{"phase_boundary": 1}] * 2
