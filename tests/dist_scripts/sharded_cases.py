"""Two-rank gloo cases of ``evaluate_sharded`` with a stand-in evaluation, run by tests/test_distributed.py through
``torch.multiprocessing`` (spawn): every rank reports what it evaluated and what it returned or raised."""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evaluate_games import make_games


def fake_value(game) -> torch.Tensor:
    return game.input_ids.float().sum() * torch.arange(1 << game.num_players, dtype=torch.float32)


def run_case(rank: int, world: int, init_file: str, case: str, out_dir: str, queue) -> None:
    """One rank of ``case``; puts ``(rank, evaluated game ids, result shapes or None, error or None)`` on ``queue``."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    from sftint_fast import distributed as D

    evaluated: list[int] = []
    games = make_games(5)
    options: dict = {"method": "naive"}
    model_key = "m"

    def evaluate(model, game, *, progress, **kwargs):
        if case == "write-fails" and rank == 1:
            raise OSError(f"{out_dir}: disk full")
        evaluated.append(int(game.words[0].split("w")[0][1:]))
        return fake_value(game)

    if case == "other-game":
        games[2] = make_games(5, seed=rank)[2]
    elif case == "fewer-games":
        games = games[:4 + rank]
    elif case == "other-model":
        model_key = f"m{rank}"
    elif case == "other-options":
        options = {"method": ["naive", "trie"][rank]}
    elif case == "other-costs":
        options["costs"] = [1.0, 1.0, 1.0, 1.0, 5.0 * rank]
    elif case == "corrupt-shard" and rank == 1:  # a damaged file of one of rank 1's games
        costs = [D.game_cost(g, method="naive") for g in games]
        first = D.assign_shards(costs, world)[rank][0]
        options_key = {name: options.get(name) for name in D.VALUE_OPTIONS}
        path = D.shard_path(out_dir, D.game_key(games[first], model_key=model_key, options=options_key))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not a safetensors file")
    elif case.startswith("games-"):
        games = games[:int(case.split("-")[1])]
    try:
        values = D.evaluate_sharded(None, games, out_dir=out_dir, model_key=model_key, evaluate_fn=evaluate,
                                    progress=False, **options)
        queue.put((rank, evaluated, [v.tolist() for v in values], None))
    except Exception as err:  # noqa: BLE001 - reported to the test
        queue.put((rank, evaluated, None, f"{type(err).__name__}: {err}"))
    finally:
        torch.distributed.destroy_process_group()
