"""The reference engine: every variant is its own sequence, run through the model's own forward.

Exact and slow (``2^n · L`` tokens); the trie engine is tested against it. The LM head runs only on
the ``m`` scored positions (the last ``m`` of ``input_ids``, ``logits_to_keep``-style). The variants reach the model
as ``inputs_embeds``: a model whose forward reads the token ids beyond its input embedding (Gemma-3n) is refused
(:func:`check_inputs_embeds`), and so, for ``masking="attention"``, is one whose attention masks do not hide the
masked players (:func:`check_attention_masking`). Both are probed once per model.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from sftint_fast._memory import free_memory
from sftint_fast.engine.adapters.base import mlp_tensors
from sftint_fast.game import Game, _eval_mode

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
    """Rough peak activation bytes of one variant's forward (no grad): hidden states, QKV, MLP (as many
    MLP-wide tensors as its activation keeps alive: :func:`~sftint_fast.engine.adapters.base.mlp_tensors`), scores,
    logits."""
    cfg = model.config
    hidden = model.get_input_embeddings().weight.shape[1]
    inter = _largest(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden)
    heads = _largest(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1))
    # q / attention output width: heads x head_dim, which may exceed the hidden size (Qwen3, Gemma, OLMo-2 configs)
    head_dim = getattr(cfg, "head_dim", None)
    width = max(hidden, heads * head_dim) if isinstance(head_dim, int) and head_dim > 0 else hidden
    vocab = model.get_input_embeddings().num_embeddings
    length = game.input_ids.numel()
    elem = model.get_input_embeddings().weight.element_size()
    mlp = max(mlp_tensors(model) * inter, _sparse_mlp_elements(model, elem))
    activations = length * (8 * width + mlp + 3 * heads * length) * elem
    logits = 3 * game.target.numel() * vocab * 4
    return activations + logits


def _sparse_mlp_elements(model: Any, elem: int) -> int:
    """Elements one token keeps alive at the peak of the model's largest sparse MoE block (0 without one): its
    experts implementation may gather a top-k expert's weights per token (``batched_mm``), far above a dense MLP's."""
    from sftint_fast.engine.adapters.moe import _is_gpt_oss_block, _is_sparse, moe_block_elements

    implementation = getattr(model.config, "_experts_implementation", None) or "eager"
    return max((moe_block_elements(m, implementation, elem) for m in model.modules()
                if _is_sparse(m) or _is_gpt_oss_block(m)), default=0)


def held_bytes(model: Any) -> int:
    """Bytes a forward holds whatever its batch, beyond the weights: the adapted expert weights PEFT's
    ``lora.ParamWrapper`` layers build while the largest sparse MoE block runs
    (:func:`~sftint_fast.engine.adapters.moe.peft_weight_bytes`; 0 without them)."""
    from sftint_fast.engine.adapters.moe import _is_sparse, peft_weight_bytes

    return max((peft_weight_bytes(m) for m in model.modules() if _is_sparse(m)), default=0)


def _largest(size: Any) -> int:
    """A config size that may be given per layer (Gemma-3n's ``intermediate_size`` list): the largest."""
    return max(size) if isinstance(size, (list, tuple)) else size


def naive_batch_size(model: Any, game: Game, *, max_memory: int | None = None) -> int:
    """Variants per forward that fit ``max_memory`` bytes (default: half of CUDA free memory, or 1/4 of host
    available memory capped at 2 GiB), less what a forward holds whatever its batch (:func:`held_bytes`)."""
    device = model_device(model)
    if max_memory is None:
        free = available_memory(device)
        max_memory = free // 2 if device.type == "cuda" else min(free // 4, 2 << 30)
    room = max_memory - held_bytes(model)
    return int(max(1, min(MAX_BATCH, room // max(1, sequence_bytes(model, game)))))


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


def _attention_kwargs(model: Any, game: Game, subsets: torch.Tensor, inputs: torch.Tensor) -> dict:
    """The forward's ``attention_mask`` (:func:`_attention_masks`) and ``position_ids`` (every token in its place) for
    ``"attention"`` masking of the variants ``subsets (B,)`` whose ``inputs_embeds`` are ``inputs (B, L, H)``."""
    length = game.input_ids.numel()
    return {"attention_mask": _attention_masks(model, game, subsets, inputs.dtype),
            "position_ids": torch.arange(length, device=inputs.device)[None].expand(subsets.numel(), -1)}


#: Layer types (transformers' ``config.layer_types``) that an attention mask fully controls, or that mix no tokens.
MASKABLE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "mlp", "moe"})


def check_attention_masking(model: Any) -> None:
    """Refuse ``"attention"`` masking on a model with layers that mix tokens without reading the attention mask
    (recurrent / linear attention, convolutions, hybrids) or read it in a form the 4D masks here do not give
    (chunked attention): their masked players would stay visible, silently. Its config's ``layer_types`` say so where
    it has them; :func:`_masking_fault` tries the masks on the model itself (once per model) for the rest."""
    others = sorted(set(getattr(_text_config(model), "layer_types", None) or ()) - MASKABLE_LAYER_TYPES)
    if others:
        raise ValueError(f"masking='attention': expected a model whose every token-mixing layer is full or sliding "
                         f"attention, received {type(model).__name__} with layer types {others}, which an attention "
                         f"mask cannot hide the masked players from; use masking='embedding'")
    implementation = str(getattr(model.config, "_attn_implementation", None) or "")
    if implementation.startswith("flex_attention") and model_device(model).type == "cpu":
        # torch 2.13's flex attention on CPU corrupts the heap on these 4D masks ("free(): invalid next size"): the
        # process aborts, so the probe cannot even be tried
        raise ValueError(f"masking='attention': expected a model whose attention implementation takes the 4D "
                         f"variant masks, received {type(model).__name__} with attn_implementation={implementation!r} "
                         f"on the CPU, where flex attention aborts the process on them; load it with "
                         f"attn_implementation='eager' (or 'sdpa'), or use masking='embedding'")
    fault = _probed(model, _masking_fault)
    if fault:
        raise ValueError(f"masking='attention': expected a model whose attention masks hide the masked players, "
                         f"received {type(model).__name__}, which {fault}; use masking='embedding'")


def check_inputs_embeds(model: Any) -> None:
    """Refuse a model whose forward given ``inputs_embeds`` (how every variant reaches it) is not its forward on the
    token ids: one that reads the ids beyond its input embedding (Gemma-3n adds per-layer embeddings of the ids to
    every layer, and drops them when it gets embeddings) would be scored as another model, silently."""
    fault = _probed(model, _inputs_embeds_fault)
    if fault:
        raise ValueError(f"model: expected a model whose forward on inputs_embeds (the embedding's output, "
                         f"where the variants differ) equals its forward on input_ids, received "
                         f"{type(model).__name__}, {fault}: its forward reads the token ids beyond "
                         f"get_input_embeddings(), so no variant of a game can be given to it")


#: The probes' verdicts per model (probe name and attention implementation → reason, "" = fine), kept while the model
#: lives: its architecture and attention implementation decide them, not its weights.
_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probed(model: Any, probe: Any) -> str:
    """``probe(model)``, run once per model and attention implementation."""
    verdicts = _PROBES.setdefault(model, {})
    key = (probe.__name__, getattr(model.config, "_attn_implementation", None))
    if key not in verdicts:
        with torch.no_grad(), _eval_mode(model):
            verdicts[key] = probe(model)
    return verdicts[key]


def _probe_ids(model: Any) -> torch.Tensor:
    """The probes' 4 token ids, on the model's device."""
    return torch.arange(1, 5, device=model_device(model)) % model.get_input_embeddings().num_embeddings


def _inputs_embeds_fault(model: Any) -> str:
    """Why ``model``'s last logits on the embedding's output of 4 tokens differ from those on their ids ("" when they
    do not)."""
    ids = _probe_ids(model)[None]
    keep_kw = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    by_ids = model(input_ids=ids, use_cache=False, **keep_kw).logits[:, -1].float()
    by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), use_cache=False, **keep_kw).logits[:, -1]
    moved = float((by_embeds.float() - by_ids).abs().max())
    if moved > 1e-3 * max(1.0, float(by_ids.abs().max())):
        return f"whose last logits moved by {moved:.3g} when given the embeddings of the same 4 tokens"
    return ""


def _masking_fault(model: Any) -> str:
    """Why the masks of :func:`_attention_kwargs` do not hide a token from ``model``'s other tokens ("" when they do),
    from a forward of 4 rows of 4 tokens: two first-token embeddings, each hidden (player absent) and not. Hidden,
    the last position's logits must not see which one it was; a model whose layers mix tokens without reading the
    mask (recurrent or state-space layers its config lists no ``layer_types`` for, e.g. RWKV; an attention kernel
    that drops a 4D mask) does, and one that cannot take the masks (ALiBi built from a 2D mask, e.g. BLOOM) fails.
    The masks are causal, so a model whose own forward lets earlier tokens see a later one (bidirectional) is
    refused too."""
    device = model_device(model)
    embedding = model.get_input_embeddings()
    ids = _probe_ids(model)
    probe = Game(input_ids=ids.cpu(), player_spans=((0, 1),), words=("probe",), target=ids[-1:].cpu(),
                 baseline=torch.zeros(1), masking="attention", prompt_length=ids.numel())
    subsets = torch.tensor([0, 0, 1, 1], device=device)
    embeds = embedding(ids[None]).expand(4, -1, -1).clone()
    scale = float(embeds.float().std()) or 1.0
    noise = torch.randn(embeds.shape[-1], generator=torch.Generator().manual_seed(0)) * scale
    embeds[1::2, 0] += noise.to(embeds)
    keep_kw = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    try:
        last = model(inputs_embeds=embeds, use_cache=False, **_attention_kwargs(model, probe, subsets, embeds),
                     **keep_kw).logits[:, -1].float()
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise  # a passing shortage, not the model's verdict (it would be kept for the model's lifetime)
    except Exception as error:  # noqa: BLE001 - whatever the model's code raises is the reason to give
        return f"failed on the 4D attention masks ({type(error).__name__}: {error})"
    hidden, shown = (last[0] - last[1]).abs().max(), (last[2] - last[3]).abs().max()
    if hidden > 1e-3 * shown:
        return (f"still sees a token the masks hide (its last logits moved by {float(hidden):.3g} when the hidden "
                f"token changed, {float(shown):.3g} when it is shown)")
    later = embeds[:1].repeat(2, 1, 1)  # the first row twice, the second with another last token
    later[1, -1] += noise.to(later)
    own = model(inputs_embeds=later, use_cache=False).logits.float()
    early, last = (own[0, :-1] - own[1, :-1]).abs().max(), (own[0, -1] - own[1, -1]).abs().max()
    if early > 1e-3 * last:
        return (f"is not causal (its own forward's logits at the earlier positions moved by {float(early):.3g} when "
                f"the last token changed), which the causal masks given to it would change")
    return ""


def _accepts_logits_to_keep(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


#: Most variants of one game (one forward pass each) the naive engine runs unless told otherwise (``max_variants=``):
#: all 2^20 variants of n=20 players; 2^30 (n=30) would be a billion forwards, which never ends in practice. Per game:
#: many prompts at a practical n are a workload their caller chose.
NAIVE_MAX_VARIANTS = 1 << 20


def check_naive_variants(num_variants: int, max_variants: int | None) -> None:
    """ValueError when the naive engine would run more than ``max_variants`` variants of one game, one forward pass
    each (None: no limit)."""
    if max_variants is not None and (isinstance(max_variants, bool) or not isinstance(max_variants, int)
                                     or max_variants < 1):
        raise ValueError(f"max_variants: expected None or an int >= 1, received {max_variants!r}")
    if max_variants is not None and num_variants > max_variants:
        raise ValueError(f"the naive engine: {num_variants} variants of a game need {num_variants} forward passes (one "
                         f"sequence each), more than max_variants={max_variants}; pass subsets= (a tensor of "
                         "bitmasks) to evaluate a sample, or max_variants=None (or a larger limit) to run them all")


def evaluate_naive(
    model: Any,
    game: Game,
    subsets: torch.Tensor,
    *,
    batch_size: int | None = None,
    progress: bool = True,
    max_memory: int | None = None,
    max_variants: int | None = NAIVE_MAX_VARIANTS,
) -> torch.Tensor:
    """``v`` for each bitmask of ``subsets`` ``(B,)`` int64 → float32 ``(B,)`` on the model's device.

    Every variant is a full sequence given as ``inputs_embeds`` (embedding masking: baseline rows
    substituted; attention masking: a 4D mask and explicit ``position_ids``). ``subsets`` (any integer dtype) and
    ``batch_size`` are checked here (TypeError/ValueError); callers (``evaluate``) handle ``no_grad`` and eval mode.
    More than ``max_variants`` variants (None: no limit) raise ValueError, saying how many forwards they need.
    """
    return evaluate_naive_games(model, [game], subsets, batch_size=batch_size, progress=progress,
                                max_memory=max_memory, max_variants=max_variants)[0]


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
    max_variants: int | None = NAIVE_MAX_VARIANTS,
) -> list[torch.Tensor]:
    """:func:`evaluate_naive` on several games of one :func:`naive_layout`, their variants batched together
    (``batch_size`` variants per forward over all games) → one float32 ``(B,)`` tensor per game; ``max_variants``
    bounds the variants of each game (one forward pass each)."""
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
    check_naive_variants(subsets.numel(), max_variants)
    check_inputs_embeds(model)
    if first.masking == "attention":
        check_attention_masking(model)
    device = model_device(model)
    subsets = subsets.to(device)
    embedding = model.get_input_embeddings()
    embeds = [embedding(game.input_ids.to(device)[None])[0] for game in games]  # (L, H) each
    m = first.target.numel()
    if max_memory is not None:  # a budget bounds the batch (as the trie's), and refuses what one variant exceeds
        needed, held = sequence_bytes(model, first), held_bytes(model)
        if needed + held > max_memory:
            weights = f" and {held / 2**30:.2f} GiB ({held} bytes) of adapted weights a forward holds" if held else ""
            raise ValueError(f"the naive engine: one variant of {first.input_ids.numel()} tokens needs about "
                             f"{needed / 2**30:.2f} GiB ({needed} bytes) of activations{weights}, but max_memory is "
                             f"{max_memory / 2**30:.2f} GiB ({max_memory} bytes); raise max_memory or shorten "
                             "the prompt")
        if batch_size is not None:
            batch_size = min(batch_size, (max_memory - held) // needed)
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
            extra = _attention_kwargs(model, first, every, inputs)
        else:
            inputs = torch.cat([games[g].masked_embeds(embeds[g], chunk) for (g, _, _), chunk in zip(pieces, chunks)])
            extra = {}
        logits = model(inputs_embeds=inputs, use_cache=False, **extra, **keep_kw).logits[:, -m:]
        for (g, a, b), chunk, part in zip(pieces, chunks, logits.split([b - a for _, a, b in pieces])):
            out[g, a:b] = games[g].values_from_logits(part, subsets=chunk)
        bar.update(hi - lo)
    bar.close()
    return list(out)
