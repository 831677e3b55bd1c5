"""The naive engine and ``evaluate`` against one-at-a-time plain HF forwards of the real model."""
import warnings

import pytest
import torch

import sftint_fast as sf
from sftint_fast.engine.naive import evaluate_naive
from sftint_fast.game import Game

from conftest import tiny_model
from word_tokenizer import word_tokenizer

TOK = word_tokenizer()
# Layout A: 6 word players, one at position 0, a multi-token word, a player holding the last prompt token.
TEXT_A = "The cat, sat on the mat!"
# Layout B: a 3-token teacher-forced target, players with background between and after them.
TEXT_B = "the cat sat on the mat"


def _log_odds(logits, target):
    """float64 log p(y) - log(1 - p(y)), summed over the target tokens; logits (m, V)."""
    p = logits.double().softmax(-1).gather(-1, target.view(-1, 1)).squeeze(-1)
    return float((p.log() - (-p).log1p()).sum())


def _reference(model, game, subset, pad_id):
    """One plain forward of the variant: substituted pad ids (embedding) or deleted tokens (attention)."""
    rows = game.player_mask_rows()
    masked = (rows >= 0) & (((subset >> rows.clamp(min=0)) & 1) == 0)
    m = game.target.numel()
    scored = game.score_positions
    with torch.no_grad():
        if game.masking == "embedding":
            ids = game.input_ids.clone()
            ids[masked] = pad_id
            logits = model(input_ids=ids[None]).logits[0, scored]
        else:
            # A masked token only matters as a key, so dropping it (positions kept) is the same game; the
            # scored positions stay because they are queries (their diagonal is kept).
            masked[scored] = False
            keep = (~masked).nonzero().flatten()
            logits = model(input_ids=game.input_ids[keep][None], position_ids=keep[None],
                           attention_mask=torch.ones(1, keep.numel(), dtype=torch.long)).logits[0, -m:]
    return _log_odds(logits, game.target)


CASES = [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "eager"), ("gpt2", "eager")]


@pytest.mark.parametrize("arch,attn", CASES)
@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("layout", ["A", "B"])
def test_naive_matches_plain_forwards(arch, attn, masking, layout):
    model = tiny_model(arch, attn=attn, **({"qkv_bias": True} if arch == "qwen2" else {}))
    if layout == "A":
        game = Game.from_text(model, TOK, TEXT_A, masking=masking)
    else:
        game = Game.from_text(model, TOK, TEXT_B, players=[0, 2, 4], target="the big mat", masking=masking)
    v = sf.evaluate(model, game, method="naive", batch_size=7, progress=False)
    assert v.shape == (1 << game.num_players,) and v.dtype == torch.float32
    # Plain forwards on the 0/full subsets and a seeded sample (one forward per variant is the slow part).
    checked = torch.cat([torch.tensor([0, v.numel() - 1]),
                         torch.randperm(v.numel(), generator=torch.Generator().manual_seed(1))[:10]])
    expected = torch.tensor([_reference(model, game, int(s), TOK.pad_token_id) for s in checked])
    assert (v[checked].double() - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))


def test_full_variant_is_the_plain_log_odds_and_chat():
    model = tiny_model("llama")
    for game in (Game.from_text(model, TOK, TEXT_B, target="the big mat"),
                 Game.from_text(model, TOK, "hello big world", chat=True)):
        v = sf.evaluate(model, game, method="naive", subsets=torch.tensor([(1 << game.num_players) - 1]), progress=False)
        with torch.no_grad():
            logits = model(input_ids=game.input_ids[None]).logits[0, game.score_positions]
        assert abs(float(v[0]) - _log_odds(logits, game.target)) < 1e-5


def test_subsets_order_batch_size_and_auto():
    model = tiny_model("llama")
    game = Game.from_text(model, TOK, TEXT_A)
    full = sf.evaluate(model, game, method="naive", progress=False)
    subsets = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:20]
    some = sf.evaluate(model, game, method="naive", subsets=subsets, batch_size=3, progress=False)
    assert torch.allclose(some, full[subsets], rtol=0, atol=1e-5)  # batch size only changes rounding
    assert sf.evaluate(model, game, subsets=torch.tensor([], dtype=torch.int64), progress=False).numel() == 0
    auto = sf.evaluate(model, game, method="auto", progress=False)
    assert (auto - full).abs().max() <= 1e-4 * max(1.0, float(full.abs().max()))
    many = sf.evaluate_many(model, [game, game], method="naive", progress=False)
    assert all(torch.equal(x, full) for x in many)


def test_unsupported_architecture_falls_back_to_naive():
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    game = Game.from_text(model, TOK, "the cat sat")
    naive = sf.evaluate(model, game, method="naive", progress=False)
    with pytest.warns(UserWarning, match="naive"):
        auto = sf.evaluate(model, game, method="auto", progress=False)
    assert torch.equal(auto, naive)
    with pytest.raises(ValueError, match="trie"):
        sf.evaluate(model, game, method="trie", progress=False)


def test_bad_inputs_raise():
    model = tiny_model("llama")
    game = Game.from_text(model, TOK, "the cat sat")
    with pytest.raises(TypeError, match="integer"):
        sf.evaluate(model, game, subsets=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="1-D"):
        sf.evaluate(model, game, subsets=[0, 1])
    with pytest.raises(ValueError, match=r"\[0, 2\^3\).*\[8\]"):
        sf.evaluate(model, game, subsets=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="method"):
        sf.evaluate(model, game, method="fast")
    with pytest.raises(ValueError, match="batch_size"):
        sf.evaluate(model, game, batch_size=0)
    with pytest.raises(ValueError, match="compute_dtype"):
        sf.evaluate(model, game, compute_dtype="float8")
    with pytest.raises(TypeError, match="Game"):
        sf.evaluate(model, "the cat sat")
    big = Game(input_ids=torch.arange(4, 44), player_spans=tuple((i, i + 1) for i in range(40)),
               words=("w",) * 40, target=torch.tensor([5]), baseline=torch.zeros(32), prompt_length=40)
    with pytest.raises(ValueError, match=r"n=40 players.*GiB"):
        sf.evaluate(model, big, method="naive")
    v = sf.evaluate(model, big, method="naive", subsets=torch.tensor([0, (1 << 40) - 1]), progress=False)
    assert v.shape == (2,)
    bf16 = tiny_model("llama").to(torch.bfloat16)
    with pytest.raises(ValueError, match="autocast"):
        sf.evaluate(bf16, Game.from_text(bf16, TOK, "the cat sat"), method="naive", compute_dtype="float32")


def test_nan_logits_name_the_subsets():
    model = tiny_model("llama")
    game = Game.from_text(model, TOK, "the cat sat")
    # a Game refuses a NaN baseline; poisoned afterwards, it makes NaN logits in exactly the variants that mask a player
    object.__setattr__(game, "baseline", torch.full((32,), float("nan")))
    with pytest.raises(ValueError, match=r"subsets \(bitmasks\) \[0, 1, 2, 3, 4, 5, 6\]"):
        sf.evaluate(model, game, method="naive", progress=False)


def test_mode_restored_no_grad_and_compute_dtypes():
    model = tiny_model("llama").train()
    game = Game.from_text(model, TOK, TEXT_A)
    v = sf.evaluate(model, game, method="naive", progress=False)
    assert model.training and not v.requires_grad
    model.eval()
    assert torch.equal(sf.evaluate(model, game, method="naive", progress=False), v)  # dropout-free: same values
    assert torch.equal(sf.evaluate(model, game, method="naive", compute_dtype="tf32", progress=False), v)
    low = sf.evaluate(model, game, method="naive", compute_dtype="bfloat16", progress=False)
    assert 0 < (low - v).abs().max() < 0.1
    with pytest.warns(UserWarning, match="autocast"):
        assert torch.equal(sf.evaluate(model, game, compute_dtype="bfloat16", progress=False), low)
    with pytest.raises(ValueError, match="autocast"):
        sf.evaluate(model, game, method="trie", compute_dtype="bfloat16", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        direct = evaluate_naive(model, game, torch.arange(64), progress=False)
    assert torch.equal(direct, v)
