"""Measures on hand-computed tiny examples, brute-force references on random ones, and bad inputs."""
import pytest
import torch

import sftint_fast as sf
from sftint_fast.interactions.measures import RankedInteraction, salient_sets


def test_salient_hand_example():
    # max over S≠∅ is 4 (|I(∅)| = 10 is ignored): threshold 0.2·4 = 0.8 at tau 0.2.
    interactions = torch.tensor([10.0, 4.0, -0.8, -0.81, 0.0, 1.0, 0.5, -4.0])
    members = sf.salient(interactions, 0.2)
    assert members.tolist() == [False, True, False, True, False, True, False, True]
    assert salient_sets(interactions, 0.2)[0].tolist() == [1, 3, 5, 7]
    # threshold 0.2·1 = 0.2: -0.8 and 0.5 join
    assert sf.salient(interactions, 0.2, reference_max=1.0).tolist() == [
        False, True, True, True, False, True, True, True
    ]
    assert sf.salient(interactions, 0.2, reference_max=100.0).tolist() == [False] * 8


def test_salient_batched_matches_rowwise_brute_force():
    gen = torch.Generator().manual_seed(0)
    interactions = torch.randn(3, 4, 32, generator=gen) ** 3
    members = sf.salient(interactions, 0.1)
    for index in range(12):
        row = interactions.reshape(12, 32)[index]
        top = max(abs(float(x)) for x in row[1:])
        expected = [s != 0 and abs(float(row[s])) > 0.1 * top for s in range(32)]
        assert members.reshape(12, 32)[index].tolist() == expected
    ref = torch.full((3, 4), 1.0)
    assert sf.salient(interactions, 0.1, reference_max=ref).shape == (3, 4, 32)
    assert len(salient_sets(interactions)) == 12


def test_strength_by_order_hand_example():
    # orders of bitmasks 0..7: 0,1,1,2,1,2,2,3; Σ|I| = 16
    interactions = torch.tensor([1.0, 2.0, -1.0, 3.0, 0.0, -4.0, 1.0, -4.0])
    plus, minus = sf.strength_by_order(interactions)
    torch.testing.assert_close(plus, torch.tensor([1.0, 2.0, 4.0, 0.0]) / 16)
    torch.testing.assert_close(minus, torch.tensor([0.0, 1.0, 4.0, 4.0]) / 16)
    torch.testing.assert_close((plus + minus).sum(), torch.tensor(1.0))
    zero_plus, zero_minus = sf.strength_by_order(torch.zeros(2, 8))
    assert zero_plus.shape == (2, 4) and not bool(zero_plus.any()) and not bool(zero_minus.any())


def test_uncancelled_ratio_hand_example():
    interactions = torch.tensor([[0.0, 2.0, -1.0, 3.0], [0.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([False, True, True, False])
    torch.testing.assert_close(sf.uncancelled_ratio(interactions, mask), torch.tensor([1 / 3, 0.0]))
    torch.testing.assert_close(sf.uncancelled_ratio(interactions, torch.tensor([1, 2])), torch.tensor([1 / 3, 0.0]))
    torch.testing.assert_close(sf.uncancelled_ratio(interactions, torch.tensor([3])), torch.tensor([1.0, 1.0]))
    assert bool(torch.isnan(sf.uncancelled_ratio(interactions, torch.zeros(4, dtype=torch.bool))).all())


def test_sharing_hand_example_and_over_all():
    interactions = torch.tensor([0.0, 4.0, -2.0, 1.0])
    reference = torch.tensor([0.0, 3.0, 2.0, 0.0])
    # Ω = {1,2,3}; Ω_ref = {1,2}; sign agrees only at 1 → γ = 4 / (4+2+1)
    assert float(sf.sharing(interactions, reference)) == pytest.approx(4 / 7)
    with_empty = torch.tensor([9.0, 4.0, -2.0, 1.0])
    assert float(sf.sharing(with_empty, reference, over="all")) == pytest.approx(4 / 16)


def test_sharing_self_is_one_and_brute_force_batched():
    gen = torch.Generator().manual_seed(1)
    interactions = torch.randn(5, 64, generator=gen) ** 3
    torch.testing.assert_close(sf.sharing(interactions, interactions), torch.ones(5))
    reference = interactions + torch.randn(5, 64, generator=gen)
    gamma = sf.sharing(interactions, reference, 0.1)
    for row in range(5):
        own, ref = interactions[row], reference[row]
        own_top = own[1:].abs().max()
        ref_top = ref[1:].abs().max()
        num = den = 0.0
        for s in range(1, 64):
            if abs(own[s]) > 0.1 * own_top:
                den += abs(float(own[s]))
                if abs(ref[s]) > 0.1 * ref_top and torch.sign(own[s]) == torch.sign(ref[s]):
                    num += abs(float(own[s]))
        assert float(gamma[row]) == pytest.approx(num / den, rel=1e-6)


def test_top_interactions_render_words():
    interactions = torch.tensor([9.0, 1.0, -3.0, 2.0, 0.5, 0.0, 0.0, -2.5])
    top = sf.top_interactions(interactions, 3, ["the", "cat", "sat"])
    assert top == [
        RankedInteraction(2, ("cat",), -3.0),
        RankedInteraction(7, ("the", "cat", "sat"), -2.5),
        RankedInteraction(3, ("the", "cat"), 2.0),
    ]
    assert str(top[0]) == "{cat}: -3"
    assert sf.top_interactions(interactions, 1, ["a", "b", "c"], include_empty=True)[0].mask == 0
    batched = sf.top_interactions(torch.stack([interactions, -interactions]), 2, [["a", "b", "c"], ["x", "y", "z"]])
    assert [r.words for r in batched[1]] == [("y",), ("x", "y", "z")]
    assert len(sf.top_interactions(interactions, 100, ["a", "b", "c"])) == 7


def test_bad_inputs():
    a = torch.randn(2, 8)
    with pytest.raises(ValueError, match="same shape"):
        sf.sharing(a, torch.randn(3, 8))
    for tau in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="tau"):
            sf.sharing(a, a, tau)
        with pytest.raises(ValueError, match="tau"):
            sf.salient(a, tau)
    with pytest.raises(ValueError, match="2\\^n"):
        sf.salient(torch.randn(6))
    with pytest.raises(TypeError, match="dtype"):
        sf.strength_by_order(torch.arange(8))
    with pytest.raises(ValueError, match="reference_max"):
        sf.salient(a, 0.1, reference_max=torch.ones(5))
    with pytest.raises(ValueError, match="subset_mask"):
        sf.uncancelled_ratio(a, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bitmasks"):
        sf.uncancelled_ratio(a, torch.tensor([8]))
    with pytest.raises(ValueError, match="words"):
        sf.top_interactions(a[0], 2, ["only", "two"])
    with pytest.raises(ValueError, match="over"):
        sf.sharing(a, a, over="some")


def test_salient_refuses_a_bool_reference_max():
    # True used to be read as max |I| = 1; a flag where a magnitude is expected is a caller's mistake
    interactions = torch.tensor([0.0, 1.0, -0.3, 0.1])
    # by hand: threshold 0.2 * 1.0 = 0.2 keeps {1, 2}
    assert sf.salient(interactions, 0.2, reference_max=1.0).tolist() == [False, True, True, False]
    for flag in (True, torch.tensor(True), torch.ones(1, dtype=torch.bool)):
        with pytest.raises(TypeError, match="reference_max: expected a number or a float tensor"):
            sf.salient(interactions, 0.2, reference_max=flag)
    with pytest.raises(TypeError, match="reference_max"):
        sf.sharing(interactions, interactions, 0.2, reference_max=True)


def test_top_interactions_refuses_words_that_are_not_strings():
    # non-strings used to be accepted and RankedInteraction.__str__ failed only when printed
    interactions = torch.tensor([0.0, 1.0, -3.0, 2.0])
    with pytest.raises(TypeError, match="words: expected strings .* got int 7"):
        sf.top_interactions(interactions, 2, ["a", 7])
    with pytest.raises(TypeError, match="words: expected strings"):
        sf.top_interactions(torch.stack([interactions, interactions]), 2, [["a", "b"], ["c", None]])


def test_numpy_scalar_options_are_numbers():
    """A tau from numpy (np.float32, e.g. a sweep over np.linspace(..., dtype=np.float32)) or k = np.int64 was refused
    as "expected a number in (0, 1), got np.float32(0.05)": a valid number rejected with a message that says it is
    not one."""
    np = pytest.importorskip("numpy")
    a = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sf.salient(a, np.float32(0.25)), sf.salient(a, 0.25))
    torch.testing.assert_close(sf.sharing(a, a.flip(0), np.float32(0.25)), sf.sharing(a, a.flip(0), 0.25))
    assert sf.top_interactions(a[0], np.int64(2), list("abc")) == sf.top_interactions(a[0], 2, list("abc"))
    with pytest.raises(ValueError, match="tau"):
        sf.salient(a, np.float32(1.5))
