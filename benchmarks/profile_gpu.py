"""Where one trie evaluation's time goes on a GPU: device busy time by kernel vs wall time (launch-bound or not).

    python benchmarks/profile_gpu.py [--model smollm2-135m] [--layout n10] [--precision bf16] [--tiny]

Prints (and writes to ``$OUT/profile_<model>_<layout>_<precision>.json`` when ``OUT`` is set): wall ms of one
evaluation (after a warm-up that also autotunes), the sum of device kernel times, their ratio (device busy share:
near 1 = compute-bound, low = the host's launches are the bottleneck), the number of kernels, and the top kernels
by device time, for the trie with the fused kernel and for strong naive. ``--tiny`` runs the tiny shapes on CPU
(CPU op times; a dry run of the script).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_gpu import LAYOUTS, MODEL_SPECS, TINY_LAYOUTS, _device, _game, _model  # noqa: E402

from sftint_fast.engine.naive import evaluate_naive  # noqa: E402
from sftint_fast.engine.trie import evaluate_trie  # noqa: E402


def _profile(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    fn()  # warm-up (autotuning, allocator)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        attr = "self_device_time_total"
    else:
        kernels = [e for e in events if not e.key.startswith(("aten::view", "aten::empty"))]
        attr = "self_cpu_time_total"
    times = sorted(((getattr(e, attr), e.count, e.key) for e in kernels), reverse=True)
    busy_us = sum(t for t, _, _ in times)
    return {"wall_ms": wall * 1e3, "device_busy_ms": busy_us / 1e3, "busy_share": busy_us / 1e3 / (wall * 1e3),
            "kernels": int(sum(c for _, c, _ in times)),
            "top": [{"name": name[:90], "ms": t / 1e3, "count": c} for t, c, name in times[:12]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=list(MODEL_SPECS))
    parser.add_argument("--layout", default="n10", choices=list(LAYOUTS))
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    model = _model(args.model, args.tiny, args.precision)
    game = _game(model, (TINY_LAYOUTS if args.tiny else LAYOUTS)[args.layout])
    subsets = torch.arange(1 << game.num_players, device=_device())
    result = {"model": args.model, "layout": args.layout, "precision": args.precision}
    with torch.no_grad():
        result["trie_triton"] = _profile(lambda: evaluate_trie(model, game, subsets, progress=False,
                                                               attention_backend="triton"))
        result["naive"] = _profile(lambda: evaluate_naive(model, game, subsets, progress=False))
    for name in ("trie_triton", "naive"):
        r = result[name]
        print(f"{name}: wall {r['wall_ms']:.1f} ms, device busy {r['device_busy_ms']:.1f} ms "
              f"({100 * r['busy_share']:.0f}%), {r['kernels']} kernels")
        for k in r["top"][:8]:
            print(f"    {k['ms']:8.2f} ms  x{k['count']:<5d} {k['name']}")
    out = os.environ.get("OUT")
    if out:
        path = os.path.join(out, f"profile_{args.model}_{args.layout}_{args.precision}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
