"""Learned baseline (METHOD.md section 5) on a tiny random model."""
import dataclasses

import pytest
import torch

import sftint_fast as sf
from conftest import tiny_model
from sftint_fast.baseline import _subsets_of, baseline_objective, sample_triples
from sftint_fast.game import Game


def make_game(seed=0, n=5, hidden=32):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (14,), generator=gen)
    spans = tuple((1 + 2 * i, 3 + 2 * i) for i in range(n))
    return Game(
        input_ids=ids,
        player_spans=spans,
        words=tuple(f"w{i}" for i in range(n)),
        target=torch.tensor([7]),
        baseline=torch.randn(hidden, generator=gen),
        prompt_length=14,
    )


def test_sample_triples_are_disjoint_and_nonempty():
    triples = sample_triples(6, 200, torch.Generator().manual_seed(0))
    s1, s2, s3 = triples.unbind(-1)
    assert bool(((s1 & s2) == 0).all() and ((s1 & s3) == 0).all() and ((s2 & s3) == 0).all())
    assert bool((s1 > 0).all() and (s2 > 0).all())
    assert int((s1 | s2 | s3).max()) < 64 and bool((s3 > 0).any())
    subsets = _subsets_of(triples[:1])
    a, b, c = triples[0].tolist()
    assert subsets.tolist() == [a | b | c, a | c, b | c, c]


def test_objective_goes_down_and_model_untouched():
    model = tiny_model("llama")
    games = [make_game(0), make_game(1)]
    # The tiny random model's objective is ~7e-3 with small gradients, hence the large lr.
    flags_before = [p.requires_grad for p in model.parameters()]
    weights_before = [p.detach().clone() for p in model.parameters()]
    start = games[0].baseline
    learned = sf.learn_baseline(model, games, epochs=12, lr=10.0, seed=0, samples_per_epoch=8, progress=False)
    assert learned.shape == start.shape and learned.dtype == torch.float32
    before = baseline_objective(model, games, start, samples=32, seed=123)
    after = baseline_objective(model, games, learned, samples=32, seed=123)
    assert after < 0.75 * before, (before, after)
    assert [p.requires_grad for p in model.parameters()] == flags_before
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(weights_before, model.parameters()))
    assert not model.training
    # the learned baseline plugs into a game
    assert torch.equal(dataclasses.replace(games[0], baseline=learned).baseline, learned)


def test_per_player_shape_and_determinism():
    model = tiny_model("llama")
    game = make_game(2)
    one = sf.learn_baseline(model, game, epochs=3, lr=0.01, per_player=True, progress=False)
    two = sf.learn_baseline(model, game, epochs=3, lr=0.01, per_player=True, progress=False)
    assert one.shape == (5, 32)
    assert torch.equal(one, two)
    assert not torch.equal(one[0], one[1])


def test_bad_inputs():
    model = tiny_model("llama")
    game = make_game(0)
    with pytest.raises(TypeError, match="games"):
        sf.learn_baseline(model, [], progress=False)
    with pytest.raises(ValueError, match="masking"):
        sf.learn_baseline(model, dataclasses.replace(game, masking="attention"), progress=False)
    with pytest.raises(ValueError, match="2 players"):
        sf.learn_baseline(model, make_game(0, n=1), progress=False)
    with pytest.raises(ValueError, match="same number of players"):
        sf.learn_baseline(model, [game, make_game(1, n=4)], per_player=True, progress=False)
    with pytest.raises(ValueError, match="init"):
        sf.learn_baseline(model, game, init=torch.zeros(7), progress=False)
    with pytest.raises(ValueError, match="epochs"):
        sf.learn_baseline(model, game, epochs=-1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        sf.learn_baseline(model, game, epochs=True, progress=False)
    with pytest.raises(ValueError, match="samples_per_epoch"):
        sf.learn_baseline(model, game, samples_per_epoch=True, progress=False)
    with pytest.raises(ValueError, match="samples: expected an int >= 1"):
        baseline_objective(model, game, game.baseline, samples=0)


def test_submodule_train_eval_modes_restored():
    """A model in train mode with a frozen (eval) submodule keeps exactly that mix."""
    model = tiny_model("llama")
    model.train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    sf.learn_baseline(model, make_game(0), epochs=1, progress=False)
    assert [m.training for m in model.modules()] == modes


def test_non_finite_settings_and_init_are_refused():
    model = tiny_model("llama")
    game = make_game(0)
    with pytest.raises(ValueError, match="momentum"):
        sf.learn_baseline(model, game, epochs=2, lr=0.01, momentum=float("nan"), progress=False)
    with pytest.raises(ValueError, match="lr"):
        sf.learn_baseline(model, game, epochs=1, lr=float("inf"), progress=False)
    with pytest.raises(ValueError, match="init: expected finite"):
        sf.learn_baseline(model, game, epochs=0, init=torch.full((32,), float("nan")), progress=False)
    with pytest.raises(ValueError, match=r"init: expected shape"):  # 3 rows for a 5-player game, per_player=False
        sf.learn_baseline(model, game, epochs=1, init=torch.zeros(3, 32), progress=False)


def test_objective_scores_in_eval_mode_and_restores_modes():
    """With dropout in train mode the objective would change from call to call; it is the eval-mode score, and
    each submodule's own mode comes back."""
    model = tiny_model("llama", attention_dropout=0.5)
    game = make_game(0)
    expected = baseline_objective(model, game, game.baseline, seed=3)  # tiny_model is in eval mode
    model.train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    scores = [baseline_objective(model, game, game.baseline, seed=3) for _ in range(3)]
    assert scores == [expected] * 3
    assert [m.training for m in model.modules()] == modes
    with torch.no_grad():  # the check can fail: in train mode the dropout does change the score
        model.train()
        torch.manual_seed(0)
        from sftint_fast.baseline import _objective
        triples = sample_triples(game.num_players, 16, torch.Generator().manual_seed(3))
        train_score = float(_objective(model, game, game.baseline, triples))
    assert train_score != pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_learns_under_a_callers_no_grad_or_inference_mode(context):
    """Called from evaluation code (under torch.no_grad / inference_mode) the SGD still gets its gradients: the
    same baseline as outside, not 'element 0 of tensors does not require grad'."""
    model = tiny_model("llama")
    game = make_game(0)
    expected = sf.learn_baseline(model, game, epochs=2, lr=1.0, progress=False)
    with context():
        learned = sf.learn_baseline(model, game, epochs=2, lr=1.0, progress=False)
    assert not torch.equal(expected, game.baseline)
    assert torch.equal(learned, expected)


def test_a_diverging_sgd_says_so_not_that_the_callers_baseline_was_bad():
    """A step that makes the baseline NaN/inf stops with the diverged-SGD message (lower lr), not with the game's
    'baseline: expected finite values', which blames a baseline the caller never passed."""
    model = tiny_model("llama")
    game = dataclasses.replace(make_game(0), value=lambda logits: logits[:, 0, :].exp().sum(-1) * 1e36)
    with pytest.raises(ValueError, match=r"holds NaN/inf after epoch \d .*the SGD diverged; expected a smaller lr"):
        sf.learn_baseline(model, game, epochs=3, lr=1e-3, progress=False)


def test_a_model_whose_forward_reads_the_ids_beyond_its_embedding_is_refused():
    """The objective feeds masked embeddings as ``inputs_embeds``: Gemma-3n then drops the per-layer embeddings of the
    token ids, so the baseline would be learned for another model. Refused, as by the naive engine."""
    from conftest import tiny_gemma3n
    from word_tokenizer import word_tokenizer

    model = tiny_gemma3n()
    game = Game.from_text(model, word_tokenizer(), "the cat sat on the mat", players=[0, 2, 4], target="mat")
    with pytest.raises(ValueError, match=r"inputs_embeds.*input_ids.*Gemma3nForCausalLM"):
        sf.learn_baseline(model, game, epochs=1, progress=False)


def test_mistyped_options_are_refused_by_name():
    """A truthy string for ``per_player`` switched to a per-player ``(n, hidden)`` baseline; ``lr=True`` ran with
    lr 1; a string lr/momentum/seed failed deep inside with a message that names no argument."""
    model = tiny_model("llama")
    game = make_game(0)
    for flag in ("per_player", "progress"):
        with pytest.raises(TypeError, match=f"{flag}: expected a bool"):
            sf.learn_baseline(model, game, epochs=1, **{"progress": False, flag: "no"})
    for name, value in (("lr", True), ("lr", "0.1"), ("lr", None), ("momentum", "0.9"), ("momentum", True)):
        with pytest.raises(ValueError, match=f"{name}: expected a finite number"):
            sf.learn_baseline(model, game, epochs=1, progress=False, **{name: value})
    with pytest.raises(TypeError, match="seed: expected an int"):
        sf.learn_baseline(model, game, epochs=1, seed="0", progress=False)
    with pytest.raises(TypeError, match="seed: expected an int"):
        baseline_objective(model, game, game.baseline, seed=1.5)


def test_objective_names_a_bad_baseline():
    """``baseline_objective`` failed with AttributeError on a list, and a wrong hidden size was reported as the
    engine-internal ``embed_tokens_output``."""
    model = tiny_model("llama")
    game = make_game(0)
    with pytest.raises(TypeError, match="baseline: expected a floating-point tensor"):
        baseline_objective(model, game, [0.0] * 32)
    with pytest.raises(ValueError, match=r"baseline: expected shape \(32,\) or \(5, 32\).*\(31,\)"):
        baseline_objective(model, game, torch.zeros(31))
    # an integer tensor: the message said "got Tensor", not what is wrong with it (its dtype)
    with pytest.raises(TypeError, match=r"baseline: expected a floating-point tensor .*dtype torch.int64"):
        baseline_objective(model, game, torch.zeros(32, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"init: expected a floating-point tensor, got .*dtype torch.int32"):
        sf.learn_baseline(model, game, epochs=0, init=torch.zeros(32, dtype=torch.int32), progress=False)
    assert baseline_objective(model, game, torch.zeros(5, 32), samples=2) >= 0


def test_a_per_player_init_without_per_player_is_refused_not_averaged():
    """init (n, hidden) with per_player=False was silently averaged into one row (the docstring averages only the
    game's own per-player baseline, the default): the caller's per-player start was lost without a word."""
    model = tiny_model("llama")
    game = make_game(0)
    with pytest.raises(ValueError, match=r"init: expected shape \(32,\) .*per_player=True.*got \(5, 32\)"):
        sf.learn_baseline(model, game, epochs=0, init=torch.randn(5, 32), progress=False)
    per_player_game = dataclasses.replace(game, baseline=torch.randn(5, 32))
    assert torch.allclose(sf.learn_baseline(model, per_player_game, epochs=0, progress=False),
                          per_player_game.baseline.mean(0))  # the default start still averages the game's rows


def test_a_callers_autocast_region_is_switched_off_as_by_the_engine():
    """``sf.evaluate`` switches a caller's autocast off (``compute_dtype`` alone sets the precision), the baseline's
    objective did not: under ``torch.autocast(bfloat16)`` it scored, and learned against, bf16 values (0.00273
    instead of 0.00262), not the values the engine will evaluate the learned baseline with."""
    model = tiny_model("llama")
    game = make_game(0)
    expected_score = baseline_objective(model, game, game.baseline, samples=16, seed=5)
    expected = sf.learn_baseline(model, game, epochs=2, lr=1.0, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        score = baseline_objective(model, game, game.baseline, samples=16, seed=5)
        learned = sf.learn_baseline(model, game, epochs=2, lr=1.0, progress=False)
    assert score == expected_score
    assert torch.equal(learned, expected)


@pytest.mark.filterwarnings("ignore::UserWarning")  # DataParallel without GPUs
def test_a_dataparallel_model_learns_the_baseline_of_the_model_it_holds():
    """A training loop's wrapped model: sf.evaluate looks through it, learn_baseline raised AttributeError."""
    model = tiny_model("llama")
    game = make_game(3)
    plain = sf.learn_baseline(model, game, epochs=2, lr=0.01, progress=False)
    wrapped = torch.nn.DataParallel(model)
    torch.testing.assert_close(sf.learn_baseline(wrapped, game, epochs=2, lr=0.01, progress=False), plain,
                               rtol=0, atol=0)
    assert baseline_objective(wrapped, game, plain) == baseline_objective(model, game, plain)
