"""shapiq on our engine: exact Möbius = sf.harsanyi, an approximator end to end, the bit-order mapping."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import sftint_fast as sf
from conftest import tiny_model

shapiq = pytest.importorskip("shapiq")

from sftint_fast.integrations.shapiq import MaskedLMGame, coalitions_to_bitmasks  # noqa: E402


def six_player_game(seed: int = 0) -> sf.Game:
    """Players at the very start, multi-token players, background between; 2 target tokens."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(3, 128, (2,), generator=gen)
    prompt = torch.randint(3, 128, (14,), generator=gen)
    spans = ((0, 1), (2, 4), (4, 5), (6, 8), (9, 10), (12, 13))
    return sf.Game(input_ids=torch.cat([prompt, target[:-1]]), player_spans=spans,
                   words=tuple(f"w{i}" for i in range(6)), target=target,
                   baseline=torch.randn(6, 32, generator=gen), prompt_length=14)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", initializer_range=0.3)  # larger weights than default: interactions well above fp32 noise


def test_coalition_columns_are_bits():
    coalitions = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=bool)
    assert coalitions_to_bitmasks(coalitions).tolist() == [0, 1, 2, 5, 7]
    with pytest.raises(ValueError, match="2-D"):
        coalitions_to_bitmasks(np.zeros(3, dtype=bool))


def test_value_function_matches_evaluate(model):
    game = six_player_game()
    v = sf.evaluate(model, game, method="naive", progress=False).double()
    shap_game = MaskedLMGame(model, game, method="naive")
    assert shap_game.normalization_value == pytest.approx(float(v[0]), abs=1e-6)
    rng = np.random.default_rng(0)
    coalitions = rng.random((20, 6)) < 0.5
    masks = [sum(1 << i for i in range(6) if row[i]) for row in coalitions]
    np.testing.assert_allclose(shap_game(coalitions), (v[masks] - v[0]).numpy(), atol=1e-5)
    raw = MaskedLMGame(model, game, method="naive", normalize=False)
    np.testing.assert_allclose(raw(coalitions), v[masks].numpy(), atol=1e-5)


def test_exact_moebius_equals_harsanyi(model):
    game = six_player_game(seed=1)
    v = sf.evaluate(model, game, method="naive", progress=False).double()
    expected = sf.harsanyi(v - v[0])
    moebius = shapiq.ExactComputer(MaskedLMGame(model, game, method="naive"))("Moebius")
    got = torch.zeros(64, dtype=torch.float64)
    for players, position in moebius.interaction_lookup.items():
        got[sum(1 << i for i in players)] = float(moebius.values[position])
    assert len(moebius.interaction_lookup) == 64
    assert expected[1:].abs().max() > 0.1  # a non-trivial game
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_kernelshap_runs_and_matches_shapley_at_full_budget(model):
    game = six_player_game(seed=2)
    v = sf.evaluate(model, game, method="naive", progress=False).double()
    approximator = shapiq.KernelSHAP(n=6, random_state=0)
    estimate = approximator.approximate(budget=64, game=MaskedLMGame(model, game, method="naive"))
    phi = np.array([estimate[(i,)] for i in range(6)])
    np.testing.assert_allclose(phi, sf.shapley(v).numpy(), atol=1e-4)


def test_value_function_refuses_wrong_width_and_non_binary(model):
    shap_game = MaskedLMGame(model, six_player_game(), method="naive")
    with pytest.raises(ValueError, match=r"expected 6 columns \(one per player\), received 5"):
        shap_game.value_function(np.ones((1, 5), dtype=bool))
    with pytest.raises(ValueError, match=r"expected 6 columns \(one per player\), received 7"):
        shap_game.value_function(np.ones((1, 7), dtype=bool))
    with pytest.raises(ValueError, match="0/1"):
        coalitions_to_bitmasks(np.array([[2, 0, 0]]))
    with pytest.raises(ValueError, match="0/1"):
        coalitions_to_bitmasks(np.array([[0.5, 1.0, 0.0]]))
    assert coalitions_to_bitmasks(np.array([[1, 0, 1]])).tolist() == [5]  # 0/1 ints are fine


def test_sampling_approximator_on_many_players_runs_in_the_trie(model):
    """24 players: a shapiq approximator's sampled coalitions run in the trie (its store holds only the prefixes
    they reach, so no fallback to naive within 1 GiB) and give the naive engine's estimate."""
    import warnings

    n = 24
    gen = torch.Generator().manual_seed(3)
    game = sf.Game(input_ids=torch.randint(3, 128, (2 * n + 3,), generator=gen),
                   player_spans=tuple((1 + 2 * i, 2 + 2 * i) for i in range(n)), words=tuple(f"w{i}" for i in range(n)),
                   target=torch.tensor([7]), baseline=torch.randn(32, generator=gen), prompt_length=2 * n + 3)
    estimates = {}
    for method in ("trie", "naive"):
        approximator = shapiq.KernelSHAP(n=n, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # a fallback to naive would warn
            shap_game = MaskedLMGame(model, game, method=method, max_memory=1 << 30)  # all 2^j prefixes: ~8 GiB
            estimate = approximator.approximate(budget=300, game=shap_game)
        estimates[method] = np.array([estimate[(i,)] for i in range(n)])
    np.testing.assert_allclose(estimates["trie"], estimates["naive"], atol=1e-4)
    assert np.abs(estimates["trie"]).max() > 1e-3  # a non-trivial estimate


def test_the_empty_coalition_is_exactly_zero_in_any_batch(model):
    """shapiq's imputers set the empty coalition's rows to ``empty_prediction`` (their normalisation value), so a
    normalised game is exactly 0 there. Ours re-evaluated v(∅) in the batch shapiq passed, where fp32 sums differ
    from the construction-time evaluation: ExactComputer's Möbius m(∅) and baseline_value were -9.5e-7, not 0."""
    game = six_player_game(seed=1)
    shap_game = MaskedLMGame(model, game, method="naive")
    coalitions = np.random.default_rng(0).random((40, 6)) < 0.5
    coalitions[[0, 17]] = False
    values = shap_game(coalitions)
    assert values[0] == 0.0 and values[17] == 0.0
    moebius = shapiq.ExactComputer(shap_game)("Moebius")
    assert moebius.baseline_value == 0.0 and moebius[()] == 0.0
    raw = MaskedLMGame(model, game, method="naive", normalize=False)
    np.testing.assert_allclose(raw(coalitions)[[0, 17]], shap_game.normalization_value, atol=1e-5)


def test_grand_and_empty_coalition_values(model):
    """shapiq's properties took float() of a (1,) array: a TypeError with numpy >= 2.4, on every game."""
    game = six_player_game(seed=2)
    v = sf.evaluate(model, game, method="naive", progress=False).double()
    shap_game = MaskedLMGame(model, game, method="naive")
    assert shap_game.empty_coalition_value == 0.0
    assert shap_game.grand_coalition_value == pytest.approx(float(v[-1] - v[0]), abs=1e-5)
    raw = MaskedLMGame(model, game, method="naive", normalize=False)
    assert raw.grand_coalition_value == pytest.approx(float(v[-1]), abs=1e-5)
    assert raw.empty_coalition_value == pytest.approx(float(v[0]), abs=1e-5)
