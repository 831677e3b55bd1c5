"""The ``sftint`` command: ``sftint {info,explain,track,demo,bench} ...``.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args)``; heavy imports happen
inside ``_run_*`` so ``sftint --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions, C++ extension status, devices, Triton mode")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from sftint_fast.info import main as info_main

    info_main()
    return 0


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="AND interactions and Shapley values of the words of one prompt")
    p.add_argument("--model", default="default", help="a local HF model folder, 'default' (SmolLM2) or 'gemma'")
    p.add_argument("--text", required=True, help="the prompt")
    p.add_argument("--players", default="all", help="'all' or comma-separated word indices, e.g. 0,2,5")
    p.add_argument("--n-players", type=int, default=None, help="keep the first N content words as players")
    p.add_argument("--target", default=None, help="answer text (teacher-forced); default: the greedy next token")
    p.add_argument("--chat", action="store_true", help="wrap the text in the tokenizer's chat template")
    p.add_argument("--masking", choices=["embedding", "attention"], default="embedding")
    p.add_argument("--method", choices=["auto", "naive", "trie"], default="auto")
    p.add_argument("--out", default=None, help="folder for v, interactions, config.json and interactions.png")
    p.add_argument("--top", type=int, default=10, help="how many interactions to print and plot")
    p.set_defaults(func=_run_explain)


def _save_bar_plot(path, ranked) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sftint_fast.interactions.result import _atomic_write

    labels = ["{" + ", ".join(r.words) + "}" for r in ranked]
    values = [r.value for r in ranked]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(ranked) + 1.2))
    ax.barh(range(len(ranked)), values, color=["tab:red" if x < 0 else "tab:blue" for x in values])
    ax.set_yticks(range(len(ranked)), labels)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("AND interaction I(S) of v - v(empty)")
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _run_explain(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    import sftint_fast as sf
    from sftint_fast.interactions.result import _atomic_write
    from sftint_fast.models import load_model

    model, tokenizer = load_model(args.model)
    if args.players == "all":
        players = "words"
    else:
        try:
            players = [int(x) for x in args.players.split(",")]
        except ValueError:
            print(f"--players: expected 'all' or comma-separated word indices, received {args.players!r}", file=sys.stderr)
            return 2
    game = sf.Game.from_text(model, tokenizer, args.text, players=players, n_players=args.n_players,
                             target=args.target, chat=args.chat, masking=args.masking)
    v = sf.evaluate(model, game, method=args.method, progress=True).cpu()
    interactions = sf.harsanyi(v - v[0])
    phi = sf.shapley(v)
    ranked = sf.top_interactions(interactions, args.top, list(game.words))
    print(f"target {tokenizer.decode(game.target)!r}: v(N) = {float(v[-1]):+.4f}, v(empty) = {float(v[0]):+.4f}")
    print(f"top {len(ranked)} AND interactions:")
    for r in ranked:
        print(f"  {r.value:+10.4f}  {{{', '.join(r.words)}}}")
    print("Shapley values:")
    for word, value in zip(game.words, phi.tolist()):
        print(f"  {value:+10.4f}  {word}")
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "v.safetensors", lambda tmp: save_file({"v": v.contiguous()}, tmp))
        _atomic_write(out / "interactions.safetensors",
                      lambda tmp: save_file({"and": interactions.contiguous(), "shapley": phi.contiguous()}, tmp))
        config = {
            "model": args.model, "text": args.text, "chat": args.chat, "masking": args.masking,
            "method": args.method, "words": list(game.words), "player_spans": [list(s) for s in game.player_spans],
            "input_ids": game.input_ids.tolist(), "target": game.target.tolist(),
            "target_text": tokenizer.decode(game.target), "value": "log_odds",
            "interactions": "harsanyi(v - v[0])", "bit_order": "bit i = player i",
        }
        _atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2), encoding="utf-8"))
        _save_bar_plot(out / "interactions.png", ranked)
        print(f"wrote {out}/v.safetensors, interactions.safetensors, config.json, interactions.png")
    return 0


def _add_track(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("track", help="track interactions over saved SFT checkpoints (resumable)")
    p.add_argument("--base", required=True, help="base model folder (step 0)")
    p.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint folders or globs (checkpoint-<step>)")
    p.add_argument("--probes", required=True, help="probes JSONL")
    p.add_argument("--reference", default=None, help="reference model folder (for gamma)")
    p.add_argument("--out", required=True, help="run folder (resumes when it exists)")
    p.add_argument("--n-players", type=int, default=8)
    p.add_argument("--andor-method", choices=["sgd", "lp", "and"], default="sgd")
    p.add_argument("--noise-floor", choices=["order_matched", "iid"], default="order_matched")
    p.set_defaults(func=_run_track)


def _run_track(args: argparse.Namespace) -> int:
    from sftint_fast.sft.demo import run_track

    _, md = run_track(args.base, args.checkpoints, args.probes, args.out, reference=args.reference,
                      n_players=args.n_players, andor_method=args.andor_method, noise_floor=args.noise_floor)
    print(f"report: {md}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline SFT of the bundled SmolLM2 with interaction tracking (~10 min CPU)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--n-players", type=int, default=6)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--andor-method", choices=["sgd", "lp", "and"], default="sgd")
    p.add_argument("--niter", type=int, default=20000, help="SGD iterations of the AND-OR decomposition")
    p.add_argument("--out", default="sftint-demo")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import json

    from sftint_fast.plot import headline
    from sftint_fast.sft.demo import run_demo

    report, md = run_demo(args.out, steps=args.steps, probes=args.probes, n_players=args.n_players, every=args.every,
                          lr=args.lr, andor_method=args.andor_method, andor_niter=args.niter, seed=args.seed)
    h = headline(report)
    print(f"report: {md}")
    print(json.dumps({k: v for k, v in h.items() if k != "verdict"}, indent=1, default=str))
    print(h["verdict"])
    return 0


# Subcommands register here, in the order `sftint --help` lists them.
_COMMANDS = [_add_info, _add_explain, _add_track, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
