"""sftint compare: tracked runs side by side, and the report / training-log files it reads back."""
import json
import math

import pytest
import torch

from sftint_fast.cli import main
from sftint_fast.interactions.harsanyi import inverse_harsanyi
from sftint_fast.plot import headline, write_report
from sftint_fast.sft.compare import compare_runs, load_run
from sftint_fast.sft.tracker import SFTTracker, TrackReport
from sftint_fast.sft.training_log import TrainingLog


def _run(folder, *, seed, drift, base_seed=3, steps=(0, 2, 4, 6), tau=0.05, log=True):
    """A run folder as sftint track writes it: the same base values for the same base_seed, then a drift."""
    g = torch.Generator().manual_seed(base_seed)
    I = 0.3 * torch.randn(6, 2**4, generator=g, dtype=torch.float64)
    v0 = inverse_harsanyi(I)
    noise = torch.Generator().manual_seed(seed)
    tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=50, noise_draws=2, tau=tau, seed=seed)
    for t in steps:
        v = v0 if t == 0 else v0 + drift * t * torch.randn(v0.shape, generator=noise, dtype=torch.float64)
        tracker.add_values(t, v, heldout_loss=2.0 - 0.05 * t + 0.01 * seed)
    training = None
    if log:
        training = TrainingLog.from_history([{"step": s, "loss": 3.0 - 0.1 * s - 0.01 * seed}
                                             for s in range(1, steps[-1] + 1)], source=f"{folder}/trainer_state.json")
    write_report(tracker.report(), folder, training=training)
    return tracker.report(), training


def test_report_and_training_log_files_read_back(tmp_path):
    report, log = _run(tmp_path / "a", seed=1, drift=0.05)
    back = TrackReport.load(tmp_path / "a")
    assert back.to_dict() == report.to_dict() and back.steps == report.steps
    assert TrackReport.load(tmp_path / "a" / "report.json").to_dict() == report.to_dict()
    assert TrainingLog.load(tmp_path / "a" / "training_log.json") == log
    nan = TrainingLog.from_history([{"step": 1, "loss": float("nan")}], source="x")
    write_report(report, tmp_path / "b", training=nan)
    assert "NaN" not in (tmp_path / "b" / "training_log.json").read_text()  # strict JSON
    assert math.isnan(TrainingLog.load(tmp_path / "b" / "training_log.json").series["loss"][0][1])


def test_report_without_training_log_removes_an_older_one(tmp_path):
    """A folder rewritten without a training log must not keep the previous run's: compare would read it back as
    this run's losses."""
    _run(tmp_path / "a", seed=1, drift=0.05)
    assert (tmp_path / "a" / "training_log.json").is_file()
    report, _ = _run(tmp_path / "a", seed=2, drift=0.05, log=False)
    assert not (tmp_path / "a" / "training_log.json").exists()
    assert load_run(tmp_path / "a")[1] is None


@pytest.mark.parametrize("text, message", [
    ("{", "could not read it"),
    ("[]", r"missing \['steps'"),
    (json.dumps({"steps": [0]}), r"missing \['config', 'curves'"),
])
def test_bad_report_files_are_refused(tmp_path, text, message):
    (tmp_path / "report.json").write_text(text)
    with pytest.raises(ValueError, match=f"report.json: expected a tracking report .*{message}"):
        TrackReport.load(tmp_path)
    with pytest.raises(ValueError, match="expected a tracking report .*could not read it"):
        TrackReport.load(tmp_path / "nowhere")
    (tmp_path / "training_log.json").write_text(json.dumps({"series": {"loss": [[1]]}, "source": "x"}))
    with pytest.raises(ValueError, match="training_log.json: expected a training log"):
        TrainingLog.load(tmp_path / "training_log.json")


def test_compare_cli_puts_runs_side_by_side(tmp_path, capsys):
    reports = {}
    for name, seed, drift in (("full", 1, 0.08), ("lora", 2, 0.02)):
        reports[name] = _run(tmp_path / name, seed=seed, drift=drift, log=name == "full")[0]
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "full"), str(tmp_path / "lora"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "compare.json").read_text())
    assert data["differences"] == [] and [r["label"] for r in data["rows"]] == ["full", "lora"]
    for row, name in zip(data["rows"], ("full", "lora")):
        report, h = reports[name], headline(reports[name])
        assert row["steps"] == [0, 2, 4, 6] and row["phase_boundary"] == report.phase_boundary
        for key in ("base_salient", "removed", "emerged", "removed_excess_cumulative",
                    "removed_excess_cumulative_lo", "emerged_excess_total"):
            assert row[key] == pytest.approx(h[key]), key
        assert row["heldout_loss_last"] == pytest.approx(report.curves["heldout_loss"][-1])
        assert row["p_y_first"] == pytest.approx(report.curves["p_y_mean"][0])
        assert row["seconds_per_checkpoint"] is None  # add_values: no checkpoint was evaluated here
    # the training loss where the run logged one: mean of steps 5 and 6 of the full run
    assert data["rows"][0]["train_loss_last"] == pytest.approx(3.0 - 0.1 * 5.5 - 0.01)
    assert data["rows"][1]["train_loss_last"] is None
    md = (out / "compare.md").read_text()
    assert "start from the same base values and were tracked with the same options" in md
    assert md.count("\n| full |") == 1 and md.count("\n| lora |") == 1
    assert (out / "compare.png").stat().st_size > 0
    assert f"comparison: {out / 'compare.md'}" in printed and "full: excess removals" in printed
    assert "not like for like" not in printed


def test_compare_says_when_runs_are_not_like_for_like(tmp_path):
    _run(tmp_path / "a", seed=1, drift=0.05)
    _run(tmp_path / "b", seed=1, drift=0.05, tau=0.1)
    _run(tmp_path / "c", seed=1, drift=0.05, base_seed=9)
    _run(tmp_path / "d", seed=1, drift=0.05, steps=(0, 3, 6))
    result, md = compare_runs([tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "d"], tmp_path / "cmp",
                              labels=["A", "B", "C", "D"])
    diffs = result["differences"]
    assert ("tracked steps: A [0, 2, 4, 6], B [0, 2, 4, 6], C [0, 2, 4, 6], D [0, 3, 6] (a change counts once it "
            "lasts 2 checkpoints, so other step grids count differently)") in diffs
    assert "option tau: A 0.05, B 0.1, C 0.05, D 0.05" in diffs
    assert not any(d.startswith("B starts from other base values") for d in diffs)
    assert any(d.startswith("C starts from other base values than A") for d in diffs)
    assert "**Not like for like**" in md.read_text()


def test_compare_refuses_bad_runs_and_labels(tmp_path, capsys):
    _run(tmp_path / "a", seed=1, drift=0.05, log=False)
    _run(tmp_path / "b", seed=2, drift=0.05, log=False)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cases = [([a], "expected at least two run folders to compare, got 1"),
             ([a, str(tmp_path / "none")], "expected the output folder of sftint track / demo"),
             ([a, str(tmp_path)], "report.json: expected a tracking report"),
             ([a, b, "--labels", "x"], "expected one label per run (2), got 1"),
             ([a, b, "--labels", "x,x"], "expected distinct labels"),
             ([a, b, "--labels", "x,"], "labels: expected non-empty names, got ['x', '']"),
             ([a, b, a + "/"], f"runs: expected distinct run folders, got {a!r} twice")]
    for args, message in cases:
        assert main(["compare", *args, "--out", str(tmp_path / "cmp")]) == 2
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "cmp").exists()  # nothing written before the runs are read


def test_a_diverged_run_shows_nan_losses_where_no_loss_shows_a_dash(tmp_path):
    report, _ = _run(tmp_path / "ok", seed=1, drift=0.05)
    diverged = TrainingLog.from_history([{"step": s, "loss": 2.0 if s < 4 else float("nan")} for s in range(1, 7)],
                                        source="x")
    write_report(report, tmp_path / "bad", training=diverged)
    rows = [r for r in (tmp_path / "bad" / "report.md").read_text().splitlines() if r.startswith("| 6 |")]
    assert rows and rows[0].rstrip().endswith("| NaN |")  # step 6's train loss: the mean of NaN losses
    rows = [r for r in (tmp_path / "bad" / "report.md").read_text().splitlines() if r.startswith("| 2 |")]
    assert rows and rows[0].rstrip().endswith("| 2.000 |")
    _run(tmp_path / "none", seed=2, drift=0.05, log=False)
    result, md = compare_runs([tmp_path / "ok", tmp_path / "bad", tmp_path / "none"], tmp_path / "cmp")
    table = {line.split("|")[1].strip(): line for line in md.read_text().splitlines() if line.startswith("| ")}
    assert "| NaN |" in table["bad"] and "| NaN |" not in table["none"] and "| – |" in table["none"]


def test_compare_takes_the_last_logged_training_loss(tmp_path):
    report, _ = _run(tmp_path / "a", seed=1, drift=0.05)  # tracked at 0, 2, 4, 6
    sparse = TrainingLog.from_history([{"step": 1, "loss": 3.0}, {"step": 3, "loss": 2.5}], source="x")  # none after 4
    write_report(report, tmp_path / "a", training=sparse)
    _run(tmp_path / "b", seed=2, drift=0.05)
    result, _ = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    assert result["rows"][0]["train_loss_last"] == 2.5  # the window (2, 4]; (4, 6] logged nothing
    assert result["rows"][1]["train_loss_last"] == pytest.approx(3.0 - 0.1 * 5.5 - 0.02)  # mean of steps 5 and 6


def test_compare_names_other_probe_sets(tmp_path):
    for name in ("a", "b", "c"):
        _run(tmp_path / name, seed=1, drift=0.05)  # the same base values: only the prompts below differ
    prompts = [f"question {i}?" for i in range(6)]
    for name, mine in (("a", prompts), ("b", prompts), ("c", prompts[:5] + ["What is the capital city of Chad?"])):
        path = tmp_path / name / "report.json"
        data = json.loads(path.read_text())
        data["probes"]["prompts"] = mine
        path.write_text(json.dumps(data))
    result, _ = compare_runs([tmp_path / "a", tmp_path / "b", tmp_path / "c"], tmp_path / "cmp", labels=["A", "B", "C"])
    assert result["differences"] == ["C tracks other probes than A (6 vs 6; 1 not among A's, e.g. 'What is the capital "
                                     "city of Chad?'), so its counts are not those of the same interactions"]


def test_bounds_print_to_one_decimal_so_that_zero_decides():
    from sftint_fast.plot import bound

    assert [bound(x) for x in (0.3, -0.04, -0.0, 0.0, 12.0, -2.25)] == ["0.3", "0.0", "0.0", "0.0", "12.0", "-2.2"]


def test_compare_refuses_one_path_one_label_string_and_a_run_twice_under_labels(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # one folder as a string was split into one "run" per character, refused only as "not a folder"
    with pytest.raises(TypeError, match="runs: expected a sequence of run folders, got one path"):
        compare_runs(str(a), tmp_path / "cmp")
    with pytest.raises(TypeError, match="runs: expected a sequence of run folders"):
        compare_runs(a, tmp_path / "cmp")
    # a label string was split into one label per character
    with pytest.raises(TypeError, match="labels: expected a sequence of names"):
        compare_runs([a, b], tmp_path / "cmp", labels="xy")
    # the same folder twice was compared with itself once labels were given
    with pytest.raises(ValueError, match="runs: expected distinct run folders, got .* twice"):
        compare_runs([a, tmp_path / "." / "a"], tmp_path / "cmp", labels=["x", "y"])
    assert not (tmp_path / "cmp").exists()


def test_compare_says_when_the_same_prompts_have_other_players(tmp_path):
    """Players do not change a probe's base p_y (the unmasked prompt), so the same prompts with other players (a
    probes file naming them) start from the same base values: only the player words tell the runs apart."""
    prompts = [f"prompt {i}" for i in range(6)]
    for name, words in (("a", ["w0", "w1", "w2", "w3"]), ("b", ["w0", "w1", "w2", "w9"])):
        _run(tmp_path / name, seed=1, drift=0.05)
        path = tmp_path / name / "report.json"
        data = json.loads(path.read_text())
        data["probes"] |= {"prompts": prompts, "words": [words] * 6}
        path.write_text(json.dumps(data))
    result, md = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    assert any(d.startswith("b tracks other players than a") for d in result["differences"]), result["differences"]
    assert "**Not like for like**" in md.read_text()



def test_one_probe_gives_no_bootstrap_lower_bound(tmp_path):
    """The bootstrap resamples probes: over one probe its bounds are the estimate itself, no evidence of a denoising
    stage beyond the noise floor (METHOD.md section 7.6), so the verdict must not present them as a lower bound."""
    g = torch.Generator().manual_seed(0)
    interactions = 0.02 * torch.randn(1, 32, generator=g, dtype=torch.float64)
    interactions[:, [3, 5, 7, 9, 12, 17, 20, 31]] = 1.0
    for name in ("a", "b"):
        tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=50, noise_draws=2,
                             noise_floor="iid")
        for t in range(5):
            current = interactions.clone()
            if t >= 1:
                current[:, [7, 9, 12, 17]] = 0.0
            tracker.add_values(t, inverse_harsanyi(current)
                               + 0.001 * torch.randn(1, 32, generator=g, dtype=torch.float64))
        report = tracker.report()
        write_report(report, tmp_path / name)
    bounds = report.intervals["all/removed_new_excess_cumulative"]
    assert bounds[0][-1] == bounds[1][-1] == report.curves["all/removed_new_excess_cumulative"][-1] > 0  # degenerate
    h = headline(report)
    assert "is visible" not in h["verdict"] and "(bootstrap lower bound" not in h["verdict"]
    assert "one probe" in h["verdict"] and h["removed_excess_cumulative_lo"] is None
    _, md = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    assert "| 4 (–) |" in md.read_text()


def test_a_heldout_loss_measured_nan_or_inf_survives_report_json_resume_and_compare(tmp_path):
    """A diverged run's held-out loss (NaN, inf) was saved as null, read back as "not measured": compare then showed
    the last finite loss as the last one (a diverged run looked fine), and a resumed run lost it the same way."""
    g = torch.Generator().manual_seed(3)
    v0 = inverse_harsanyi(0.3 * torch.randn(4, 16, generator=g, dtype=torch.float64))
    opts = dict(andor_method="and", min_base_py=0.0, bootstrap=20, noise_draws=1, progress=False)
    losses = {"ok": (2.0, 1.8, 1.5), "bad": (2.0, math.inf, math.nan)}
    for name, run in losses.items():
        tracker = SFTTracker(None, out_dir=tmp_path / name / "tracker", **opts)
        for t, loss in zip((0, 2, 4), run):
            tracker.add_values(t, v0 + 0.01 * t * torch.randn(v0.shape, generator=g, dtype=torch.float64),
                               heldout_loss=loss)
        write_report(tracker.report(), tmp_path / name)
    text = (tmp_path / "bad" / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    for report in (TrackReport.load(tmp_path / "bad"),
                   SFTTracker(None, out_dir=tmp_path / "bad" / "tracker", **opts).report()):  # resumed
        assert report.curves["heldout_loss"][:2] == [2.0, math.inf] and math.isnan(report.curves["heldout_loss"][2])
        assert report.heldout_loss_min_step == 0
    assert TrackReport.load(tmp_path / "ok").curves["heldout_loss"] == [2.0, 1.8, 1.5]
    result, md = compare_runs([tmp_path / "ok", tmp_path / "bad"], tmp_path / "cmp")
    ok, bad = result["rows"]
    assert ok["heldout_loss_last"] == 1.5 and math.isnan(bad["heldout_loss_last"])
    assert "| 2.000 → NaN (0) |" in md.read_text()
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"][1]["heldout_loss_last"] == "nan"
    _run(tmp_path / "none", seed=1, drift=0.05, log=False)
    data = json.loads((tmp_path / "none" / "report.json").read_text())
    data["curves"]["heldout_loss"] = [None] * len(data["steps"])  # no held-out data: not measured, not NaN
    (tmp_path / "none" / "report.json").write_text(json.dumps(data))
    assert TrackReport.load(tmp_path / "none").curves["heldout_loss"] == [None] * 4


def _ref_run(folder, reference, **kw):
    g = torch.Generator().manual_seed(3)
    I = 0.3 * torch.randn(4, 2**4, generator=g, dtype=torch.float64)
    tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=20, noise_draws=1, reference=reference,
                         progress=False, **kw)
    for t in (0, 2, 4):
        tracker.add_values(t, inverse_harsanyi(I) + 0.01 * t * torch.randn(I.shape, generator=g, dtype=torch.float64))
    write_report(tracker.report(), folder)
    return tracker.report()


def test_compare_says_when_runs_were_tracked_against_other_reference_models(tmp_path):
    """γ and the emergence unshared with the reference depend on the reference: two runs tracked against other
    references were compared as like for like."""
    refs = [{"I_and": torch.randn(4, 16, generator=torch.Generator().manual_seed(s), dtype=torch.float64)}
            for s in (1, 2)]
    a = _ref_run(tmp_path / "a", refs[0])
    _ref_run(tmp_path / "b", {k: v.clone() for k, v in refs[0].items()})  # the same values: the same reference
    _ref_run(tmp_path / "c", refs[1])
    from safetensors.torch import save_file

    save_file(refs[0], str(tmp_path / "ref.safetensors"))
    _ref_run(tmp_path / "d", tmp_path / "ref.safetensors")  # the same values from a file
    assert a.reference is not None and a.reference["sha256"]
    result, md = compare_runs([tmp_path / x for x in "abcd"], tmp_path / "cmp", labels=list("ABCD"))
    diffs = [d for d in result["differences"] if "reference" in d]
    assert len(diffs) == 1 and diffs[0].startswith("C was tracked against another reference than A"), diffs
    assert "**Not like for like**" in md.read_text()
    # a report saved before the reference was recorded: unknown, not claimed to differ
    data = json.loads((tmp_path / "c" / "report.json").read_text())
    del data["reference"]
    (tmp_path / "c" / "report.json").write_text(json.dumps(data))
    assert TrackReport.load(tmp_path / "c").reference is None
    result, _ = compare_runs([tmp_path / "a", tmp_path / "c"], tmp_path / "cmp2")
    assert not any("another reference" in d for d in result["differences"])


def test_compare_shows_fractional_excess_counts_without_a_minus_zero(tmp_path, capsys):
    """Excess counts are means over the floor's draws: -1/3 was shown "-0" in compare.md and on the command line."""
    for name in ("a", "b"):
        _run(tmp_path / name, seed=1, drift=0.05)
        path = tmp_path / name / "report.json"
        data = json.loads(path.read_text())
        data["curves"]["all/removed_new_excess_cumulative"] = [0.0, 0.0, 0.0, -1 / 3]
        data["curves"]["all/emerged_new_excess"] = [0.0, 0.0, -2 / 3, 0.0]
        path.write_text(json.dumps(data))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "cmp" / "compare.md").read_text()
    for text in (printed, md):
        assert "-0 " not in text and "| -0 |" not in text
    assert "| -0.3 (" in md and "| -0.7 |" in md
    assert "excess removals -0.3 (lower bound" in printed and "excess emergence -0.7," in printed
    assert "None" not in printed and "phase boundary none, held-out loss min at step 6" in printed


def test_compare_says_which_runs_have_no_noise_floor(tmp_path):
    """Runs tracked with noise_floor=None have raw counts in the excess columns; compare.md called them "removals
    beyond the noise floor" (their own report.md verdict says the counts are raw), and with every run floorless no
    difference was listed either."""
    v = inverse_harsanyi(0.3 * torch.randn(4, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    for name, floor in (("a", None), ("b", None), ("c", "iid")):
        tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=20, noise_floor=floor,
                             progress=False)
        for t in range(3):
            tracker.add_values(t, v + 0.1 * t * torch.randn(v.shape, generator=torch.Generator().manual_seed(t),
                                                            dtype=torch.float64))
        tracker.report().save(tmp_path / name)
    result, md = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "ab", labels=["A", "B"])
    assert result["differences"] == []
    assert "No noise floor was measured for A, B: their excess counts are raw counts" in md.read_text()
    result, md = compare_runs([tmp_path / "c", tmp_path / "a"], tmp_path / "ca", labels=["C", "A"])
    assert "option noise_floor: C 'iid', A None" in result["differences"]
    assert "No noise floor was measured for A: its excess counts are raw counts" in md.read_text()


def test_report_md_names_the_noise_draws_only_with_a_floor(tmp_path):
    """report.md's settings line read "noise floor: None (K=3)" for a run without a floor: K draws of a null that
    was never drawn."""
    v = inverse_harsanyi(0.3 * torch.randn(3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    for floor, draws in ((None, 3), ("iid", 2)):
        draws_option = {"noise_draws": draws} if floor else {}  # the default 3 without a floor: not drawn
        tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=20, noise_floor=floor,
                             progress=False, **draws_option)
        for t in range(2):
            tracker.add_values(t, v + 0.1 * t)
        line = next(r for r in write_report(tracker.report(), tmp_path / str(floor)).read_text().splitlines()
                    if r.startswith("- solver:"))
        assert (f"noise floor: {floor} (K={draws});" if floor else "noise floor: none;") in line, line


def test_compare_says_when_runs_measured_their_heldout_loss_on_other_data(tmp_path):
    """compare.md puts the runs' held-out losses side by side; runs whose held-out loss came from other held-out
    examples (another --heldout file, another demo --seed) were called like for like. Their tracker's config.json
    (beside report.json under tracker/) records which examples; a run folder without one is not judged."""
    v = inverse_harsanyi(0.3 * torch.randn(3, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    sets = {"a": [("the cat", "sat")], "b": [("the cat", "sat")], "c": [("a dog", "ran")], "d": None}
    for name, heldout in sets.items():
        tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=20, noise_floor=None,
                             heldout=heldout, out_dir=None if heldout is None else tmp_path / name / "tracker",
                             progress=False)
        for t in range(2):
            tracker.add_values(t, v + 0.1 * t, heldout_loss=2.0 - 0.1 * t)
        tracker.report().save(tmp_path / name)
    result, md = compare_runs([tmp_path / name for name in sets], tmp_path / "cmp")
    assert result["differences"] == ["c measured its held-out loss on other held-out examples than a, so their "
                                     "held-out losses are not comparable"]
    assert "**Not like for like**" in md.read_text()


def test_compare_refuses_an_out_that_cannot_be_written_by_its_option(tmp_path, capsys):
    # was "sftint compare: [Errno 17] File exists: '.../a-file'", naming neither --out nor what was expected
    _run(tmp_path / "a", seed=1, drift=0.05, log=False)
    _run(tmp_path / "b", seed=2, drift=0.05, log=False)
    file = tmp_path / "a-file"
    file.write_text("")
    for out, got in ((file, "is a file"), (file / "sub", "is inside the file")):
        assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"sftint compare: --out: expected a folder to write, {str(out)!r} {got}" in err, err


def test_compare_png_legend_shows_labels_starting_with_an_underscore(tmp_path, monkeypatch):
    """matplotlib leaves a label that starts with "_" out of the legend: a run folder named "_base" had no entry."""
    import matplotlib.pyplot as plt

    from sftint_fast import plot

    reports = [_run(tmp_path / name, seed=i, drift=0.05)[0] for i, name in enumerate(("_base", "tuned"))]
    legends = []
    monkeypatch.setattr(plot, "_save", lambda fig, path: legends.append(
        [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]) or plt.close(fig))
    plot.plot_compare(["_base", "tuned"], reports, [None, None], tmp_path / "compare.png")
    assert legends and " _base" in legends[0] and "tuned" in legends[0]
