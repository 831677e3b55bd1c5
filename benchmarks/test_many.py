"""``sf.evaluate_many``: games of one layout grouped into shared trie passes vs evaluated one by one.

Same model, same games, one process, timed in the same run. The games have two layouts (players shifted by one
token in every other game), so grouping makes two groups. Quick: 8 games; ``--full``: 32 (the issue's size).
Trie at n = 4, 6, 8 (on CPU only tries much smaller than a pass are grouped, see ``GROUP_TOKENS``) and the naive
engine at n = 4 (the games' variants share batches).
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
from test_distributed import build

import sftint_fast as sf
from sftint_fast.engine.adapters.base import Adapter


def _seconds(fns, repeats: int = 3) -> list[float]:
    """Median seconds of each function, the runs interleaved (A B A B …) so that load drifts hit both alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _count_passes(monkeypatch) -> list[int]:
    calls: list[int] = []
    for cls in Adapter.__subclasses__():
        original = cls.run_layers
        monkeypatch.setattr(cls, "run_layers", lambda self, *a, _f=original, **k: calls.append(1) or _f(self, *a, **k))
    return calls


@pytest.mark.parametrize("method,num_players", [("trie", 4), ("trie", 6), ("trie", 8), ("naive", 4)])
def test_evaluate_many_grouped_vs_one_by_one(benchmark, full, env_info, method, num_players, monkeypatch):
    num_games = 32 if full else 8
    model, games = build(num_games, num_players=num_players)
    model = model.to("cuda" if torch.cuda.is_available() else "cpu")  # CPU here; the GPU in run_gpu.sh
    calls = _count_passes(monkeypatch) if method == "trie" else []
    grouped = sf.evaluate_many(model, games, method=method, progress=False)
    passes_grouped = len(calls)
    calls.clear()
    single = sf.evaluate_many(model, games, method=method, group_size=1, progress=False)
    passes_single = len(calls)
    max_abs_diff = max(float((a - b).abs().max()) for a, b in zip(grouped, single))

    grouped_s, single_s = _seconds([lambda: sf.evaluate_many(model, games, method=method, progress=False),
                                    lambda: sf.evaluate_many(model, games, method=method, group_size=1,
                                                             progress=False)])
    benchmark.pedantic(lambda: sf.evaluate_many(model, games, method=method, progress=False), rounds=1, iterations=1)
    groups = sf.group_games(model, games, method=method)
    info = dict(env_info, method=method, games=num_games, players=num_players, groups=[len(g) for g in groups],
                passes_grouped=passes_grouped, passes_one_by_one=passes_single,
                grouped_ms_per_game=grouped_s / num_games * 1e3, one_by_one_ms_per_game=single_s / num_games * 1e3,
                speedup_grouped=single_s / grouped_s, max_abs_diff=max_abs_diff)
    benchmark.extra_info.update(info)
    print({k: (round(x, 3) if isinstance(x, float) else x) for k, x in info.items()})
    assert max_abs_diff < 1e-4
    assert bool(torch.isfinite(torch.stack(grouped)).all())
