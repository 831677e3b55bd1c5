"""End to end: the trie engine with the fused Triton attention (interpreter on CPU) equals the naive engine."""
import pytest
import torch
from conftest import DEVICE, requires_triton, tiny_model

import sftint_fast as sf
from sftint_fast.engine.naive import evaluate_naive
from sftint_fast.game import Game

pytestmark = requires_triton

HIDDEN = 32


def make_game(masking: str, seed: int = 0) -> Game:
    """n=4: a player on the first token, a two-token player, adjacent players, a three-token suffix."""
    spans = ((0, 1), (3, 5), (5, 6), (8, 10))
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 128, (13,), generator=gen)
    target = torch.randint(3, 128, (2,), generator=gen)
    return Game(input_ids=torch.cat([prompt, target[:-1]]), player_spans=spans,
                words=tuple(f"w{i}" for i in range(len(spans))), target=target,
                baseline=torch.randn(HIDDEN, generator=gen), masking=masking, prompt_length=13)


@pytest.mark.parametrize("path", ["flat", "segments"])
@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_trie_with_triton_attention_matches_naive(arch, masking, path, monkeypatch):
    from sftint_fast.ops.triton import subset_attention as kernel

    monkeypatch.setattr(kernel, "DEFAULT_PATH", path)
    net = tiny_model(arch, attn="sdpa", initializer_range=0.2).to(DEVICE)
    game = make_game(masking)
    with torch.no_grad():
        naive = evaluate_naive(net, game, torch.arange(16), progress=False)
    fused = sf.evaluate(net, game, method="trie", attention_backend="triton", progress=False)
    assert fused.shape == (16,) and fused.dtype == torch.float32
    assert naive.std() > 1e-2  # the variants differ, so a wrong ancestor cannot hide in the tolerance
    tol = 1e-4 * naive.abs().clamp(min=1)
    assert bool(((fused - naive).abs() <= tol).all()), (fused - naive).abs().max().item()


@pytest.mark.parametrize("masking", ["embedding", "attention"])
def test_grouped_games_through_one_launch_per_pass_match_naive(masking):
    """Several games of one layout share passes: a pass holds chunks of several levels and games (each its own
    offsets row, the last level's shifted window), all attended in one launch per layer."""
    from test_group import alone, games_of
    from test_trie import check_close

    from sftint_fast.engine.trie import evaluate_trie_games

    net = tiny_model("llama", attn="sdpa", initializer_range=0.2).to(DEVICE)
    games = games_of("spread_n5", 3, masking=masking, num_targets=2, baseline_rows=True)
    subsets = torch.tensor([31, 0, 7, 18, 5, 26, 9, 30])
    together = evaluate_trie_games(net, games, subsets, batch_size=5, progress=False, attention_backend="triton")
    for got, want in zip(together, alone(net, games, subsets)):
        check_close(got, want)
    assert not torch.allclose(together[0], together[1])


def test_one_kernel_launch_per_pass_and_layer(monkeypatch):
    """The engine launches the fused kernel once per pass and layer, however many chunks (levels, games) a pass
    holds: per-chunk launches were most of the GPU engine's host time at small levels. A pass without leaves skips
    the last layer's attention (nothing reads it; its K/V are still stored)."""
    from test_group import games_of

    from sftint_fast.engine.plan import plan_trie
    from sftint_fast.engine.trie import evaluate_trie_games
    from sftint_fast.ops.triton import subset_attention as kernel

    calls = []
    launch = kernel._launch
    monkeypatch.setattr(kernel, "_launch", lambda *a, **k: calls.append(a[4].shape[0]) or launch(*a, **k))
    net = tiny_model("llama", attn="sdpa").to(DEVICE)
    games = games_of("spread_n5", 2)
    evaluate_trie_games(net, games, batch_size=12, progress=False, attention_backend="triton")
    plan = plan_trie(games[0], batch_size=12, num_games=2, window=False)  # as the engine plans for the kernel
    chunks = sum(len(units) for units in plan.passes)
    assert chunks > len(plan.passes)  # passes really hold several chunks
    layers, n = net.config.num_hidden_layers, plan.num_players
    with_leaves = [any(u.level == n for u in units) for units in plan.passes]
    assert 0 < sum(with_leaves) < len(plan.passes)
    assert len(calls) == sum(layers if leafy else layers - 1 for leafy in with_leaves)
    nodes = [sum(len(u.nodes) for u in units) for units in plan.passes]
    # every node of every pass, once per layer (but the last layer of a pass without leaves)
    assert sum(calls) == sum(c * (layers if leafy else layers - 1) for c, leafy in zip(nodes, with_leaves))
