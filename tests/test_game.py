"""Game.from_text: ids, players, targets, baselines, chat; masked_embeds and values_from_logits."""
import dataclasses
import warnings

import pytest
import torch

import sftint_fast as sf
from sftint_fast.game import Game

from conftest import tiny_model
from word_tokenizer import word_tokenizer

TEXT = "The cat, sat on the mat!"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def test_from_text_ids_players_and_default_target(model, tok):
    game = Game.from_text(model, tok, TEXT)
    ids = torch.tensor(tok(TEXT)["input_ids"])
    assert torch.equal(game.input_ids, ids)
    assert game.words == ("The", "cat,", "sat", "on", "the", "mat!")
    assert game.player_spans == ((0, 1), (1, 3), (3, 4), (4, 5), (5, 6), (6, 8))
    assert game.prompt_length == ids.numel() and game.num_players == 6
    with torch.no_grad():
        expected = model(input_ids=ids[None]).logits[0, -1].argmax()
    assert game.target.tolist() == [int(expected)]
    assert game.score_positions.tolist() == [ids.numel() - 1]
    rows = game.player_mask_rows()
    assert rows.tolist() == [0, 1, 1, 2, 3, 4, 5, 5]


def test_string_target_is_teacher_forced(model, tok):
    game = Game.from_text(model, tok, "the cat sat on", target="the big mat", players=[1, 2])
    prompt = tok("the cat sat on")["input_ids"]
    target = tok("the big mat", add_special_tokens=False)["input_ids"]
    assert game.target.tolist() == target
    assert game.input_ids.tolist() == prompt + target[:-1]
    assert game.score_positions.tolist() == [3, 4, 5]
    assert game.words == ("cat", "sat")


def test_explicit_spans_and_n_players(model, tok):
    game = Game.from_text(model, tok, TEXT, players=[(1, 3), (7, 8)])
    assert game.player_spans == ((1, 3), (7, 8))
    assert game.words == (tok.decode([11, 18]), "!")
    chars = Game.from_text(model, tok, TEXT, players=[(4, 8)], span_unit="chars")
    assert chars.player_spans == ((1, 3),) and chars.words == ("cat,",)
    last = Game.from_text(model, tok, TEXT, n_players=2, pick="last")
    assert last.words == ("sat", "mat!")


@pytest.mark.parametrize("players", [[1, 2], [(1, 3), (7, 8)], "words"])
def test_pick_that_chooses_nothing_is_refused(model, tok, players):
    """pick chooses among content words with n_players: with explicit players, or without n_players, it was silently
    ignored (the CLI refuses --pick there)."""
    with pytest.raises(ValueError, match="pick: expected 'first'.*received 'last'"):
        Game.from_text(model, tok, TEXT, players=players, pick="last")
    assert Game.from_text(model, tok, TEXT, players=players, pick="first").num_players > 0


def test_bad_inputs_raise(model, tok):
    with pytest.raises(ValueError, match="inside the prompt"):
        Game.from_text(model, tok, "the cat", players=[(1, 3)], target="sat on")
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        Game.from_text(model, tok, "the cat", target=[500])
    with pytest.raises(TypeError):
        Game.from_text(model, tok, "the cat", target=[1.5])
    with pytest.raises(ValueError, match="shape"):
        Game.from_text(model, tok, "the cat", baseline=torch.zeros(31))
    with pytest.raises(ValueError, match="expected 'pad'"):
        Game.from_text(model, tok, "the cat", baseline="mask")
    with pytest.raises(ValueError, match="non-empty"):
        Game.from_text(model, tok, "   ")
    with pytest.raises(ValueError, match="disjoint"):
        Game.from_text(model, tok, TEXT, players=[(0, 2), (1, 3)])
    game = Game.from_text(model, tok, "the cat sat")
    with pytest.raises(ValueError, match="prompt_length"):
        dataclasses.replace(game, prompt_length=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        game.masking = "attention"


class ScaledEmbedding(torch.nn.Embedding):
    """Like Gemma's: the module's output is weight[id] * scale, so baselines must come from the module."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


def test_baselines(tok):
    model = tiny_model("llama")
    old = model.get_input_embeddings()
    scaled = ScaledEmbedding(old.num_embeddings, old.embedding_dim)
    with torch.no_grad():
        scaled.weight.normal_()
    model.set_input_embeddings(scaled)
    pad = Game.from_text(model, tok, "the cat", baseline="pad", target=[5])
    assert torch.equal(pad.baseline, scaled.weight[tok.pad_token_id].detach() * 3.0)
    unk = Game.from_text(model, tok, "the cat", baseline="unk", target=[5])
    assert torch.equal(unk.baseline, scaled.weight[tok.unk_token_id].detach() * 3.0)
    with pytest.warns(UserWarning, match="unk"):
        fallback = Game.from_text(model, word_tokenizer(pad=False), "the cat", target=[5])
    assert torch.equal(fallback.baseline, unk.baseline)
    with pytest.warns(UserWarning, match="zero"):
        zeros = Game.from_text(model, word_tokenizer(pad=False, unk=False), "the cat", target=[5])
    assert torch.equal(zeros.baseline, torch.zeros(32))
    rows = torch.randn(2, 32)
    assert Game.from_text(model, tok, "the cat", baseline=rows, target=[5]).baseline is rows


def test_masked_embeds_equal_substituted_ids_and_grad(model, tok):
    game = Game.from_text(model, tok, TEXT, baseline="unk")
    embed = model.get_input_embeddings()
    subsets = torch.tensor([0, 5, 63, 34])
    out = game.masked_embeds(embed(game.input_ids), subsets)
    rows = game.player_mask_rows()
    for b, s in enumerate(subsets.tolist()):
        ids = game.input_ids.clone()
        masked = (rows >= 0) & (((s >> rows.clamp(min=0)) & 1) == 0)
        ids[masked] = tok.unk_token_id
        assert torch.equal(out[b], embed(ids))
    per_player = torch.zeros(6, 32, requires_grad=True)
    two_d = dataclasses.replace(game, baseline=per_player)
    two_d.masked_embeds(embed(game.input_ids).detach(), torch.tensor([0b111110])).sum().backward()
    expected = torch.zeros(6, 32)
    expected[0] = 1.0  # only player 0 (one token) is masked
    assert torch.equal(per_player.grad, expected)


@pytest.mark.parametrize("path", ["cpu-op", "torch"])
def test_values_from_logits(model, tok, path, monkeypatch):
    # "torch": the plain torch log-odds that CUDA logits (and a build without the C++ extension) take; float32 CPU
    # logits go to the C++ op, so without this the torch path would be tested on GPU machines only
    if path == "torch":
        from sftint_fast.ops import layer_ops

        monkeypatch.setattr(layer_ops, "log_odds_available", lambda logits: False)
    game = Game.from_text(model, tok, "the cat sat on", target="the big mat")
    logits = torch.randn(4, 3, 128, dtype=torch.float64) * 5
    p = logits.softmax(-1).gather(-1, game.target.view(1, 3, 1).expand(4, 3, 1)).squeeze(-1)
    expected = (p.log() - (-p).log1p()).sum(-1)
    got = game.values_from_logits(logits.to(torch.bfloat16).float())
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=0.2)
    assert torch.allclose(game.values_from_logits(logits.float()).double(), expected, atol=1e-4)
    # near-uniform logits: p(y) ~ 1/128, where log(1 - p) differs from 0 and from the log of a sum that keeps y
    flat = torch.randn(4, 3, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.1
    p_flat = flat.softmax(-1).gather(-1, game.target.view(1, 3, 1).expand(4, 3, 1)).squeeze(-1)
    expected_flat = (p_flat.log() - (-p_flat).log1p()).sum(-1)
    assert torch.allclose(game.values_from_logits(flat.float()).double(), expected_flat, atol=1e-4)
    bad = logits.float().clone()
    bad[2, 1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"subsets \(bitmasks\) \[6\]"):
        game.values_from_logits(bad, subsets=torch.tensor([1, 3, 6, 7]))
    custom = dataclasses.replace(game, value=lambda lg: lg[:, 0, 0])
    assert torch.equal(custom.values_from_logits(logits.float()), logits[:, 0, 0].float())
    wrong = dataclasses.replace(game, value=lambda lg: lg[:, 0])
    with pytest.raises(ValueError, match="callable"):
        wrong.values_from_logits(logits.float())
    log_p = dataclasses.replace(game, value=lambda lg: lg.softmax(-1)[:, 0, 5].log())  # log 0 = -inf
    zero = logits.float().clone()
    zero[1, 0, 5] = -1e30
    with pytest.raises(ValueError, match=r"value: expected finite values from the callable, received NaN/inf for "
                                         r"subsets \(bitmasks\) \[3\]"):
        log_p.values_from_logits(zero, subsets=torch.tensor([1, 3, 6, 7]))


def test_chat_players_are_user_words(model, tok):
    game = Game.from_text(model, tok, "hello big world", chat=True)
    templated = tok.apply_chat_template([{"role": "user", "content": "hello big world"}], add_generation_prompt=True)
    assert game.input_ids.tolist() == list(templated["input_ids"])
    assert game.words == ("hello", "big", "world")
    assert [game.input_ids[a:b].tolist() for a, b in game.player_spans] == [[t] for t in tok("hello big world")["input_ids"]]


@pytest.mark.parametrize("text", ["assistant", "assistant :", "user"])
def test_chat_players_are_the_user_text_even_when_the_template_repeats_it(model, tok, text):
    game = Game.from_text(model, tok, text, chat=True)
    # "<bos> user : {text} <eos> <bos> assistant : ": the prompt's tokens start at 3, after "<bos> user :"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert game.player_spans == tuple((3 + k, 4 + k) for k in range(n))
    assert game.words == tuple(text.split())


def test_chat_char_spans_are_offsets_into_the_text_not_the_template(model, tok):
    game = Game.from_text(model, tok, "the big cat", chat=True, players=[(8, 11)], span_unit="chars")
    assert game.player_spans == ((5, 6),) and game.words == ("cat",)
    with pytest.raises(ValueError, match=r"inside \[0, 11\], received \(-4, 3\)"):
        Game.from_text(model, tok, "the big cat", chat=True, players=[(-4, 3)], span_unit="chars")


@pytest.mark.parametrize("text", ["  the big cat", "the big cat\n", " the big cat \t"])
def test_chat_template_that_trims_the_message_keeps_the_user_words(model, text):
    # Llama-3 and Gemma-3 templates render `content | trim`: a prompt read with its newline was refused as "not found"
    tok = word_tokenizer()
    tok.chat_template = ("{% for m in messages %}<bos> {{ m['role'] }} :{{ m['content'] | trim }}<eos> {% endfor %}"
                         "{% if add_generation_prompt %}<bos> assistant : {% endif %}")
    game = Game.from_text(model, tok, text, chat=True)
    assert game.words == ("the", "big", "cat") and game.player_spans == ((3, 4), (4, 5), (5, 6))
    assert game.input_ids.tolist() == list(tok.apply_chat_template([{"role": "user", "content": text}],
                                                                   add_generation_prompt=True)["input_ids"])
    assert Game.from_text(model, tok, text, chat=True, players=[(4, 5)], span_unit="tokens").words == ("big",)
    with pytest.raises(ValueError, match="trims .* pass the text without its leading and trailing whitespace"):
        Game.from_text(model, tok, text, chat=True, players=[(4, 7)], span_unit="chars")


def test_char_spans_must_be_ints(model, tok):
    with pytest.raises(TypeError, match=r"pair of ints, received \(0.5, 3.9\)"):
        Game.from_text(model, tok, "the cat", players=[(0.5, 3.9)], span_unit="chars")


def test_from_text_reads_players_once_and_checks_span_unit_and_target_types(model, tok):
    gen = Game.from_text(model, tok, "the cat sat on", players=(i for i in [1, 2]), target=[5])
    assert gen.words == ("cat", "sat")  # an iterator was read empty by the span check: no players
    with pytest.raises(TypeError, match="players: expected 'words', 'all', a list of word indices .* received 3"):
        Game.from_text(model, tok, "the cat", players=3, target=[5])
    with pytest.raises(ValueError, match="span_unit: expected 'tokens' or 'chars', received 'char'"):
        Game.from_text(model, tok, "the cat", span_unit="char", target=[5])  # was ignored for word players
    for players in ("words", [0, 1]):  # character offsets of word players: was ignored
        with pytest.raises(ValueError, match=r"span_unit: expected 'tokens' .* received 'chars' with players="):
            Game.from_text(model, tok, "the cat", players=players, span_unit="chars", target=[5])
    for target in (torch.tensor([True]), torch.tensor([5 + 0j])):  # were read as id 1 / id 5
        with pytest.raises(TypeError, match="target: expected integer token ids"):
            Game.from_text(model, tok, "the cat", target=target)
    with pytest.raises(TypeError, match="target: expected None, a string or a list of int token ids, received 5"):
        Game.from_text(model, tok, "the cat", target=5)


def test_pad_token_outside_the_vocabulary_is_named():
    model = tiny_model("llama", vocab_size=40)
    tok = word_tokenizer()
    tok.add_special_tokens({"pad_token": "<newpad>"})  # id 50, the model's embeddings were not resized
    with pytest.raises(ValueError, match=r"baseline='pad': expected the tokenizer's pad token id in \[0, 40\) .*"
                                         r"received 50"):  # was an IndexError inside the embedding
        Game.from_text(model, tok, "the cat", target=[5])


def test_game_fields_of_the_wrong_kind_are_refused(model, tok):
    game = Game.from_text(model, tok, "the cat sat on", target=[5])
    with pytest.raises(TypeError, match="prompt_length: expected an int, received float 4.0"):
        dataclasses.replace(game, prompt_length=4.0)  # score_positions became a float tensor
    with pytest.raises(TypeError, match="prompt_length: expected an int, received bool True"):
        Game(input_ids=torch.tensor([5]), player_spans=((0, 1),), words=("a",), target=torch.tensor([5]),
             baseline=torch.zeros(32), prompt_length=True)
    with pytest.raises(TypeError, match="words: expected a sequence of strings"):
        dataclasses.replace(game, player_spans=((0, 1), (1, 2)), words="ab")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="baseline: expected finite values, received NaN/inf"):
            dataclasses.replace(game, baseline=torch.full((32,), bad))
    with pytest.raises(ValueError, match=r"embed_tokens_output: expected \(4, 32\) .* received \(4, 31\)"):
        game.masked_embeds(torch.zeros(4, 31), torch.tensor([0]))


def test_default_target_gives_each_submodule_its_own_mode_back(tok):
    """The greedy answer is taken in eval mode; a frozen (eval) submodule of a model in train mode stays in eval."""
    model = tiny_model("llama").train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    Game.from_text(model, tok, TEXT)
    assert [m.training for m in model.modules()] == modes


def test_default_target_is_the_models_own_argmax_inside_a_callers_autocast(model, tok):
    """``Game.from_text`` called inside ``torch.autocast(bfloat16)`` (a training loop of one's own) took the greedy
    target from bf16 logits, which can pick another token than the float32 model: the target is now taken in the
    model's own dtype, and the caller's region is left as it was."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        plain = Game.from_text(model, tok, TEXT)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = Game.from_text(model, tok, TEXT)
            assert torch.is_autocast_enabled("cpu")
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.float32]
    assert torch.equal(inside.target, plain.target)


def test_word_index_players_after_a_token_that_straddles_two_words(model):
    """A BPE whose merges cross a space ("t s"): "cat sat" share a token. Word indices name whitespace words."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<unk>", *"acehmnost ", "t ", "t s"])}
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[("t", " "), ("t ", "s")], unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", unk_token="<unk>")
    text = "the cat sat on the mat"
    every = Game.from_text(model, tok, text, target=[5])
    assert every.words == ("the", "cat sat", "on", "the", "mat")
    game = Game.from_text(model, tok, text, players=[3, 5], target=[5])
    assert game.words == ("on", "mat")  # were "the" and an out-of-range error
    assert game.player_spans == (every.player_spans[2], every.player_spans[4])
    with pytest.raises(ValueError, match=r"word 2 'sat' shares a token with a neighbouring word \(together 'cat sat'\)"):
        Game.from_text(model, tok, text, players=[2], target=[5])


def _byte_level_bpe():
    """A tiny byte-level BPE (GPT-2 / SmolLM2 style: ' paris' and 'paris' are different tokens), trained offline."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the capital of france is paris", "paris is big", "paris"] * 20, vocab_size=300,
                            min_frequency=1, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


def test_a_target_without_its_leading_space_is_warned_about():
    """target='paris' after '... is' scores the token 'paris', where the model would write ' paris' (on SmolLM2
    p = 5e-4 vs 0.77): a value of another question, without a word. Said when a space would change the tokens;
    not for ' paris', a prompt ending in a space, a chat (the answer starts a turn) or a word-level tokenizer."""
    import warnings

    tok = _byte_level_bpe()
    net = tiny_model("llama", vocab_size=len(tok))
    text, zero = "the capital of france is", {"baseline": torch.zeros(net.config.hidden_size)}
    assert tok("paris", add_special_tokens=False)["input_ids"] != tok(" paris", add_special_tokens=False)["input_ids"]
    with pytest.warns(UserWarning, match=r"target 'paris' is tokenised on its own.*' paris' is \["):
        Game.from_text(net, tok, text, target="paris", **zero)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Game.from_text(net, tok, text, target=" paris", **zero)
        Game.from_text(net, tok, text + " ", target="paris", **zero)
        Game.from_text(net, tok, text, target=".", **zero)  # punctuation takes no space
        Game.from_text(tiny_model("llama"), word_tokenizer(), text, target="mat")


def test_a_sentencepiece_target_is_not_warned_about():
    """A Llama-2-style SentencePiece tokenizer prefixes its own '▁': 'paris' is ['▁paris'], the token the text
    continues with, while ' paris' is ['▁', '▁paris']. The target is right as given; a warning asking for the
    leading space would give a wrong two-token target."""
    import warnings

    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<s>", "</s>", "▁"] + [p + w for w in ("the", "capital", "of", "france", "is", "paris")
                                              for p in ("▁", "")]
    sp = Tokenizer(models.Unigram([(piece, -1.0) for piece in vocab], unk_id=0))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    text = "the capital of france is"
    assert tok.convert_ids_to_tokens(tok(" paris", add_special_tokens=False)["input_ids"]) == ["▁", "▁paris"]
    assert tok(text + " paris")["input_ids"][-1:] == tok("paris", add_special_tokens=False)["input_ids"]
    net = tiny_model("llama", vocab_size=len(tok))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        game = Game.from_text(net, tok, text, target="paris", baseline=torch.zeros(net.config.hidden_size))
    assert tok.convert_ids_to_tokens(game.target.tolist()) == ["▁paris"]


def test_a_sentencepiece_target_whose_leading_space_becomes_a_token_is_warned_about():
    """The other way round: ' paris' (the habit from GPT-2-style tokenizers, and the bundled probes' answers) is
    ['▁', '▁paris'] on a Llama-2-style SentencePiece tokenizer, where the prompt continues with ['▁paris']: the
    value silently became the log-odds of a lone '▁' plus those of '▁paris' after it. Said, in chat too; not where
    the leading space is the prompt's own continuation (byte-level ' paris')."""
    import warnings

    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<s>", "</s>", "▁"] + [p + w for w in ("the", "capital", "of", "france", "is", "paris", "[inst]",
                                                             "[/inst]", "user", ":") for p in ("▁", "")]
    sp = Tokenizer(models.Unigram([(piece, -1.0) for piece in vocab], unk_id=0))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}[inst] {{ m['content'] }} [/inst]{% endfor %}"
    text, net = "the capital of france is", tiny_model("llama", vocab_size=len(tok))
    zero = {"baseline": torch.zeros(net.config.hidden_size)}
    for chat in (False, True):
        with pytest.warns(UserWarning, match=r"target ' paris' is tokenised on its own, as \[3, \d+\]: the prompt "
                                             r"followed by it continues with \[\d+\]"):
            game = Game.from_text(net, tok, text, target=" paris", chat=chat, **zero)
        assert tok.convert_ids_to_tokens(game.target.tolist()) == ["▁", "▁paris"]  # as given: said, not changed
    bpe = _byte_level_bpe()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Game.from_text(tiny_model("llama", vocab_size=len(bpe)), bpe, text, target=" paris", **zero)


def test_attention_masking_warns_of_a_last_token_player(model, tok):
    # "attention" masking hides a masked token from the other queries only: a player that is just the prompt's last
    # token is seen by no query but its own (the scored one) with a one-token target, so it is a null player
    with pytest.warns(UserWarning, match="null player"):
        game = Game.from_text(model, tok, "the cat sat on the mat", masking="attention")
    v = sf.evaluate(model, game, progress=False)
    last = 1 << (game.num_players - 1)
    assert torch.equal(v[last:], v[:last])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a target token after it attends to it; embedding masking replaces it
        Game.from_text(model, tok, "the cat sat on the mat", masking="attention", target="the mat")
        Game.from_text(model, tok, "the cat sat on the mat")
        Game.from_text(model, tok, "the cat sat on the mat", masking="attention", players=[0, 1])
