"""Set logic, noise floors, bootstrap and the phase boundary on synthetic interaction sequences (no model)."""
import math

import pytest
import torch

from sftint_fast.interactions.harsanyi import harsanyi, inverse_harsanyi
from sftint_fast.ops.transforms import popcount
from sftint_fast.sft import noise as N
from sftint_fast.sft.tracker import SFTTracker


def _run(seq, **kw):
    """Feeds a list of (B, 2^n) interaction tensors through the plain-Harsanyi tracker."""
    opts = dict(andor_method="and", noise_floor=None, bootstrap=200, min_base_py=0.0)
    opts.update(kw)
    tracker = SFTTracker(None, **opts)
    for t, inter in enumerate(seq):
        tracker.add_values(t, inverse_harsanyi(inter.double()))
    return tracker


def _I(n, entries, rows=1):
    out = torch.zeros(rows, 2 ** n, dtype=torch.float64)
    for mask, value in entries.items():
        out[:, mask] = value
    return out


def test_set_logic_hand_made_sequence():
    # n=3; base salient: {0,1}=0b011, {2}=0b100, {0,1,2}=0b111; threshold 0.05 * 1.0
    base = _I(3, {0b011: 1.0, 0b100: 0.5, 0b111: -0.4})
    t1 = _I(3, {0b011: 1.0, 0b100: 0.5, 0b101: 0.3})              # remove 111, emerge 101
    t2 = _I(3, {0b011: 1.0, 0b101: 0.3})                            # remove 100
    t3 = _I(3, {0b011: 1.0, 0b100: 0.5, 0b101: 0.3})               # 100 comes back -> emerged, not preserved
    tr = _run([base, t1, t2, t3], hysteresis=False, persistence=1)
    st = [s["and"] for s in tr.states]
    members = lambda m: set(torch.nonzero(m[0]).flatten().tolist())  # noqa: E731
    assert members(st[0].base) == {0b011, 0b100, 0b111}
    assert members(st[1].removed) == {0b111}
    assert members(st[1].emerged) == {0b101}
    assert members(st[1].preserved) == {0b011, 0b100}
    assert members(st[2].removed) == {0b111, 0b100}
    assert members(st[3].removed) == {0b111}
    assert members(st[3].preserved) == {0b011}
    assert members(st[3].emerged) == {0b101, 0b100}
    assert st[3].first_emerged[0, 0b101].item() == 1 and st[3].first_emerged[0, 0b100].item() == 3
    rep = tr.report()
    assert rep.curves["and/removed"] == [0, 1, 2, 1]
    assert rep.curves["and/emerged_new"] == [0, 1, 0, 1]
    assert rep.curves["and/removed_new"] == [0, 1, 1, 0]
    # pooled measures of the removed set at t=1 (base values: -0.4 alone)
    assert rep.curves["and/removed_mean_abs"][1] == pytest.approx(0.4)
    assert rep.curves["and/removed_rho"][1] == pytest.approx(1.0)
    assert rep.curves["and/removed_mean_order"][1] == pytest.approx(3.0)
    assert rep.curves["and/removed_strength_minus"][1][3] == pytest.approx(1.0)
    # one probe has no bootstrap interval: under the default boundary_significant no boundary is claimed
    assert rep.phase_boundary is None
    assert any("one probe gives no bootstrap interval" in note for note in rep.notes)
    # applied to the counts alone, the rule sees removal and emergence together at step 1
    counts = _run([base, t1, t2, t3], hysteresis=False, persistence=1, boundary_significant=False).report()
    assert counts.phase_boundary == 1
    assert not any("bootstrap interval" in note for note in counts.notes)
    # two probes with the same sequence have intervals of their own, and the rule finds step 1 again
    entries = [{0b011: 1.0, 0b100: 0.5, 0b111: -0.4}, {0b011: 1.0, 0b100: 0.5, 0b101: 0.3},
               {0b011: 1.0, 0b101: 0.3}, {0b011: 1.0, 0b100: 0.5, 0b101: 0.3}]
    two = _run([_I(3, e, rows=2) for e in entries], hysteresis=False, persistence=1).report()
    assert two.phase_boundary == 1


def test_hysteresis_flicker_counts_no_change():
    tau = 0.05
    base = _I(2, {0b01: 1.0, 0b11: 0.06})
    seq = [base] + [_I(2, {0b01: 1.0, 0b11: 0.06 if t % 2 == 0 else 0.04}) for t in range(1, 7)]
    with_h = _run(seq, tau=tau, hysteresis=True, persistence=1).report()
    without = _run(seq, tau=tau, hysteresis=False, persistence=1).report()
    assert sum(with_h.curves["and/removed_new"]) == 0 and sum(with_h.curves["and/emerged_new"]) == 0
    assert sum(without.curves["and/removed_new"]) == 3 and sum(without.curves["and/emerged_new"]) == 3
    # leaving below tau/2 is a real removal even with hysteresis
    gone = _run([base, _I(2, {0b01: 1.0, 0b11: 0.02})], tau=tau, persistence=1).report()
    assert gone.curves["and/removed"] == [0, 1]


def test_persistence_needs_consecutive_checkpoints():
    base = _I(2, {0b01: 1.0})
    blip = _I(2, {0b01: 1.0, 0b11: 0.5})
    seq = [base, blip, base, blip, blip, base]
    rep = _run(seq, persistence=2, hysteresis=False).report()
    # the single-checkpoint blip at 1 is not counted; the run at 3-4 is confirmed at 4 with onset 3
    assert rep.curves["and/emerged_new"] == [0, 0, 0, 0, 1, 0]
    tr = _run(seq[:5], persistence=2, hysteresis=False)
    assert tr.states[4]["and"].first_emerged[0, 0b11].item() == 3
    one = _run(seq, persistence=1, hysteresis=False).report()
    assert one.curves["and/emerged_new"] == [0, 1, 0, 1, 0, 0]


def test_base_threshold_shrinking_probe_gains_nothing():
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(1, 64, dtype=torch.float64)
    base[0, [3, 12, 40]] = torch.tensor([1.0, -0.8, 0.6], dtype=torch.float64)
    base[0, 1:] += 0.02 * torch.randn(63, generator=g, dtype=torch.float64)
    shrunk = base / 10
    rep = _run([base, shrunk, shrunk], threshold_reference="base", persistence=1).report()
    assert rep.curves["and/emerged"] == [0, 0, 0]
    per_ckpt = _run([base, shrunk, shrunk], threshold_reference="checkpoint", persistence=1).report()
    assert per_ckpt.curves["and/emerged"][-1] == 0  # uniform shrinkage: the relative threshold shrinks too
    # the pilot's case: the strong interactions shrink 10x, the weak ones do not
    mixed = base.clone()
    mixed[0, [3, 12, 40]] /= 10
    rel = _run([base, mixed, mixed], threshold_reference="checkpoint", persistence=1).report()
    fixed = _run([base, mixed, mixed], threshold_reference="base", persistence=1).report()
    assert rel.curves["and/emerged"][-1] > 5
    assert fixed.curves["and/emerged"][-1] == 0


def test_target_relevance_flags_and_counts_apart():
    base = _I(2, {0b01: 1.0, 0b11: 0.5}, rows=2)
    later = _I(2, {0b01: 1.0}, rows=2)
    tracker = SFTTracker(None, andor_method="and", noise_floor=None, persistence=1, bootstrap=50)
    tracker.add_values(0, inverse_harsanyi(base), p_y=torch.tensor([0.8, 0.8]))
    tracker.add_values(1, inverse_harsanyi(later), p_y=torch.tensor([0.7, 0.05]))
    rep = tracker.report()
    assert rep.probes["irrelevant"] == [[False, False], [False, True]]
    assert rep.curves["irrelevant_probes"] == [0, 1]
    assert rep.curves["and/removed_new"] == [0, 1]
    assert rep.curves["and/removed_new_irrelevant"] == [0, 1]


def test_set_measures_leave_out_target_irrelevant_probes_as_the_counts_do():
    # METHOD.md 7.5: a probe whose target became irrelevant is flagged and its changes counted apart; the set
    # measures beside the counts (ρ, mean |I|, order) must describe the same probes as the counts
    base = _I(2, {0b01: 1.0}, rows=2)
    later = torch.stack([_I(2, {0b01: 1.0, 0b11: 0.5})[0], _I(2, {0b01: 1.0, 0b10: 0.9, 0b11: -0.9})[0]])
    tracker = SFTTracker(None, andor_method="and", noise_floor=None, persistence=1, bootstrap=50)
    tracker.add_values(0, inverse_harsanyi(base), p_y=torch.tensor([0.8, 0.8]))
    tracker.add_values(1, inverse_harsanyi(later), p_y=torch.tensor([0.7, 0.05]))
    rep = tracker.report()
    assert rep.curves["and/emerged"] == [0, 1]  # probe 1's two emergences are flagged, not counted
    assert rep.curves["and/emerged_rho"][1] == pytest.approx(1.0)
    assert rep.curves["and/emerged_mean_abs"][1] == pytest.approx(0.5)
    assert rep.curves["and/emerged_mean_order"][1] == pytest.approx(2.0)
    assert rep.curves["and/emerged_strength_plus"][1][2] == pytest.approx(1.0)
    assert rep.curves["and/emerged_irrelevant"] == [0, 2]  # counted apart


def test_report_names_the_kind_of_its_rho_and_gamma_and_shows_or_too():
    from sftint_fast.plot import markdown

    g = torch.Generator().manual_seed(0)
    inter = _I(3, {0b011: 1.0, 0b101: -0.6, 0b111: 0.4}, rows=2)
    ref = {"I_and": inter.clone(), "I_or": inter.clone()}
    tracker = SFTTracker(None, andor_method="lp", noise_floor=None, persistence=1, bootstrap=50, min_base_py=0.0,
                         reference=ref, progress=False)
    for t in range(3):
        tracker.add_values(t, inverse_harsanyi(inter + 0.3 * t * torch.randn(inter.shape, generator=g,
                                                                             dtype=torch.float64)))
    rep = tracker.report()
    lines = markdown(rep, figures=[]).splitlines()
    header = next(line for line in lines if line.startswith("| step |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert "ρ emerged (AND)" in columns and "γ emerged (AND)" in columns
    assert "ρ emerged (OR)" in columns and "γ emerged (OR)" in columns
    last = [c.strip() for c in lines[lines.index(header) + 2 + 2].strip("|").split("|")]
    for kind in ("and", "or"):
        for symbol, measure in (("ρ", "rho"), ("γ", "gamma")):
            value = rep.curves[f"{kind}/emerged_{measure}"][2]
            shown = last[columns.index(f"{symbol} emerged ({kind.upper()})")]
            assert shown == ("–" if math.isnan(value) else f"{value:.3f}")
    plain = _run([inter, inter])
    header = next(line for line in markdown(plain.report(), figures=[]).splitlines() if line.startswith("| step |"))
    assert "ρ emerged (AND)" in header and "(OR)" not in header


def test_report_states_the_irrelevance_fraction_it_used():
    from sftint_fast.plot import markdown

    base = _I(2, {0b01: 1.0, 0b11: 0.5}, rows=2)
    tracker = SFTTracker(None, andor_method="and", noise_floor=None, persistence=1, bootstrap=50,
                         irrelevant_fraction=0.25)
    tracker.add_values(0, inverse_harsanyi(base), p_y=torch.tensor([0.8, 0.8]))
    tracker.add_values(1, inverse_harsanyi(_I(2, {0b01: 1.0}, rows=2)), p_y=torch.tensor([0.7, 0.15]))
    rep = tracker.report()
    assert rep.probes["irrelevant"][1] == [False, True]  # 0.15 < 0.25 * 0.8, not under a tenth
    md = markdown(rep, figures=[])
    assert "a tenth" not in md and "under 0.25 of its base value" in md
    # the flagged probes' own changes are in the report, not only the statement that they exist
    assert "their new removals per checkpoint: [0, 1]" in md


def test_values_without_probes_are_refused():
    tracker = SFTTracker(None, andor_method="and", noise_floor=None, persistence=1, bootstrap=50)
    with pytest.raises(ValueError, match=r"at least one probe.*got shape \(0, 8\)"):
        tracker.add_values(0, torch.zeros(0, 8, dtype=torch.float64))


def test_phase_boundary_rule_on_synthetic_curves():
    removed = [0, 50, 90, 95, 96, 96, 96]
    emerged = [0, -5, -3, 0, 1, 6, 9]
    lo = lambda xs: [x - 2 for x in xs]  # noqa: E731
    assert N.phase_boundary(removed, lo(removed), emerged, lo(emerged)) == 5
    assert N.phase_boundary(removed, lo(removed), emerged, lo(emerged), require_significant=False) == 4
    flat = [0, 1, -1, 2, 0, 1, 0]
    assert N.phase_boundary(flat, [x - 5 for x in flat], emerged, lo(emerged)) is None
    assert N.phase_boundary(removed, lo(removed), [0] * 7, [-1] * 7) is None
    with pytest.raises(ValueError, match="removed_fraction"):
        N.phase_boundary(removed, removed, emerged, emerged, removed_fraction=0)
    # curves of other runs or step grids: the rule would read past the shorter ones or ignore the longer ones
    with pytest.raises(ValueError, match=r"expected four curves of one length .*, got lengths \[7, 7, 6, 6\]"):
        N.phase_boundary(removed, lo(removed), emerged[:6], lo(emerged)[:6])


def test_order_zero_is_never_salient_whatever_its_size():
    """METHOD.md 4: order 0 is left out of Ω (I(∅) is an offset, e.g. the q(∅) an AND-OR fit folds into it), under
    every threshold reference, even where |I(∅)| is far above the threshold."""
    base = _I(2, {0b00: 10.0, 0b01: 1.0, 0b11: 0.5})
    later = _I(2, {0b00: 20.0, 0b01: 1.0})
    for reference in ("base", "checkpoint", "absolute"):
        state = N.initial_state(base, tau=0.05, reference=reference)
        assert state.base[0].tolist() == [False, True, False, True], reference
        for hysteresis in (True, False):
            after = N.step_state(state, later, index=1, tau=0.05, reference=reference, hysteresis=hysteresis,
                                 persistence=1)
            assert after.stable[0].tolist() == [False, True, False, False], (reference, hysteresis)
            assert after.removed[0].tolist() == [False, False, False, True]
            assert not after.emerged.any()


def test_order_matched_null_moves_each_orders_values_with_random_signs():
    """METHOD.md 7.1: the observed change's interactions of each order go to random positions *and signs*: per draw
    and order the magnitudes are a permutation of the observed ones, and about half of them come out negative (the
    energy-per-order test above cannot see a sign that is never flipped)."""
    from sftint_fast.interactions.harsanyi import harsanyi
    from sftint_fast.ops.transforms import popcount

    g = torch.Generator().manual_seed(3)
    change = _I(4, {mask: 1.0 + mask / 16 for mask in range(1, 16)})      # all positive, all distinct
    draws = 200
    moved = harsanyi(N.null_perturbations(inverse_harsanyi(change), kind="order_matched", draws=draws, generator=g))
    order = popcount(16)
    for k in range(1, 5):
        sel = order == k
        torch.testing.assert_close(moved[..., sel].abs().sort(-1).values,
                                   change[:, sel].sort(-1).values.expand(draws, 1, -1))
    negative = float((moved[..., 1:] < 0).double().mean())
    assert 0.4 < negative < 0.6


def test_null_perturbations_match_energy_per_order():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(4, 32, generator=g, dtype=torch.float64)
    om = N.null_perturbations(delta, kind="order_matched", draws=3, generator=g)
    from sftint_fast.interactions.harsanyi import harsanyi
    from sftint_fast.ops.transforms import popcount

    order = popcount(32)
    d = harsanyi(delta - delta[:, :1])
    e = harsanyi(om)
    for k in range(1, 6):
        sel = order == k
        torch.testing.assert_close(e[..., sel].pow(2).sum(-1), d[:, sel].pow(2).sum(-1).expand(3, 4))
    assert (om[..., 0] == 0).all()
    iid = N.null_perturbations(delta, kind="iid", draws=400, generator=g)
    # white noise on every v(S), v(∅) included; the perturbation of v' has the observed RMS change of v'
    rms = (delta - delta[:, :1])[:, 1:].pow(2).mean(-1).sqrt()
    shifted = iid - iid[..., :1]
    torch.testing.assert_close(shifted[..., 1:].pow(2).mean(dim=(0, 2)).sqrt(), rms, rtol=0.05, atol=0)
    torch.testing.assert_close(iid[..., 0].std(dim=0), rms / math.sqrt(2), rtol=0.15, atol=0)


@pytest.mark.parametrize("null", ["order_matched", "iid"])
def test_null_values_replace_noise_level_interactions_by_fresh_noise(null):
    from sftint_fast.interactions.harsanyi import harsanyi

    g = torch.Generator().manual_seed(2)
    n, rows, draws = 6, 200, 4
    sd = 0.01
    anchor_I = torch.zeros(rows, 2**n, dtype=torch.float64)
    anchor_I[:, 0b000111] = 2.0                                   # one interaction far above the noise
    anchor = inverse_harsanyi(anchor_I) + sd * torch.randn(rows, 2**n, generator=g, dtype=torch.float64)
    later = inverse_harsanyi(anchor_I) + sd * torch.randn(rows, 2**n, generator=g, dtype=torch.float64)
    fakes = N.null_values(anchor, [later], kind=null, draws=draws, generator=g)
    assert fakes.shape == (1, draws, rows, 2**n)
    got = harsanyi(fakes[0] - fakes[0, ..., :1])
    ref = harsanyi(anchor - anchor[:, :1])
    top = 2**n - 1                                                # order 6: noise sd 0.01 * 2^3 per checkpoint
    # a noise-level interaction is fresh noise of one checkpoint's size, not the anchor's value plus noise (that
    # would correlate with the anchor by 1/sqrt(3)); pure noise has no background to keep (shrinkage weight ~0)
    assert abs(torch.corrcoef(torch.stack([got[:, :, top].flatten(), ref[:, top].repeat(draws)]))[0, 1]) < 0.25
    assert got[:, :, top].pow(2).mean().sqrt().item() == pytest.approx(sd * 8, rel=0.15)
    # the strong one keeps its anchor value plus a change of the observed size (two checkpoints' noise)
    strong = got[:, :, 0b000111] - ref[:, 0b000111]
    assert strong.mean().abs().item() < 0.01
    assert strong.pow(2).mean().sqrt().item() == pytest.approx(sd * math.sqrt(2 * 8), rel=0.15)


def test_iid_null_values_are_iid_noise_on_v_not_on_each_coefficient():
    """The iid null drew every Harsanyi coefficient's fresh noise independently (of the right marginal, 2^k s^2),
    which puts (3^k - 1) s^2 on v'(S) = v(S) - v(0) instead of two checkpoints' entries' 2 s^2: on the full set of
    n=6, 728 s^2. An AND-OR solver reads v as a whole, and its floor came out about twice the observed counts under
    pure noise. The order-matched null is in the interaction domain by definition (independent coefficients)."""
    g = torch.Generator().manual_seed(5)
    n, rows, draws, sd = 6, 200, 4, 0.01
    chain = [sd * torch.randn(rows, 2**n, generator=g, dtype=torch.float64) for _ in range(3)]
    fakes = N.null_values(chain[1], [chain[2]], earlier=[chain[0]], kind="iid", draws=draws, generator=g)
    shifted = fakes[0] - fakes[0, ..., :1]                       # v'(S): entries of v less v(0)
    order = popcount(2**n)
    for k in (1, 3, n):
        rms = shifted[..., order == k].pow(2).mean().sqrt().item()
        assert rms == pytest.approx(sd * math.sqrt(2), rel=0.15), k
    got = harsanyi(shifted)                                      # each coefficient still has its iid spread
    assert got[..., order == n].pow(2).mean().sqrt().item() == pytest.approx(sd * 8, rel=0.15)


def test_null_values_noise_level_and_signal_use_the_checkpoints_around_the_anchor():
    from sftint_fast.interactions.harsanyi import harsanyi

    g = torch.Generator().manual_seed(3)
    n, rows, draws, sd = 5, 400, 2, 0.01
    size = 2**n
    top = size - 1
    truth = torch.zeros(rows, size, dtype=torch.float64)
    noisy = lambda: inverse_harsanyi(truth) + sd * torch.randn(rows, size, generator=g, dtype=torch.float64)  # noqa: E731
    previous, anchor, later = noisy(), noisy(), [noisy(), noisy()]
    # the anchor's top-order noise pushed up to 8 sigma: alone it passes for signal (kept: anchor value plus the
    # observed change, exactly, at the one coefficient of the top order); the previous checkpoint says it is noise
    bump = torch.zeros(rows, size, dtype=torch.float64)
    bump[:, top] = 8 * sd * 2 ** (n / 2) * torch.sign(harsanyi(anchor)[:, top])
    pushed = anchor + inverse_harsanyi(bump)
    change = (harsanyi(later[0] - pushed)[:, top]).abs()
    alone = harsanyi(N.null_values(pushed, later, kind="order_matched", draws=draws, generator=g)[0])
    kept = (alone[..., top] - harsanyi(pushed)[:, top]).abs()
    assert torch.isclose(kept, change.expand(draws, -1)).float().mean() > 0.9
    redrawn = harsanyi(N.null_values(pushed, later, earlier=[previous], kind="order_matched", draws=draws,
                                     generator=g)[0])
    kept = (redrawn[..., top] - harsanyi(pushed)[:, top]).abs()
    assert torch.isclose(kept, change.expand(draws, -1)).float().mean() < 0.15
    # sigma from the differences of the checkpoints other than the anchor: one checkpoint's noise, order by order
    level = N.noise_level([later[0] - previous, later[1] - later[0]], kind="order_matched")
    from sftint_fast.ops.transforms import popcount

    expected = sd**2 * 2.0 ** popcount(size).double()
    expected[0] = 0
    torch.testing.assert_close(level.mean(0), expected, rtol=0.1, atol=0)
    iid = N.noise_level([later[0] - previous, later[1] - later[0]], kind="iid")
    torch.testing.assert_close(iid.mean(0), expected, rtol=0.1, atol=0)
    with pytest.raises(ValueError, match="at least one difference"):
        N.noise_level([], kind="iid")
    with pytest.raises(ValueError, match="at least one later"):
        N.null_values(anchor, [], kind="iid", draws=1, generator=g)


def test_null_values_keep_a_dense_background_by_its_pooled_share():
    """A background of true interactions as large as the noise (order 1) keeps about half its anchor value."""
    from sftint_fast.interactions.harsanyi import harsanyi

    g = torch.Generator().manual_seed(4)
    n, rows, draws, sd = 4, 3000, 2, 0.02
    size = 2**n
    singles = [1 << i for i in range(n)]
    truth = torch.zeros(rows, size, dtype=torch.float64)
    noise_sd = sd * math.sqrt(2)                                  # order-1 coefficient of one checkpoint's noise
    truth[:, singles] = noise_sd * torch.randn(rows, n, generator=g, dtype=torch.float64)
    noisy = lambda: inverse_harsanyi(truth) + sd * torch.randn(rows, size, generator=g, dtype=torch.float64)  # noqa: E731
    previous, anchor, later = noisy(), noisy(), [noisy()]
    from sftint_fast.ops.transforms import popcount

    sigma2 = (sd**2 * 2.0 ** popcount(size).double()).expand(rows, -1)   # one checkpoint's noise per order
    w = N.shrinkage(harsanyi(anchor), sigma2, torch.ones(rows, size, dtype=torch.bool))
    assert w[0, singles[0]].item() == pytest.approx(0.5, abs=0.05)
    assert w[0, size - 1].item() < 0.05
    fake = harsanyi(N.null_values(anchor, later, earlier=[previous], kind="order_matched", draws=draws,
                                  generator=g)[0])
    a = harsanyi(anchor)[:, singles].repeat(draws, 1).flatten()
    f = fake[..., singles].flatten()
    slope = (a * f).sum() / (a * a).sum()
    assert slope.item() == pytest.approx(0.5, abs=0.08)          # E[μ | I_a] = w·I_a
    # spread around the truth: one checkpoint's noise plus the posterior's (1.5 sigma^2 with exact sigma; more
    # with sigma estimated per probe from one difference), well under the anchor value plus a change (3 sigma^2)
    truth_rep = truth[:, singles].repeat(draws, 1).flatten()
    spread = (f - truth_rep).var().item() / noise_sd**2
    assert 1.2 < spread < 2.5, spread


def _planted_games(B=16, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = 2 ** n
    I = 0.01 * torch.randn(B, size, generator=g, dtype=torch.float64)
    I[:, 0] = 0
    strong = torch.stack([torch.randperm(size - 1, generator=g)[:10] + 1 for _ in range(B)])
    I.scatter_(1, strong, (torch.rand(B, 10, generator=g, dtype=torch.float64) + 0.5) * 
               torch.sign(torch.randn(B, 10, generator=g, dtype=torch.float64)))
    return I, strong, g


def _pure_noise_report(null, *, probes=32, checkpoints=8, seed=7, sd=0.01, **options):
    """The same v plus fresh noise (``sd`` on every v(S), v(∅) included) at every checkpoint."""
    I, _, g = _planted_games(B=probes, seed=seed)
    tracker = SFTTracker(None, andor_method="and", noise_floor=null, min_base_py=0.0, bootstrap=500, seed=seed + 2,
                         **options)
    v = inverse_harsanyi(I)
    for t in range(checkpoints):
        tracker.add_values(t, v + sd * torch.randn(v.shape, generator=g, dtype=torch.float64))
    return tracker.report()


# The defaults (METHOD.md's: hysteresis, persistence 2) and the measured alternative (neither hysteresis nor
# persistence 2 but 3: fewer, more persistent changes, so twice the noise to have enough of them to test)
SET_LOGIC = {"defaults": dict(sd=0.01), "measured": dict(hysteresis=False, persistence=3, sd=0.02)}


@pytest.mark.parametrize("logic", sorted(SET_LOGIC))
@pytest.mark.parametrize("null", ["order_matched", "iid"])
def test_pure_noise_has_no_excess_and_no_boundary(null, logic):
    """Three seeded pure-noise runs: a calibrated floor leaves no excess and reports no boundary.

    Over 6 seeds x 3 option sets (harness in the closing note of issue 9) this floor is 0.89-1.09 of the observed
    totals, its per-checkpoint 95% excess intervals miss 0 in 8-28% of the checks (an oracle floor, the true v plus
    fresh noise, in 3-11%) and its cumulative ones in 0-3 of 6; the floor that perturbed the previous checkpoint's
    values gave 12.7 removals where 60 were observed and missed 9-12 of 12 per run.
    """
    observed_total = {"removed_new": 0.0, "emerged_new": 0.0}
    floor_total = dict(observed_total)
    misses, cumulative_misses, checks = [], [], 0
    for seed in (7, 8, 9):
        rep = _pure_noise_report(null, seed=seed, **SET_LOGIC[logic])
        assert rep.phase_boundary is None, seed
        assert rep.floor_cost["rows_decomposed"] > 0 and rep.floor_cost["forward_passes"] == 0
        for name in observed_total:
            observed = rep.curves[f"all/{name}"]
            # the run is long and wide enough that both counts are well above 0 where the floor applies
            assert sum(observed) >= 80, (name, observed)
            observed_total[name] += sum(observed)
            floor_total[name] += sum(rep.curves[f"all/{name}_floor"])
            lo, hi = rep.intervals[f"all/{name}_excess"]
            checks += sum(1 for t in range(len(lo)) if rep.curves[f"all/{name}_floor"][t] or observed[t])
            misses += [(seed, name, t) for t, (a, b) in enumerate(zip(lo, hi)) if not a <= 0 <= b]
            lo_c, hi_c = rep.intervals[f"all/{name}_excess_cumulative"]
            if not lo_c[-1] <= 0 <= hi_c[-1]:
                cumulative_misses.append((seed, name, lo_c[-1], hi_c[-1]))
    for name in observed_total:
        assert 0.8 * observed_total[name] <= floor_total[name] <= 1.2 * observed_total[name], (
            name, observed_total[name], floor_total[name])
    assert len(cumulative_misses) <= 1, cumulative_misses
    assert checks >= 30 and len(misses) <= 0.25 * checks, (checks, misses)


@pytest.mark.parametrize("persistence", [2, 3])
@pytest.mark.parametrize("null", ["order_matched", "iid"])
def test_planted_removal_and_emergence_are_above_the_floor(null, persistence):
    I, strong, g = _planted_games(seed=2)
    B, size = I.shape
    removed_idx = strong[:, :4]
    fresh = []
    for b in range(B):
        free = torch.tensor([s for s in range(1, size) if s not in set(strong[b].tolist())])
        fresh.append(free[torch.randperm(free.numel(), generator=g)[:4]])
    fresh = torch.stack(fresh)
    seq = []
    for t in range(10):
        cur = I.clone()
        if t >= 2:
            cur.scatter_(1, removed_idx, 0.0)
        if t >= 6:
            cur.scatter_(1, fresh, 0.9)
        seq.append(cur + 0.01 * torch.randn(I.shape, generator=g, dtype=torch.float64))
    tracker = SFTTracker(None, andor_method="and", noise_floor=null, min_base_py=0.0, bootstrap=500,
                         persistence=persistence, hysteresis=persistence == 2)
    for t, cur in enumerate(seq):
        tracker.add_values(t, inverse_harsanyi(cur))
    rep = tracker.report()
    # persistence p: the removal with onset 2 is confirmed at 2 + p - 1, the emergence with onset 6 at 6 + p - 1
    r, e = 2 + persistence - 1, 6 + persistence - 1
    rem_lo = rep.intervals["and/removed_new_excess"][0]
    em_lo = rep.intervals["and/emerged_new_excess"][0]
    assert rem_lo[r] > 0 and rep.curves["and/removed_new_excess"][r] >= 0.75 * 4 * B
    assert rep.curves["and/removed_new"][r] >= rep.curves["and/removed_new_floor"][r] + 3 * B
    assert all(lo <= 0 for t, lo in enumerate(rem_lo) if t != r)
    if null == "order_matched":
        assert em_lo[e] > 0 and rep.curves["and/emerged_new_excess"][e] >= 0.75 * 4 * B
        assert all(lo <= 0 for t, lo in enumerate(em_lo) if t != e)
        assert rep.phase_boundary == e
    elif persistence == 2:
        # METHOD.md section 7: iid noise of the change's RMS spreads over all orders and swamps emergence (with
        # persistence 3 the iid floor's flicker rarely lasts three checkpoints and the emergence stands out)
        assert rep.curves["and/emerged_new_excess"][e] < 0
        assert rep.phase_boundary is None
    assert math.isnan(rep.curves["and/emerged_mean_abs"][0])


def test_write_report_makes_figures_json_and_markdown(tmp_path):
    import json as _json

    from sftint_fast.plot import headline, write_report

    I, _, g = _planted_games(B=6, seed=4)
    tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=100)
    v = inverse_harsanyi(I)
    for t in range(4):
        tracker.add_values(t, v + 0.01 * torch.randn(v.shape, generator=g, dtype=torch.float64), heldout_loss=2.0 - 0.1 * t)
    rep = tracker.report()
    md = write_report(rep, tmp_path)
    for name in ("counts.png", "floor.png", "orders.png", "rho_gamma.png", "report.json", "report.md"):
        assert (tmp_path / name).stat().st_size > 0
    data = _json.loads((tmp_path / "report.json").read_text())
    assert data["steps"] == [0, 1, 2, 3] and data["curves"]["heldout_loss"][-1] == pytest.approx(1.7)
    h = headline(rep)
    assert h["verdict"] in md.read_text()
    assert "target-irrelevant" in md.read_text() and "need not be monotone" in md.read_text()
    # a denoising stage is shown where the cumulative excess removals have a lower bound above 0 at some checkpoint
    lows = rep.intervals["all/removed_new_excess_cumulative"][0]
    assert ("No denoising" in h["verdict"]) == all(lo <= 0 for lo in lows[1:])


def test_solver_overlap_is_the_jaccard_of_lp_and_sgd_salient_sets():
    import sftint_fast as sf

    gen = torch.Generator().manual_seed(4)
    values = torch.randn(3, 2**4, generator=gen, dtype=torch.float64) * 2
    tracker = SFTTracker(None, andor_method="sgd", andor_niter=300, andor_lr=1e-3, noise_floor=None,
                         bootstrap=10, progress=False)
    tracker.add_values(0, values)
    overlap = tracker.solver_overlap()
    lp = sf.and_or(values, method="lp", progress=False)
    sgd = sf.and_or(values, method="sgd", niter=300, lr=1e-3, progress=False)
    for kind, attr in (("and", "I_and"), ("or", "I_or")):
        a = sf.salient(getattr(lp, attr), tau=0.05)
        b = sf.salient(getattr(sgd, attr), tau=0.05)
        expected = (a & b).sum().item() / (a | b).sum().item()
        assert overlap[kind] == pytest.approx(expected)
        assert 0.0 <= overlap[kind] <= 1.0
    # threshold_reference="absolute": tau is a magnitude there too (not a share of max |I|)
    tracker = SFTTracker(None, andor_method="sgd", andor_niter=300, andor_lr=1e-3, noise_floor=None, bootstrap=10,
                         progress=False, threshold_reference="absolute", tau=0.5)
    tracker.add_values(0, values)
    overlap = tracker.solver_overlap()
    for kind, attr in (("and", "I_and"), ("or", "I_or")):
        a, b = getattr(lp, attr).abs() > 0.5, getattr(sgd, attr).abs() > 0.5
        a[..., 0] = b[..., 0] = False  # the empty set is never salient
        assert overlap[kind] == pytest.approx((a & b).sum().item() / (a | b).sum().item())


@pytest.mark.parametrize("null", ["order_matched", "iid"])
def test_pure_noise_floor_with_a_dense_background(null):
    """A model's dense background of small interactions (as large as the low orders' noise) under pure noise.

    Zeroing the background in the replicates made the floor remove too much and emerge too little (removals 1.30,
    emergences 0.75 of the observed over 6 seeds, order_matched; iid 1.57 / 0.65); the pooled empirical-Bayes
    share keeps it (1.15 / 0.94 and 1.16 / 0.93).
    """
    observed = {"removed_new": 0.0, "emerged_new": 0.0}
    floor = dict(observed)
    for seed in (3, 4):
        g = torch.Generator().manual_seed(seed)
        B, size = 32, 64  # 6 players
        I = 0.03 * torch.randn(B, size, generator=g, dtype=torch.float64)
        I[:, 0] = 0
        strong = torch.stack([torch.randperm(size - 1, generator=g)[:8] + 1 for _ in range(B)])
        I.scatter_(1, strong, (torch.rand(B, 8, generator=g, dtype=torch.float64) + 0.3)
                   * torch.sign(torch.randn(B, 8, generator=g, dtype=torch.float64)))
        v = inverse_harsanyi(I)
        tracker = SFTTracker(None, andor_method="and", noise_floor=null, min_base_py=0.0, bootstrap=200, seed=seed,
                             hysteresis=True, persistence=2)
        for t in range(8):
            tracker.add_values(t, v + 0.02 * torch.randn(v.shape, generator=g, dtype=torch.float64))
        rep = tracker.report()
        assert rep.phase_boundary is None
        for name in observed:
            observed[name] += sum(rep.curves[f"all/{name}"])
            floor[name] += sum(rep.curves[f"all/{name}_floor"])
    for name in observed:
        assert observed[name] >= 200, (name, observed[name])
        assert 0.85 * observed[name] <= floor[name] <= 1.25 * observed[name], (name, observed[name], floor[name])


@pytest.mark.parametrize("logic", sorted(SET_LOGIC))
@pytest.mark.parametrize("null", ["order_matched", "iid"])
def test_gradual_removal_is_not_absorbed_by_the_floor(null, logic):
    """Four strong interactions per probe fade linearly to 0 by checkpoint 6 (both set logics).

    The floor's replicates keep signal at its anchor value plus a change of the observed size at random positions,
    so a slow real drift is not mistaken for noise: the removals confirmed when the faded ones stay under τ are
    almost all excess.
    """
    I, strong, g = _planted_games(seed=2)
    B = I.shape[0]
    fading = strong[:, :4]
    options = {k: v for k, v in SET_LOGIC[logic].items() if k != "sd"}
    tracker = SFTTracker(None, andor_method="and", noise_floor=null, min_base_py=0.0, bootstrap=500, **options)
    for t in range(10):
        current = I.clone()
        current.scatter_(1, fading, I.gather(1, fading) * max(0.0, 1 - t / 6))
        tracker.add_values(t, inverse_harsanyi(current + 0.01 * torch.randn(I.shape, generator=g, dtype=torch.float64)))
    rep = tracker.report()
    removed = rep.curves["and/removed_new"]
    floor = rep.curves["and/removed_new_floor"]
    assert sum(removed) >= 0.9 * 4 * B
    lo_c, _ = rep.intervals["and/removed_new_excess_cumulative"]
    # measured (seed 2): lower bound 0.81 of 4B with the order-matched null (both set logics), 0.60-0.63 with the
    # cruder iid null, whose floor absorbs ~21% of the removals (METHOD.md section 7)
    share = 0.7 if null == "order_matched" else 0.55
    assert lo_c[-1] >= share * 4 * B and sum(floor) <= 0.25 * sum(removed), (removed, floor, lo_c[-1])


def test_clipped_mean_square_ignores_a_few_real_changes_and_is_unbiased_on_noise():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2000, 20, generator=g, dtype=torch.float64)
    plain = N.clipped_mean_square(x.pow(2))
    assert plain.mean().item() == pytest.approx(1.0, abs=0.03)            # unbiased on Gaussian noise
    with_changes = x.clone()
    with_changes[:, :2] = 30.0                                              # two large real changes per row
    robust = N.clipped_mean_square(with_changes.pow(2))
    assert robust.mean().item() < 1.3 < with_changes.pow(2).mean(-1).mean().item()
    few = x[:, :3].pow(2)                                                   # under 4 samples: the plain mean
    torch.testing.assert_close(N.clipped_mean_square(few), few.mean(-1, keepdim=True))


def _report_planted(reference=None, noise_floor="order_matched", steps=range(4)):
    I, _, g = _planted_games(B=5, seed=4)
    tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=50, noise_draws=2, persistence=1,
                         noise_floor=noise_floor, reference=reference)
    v = inverse_harsanyi(I)
    for t in steps:
        tracker.add_values(t, v * (1 - 0.2 * min(t, 3)) + 0.05 * torch.randn(v.shape, generator=g, dtype=torch.float64))
    return tracker.report()


def test_verdict_names_the_unshared_emergence_it_totals():
    from sftint_fast.plot import headline

    I, _, _ = _planted_games(B=5, seed=4)
    ref = {"I_and": torch.randn(I.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)}
    rep = _report_planted(reference=ref)
    h = headline(rep)
    unshared = sum(rep.curves["all/emerged_unshared_new_excess"])
    assert h["emerged_excess_total"] == pytest.approx(unshared)
    # the total is of the unshared emergences only: the sentence must say so, not pass it off as all of them
    assert "not shared with the reference" in h["verdict"]
    assert "not shared with the reference" not in headline(_report_planted())["verdict"]


def test_unshared_emergence_counts_the_kinds_the_reference_lacks():
    """A reference of AND interactions alone shares no OR interaction (its G_S is 0, as the noise floor counts it):
    the OR emergences are unshared. The report left them out of all/emerged_unshared_new, so the verdict's
    "emergence (of interactions not shared with the reference)" and the phase boundary saw the AND ones only."""
    from sftint_fast.plot import headline

    g = torch.Generator().manual_seed(3)
    inter = 0.3 * torch.randn(4, 16, generator=g, dtype=torch.float64)
    ref = {"I_and": inter.clone()}
    tracker = SFTTracker(None, andor_method="lp", noise_floor="iid", noise_draws=2, persistence=1, hysteresis=False,
                         bootstrap=50, min_base_py=0.0, reference=ref, progress=False)
    for t in range(4):
        tracker.add_values(t, inverse_harsanyi(inter) + 0.1 * t * torch.randn(inter.shape, generator=g,
                                                                              dtype=torch.float64))
    c = tracker.report().curves
    assert sum(c["or/emerged_new"]) > 0 and "or/emerged_gamma" not in c  # no γ without the reference's OR
    for suffix in ("", "_floor", "_excess"):
        assert c[f"all/emerged_unshared_new{suffix}"] == pytest.approx(
            [a + b for a, b in zip(c[f"and/emerged_unshared_new{suffix}"], c[f"or/emerged_new{suffix}"])])
    assert headline(tracker.report())["emerged_excess_total"] == pytest.approx(
        sum(c["and/emerged_unshared_new_excess"]) + sum(c["or/emerged_new_excess"]))


def test_verdict_without_a_noise_floor_says_its_counts_are_raw():
    from sftint_fast.plot import headline

    rep = _report_planted(noise_floor=None)
    assert rep.curves["all/removed_new_floor"] == [0.0] * len(rep.steps)
    verdict = headline(rep)["verdict"]
    assert "No noise floor was measured" in verdict
    assert "noise floor is visible" not in verdict and "beyond the" not in verdict  # it had named a floor it lacked
    assert "in the raw counts is visible" in verdict
    with_floor = headline(_report_planted())["verdict"]
    assert "No noise floor was measured" not in with_floor and "above the noise floor is visible" in with_floor


def test_training_paragraph_names_the_step_its_boundary_loss_comes_from():
    import dataclasses

    from sftint_fast.plot import markdown
    from sftint_fast.sft.training_log import TrainingLog

    rep = dataclasses.replace(_report_planted(steps=(0, 5, 6, 10)), phase_boundary=6)
    log = TrainingLog.from_history([{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.0}], source="t")
    assert log.at(rep.steps)["train_loss"] == [None, 2.0, None, 1.0]
    md = markdown(rep, figures=[], training=log)
    # nothing was logged at the boundary (step 6): 2.000 is the loss at step 5 and must be named so
    assert "ends at step 6, where the training loss was 2.000;" not in md
    assert "step 5" in md.split("## Training loss")[1]


def test_absolute_threshold_lives_on_the_interactions_device():
    # the absolute threshold was built on the CPU whatever the interactions' device: a CUDA (here meta) tensor
    # then failed in the comparison with a device mismatch
    interactions = torch.zeros(3, 8, dtype=torch.float64, device="meta")
    thr = N.threshold(interactions, tau=0.2, reference="absolute", base_threshold=None)
    assert thr.device.type == "meta" and thr.shape == (3, 1) and thr.dtype == torch.float64
    state = N.initial_state(interactions, tau=0.2, reference="absolute")
    assert state.base.device.type == "meta" and state.base_threshold.device.type == "meta"
    cpu = N.threshold(torch.zeros(2, 4), tau=0.2, reference="absolute", base_threshold=None)
    torch.testing.assert_close(cpu, torch.full((2, 1), 0.2))


def test_phase_boundary_refuses_a_bool_removed_fraction():
    removed, emerged = [0, 5, 5], [0, 0, 3]
    # by hand, with removed_fraction 1: removal at its maximum from step 1, emergence grows at step 2
    assert N.phase_boundary(removed, removed, emerged, emerged, removed_fraction=1.0) == 2
    with pytest.raises(TypeError, match="removed_fraction: expected a number in \\(0, 1\\], got True"):
        N.phase_boundary(removed, removed, emerged, emerged, removed_fraction=True)
    with pytest.raises(ValueError, match="removed_fraction"):
        N.phase_boundary(removed, removed, emerged, emerged, removed_fraction=math.nan)


def test_phase_boundary_needs_the_running_maximum_itself_significant():
    """The significance test reads the bootstrap lower bound of the running maximum of the cumulative removed excess
    (set where that maximum was reached), not the bound of the checkpoint at hand."""
    emerged, emerged_lo = [0, 0, 3], [0, 0, 1]
    # the maximum 10 (bound 4 > 0) at step 1; step 2 at 9.5 >= 0.9 * 10 with a bound of its own below 0
    assert N.phase_boundary([0, 10, 9.5], [0, 4, -1], emerged, emerged_lo) == 2
    # a maximum whose bound reaches below 0 gives no boundary, even where a later, lower value's bound is above 0
    assert N.phase_boundary([0, 10, 9.5], [0, -1, 4], emerged, emerged_lo) is None


def test_probe_sums_that_are_zero_are_not_above_zero_from_roundoff():
    """Per-probe excess counts are counts minus floors (means of K draws): 0 - 1/3 and 3 - 8/3 sum to 0, but to
    +1.7e-16 in float64. A demo run with 2 probes reported "A denoising stage above the noise floor is visible ...
    (bootstrap lower bound 0.0 > 0)" from such a 4.4e-16 lower bound, which the phase boundary rule also takes as
    significant. The sums over probes and their bootstrap bounds are exact to 1e-9."""
    draws = torch.tensor([[0.0, 1.0, 0.0], [3.0, 3.0, 2.0]], dtype=torch.float64)
    counts = torch.tensor([0.0, 3.0], dtype=torch.float64)
    per_probe = (counts - draws.mean(-1))[None]  # (T=1, B=2): -1/3 and +1/3
    assert per_probe.sum().item() > 0  # float64 roundoff: the case this guards
    lo, hi = N.bootstrap_sum(per_probe, torch.tensor([[0, 1], [1, 0], [0, 1]]))  # resamples whose exact sum is 0
    assert lo == [0.0] and hi == [0.0]
    assert N.probe_sum(per_probe).tolist() == [0.0]
    assert N.phase_boundary([0.0, 5.0], [0.0, lo[0]], [0.0, 0.0], [0.0, 0.0]) is None  # not significant
    wide = torch.tensor([[0.5, 2.25, -1.0]])
    assert N.probe_sum(wide).tolist() == [1.75] and N.probe_sum(wide).dtype == torch.float64


def _with_cumulative_removals(report, cumulative, lo):
    """``report`` with its cumulative excess removals (and their bootstrap lower bounds) replaced."""
    import dataclasses

    key = "all/removed_new_excess_cumulative"
    hi = [x + 1.0 for x in cumulative]
    return dataclasses.replace(report, curves={**report.curves, key: list(cumulative)},
                               intervals={**report.intervals, key: (list(lo), hi)})


def test_verdict_sees_a_denoising_stage_that_later_checkpoints_cancel_out():
    """The verdict read the cumulative excess removals at the last checkpoint only. On 30-checkpoint runs with a real
    early removal (30 seeds), 5 of the 9 that reported a phase boundary said "No denoising stage above the noise floor
    is visible: cumulative excess removals are 2 (bootstrap lower bound -20.1 <= 0) ... and the phase boundary falls
    at step 12": the later checkpoints' negative excess (noise) had summed the early removal away, though the rule
    had found it significant (section 6: the denoising stage is an early window)."""
    import dataclasses

    from sftint_fast.plot import headline

    rep = _report_planted(steps=range(6))
    rep = dataclasses.replace(_with_cumulative_removals(rep, [0.0, 8.0, 12.0, 11.0, 6.0, 1.0],
                                                        [0.0, 3.0, 5.0, 2.0, -2.0, -6.0]), phase_boundary=2)
    h = headline(rep)
    assert "No denoising" not in h["verdict"]
    assert "reached 12 by step 2 (bootstrap lower bound 5.0 > 0)" in h["verdict"]
    assert "by step 5 they are 1 (bootstrap lower bound -6.0)" in h["verdict"]
    assert h["removed_excess_cumulative"] == 1.0 and h["removed_excess_cumulative_lo"] == -6.0  # the last step's
    # never significant: none, whatever the last value
    none = headline(_with_cumulative_removals(rep, [0.0, 2.0, 3.0, 1.0, 0.0, 0.5], [0.0] * 6))
    assert none["verdict"].startswith("No denoising stage above the noise floor is visible: cumulative excess "
                                      "removals are 0.5 (bootstrap lower bound 0.0 <= 0)")


def test_verdict_shows_fractional_excess_counts_without_a_minus_zero():
    """Excess counts are observed minus the mean of K floor draws, so they are fractions: -1/3 was printed "-0" and
    2.67 as "3" (the table beside it sums to 2.7)."""
    from sftint_fast.plot import headline

    rep = _with_cumulative_removals(_report_planted(), [0.0, 0.0, 0.0, -1 / 3], [0.0, 0.0, -1.0, -2.0])
    verdict = headline(rep)["verdict"]
    assert "-0 " not in verdict and "are -0.3 (bootstrap" in verdict
    rep = _with_cumulative_removals(rep, [0.0, 1.0, 2.0, 8 / 3], [0.0, 0.5, 1.0, 1.5])
    assert "reached 2.7 by step 3 (bootstrap lower bound 1.5 > 0)" in headline(rep)["verdict"]


def test_markdown_of_values_fed_without_games_names_probes_and_kinds():
    """Values fed with add_values have no prompts or words: "What changed" listed each probe as "**None**"; an AND-only
    run's table was said to be "summed over AND and OR"; a run without a boundary, held-out loss or numerics check
    printed Python's None for them."""
    from sftint_fast.plot import markdown

    I, _, _ = _planted_games(B=3, n=4, seed=1)
    tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=20, noise_floor="iid", persistence=1)
    for t in range(3):
        tracker.add_values(t, inverse_harsanyi(I * (1 - 0.3 * t)))
    text = markdown(tracker.report(), figures=[], sets=tracker.sets())
    assert "None" not in text
    assert [line.split("**")[1] for line in text.splitlines() if line.startswith("- **")] == [
        "probe 0", "probe 1", "probe 2"]
    assert "summed over AND and OR" not in text and "AND interactions only" in text
    assert "- phase boundary: none; held-out loss minimum at step: none (no held-out loss)" in text
    assert "numerical error (" in text and "not measured" in text


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e8])
def test_what_changed_values_read_back_as_sets_json_has_them(scale):
    """report.md's strongest removed / emerged interactions, read back, are sets.json's values to 1%: at a scale of
    1e-6 every one printed "+0.000 → -0.000"."""
    import re

    from sftint_fast.plot import markdown

    I, strong, _ = _planted_games(B=3, n=4, seed=1)
    tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=20, noise_floor=None, persistence=1)
    for t in range(3):
        current = I.clone()
        if t:
            current.scatter_(1, strong[:, :2], 0.0)  # removed
            current[:, 0b0110] = 3.0  # emerged (or preserved, where it was salient at the base)
        tracker.add_values(t, scale * inverse_harsanyi(current))
    sets = tracker.sets()
    text = markdown(tracker.report(), figures=[], sets=sets)
    number = r"([+-][0-9.e+-]+)"
    rows = [line for line in text.splitlines() if line.startswith("  - AND:")]
    assert len(rows) == 3
    for row, probe in zip(rows, sets["probes"]):
        removed = re.findall(rf"S=(\d+) {number} → {number}", row)
        emerged = re.findall(rf"S=(\d+) {number} \(step", row)
        assert len(removed) == min(3, len(probe["and"]["removed"])) > 0
        assert len(emerged) == min(3, len(probe["and"]["emerged"]))
        for (mask, base, now), want in zip(removed, probe["and"]["removed"]):
            assert int(mask) == want["subset"]
            assert float(base) == pytest.approx(want["base_value"], rel=0.01)
            assert float(now) == pytest.approx(want["value"], rel=0.01, abs=1e-3 * abs(want["base_value"]))
        for (mask, value), want in zip(emerged, probe["and"]["emerged"]):
            assert int(mask) == want["subset"] and float(value) == pytest.approx(want["value"], rel=0.01)


def test_write_report_of_a_report_read_back_from_report_json(tmp_path):
    """TrackReport.load gives a NaN (a set empty in every probe) back as None: plot_orders fed it to matplotlib
    (TypeError: unsupported operand type(s) for +: 'int' and 'NoneType') when the last checkpoint's removed or
    emerged set was empty, e.g. a run of the base checkpoint alone."""
    from sftint_fast.plot import write_report
    from sftint_fast.sft.tracker import TrackReport

    I, _, _ = _planted_games(B=3, n=4, seed=1)
    tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=20)
    tracker.add_values(0, inverse_harsanyi(I))
    md = write_report(tracker.report(), tmp_path / "run")
    again = write_report(TrackReport.load(tmp_path / "run"), tmp_path / "again")
    assert again.read_text() == md.read_text()
    assert (tmp_path / "again" / "orders.png").stat().st_size > 0


def test_a_constant_base_game_is_warned_about_by_probe():
    """A probe whose base interactions are all 0 gets the threshold tau * 0 = 0: later rounding noise makes every
    non-empty set 'emerge'. It is said at the base, naming the probe; a non-constant probe alone is not warned."""
    import warnings

    g = torch.Generator().manual_seed(0)
    base = _I(3, {0b011: 1.0, 0b100: -0.5}, rows=2)
    base[1, 1:] = 0.0
    later = base + 1e-12 * torch.randn(2, 8, generator=g, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"AND interactions of probe\(s\) \[1\] are all 0 at the base"):
        tracker = _run([base, later, later], persistence=1)
    assert tracker.report().curves["and/emerged"][-1] == 7  # the rule as written: all 7 sets of probe 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run([base[:1], later[:1]], persistence=1)
        _run([base, later], persistence=1, threshold_reference="absolute", tau=0.1)


@pytest.mark.parametrize("seed", [-1, 2**45, 2**64 - 1])
def test_a_seed_torch_accepts_draws_the_noise_floor_and_one_it_refuses_is_refused_up_front(seed):
    """The floor's per-checkpoint seed ``seed * 1_000_003 + t`` overflowed torch's 64 bits from seed 2**45 on: the
    run died at its first floor, after the base was saved with that seed (a resume died again)."""
    g = torch.Generator().manual_seed(0)
    I = torch.randn(4, 16, generator=g, dtype=torch.float64)
    tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=20, seed=seed, persistence=1)
    for t in range(3):
        tracker.add_values(t, inverse_harsanyi(I + 0.01 * torch.randn(I.shape, generator=g, dtype=torch.float64)))
    assert tracker.records[2].floors["and/removed_new"].shape == (3, 4)
    for bad in (2**64, -2**63 - 1):
        with pytest.raises(ValueError, match=r"seed: expected an int in \[-2\*\*63, 2\*\*64\)"):
            SFTTracker(None, andor_method="and", seed=bad)


def test_the_floor_draws_of_a_seed_are_those_of_the_same_seed_modulo_2_64():
    """The floor's seed is reduced modulo 2**64 (what torch.Generator does to a negative seed), so seeds that worked
    before draw what they drew."""
    g = torch.Generator().manual_seed(1)
    I = torch.randn(3, 16, generator=g, dtype=torch.float64)
    seq = [inverse_harsanyi(I + 0.02 * torch.randn(I.shape, generator=g, dtype=torch.float64)) for _ in range(3)]
    floors = []
    for seed in (-1, 2**64 - 1):
        tracker = SFTTracker(None, andor_method="and", min_base_py=0.0, bootstrap=20, seed=seed, persistence=1)
        for t, v in enumerate(seq):
            tracker.add_values(t, v)
        floors.append([r.floors for r in tracker.records])
    assert [sorted(f) for f in floors[0]] == [sorted(f) for f in floors[1]] and floors[0][-1]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*floors) for k in a)


@pytest.mark.parametrize("warm_start", [False, True])
def test_the_floor_decomposes_its_replicates_as_the_observed_chain(monkeypatch, warm_start):
    """METHOD.md 7.1: the floor re-runs *the same* decomposition. Replicates equal to the observed checkpoints must
    give the observed counts; with warm_start the floor decomposed them cold (p = q = 0) while the observed chain
    started each checkpoint from the previous one's (p, q): on pure noise its removal floor was 0.77 of the observed
    (6 seeds, n=5) and two of six runs reported a phase boundary."""
    def replay(anchor, later, *, draws, **_):
        return torch.stack(list(later))[:, None].expand(-1, draws, -1, -1).clone()

    monkeypatch.setattr(N, "null_values", replay)
    I, _, g = _planted_games(B=8, n=4, seed=5)
    tracker = SFTTracker(None, andor_method="sgd", andor_niter=300, andor_lr=3e-3, warm_start=warm_start,
                         min_base_py=0.0, bootstrap=20, progress=False)
    for t in range(5):
        tracker.add_values(t, inverse_harsanyi(I + 0.02 * torch.randn(I.shape, generator=g, dtype=torch.float64)))
    rep = tracker.report()
    for name in ("removed_new", "emerged_new"):
        assert sum(rep.curves[f"all/{name}"]) > 0
        assert rep.curves[f"all/{name}_floor"] == rep.curves[f"all/{name}"], name


def test_headline_measures_cover_the_and_and_or_interactions_its_counts_count():
    """The headline's counts summed AND and OR but its ρ and γ were the AND sets' alone (ρ of the emerged set 0.71
    where the 21 interactions counted had 0.29): every headline figure now covers the same AND+OR sets."""
    from sftint_fast.plot import headline
    from sftint_fast.sft.callback import scalars

    g = torch.Generator().manual_seed(0)
    B, size = 4, 2**4
    base = torch.randn(B, size, generator=g, dtype=torch.float64) * 2
    reference = {f"I_{k}": torch.randn(B, size, generator=g, dtype=torch.float64) for k in ("and", "or")}
    tracker = SFTTracker(None, andor_method="lp", noise_floor=None, bootstrap=10, min_base_py=0.0, persistence=1,
                         progress=False, reference=reference)
    for t in range(3):
        tracker.add_values(t, base + 0.5 * t * torch.randn(B, size, generator=g, dtype=torch.float64))
    report = tracker.report()
    h, c = headline(report), report.curves
    relevant = ~torch.tensor(report.probes["irrelevant"][-1])
    for name in ("removed", "emerged"):
        # a removed interaction is measured where it was salient: at the base
        record = tracker.records[0 if name == "removed" else -1]
        member = {k: getattr(tracker.states[-1][k], name) & relevant.unsqueeze(-1) for k in ("and", "or")}
        assert h[name] == c[f"and/{name}"][-1] + c[f"or/{name}"][-1] == sum(int(m.sum()) for m in member.values())
        signed = sum((record.interactions[k] * member[k]).sum(-1) for k in member)
        mag = {k: (record.interactions[k].abs() * member[k]).sum(-1) for k in member}
        total = mag["and"] + mag["or"]
        rho = (signed.abs() / total)[total > 0].mean().item()
        assert h[f"rho_{name}"] == pytest.approx(rho, rel=1e-12)
        # γ pooled over probes: each kind's γ weighted by its Σ|I|
        gamma = sum(c[f"{k}/{name}_gamma"][-1] * float(mag[k].sum()) for k in member) / float(total.sum())
        assert h[f"gamma_{name}"] == pytest.approx(gamma, rel=1e-12)
    assert h["rho_emerged"] != pytest.approx(c["and/emerged_rho"][-1])  # the AND sets' alone: another number
    logged = scalars(tracker, report)
    assert logged["interactions/rho_emerged"] == pytest.approx(h["rho_emerged"])
    assert logged["interactions/gamma_removed"] == pytest.approx(h["gamma_removed"])
