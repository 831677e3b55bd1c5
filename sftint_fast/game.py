"""The game: a prompt, its players, a baseline, a target and a value function.

``v(S)`` for a bitmask ``S`` (bit ``i`` set = player ``i`` present) is the model's value on the prompt
with the players outside ``S`` masked. ``"embedding"`` masking replaces a masked player's embedding
outputs by the baseline rows; ``"attention"`` masking hides its tokens as keys from every other query
(positions unchanged). The default value is the log-odds of the target,
``Σ_k [logit_{y_k} - logsumexp(logits without y_k)]`` over the ``m`` teacher-forced target tokens.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import torch

from sftint_fast import players as P
from sftint_fast.ops import layer_ops

logger = logging.getLogger(__name__)

Masking = Literal["embedding", "attention"]
ValueFn = Callable[[torch.Tensor], torch.Tensor]
MAX_PLAYERS = 62  # bitmasks are int64


@dataclass(frozen=True, eq=False, kw_only=True)
class Game:
    """One sample: ``input_ids (L,)`` = prompt ids + ``target[:-1]`` (teacher forcing), players inside the prompt.

    Fields:
        input_ids: ``(L,)`` int64, exactly what the model sees.
        player_spans: token spans ``(start, end)``, end-exclusive, sorted, disjoint, inside the prompt.
        words: the text of each player.
        target: ``(m,)`` int64 target ids; ``target[k]`` is scored at position ``prompt_length - 1 + k``.
        baseline: ``(hidden,)`` or ``(n, hidden)`` rows that replace masked players' embedding outputs.
        masking: ``"embedding"`` or ``"attention"``.
        value: ``"log_odds"`` or a callable mapping float32 logits ``(B, m, V)`` to ``(B,)`` values.
        prompt_length: number of prompt tokens.
    """

    input_ids: torch.Tensor
    player_spans: tuple[tuple[int, int], ...]
    words: tuple[str, ...]
    target: torch.Tensor
    baseline: torch.Tensor
    masking: Masking = "embedding"
    value: str | ValueFn = "log_odds"
    prompt_length: int
    _player_rows: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ids, target, baseline = self.input_ids, self.target, self.baseline
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype != torch.int64:
            raise TypeError(f"input_ids: expected a 1-D int64 tensor, received {_describe(ids)}")
        if not isinstance(target, torch.Tensor) or target.dim() != 1 or target.dtype != torch.int64 or target.numel() < 1:
            raise TypeError(f"target: expected a non-empty 1-D int64 tensor, received {_describe(target)}")
        if not isinstance(self.prompt_length, int) or isinstance(self.prompt_length, bool):
            raise TypeError(f"prompt_length: expected an int, received {_describe(self.prompt_length)}")
        if not 1 <= self.prompt_length <= ids.numel():
            raise ValueError(f"prompt_length: expected 1..{ids.numel()}, received {self.prompt_length}")
        m = target.numel()
        if ids.numel() != self.prompt_length + m - 1:
            raise ValueError(
                f"input_ids: expected prompt_length + m - 1 = {self.prompt_length + m - 1} tokens (prompt + target[:-1]),"
                f" received {ids.numel()}"
            )
        if m > 1 and not torch.equal(ids[self.prompt_length:].cpu(), target[:-1].cpu()):
            raise ValueError("input_ids: expected the tokens after the prompt to equal target[:-1] (teacher forcing)")
        spans = P.validate_spans(self.player_spans, self.prompt_length)
        object.__setattr__(self, "player_spans", spans)
        n = len(spans)
        if n > MAX_PLAYERS:
            raise ValueError(f"player_spans: expected at most {MAX_PLAYERS} players (int64 bitmasks), received {n}")
        iterable = not isinstance(self.words, str) and hasattr(self.words, "__iter__")
        words = tuple(self.words) if iterable else ()
        if not iterable or not all(isinstance(w, str) for w in words):
            raise TypeError(f"words: expected a sequence of strings (one per player), received {self.words!r}")
        if len(words) != n:
            raise ValueError(f"words: expected one text per player ({n}), received {len(words)}")
        object.__setattr__(self, "words", words)
        if not isinstance(baseline, torch.Tensor) or not baseline.is_floating_point():
            raise TypeError(f"baseline: expected a floating-point tensor, received {_describe(baseline)}")
        if baseline.dim() == 2 and baseline.shape[0] != n:
            raise ValueError(f"baseline: expected (hidden,) or ({n}, hidden), received {tuple(baseline.shape)}")
        if baseline.dim() not in (1, 2):
            raise ValueError(f"baseline: expected (hidden,) or ({n}, hidden), received {tuple(baseline.shape)}")
        if not bool(torch.isfinite(baseline.detach()).all()):
            raise ValueError("baseline: expected finite values, received NaN/inf")
        if self.masking not in ("embedding", "attention"):
            raise ValueError(f"masking: expected 'embedding' or 'attention', received {self.masking!r}")
        last_token = (self.prompt_length - 1, self.prompt_length)
        if self.masking == "attention" and m == 1 and spans and spans[-1] == last_token:
            # a masked token is hidden from the other queries only; the scored query keeps its own token
            warnings.warn(f"masking='attention': player {n - 1} ({words[-1]!r}) is only the prompt's last token, which "
                          "no query but its own (the scored one) attends to with a one-token target, so it is a null "
                          "player (every interaction with it is 0); use masking='embedding' or leave it out",
                          UserWarning, stacklevel=3)
        if not (self.value == "log_odds" or callable(self.value)):
            raise ValueError(f"value: expected 'log_odds' or a callable on logits (B, m, V), received {self.value!r}")
        rows = torch.full((ids.numel(),), -1, dtype=torch.int64)
        for i, (start, end) in enumerate(spans):
            rows[start:end] = i
        object.__setattr__(self, "_player_rows", rows)

    @property
    def num_players(self) -> int:
        return len(self.player_spans)

    @property
    def score_positions(self) -> torch.Tensor:
        """``(m,)`` int64: the positions whose logits score ``target[k]`` = ``prompt_length - 1 + k``."""
        return self.prompt_length - 1 + torch.arange(self.target.numel(), dtype=torch.int64)

    def player_mask_rows(self) -> torch.Tensor:
        """``(L,)`` int64: the player index of every token, ``-1`` for background."""
        return self._player_rows.clone()

    def masked_embeds(self, embed_tokens_output: torch.Tensor, subsets: torch.Tensor) -> torch.Tensor:
        """Embedding outputs ``(L, H)`` of ``input_ids`` and bitmasks ``(B,)`` → ``(B, L, H)``.

        Every token of player ``i`` is replaced by the baseline (row ``i`` if 2-D) where bit ``i`` of the
        subset is 0. Differentiable w.r.t. the baseline.
        """
        expected = (self.input_ids.numel(), self.baseline.shape[-1])
        if tuple(embed_tokens_output.shape) != expected:
            raise ValueError(f"embed_tokens_output: expected {expected} (tokens, the baseline's hidden size), received "
                             f"{tuple(embed_tokens_output.shape)}")
        device = embed_tokens_output.device
        rows = self._player_rows.to(device)
        subsets = subsets.to(device=device, dtype=torch.int64)
        keep = (rows < 0) | (((subsets[:, None] >> rows.clamp(min=0)[None, :]) & 1) == 1)  # (B, L)
        base = self.baseline.to(device=device, dtype=embed_tokens_output.dtype)
        if base.dim() == 2:
            base = base[rows.clamp(min=0)] if base.shape[0] else base.new_zeros(embed_tokens_output.shape)
        return torch.where(keep[:, :, None], embed_tokens_output[None], base)

    def values_from_logits(self, logits: torch.Tensor, *, subsets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, m, V)`` (any float dtype) at :attr:`score_positions` → float32 values ``(B,)``.

        Raises ``ValueError`` naming the subsets (bitmasks, when ``subsets`` is given) whose logits hold
        NaN or inf.
        """
        values, faults = self.values_and_faults(logits)
        raise_faults(faults, subsets)
        return values

    def values_and_faults(self, logits: torch.Tensor, *, target: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`values_from_logits` without its check, so without a host sync: values ``(B,)`` and uint8
        ``faults (B,)`` (:data:`FAULT_LOGITS`: NaN/inf logits, :data:`FAULT_VALUE`: a NaN/inf value from the
        callable ``value``, 0: fine) that :func:`raise_faults` turns into the same ``ValueError``. The trie engine
        checks them once per evaluation, not after every pass. ``target``: :attr:`target` already on the logits'
        device (a blocking host-to-device copy also waits for the GPU), None = copied here.
        """
        m = self.target.numel()
        if logits.dim() != 3 or logits.shape[1] != m:
            raise ValueError(f"logits: expected (B, {m}, V), received {tuple(logits.shape)}")
        logits = logits.float()
        target = self.target.to(logits.device) if target is None else target
        # the log-odds on the CPU: one C++ pass over the logits (finiteness included) instead of five ATen ops
        if not callable(self.value) and layer_ops.log_odds_available(logits):
            values, finite = layer_ops.log_odds(logits, target)
            return values, (~finite).to(torch.uint8) * FAULT_LOGITS
        bad_logits = ~torch.isfinite(logits).flatten(1).all(dim=1)
        faults = bad_logits.to(torch.uint8) * FAULT_LOGITS
        if callable(self.value):
            values = self.value(logits)
            if not isinstance(values, torch.Tensor) or values.shape != (logits.shape[0],):
                raise ValueError(
                    f"value: expected the callable to return a ({logits.shape[0]},) tensor, received {_describe(values)}"
                )
            bad_values = ~torch.isfinite(values.detach()) & ~bad_logits
            return values.float(), faults + bad_values.to(torch.uint8) * FAULT_VALUE
        y = target.view(1, m, 1).expand(logits.shape[0], m, 1)
        picked = logits.gather(-1, y).squeeze(-1)
        others = logits.scatter(-1, y, float("-inf")).logsumexp(-1)
        return (picked - others).sum(-1), faults

    @classmethod
    def from_text(
        cls,
        model: Any,
        tokenizer: Any,
        text: str,
        *,
        players: Literal["words", "all"] | Sequence[int] | Sequence[tuple[int, int]] = "words",
        span_unit: Literal["tokens", "chars"] = "tokens",
        baseline: Literal["pad", "unk"] | torch.Tensor = "pad",
        target: None | str | Sequence[int] | torch.Tensor = None,
        masking: Masking = "embedding",
        value: str | ValueFn = "log_odds",
        chat: bool = False,
        n_players: int | None = None,
        pick: Literal["first", "last"] = "first",
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> "Game":
        """Build a game from a prompt text.

        Args:
            players: ``"words"``/``"all"`` (every whitespace word of ``text``; words that share a token are one
                player), a list of word indices (of the whitespace words; one that shares a token is refused), or a
                list of ``(start, end)`` spans — token indices of the model input (``span_unit="tokens"``)
                or character offsets into ``text`` (``span_unit="chars"``).
            baseline: ``"pad"`` (falls back to unk, then zeros, with a warning), ``"unk"``, or a tensor
                ``(hidden,)`` / ``(n, hidden)`` of embedding-module outputs.
            target: None = the model's argmax next token on the full prompt; a string (tokenised without
                special tokens) or ids, teacher-forced.
            chat: wrap ``text`` as a user message with ``tokenizer.apply_chat_template`` (generation prompt
                added); players are the words of ``text`` inside the templated ids.
            chat_template_kwargs: with ``chat``, further variables of the chat template (``apply_chat_template``'s
                keyword arguments), e.g. ``{"enable_thinking": False}`` for a thinking model (Qwen3, SmolLM3), whose
                template otherwise leaves the target where the model opens ``<think>``: a template with such a switch
                that the caller leaves unset is warned about (:func:`warn_thinking_switch`).
            n_players / pick: with ``players="words"``, keep only the first/last ``n_players`` content words (a
                ``pick`` other than ``"first"`` without ``n_players`` or with explicit players is refused).
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text: expected a non-empty string, received {text!r}")
        if span_unit not in ("tokens", "chars"):
            raise ValueError(f"span_unit: expected 'tokens' or 'chars', received {span_unit!r}")
        if not isinstance(players, str):
            if not hasattr(players, "__iter__"):
                raise TypeError(f"players: expected 'words', 'all', a list of word indices or a list of (start, end) "
                                f"spans, received {players!r}")
            players = list(players)  # once: an iterator read by the span check would leave nothing for the players
        if span_unit == "chars" and (isinstance(players, str) or (players and not _is_span_list(players))):
            raise ValueError(f"span_unit: expected 'tokens' (the default) unless players are (start, end) spans, "
                             f"received 'chars' with players={players!r}")
        template_kwargs = check_chat_template_kwargs(chat_template_kwargs, chat=chat)
        if chat:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False, **template_kwargs
            )
            tokenized = P.tokenize_with_offsets(tokenizer, rendered, add_special_tokens=False)
            shown = text
            start = _user_text_start(tokenizer, rendered, text, template_kwargs)
            if start < 0 and text.strip() != text:
                # templates that render `content | trim` (Llama 3, Gemma 3) drop the whitespace around the text
                shown = text.strip()
                start = _user_text_start(tokenizer, rendered, shown, template_kwargs)
                if start >= 0 and span_unit == "chars" and _is_span_list(players):
                    raise ValueError("chat: the chat template trims the user text, so character offsets into it "
                                     "would not match; pass the text without its leading and trailing whitespace")
            if start < 0:
                raise ValueError("chat: the user text was not found verbatim in the rendered chat template")
            region = (start, start + len(shown))
            warn_thinking_switch(tokenizer, chat_template_kwargs, rendered[start + len(shown):])
            templated = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                      **template_kwargs)
            templated_ids = list(templated["input_ids"] if hasattr(templated, "keys") else templated)
            if templated_ids != list(tokenized.input_ids):
                logger.warning("chat: tokenising the rendered template differs from apply_chat_template's ids; using the former")
        else:
            tokenized = P.tokenize_with_offsets(tokenizer, text)
            region = (0, len(text))
        prompt_ids = torch.tensor(tokenized.input_ids, dtype=torch.int64)
        if prompt_ids.numel() == 0:
            raise ValueError("text: the tokenizer produced no tokens")
        vocab = model.get_input_embeddings().num_embeddings
        _check_ids(prompt_ids, vocab, "input_ids")

        if isinstance(players, str):
            spans, words = P.word_players(tokenized, region=region, players=players, n_players=n_players, pick=pick)
        elif _is_span_list(players):
            if n_players is not None:
                raise ValueError("n_players: expected None when players are explicit spans")
            if pick != "first":
                raise ValueError(f"pick: expected 'first' (the default) when players are explicit spans, "
                                 f"received {pick!r}")
            if span_unit == "chars":
                spans, words = P.char_players(tokenized, players, region=region)
            else:
                spans = list(P.validate_spans(players, prompt_ids.numel()))
                words = [tokenizer.decode(prompt_ids[a:b].tolist()) for a, b in spans]
        else:
            spans, words = P.word_players(tokenized, region=region, players=players, n_players=n_players, pick=pick)

        target_ids = _resolve_target(model, tokenizer, prompt_ids, target, vocab)
        if isinstance(target, str) and not chat:
            _warn_unspaced_target(tokenizer, text, target, target_ids)
        if isinstance(target, str):
            _warn_spaced_target(tokenizer, tokenized.text, target, target_ids)
        input_ids = torch.cat([prompt_ids, target_ids[:-1]])
        base = _resolve_baseline(model, tokenizer, baseline, len(spans))
        return cls(
            input_ids=input_ids,
            player_spans=tuple(spans),
            words=tuple(words),
            target=target_ids,
            baseline=base,
            masking=masking,
            value=value,
            prompt_length=int(prompt_ids.numel()),
        )


_CHAT_MARKER = "\ue000sftint-user-text\ue000"  # private-use characters: no template or prompt contains them


def _user_text_start(tokenizer: Any, rendered: str, text: str, template_kwargs: dict[str, Any]) -> int:
    """Where the user message ``text`` starts in the rendered chat template (-1 if not verbatim): the place the
    template puts a marker message, so a prompt that also occurs in the template's own text (``"assistant"``)
    is not taken from there; the last occurrence when the template alters the marker."""
    marked = tokenizer.apply_chat_template(
        [{"role": "user", "content": _CHAT_MARKER}], add_generation_prompt=True, tokenize=False, **template_kwargs
    )
    at = marked.find(_CHAT_MARKER)
    if at >= 0 and marked[:at] + text + marked[at + len(_CHAT_MARKER):] == rendered:
        return at
    return rendered.rfind(text)


def check_chat_template_kwargs(value: Any, *, chat: bool) -> dict[str, Any]:
    """``chat_template_kwargs`` as a dict (``{}`` for None): ValueError/TypeError for one given without ``chat`` (it
    would be ignored), one that is not a dict of JSON values with string keys (it is saved with the results), or a
    key that ``apply_chat_template`` reads itself (how it renders or tokenises) rather than as a template variable."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"chat_template_kwargs: expected a dict of chat template variables (e.g. "
                        f"{{'enable_thinking': False}}) or None, received {type(value).__name__} {value!r}")
    if not chat:
        raise ValueError(f"chat_template_kwargs: expected only with chat=True (the chat template renders them), "
                         f"received {value!r} with chat=False")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise TypeError(f"chat_template_kwargs: expected string keys, received {bad!r}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"chat_template_kwargs: expected JSON values (they are saved with the results), received "
                        f"{value!r} ({err})") from None
    clash = sorted(set(value) & _CHAT_CALL_ARGS)
    if clash:
        raise ValueError(f"chat_template_kwargs: expected chat template variables, received {clash}, which "
                         f"apply_chat_template takes as its own arguments (sftint_fast sets them)")
    return dict(value)


#: ``apply_chat_template``'s own arguments that ``chat_template_kwargs`` may not set: sftint_fast sets them, or they
#: change how the rendered chat is tokenised (``tools`` and ``documents`` are rendered, and may be given)
_CHAT_CALL_ARGS = frozenset({"conversation", "add_generation_prompt", "tokenize", "chat_template", "return_dict",
                             "continue_final_message", "return_tensors", "tokenizer_kwargs", "padding", "truncation",
                             "max_length", "return_assistant_tokens_mask"})

#: templates already warned about by :func:`warn_thinking_switch` (their source), so each is warned about once
_WARNED_THINKING: set[str] = set()


def thinking_switch(tokenizer: Any, chat_template_kwargs: dict[str, Any] | None, generation_prompt: str) -> str | None:
    """Why the position scored after ``generation_prompt`` (the rendered chat after the user's text) may be where a
    thinking model opens its thoughts, not its answer; None when the template has no thinking switch or the caller
    set it. A template that reads ``enable_thinking`` (Qwen3, SmolLM3) needs it set; one whose generation prompt
    opens ``<think>`` without closing it needs the caller to pass the variables that close it."""
    source = getattr(tokenizer, "chat_template", None)
    source = " ".join(map(str, source.values())) if isinstance(source, dict) else str(source or "")
    given = chat_template_kwargs or {}
    if "enable_thinking" in source and "enable_thinking" not in given:
        return ("the chat template has a thinking switch (enable_thinking) that was left unset, so the target is "
                "scored where the model may open <think> rather than answer; pass chat_template_kwargs="
                "{'enable_thinking': False} (CLI: --chat-template-kwargs '{\"enable_thinking\": false}') to score "
                "the answer, or {'enable_thinking': True} to score the thinking on purpose")
    if not given and generation_prompt.rfind("<think>") > generation_prompt.rfind("</think>"):
        return ("the chat template's generation prompt opens <think> without closing it, so the target is scored "
                "inside the model's thinking, not its answer; pass chat_template_kwargs with the template "
                "variables that close or skip the thinking block (to keep it, pass them explicitly)")
    return None


def warn_thinking_switch(tokenizer: Any, chat_template_kwargs: dict[str, Any] | None,
                         generation_prompt: str | None = None) -> None:
    """A ``UserWarning`` of :func:`thinking_switch`'s reason, once per chat template and reason. ``generation_prompt``:
    what the template renders after a user message (None: rendered here, after a marker message)."""
    if generation_prompt is None:
        marked = tokenizer.apply_chat_template([{"role": "user", "content": _CHAT_MARKER}], add_generation_prompt=True,
                                               tokenize=False, **(chat_template_kwargs or {}))
        generation_prompt = marked[marked.rfind(_CHAT_MARKER) + len(_CHAT_MARKER):]
    reason = thinking_switch(tokenizer, chat_template_kwargs, generation_prompt)
    if reason is None:
        return
    key = f"{reason}\0{getattr(tokenizer, 'chat_template', None)}"
    if key not in _WARNED_THINKING:
        _WARNED_THINKING.add(key)
        warnings.warn(f"chat: {reason}", UserWarning, stacklevel=3)


#: :meth:`Game.values_and_faults` codes: NaN/inf logits; a NaN/inf value from the game's callable ``value``.
FAULT_LOGITS, FAULT_VALUE = 1, 2


def raise_faults(faults: torch.Tensor, subsets: torch.Tensor | None = None) -> None:
    """The ``ValueError`` of :meth:`Game.values_from_logits` for the rows ``faults (B,)`` flags (one host sync), the
    non-finite logits first; nothing when every row is fine. ``subsets (B,)``: the rows' bitmasks, for the message."""
    if not bool(faults.any()):
        return
    bad = faults == FAULT_LOGITS
    if bool(bad.any()):
        raise ValueError(f"non-finite (NaN/inf) logits for {_name_rows(bad, subsets)}")
    raise ValueError(f"value: expected finite values from the callable, received NaN/inf for "
                     f"{_name_rows(faults == FAULT_VALUE, subsets)}")


def _name_rows(bad: torch.Tensor, subsets: torch.Tensor | None) -> str:
    """The subsets (bitmasks, when given) or batch rows flagged in ``bad (B,)``, at most 10."""
    rows = bad.nonzero().flatten().tolist()
    names = subsets.cpu()[rows].tolist() if subsets is not None else rows
    what = "subsets (bitmasks)" if subsets is not None else "batch rows"
    return f"{what} {names[:10]}{' ...' if len(names) > 10 else ''}"


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


def _is_span_list(players: Any) -> bool:
    items = list(players)
    return bool(items) and all(isinstance(p, (tuple, list)) for p in items)


def _check_ids(ids: torch.Tensor, vocab: int, name: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{name}: expected token ids in [0, {vocab}) (the model's vocabulary), received {ids.tolist()}")


def _model_device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """``model.eval()`` for the block; every submodule gets its own ``training`` flag back after (``model.train(m)``
    would put a frozen, eval-mode submodule in train mode). Also the model's own forward for the block where accelerate
    wrapped it in mixed-precision autocast (:func:`_own_forward`)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with _own_forward(model):
            yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextlib.contextmanager
def _own_forward(model: Any) -> Iterator[None]:
    """The forward accelerate kept (``_original_forward``) for the block, on every submodule whose ``forward``
    ``Accelerator.prepare`` wrapped in mixed-precision autocast (a ``Trainer`` with ``bf16``/``fp16``): the wrapper
    would run every ``model(...)`` of an evaluation in bf16/fp16 whatever ``compute_dtype`` says, while the trie's
    adapters call the modules without it. The wrapper is put back after, so training goes on under it."""
    swapped = []
    for module in model.modules():
        wrapper, original = module.__dict__.get("forward"), module.__dict__.get("_original_forward")
        if wrapper is not None and original is not None and _wraps(wrapper, original):
            swapped.append((module, wrapper))
            module.forward = original
    try:
        yield
    finally:
        for module, wrapper in swapped:
            module.forward = wrapper


def _wraps(wrapper: Any, original: Any) -> bool:
    """Whether ``wrapper`` reaches ``original`` (or the function of that bound method) through ``__wrapped__``."""
    targets = (original, getattr(original, "__func__", original))
    inner = getattr(wrapper, "__func__", wrapper)
    for _ in range(8):
        inner = getattr(inner, "__wrapped__", None)
        if inner is None:
            return False
        if any(inner is target for target in targets):
            return True
    return False


def _warn_unspaced_target(tokenizer: Any, text: str, target: str, ids: torch.Tensor) -> None:
    """A target text is tokenised on its own: ``"Paris"`` after ``"... France is"`` scores the token 'Paris' where
    the model would write ' Paris' (SmolLM2: p = 5e-4 vs 0.77), a value of another question. Said where the target
    after a space in the text gets other tokens and neither the text nor the target has one (a SentencePiece
    tokenizer that prefixes its own '▁' gives 'Paris' the tokens of ' Paris' in the text: not said)."""
    if not target[:1].isalnum() or text[-1:].isspace():  # a space before it, or punctuation (which takes none)
        return
    alone = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    joined = list(tokenizer(text + " " + target, add_special_tokens=False)["input_ids"])
    spaced = (joined[len(alone):] if joined[:len(alone)] == alone
              else list(tokenizer(" " + target, add_special_tokens=False)["input_ids"]))
    if spaced != ids.tolist():
        warnings.warn(f"target {target!r} is tokenised on its own, as {ids.tolist()}: after a prompt that ends in a "
                      f"word the model's next token usually carries the space ({' ' + target!r} is {list(spaced)}); "
                      f"pass the target with its leading space if that is what the prompt leads to", UserWarning,
                      stacklevel=3)


def _warn_spaced_target(tokenizer: Any, context: str, target: str, ids: torch.Tensor) -> None:
    """The other way round: a target text with its leading space, where the tokenizer gives that space a token of its
    own that ``context`` (the prompt's text, or the rendered chat) followed by the target does not have: on a Llama-2
    SentencePiece tokenizer ``" Paris"`` alone is ['▁', '▁Paris'] while "... is Paris" ends in '▁Paris', so the value
    would add the log-odds of a lone '▁'. Not said where the space is the prompt's own continuation (byte-level BPE)."""
    if not target[:1].isspace() or not target.strip() or context[-1:].isspace():
        return
    alone = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    joined = list(tokenizer(context + target, add_special_tokens=False)["input_ids"])
    continued = joined[len(alone):]
    if joined[:len(alone)] != alone or continued == ids.tolist():
        return
    stripped = list(tokenizer(target.lstrip(), add_special_tokens=False)["input_ids"])
    warnings.warn(f"target {target!r} is tokenised on its own, as {ids.tolist()}: the prompt followed by it continues "
                  f"with {continued} ({target.lstrip()!r} is {stripped}): this tokenizer marks the space itself; pass "
                  "those ids (or the text without its leading space) if that is what the prompt leads to", UserWarning,
                  stacklevel=3)


def _resolve_target(model: Any, tokenizer: Any, prompt_ids: torch.Tensor, target: Any, vocab: int) -> torch.Tensor:
    if target is None:
        from sftint_fast.engine import _position_limit  # the engine imports this module

        limit = _position_limit(model)
        if limit is not None and prompt_ids.numel() > limit[0]:  # else an IndexError deep in the position embedding
            raise ValueError(f"text: expected at most {limit[0]} tokens (the model's learned position table "
                             f"{limit[1]}), received {prompt_ids.numel()}; shorten the prompt")
        from sftint_fast.engine import _no_autocast

        device = _model_device(model)
        # no dropout in the greedy answer, and the model's own dtype inside a caller's autocast region
        with torch.no_grad(), _eval_mode(model), _no_autocast(device):
            logits = model(input_ids=prompt_ids[None].to(device)).logits[0, -1]
        return logits.argmax().view(1).to(torch.int64).cpu()
    if isinstance(target, str):
        ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        out = torch.tensor(list(ids), dtype=torch.int64)
        if out.numel() == 0:
            raise ValueError(f"target: expected a string with at least one token, received {target!r}")
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool or target.dim() > 1:
            raise TypeError(f"target: expected integer token ids (m,), received {_describe(target)}")
        out = target.reshape(-1).to(torch.int64).cpu()
    else:
        if not hasattr(target, "__iter__"):
            raise TypeError(f"target: expected None, a string or a list of int token ids, received {target!r}")
        items = list(target)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise TypeError(f"target: expected a string or a list of int token ids, received {target!r}")
        out = torch.tensor(items, dtype=torch.int64)
    if out.numel() == 0:
        raise ValueError("target: expected at least one token id, received none")
    _check_ids(out, vocab, "target")
    return out


def _resolve_baseline(model: Any, tokenizer: Any, baseline: Any, num_players: int) -> torch.Tensor:
    embed = model.get_input_embeddings()
    hidden = embed.weight.shape[1]
    if isinstance(baseline, torch.Tensor):
        if not baseline.is_floating_point():
            raise TypeError(f"baseline: expected a floating-point tensor, received {_describe(baseline)}")
        if baseline.shape not in ((hidden,), (num_players, hidden)):
            raise ValueError(f"baseline: expected shape ({hidden},) or ({num_players}, {hidden}), received {tuple(baseline.shape)}")
        return baseline
    if baseline not in ("pad", "unk"):
        raise ValueError(f"baseline: expected 'pad', 'unk' or a tensor, received {baseline!r}")
    candidates = ["pad", "unk"] if baseline == "pad" else ["unk"]
    for kind in candidates:
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            if not 0 <= token_id < embed.weight.shape[0]:
                raise ValueError(f"baseline={baseline!r}: expected the tokenizer's {kind} token id in [0, "
                                 f"{embed.weight.shape[0]}) (the model's vocabulary), received {token_id}; pass "
                                 "baseline as a tensor or resize the model's embeddings")
            if kind != baseline:
                warnings.warn(f"baseline: the tokenizer has no pad token; using the unk token ({token_id})", stacklevel=3)
            # The module's output, not weight[id]: some embeddings scale (Gemma multiplies by sqrt(hidden)).
            with torch.no_grad():
                return embed(torch.tensor([token_id], device=embed.weight.device))[0].detach()
    warnings.warn(f"baseline: the tokenizer has no {' or '.join(candidates)} token; using a zero vector", stacklevel=3)
    return torch.zeros(hidden, dtype=embed.weight.dtype, device=embed.weight.device)
