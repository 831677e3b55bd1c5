"""v(S) straight from METHOD.md section 1, with plain HF forwards, against both engines.

The reference here shares no code with the package: masked players' embedding rows are overwritten with the pad
token's embedding row (embedding mode) or hidden as keys by a hand-built 4D mask with explicit positions (attention
mode), and the value is ``logit_y - logsumexp(logits without y)`` in float64, summed over teacher-forced target tokens.
"""
import pytest
import torch

import sftint_fast as sf
from sftint_fast.game import Game

from conftest import tiny_model
from word_tokenizer import word_tokenizer

TOK = word_tokenizer()


def method_value(model, game, subset: int, pad_id: int) -> float:
    """METHOD.md's ``v(S)`` for bitmask ``subset``: one forward of the variant, log-odds summed over the target."""
    ids = game.input_ids
    length = ids.numel()
    absent = torch.zeros(length, dtype=torch.bool)
    for i, (start, end) in enumerate(game.player_spans):
        if not subset >> i & 1:
            absent[start:end] = True
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        embeds = embedding(ids[None]).clone()
        kwargs = {}
        if game.masking == "embedding":
            embeds[0, absent] = embedding.weight[pad_id]
        else:
            keys = ~absent[None, :] | torch.eye(length, dtype=torch.bool)  # a masked token still sees itself
            allowed = torch.ones(length, length, dtype=torch.bool).tril() & keys
            mask = torch.zeros(length, length, dtype=embeds.dtype).masked_fill(~allowed, torch.finfo(embeds.dtype).min)
            kwargs = {"attention_mask": mask[None, None], "position_ids": torch.arange(length)[None]}
        logits = model(inputs_embeds=embeds, **kwargs).logits[0].double()
    total = 0.0
    for k, y in enumerate(game.target.tolist()):
        row = logits[game.prompt_length - 1 + k]
        others = torch.cat([row[:y], row[y + 1:]])
        total += float(row[y] - others.logsumexp(0))
    return total


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("target,chat", [(None, False), ("the big mat", False), (None, True), ("paris city", True)])
def test_engines_equal_the_method_definition_in_float64(arch, masking, target, chat):
    model = tiny_model(arch).double()
    with torch.no_grad():  # HF zeroes the pad row of Llama's embedding: a zero baseline would then pass unseen
        model.get_input_embeddings().weight[TOK.pad_token_id].normal_(generator=torch.Generator().manual_seed(0))
    game = Game.from_text(model, TOK, "the cat, sat on the mat", target=target, masking=masking, chat=chat)
    n = game.num_players
    if target is None:  # the default target: the argmax next token of the full prompt
        with torch.no_grad():
            assert game.target.tolist() == [int(model(input_ids=game.input_ids[None]).logits[0, -1].argmax())]
    if chat:  # the template's tokens (before and after the user text) are background, never players
        assert game.player_spans[0][0] > 0 and game.player_spans[-1][1] < game.prompt_length
    subsets = [0, 1, 0b10110, (1 << n) - 2, 1 << (n - 1), (1 << n) - 1]
    expected = torch.tensor([method_value(model, game, s, TOK.pad_token_id) for s in subsets], dtype=torch.float64)
    for method in ("naive", "trie"):
        v = sf.evaluate(model, game, method=method, subsets=torch.tensor(subsets), progress=False)
        # the engines return float32 values: float32 rounding of values of size ~10 is the honest tolerance
        assert (v.double() - expected).abs().max() < 1e-5 * max(1.0, float(expected.abs().max())), method
