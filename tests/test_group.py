"""Games of one layout evaluated together (shared trie passes / shared naive batches) equal each game alone."""
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from test_trie import LAYOUTS, check_close, make_game

import sftint_fast as sf
from sftint_fast.engine.adapters import ModelDims
from sftint_fast.engine.adapters.base import Adapter
from sftint_fast.engine.naive import evaluate_naive, evaluate_naive_games
from sftint_fast.engine.plan import plan_trie
from sftint_fast.engine.trie import evaluate_trie_games
from sftint_fast.game import Game

DIMS = ModelDims(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32, intermediate_size=64,
                 vocab_size=128, dtype=torch.float32)


def model(arch: str = "llama"):
    return tiny_model(arch, attn="sdpa", initializer_range=0.2)


def games_of(layout: str, count: int, **kwargs) -> list[Game]:
    """``count`` games of one layout with different tokens, targets and baselines (seeded)."""
    return [make_game(layout, seed=seed, **kwargs) for seed in range(count)]


def alone(net, games, subsets):
    with torch.no_grad():
        return [evaluate_naive(net, game, subsets, progress=False) for game in games]


def first_token_logit(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, 0, 5]


# --- the plan for several games -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_games", [1, 3])
def test_plan_for_several_games_covers_every_game_and_keeps_blocks_apart(num_games):
    prompt_length, spans = LAYOUTS["spread_n5"]
    layout = SimpleNamespace(input_ids=torch.zeros(prompt_length, dtype=torch.int64), player_spans=spans)
    plan = plan_trie(layout, num_games=num_games, batch_size=6)
    single = plan_trie(layout, batch_size=6)
    n = len(spans)
    assert plan.game_rows == single.store_rows and plan.store_rows == num_games * single.store_rows
    assert plan.trie_tokens == single.trie_tokens and plan.num_games == num_games
    for game in range(num_games):
        for level in range(n + 1):
            ids = [u.nodes for units in plan.passes for u in units if u.game == game and u.level == level]
            assert torch.equal(torch.cat(ids), plan.level_nodes[level])
    order = [(u.level, u.game) for units in plan.passes for u in units]
    assert [lv for lv, _ in order] == sorted(lv for lv, _ in order)  # ancestors always scheduled first
    for units in plan.passes:  # one last-level chunk per game's window
        leaf_games = [u.game for u in units if u.level == n]
        assert len(leaf_games) == len(set(leaf_games))
        assert sum(len(u.nodes) for u in units) <= 6
    # Every chunk's rows lie inside its own game's block.
    for units in plan.passes:
        for u in units:
            offsets = plan.offsets(u.level, int(u.nodes[0]), u.game)
            first = offsets[u.level] + int(u.nodes[0]) * plan.level_lens[u.level]
            last = offsets[u.level] + (int(u.nodes[-1]) + 1) * plan.level_lens[u.level]
            assert u.game * plan.game_rows <= first < last <= (u.game + 1) * plan.game_rows


def test_plan_for_several_games_needs_their_kv_and_says_so():
    prompt_length, spans = LAYOUTS["spread_n5"]
    layout = SimpleNamespace(input_ids=torch.zeros(prompt_length, dtype=torch.int64), player_spans=spans)
    row_bytes = DIMS.num_layers * 2 * DIMS.num_kv_heads * DIMS.head_dim * 4
    one = plan_trie(layout, dims=DIMS, max_memory=1 << 30)
    many = plan_trie(layout, dims=DIMS, max_memory=1 << 30, num_games=8)
    assert many.kv_bytes == 8 * one.window_start * row_bytes + 8 * many.window_rows * row_bytes
    per_game = one.window_start * row_bytes  # the stored levels every game keeps for the whole run
    plan_trie(layout, dims=DIMS, max_memory=40 * per_game)
    with pytest.raises(ValueError, match=r"x 64 games needs at least \d+\.\d+ GiB"):
        plan_trie(layout, dims=DIMS, max_memory=40 * per_game, num_games=64)
    with pytest.raises(ValueError, match="num_games"):
        plan_trie(layout, num_games=0)


# --- the engines --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_trie_games_equal_each_game_alone(arch, masking):
    net = model(arch)
    games = games_of("spread_n5", 3, masking=masking, num_targets=2, baseline_rows=True)
    subsets = torch.arange(32)
    # batch_size 5: many passes, each holding several games' chunks and more than one game's leaves
    together = evaluate_trie_games(net, games, subsets, batch_size=5, progress=False)
    for got, want in zip(together, alone(net, games, subsets)):
        check_close(got, want)
    assert not torch.allclose(together[0], together[1])  # the games really differ


def test_trie_games_with_sampled_subsets_and_other_value_functions():
    net = model("qwen2")
    games = games_of("first_and_last", 3)
    games[1] = Game(input_ids=games[1].input_ids, player_spans=games[1].player_spans, words=games[1].words,
                    target=games[1].target, baseline=games[1].baseline, prompt_length=games[1].prompt_length,
                    value=first_token_logit)
    subsets = torch.tensor([5, 0, 15, 5, 9, 3])
    together = evaluate_trie_games(net, games, subsets, progress=False)
    for got, want in zip(together, alone(net, games, subsets)):
        check_close(got, want)


def test_naive_games_batch_across_games_and_equal_each_game_alone():
    net = model("llama")
    games = games_of("adjacent_multi_token", 3, num_targets=2)
    subsets = torch.arange(16)
    for masking in ("embedding", "attention"):
        games = games_of("adjacent_multi_token", 3, num_targets=2, masking=masking)
        with torch.no_grad():
            together = evaluate_naive_games(net, games, subsets, batch_size=7, progress=False)  # batches span games
        for got, want in zip(together, alone(net, games, subsets)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_games_of_another_layout_are_refused():
    net = model("llama")
    mixed = [make_game("first_and_last"), make_game("adjacent_multi_token")]
    with pytest.raises(ValueError, match=r"games\[1\]: expected the layout of games\[0\]"):
        sf.evaluate_games(net, mixed, method="trie", progress=False)
    with pytest.raises(ValueError, match=r"games\[1\]: expected the layout of games\[0\]"):
        sf.evaluate_games(net, mixed, method="naive", progress=False)
    with pytest.raises(TypeError, match=r"games\[1\]: expected a sftint_fast.Game"):
        sf.evaluate_games(net, [mixed[0], "text"], progress=False)
    assert sf.evaluate_games(net, [], progress=False) == []


# --- grouping and evaluate_many -------------------------------------------------------------------------------------


def test_group_games_by_layout_and_size():
    net = model("llama")
    a, b = games_of("first_and_last", 5), games_of("n1", 2)
    games = [a[0], b[0], a[1], a[2], b[1], a[3], a[4]]
    assert sf.group_games(net, games, method="trie", group_size=3) == [[0, 2, 3], [1, 4], [5, 6]]
    assert sf.group_games(net, games, method="trie", group_size=1) == [[i] for i in range(7)]
    auto = sf.group_games(net, games, method="trie")
    assert sorted(i for g in auto for i in g) == list(range(7)) and len(auto) == 2  # tiny games: one group each
    # The naive engine only needs the same length, targets and number of players (embedding masking): other spans
    # still batch; another number of players does not (the games share the bitmasks).
    other_spans = dict(input_ids=a[1].input_ids, target=a[1].target, baseline=a[1].baseline,
                       prompt_length=a[1].prompt_length)
    same_length = [make_game("first_and_last"), Game(player_spans=((1, 2), (4, 6), (8, 9), (10, 11)),
                                                     words=("x", "y", "z", "w"), **other_spans),
                   Game(player_spans=((1, 2), (4, 6)), words=("x", "y"), **other_spans)]
    assert sf.group_games(net, same_length, method="naive") == [[0, 1], [2]]
    assert sf.group_games(net, same_length, method="trie") == [[0], [1], [2]]
    with pytest.raises(ValueError, match="group_size"):
        sf.group_games(net, games, group_size=0)


def test_evaluate_many_groups_games_into_fewer_passes(monkeypatch):
    net = model("llama")
    games = games_of("spread_n5", 4) + games_of("n1", 3) + games_of("spread_n5", 2)
    calls = []
    real = Adapter.__subclasses__()
    for cls in real:
        original = cls.run_layers
        monkeypatch.setattr(cls, "run_layers", lambda self, *a, _f=original, **k: calls.append(1) or _f(self, *a, **k))
    grouped = sf.evaluate_many(net, games, method="trie", progress=False)
    grouped_passes = len(calls)
    calls.clear()
    one_by_one = sf.evaluate_many(net, games, method="trie", group_size=1, progress=False)
    assert grouped_passes < len(calls)
    for got, single, game in zip(grouped, one_by_one, games):
        check_close(got, single)
        check_close(got, evaluate_naive(net, game, torch.arange(1 << game.num_players), progress=False))


def test_group_size_follows_the_backends_kv_store():
    """With the fused kernel the last level's K/V are never stored: a memory-bound grouping fits more games."""
    from sftint_fast.engine.adapters import get_adapter

    net = model("llama")
    games = games_of("spread_n5", 8)
    dims = get_adapter(net).dims

    def kv_bytes(window: bool, budget: int | None = None) -> int:
        return plan_trie(games[0], dims=dims, num_targets=int(games[0].score_positions.numel()), max_memory=budget,
                         pass_tokens=8192, window=window).kv_bytes

    fused = kv_bytes(False)
    budget = 2 * 3 * fused  # three fused stores within half the budget; fewer windowed ones
    windowed = kv_bytes(True, budget)
    assert fused < windowed and kv_bytes(False, budget) == fused
    by_backend = {backend: sf.group_games(net, games, method="trie", max_memory=budget, attention_backend=backend)
                  for backend in ("torch", "triton")}
    assert [len(g) for g in by_backend["triton"]] == [3, 3, 2]
    assert max(len(g) for g in by_backend["torch"]) == max(1, 3 * fused // windowed)
    with pytest.raises(ValueError, match="attention_backend"):
        sf.group_games(net, games, method="trie", attention_backend="cuda")
