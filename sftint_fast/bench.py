"""Timing the engines on one game, in one run: what ``sftint bench`` prints.

:func:`compare_engines` evaluates the same variants with each requested engine (``"naive"``, ``"trie"``, or the trie
with a given attention backend: ``"trie-torch"``, ``"trie-triton"``), after one small warm-up call each, and reports
per engine the seconds (median of ``repeat`` runs), variants per second, the speedup over the first engine (naive
when it is asked for), the peak memory above the starting point and the largest ``|v - v_reference|``. With the
plan's ideal token ratio beside the measured one, a user sees on their own model and prompt what the trie buys and
how far it is from its ideal. Ratios are only meaningful within one run (one machine, one load).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time
from typing import Any, Callable, Sequence

import torch

#: Engines :func:`compare_engines` knows: name -> (method, attention_backend) of :func:`sftint_fast.evaluate`.
ENGINES = {
    "naive": ("naive", "auto"),
    "trie": ("trie", "auto"),
    "trie-torch": ("trie", "torch"),
    "trie-triton": ("trie", "triton"),
}


def measure(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, float, int]:
    """``(fn(), seconds, peak bytes above the start)``.

    CUDA: the device's peak allocated memory (``torch.cuda.max_memory_allocated``), the call synchronized before and
    after. CPU: the process's peak RSS, sampled every 5 ms on a side thread (allocations shorter than that may be
    missed).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return result, seconds, torch.cuda.max_memory_allocated(device) - start_bytes
    rss = _rss_reader()
    start_rss = rss()
    peak = [start_rss]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], rss())
    return result, seconds, peak[0] - start_rss


def _rss_reader() -> Callable[[], int]:
    """A function giving this process's resident bytes: psutil's, else Linux's ``/proc/self/statm`` (a machine
    installed with ``--no-deps`` may lack psutil); RuntimeError when neither is there."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        proc = psutil.Process()
        return lambda: int(proc.memory_info().rss)
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def statm() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    try:
        statm()
    except OSError:
        raise RuntimeError("cannot read this process's memory (no psutil, no /proc/self/statm): "
                           "install psutil") from None
    return statm


def sample_subsets(num_players: int, count: int, *, seed: int = 0) -> torch.Tensor:
    """``count`` distinct random bitmasks of ``num_players`` players, sorted (int64), reproducible from ``seed``."""
    total = 1 << num_players
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= total:
        raise ValueError(f"count: expected an int in [1, 2^{num_players} = {total}], received {count!r}")
    generator = torch.Generator().manual_seed(seed)
    if total <= 1 << 22:
        return torch.randperm(total, generator=generator)[:count].sort().values
    chosen = torch.zeros(0, dtype=torch.int64)
    while chosen.numel() < count:  # count << total here: a few rounds of draws, duplicates dropped
        draws = torch.randint(total, (2 * count,), generator=generator, dtype=torch.int64)
        chosen = torch.cat([chosen, draws]).unique()
    return chosen[torch.randperm(chosen.numel(), generator=generator)[:count]].sort().values


def _check_engines(engines: Sequence[str]) -> list[str]:
    if isinstance(engines, str) or not isinstance(engines, Sequence) or not engines:
        raise ValueError(f"engines: expected a non-empty list of names from {sorted(ENGINES)}, received {engines!r}")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"engines: expected names from {sorted(ENGINES)}, received {unknown}")
    if len(set(engines)) != len(engines):
        raise ValueError(f"engines: expected each engine once, received {list(engines)}")
    return list(engines)


def compare_engines(model: Any, game: Any, engines: Sequence[str] = ("naive", "trie"), *,
                    subsets: torch.Tensor | None = None, repeat: int = 1, warmup: bool = True,
                    compute_dtype: str | None = None, batch_size: int | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """Each engine on the same variants of ``game``, timed in one run; a JSON-ready dict.

    Args:
        model, game: as for :func:`sftint_fast.evaluate`.
        engines: names from :data:`ENGINES`; the first is the reference for speedups and ``max_abs_diff``
            (put ``"naive"`` first to compare against the exact reference).
        subsets: the variants (int64 bitmasks); None = all ``2^n``.
        repeat: timed runs per engine (the median is reported, every run is listed).
        warmup: one untimed call per engine on two variants first (allocator, thread pools, kernel compilation).
        compute_dtype, batch_size: passed to :func:`sftint_fast.evaluate`.

    Returns:
        ``{"game": ..., "plan": ..., "engines": {name: {...}}, "reference": name}``; per engine ``seconds``
        (median), ``runs``, ``variants_per_s``, ``speedup`` over the reference, ``peak_bytes``, ``max_abs_diff``
        and ``backend`` (the trie's attention path, resolved).
    """
    from sftint_fast.engine import _resolve_backend, _uses_autocast, _validate_subsets, evaluate
    from sftint_fast.engine.naive import model_device
    from sftint_fast.engine.plan import plan_trie
    from sftint_fast.game import Game

    if not isinstance(game, Game):
        raise TypeError(f"game: expected a sftint_fast.Game, received {type(game).__name__}")
    engines = _check_engines(engines)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat: expected an int >= 1, received {repeat!r}")
    device = model_device(model)
    if "trie-triton" in engines and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"engines: 'trie-triton' runs on a CUDA model (or under TRITON_INTERPRET=1), received a "
                         f"model on {device}; use 'trie' or 'trie-torch' there")
    tries = [e for e in engines if ENGINES[e][0] == "trie"]
    if tries and _uses_autocast(model, compute_dtype):  # refused by the trie: say so before timing anything
        raise ValueError(f"compute_dtype='bfloat16' on a float32 model runs under autocast, which only the naive "
                         f"engine supports; received engines {tries} (load the model in bfloat16 instead)")
    n = game.num_players
    if subsets is None:
        subsets = _validate_subsets(None, n, torch.device("cpu"), None)  # all 2^n, when they fit in memory
    elif not isinstance(subsets, torch.Tensor):
        raise TypeError(f"subsets: expected a 1-D int64 tensor of bitmasks, received {type(subsets).__name__}")
    else:  # shape, dtype and range checked before anything is timed; int64 for the plan
        subsets = _validate_subsets(subsets, n, subsets.device, None)
    num_variants = int(subsets.numel())
    results: dict[str, dict[str, Any]] = {}
    reference: torch.Tensor | None = None
    for name in engines:
        method, backend = ENGINES[name]
        kwargs = {"method": method, "attention_backend": backend, "compute_dtype": compute_dtype,
                  "batch_size": batch_size}
        if warmup:
            evaluate(model, game, subsets=subsets[:2], progress=False, **kwargs)
        runs, peaks, values = [], [], None
        for _ in range(repeat):
            values, seconds, peak = measure(lambda: evaluate(model, game, subsets=subsets, progress=progress,
                                                             **kwargs), device)
            runs.append(seconds)
            peaks.append(peak)
        values = values.float().cpu()
        if reference is None:
            reference = values
        seconds = statistics.median(runs)
        results[name] = {
            "method": method,
            "backend": (_resolve_backend(backend, device, dtype=model.get_input_embeddings().weight.dtype)
                        if method == "trie" else None),
            "seconds": seconds, "runs": runs, "variants_per_s": num_variants / seconds,
            "peak_bytes": max(peaks), "max_abs_diff": float((values - reference).abs().max()) if num_variants else 0.0,
        }
    first = results[engines[0]]["seconds"]
    for entry in results.values():
        entry["speedup"] = first / entry["seconds"]
    plan = plan_trie(game, subsets=subsets.cpu())  # token counts only: the engines size their memory themselves
    return {
        "device": str(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "compute_dtype": compute_dtype, "threads": torch.get_num_threads(), "repeat": repeat,
        "game": {"num_players": n, "seq_len": int(game.input_ids.shape[-1]), "variants": num_variants,
                 "words": list(getattr(game, "words", ()) or ()), "masking": getattr(game, "masking", "embedding")},
        "plan": {"trie_tokens": plan.trie_tokens, "naive_tokens": plan.naive_tokens,
                 "ideal_ratio": plan.ideal_ratio},
        "reference": engines[0], "engines": results,
    }


def to_json(report: dict[str, Any]) -> str:
    """A :func:`compare_engines` report as strict JSON: a non-finite number (``max_abs_diff`` of an engine whose
    values are NaN) as the string ``"nan"``, ``"inf"`` or ``"-inf"`` (as report.json writes a diverged held-out loss),
    never the bare token ``NaN`` that strict JSON readers refuse."""

    def strict(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return str(x) if isinstance(x, float) and not math.isfinite(x) else x

    return json.dumps(strict(report), indent=2, allow_nan=False)


def format_report(report: dict[str, Any]) -> str:
    """The table ``sftint bench`` prints for a :func:`compare_engines` report."""
    game, plan = report["game"], report["plan"]
    lines = [
        f"{report['device']}, {report['dtype']}"
        + (f" (compute {report['compute_dtype']})" if report.get("compute_dtype") else "")
        + f", {report['threads']} threads; n={game['num_players']} players, {game['seq_len']} tokens, "
        f"{game['variants']} variants, {report['repeat']} timed run(s) each",
        f"plan: trie {plan['trie_tokens']} tokens vs naive {plan['naive_tokens']}: ideal ratio "
        f"{plan['ideal_ratio']:.2f}x",
        f"{'engine':<12} {'seconds':>9} {'variants/s':>11} {'speedup':>8} {'of ideal':>9} {'peak MiB':>9} "
        f"{'max|dv|':>9}",
    ]
    naive_ref = report["reference"] == "naive"
    for name, e in report["engines"].items():
        of_ideal = (f"{e['speedup'] / plan['ideal_ratio']:.2f}" if naive_ref and e["method"] == "trie"
                    and plan["ideal_ratio"] > 0 else "")
        label = name if e["backend"] is None or name != "trie" else f"trie/{e['backend']}"
        # three significant digits under 0.1 s: a GPU engine's 0.42 ms is not "0.000"
        seconds = f"{e['seconds']:.3f}" if e["seconds"] >= 0.1 else f"{e['seconds']:.3g}"
        lines.append(f"{label:<12} {seconds:>9} {e['variants_per_s']:>11.1f} {e['speedup']:>7.2f}x "
                     f"{of_ideal:>9} {e['peak_bytes'] / 2**20:>9.1f} {e['max_abs_diff']:>9.2e}")
    lines.append(f"speedup and max|dv| are against {report['reference']!r}; peak memory is above the starting point"
                 + (" (RSS sampled every 5 ms: memory the allocator kept from an earlier engine is not counted "
                    "again)" if report["device"] == "cpu" else " (allocated)"))
    return "\n".join(lines)
