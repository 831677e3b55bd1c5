"""Probe sets for SFT tracking: JSONL loading, builders from the bundled datasets, SFT examples.

A probe is a prompt, an optional answer and optional players. JSONL rows look like
``{"prompt": "What is the capital city of France?", "answer": " Paris", "players": [0, 2, 5]}``;
``players`` are word indices or ``[start, end]`` character spans of the prompt.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """One tracked prompt. ``players``: word indices or ``(start, end)`` character spans, None = first words."""

    prompt: str
    answer: str | None = None
    players: tuple | None = None


_PROBE_KEYS = frozenset({"prompt", "answer", "players"})


def as_probes(items: Sequence[Any], *, what: str = "probes") -> list[Probe]:
    """Normalises strings, dicts ``{"prompt", "answer"?, "players"?}`` (other keys refused) and :class:`Probe`
    objects. ``what``: how errors name the list (``probes[3]: ...``)."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"{what}: expected a list of prompts, dicts or Probe, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Probe):  # its players checked as a file's are: Probe(players=()) would be dropped here,
            # and reload with the first words
            out.append(Probe(item.prompt, item.answer, _players(item.players, i, what)))
        elif isinstance(item, str):
            if not item.strip():
                raise ValueError(f"{what}[{i}]: expected a non-empty prompt string, got {item!r}")
            out.append(Probe(prompt=item))
        elif isinstance(item, dict):
            unknown = sorted(set(item) - _PROBE_KEYS, key=str)
            if unknown:  # a typo ("anwser", "player") or explain's "target" would be dropped: another target/players
                hint = " (a probe's target text is its 'answer')" if "target" in unknown else ""
                raise ValueError(f"{what}[{i}]: expected keys 'prompt', 'answer', 'players', got also {unknown}{hint}")
            if not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
                raise ValueError(f"{what}[{i}]: expected a non-empty 'prompt' string, got {item.get('prompt')!r}")
            if item.get("answer") is not None and not isinstance(item["answer"], str):
                raise ValueError(f"{what}[{i}]: expected an 'answer' string, got {item['answer']!r}")
            out.append(Probe(prompt=item["prompt"], answer=item.get("answer"),
                             players=_players(item.get("players"), i, what)))
        else:
            raise TypeError(f"{what}[{i}]: expected a str, dict or Probe, got {type(item).__name__}")
    if not out:
        raise ValueError(f"{what}: expected at least one probe, got none")
    return out


def _players(players: Any, i: int, what: str = "probes") -> tuple | None:
    """Word indices or ``[start, end]`` character spans as a tuple; ValueError naming the probe otherwise."""
    if players is None:
        return None

    def whole(x: Any) -> bool:  # not int(x): 1.7 would silently become word 1, True word 1, "3" word 3
        return isinstance(x, int) and not isinstance(x, bool)

    # an empty list is refused too: the tracker would drop the probe (no players), while scan_probes and a saved and
    # reloaded copy (save_probes leaves it out) take the first words
    listed = isinstance(players, (list, tuple)) and len(players) > 0
    if listed and all(isinstance(p, (list, tuple)) for p in players):
        if all(len(p) == 2 and whole(p[0]) and whole(p[1]) for p in players):
            return tuple(tuple(p) for p in players)
    elif listed and all(whole(p) for p in players):
        return tuple(players)
    raise ValueError(f"{what}[{i}]: expected 'players' as a list of word indices (ints) or of [start, end] character "
                     f"spans, at least one, got {players!r}")


def load_probes(path: str | os.PathLike, *, what: str = "probes") -> list[Probe]:
    """Reads a JSONL file of probes (one JSON object per line; blank lines skipped). ``what``: how errors name its
    rows (``probes[3]``; ``rows`` for a file of held-out pairs)."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: expected a UTF-8 JSONL file, got bytes that are not UTF-8 ({err})") from None
    # rows end at "\n" only: splitlines() would also split inside a JSON string at U+2028, U+0085, ...; utf-8-sig
    # drops the byte-order mark a Windows editor may start the file with
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: expected a JSON object per line, got {line[:60]!r} ({err})") from err
    try:
        return as_probes(rows, what=what)
    except (ValueError, TypeError) as err:  # the file it is about: probes, held-out pairs or candidates
        raise type(err)(f"{path}: {err}") from err


def save_probes(probes: Sequence[Probe], path: str | os.PathLike) -> Path:
    """Writes probes as JSONL (atomically)."""
    target = Path(path)
    lines = [json.dumps({k: v for k, v in {"prompt": p.prompt, "answer": p.answer,
                                           "players": list(p.players) if p.players else None}.items() if v is not None})
             for p in probes]
    from sftint_fast._files import atomic_write

    return atomic_write(target, lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- datasets


def chatterbot_pairs(*, language: str = "english") -> list[tuple[str, str]]:
    """First-turn (question, answer) pairs of the bundled chatterbot-corpus, in a fixed file order."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise ImportError("chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus==1.3.3")
    root = Path(spec.origin).parent / "data" / language

    def turn(x: Any) -> str:  # a number ("- 8") is its text; a YAML bool ("- yes" is True) or a mapping is none
        return str(x).strip() if isinstance(x, (str, int, float)) and not isinstance(x, bool) else ""

    pairs = []
    for f in sorted(root.glob("*.yml")):
        # a conversation written as one string (trivia.yml has one) is no list of turns: read as one, its first two
        # characters made the pair ("I", "n")
        for conv in (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("conversations") or []:
            if isinstance(conv, list) and len(conv) >= 2 and turn(conv[0]) and turn(conv[1]):
                pairs.append((turn(conv[0]), turn(conv[1])))
    return pairs


def drop_questions(pairs: Sequence[tuple[str, str]], probes: Sequence[Probe]) -> list[tuple[str, str]]:
    """``pairs`` less those whose question is a probe's prompt (compared without surrounding space and case): a probe
    the run trains on measures what SFT memorises of it, not how its inference patterns change."""
    asked = {p.prompt.strip().casefold() for p in probes}
    return [p for p in pairs if p[0].strip().casefold() not in asked]


def split_pairs(pairs: Sequence[tuple[str, str]], *, heldout_fraction: float = 0.1,
                seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic (train, held-out) split of pairs by a seeded shuffle of their questions.

    ``heldout_fraction`` of the distinct questions are held out: no held-out question is asked in the training pairs
    (chatterbot-corpus repeats questions, one of them 121 times, so a split by pair held out mostly training
    questions), and each held-out pair is kept once. The training pairs keep their order and their copies."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction: expected a number in (0, 1), got {heldout_fraction!r}")
    questions = list(dict.fromkeys(q for q, _ in pairs))
    random.Random(seed).shuffle(questions)
    cut = max(1, int(round(len(questions) * heldout_fraction)))
    held = {q: k for k, q in enumerate(questions[:cut])}
    heldout = sorted(dict.fromkeys(tuple(p) for p in pairs if p[0] in held), key=lambda p: held[p[0]])
    return [p for p in pairs if p[0] not in held], heldout


def chat_probes(pairs: Sequence[tuple[str, str]], *, count: int, min_words: int) -> list[Probe]:
    """The first ``count`` pairs whose prompt has at least ``min_words`` words, as probes."""
    _check_count(count)
    out = [Probe(prompt=q, answer=a) for q, a in pairs if len(q.split()) >= min_words]
    return out[:count]


def _check_count(count: int) -> None:
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count: expected an int >= 1, got {count!r}")


PROBE_SOURCES = ("countries", "chatterbot")
"""Where :func:`confident_candidates` takes questions from, in this order: ``"countries"`` (capital-city questions
from countryinfo) and ``"chatterbot"`` (the chatterbot-corpus trivia questions with a short answer)."""

_SOURCE_INSTALL = {"countries": ("countryinfo", "pip install --no-deps countryinfo==1.0.1"),
                   "chatterbot": ("chatterbot_corpus", "pip install --no-deps chatterbot-corpus==1.3.3")}


def check_probe_sources(sources: Sequence[str]) -> None:
    """ValueError for names not in :data:`PROBE_SOURCES`; ImportError with the install command for a missing package."""
    if isinstance(sources, str) or not isinstance(sources, Sequence) or not sources:
        raise ValueError(f"sources: expected a non-empty list of {list(PROBE_SOURCES)}, got {sources!r}")
    unknown = [s for s in sources if s not in PROBE_SOURCES]
    if unknown or len(set(sources)) != len(sources):
        raise ValueError(f"sources: expected distinct names among {list(PROBE_SOURCES)}, got {list(sources)!r}")
    for source in sources:
        module, install = _SOURCE_INSTALL[source]
        if importlib.util.find_spec(module) is None:
            others = [s for s in sources if s != source]
            hint = f", or leave the source out (sources={others!r})" if others else ""
            raise ImportError(f"probe source {source!r} needs {module}, which is not installed: {install}{hint}")


def confident_candidates(sources: Sequence[str] = PROBE_SOURCES) -> list[Probe]:
    """Candidate probes from ``sources`` (see :data:`PROBE_SOURCES`), in that order.

    ``"countries"``: "Quick geography question: what is the capital city of X?" (6 content words) for every country
    with a capital; ``"chatterbot"``: the corpus's questions with an answer of at most 4 words. A source whose package
    is missing is an ImportError naming the install command, never silently left out: the probe set, and so every
    count of a run, would otherwise depend on what happens to be installed. A question asked again (the corpus has
    "Hi, How is it going?" with six answers) is a candidate once, with its first answer: candidates are scored, and
    tracked by default, on the prompt alone, so the copies would be one probe counted several times.
    """
    check_probe_sources(sources)
    out: list[Probe] = []
    for source in sources:
        if source == "countries":
            import countryinfo

            for country in countryinfo.all_countries():
                capital = country.capital()
                if isinstance(capital, list):
                    capital = capital[0] if capital else None
                name = country.name()  # as spelled: name.title() made "Bosnia And Herzegovina", "Of The Congo"
                if capital and name:
                    out.append(Probe(prompt=f"Quick geography question: what is the capital city of {name}?",
                                     answer=f" {capital}"))
        else:
            out.extend(Probe(prompt=q, answer=a) for q, a in chatterbot_pairs()
                       if q.endswith("?") and len(a.split()) <= 4)
    first = {}
    for probe in out:
        first.setdefault(probe.prompt, probe)
    return list(first.values())


@dataclass(frozen=True)
class ScoredProbe:
    """A candidate scored on the base model: its ``p_y`` (probability of the argmax next token) and that token."""

    probe: Probe
    p_y: float
    token_id: int
    token: str

    def confident(self, min_py: float, content_target: bool = False) -> bool:
        """``p_y >= min_py`` and, with ``content_target``, the greedy token is a content word: what
        :func:`scan_probes` / :func:`confident_probes` keep."""
        from sftint_fast.players import is_content_word

        return self.p_y >= min_py and (not content_target or is_content_word(self.token))


def scan_probes(model: Any, tokenizer: Any, *, count: int, min_py: float = 0.5, n_players: int = 8,
                candidates: Sequence[Probe] | None = None, chat: bool = True, max_tries: int = 200,
                sources: Sequence[str] = PROBE_SOURCES, content_target: bool = False,
                chat_template_kwargs: dict[str, Any] | None = None) -> list[ScoredProbe]:
    """Every candidate scored, in order, until ``count`` are confident (see :func:`confident_probes`).

    A candidate counts when ``p_y >= min_py`` and, with ``content_target``, its greedy token is a content word
    (not a stop word such as "The" or "I", nor punctuation): the tracked target is then the model's answer itself.
    """
    from sftint_fast.game import check_chat_template_kwargs, warn_thinking_switch

    _check_count(count)
    check_chat_template_kwargs(chat_template_kwargs, chat=chat)
    if not (isinstance(min_py, (int, float)) and not isinstance(min_py, bool) and 0 <= min_py <= 1):
        raise ValueError(f"min_py: expected a probability in [0, 1], got {min_py!r}")
    if not isinstance(max_tries, int) or isinstance(max_tries, bool) or max_tries < 1:
        raise ValueError(f"max_tries: expected an int >= 1, got {max_tries!r}")
    if not isinstance(n_players, int) or isinstance(n_players, bool) or n_players < 1:
        raise ValueError(f"n_players: expected an int >= 1, got {n_players!r}")
    # a candidate listed again (the same prompt, answer and players) is one probe: chosen twice, it would count twice
    # in every per-probe mean and bootstrap of the tracker
    pool = list(dict.fromkeys(as_probes(candidates))) if candidates is not None else confident_candidates(sources)
    from sftint_fast.baseline import _eval_mode
    from sftint_fast.players import is_content_word

    from sftint_fast.engine import _no_autocast

    if chat:
        warn_thinking_switch(tokenizer, chat_template_kwargs)
    scored, found = [], 0
    device = next(model.parameters()).device
    # each submodule's own mode back after (a frozen part stays in eval); the model's own dtype in an autocast region
    with torch.no_grad(), _eval_mode(model), _no_autocast(device):
        for probe in pool[:max_tries]:
            if (len(probe.players) != n_players if probe.players  # the tracker drops other player counts
                    else sum(is_content_word(w) for w in probe.prompt.split()) < n_players):
                continue
            ids = prompt_ids(tokenizer, probe.prompt, chat=chat, chat_template_kwargs=chat_template_kwargs)
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
            p_y, token = torch.softmax(logits, -1).max(-1)
            scored.append(ScoredProbe(probe, p_y.item(), int(token), tokenizer.decode([int(token)])))
            found += scored[-1].confident(min_py, content_target)
            if found == count:
                break
    if found < count:
        logger.warning("confident_probes: found %d of %d probes with p_y >= %g%s (%d of %d candidates scored; the "
                       "others have fewer than %d content words, or other than that many players, or lie past "
                       "max_tries=%d)", found, count, min_py, " and a content-word target" if content_target else "",
                       len(scored), len(pool), n_players, max_tries)
    return scored


def confident_probes(model: Any, tokenizer: Any, *, count: int, min_py: float = 0.5, n_players: int = 8,
                     candidates: Sequence[Probe] | None = None, chat: bool = True, max_tries: int = 200,
                     sources: Sequence[str] = PROBE_SOURCES, content_target: bool = False,
                     chat_template_kwargs: dict[str, Any] | None = None) -> list[Probe]:
    """Probes whose base-model target probability ``p_y`` (argmax next token) is at least ``min_py``.

    Scores candidates (default: :func:`confident_candidates` of ``sources``) with one forward pass each, keeping
    those with at least ``n_players`` content words (exactly ``n_players`` players, where a probe names them: the
    tracker drops a probe with other than ``n_players`` players), until ``count`` are
    found or the first ``max_tries`` candidates were looked at. ``content_target``: only probes whose greedy token
    is a content word (the answer itself, not "The ..."). ``chat`` (default True, as ``sftint demo`` tracks them):
    score each prompt in the tokenizer's chat template; pass the same ``chat`` as the tracker's (whose default is
    False), or ``p_y`` is that of another prompt than the one tracked; likewise ``chat_template_kwargs`` (the chat
    template's variables, e.g. ``{"enable_thinking": False}`` for a thinking model: see :meth:`Game.from_text`).
    """
    scored = scan_probes(model, tokenizer, count=count, min_py=min_py, n_players=n_players, candidates=candidates,
                         chat=chat, max_tries=max_tries, sources=sources, content_target=content_target,
                         chat_template_kwargs=chat_template_kwargs)
    return [s.probe for s in scored if s.confident(min_py, content_target)]


# ----------------------------------------------------------------------------------------- SFT examples


def prompt_ids(tokenizer: Any, prompt: str, *, chat: bool,
               chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of a prompt, as a chat user turn with the generation prompt when ``chat`` (rendered with the
    template variables ``chat_template_kwargs``)."""
    if chat:
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            **(chat_template_kwargs or {}))
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return list(tokenizer(prompt)["input_ids"])


#: SFT and held-out examples are cut to this many tokens, chat template included (:func:`sft_example`)
SFT_MAX_LENGTH = 96


def sft_example(tokenizer: Any, prompt: str, answer: str, *, max_length: int = SFT_MAX_LENGTH,
                chat_template_kwargs: dict[str, Any] | None = None) -> dict[str, list[int]]:
    """Chat SFT example: ``input_ids`` of ``[user, assistant]`` and ``labels`` = -100 on the prompt prefix; cut to
    ``max_length`` tokens. ``chat_template_kwargs``: the chat template's variables (as the probes'), for both the
    prompt (user turn and generation prompt) and the full chat; its prompt must render as a prefix of the full chat
    (ValueError otherwise): the answer's labels are the tokens after it."""
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"max_length: expected an int >= 1, got {max_length!r}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("tokenizer: expected a chat template (SFT and held-out examples are user/assistant chats), "
                         f"got a {type(tokenizer).__name__} without one")
    from sftint_fast.game import check_chat_template_kwargs

    template_kwargs = check_chat_template_kwargs(chat_template_kwargs, chat=True)
    head = prompt_ids(tokenizer, prompt, chat=True, chat_template_kwargs=template_kwargs)
    chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    full = tokenizer.apply_chat_template(chat, **template_kwargs)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    if full[:len(head)] != head:
        at = next((k for k, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
        given = f"chat_template_kwargs={template_kwargs!r}" if template_kwargs else "no chat_template_kwargs"
        raise ValueError(
            f"sft_example: expected the prompt's tokens (user turn and generation prompt) as a prefix of the full "
            f"chat's (user and assistant turns), both rendered with {given}, received a full chat that differs from "
            f"token {at} on (prompt: {tokenizer.decode(head[at:])!r}, full chat: {tokenizer.decode(full[at:])!r}) "
            f"for {prompt!r}: the template's generation prompt is not how it starts an assistant turn (e.g. an "
            "empty thinking block only in the generation prompt), so the answer's tokens cannot be told apart; "
            "pass other chat_template_kwargs (for a held-out loss, or ready batches {'input_ids', 'labels'})")
    labels = [-100] * len(head) + full[len(head):]
    return {"input_ids": full[:max_length], "labels": labels[:max_length]}


def pad_batch(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads ``input_ids`` with ``pad_id`` and ``labels`` with -100; adds ``attention_mask``."""
    if not examples:
        raise ValueError("examples: expected at least one example, got none")
    for i, e in enumerate(examples):
        if len(e["labels"]) != len(e["input_ids"]):
            raise ValueError(f"examples[{i}]: expected 'labels' as long as 'input_ids' ({len(e['input_ids'])}), "
                             f"got {len(e['labels'])}")
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), width), -100, dtype=torch.int64)
    mask = torch.zeros((len(examples), width), dtype=torch.int64)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def heldout_batches(heldout: Sequence[Any], tokenizer: Any, *, batch_size: int = 8,
                    chat_template_kwargs: dict[str, Any] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches for the held-out loss from ``(prompt, answer)`` pairs (chats rendered with the template variables
    ``chat_template_kwargs``: :func:`sft_example`) or ready ``{"input_ids", "labels"}`` dicts."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    pending = []
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    for i, item in enumerate(heldout):
        if isinstance(item, dict):
            yield _checked_batch(item, i)
            continue
        prompt, answer = item
        pending.append(sft_example(tokenizer, prompt, answer, chat_template_kwargs=chat_template_kwargs))
        if len(pending) == batch_size:
            yield pad_batch(pending, pad)
            pending = []
    if pending:
        yield pad_batch(pending, pad)


def _checked_batch(item: dict[str, Any], i: int) -> dict[str, torch.Tensor]:
    """A ready held-out batch as tensors; ValueError unless ``input_ids``, ``labels`` (and ``attention_mask``) are
    ``(batch, length)`` alike: labels shifted already, or cut shorter, would score each position against another
    token without an error."""
    if "input_ids" not in item or "labels" not in item:
        raise ValueError(f"heldout[{i}]: expected a batch with 'input_ids' and 'labels', got {sorted(item)}")
    batch = {k: torch.as_tensor(v) for k, v in item.items()}
    shape = tuple(batch["input_ids"].shape)
    if len(shape) != 2:
        raise ValueError(f"heldout[{i}]: expected 'input_ids' of shape (batch, length), got {shape}")
    for name in ("labels", "attention_mask"):
        if name in batch and tuple(batch[name].shape) != shape:
            raise ValueError(f"heldout[{i}]: expected {name!r} of the shape of 'input_ids' {shape}, got "
                             f"{tuple(batch[name].shape)}")
    return batch
