"""The reference engine: every variant is its own sequence, run through the model's own forward.

Exact and slow (``2^n · L`` tokens); the trie engine is tested against it. The LM head runs only on
the ``m`` scored positions (the last ``m`` of ``input_ids``, ``logits_to_keep``-style).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from sftint_fast._memory import free_memory
from sftint_fast.game import Game

MAX_BATCH = 512


def model_device(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


_SUBSET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def check_subsets(subsets: Any, n: int) -> torch.Tensor:
    """``subsets`` as int64 bitmasks of ``n`` players (same device): TypeError for anything but a 1-D integer
    tensor with data, ValueError naming the bitmasks outside ``[0, 2^n)``."""
    if not isinstance(subsets, torch.Tensor):
        raise TypeError(f"subsets: expected a 1-D int64 tensor of bitmasks, received {type(subsets).__name__}")
    if subsets.dim() != 1 or subsets.dtype not in _SUBSET_DTYPES or subsets.device.type == "meta":
        raise TypeError(f"subsets: expected a 1-D integer tensor of bitmasks, received shape {tuple(subsets.shape)} "
                        f"dtype {subsets.dtype} on {subsets.device}")
    subsets = subsets.to(torch.int64)
    if subsets.numel() and (int(subsets.min()) < 0 or int(subsets.max()) >= (1 << n)):
        bad = subsets[(subsets < 0) | (subsets >= (1 << n))][:10].tolist()
        raise ValueError(f"subsets: expected bitmasks in [0, 2^{n}) for {n} players, received {bad}")
    return subsets


def check_batch_size(batch_size: Any) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size: expected a positive int or None, received {batch_size!r}")


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA free memory, or the host's available RAM
    (:func:`~sftint_fast._memory.free_memory`)."""
    return free_memory(device)


def sequence_bytes(model: Any, game: Game) -> int:
    """Rough peak activation bytes of one variant's forward (no grad): hidden states, QKV, MLP, scores, logits."""
    cfg = model.config
    hidden = model.get_input_embeddings().weight.shape[1]
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    vocab = model.get_input_embeddings().num_embeddings
    length = game.input_ids.numel()
    elem = model.get_input_embeddings().weight.element_size()
    activations = length * (8 * hidden + 3 * inter + 3 * heads * length) * elem
    logits = 3 * game.target.numel() * vocab * 4
    return activations + logits


def naive_batch_size(model: Any, game: Game, *, max_memory: int | None = None) -> int:
    """Variants per forward that fit ``max_memory`` bytes (default: half of CUDA free memory, or 1/4 of host
    available memory capped at 2 GiB)."""
    device = model_device(model)
    if max_memory is None:
        free = available_memory(device)
        max_memory = free // 2 if device.type == "cuda" else min(free // 4, 2 << 30)
    return int(max(1, min(MAX_BATCH, max_memory // max(1, sequence_bytes(model, game)))))


def attention_keep_mask(
    game: Game, subsets: torch.Tensor, dtype: torch.dtype, *, sliding_window: int | None = None
) -> torch.Tensor:
    """``(B, 1, L, L)`` additive mask for ``"attention"`` masking: causal (and within ``sliding_window``:
    key visible iff ``query_pos - key_pos < sliding_window``), masked players hidden as keys except on the
    diagonal; 0 where allowed and ``finfo(dtype).min`` elsewhere."""
    device = subsets.device
    rows = game.player_mask_rows().to(device)
    length = rows.numel()
    present = (rows < 0) | (((subsets[:, None] >> rows.clamp(min=0)[None, :]) & 1) == 1)  # (B, L) keys kept
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if sliding_window is not None:
        causal = causal.triu(-(sliding_window - 1))
    diagonal = torch.eye(length, dtype=torch.bool, device=device)
    allowed = causal[None] & (present[:, None, :] | diagonal[None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _decoder_source(model: Any) -> str | None:
    """The source of the ``forward`` of the model's text decoder (a multimodal model's language model), the module
    that builds the masks of its layers, or None when it cannot be read."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if not isinstance(decoder, torch.nn.Module):
        decoder = getattr(model, "base_model", model)
    return _forward_source(type(decoder).forward)


@functools.lru_cache(maxsize=64)
def _forward_source(forward: Any) -> str | None:
    """``inspect.getsource`` (~1.4 ms for LlamaModel.forward), once per function: the masks are built per batch."""
    try:
        return inspect.getsource(forward)
    except (OSError, TypeError):
        return None


def _text_config(model: Any) -> Any:
    """The config of the model's text decoder: a multimodal model keeps its layer types and window there."""
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _reads_layer_types(model: Any) -> bool:
    """Whether the model's decoder takes a mask per layer type (its forward builds a ``causal_mask_mapping``,
    transformers' form for models with mixed full/sliding layers). True when its source cannot be read."""
    source = _decoder_source(model)
    return source is None or "causal_mask_mapping" in source


def _reads_sliding_window(model: Any) -> bool:
    """Whether the model's decoder windows its attention at all (its forward builds a sliding-window mask): a config
    may carry a ``sliding_window`` that its model never reads (Llama, GPT-2). True when its source cannot be read."""
    source = _decoder_source(model)
    return source is None or "sliding_window" in source


def _attention_masks(model: Any, game: Game, subsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | dict:
    """The 4D mask(s) for ``"attention"`` masking. A user mask replaces the model's own, sliding window
    included, so windowed layers get a windowed mask: one mask when every layer is alike, else a dict by
    layer type (the form transformers' models with mixed layers accept). A multimodal model's layer types and window
    are those of its text config."""
    cfg = _text_config(model)
    window = getattr(cfg, "sliding_window", None) if _reads_sliding_window(model) else None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is None or not _reads_layer_types(model):
        # e.g. Mistral: one mask for every layer, windowed when the config sets a window (its forward ignores
        # a ``layer_types`` the config may carry, and fails on a dict of masks)
        return attention_keep_mask(game, subsets, dtype, sliding_window=window)
    kinds = set(layer_types)
    if window is None or "sliding_attention" not in kinds:
        return attention_keep_mask(game, subsets, dtype)
    windowed = attention_keep_mask(game, subsets, dtype, sliding_window=window)
    if kinds == {"sliding_attention"}:
        return windowed
    return {"full_attention": attention_keep_mask(game, subsets, dtype), "sliding_attention": windowed}


#: Layer types (transformers' ``config.layer_types``) that an attention mask fully controls, or that mix no tokens.
MASKABLE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "mlp", "moe"})


def check_attention_masking(model: Any) -> None:
    """Refuse ``"attention"`` masking on a model with layers that mix tokens without reading the attention mask
    (recurrent / linear attention, convolutions, hybrids) or read it in a form the 4D masks here do not give
    (chunked attention): their masked players would stay visible, silently."""
    others = sorted(set(getattr(_text_config(model), "layer_types", None) or ()) - MASKABLE_LAYER_TYPES)
    if others:
        raise ValueError(f"masking='attention': expected a model whose every token-mixing layer is full or sliding "
                         f"attention, received {type(model).__name__} with layer types {others}, which an attention "
                         f"mask cannot hide the masked players from; use masking='embedding'")


def _accepts_logits_to_keep(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def evaluate_naive(
    model: Any,
    game: Game,
    subsets: torch.Tensor,
    *,
    batch_size: int | None = None,
    progress: bool = True,
    max_memory: int | None = None,
) -> torch.Tensor:
    """``v`` for each bitmask of ``subsets`` ``(B,)`` int64 → float32 ``(B,)`` on the model's device.

    Every variant is a full sequence given as ``inputs_embeds`` (embedding masking: baseline rows
    substituted; attention masking: a 4D mask and explicit ``position_ids``). ``subsets`` (any integer dtype) and
    ``batch_size`` are checked here (TypeError/ValueError); callers (``evaluate``) handle ``no_grad`` and eval mode.
    """
    return evaluate_naive_games(model, [game], subsets, batch_size=batch_size, progress=progress,
                                max_memory=max_memory)[0]


def naive_layout(game: Game) -> tuple:
    """What games batched together by the naive engine must share: length, scored positions, masking mode, number
    of players (they share the bitmasks), and (attention masking, whose mask comes from the spans) the player
    spans."""
    spans = game.player_spans if game.masking == "attention" else None
    return game.input_ids.numel(), game.target.numel(), game.masking, game.num_players, spans


def evaluate_naive_games(
    model: Any,
    games: Sequence[Game],
    subsets: torch.Tensor,
    *,
    batch_size: int | None = None,
    progress: bool = True,
    max_memory: int | None = None,
) -> list[torch.Tensor]:
    """:func:`evaluate_naive` on several games of one :func:`naive_layout`, their variants batched together
    (``batch_size`` variants per forward over all games) → one float32 ``(B,)`` tensor per game."""
    games = list(games)
    if not games:
        return []
    layout = naive_layout(games[0])
    for i, game in enumerate(games):
        if naive_layout(game) != layout:
            raise ValueError(f"games[{i}]: expected the layout of games[0] (length, targets, masking, players"
                             f"[, spans]) {layout}, received {naive_layout(game)}")
    first = games[0]
    check_batch_size(batch_size)
    subsets = check_subsets(subsets, first.num_players)
    if first.masking == "attention":
        check_attention_masking(model)
    device = model_device(model)
    subsets = subsets.to(device)
    embedding = model.get_input_embeddings()
    embeds = [embedding(game.input_ids.to(device)[None])[0] for game in games]  # (L, H) each
    length, m = first.input_ids.numel(), first.target.numel()
    if batch_size is None:
        batch_size = naive_batch_size(model, first, max_memory=max_memory)
    keep_kw = {"logits_to_keep": m} if _accepts_logits_to_keep(model) else {}
    per_game = subsets.numel()
    total = per_game * len(games)
    out = torch.empty(len(games), per_game, dtype=torch.float32, device=device)
    bar = tqdm(total=total, desc="naive", unit="variant", disable=not progress)
    for lo in range(0, total, batch_size):
        hi = min(total, lo + batch_size)
        # (game, first, last) pieces of the flat (game, subset) order that this batch covers
        pieces = [(g, max(lo, g * per_game) - g * per_game, min(hi, (g + 1) * per_game) - g * per_game)
                  for g in range(lo // per_game, (hi - 1) // per_game + 1)]
        chunks = [subsets[a:b] for _, a, b in pieces]
        if first.masking == "attention":
            inputs = torch.cat([embeds[g][None].expand(b - a, -1, -1) for g, a, b in pieces])
            every = torch.cat(chunks)
            extra = {
                "attention_mask": _attention_masks(model, first, every, inputs.dtype),
                "position_ids": torch.arange(length, device=device)[None].expand(every.numel(), -1),
            }
        else:
            inputs = torch.cat([games[g].masked_embeds(embeds[g], chunk) for (g, _, _), chunk in zip(pieces, chunks)])
            extra = {}
        logits = model(inputs_embeds=inputs, use_cache=False, **extra, **keep_kw).logits[:, -m:]
        for (g, a, b), chunk, part in zip(pieces, chunks, logits.split([b - a for _, a, b in pieces])):
            out[g, a:b] = games[g].values_from_logits(part, subsets=chunk)
        bar.update(hi - lo)
    bar.close()
    return list(out)
