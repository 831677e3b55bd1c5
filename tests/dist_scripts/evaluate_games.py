"""Run ``evaluate_sharded`` on seeded tiny games; launched by tests/test_distributed.py (plain or torchrun).

Rank 0 saves every game's ``v`` to ``--out`` (with ``--every-rank`` each rank ``r > 0`` to ``--out.rank<r>``);
each rank appends the ids of the games it evaluated to ``<count-dir>/rank<r>.txt``; ``--crash-after k`` makes rank 0
exit hard before its (k+1)-th evaluation.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import tiny_model  # noqa: E402

import sftint_fast as sf  # noqa: E402
from sftint_fast import distributed  # noqa: E402


def make_games(count: int, *, seed: int = 0, hidden: int = 32, vocab: int = 128) -> list[sf.Game]:
    """Seeded games of 2..5 players, prompts of 6..13 tokens, 1 or 2 target tokens."""
    gen = torch.Generator().manual_seed(seed)
    games = []
    for g in range(count):
        n = 2 + g % 4
        m = 1 + g % 2
        prompt = n * 2 + 1 + int(torch.randint(0, 4, (1,), generator=gen))
        target = torch.randint(3, vocab, (m,), generator=gen)
        ids = torch.cat([torch.randint(3, vocab, (prompt,), generator=gen), target[:-1]])
        spans = tuple((1 + 2 * i, 3 + 2 * i if i % 2 else 2 + 2 * i) for i in range(n))  # odd players: 2 tokens
        games.append(sf.Game(input_ids=ids, player_spans=spans, words=tuple(f"g{g}w{i}" for i in range(n)),
                             target=target, baseline=torch.randn(hidden, generator=gen), prompt_length=prompt))
    return games


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-games", type=int, default=10)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard-dir", default=None)
    parser.add_argument("--count-dir", required=True)
    parser.add_argument("--crash-after", type=int, default=-1)
    parser.add_argument("--many", action="store_true", help="go through sf.evaluate_many instead")
    parser.add_argument("--every-rank", action="store_true", help="ranks > 0 save their values too (--out.rank<r>)")
    parser.add_argument("--backend", default="gloo", help="process group backend (nccl: model on this rank's GPU)")
    args = parser.parse_args()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl")
    distributed.init_from_env(args.backend)
    rank = distributed.rank()
    model = tiny_model("llama").to(device)
    games = make_games(args.num_games)
    counter = Path(args.count_dir) / f"rank{rank}.txt"
    counter.parent.mkdir(parents=True, exist_ok=True)
    done = []

    def counting_evaluate(model, game, **kwargs):
        if len(done) == args.crash_after and rank == 0:
            os._exit(3)
        done.append(game.words[0].split("w")[0])
        with counter.open("a") as f:
            f.write(done[-1] + "\n")
        return sf.evaluate(model, game, **kwargs)

    if args.many:  # counted per group the engine evaluates
        from sftint_fast import engine

        evaluate_games = engine.evaluate_games

        def counting_evaluate_games(model, group, **kwargs):
            with counter.open("a") as f:
                f.writelines(game.words[0].split("w")[0] + "\n" for game in group)
            return evaluate_games(model, group, **kwargs)

        engine.evaluate_games = counting_evaluate_games
        values = sf.evaluate_many(model, games, out_dir=args.shard_dir, progress=False, method="naive")
    else:
        values = distributed.evaluate_sharded(model, games, out_dir=args.shard_dir, progress=False,
                                              evaluate_fn=counting_evaluate, method="naive")
    if len(values) != len(games) or any(v.shape != (1 << g.num_players,) for v, g in zip(values, games)):
        raise SystemExit(f"rank {rank}: wrong result shapes")
    if rank == 0 or args.every_rank:
        from safetensors.torch import save_file

        save_file({f"v{i}": v for i, v in enumerate(values)}, args.out + ("" if rank == 0 else f".rank{rank}"))
    distributed.shutdown()


if __name__ == "__main__":
    main()
