"""Evaluate a game on all (or some) of its ``2^n`` masked variants.

``evaluate`` validates its inputs, runs under ``torch.no_grad`` with the model in eval mode (its
train/eval mode restored afterwards) and dispatches to an engine: ``"naive"`` (every variant its own
sequence, ``engine/naive.py``) or ``"trie"`` (shared prefixes computed once, ``engine/trie.py``).
``"auto"`` picks the trie when an adapter supports the model's architecture, the model is on one device (not split by
a ``device_map`` or offloaded) and carries no forward hooks of a user's (``adapters.user_hooks``: the trie would not run
them as the model's forward does), else naive with a warning; it also falls back to naive, with a warning, when
the trie's plan does not fit the memory budget (its KV store holds every node of levels ``< n`` for all ``2^n``
variants, the nodes the sampled subsets reach otherwise).

``compute_dtype`` (None = the model's own dtype, no change):
  - ``"float32"`` / ``"bfloat16"``: equal to the model's dtype → nothing to do; a float32 model asked for
    ``"bfloat16"`` runs under ``torch.autocast`` (naive engine only: ``"auto"`` falls back to it with a
    warning, ``"trie"`` raises); anything else (autocast cannot upcast) raises ValueError.
  - ``"tf32"``: a float32 model with TF32 matmuls allowed on CUDA for the call (no effect on CPU).
No weights are copied. An autocast region around the call is switched off for it, as is the autocast that accelerate's
mixed precision (a ``Trainer`` with ``bf16``/``fp16``) wraps the model's forward in: ``compute_dtype`` alone sets the
precision (the trie engine, whose KV stores are in the model's dtype, cannot run under autocast).

Many games: :func:`evaluate_games` evaluates games of one layout together (the trie: one plan with every game's
levels side by side in the same passes; naive: their variants in the same batches); :func:`evaluate_many` groups
any list of games by layout (:func:`group_games`) and, under ``torch.distributed`` or with ``out_dir``, shards
them across ranks with resumable per-game files (:mod:`sftint_fast.distributed`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import warnings
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from tqdm.auto import tqdm

from sftint_fast.engine.naive import (NAIVE_MAX_VARIANTS, available_memory, check_batch_size, check_naive_variants,
                                      check_subsets, evaluate_naive_games, naive_batch_size, naive_layout,
                                      model_device)
from sftint_fast.game import MAX_PLAYERS, Game, _eval_mode
from sftint_fast.ops.triton import KERNEL_DTYPES

logger = logging.getLogger(__name__)

Method = Literal["auto", "naive", "trie"]
AttentionBackend = Literal["auto", "torch", "triton"]
ComputeDtype = Literal["float32", "bfloat16", "tf32"]

_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "tf32": torch.float32}
_BYTES_PER_VARIANT = 12  # int64 bitmask + float32 value, the minimum any engine holds per variant
#: Most games one group holds (also the resume granularity of sharded runs: a group's files are written together).
MAX_GROUP_GAMES = 64
#: Trie tokens per group the automatic group size aims for, by device. CUDA: a few full passes (fewer, larger
#: GEMMs and kernel launches). CPU: small groups only: measured on a 2-core CPU (tiny llama, hidden 128),
#: grouping games of 302 trie tokens made them 1.28x faster, of 958 tokens made no difference and of 2814
#: tokens 15% slower (larger activations fall out of cache), so only games much smaller than this are grouped.
GROUP_TOKENS = {"cuda": 32768, "cpu": 1536}


def _check_all_variants(n: int, device: torch.device, max_memory: int | None) -> None:
    """ValueError saying how much memory all ``2^n`` variants need when it is more than there is."""
    needed = _BYTES_PER_VARIANT * (1 << n)
    # the bitmasks and values live on the model's device (and the values come back to the host)
    budget = max_memory if max_memory is not None else min(available_memory(torch.device("cpu")),
                                                           available_memory(device))
    if n > MAX_PLAYERS or needed > budget:
        raise ValueError(
            f"n={n} players: all 2^{n} variants need at least {needed / 2**30:.1f} GiB ({needed} bytes), but "
            f"{budget / 2**30:.1f} GiB ({budget} bytes) are available; pass subsets= (a tensor of bitmasks) to "
            "evaluate a sample"
        )


def _validate_subsets(subsets: Any, n: int, device: torch.device, max_memory: int | None) -> torch.Tensor:
    if subsets is None:
        _check_all_variants(n, device, max_memory)
        return torch.arange(1 << n, dtype=torch.int64, device=device)
    return check_subsets(subsets, n).to(device)


def _uses_autocast(model: Any, compute_dtype: ComputeDtype | None) -> bool:
    return compute_dtype == "bfloat16" and model.get_input_embeddings().weight.dtype == torch.float32


def _check_compute_dtype(compute_dtype: Any) -> None:
    if compute_dtype is not None and compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype: expected None, 'float32', 'bfloat16' or 'tf32', received {compute_dtype!r}")


@contextlib.contextmanager
def _compute_context(model: Any, compute_dtype: ComputeDtype | None, device: torch.device) -> Iterator[None]:
    if compute_dtype is None:
        yield
        return
    _check_compute_dtype(compute_dtype)
    model_dtype = model.get_input_embeddings().weight.dtype
    wanted = _COMPUTE_DTYPES[compute_dtype]
    if compute_dtype == "tf32":
        if model_dtype != torch.float32:
            raise ValueError(f"compute_dtype='tf32': expected a float32 model, received a {model_dtype} model")
        if device.type != "cuda":
            logger.info("compute_dtype='tf32' has no effect on %s", device.type)
            yield
            return
        # torch >= 2.9's fp32_precision reflects both APIs; reading allow_tf32 raises once the new one was used
        matmul = torch.backends.cuda.matmul
        name, on = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
        previous = getattr(matmul, name)
        setattr(matmul, name, on)
        try:
            yield
        finally:
            setattr(matmul, name, previous)
        return
    if wanted == model_dtype:
        yield
        return
    if _uses_autocast(model, compute_dtype):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
        return
    raise ValueError(
        f"compute_dtype={compute_dtype!r} on a {model_dtype} model: autocast only lowers float32 to bfloat16; "
        f"convert the model instead (e.g. model.to({wanted})), or evaluate it in its own dtype with compute_dtype=None "
        f"(the tracker's compute_dtype='auto'; a quantized model cannot be converted)"
    )


def _resolve_backend(attention_backend: AttentionBackend, device: torch.device, *,
                     dtype: torch.dtype | None = None) -> str:
    """The trie's attention path: ``"auto"`` is Triton on CUDA (Triton installed) for a model of ``dtype`` the
    kernels take (None = not known), else torch."""
    if attention_backend not in ("auto", "torch", "triton"):
        raise ValueError(f"attention_backend: expected 'auto', 'torch' or 'triton', received {attention_backend!r}")
    if attention_backend != "auto":
        return attention_backend
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return "torch"
    return "triton" if device.type == "cuda" and importlib.util.find_spec("triton") is not None else "torch"


def _naive_cost(forwards: int) -> str:
    return f"{forwards} forward passes, one per variant: slower, same values"


def _choose_engine(model: Any, method: Method, compute_dtype: ComputeDtype | None = None,
                   forwards: int | None = None) -> Literal["naive", "trie"]:
    """The engine to run; ``forwards`` (the naive engine's forward passes), when known, goes into the warnings."""
    return _engine_and_adapter(model, method, compute_dtype, forwards, stacklevel=5)[0]


def _engine_and_adapter(model: Any, method: Method, compute_dtype: ComputeDtype | None = None,
                        forwards: int | None = None, *, stacklevel: int = 4) -> tuple[Literal["naive", "trie"], Any]:
    """:func:`_choose_engine` and, for the trie, the adapter it found (None for naive): the caller runs the trie
    with it, for ``find_adapter``'s checks walk every module (a few ms on a 30-layer model, ~1.5% of a small
    ``evaluate``) and nothing between the two can add a hook."""
    if method == "naive":
        return "naive", None
    from sftint_fast.engine.adapters import find_adapter  # imported on use: the trie pulls in more modules

    adapter, reason = find_adapter(model)
    if adapter is None:
        if method == "trie":
            raise ValueError(f"method='trie': {reason}; use method='naive'")
        cost = "slower, same values" if forwards is None else _naive_cost(forwards)
        warnings.warn(f"{reason}; falling back to the naive engine ({cost})", stacklevel=stacklevel)
        return "naive", None
    if _uses_autocast(model, compute_dtype):
        # The trie engine keeps its KV stores in the model's dtype, so it cannot run under autocast.
        if method == "trie":
            raise ValueError("compute_dtype='bfloat16' on a float32 model runs under torch.autocast, which the trie "
                             "engine does not support; convert the model (model.to(torch.bfloat16)) or use method='naive'")
        warnings.warn("compute_dtype='bfloat16' on a float32 model runs under torch.autocast, which the trie engine "
                      "does not support; using the naive engine", stacklevel=stacklevel)
        return "naive", None
    return "trie", adapter


def _check_options(batch_size: int | None, max_memory: int | float | None) -> None:
    check_batch_size(batch_size)
    if max_memory is not None and (not isinstance(max_memory, (int, float)) or isinstance(max_memory, bool)
                                   or not 0 < max_memory < math.inf):
        raise ValueError(f"max_memory: expected a positive finite number of bytes or None, received {max_memory!r}")


def _check_names(method: Any, compute_dtype: Any, attention_backend: Any) -> None:
    if method not in ("auto", "naive", "trie"):
        raise ValueError(f"method: expected 'auto', 'naive' or 'trie', received {method!r}")
    _check_compute_dtype(compute_dtype)
    _resolve_backend(attention_backend, torch.device("cpu"))  # checks the name


def _check_games(games: Sequence[Any]) -> list[Game]:
    if isinstance(games, (Game, str)) or not hasattr(games, "__iter__"):
        raise TypeError(f"games: expected a sequence of sftint_fast.Game, received {type(games).__name__}")
    games = list(games)
    for i, game in enumerate(games):
        if not isinstance(game, Game):
            raise TypeError(f"games[{i}]: expected a sftint_fast.Game, received {type(game).__name__}")
    return games


def _check_vocab(model: Any, games: Sequence[Game]) -> None:
    """ValueError naming the game, field and positions of token ids outside the model's vocabulary (a game built for
    another model, or by hand), instead of an IndexError deep in the embedding."""
    vocab = model.get_input_embeddings().num_embeddings
    for i, game in enumerate(games):
        for field in ("input_ids", "target"):
            ids = getattr(game, field)
            bad = ((ids < 0) | (ids >= vocab)).nonzero().flatten()
            if bad.numel():
                raise ValueError(f"games[{i}].{field}: expected token ids in [0, {vocab}) (the model's vocabulary), "
                                 f"received {ids[bad[:5]].tolist()} at positions {bad[:5].tolist()}"
                                 + (f" and {bad.numel() - 5} more" if bad.numel() > 5 else ""))


#: Last names of learned absolute position tables (GPT-2 and GPT-Neo ``wpe``, OPT and BioGPT ``embed_positions``).
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def _position_limit(model: Any) -> tuple[int, str] | None:
    """``(most tokens, table name)`` for a model with a learned absolute position table (an ``nn.Embedding`` named
    as in ``_POSITION_TABLES``), None for one without (RoPE, ALiBi: they run past ``max_position_embeddings``)."""
    tables = [(name, module) for name, module in model.named_modules()
              if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES]
    if not tables:
        return None
    name, table = min(tables, key=lambda item: item[1].num_embeddings)
    # OPT's table holds max_position_embeddings + 2 rows (its positions start at 2): the config says how many it takes
    configured = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    most = table.num_embeddings if not isinstance(configured, int) else min(configured, table.num_embeddings)
    return most, name


def _check_positions(model: Any, games: Sequence[Game]) -> None:
    """ValueError naming the first game longer than the model's learned position table, instead of an IndexError
    ('index out of range in self') deep in its position embedding."""
    limit = _position_limit(model)
    if limit is None:
        return
    most, name = limit
    for i, game in enumerate(games):
        length = game.input_ids.numel()
        if length > most:
            raise ValueError(f"games[{i}]: expected at most {most} tokens (the model's learned position table "
                             f"{name}), received {length} (prompt {game.prompt_length} + target[:-1] "
                             f"{length - game.prompt_length}); shorten the prompt")


def _unwrap_parallel(model: Any) -> Any:
    """The model a ``DistributedDataParallel`` / ``DataParallel`` wrapper holds (a training loop's model): its
    forward is the same computation, but the wrapper has no ``get_input_embeddings`` and would sync buffers."""
    for _ in range(4):
        if not isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            break
        model = model.module
    return model


def _check_model(model: Any, games: Sequence[Game]) -> None:
    """ValueError for a model without weights (meta device) or games built for another model: token ids outside
    its vocabulary, a baseline of another hidden size (instead of an error deep in the embedding or the layers)."""
    device = model_device(model)
    if device.type == "meta":
        raise ValueError("model: expected its weights on a real device (cpu, cuda), received a model on the meta "
                         "device (no weights: load them, e.g. from_pretrained without device_map='meta')")
    _check_vocab(model, games)
    _check_positions(model, games)
    hidden = model.get_input_embeddings().weight.shape[-1]
    for i, game in enumerate(games):
        if game.masking == "embedding" and game.baseline.shape[-1] != hidden:
            raise ValueError(f"games[{i}].baseline: expected rows of the model's hidden size {hidden}, received shape "
                             f"{tuple(game.baseline.shape)} (a game built for another model?)")


def evaluate(
    model: Any,
    game: Game,
    *,
    method: Method = "auto",
    subsets: torch.Tensor | None = None,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool = True,
    attention_backend: AttentionBackend = "auto",
    compute_dtype: ComputeDtype | None = None,
    max_variants: int | None = NAIVE_MAX_VARIANTS,
) -> torch.Tensor:
    """The game's values ``v`` on the model's device, float32.

    Args:
        subsets: None → all ``2^n`` variants, result ``(2^n,)`` indexed by bitmask (bit ``i`` = player ``i``
            present); else a 1-D integer tensor of bitmasks, result ``(len(subsets),)`` in that order.
        batch_size: variants (naive) or nodes (trie) per forward; None = from a memory estimate.
        max_memory: memory budget in bytes for the engine's activations (and the trie's KV store); it also bounds
            ``batch_size``, and a budget too small for one variant (naive) or the trie's store raises ValueError;
            None = a safe fraction of free memory.
        attention_backend: the trie's attention: ``"auto"`` = the fused Triton kernel on CUDA for a float16,
            bfloat16 or float32 model, else torch (a float64 model: torch; ``"triton"`` refuses it).
        compute_dtype: see the module docstring.
        max_variants: the most variants of one game (one forward pass each) the naive engine runs, also when
            ``"auto"`` falls back to it; more raise ValueError saying how many forwards they need (all ``2^30`` of
            n=30 would never end): pass ``subsets=`` to sample, or None to lift the limit. The trie ignores it.

    >>> v = evaluate(model, game)          # doctest: +SKIP
    >>> v[-1] - v[0]                       # v(N) - v(∅)  # doctest: +SKIP
    """
    if not isinstance(game, Game):
        raise TypeError(f"game: expected a sftint_fast.Game, received {type(game).__name__}")
    return evaluate_games(model, [game], method=method, subsets=subsets, batch_size=batch_size,
                          max_memory=max_memory, progress=progress, attention_backend=attention_backend,
                          compute_dtype=compute_dtype, max_variants=max_variants)[0]


def evaluate_games(
    model: Any,
    games: Sequence[Game],
    *,
    method: Method = "auto",
    subsets: torch.Tensor | None = None,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool = True,
    attention_backend: AttentionBackend = "auto",
    compute_dtype: ComputeDtype | None = None,
    max_variants: int | None = NAIVE_MAX_VARIANTS,
) -> list[torch.Tensor]:
    """:func:`evaluate` on several games of one layout at once → one ``v`` per game, equal to evaluating each.

    The trie engine needs the same length, player spans, scored positions and masking mode (tokens, baselines,
    targets and value functions may differ) and runs every game's levels in shared passes (its KV stores hold
    all the games: the plan raises, saying how much memory it needs, when they do not fit); the naive engine
    needs the same length, number of targets and masking mode and batches the games' variants together.
    Games of another layout raise ValueError; :func:`evaluate_many` groups arbitrary games for you.
    Options as in :func:`evaluate`; ``batch_size`` counts over all the games.
    """
    games = _check_games(games)
    _check_options(batch_size, max_memory)
    _check_names(method, compute_dtype, attention_backend)  # before the early returns: a typo is refused anyway
    if not games:
        return []
    model = _unwrap_parallel(model)
    _check_model(model, games)
    n = games[0].num_players
    if subsets is not None and any(game.num_players != n for game in games):
        raise ValueError(f"subsets: the games have different numbers of players {sorted({g.num_players for g in games})}")
    device = model_device(model)
    max_memory = None if max_memory is None else int(max_memory)
    if subsets is None:  # all 2^n: the trie plans them from n alone (its memory check comes before any node id)
        _check_all_variants(n, device, max_memory)
    else:
        subsets = _validate_subsets(subsets, n, device, max_memory)
        if subsets.numel() == 0:
            return [torch.empty(0, dtype=torch.float32, device=device) for _ in games]
    variants = (1 << n) if subsets is None else subsets.numel()  # of each game
    forwards = len(games) * variants  # what the naive engine would run
    check_naive_variants(0, max_variants)  # the name, before any engine runs
    engine, adapter = _engine_and_adapter(model, method, compute_dtype, forwards)
    if engine == "naive":  # refused before the 2^n bitmasks are built
        check_naive_variants(variants, max_variants)
    backend = _resolve_backend(attention_backend, device, dtype=model.get_input_embeddings().weight.dtype)
    kwargs: dict[str, Any] = {"batch_size": batch_size, "progress": progress, "max_memory": max_memory}
    if engine == "trie":
        from sftint_fast.engine.trie import evaluate_trie_games

        run: Callable[..., list[torch.Tensor]] = evaluate_trie_games
        kwargs.update(attention_backend=backend, adapter=adapter)
    else:
        run = evaluate_naive_games
        kwargs["max_variants"] = max_variants
        subsets = _every_variant(subsets, n, device)
    # each submodule's own mode back after (model.train(m) would put a frozen, eval-mode part in train mode); a
    # caller's autocast region off: compute_dtype sets the precision (the trie's stores would take its K/V dtype)
    with _eval_mode(model), torch.no_grad(), _no_autocast(device), _compute_context(model, compute_dtype, device):
        try:
            values = run(model, games, subsets, **kwargs)
        except _trie_memory_error() as error:  # raised by the plan, before any forward
            if max_memory is None:  # the budget the message names is the default one, not a number the user gave
                from sftint_fast.engine.plan import FREE_MEMORY_FRACTION

                error = type(error)(f"{error} (max_memory not given: the default, {FREE_MEMORY_FRACTION:.0%} of the "
                                    "free memory; pass max_memory= to set it)")
            if method != "auto":
                raise error from None
            try:
                check_naive_variants(variants, max_variants)
            except ValueError as refusal:
                raise ValueError(f"method='auto': {error}; and {refusal}") from None
            warnings.warn(f"{error}; falling back to the naive engine ({_naive_cost(forwards)})", stacklevel=3)
            kwargs.pop("attention_backend")
            kwargs.pop("adapter")
            values = evaluate_naive_games(model, games, _every_variant(subsets, n, device), max_variants=max_variants,
                                          **kwargs)
    return [v.to(torch.float32) for v in values]


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _every_variant(subsets: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(1 << n, dtype=torch.int64, device=device) if subsets is None else subsets


def _trie_memory_error() -> type[Exception]:
    from sftint_fast.engine.plan import TrieMemoryError  # imported on use: the plan pulls in the adapters

    return TrieMemoryError


def _layout_fn(engine: str) -> Callable[[Game], tuple]:
    if engine == "trie":
        from sftint_fast.engine.trie import trie_layout

        return trie_layout
    return naive_layout


def _auto_group_size(model: Any, engine: str, game: Game, subsets: torch.Tensor | None, batch_size: int | None,
                     max_memory: int | None, attention_backend: AttentionBackend = "auto", adapter: Any = None) -> int:
    """Games of ``game``'s layout worth running together: up to ``GROUP_TOKENS`` trie tokens for the model's device
    (trie) or two batches (naive), with every game's KV store within half the memory budget. The store is the one
    the trie will build: with the fused kernel (``attention_backend`` resolving to ``"triton"``) the last level's
    K/V are never kept, so the plan has no last-level window. ``adapter``: the model's, as the engine choice found it
    (None: found here)."""
    if subsets is not None:
        subsets = _validate_subsets(subsets, game.num_players, torch.device("cpu"), max_memory)
    variants = (1 << game.num_players) if subsets is None else max(1, int(subsets.numel()))
    if engine == "naive":
        batch = batch_size or naive_batch_size(model, game, max_memory=max_memory)
        return max(1, min(MAX_GROUP_GAMES, 2 * batch // variants))
    from sftint_fast.engine.adapters import get_adapter
    from sftint_fast.engine.plan import TrieMemoryError, default_max_memory, default_pass_tokens, plan_trie

    dims = (adapter or get_adapter(model)).dims
    budget = max_memory if max_memory is not None else default_max_memory(model_device(model))
    try:
        plan = plan_trie(game, subsets=subsets, dims=dims, batch_size=batch_size,
                         max_memory=budget, num_targets=int(game.score_positions.numel()),
                         pass_tokens=default_pass_tokens(model_device(model)),
                         window=_resolve_backend(attention_backend, model_device(model), dtype=dims.dtype) != "triton")
    except TrieMemoryError:  # not even one game fits: evaluate_games falls back to naive (auto) or says so
        return 1
    by_memory = (budget // 2) // max(1, plan.kv_bytes)
    by_tokens = GROUP_TOKENS.get(model_device(model).type, GROUP_TOKENS["cpu"]) // max(1, plan.trie_tokens)
    return int(max(1, min(MAX_GROUP_GAMES, by_memory, by_tokens)))


def group_games(
    model: Any,
    games: Sequence[Game],
    *,
    method: Method = "auto",
    subsets: torch.Tensor | None = None,
    group_size: int | None = None,
    batch_size: int | None = None,
    max_memory: int | None = None,
    compute_dtype: ComputeDtype | None = None,
    attention_backend: AttentionBackend = "auto",
) -> list[list[int]]:
    """Indices of ``games`` in groups that :func:`evaluate_games` can run together: same layout for the engine
    that ``method`` picks, at most ``group_size`` games each (None = automatic from the plan and the memory
    budget of ``attention_backend``'s KV store; 1 = no grouping). Groups in order of their first game; indices
    increasing inside a group."""
    games = _check_games(games)
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise ValueError(f"group_size: expected a positive int or None, received {group_size!r}")
    _check_options(batch_size, max_memory)
    _check_names(method, compute_dtype, attention_backend)
    if not games:
        return []
    engine, adapter = _engine_and_adapter(model, method, compute_dtype)
    layout = _layout_fn(engine)
    by_layout: dict[tuple, list[int]] = {}
    for i, game in enumerate(games):
        by_layout.setdefault(layout(game), []).append(i)
    groups = []
    for members in by_layout.values():
        size = group_size or _auto_group_size(model, engine, games[members[0]], subsets, batch_size, max_memory,
                                              attention_backend, adapter)
        groups.extend(members[start:start + size] for start in range(0, len(members), size))
    return sorted(groups, key=lambda group: group[0])


def evaluate_many(model: Any, games: Sequence[Game], *, progress: bool = True, out_dir: str | None = None,
                  group_size: int | None = None, **kwargs: Any) -> list[torch.Tensor]:
    """``v`` of every game, games of the same layout evaluated together (:func:`group_games`,
    :func:`evaluate_games`); one progress bar over the games. ``group_size=1`` evaluates them one by one.

    Under ``torch.distributed`` (e.g. ``torchrun``) or with ``out_dir`` (resumable per-game shard files) this is
    :func:`sftint_fast.distributed.evaluate_sharded`: games split across ranks, the full list (CPU tensors)
    returned on every rank. Other keyword arguments: as :func:`evaluate`.
    """
    from sftint_fast import distributed

    games = _check_games(games)
    model = _unwrap_parallel(model)  # its shards keyed as the model it holds
    if games:  # here, where an error can name the caller's index of the game, not its index in a group
        _check_model(model, games)
    distributed._warn_without_group()
    if out_dir is not None or distributed.is_distributed():
        return distributed.evaluate_sharded(model, games, out_dir=out_dir, progress=progress, group_size=group_size,
                                            **kwargs)
    values: list[torch.Tensor | None] = [None] * len(games)
    with tqdm(total=len(games), desc="games", unit="game", disable=not progress) as bar:
        for group in group_games(model, games, method=kwargs.get("method", "auto"), subsets=kwargs.get("subsets"),
                                 group_size=group_size, batch_size=kwargs.get("batch_size"),
                                 max_memory=kwargs.get("max_memory"), compute_dtype=kwargs.get("compute_dtype"),
                                 attention_backend=kwargs.get("attention_backend", "auto")):
            for i, v in zip(group, evaluate_games(model, [games[i] for i in group], progress=False, **kwargs)):
                values[i] = v
            bar.update(len(group))
    return values  # type: ignore[return-value]
