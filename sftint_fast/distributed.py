"""Many games across ``torch.distributed`` ranks (as launched by ``torchrun``), with resumable shards.

The work is embarrassingly parallel over games (prompts) and checkpoints, so there is no scheduler: every
rank computes the same deterministic assignment of games to ranks (greedy longest-processing-time on a cost
per game, :func:`assign_shards`), evaluates its own games, saves each finished ``v`` atomically as
``<out_dir>/shard-<key>.safetensors`` and all ranks exchange their results (``all_gather_object``). A
restarted job finds the files whose key matches and skips those games, whatever the new world size.

The key (:func:`game_key`) hashes everything that decides the values: the game's ids, spans, target,
baseline, prompt length, masking and value function (a callable by its module, qualified name and code; a
callable object or bound method also by its object's attributes), the evaluation options that change values
(``method``, ``subsets``, ``compute_dtype``, ``attention_backend``; not ``batch_size``, ``max_memory`` or
``progress``) and a fingerprint of the model's weights
(:func:`model_fingerprint`: the config, every parameter's and buffer's name, shape, dtype and the bytes of up to
64 evenly spaced elements). Pass ``model_key=`` to name the weights yourself (e.g. a checkpoint path).

Backends: gloo on CPU, NCCL on GPU (call ``torch.cuda.set_device(local_rank)`` first, as usual under
``torchrun``; :func:`init_from_env` does both). Without an initialised process group every function here
behaves as a world of one rank (under ``torchrun``'s environment, evaluating logs a warning that says so).

Under DDP (e.g. a ``Trainer`` callback) use :func:`shard_indices` to pick this rank's probes and
:func:`gather_metrics` to merge the per-probe results on every rank; log on :func:`is_main_process` only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import types
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence, TypeVar

import torch
from tqdm.auto import tqdm

from sftint_fast.game import Game

logger = logging.getLogger(__name__)

T = TypeVar("T")
EvaluateFn = Callable[..., torch.Tensor]

#: Options of ``sf.evaluate`` that change the values, hence part of a shard's key.
VALUE_OPTIONS = ("method", "subsets", "compute_dtype", "attention_backend")
_FINGERPRINT_ELEMENTS = 64


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the rank that logs and writes reports."""
    return rank() == 0


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (a picklable object; ``value`` itself without a process group)."""
    if not is_distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


_warned_without_group = False


def _warn_without_group() -> None:
    """Logs once per process when ``torchrun``'s environment names several ranks (``WORLD_SIZE`` > 1, or a ``RANK``
    > 0) but no process group is initialised: every such process then works as a world of one rank (all the games,
    every file), not on its share."""
    global _warned_without_group
    if _warned_without_group or is_distributed():
        return
    world, this = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    if world.strip() not in ("", "0", "1") or this.strip() not in ("", "0"):
        _warned_without_group = True
        logger.warning("WORLD_SIZE=%s, RANK=%s but no torch.distributed process group: this process evaluates every "
                       "game it is given, as do the others; call sftint_fast.distributed.init_from_env() first to "
                       "split them across the ranks", world, this)


def _env_int(name: str, default: int) -> int:
    """``torchrun``'s integer environment variable ``name`` (``default`` when unset or empty), or a clear error."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a non-negative integer (torchrun sets it), "
                         f"got {text!r}") from None
    if value < 0:
        raise ValueError(f"environment variable {name} must be a non-negative integer (torchrun sets it), got {value}")
    return value


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment, if it describes several ranks.

    ``backend`` None = ``"nccl"`` when CUDA is available (after ``torch.cuda.set_device(LOCAL_RANK)``), else
    ``"gloo"``. Returns True when a process group is (now) initialised; False for a single process.
    """
    if is_distributed():
        return True
    if _env_int("WORLD_SIZE", 1) <= 1 or not torch.distributed.is_available():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    torch.distributed.init_process_group(backend)
    logger.info("initialised %s process group: rank %d of %d", backend, rank(), world_size())
    return True


def shutdown(*, synchronize: bool = True) -> None:
    """Destroy the default process group, if any: the end of a ``torchrun`` job.

    ``synchronize`` (the normal exit) first waits at a barrier so that no rank tears its connections down
    while a peer still finishes (gloo on CPU can abort a rank whose peer exited first: "terminate called
    without an active exception"), and collects garbage so that objects holding the group (a ``Trainer``'s
    DDP wrapper) release it while the interpreter is fully alive. Pass ``synchronize=False`` on an error
    path: a barrier there would wait for ranks that are not coming.
    """
    if not is_distributed():
        return
    if synchronize:
        import gc

        torch.distributed.barrier()
        gc.collect()
    torch.distributed.destroy_process_group()


def game_cost(game: Game, *, method: str = "auto", subsets: torch.Tensor | None = None) -> int:
    """Tokens the engine computes for the variants evaluated (``subsets``, None = all ``2^n``): the trie's count
    (``plan_trie``'s ``trie_tokens``; for all ``2^n`` from the segment lengths alone, so that a game too large to
    evaluate whole is refused by the engine, not planned here), or ``len(input_ids)`` per variant for the naive
    engine or when the planner is not installed."""
    variants = 1 << game.num_players if subsets is None else int(torch.as_tensor(subsets).numel())
    naive = int(game.input_ids.numel()) * variants
    if method == "naive":
        return naive
    try:
        from sftint_fast.engine.plan import _segments, plan_trie
    except ImportError:
        return naive
    if subsets is None:
        level_lens = _segments(int(game.input_ids.numel()), tuple(game.player_spans))[0]
        return sum(length << level for level, length in enumerate(level_lens))
    return int(plan_trie(game, subsets=torch.as_tensor(subsets).to("cpu", torch.int64).reshape(-1)).trie_tokens)


def assign_shards(costs: Sequence[float], num_ranks: int) -> list[list[int]]:
    """Deterministic balanced assignment of items to ranks: items by decreasing cost (ties: lower index first)
    go to the least-loaded rank (ties: the rank with fewer items, then the lower rank, so zero-cost items spread
    too). Returns, per rank, its item indices in increasing order
    (a rank may get none). Costs must be finite and >= 0."""
    if not isinstance(num_ranks, int) or isinstance(num_ranks, bool) or num_ranks < 1:
        raise ValueError(f"num_ranks: expected a positive int, received {num_ranks!r}")
    weights = [float(c) for c in costs]
    for i, weight in enumerate(weights):
        # a NaN never compares smaller, so one would pile every later item onto the same rank
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"costs[{i}]: expected a finite number >= 0, received {weight!r}")
    loads = [0.0] * num_ranks
    shards: list[list[int]] = [[] for _ in range(num_ranks)]
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        target = min(range(num_ranks), key=lambda r: (loads[r], len(shards[r]), r))
        loads[target] += weights[index]
        shards[target].append(index)
    return [sorted(shard) for shard in shards]


def shard_indices(costs: Sequence[float] | int) -> list[int]:
    """This rank's item indices: ``costs`` per item (or a number of items, all of equal cost), split by
    :func:`assign_shards` over the current world."""
    if isinstance(costs, bool):
        raise TypeError(f"costs: expected a number of items >= 0 or one cost per item, received {costs!r}")
    if isinstance(costs, int):
        if costs < 0:
            raise ValueError(f"costs: expected a number of items >= 0 or one cost per item, received {costs!r}")
        costs = [1.0] * costs
    return assign_shards(costs, world_size())[rank()]


def shard_probes(probes: Sequence[T], *, costs: Sequence[float] | None = None) -> list[tuple[int, T]]:
    """This rank's ``(index, probe)`` pairs (all probes without a process group); ``costs`` default: equal."""
    return [(i, probes[i]) for i in shard_indices(list(costs) if costs is not None else len(probes))]


def gather_metrics(local: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
    """Merge every rank's ``{key: value}`` into one dict, returned on every rank (``all_gather_object``;
    values are pickled, so move tensors to CPU first). Keys must be distinct across ranks (ValueError)."""
    if not is_distributed():
        return dict(local)
    parts: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(parts, dict(local))
    merged: dict[Hashable, Any] = {}
    for part in parts:
        clash = merged.keys() & part.keys()
        if clash:
            raise ValueError(f"gather_metrics: expected distinct keys across ranks, received duplicates {sorted(map(str, clash))[:5]}")
        merged.update(part)
    return merged


def _tensor_bytes(x: torch.Tensor) -> bytes:
    flat = x.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


#: Config entries that do not change a forward's values (or change during training: gradient checkpointing turns
#: ``use_cache`` off), left out of :func:`model_fingerprint`.
_FINGERPRINT_CONFIG_SKIP = frozenset({
    "use_cache", "_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "architectures", "torch_dtype", "dtype",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "_attn_implementation_internal",
    "tokenizer_class", "use_return_dict"})


def _config_entries(config: Any, entries: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """``entries`` (``config.to_dict()``) less :data:`_FINGERPRINT_CONFIG_SKIP`, in its sub-configs too (a multimodal
    config's ``text_config``: its own ``use_cache``, ``_name_or_path``, ``dtype``). Only the entries that are configs
    on ``config`` are recursed into: other dicts (``rope_parameters``, ``quantization_config``) are kept whole."""
    kept = {}
    for key, value in entries.items():
        if key in _FINGERPRINT_CONFIG_SKIP:
            continue
        sub = getattr(config, key, None) if isinstance(value, dict) and depth < 8 else None
        if sub is not None and sub is not config and callable(getattr(sub, "to_dict", None)):
            value = _config_entries(sub, value, depth + 1)
        kept[key] = value
    return kept


def _config_bytes(model: torch.nn.Module) -> bytes:
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return b""
    try:
        return json.dumps(_config_entries(config, to_dict()), sort_keys=True, default=repr).encode()
    except Exception:  # noqa: BLE001 -- an odd config: the weights and buffers still key the model
        return b"?"


def _runtime_buffers(model: torch.nn.Module) -> set[str]:
    """Names of the buffers a forward rewrites: a dynamic or LongRoPE rotary embedding's ``inv_freq`` (per layer type:
    ``<type>_inv_freq``), recomputed for the longest sequence seen (HF ``dynamic_rope_update``). Its value follows
    from the config and ``original_inv_freq``, which stay in :func:`model_fingerprint`."""
    names = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        rope = getattr(module, "rope_type", None)
        types = {"": rope} if isinstance(rope, str) else rope if isinstance(rope, dict) else {}
        for layer_type, kind in types.items():
            if isinstance(kind, str) and ("dynamic" in kind or kind == "longrope"):
                buffer = f"{layer_type}_inv_freq" if layer_type else "inv_freq"
                names.add(f"{prefix}.{buffer}" if prefix else buffer)
    return names


def _fingerprint_buffers(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``model.named_buffers()`` less :func:`_runtime_buffers`. A buffer shared under two names is listed once,
    under its first name that is not a runtime one: a dynamic RoPE's reset makes ``inv_freq`` the
    ``original_inv_freq`` tensor, which ``named_buffers`` would then list under ``inv_freq`` alone."""
    runtime = _runtime_buffers(model)
    seen: set[int] = set()
    kept = []
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if name in runtime or id(buffer) in seen:
            continue
        seen.add(id(buffer))
        kept.append((name, buffer))
    return kept


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's class, config (a Hugging Face model's ``config.to_dict()``, less entries that do
    not change values such as ``use_cache``, in its sub-configs too), weights and buffers (names, shapes, dtypes, up
    to 64 evenly spaced elements of each parameter and buffer, e.g. RoPE's ``inv_freq``; not the ``inv_freq`` a
    dynamic RoPE rewrites in a long forward): cheap, exact on the sampled bytes, and different after any real
    training step or with another config (``rms_norm_eps``, ``rope_scaling``, ...)."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    digest.update(_config_bytes(model))
    tensors = [("param", *item) for item in model.named_parameters()]
    tensors += [("buffer", *item) for item in _fingerprint_buffers(model)]
    for kind, name, tensor in tensors:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _FINGERPRINT_ELEMENTS)
        digest.update(f"{kind}|{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(_tensor_bytes(flat[::step][:_FINGERPRINT_ELEMENTS]))
    return digest.hexdigest()[:16]


def _value_name(value: Any, depth: int = 0) -> str:
    """The value function's name, and for a ``functools.partial`` or a closure what it was made with (its arguments,
    defaults, closure cells): two partials of one function, or two closures of one factory, get other names."""
    if isinstance(value, str):
        return value
    name = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__qualname__)}"
    state = _value_state(value, depth + 1)
    return name if state is None else f"{name}#{hashlib.sha256(state).hexdigest()[:16]}"


def _value_state(obj: Any, depth: int) -> bytes | None:
    """Bytes that tell apart what a value function was made with and its code; None where there is nothing (a builtin:
    its name alone). A callable object and a bound method by their object's attributes too (two instances of one class
    made with other arguments share the name and the code)."""
    import functools

    if depth > 4:
        return b"..."
    if isinstance(obj, functools.partial):
        parts = [_value_name(obj.func, depth + 1).encode()]
        parts += [_value_part(a, depth) for a in obj.args]
        parts += [k.encode() + b"=" + _value_part(v, depth) for k, v in sorted(obj.keywords.items())]
        return b"partial(" + b",".join(parts) + b")"
    if isinstance(obj, types.MethodType):
        return b"method(" + _object_part(obj.__self__, depth) + b";" + (_value_state(obj.__func__, depth) or b"") + b")"
    call = getattr(type(obj), "__call__", None)
    if isinstance(call, types.FunctionType) and not isinstance(obj, (types.FunctionType, type)):
        return b"object(" + _code_part(call.__code__) + b";" + _object_part(obj, depth) + b")"
    cells = getattr(obj, "__closure__", None) or ()
    defaults = (getattr(obj, "__defaults__", None) or ()) + tuple(sorted((getattr(obj, "__kwdefaults__", None) or {})
                                                                         .items()))
    code = getattr(obj, "__code__", None)
    if not cells and not defaults and not isinstance(code, types.CodeType):
        return None
    # the code too: two lambdas of one module share the name '<module>.<lambda>' (and a function edited between a
    # run and its resume keeps its name)
    parts = [_code_part(code)] if isinstance(code, types.CodeType) else []
    for cell in cells:
        try:
            parts.append(_value_part(cell.cell_contents, depth))
        except ValueError:  # an empty cell
            parts.append(b"<empty>")
    return b"closure(" + b",".join(parts) + b";" + b",".join(_value_part(d, depth) for d in defaults) + b")"


def _code_part(code: types.CodeType) -> bytes:
    """The bytecode, constants (nested code objects by their own part, sets sorted: no address or hash seed enters)
    and names of ``code``: the same in every process for the same source and Python."""
    consts = [_code_part(c) if isinstance(c, types.CodeType) else
              _value_part(sorted(c, key=repr) if isinstance(c, frozenset) else c, 0) for c in code.co_consts]
    return b"code(" + code.co_code + b";" + b",".join(consts) + b";" + ",".join(code.co_names).encode() + b")"


def _object_part(x: Any, depth: int) -> bytes:
    """An object's class and attributes (``vars``; objects among them by their type, as in :func:`_value_part`); a
    module by :func:`model_fingerprint` (sampled weights, not all of them)."""
    name = f"{type(x).__module__}.{type(x).__qualname__}".encode()
    if isinstance(x, torch.nn.Module):
        return name + b":" + model_fingerprint(x).encode()
    state = getattr(x, "__dict__", None)
    return name + (_value_part(dict(state), depth) if isinstance(state, dict) else b"")


def _value_part(x: Any, depth: int) -> bytes:
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)}{x.dtype}:".encode() + hashlib.sha256(_tensor_bytes(x)).digest()
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes)):
        return repr(x).encode()
    if isinstance(x, (tuple, list)):
        return b"[" + b",".join(_value_part(y, depth + 1) for y in x) + b"]"
    if isinstance(x, dict):
        return b"{" + b",".join(repr(k).encode() + b":" + _value_part(v, depth + 1) for k, v in sorted(
            x.items(), key=lambda kv: repr(kv[0]))) + b"}"
    if callable(x):
        return _value_name(x, depth + 1).encode()
    # other objects: their type only (a repr may hold a memory address, which differs between processes)
    return f"<{type(x).__module__}.{type(x).__qualname__}>".encode()


def game_key(game: Game, *, model_key: str, options: Mapping[str, Any] | None = None) -> str:
    """Stable hex key of (game, model, value-changing options); equal inputs give equal keys in any process."""
    digest = hashlib.sha256()
    digest.update(json.dumps({
        "spans": [list(s) for s in game.player_spans], "prompt_length": game.prompt_length,
        "masking": game.masking, "value": _value_name(game.value), "model": model_key,
        "baseline": [str(game.baseline.dtype), list(game.baseline.shape)],
    }, sort_keys=True).encode())
    for tensor in (game.input_ids, game.target, game.baseline):
        digest.update(_tensor_bytes(tensor))
    _hash_options(digest, options or {})
    return digest.hexdigest()[:32]


def _hash_options(digest: Any, options: Mapping[str, Any]) -> None:
    for name in sorted(options):
        value = options[name]
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            # integer tensors (subsets) as the int64 the engine evaluates: their bytes alone would give an int32
            # [S, 0] and an int64 [S] one key; other dtypes with their dtype and shape
            integer = not (value.is_floating_point() or value.is_complex())
            digest.update(b"" if integer else f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(_tensor_bytes(value.to(torch.int64) if integer else value))
        else:
            digest.update(repr(value).encode())


def _check_same_work(games: Sequence[Game], costs: Sequence[float], model: Any, model_key: str | None,
                     options: Mapping[str, Any]) -> None:
    """Every rank splits the games by the same assignment and takes the others' values for its own games: ranks
    with other games, weights, options or costs would mix their results silently. Collective; ValueError on every
    rank, naming what differs."""
    if model_key is None and isinstance(model, torch.nn.Module):
        try:
            model_key = model_fingerprint(model)
        except (RuntimeError, NotImplementedError):  # weights that cannot be read here (offloaded to 'meta')
            model_key = type(model).__qualname__
    games_digest, options_digest = hashlib.sha256(), hashlib.sha256()
    for game in games:
        games_digest.update(game_key(game, model_key="").encode())
    _hash_options(options_digest, options)
    summary = {"number of games": len(games), "games": games_digest.hexdigest()[:12], "model": model_key,
               "options": options_digest.hexdigest()[:12],
               "costs": hashlib.sha256(repr([float(c) for c in costs]).encode()).hexdigest()[:12]}
    parts: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(parts, summary)
    differ = [name for name in summary if len({repr(part[name]) for part in parts}) > 1]
    if differ:
        received = "; ".join(f"rank {r}: " + ", ".join(f"{name} {part[name]}" for name in differ)
                             for r, part in enumerate(parts))
        raise ValueError(f"evaluate_sharded: expected the same {' and the same '.join(differ)} on every rank (each "
                         f"rank evaluates its share of the games and takes the others' values), received {received}")


def shard_path(out_dir: str | os.PathLike[str], key: str) -> Path:
    """Where the finished ``v`` of the game with ``key`` is saved."""
    return Path(out_dir) / f"shard-{key}.safetensors"


def save_shard(path: Path, v: torch.Tensor, metadata: Mapping[str, str]) -> None:
    """Write ``v`` to ``path`` atomically (temp file in the same folder, then ``os.replace``)."""
    from safetensors.torch import save_file

    from sftint_fast._files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"v": v.detach().to("cpu").contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata)))


def load_shard(path: Path) -> torch.Tensor:
    """The ``v`` saved by :func:`save_shard` (ValueError naming the file where it cannot be read)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))["v"]
    except Exception as err:  # safetensors' errors name neither the file nor what to do
        raise ValueError(f"{path}: expected a shard saved by evaluate_sharded (a safetensors file holding 'v'), "
                         f"received one that cannot be read ({type(err).__name__}: {err})") from err


def evaluate_sharded(
    model: Any,
    games: Sequence[Game],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    model_key: str | None = None,
    costs: Sequence[float] | None = None,
    progress: bool = True,
    evaluate_fn: EvaluateFn | None = None,
    group_size: int | None = None,
    **evaluate_kwargs: Any,
) -> list[torch.Tensor]:
    """``v`` of every game, computed across the ranks of the process group (or here, without one).

    Each rank evaluates its share (:func:`assign_shards` on ``costs``, default :func:`game_cost`), skipping
    games whose shard file exists in ``out_dir`` (one that cannot be read is evaluated again, with a warning) and
    saving each new one as soon as it is done. The results
    are exchanged so that **every rank returns the full list, in the order of ``games``, as CPU float32
    tensors** ``(2^n,)`` (or ``(len(subsets),)``).

    Under a process group every rank must pass the same games, costs, value-changing options and weights (or
    ``model_key``): ValueError on every rank, before anything is evaluated, naming what differs. An error on one
    rank (a failed evaluation or shard write) is raised there and, as a RuntimeError naming that rank and its
    error, on the others (which keep the shards they finished).

    Args:
        out_dir: folder for ``shard-<key>.safetensors`` files (None = nothing saved, nothing resumed).
        model_key: names the weights in the keys (a string or a path; None = :func:`model_fingerprint` of ``model``).
        costs: one cost per game for the balancing (None = :func:`game_cost`).
        evaluate_fn: ``fn(model, game, **evaluate_kwargs) -> v``, called per game; None = this rank's pending
            games grouped by layout (:func:`sftint_fast.engine.group_games`, ``group_size``) and each group
            evaluated at once (:func:`sftint_fast.engine.evaluate_games`), its files written when it is done.
        **evaluate_kwargs: passed to the evaluation (``method``, ``subsets``, ``batch_size``, …); the
            per-game progress bar is off, one bar counts this rank's games.
    """

    games = list(games)
    for i, game in enumerate(games):
        if not isinstance(game, Game):
            raise TypeError(f"games[{i}]: expected a sftint_fast.Game, received {type(game).__name__}")
    _warn_without_group()
    if isinstance(model_key, os.PathLike):  # a checkpoint path: keyed as its string
        model_key = os.fspath(model_key)
    if model_key is not None and not isinstance(model_key, str):
        raise TypeError(f"model_key: expected a string or a path naming the weights (or None), received "
                        f"{type(model_key).__name__}")
    if costs is not None and len(costs) != len(games):
        raise ValueError(f"costs: expected one cost per game ({len(games)}), received {len(costs)}")
    if costs is None:
        costs = [game_cost(g, method=evaluate_kwargs.get("method", "auto"), subsets=evaluate_kwargs.get("subsets"))
                 for g in games]
    options = {name: evaluate_kwargs.get(name) for name in VALUE_OPTIONS}
    if out_dir is not None:
        model_key = model_key or model_fingerprint(model)
    if is_distributed():
        _check_same_work(games, costs, model, model_key, options)
    mine = assign_shards(costs, world_size())[rank()]
    keys: dict[int, str] = {}
    if out_dir is not None:
        from sftint_fast._files import remove_stale_temps

        keys = {i: game_key(games[i], model_key=model_key, options=options) for i in mine}
        # what a killed run left half-written: the temp files of this rank's own shards (no other rank writes them)
        names = {shard_path(out_dir, key).name for key in keys.values()}
        stale = remove_stale_temps(out_dir, lambda name: name in names)
        if stale:
            logger.info("%s: removed %d temp file(s) of an interrupted save", out_dir, len(stale))
    local: dict[int, torch.Tensor] = {}
    pending: list[int] = []

    def finish(i: int, v: torch.Tensor) -> None:
        v = v.detach().to("cpu", torch.float32)
        if v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()  # a row of its group's (G, 2^n) output: pickled (gathered) alone, not with the whole group
        if out_dir is not None:
            save_shard(shard_path(out_dir, keys[i]), v, {"key": keys[i], "words": json.dumps(list(games[i].words))})
        local[i] = v

    # the rank names this process's bar and messages under a process group only (alone, "rank 0" says nothing)
    who = f"rank {rank()}" if is_distributed() else ""

    def evaluate_mine() -> None:
        for i in mine:
            path = shard_path(out_dir, keys[i]) if out_dir is not None else None
            if path is not None and path.exists():
                try:
                    local[i] = load_shard(path)
                    continue
                except ValueError as err:
                    # a file cut short outside our atomic writes (a copy, the file system) is no result: redone
                    logger.warning("%s%s; its game is evaluated again", who and f"{who}: ", err)
            pending.append(i)
        if len(pending) < len(mine):
            logger.info("%s%d of %d games resumed from %s", who and f"{who}: ", len(mine) - len(pending), len(mine),
                        out_dir)
        with tqdm(total=len(mine), initial=len(mine) - len(pending), desc=f"games ({who})" if who else "games",
                  unit="game", disable=not progress) as bar:
            if evaluate_fn is not None:
                for i in pending:
                    finish(i, evaluate_fn(model, games[i], progress=False, **evaluate_kwargs))
                    bar.update(1)
            elif pending:
                from sftint_fast import engine

                grouping = {name: evaluate_kwargs.get(name) for name in
                            ("subsets", "batch_size", "max_memory", "compute_dtype")}
                grouping["attention_backend"] = evaluate_kwargs.get("attention_backend", "auto")
                groups = engine.group_games(model, [games[i] for i in pending],
                                            method=evaluate_kwargs.get("method", "auto"), group_size=group_size,
                                            **grouping)
                for group in groups:
                    members = [pending[j] for j in group]
                    values = engine.evaluate_games(model, [games[i] for i in members], progress=False,
                                                   **evaluate_kwargs)
                    for i, v in zip(members, values):
                        finish(i, v)
                    bar.update(len(members))

    failure: Exception | None = None
    try:
        evaluate_mine()
    except Exception as err:
        if not is_distributed():
            raise
        failure = err  # the other ranks wait for this one's results: tell them why none come
    error = None if failure is None else f"{type(failure).__name__}: {failure}"
    parts = gather_metrics({rank(): (error, local if failure is None else {})})
    if failure is not None:
        raise failure
    failed = {r: error for r, (error, _) in parts.items() if error is not None}
    if failed:
        raise RuntimeError("evaluate_sharded: " + "; ".join(f"rank {r} failed: {error}" for r, error in failed.items())
                           + (f" (this rank's finished games are saved in {out_dir})" if out_dir is not None else ""))
    gathered = {i: v for _, values in parts.values() for i, v in values.items()}
    return [gathered[i] for i in range(len(games))]
