"""Evaluate a game on all (or some) of its ``2^n`` masked variants.

``evaluate`` validates its inputs, runs under ``torch.no_grad`` with the model in eval mode (its
train/eval mode restored afterwards) and dispatches to an engine: ``"naive"`` (every variant its own
sequence, ``engine/naive.py``) or ``"trie"`` (shared prefixes computed once, ``engine/trie.py``).
``"auto"`` picks the trie when an adapter supports the model's architecture, else naive with a warning.

``compute_dtype`` (None = the model's own dtype, no change):
  - ``"float32"`` / ``"bfloat16"``: equal to the model's dtype → nothing to do; a float32 model asked for
    ``"bfloat16"`` runs under ``torch.autocast`` (naive engine only: ``"auto"`` falls back to it with a
    warning, ``"trie"`` raises); anything else (autocast cannot upcast) raises ValueError.
  - ``"tf32"``: a float32 model with TF32 matmuls allowed on CUDA for the call (no effect on CPU).
No weights are copied.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from tqdm.auto import tqdm

from sftint_fast.engine.naive import available_memory, evaluate_naive, model_device
from sftint_fast.game import MAX_PLAYERS, Game

logger = logging.getLogger(__name__)

Method = Literal["auto", "naive", "trie"]
AttentionBackend = Literal["auto", "torch", "triton"]
ComputeDtype = Literal["float32", "bfloat16", "tf32"]

_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "tf32": torch.float32}
_BYTES_PER_VARIANT = 12  # int64 bitmask + float32 value, the minimum any engine holds per variant


def _validate_subsets(subsets: Any, n: int, device: torch.device, max_memory: int | None) -> torch.Tensor:
    if subsets is None:
        needed = _BYTES_PER_VARIANT * (1 << n)
        budget = max_memory if max_memory is not None else available_memory(torch.device("cpu"))
        if n > MAX_PLAYERS or needed > budget:
            raise ValueError(
                f"n={n} players: all 2^{n} variants need at least {needed / 2**30:.1f} GiB, but {budget / 2**30:.1f} GiB"
                " are available; pass subsets= (a tensor of bitmasks) to evaluate a sample"
            )
        return torch.arange(1 << n, dtype=torch.int64, device=device)
    if not isinstance(subsets, torch.Tensor):
        raise TypeError(f"subsets: expected a 1-D int64 tensor of bitmasks, received {type(subsets).__name__}")
    if subsets.dim() != 1 or subsets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"subsets: expected a 1-D integer tensor of bitmasks, received shape {tuple(subsets.shape)} "
                        f"dtype {subsets.dtype}")
    subsets = subsets.to(device=device, dtype=torch.int64)
    if subsets.numel() and (int(subsets.min()) < 0 or (n < 63 and int(subsets.max()) >= (1 << n))):
        bad = subsets[(subsets < 0) | (subsets >= (1 << n))][:10].tolist()
        raise ValueError(f"subsets: expected bitmasks in [0, 2^{n}) for {n} players, received {bad}")
    return subsets


def _uses_autocast(model: Any, compute_dtype: ComputeDtype | None) -> bool:
    return compute_dtype == "bfloat16" and model.get_input_embeddings().weight.dtype == torch.float32


@contextlib.contextmanager
def _compute_context(model: Any, compute_dtype: ComputeDtype | None, device: torch.device) -> Iterator[None]:
    if compute_dtype is None:
        yield
        return
    if compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype: expected None, 'float32', 'bfloat16' or 'tf32', received {compute_dtype!r}")
    model_dtype = model.get_input_embeddings().weight.dtype
    wanted = _COMPUTE_DTYPES[compute_dtype]
    if compute_dtype == "tf32":
        if model_dtype != torch.float32:
            raise ValueError(f"compute_dtype='tf32': expected a float32 model, received a {model_dtype} model")
        if device.type != "cuda":
            logger.info("compute_dtype='tf32' has no effect on %s", device.type)
            yield
            return
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
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
        f"convert the model instead (e.g. model.to({wanted}))"
    )


def _resolve_backend(attention_backend: AttentionBackend, device: torch.device) -> str:
    if attention_backend not in ("auto", "torch", "triton"):
        raise ValueError(f"attention_backend: expected 'auto', 'torch' or 'triton', received {attention_backend!r}")
    if attention_backend != "auto":
        return attention_backend
    return "triton" if device.type == "cuda" and importlib.util.find_spec("triton") is not None else "torch"


def _choose_engine(model: Any, method: Method) -> Callable[..., torch.Tensor]:
    if method not in ("auto", "naive", "trie"):
        raise ValueError(f"method: expected 'auto', 'naive' or 'trie', received {method!r}")
    if method == "naive":
        return evaluate_naive
    from sftint_fast.engine.adapters import get_adapter  # imported on use: the trie pulls in more modules
    from sftint_fast.engine.trie import evaluate_trie

    if get_adapter(model) is None:
        name = type(model).__name__
        if method == "trie":
            raise ValueError(f"method='trie': no trie adapter for {name}; use method='naive'")
        warnings.warn(f"no trie adapter for {name}; falling back to the naive engine (slower, same values)", stacklevel=3)
        return evaluate_naive
    return evaluate_trie


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
) -> torch.Tensor:
    """The game's values ``v`` on the model's device, float32.

    Args:
        subsets: None → all ``2^n`` variants, result ``(2^n,)`` indexed by bitmask (bit ``i`` = player ``i``
            present); else a 1-D integer tensor of bitmasks, result ``(len(subsets),)`` in that order.
        batch_size: variants (naive) or nodes (trie) per forward; None = from a memory estimate.
        max_memory: memory budget in bytes; None = a safe fraction of free memory.
        compute_dtype: see the module docstring.

    >>> v = evaluate(model, game)          # doctest: +SKIP
    >>> v[-1] - v[0]                       # v(N) - v(∅)  # doctest: +SKIP
    """
    if not isinstance(game, Game):
        raise TypeError(f"game: expected a sftint_fast.Game, received {type(game).__name__}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size: expected a positive int or None, received {batch_size!r}")
    if max_memory is not None and (not isinstance(max_memory, (int, float)) or max_memory <= 0):
        raise ValueError(f"max_memory: expected a positive number of bytes or None, received {max_memory!r}")
    device = model_device(model)
    subsets = _validate_subsets(subsets, game.num_players, device, None if max_memory is None else int(max_memory))
    engine = _choose_engine(model, method)
    if engine is not evaluate_naive and _uses_autocast(model, compute_dtype):
        # The trie engine keeps its KV stores in the model's dtype, so it cannot run under autocast.
        if method == "trie":
            raise ValueError("compute_dtype='bfloat16' on a float32 model runs under torch.autocast, which the trie "
                             "engine does not support; convert the model (model.to(torch.bfloat16)) or use method='naive'")
        warnings.warn("compute_dtype='bfloat16' on a float32 model runs under torch.autocast, which the trie engine "
                      "does not support; using the naive engine", stacklevel=2)
        engine = evaluate_naive
    kwargs: dict[str, Any] = {"batch_size": batch_size, "progress": progress,
                              "max_memory": None if max_memory is None else int(max_memory)}
    if engine is not evaluate_naive:
        kwargs["attention_backend"] = _resolve_backend(attention_backend, device)
    else:
        _resolve_backend(attention_backend, device)
    if subsets.numel() == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _compute_context(model, compute_dtype, device):
            values = engine(model, game, subsets, **kwargs)
    finally:
        model.train(was_training)
    return values.to(torch.float32)


def evaluate_many(model: Any, games: Sequence[Game], *, progress: bool = True, out_dir: str | None = None,
                  **kwargs: Any) -> list[torch.Tensor]:
    """``evaluate`` on each game in turn → one ``v`` per game; one progress bar over the games.

    Under ``torch.distributed`` (e.g. ``torchrun``) or with ``out_dir`` (resumable per-game shard files) this is
    :func:`sftint_fast.distributed.evaluate_sharded`: games split across ranks, the full list (CPU tensors)
    returned on every rank.
    """
    from sftint_fast import distributed

    if out_dir is not None or distributed.is_distributed():
        return distributed.evaluate_sharded(model, games, out_dir=out_dir, progress=progress, **kwargs)
    return [evaluate(model, game, progress=False, **kwargs)
            for game in tqdm(list(games), desc="games", unit="game", disable=not progress)]
