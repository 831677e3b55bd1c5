"""Players: words → token spans via offsets (and by decoding), selection, validation."""
import pytest

from sftint_fast import players as P

from word_tokenizer import NoOffsetsTokenizer, word_tokenizer

TEXT = "The cat, sat on the mat!"


def _brute_word_spans(tok, text):
    # Reference: a token belongs to the word whose character range contains the token's first character.
    enc = tok(text, return_offsets_mapping=True)
    words = P.word_char_spans(text)
    spans = []
    for cs, ce in words:
        toks = [t for t, (a, b) in enumerate(enc["offset_mapping"]) if cs <= a < ce and b > a]
        spans.append((min(toks), max(toks) + 1))
    return spans, [text[a:b] for a, b in words]


def test_words_from_offsets_match_brute_force():
    tok = word_tokenizer()
    tokenized = P.tokenize_with_offsets(tok, TEXT)
    spans, words = P.word_players(tokenized)
    assert (spans, words) == _brute_word_spans(tok, TEXT)
    assert words[1] == "cat," and spans[1][1] - spans[1][0] == 2  # a multi-token word


def test_fallback_without_offsets_matches_offsets():
    tok = word_tokenizer()
    with_offsets = P.tokenize_with_offsets(tok, TEXT)
    decoded = P.tokenize_with_offsets(NoOffsetsTokenizer(tok), TEXT)
    assert decoded.input_ids == with_offsets.input_ids
    assert P.word_players(decoded) == P.word_players(with_offsets)


def test_token_straddling_two_words_merges_them():
    tokenized = P.Tokenized("ab cd ef", (10, 11, 12), ((0, 4), (4, 5), (6, 8)))  # token 0 covers "ab c"
    spans, words = P.word_players(tokenized)
    assert spans == [(0, 2), (2, 3)]
    assert words == ["ab cd", "ef"]


def test_region_restricts_to_a_part_of_the_text():
    tok = word_tokenizer()
    text = "hello world the cat sat"
    tokenized = P.tokenize_with_offsets(tok, text)
    spans, words = P.word_players(tokenized, region=(12, len(text)))
    assert words == ["the", "cat", "sat"]
    assert spans == [(2, 3), (3, 4), (4, 5)]


@pytest.mark.parametrize("pick,expected", [("first", [1, 2]), ("last", [2, 5])])
def test_first_and_last_content_words(pick, expected):
    words = ["The", "cat,", "sat", "on", "the", "mat!"]
    assert P.select_words(words, "words", n_players=2, pick=pick) == expected


@pytest.mark.parametrize("pick", ["first", "last"])
def test_zero_content_words_pick_no_player(pick):
    # n_players=0 is accepted ("a non-negative int"): no player, from either end (content[-0:] would be all of them)
    assert P.select_words(["the", "big", "cat", "sat"], "words", n_players=0, pick=pick) == []


def test_select_word_indices_and_errors():
    words = ["a", "b", "c"]
    assert P.select_words(words, [0, 2]) == [0, 2]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        P.select_words(words, [3])
    with pytest.raises(ValueError, match="increasing"):
        P.select_words(words, [2, 0])
    with pytest.raises(ValueError, match="at most"):
        P.select_words(["the", "cat"], "words", n_players=2)
    with pytest.raises(ValueError, match="expected 'words'"):
        P.select_words(words, "tokens")
    with pytest.raises(TypeError):
        P.select_words(words, [0.5])
    with pytest.raises(ValueError, match="n_players: expected a non-negative int, received True"):
        P.select_words(["big", "cat"], "words", n_players=True)  # was taken as 1
    with pytest.raises(ValueError, match="pick: expected 'first' .* explicit list, received 'last'"):
        P.select_words(words, [0, 2], pick="last")  # was ignored
    with pytest.raises(ValueError, match="pick: expected 'first' .* without n_players, received 'last'"):
        P.select_words(words, "words", pick="last")  # was ignored


@pytest.mark.parametrize(
    "spans,match",
    [
        ([(0, 2), (1, 3)], "disjoint"),
        ([(2, 2)], "non-empty"),
        ([(3, 1)], "non-empty"),
        ([(-1, 1)], "inside the prompt"),
        ([(4, 6)], "inside the prompt"),
        ([(2, 3), (0, 1)], "sorted"),
    ],
)
def test_validate_spans_rejects(spans, match):
    with pytest.raises(ValueError, match=match):
        P.validate_spans(spans, 5)


def test_validate_spans_types_and_ok():
    assert P.validate_spans([(0, 1), (1, 5)], 5) == ((0, 1), (1, 5))
    with pytest.raises(TypeError):
        P.validate_spans([(0, 1.5)], 5)
    with pytest.raises(TypeError):
        P.validate_spans([(0,)], 5)


def test_char_players():
    tokenized = P.tokenize_with_offsets(word_tokenizer(), TEXT)
    spans, words = P.char_players(tokenized, [(4, 8), (20, 24)])
    assert spans == [(1, 3), (6, 8)]
    assert words == ["cat,", "mat!"]
    with pytest.raises(ValueError, match="inside"):
        P.char_players(tokenized, [(20, 99)])
    with pytest.raises(ValueError, match="covers no token"):
        P.char_players(tokenized, [(3, 4)])  # only a space


def test_char_players_refuse_non_int_bounds():
    tokenized = P.tokenize_with_offsets(word_tokenizer(), TEXT)  # "cat" is one token, "," another
    with pytest.raises(TypeError, match="pair of ints"):
        P.char_players(tokenized, [(True, 3)])
    assert P.char_players(tokenized, [(4, 7)]) == ([(1, 2)], ["cat"])


def test_char_players_in_a_region_take_offsets_from_its_start():
    tokenized = P.tokenize_with_offsets(word_tokenizer(), "hello world the cat sat")
    assert P.char_players(tokenized, [(4, 7)], region=(12, 23)) == ([(3, 4)], ["cat"])
    with pytest.raises(ValueError, match=r"inside \[0, 11\], received \(-2, 3\)"):
        P.char_players(tokenized, [(-2, 3)], region=(12, 23))  # would reach back into "world"
    with pytest.raises(ValueError, match=r"span \(3, 4\) ' ' covers no token"):
        P.char_players(tokenized, [(3, 4)], region=(12, 23))


def test_fallback_offsets_stay_on_the_text_when_casefolding_lengthens_a_character():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "ß": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>")
    text = "ß ß ß a b"  # "ß".casefold() == "ss": each ß shifted the following offsets by one
    with_offsets = P.tokenize_with_offsets(tok, text)
    decoded = P.tokenize_with_offsets(NoOffsetsTokenizer(tok), text)
    assert decoded.offsets == with_offsets.offsets == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    assert P.word_players(decoded) == P.word_players(with_offsets)


def _byte_level_tokenizer():
    """A byte-level BPE without merges: every UTF-8 byte is a token, so "é" and "☕" span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=inner)


@pytest.mark.parametrize("text", ["the café sat", "a ☕ b", "naïve  x\n y"])
def test_fallback_without_offsets_gives_the_bytes_of_a_character_its_span(text):
    # a byte-level token that ends inside a character decodes to "\ufffd", which is not in the text
    tok = _byte_level_tokenizer()
    with_offsets = P.tokenize_with_offsets(tok, text)
    decoded = P.tokenize_with_offsets(NoOffsetsTokenizer(tok), text)
    assert P.word_players(decoded) == P.word_players(with_offsets)


@pytest.mark.parametrize("text", ["the zebra, sat", "zebra cat", "the cat zebra", "the zebra  okapi, sat"])
def test_fallback_without_offsets_places_unknown_tokens_on_their_words(text):
    # "zebra"/"okapi" are <unk>: not special tokens that cover nothing, the text between their neighbours
    tok = word_tokenizer()
    with_offsets = P.tokenize_with_offsets(tok, text)
    decoded = P.tokenize_with_offsets(NoOffsetsTokenizer(tok), text)
    assert decoded.offsets == with_offsets.offsets
    assert P.word_players(decoded) == P.word_players(with_offsets)


def test_spans_players_and_pick_that_are_not_what_they_should_be_say_so():
    with pytest.raises(TypeError, match=r"player 0: expected a \(start, end\) pair of ints, received 3"):
        P.validate_spans([3], 5)
    with pytest.raises(TypeError, match="player_spans: expected a list of .* received None"):
        P.validate_spans(None, 5)
    with pytest.raises(TypeError, match=r"character pair of ints, received 4"):
        P.char_players(P.tokenize_with_offsets(word_tokenizer(), TEXT), [4])
    with pytest.raises(TypeError, match="players: expected 'words', 'all' or a list of word indices, received 2"):
        P.select_words(["a", "b", "c"], 2)
    with pytest.raises(ValueError, match="pick: expected 'first' or 'last', received 'middle'"):
        P.select_words(["a", "b"], "words", pick="middle")  # was ignored without n_players


def test_word_indices_name_whitespace_words_after_a_token_straddles_two():
    # token 0 covers "ab c": "ab" and "cd" share it; the indices of the words after them must not shift
    tokenized = P.Tokenized("ab cd ef gh", (10, 11, 12, 13), ((0, 4), (4, 5), (6, 8), (9, 11)))
    assert P.word_players(tokenized, players=[2]) == ([(2, 3)], ["ef"])  # was "gh"
    assert P.word_players(tokenized, players=[2, 3]) == ([(2, 3), (3, 4)], ["ef", "gh"])  # was out of range
    with pytest.raises(ValueError, match=r"word 1 'cd' shares a token with a neighbouring word \(together 'ab cd'\)"):
        P.word_players(tokenized, players=[1])  # was "ef"
    with pytest.raises(ValueError, match=r"word indices in \[0, 4\), received 4"):
        P.word_players(tokenized, players=[4])
    assert P.word_players(tokenized) == ([(0, 2), (2, 3), (3, 4)], ["ab cd", "ef", "gh"])  # "words" merges them


def _sentencepiece_without_byte_fallback():
    """A T5-style SentencePiece unigram without byte fallback: an unknown word is '▁' + '<unk>'."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<s>", "</s>", "▁"] + [p + w for w in ("the", "cat", "sat") for p in ("▁", "")]
    sp = Tokenizer(models.Unigram([(piece, -1.0) for piece in vocab], unk_id=0))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("text", ["the 🍕 ☕ cat", "the 🍕 ☕", "the cat 🍕 ☕ 🍕 sat"])
def test_fallback_without_offsets_keeps_unknown_words_apart_across_a_space_token(text):
    # ['▁the', '▁', '<unk>', '▁', '<unk>', ...]: the '▁' after the first unknown token decodes to a space only; it
    # closed the unknown text before it began, so '🍕' got no characters, '🍕 ☕' became one player of token 4 alone
    # and token 2 was never masked
    tok = _sentencepiece_without_byte_fallback()
    with_offsets = P.tokenize_with_offsets(tok, text)
    decoded = P.tokenize_with_offsets(NoOffsetsTokenizer(tok), text)
    assert P.word_players(decoded) == P.word_players(with_offsets)
    spans, words = P.word_players(decoded)
    assert words == text.split()
