"""``sf.evaluate_many`` on CPU with 1 process (all cores as threads) vs 2 gloo processes (1 thread each).

The benchmark relaunches this file as a worker (plain ``python`` or ``torchrun``); the worker times only the
evaluation (after model load, a warm-up game and a barrier), so process start-up is reported apart.
Quick: 8 prompts; ``--full``: 32 prompts (the issue's size).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

N_PLAYERS = 8
PROMPT_TOKENS = 24


def build(num_games: int, seed: int = 0, num_players: int = N_PLAYERS):
    """A small seeded llama (hidden 128, 4 layers) and ``num_games`` games of ``num_players`` single-token players
    (shifted by one token in every other game: two layouts)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import sftint_fast as sf

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed)
    games = []
    for g in range(num_games):
        target = torch.randint(3, 512, (2,), generator=gen)
        ids = torch.cat([torch.randint(3, 512, (PROMPT_TOKENS,), generator=gen), target[:-1]])
        spans = tuple((2 + 2 * i + g % 2, 3 + 2 * i + g % 2) for i in range(num_players))
        games.append(sf.Game(input_ids=ids, player_spans=spans, words=tuple(f"w{i}" for i in range(num_players)),
                             target=target, baseline=torch.zeros(128), prompt_length=PROMPT_TOKENS))
    return model, games


def worker(num_games: int, out: str) -> None:
    import sftint_fast as sf
    from sftint_fast import distributed

    distributed.init_from_env("gloo")
    model, games = build(num_games)
    sf.evaluate(model, games[0], progress=False)  # warm-up
    if distributed.is_distributed():
        torch.distributed.barrier()
    start = time.perf_counter()
    values = sf.evaluate_many(model, games, progress=False)
    seconds = time.perf_counter() - start
    if distributed.is_main_process():
        from safetensors.torch import save_file

        save_file({f"v{i}": v.cpu() for i, v in enumerate(values)}, out + ".safetensors")
        from sftint_fast.engine import _choose_engine

        Path(out).write_text(json.dumps({"seconds": seconds, "world": distributed.world_size(),
                                         "threads": torch.get_num_threads(),
                                         "engine": _choose_engine(model, "auto")}))
    distributed.shutdown()


def _launch(tmp: Path, name: str, num_games: int, *, procs: int, threads: int) -> tuple[dict, list[torch.Tensor]]:
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    launcher = [sys.executable]
    if procs > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
                     "--master_port", str(port)]
    out = tmp / f"{name}.json"
    start = time.perf_counter()
    subprocess.run(launcher + [__file__, "--games", str(num_games), "--out", str(out)], env=env, check=True,
                   timeout=1800, capture_output=True)
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.perf_counter() - start
    values = load_file(str(out) + ".safetensors")
    return result, [values[f"v{i}"] for i in range(num_games)]


def test_evaluate_many_one_vs_two_processes(benchmark, full, env_info, tmp_path):
    num_games = 32 if full else 8
    cores = os.cpu_count() or 1
    runs = {}

    def two_processes():
        runs["2x1"] = _launch(tmp_path, "two", num_games, procs=2, threads=1)

    runs["1x1"] = _launch(tmp_path, "one_thread", num_games, procs=1, threads=1)
    runs[f"1x{cores}"] = _launch(tmp_path, "one", num_games, procs=1, threads=cores)
    benchmark.pedantic(two_processes, rounds=1, iterations=1)
    reference = runs["1x1"][1]
    max_abs_diff = max(float((a - b).abs().max()) for name in runs for a, b in zip(runs[name][1], reference))
    seconds = {name: result["seconds"] for name, (result, _) in runs.items()}
    benchmark.extra_info.update(env_info)
    benchmark.extra_info.update({
        "games": num_games, "players": N_PLAYERS, "prompt_tokens": PROMPT_TOKENS, "cpu_count": cores,
        "engine": runs["1x1"][0]["engine"], "eval_seconds": seconds,
        "wall_seconds_with_startup": {name: result["wall_seconds"] for name, (result, _) in runs.items()},
        "seconds_per_prompt": {name: s / num_games for name, s in seconds.items()},
        "speedup_2proc_vs_1proc_1thread": seconds["1x1"] / seconds["2x1"],
        f"speedup_2proc_vs_1proc_{cores}threads": seconds[f"1x{cores}"] / seconds["2x1"],
        "max_abs_diff_vs_1x1": max_abs_diff,
    })
    assert max_abs_diff < 1e-4


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--games", type=int, required=True)
    parser.add_argument("--out", required=True)
    cli = parser.parse_args()
    worker(cli.games, cli.out)
