"""Players of a game: token spans of the prompt, usually one per whitespace-separated word.

A player is a half-open token span ``(start, end)`` of the prompt's ids; player ``i`` is bit ``i`` of
a subset bitmask, so spans are kept sorted by position. Words are mapped to tokens with the
tokenizer's character offsets (``return_offsets_mapping``); tokenizers without offsets fall back to
incremental decoding. A token that straddles two words merges them into one player.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

logger = logging.getLogger(__name__)

Span = tuple[int, int]

# Function words skipped when choosing the first/last ``n`` content words as players.
STOPWORDS = frozenset(
    """a an the and or but if of to in on at by for with from as is are was were be been being am do does did
    this that these those it its i you he she we they me him her us them my your his our their what which who
    whom whose not no so than then there here can could will would shall should may might must have has had
    into onto about over under up down out off very just also too""".split()
)


@dataclass(frozen=True)
class Tokenized:
    """Ids of a text with, for each token, its character span ``(start, end)`` in ``text`` (``(0, 0)`` for
    special tokens that cover no characters)."""

    text: str
    input_ids: tuple[int, ...]
    offsets: tuple[Span, ...]


def word_char_spans(text: str) -> list[Span]:
    """Character spans of the whitespace-separated words of ``text``, in order."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def tokenize_with_offsets(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> Tokenized:
    """Tokenise ``text`` and give every token its character span.

    Uses ``return_offsets_mapping`` when the tokenizer supports it (fast tokenizers); otherwise decodes
    the ids incrementally, which requires the decoded ids to reproduce ``text`` (up to case). There, the byte
    tokens of one character share its span, and an unknown token covers the text between its neighbours.
    """
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        enc = None
    if enc is not None and "offset_mapping" in enc:
        ids = tuple(int(i) for i in enc["input_ids"])
        offsets = tuple((int(a), int(b)) for a, b in enc["offset_mapping"])
        return Tokenized(text, ids, offsets)
    ids = tuple(int(i) for i in tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return Tokenized(text, ids, _offsets_by_decoding(tokenizer, text, ids))


def _offsets_by_decoding(tokenizer: Any, text: str, ids: Sequence[int]) -> tuple[Span, ...]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    # an unknown-token id decodes to its placeholder ("<unk>"), not to the text it replaced: it covers the text
    # between its neighbours (as the offsets of a fast tokenizer say), not nothing like the other special tokens
    unk = getattr(tokenizer, "unk_token_id", None)
    skipped = special | {unk}
    # decoding may normalise case (e.g. lower-casing tokenizers); casefolding can lengthen a character ("ß" → "ss"),
    # so positions found in the folded text are mapped back to the text's own through ``origin``
    folded = "".join(c.casefold() for c in text)
    origin = [i for i, c in enumerate(text) for _ in c.casefold()] + [len(text)]
    offsets: list[Span] = [(0, 0)] * len(ids)
    pending: list[int] = []  # tokens that end inside a character: byte-level pieces of one UTF-8 character
    unknown: list[int] = []  # unknown tokens since the last located one
    previous = ""
    cursor = 0
    for k in range(len(ids)):
        if unk is not None and ids[k] == unk:
            unknown.append(k)
            continue
        if ids[k] in special:
            offsets[k] = (origin[cursor], origin[cursor])
            continue
        decoded = tokenizer.decode([i for i in ids[: k + 1] if i not in skipped])
        if not decoded.startswith(previous):
            raise ValueError(
                "players: the tokenizer has no offsets and its incremental decoding is not prefix-stable; "
                "pass explicit token spans as players"
            )
        pending.append(k)
        if decoded.endswith("\ufffd") and k + 1 < len(ids):
            continue  # an incomplete character: its bytes take the span of the character they complete
        piece = decoded[len(previous):].strip().casefold()
        if not piece and unknown:
            # whitespace after an unknown token (a SentencePiece '▁' before the next unknown word) locates nothing:
            # the unknown tokens' text goes on past it, so it must not close their stretch of text here
            for j in pending:
                offsets[j] = (origin[cursor], origin[cursor])
            pending = []
            previous = decoded
            continue
        start = folded.find(piece, cursor) if piece else cursor
        if start < 0:
            raise ValueError(
                f"players: could not locate token {k} ({piece!r}) in the text; pass explicit token spans as players"
            )
        end = start + len(piece)
        _place_unknown(offsets, unknown, text, origin[cursor], origin[start])
        for j in pending:
            offsets[j] = (origin[start], origin[end - 1] + 1 if end > start else origin[start])
        pending, unknown = [], []
        cursor = end
        previous = decoded
    _place_unknown(offsets, unknown, text, origin[cursor], len(text))
    return tuple(offsets)


def _place_unknown(offsets: list[Span], unknown: list[int], text: str, lo: int, hi: int) -> None:
    """Give the unknown tokens ``unknown`` the text ``[lo, hi)`` between their located neighbours: a word each when
    it holds one word per token, else all of it."""
    words = [(lo + a, lo + b) for a, b in word_char_spans(text[lo:hi])]
    for n, k in enumerate(unknown):
        offsets[k] = words[n] if len(words) == len(unknown) else (lo, hi)


def _trimmed_offsets(tokenized: Tokenized) -> list[Span]:
    """Each token's character span without its leading and trailing whitespace."""
    text = tokenized.text
    trimmed: list[Span] = []
    for a, b in tokenized.offsets:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        trimmed.append((a, b))
    return trimmed


def char_spans_to_token_spans(tokenized: Tokenized, char_spans: Sequence[Span]) -> tuple[list[Span], list[Span]]:
    """Map sorted, disjoint character spans to token spans.

    A token belongs to every character span that its non-whitespace characters overlap; neighbouring
    spans that share a token are merged. Returns ``(token_spans, merged_char_spans)`` of equal length.
    """
    text = tokenized.text
    trimmed = _trimmed_offsets(tokenized)
    groups: list[list[int]] = []  # [char_start, char_end, tok_start, tok_end]
    for cs, ce in char_spans:
        hits = [t for t, (a, b) in enumerate(trimmed) if a < b and a < ce and b > cs]
        if not hits:
            raise ValueError(f"players: the character span ({cs}, {ce}) {text[cs:ce]!r} covers no token")
        if groups and hits[0] < groups[-1][3]:
            groups[-1][1] = ce
            groups[-1][3] = max(groups[-1][3], hits[-1] + 1)
        else:
            groups.append([cs, ce, hits[0], hits[-1] + 1])
    if len(groups) < len(char_spans):
        logger.info("players: %d words share tokens with a neighbour and were merged", len(char_spans) - len(groups))
    return [(g[2], g[3]) for g in groups], [(g[0], g[1]) for g in groups]


def validate_spans(spans: Sequence[Sequence[int]], prompt_length: int) -> tuple[Span, ...]:
    """Check player token spans: integer pairs, non-empty, sorted, disjoint, inside ``[0, prompt_length)``.

    Raises ``ValueError``/``TypeError`` saying what was expected and what was received.
    """
    if isinstance(spans, (str, bytes)) or not hasattr(spans, "__iter__"):
        raise TypeError(f"player_spans: expected a list of (start, end) pairs of ints, received {spans!r}")
    out: list[Span] = []
    for i, span in enumerate(spans):
        if not _is_int_pair(span):
            raise TypeError(f"player {i}: expected a (start, end) pair of ints, received {span!r}")
        start, end = int(span[0]), int(span[1])
        if end <= start:
            raise ValueError(f"player {i}: expected a non-empty span start < end, received ({start}, {end})")
        if start < 0 or end > prompt_length:
            raise ValueError(
                f"player {i}: expected a span inside the prompt [0, {prompt_length}) (target tokens are never "
                f"players), received ({start}, {end})"
            )
        if out and start < out[-1][1]:
            raise ValueError(
                f"player {i}: expected spans sorted by position and disjoint, received ({start}, {end}) after "
                f"{out[-1]}"
            )
        out.append((start, end))
    return tuple(out)


def _is_int_pair(span: Any) -> bool:
    return (isinstance(span, (tuple, list)) and len(span) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in span))


def is_content_word(word: str) -> bool:
    """A word with a letter or digit that is not a stop word (punctuation around it ignored)."""
    core = re.sub(r"^\W+|\W+$", "", word).lower()
    return bool(core) and any(c.isalnum() for c in core) and core not in STOPWORDS


def select_words(
    words: Sequence[str],
    players: Literal["words", "all"] | Sequence[int],
    *,
    n_players: int | None = None,
    pick: Literal["first", "last"] = "first",
) -> list[int]:
    """Indices of the words that become players, in prompt order.

    ``players="words"``/``"all"``: every word, or with ``n_players`` the first (``pick="first"``) or last
    ``n_players`` content words. A list of ints: those word indices (``n_players`` must then be None and ``pick``
    ``"first"``, the default: neither would choose anything).
    """
    num = len(words)
    if isinstance(players, str):
        if players not in ("words", "all"):
            raise ValueError(f"players: expected 'words', 'all' or a list, received {players!r}")
        if pick not in ("first", "last"):
            raise ValueError(f"pick: expected 'first' or 'last', received {pick!r}")
        if n_players is None:
            if pick != "first":  # pick chooses among the content words n_players keeps
                raise ValueError(f"pick: expected 'first' (the default) without n_players, received {pick!r}")
            return list(range(num))
        if not isinstance(n_players, int) or isinstance(n_players, bool) or n_players < 0:
            raise ValueError(f"n_players: expected a non-negative int, received {n_players!r}")
        content = [i for i, w in enumerate(words) if is_content_word(w)]
        if n_players > len(content):
            raise ValueError(
                f"n_players: expected at most {len(content)} (the number of content words), received {n_players}"
            )
        chosen = content[:n_players] if pick == "first" else content[len(content) - n_players:]
        return sorted(chosen)
    if not hasattr(players, "__iter__"):
        raise TypeError(f"players: expected 'words', 'all' or a list of word indices, received {players!r}")
    if n_players is not None:
        raise ValueError("n_players: expected None when players is an explicit list")
    if pick != "first":
        raise ValueError(f"pick: expected 'first' (the default) when players is an explicit list, received {pick!r}")
    indices = list(players)
    for i in indices:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"players: expected word indices (ints), received {i!r}")
        if not 0 <= i < num:
            raise ValueError(f"players: expected word indices in [0, {num}), received {i}")
    if sorted(set(indices)) != indices:
        raise ValueError(f"players: expected strictly increasing word indices, received {indices}")
    return indices


def word_players(
    tokenized: Tokenized,
    *,
    region: Span | None = None,
    players: Literal["words", "all"] | Sequence[int] = "words",
    n_players: int | None = None,
    pick: Literal["first", "last"] = "first",
) -> tuple[list[Span], list[str]]:
    """Token spans and texts of the chosen words of ``tokenized.text[region]`` (default: the whole text).

    ``"words"``/``"all"`` take words that share a token as one player; word indices name the whitespace words of
    the text, and one that shares a token with a neighbour is refused (it has no tokens of its own).
    """
    lo, hi = region if region is not None else (0, len(tokenized.text))
    text = tokenized.text
    char_spans = [(lo + a, lo + b) for a, b in word_char_spans(text[lo:hi])]
    token_spans, merged = char_spans_to_token_spans(tokenized, char_spans)
    texts = [text[a:b] for a, b in merged]
    if isinstance(players, str):
        chosen = select_words(texts, players, n_players=n_players, pick=pick)
        return [token_spans[i] for i in chosen], [texts[i] for i in chosen]
    chosen = select_words([text[a:b] for a, b in char_spans], players, n_players=n_players, pick=pick)
    groups = [next(g for g, (a, b) in enumerate(merged) if a <= char_spans[i][0] < b) for i in chosen]
    for i, g in zip(chosen, groups):
        if merged[g] != char_spans[i]:
            a, b = char_spans[i]
            raise ValueError(f"players: word {i} {text[a:b]!r} shares a token with a neighbouring word (together "
                             f"{texts[g]!r}), so it cannot be a player on its own; pass players='words' (which takes "
                             "them as one player) or character/token spans")
    return [token_spans[g] for g in groups], [texts[g] for g in groups]


def char_players(
    tokenized: Tokenized, char_spans: Sequence[Sequence[int]], *, region: Span | None = None
) -> tuple[list[Span], list[str]]:
    """Token spans of explicit character spans of ``tokenized.text[region]`` (default: the whole text), given as
    offsets from the region's start (sorted, disjoint; a token partly covered belongs to the span)."""
    lo, hi = region if region is not None else (0, len(tokenized.text))
    text = tokenized.text
    spans: list[Span] = []
    for i, span in enumerate(char_spans):
        if not _is_int_pair(span):
            raise TypeError(f"player {i}: expected a (start, end) character pair of ints, received {span!r}")
        a, b = int(span[0]), int(span[1])
        if not 0 <= a < b <= hi - lo:
            raise ValueError(
                f"player {i}: expected a non-empty character span inside [0, {hi - lo}], received {span!r}"
            )
        if spans and a < spans[-1][1]:
            raise ValueError(f"player {i}: expected sorted, disjoint character spans, received {span!r} after {spans[-1]}")
        spans.append((a, b))
    trimmed = _trimmed_offsets(tokenized)
    for i, (a, b) in enumerate(spans):
        # a span that covers part of a token takes the whole token (a reference model's tokenizer may join a word
        # with its punctuation); one that covers none is an error, named by the prompt's own offsets
        if not any(ta < tb and ta < lo + b and tb > lo + a for ta, tb in trimmed):
            raise ValueError(f"player {i}: the character span ({a}, {b}) {text[lo + a:lo + b]!r} covers no token")
    token_spans, merged = char_spans_to_token_spans(tokenized, [(lo + a, lo + b) for a, b in spans])
    if len(token_spans) != len(spans):
        raise ValueError("players: two character spans share a token; expected spans on distinct tokens")
    return token_spans, [text[a:b] for a, b in merged]
