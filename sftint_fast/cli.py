"""The ``sftint`` command: ``sftint {info,explain,probes,track,demo,compare,bench} ...``.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args)``; heavy imports happen
inside ``_run_*`` so ``sftint --help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import sys


def _int_at_least(minimum: int):
    """An argparse ``type`` for ints >= ``minimum``: a bad value stops the command before any model is loaded."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, received {text!r}")
        return value

    return parse


def _positive_float(text: str, minimum_allowed: bool = False) -> float:
    """An argparse ``type`` for finite floats > 0 (>= 0 with ``minimum_allowed``)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value > 0 or (minimum_allowed and value == 0))):
        raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if minimum_allowed else '>'} 0, "
                                         f"received {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    """An argparse ``type`` for finite floats >= 0."""
    return _positive_float(text, minimum_allowed=True)


def _probe_sources(text: str) -> tuple[str, ...]:
    """An argparse ``type`` for a comma-separated list of probe sources (names checked, packages checked later)."""
    from sftint_fast.sft.probes import PROBE_SOURCES

    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names or any(n not in PROBE_SOURCES for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names among {','.join(PROBE_SOURCES)}, received {text!r}")
    return names


def _template_kwargs(text: str) -> dict:
    """An argparse ``type`` for ``--chat-template-kwargs``: a JSON object of chat template variables."""
    import json

    from sftint_fast.game import check_chat_template_kwargs

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"enable_thinking\": false}}', received "
                                         f"invalid JSON {text!r} ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"enable_thinking\": false}}', received "
                                         f"a JSON {type(value).__name__} {text!r}")
    try:
        return check_chat_template_kwargs(value, chat=True)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("chat_template_kwargs: ")) from None


#: ``--chat-template-kwargs``'s help (every command that takes ``--chat``)
_TEMPLATE_KWARGS_HELP = ("with --chat: a JSON object of chat template variables, e.g. '{\"enable_thinking\": false}' "
                         "for a thinking model (Qwen3, SmolLM3), whose template otherwise has the target scored where "
                         "the model opens <think>")


def _unit_float(text: str, *, closed: bool, what: str) -> float:
    """``text`` as a float in [0, 1] (``closed``) or (0, 1); ArgumentTypeError naming ``what`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 <= value <= 1 if closed else 0 < value < 1):
        raise argparse.ArgumentTypeError(f"expected {what} in {'[0, 1]' if closed else '(0, 1)'}, received {text!r}")
    return value


def _probability(text: str) -> float:
    """An argparse ``type`` for a probability in [0, 1]."""
    return _unit_float(text, closed=True, what="a probability")


def _share(text: str) -> float:
    """An argparse ``type`` for a share strictly between 0 and 1."""
    return _unit_float(text, closed=False, what="a share")


def _refuse_template_kwargs(args: argparse.Namespace) -> None:
    """``--chat-template-kwargs`` without ``--chat`` would be ignored: refused."""
    _refuse_unused("--chat-template-kwargs", None if args.chat else args.chat_template_kwargs, "with --chat",
                   "without --chat")


def _refuse_unused(flag: str, value, needs: str, instead: str) -> None:
    """ValueError for an option the command would ignore (``value`` given, not None, where ``needs`` is not met but
    ``instead`` is): an option is refused, never silently dropped."""
    if value is not None:
        shown = ",".join(value) if isinstance(value, tuple) else value
        if isinstance(shown, float):  # as typed: 5, not 5.0 (repr keeps every digit of 0.1 or 1e-05)
            shown = repr(shown).removesuffix(".0")
        raise ValueError(f"{flag}: expected only {needs}, received {flag} {shown} {instead}")


#: the second line of a refusal printed from an exception (SFTINT_DEBUG=1 raises it instead)
_DEBUG_HINT = "(SFTINT_DEBUG=1 shows the traceback)"


def _debug() -> bool:
    """Whether ``SFTINT_DEBUG`` asks for a refusal's traceback instead of its one-line message."""
    import os

    return os.environ.get("SFTINT_DEBUG", "") not in ("", "0")


#: what a command's user changes where the engine's message advises ``subsets=`` (an option of the Python API only)
_FEWER_PLAYERS = {
    "explain": 'choose fewer players with --n-players or --players (or, with --file, a row\'s "players")',
    "bench": "choose fewer players with --n-players or --players, or time a sample of the variants with --sample",
    "track": "lower --n-players (or the players the --probes rows name)",
    "demo": "lower --n-players",
}


#: the tracker's advice for a resumed ``out_dir`` that holds another configuration (``track`` and ``demo`` use it)
_NEW_OUT_DIR = "; use a new out_dir"


def _cli_message(command: str, err: Exception) -> str:
    """``err``'s message, with the engine's advice to pass ``subsets=`` (all 2^n variants do not fit in memory)
    replaced by the options of ``command`` that choose fewer players, and the tracker's advice to use a new
    ``out_dir`` by the command's ``--out``."""
    message = str(err)
    if message.endswith(_NEW_OUT_DIR) and command in ("track", "demo"):
        return message[:-len(_NEW_OUT_DIR)] + "; rerun with that run's options or track into another --out"
    head, advice, _ = message.partition("; pass subsets=")
    return f"{head}; {_FEWER_PLAYERS.get(command, 'choose fewer players')}" if advice else message


def _file_refusal(command: str, flag: str, path: str | None, what: str) -> str | None:
    """The one-line refusal of a ``flag`` naming no file (checked before any model loads), or None when it is one."""
    from pathlib import Path

    if path is None or Path(path).is_file():
        return None
    got = "is a folder" if Path(path).is_dir() else "does not exist"
    return f"sftint {command}: {flag}: expected {what}, {path!r} {got}"


def _out_refusal(command: str, flag: str, path: str | None, kind: str) -> str | None:
    """The one-line refusal of an output ``flag`` that cannot be written (checked before any model loads, not after
    the work it would save): a ``kind="folder"`` that is a file, a ``"file"`` that is a folder, a path inside a file
    or in a folder this user may not write; None when it can be written."""
    import os
    from pathlib import Path

    if path is None:
        return None
    target = Path(path)
    expected = f"sftint {command}: {flag}: expected a {kind} to write, {path!r}"
    if target.exists() and target.is_dir() != (kind == "folder"):
        return f"{expected} is a {'file' if kind == 'folder' else 'folder'}"
    if target.is_symlink() and not target.exists():  # mkdir fails on it after the work, a write replaces the link
        return f"{expected} is a link to {os.readlink(target)!r}, which does not exist"
    # where the write happens: the folder itself when it exists, else the nearest existing folder above it
    where = target if kind == "folder" and target.is_dir() else next(p for p in target.absolute().parents if p.exists())
    if not where.is_dir():
        return f"{expected} is inside the file {str(where)!r}"
    if not os.access(where, os.W_OK | os.X_OK):
        return f"{expected} is in {str(where)!r}, which this user may not write"
    return None


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions, C++ extension status, devices, Triton mode")
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from sftint_fast.info import main as info_main

    info_main()
    return 0


def _add_game_args(p: argparse.ArgumentParser, n_players_help: str = "") -> None:
    """The options that turn a prompt into a game (``explain`` and ``bench``)."""
    p.add_argument("--players", default="all",
                   help="'all' (default) or comma-separated word indices, e.g. 0,2,5")
    p.add_argument("--n-players", type=_int_at_least(1), default=None,
                   help="keep N content words as players (the first N, or the last with --pick last)"
                        + n_players_help)
    p.add_argument("--pick", choices=["first", "last"], default=None,
                   help="with --n-players: keep the first (default) or the last N content words")
    p.add_argument("--target", default=None, help="answer text (teacher-forced); default: the greedy next token")
    p.add_argument("--chat", action="store_true", help="wrap the text in the tokenizer's chat template")
    p.add_argument("--chat-template-kwargs", type=_template_kwargs, default=None, metavar="JSON",
                   help=_TEMPLATE_KWARGS_HELP)
    p.add_argument("--masking", choices=["embedding", "attention"], default="embedding",
                   help="how a masked word is removed: its embedding replaced by the baseline's (default) or "
                        "hidden from attention")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """Which model, in which dtype, on which device (``explain`` and ``bench``)."""
    p.add_argument("--model", default="default",
                   help="a local HF model folder, a PEFT adapter folder, 'default' (SmolLM2) or 'gemma'")
    p.add_argument("--base", default=None,
                   help="for an adapter --model: its base (a folder, 'default' or 'gemma'; default: the folder its "
                        "adapter_config.json names)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the weights' dtype (default float32: bf16 moves v by ~0.06 RMS on SmolLM2)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:<i> (default: cuda when available)")


def _load(args: argparse.Namespace):
    """``(model, tokenizer)`` of ``--model`` in ``--dtype`` on ``--device`` (ValueError for a bad device)."""
    import torch

    from sftint_fast.models import load_model, resolve_device

    device = resolve_device(args.device)
    _check_base(args)
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), base=args.base)
    return model.to(device), tokenizer


def _check_base(args: argparse.Namespace) -> None:
    """``--base`` only applies to an adapter ``--model``: with a full model it would be ignored, so it is refused."""
    from pathlib import Path

    from sftint_fast.models import is_adapter_folder

    full = args.model in ("default", "gemma") or (Path(args.model).is_dir() and not is_adapter_folder(args.model))
    if args.base is not None and full:
        raise ValueError(f"--base: expected only with a PEFT adapter --model (adapter_config.json), received the full "
                         f"model {args.model!r} (with --base {args.base!r})")


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="AND interactions and Shapley values of the words of one prompt (or many)")
    _add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the prompt")
    source.add_argument("--file", help='JSONL, one prompt a row: {"prompt": ..., "players"?: ..., "target"?: ...} (a '
                                       "row's players / target replace --players and --n-players / --target; null: "
                                       "the options); "
                                       "evaluated across the ranks under torchrun, resumable from <out>/shards")
    _add_game_args(p)
    p.add_argument("--method", choices=["auto", "naive", "trie"], default="auto",
                   help="evaluation engine (default auto: the trie where an adapter reads the model, else naive)")
    p.add_argument("--out", default=None, help="folder for v, interactions, config.json and interactions.png "
                                               "(with --file: one subfolder prompt_<i> per row)")
    p.add_argument("--top", type=_int_at_least(0), default=10,
                   help="how many interactions to print and plot (default 10)")
    p.add_argument("--andor", choices=["none", "sgd", "lp"], default="none",
                   help="also the sparse AND-OR decomposition (METHOD.md section 3): sgd or the exact lp "
                        "(default none)")
    p.add_argument("--qthres", type=_non_negative_float, default=None,
                   help="with --andor: AND-OR noise bound, a share of |v(N) - v(empty)| (default 0.04)")
    p.add_argument("--niter", type=_int_at_least(0), default=None,
                   help="with --andor sgd: SGD iterations of the AND-OR decomposition (default 20000)")
    p.set_defaults(func=_run_explain)


def _save_bar_plot(path, labels: list[str], values: list[float], xlabel: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sftint_fast.interactions.result import _atomic_write

    fig, ax = plt.subplots(figsize=(7, 0.4 * len(labels) + 1.2))
    ax.barh(range(len(labels)), values, color=["tab:red" if x < 0 else "tab:blue" for x in values])
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _parse_players(value):
    """``"all"`` → ``"words"``; ``"0,2,5"`` or ``[0, 2, 5]`` → word indices; ValueError otherwise."""
    if value == "all":
        return "words"
    items = value.split(",") if isinstance(value, str) else value
    # a JSON list holds ints (int() would truncate 2.5 to word 2) or digit strings
    if not isinstance(items, list) or not items or any(isinstance(x, bool) or not isinstance(x, (int, str))
                                                       for x in items):
        raise ValueError(f"players: expected 'all' or comma-separated word indices, received {value!r}")
    try:
        indices = [int(x) for x in items]
    except (TypeError, ValueError):
        raise ValueError(f"players: expected 'all' or comma-separated word indices, received {value!r}") from None
    # what no prompt's words accept, refused before the model loads (the game checks the upper bound)
    if min(indices) < 0:
        raise ValueError(f"players: expected word indices >= 0, received {value!r}")
    if sorted(set(indices)) != indices:
        raise ValueError(f"players: expected strictly increasing word indices, received {value!r}")
    return indices


def _read_prompts(path: str) -> list[dict]:
    """The rows of a prompts JSONL file (blank lines skipped); ValueError naming the line when one is malformed."""
    import json
    from pathlib import Path

    rows = []
    # rows end at "\n" only: splitlines() would also split inside a JSON string at U+2028, U+0085, ...; utf-8-sig
    # drops the byte-order mark a Windows editor may start the file with
    for number, line in enumerate(Path(path).read_text(encoding="utf-8-sig").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: expected a JSON object, received invalid JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f'{path}:{number}: expected an object with a "prompt" string, received {line.strip()[:80]!r}')
        unknown = set(row) - {"prompt", "players", "target"}
        if unknown:
            raise ValueError(f'{path}:{number}: expected keys "prompt", "players", "target", received {sorted(unknown)}')
        if row.get("target") is not None and not isinstance(row["target"], str):
            raise ValueError(f'{path}:{number}: "target": expected a string, received {row["target"]!r}')
        # a null "players" / "target" means what a missing one does: the command's options (as in a probes file)
        rows.append({key: value for key, value in row.items() if value is not None})
    if not rows:
        raise ValueError(f"{path}: expected at least one prompt, received none")
    return rows


def _run_explain(args: argparse.Namespace) -> int:
    from pathlib import Path

    import sftint_fast as sf
    from sftint_fast import distributed
    from sftint_fast.models import resolve_device

    _refuse_unused("--pick", None if args.n_players is not None else args.pick, "with --n-players",
                   "without --n-players")
    _refuse_template_kwargs(args)
    for flag, value in (("--qthres", args.qthres), ("--niter", args.niter)):
        _refuse_unused(flag, None if args.andor != "none" else value, "with --andor sgd or lp", "with --andor none")
    _refuse_unused("--niter", args.niter if args.andor == "lp" else None, "with --andor sgd",
                   "with --andor lp (the LP is solved exactly, without iterations)")
    refusal = (_file_refusal("explain", "--file", args.file, "a JSONL file of prompts")
               or _out_refusal("explain", "--out", args.out, "folder"))
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    try:  # the options' own refusals: one line
        option_players = _parse_players(args.players)
        if args.file is None and not args.text.strip():  # refused before the model loads
            raise ValueError(f"text: expected a non-empty prompt, received {args.text!r}")
    except ValueError as err:
        print(f"sftint explain: --{err}", file=sys.stderr)
        return 2
    try:  # a --file row's: its file's content, refused as the library refuses a probes file
        rows = [{"prompt": args.text}] if args.file is None else _read_prompts(args.file)
        requests = []
        for i, row in enumerate(rows):
            if not row["prompt"].strip():
                raise ValueError(f"text: expected a non-empty prompt, received {row['prompt']!r} (prompt {i})")
            try:
                row_players = option_players if "players" not in row else _parse_players(row["players"])
            except ValueError as err:
                raise ValueError(f"{err} (prompt {i})") from None
            requests.append((row["prompt"], row_players, row.get("target", args.target)))
    except ValueError as err:
        if _debug():
            raise
        print(f"sftint explain: --file: {err}\n{_DEBUG_HINT}", file=sys.stderr)
        return 2
    if not any(players == "words" for _, players, _ in requests):  # --n-players would choose no prompt's players
        named = args.file is not None and any("players" in row for row in rows)
        given = " and ".join(([f"--players {args.players}"] if args.players != "all" else [])
                             + (["the players the --file rows name"] if named else []))
        _refuse_unused("--n-players", args.n_players, "with --players all", f"with {given}")
    try:
        resolve_device(args.device)
    except ValueError as err:
        print(f"sftint explain: --{err}", file=sys.stderr)
        return 2
    owns_group = not distributed.is_distributed() and distributed.init_from_env()
    try:
        model, tokenizer = _load(args)
        args.model_device = str(next(model.parameters()).device)  # recorded in config.json
        games, choices = [], []
        for i, (text, players, target) in enumerate(requests):
            # a --file row that names its players keeps them: --n-players / --pick choose the others' players
            n_players = args.n_players if args.file is None or players == "words" else None
            # what chose this game's players (recorded in its config.json, which a rerun compares)
            choices.append((n_players, (args.pick or "first") if n_players is not None else "first"))
            try:
                games.append(sf.Game.from_text(model, tokenizer, text, players=players, n_players=n_players,
                                               target=target, chat=args.chat, masking=args.masking,
                                               chat_template_kwargs=args.chat_template_kwargs,
                                               pick=choices[-1][1]))
            except (ValueError, TypeError) as err:
                if args.file is None:
                    raise
                # name the row: the same message could come from --players/--target or from any row of the file
                kind = TypeError if isinstance(err, TypeError) else ValueError
                raise kind(f"--file {args.file}, prompt {i} ({text[:40]!r}): {err}") from err
        if args.andor == "lp":  # refused before the 2^n evaluation, not after it (and after the AND results)
            from sftint_fast.interactions.andor import LP_MAX_PLAYERS

            for i, game in enumerate(games):
                if game.num_players > LP_MAX_PLAYERS:
                    row = "" if args.file is None else f"--file {args.file}, prompt {i}: "
                    raise ValueError(f"{row}--andor lp: expected at most {LP_MAX_PLAYERS} players (its constraint "
                                     f"matrix grows with 3^n), received {game.num_players}; choose fewer players "
                                     "(--n-players, --players) or use --andor sgd")
        if args.file is None and not distributed.is_distributed():
            values = [sf.evaluate(model, games[0], method=args.method, progress=True).cpu()]
        else:
            shards = None if args.out is None or args.file is None else Path(args.out) / "shards"
            values = sf.evaluate_many(model, games, method=args.method, progress=True, out_dir=shards)
        if not distributed.is_main_process():
            return 0
        from sftint_fast._files import remove_stale_temps

        for i, ((text, _, _), choice, game, v) in enumerate(zip(requests, choices, games, values)):
            out = None if args.out is None else Path(args.out) if args.file is None else Path(args.out) / f"prompt_{i:04d}"
            if out is not None:  # what a killed run left half-written there (rank 0 alone writes these folders)
                remove_stale_temps(out, lambda name: name in _EXPLAIN_FILES)
            if args.file is not None:
                print(f"[{i}] {text}")
            _explain_one(args, tokenizer, text, game, v.cpu(), out, choice)
        if args.file is not None and args.out is not None:
            stale = sorted(p.name for p in Path(args.out).glob("prompt_*")
                           if p.is_dir() and p.name[7:].isdigit() and int(p.name[7:]) >= len(requests))
            if stale:  # an earlier run of a longer file: left alone, but they are not this file's rows
                print(f"note: {args.out} also holds {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''} from an "
                      f"earlier run with more rows than the {len(requests)} of {args.file}", file=sys.stderr)
    finally:
        if owns_group:  # no barrier: after the values (the last collective) rank 0 alone writes every prompt's
            # results, longer for a file of many prompts than a barrier waits (the group's timeout: 10 min on NCCL)
            distributed.shutdown(synchronize=False)
    return 0


#: what ``_explain_one`` writes to a prompt's folder, ``config.json`` last
_EXPLAIN_FILES = ("v.safetensors", "interactions.safetensors", "interactions.png", "config.json")


def _andor_options(args: argparse.Namespace, given: dict) -> dict:
    """The entries of ``sf.and_or(v.double(), method=args.andor, **given).config`` set by the options (the others,
    ``q_bound``, ``v_empty``, ``shape``, ``lp_status``..., follow from ``v``)."""
    import inspect

    from sftint_fast.interactions import andor

    options = {name: p.default for name, p in inspect.signature(andor.and_or).parameters.items()} | given
    return {"method": args.andor, "qthres": float(options["qthres"]),
            "niter": int(options["niter"]) if args.andor == "sgd" else 0, "lr": float(options["lr"]),
            "momentum": andor._MOMENTUM, "baseline_offset": options["baseline_offset"], "seed": options["seed"],
            "dtype": "float64", "warm_start": False, "lp_method": options["lp_method"] if args.andor == "lp" else None}


def _is_complete(out, config: dict, v, andor_options: dict | None) -> bool:
    """Whether ``out`` holds every file of an earlier ``_explain_one`` of this very config (``andor_options``: what
    its AND-OR config must hold, None = no AND-OR) and this ``v``; an unreadable file counts as incomplete."""
    import json

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not all((out / name).is_file() for name in _EXPLAIN_FILES):
        return False
    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
        saved_v = load_file(out / "v.safetensors")["v"]
        saved_interactions = load_file(out / "interactions.safetensors")  # printed again when kept
    except (OSError, ValueError, KeyError, SafetensorError):
        return False
    if not isinstance(saved, dict):
        return False
    saved_andor = saved.pop("andor", None)
    if saved != json.loads(json.dumps(config)) or not torch.equal(saved_v, v):
        return False
    if andor_options is None:
        return saved_andor is None
    return (isinstance(saved_andor, dict) and all(saved_andor.get(k) == x for k, x in andor_options.items())
            and {"andor_and", "andor_or"} <= set(saved_interactions))


def _print_andor(args: argparse.Namespace, interactions, i_and, i_or, words: list[str]) -> list:
    """Prints the AND-OR decomposition's ``I_and`` / ``I_or`` (as saved: float32, so that a rerun that keeps its
    folder prints what the first run printed) beside the AND interactions; returns its top ``(kind, ranked)``."""
    import sftint_fast as sf

    both = sorted([("AND", r) for r in sf.top_interactions(i_and, args.top, words)]
                  + [("OR", r) for r in sf.top_interactions(i_or, args.top, words)],
                  key=lambda item: -abs(item[1].value))[:args.top]
    l1_and = float(interactions[1:].abs().sum())
    l1_andor = float(i_and[1:].abs().sum() + i_or.abs().sum())
    print(f"AND-OR decomposition ({args.andor}): sum |I| {l1_and:.4f} with AND only -> {l1_andor:.4f}; "
          f"top {len(both)}:")
    for kind, r in both:
        print(f"  {r.value:+10.4f}  {kind:<3} {{{', '.join(r.words)}}}")
    return both


def _explain_one(args: argparse.Namespace, tokenizer, text: str, game, v, out, choice: tuple) -> None:
    """Prints the top interactions and Shapley values of one game's ``v`` and writes them to ``out`` (if given);
    ``choice``: the ``(n_players, pick)`` that chose its players."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    import sftint_fast as sf
    from sftint_fast.interactions.result import _atomic_write

    interactions = sf.harsanyi(v - v[0])
    phi = sf.shapley(v)
    words = list(game.words)
    ranked = sf.top_interactions(interactions, args.top, words)
    print(f"target {tokenizer.decode(game.target)!r}: v(N) = {float(v[-1]):+.4f}, v(empty) = {float(v[0]):+.4f}")
    print(f"top {len(ranked)} AND interactions:")
    for r in ranked:
        print(f"  {r.value:+10.4f}  {{{', '.join(r.words)}}}")
    print("Shapley values:")
    for word, value in zip(game.words, phi.tolist()):
        print(f"  {value:+10.4f}  {word}")
    tensors = {"and": interactions.contiguous(), "shapley": phi.contiguous()}
    bars = (["{" + ", ".join(r.words) + "}" for r in ranked], [r.value for r in ranked],
            "AND interaction I(S) of v - v(empty)")
    # what the bars explain: which output of which prompt, and the total they share out (v(N) - v(empty))
    prompt = text if len(text) <= 60 else text[:57] + "..."
    about = (f"of {prompt!r} -> target {tokenizer.decode(game.target)!r}\n"
             f"(n={len(words)} players, v(N) - v(empty) = {float(v[-1] - v[0]):+.3f})")
    config = {
        "model": args.model, "base": args.base, "dtype": args.dtype,
        "device": getattr(args, "model_device", args.device),
        "text": text, "chat": args.chat, "chat_template_kwargs": args.chat_template_kwargs, "masking": args.masking,
        "n_players": choice[0],
        "pick": choice[1], "top": args.top,
        "method": args.method, "words": list(game.words), "player_spans": [list(s) for s in game.player_spans],
        "input_ids": game.input_ids.tolist(), "target": game.target.tolist(),
        "target_text": tokenizer.decode(game.target), "value": "log_odds",
        "interactions": "harsanyi(v - v[0])", "bit_order": "bit i = player i",
    }
    given = {name: value for name, value in (("qthres", args.qthres), ("niter", args.niter)) if value is not None}
    if out is not None and _is_complete(out, config, v, None if args.andor == "none" else _andor_options(args, given)):
        # a rerun in the same --out: the AND-OR decomposition (minutes for many players) is not redone, its saved
        # results are printed as the run that saved them printed them
        if args.andor != "none":
            saved = load_file(out / "interactions.safetensors")
            _print_andor(args, interactions, saved["andor_and"], saved["andor_or"], words)
        print(f"kept {out}: complete, from an earlier run with this config (delete its config.json to redo it)")
        return
    andor, kinds = None, "AND"
    if args.andor != "none":
        andor = sf.and_or(v.double(), method=args.andor, progress=True, **given)
        tensors.update({"andor_and": andor.I_and.float().contiguous(), "andor_or": andor.I_or.float().contiguous()})
        both = _print_andor(args, interactions, tensors["andor_and"], tensors["andor_or"], words)
        bars = ([f"{kind} {{{', '.join(r.words)}}}" for kind, r in both], [r.value for _, r in both],
                "AND-OR interaction of v - v(empty)")
        kinds = "AND-OR"
    if out is None:
        return
    config["andor"] = None if andor is None else andor.config
    text_config = json.dumps(config, indent=2)
    out.mkdir(parents=True, exist_ok=True)
    # each results file carries its config; an earlier run's config.json goes first, so that a run killed while it
    # writes never leaves it beside this run's results
    (out / "config.json").unlink(missing_ok=True)
    metadata = {"config": text_config}
    _atomic_write(out / "v.safetensors", lambda tmp: save_file({"v": v.contiguous()}, tmp, metadata=metadata))
    _atomic_write(out / "interactions.safetensors", lambda tmp: save_file(tensors, tmp, metadata=metadata))
    _save_bar_plot(out / "interactions.png", *bars, f"Top {len(bars[0])} {kinds} interactions {about}")
    # last: a folder with a config.json holds every file of _EXPLAIN_FILES (what _is_complete relies on)
    _atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text_config, encoding="utf-8"))
    print(f"wrote {out}/v.safetensors, interactions.safetensors, config.json, interactions.png")


#: ``sftint track`` options forwarded to :class:`~sftint_fast.sft.tracker.SFTTracker` when given (flag, keyword,
#: argparse keywords); left out, the tracker's own default applies (and the tracker validates every value).
_TRACK_OPTIONS = [
    ("--tau", "tau", {"type": float, "help": "salience threshold, a share of max |I| (default 0.05; an |I| with "
                                             "--threshold-reference absolute)"}),
    ("--threshold-reference", "threshold_reference", {"choices": ["base", "checkpoint", "absolute"],
                                                      "help": "whose max |I| tau is a share of: the base model's "
                                                              "(default) or each checkpoint's; absolute: none"}),
    ("--qthres", "qthres", {"type": float, "help": "AND-OR noise bound, a share of |v(N) - v(empty)| (default 0.04)"}),
    ("--niter", "andor_niter", {"type": _int_at_least(0),
                                "help": "SGD iterations of the AND-OR decomposition (default 20000)"}),
    ("--andor-lr", "andor_lr", {"type": _positive_float,
                                "help": "initial SGD learning rate of the AND-OR decomposition (default 1e-6)"}),
    ("--baseline", "baseline", {"choices": ["pad", "unk"], "help": "masking baseline embedding (default pad)"}),
    ("--target", "target", {"choices": ["base", "answer"],
                            "help": "base: the base model's greedy next token (default); answer: each probe's "
                                    "answer, teacher-forced"}),
    ("--chat", "chat", {"action": "store_const", "const": True, "help": "wrap probes in the chat template"}),
    ("--chat-template-kwargs", "chat_template_kwargs", {"type": _template_kwargs, "metavar": "JSON",
                                                        "help": _TEMPLATE_KWARGS_HELP}),
    ("--hysteresis", "hysteresis", {"action": argparse.BooleanOptionalAction,
                                    "help": "enter above tau, leave below tau/2 (default on; --no-hysteresis: off)"}),
    ("--persistence", "persistence", {"type": _int_at_least(1),
                                      "help": "checkpoints a change must persist (default 2)"}),
    ("--noise-draws", "noise_draws", {"type": _int_at_least(1),
                                      "help": "noise-floor draws per checkpoint (default 3)"}),
    ("--bootstrap", "bootstrap", {"type": _int_at_least(1),
                                  "help": "bootstrap resamples over the probes (default 1000)"}),
    ("--min-base-py", "min_base_py", {"type": float,
                                      "help": "drop probes whose base target probability is lower (default 0.5)"}),
    ("--compute-dtype", "compute_dtype", {"choices": ["float32", "tf32", "bfloat16", "auto"],
                                          "help": "precision of the game values (default float32; auto: each "
                                                  "model's own dtype)"}),
    ("--engine", "engine_method", {"choices": ["auto", "naive", "trie"], "help": "evaluation engine (default auto)"}),
    ("--seed", "seed", {"type": int, "help": "seed of the noise floor and the bootstrap (default 0)"}),
]


def _add_track(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("track", help="track interactions over saved SFT checkpoints (resumable)")
    p.add_argument("--base", required=True, help="base model folder (step 0)")
    p.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint folders or globs (checkpoint-<step>)")
    p.add_argument("--probes", required=True, help="probes JSONL")
    p.add_argument("--reference", default=None, help="reference model folder (for gamma)")
    p.add_argument("--out", required=True, help="run folder (resumes when it exists; refuses another --base or a "
                                                "tracked checkpoint folder that changed since)")
    p.add_argument("--n-players", type=_int_at_least(1), default=8,
                   help="players (content words) per probe, unless a probe names them (default 8)")
    p.add_argument("--andor-method", choices=["sgd", "lp", "and"], default="sgd",
                   help="the decomposition: sgd (default), the exact lp, or and (AND interactions alone)")
    p.add_argument("--noise-floor", choices=["order_matched", "iid", "none"], default="order_matched",
                   help="the null behind the noise floor (default order_matched; none: no floor)")
    p.add_argument("--heldout", default=None,
                   help='JSONL of {"prompt", "answer"} rows: the held-out loss per checkpoint')
    p.add_argument("--device", default=None,
                   help="where checkpoints run: cpu, cuda or cuda:<i> (default: cuda when available)")
    p.add_argument("--watch", type=_positive_float, default=None, metavar="SECONDS",
                   help="follow a run still saving: look for new complete checkpoints every SECONDS (Ctrl-C stops)")
    p.add_argument("--until-step", type=_int_at_least(1), default=None,
                   help="with --watch: stop after the first checkpoint at or past this step")
    p.add_argument("--idle-timeout", type=_positive_float, default=None, metavar="SECONDS",
                   help="with --watch: stop after SECONDS without a new checkpoint")
    p.add_argument("--settle", type=_non_negative_float, default=None, metavar="SECONDS",
                   help="with --watch: a folder without trainer_state.json is complete once unchanged this long "
                        "(default 30)")
    p.add_argument("--stale-after", type=_positive_float, default=None, metavar="SECONDS",
                   help="with --watch: an incomplete folder unchanged this long while a later checkpoint is complete "
                        "was abandoned (a save cut off): skip it with a warning (default 600, or twice --settle when "
                        "longer; more than --settle); until then later checkpoints wait for it")
    p.add_argument("--boundary-file", default=None, metavar="PATH",
                   help="write PATH (JSON) once the phase boundary is found; sf.StopFileCallback(PATH) in the "
                        "training run then saves and stops it")
    for flag, _, kwargs in _TRACK_OPTIONS:
        p.add_argument(flag, default=None, **kwargs)
    p.set_defaults(func=_run_track)


def _run_track(args: argparse.Namespace) -> int:
    from sftint_fast import distributed
    from sftint_fast.sft.demo import run_track

    for flag, path, what in (("--probes", args.probes, "a JSONL file of probes"),
                             ("--heldout", args.heldout, 'a JSONL file of {"prompt", "answer"} rows')):
        refusal = _file_refusal("track", flag, path, what)
        if refusal is not None:
            print(refusal, file=sys.stderr)
            return 2
    refusal = (_out_refusal("track", "--out", args.out, "folder")
               or _out_refusal("track", "--boundary-file", args.boundary_file, "file"))
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    options = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key, _ in _TRACK_OPTIONS}
    for flag, key in (("--qthres", "qthres"), ("--niter", "andor_niter"), ("--andor-lr", "andor_lr")):
        _refuse_unused(flag, options[key] if args.andor_method == "and" else None, "with --andor-method sgd or lp",
                       "with --andor-method and (AND interactions alone)")
    for flag, key in (("--niter", "andor_niter"), ("--andor-lr", "andor_lr")):
        _refuse_unused(flag, options[key] if args.andor_method == "lp" else None, "with --andor-method sgd",
                       "with --andor-method lp (the LP is solved exactly, without SGD)")
    _refuse_unused("--chat-template-kwargs", None if options["chat"] else options["chat_template_kwargs"],
                   "with --chat", "without --chat")
    _refuse_unused("--noise-draws", options["noise_draws"] if args.noise_floor == "none" else None,
                   "with --noise-floor order_matched or iid", "with --noise-floor none (no noise floor is drawn)")
    for flag, value in (("--until-step", args.until_step), ("--idle-timeout", args.idle_timeout),
                        ("--settle", args.settle), ("--stale-after", args.stale_after)):
        _refuse_unused(flag, value if args.watch is None else None, "with --watch", "without --watch")
    options = {key: value for key, value in options.items() if value is not None}
    owns_group = not distributed.is_distributed() and distributed.init_from_env()  # under torchrun
    failed = False
    try:
        _, md = run_track(args.base, args.checkpoints, args.probes, args.out, reference=args.reference,
                          n_players=args.n_players, andor_method=args.andor_method,
                          noise_floor=None if args.noise_floor == "none" else args.noise_floor,
                          heldout=args.heldout, device=args.device, watch=args.watch, until_step=args.until_step,
                          idle_timeout=args.idle_timeout, settle=30.0 if args.settle is None else args.settle,
                          stale_after=args.stale_after,
                          boundary_file=args.boundary_file,
                          **options)
        if distributed.is_main_process():
            print(f"report: {md}")
    except (ValueError, TypeError) as err:  # a bad option, file or checkpoint: the tracker's own message
        failed = True
        if _debug():
            raise
        print(f"sftint track: {_cli_message('track', err)}\n{_DEBUG_HINT}", file=sys.stderr)
        return 2
    finally:
        if owns_group:  # no barrier after an error: a rank that failed alone must not wait for the others
            distributed.shutdown(synchronize=not failed and sys.exc_info()[0] is None)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="offline SFT of the bundled SmolLM2 with interaction tracking "
                                    "(~5 min on 2 CPU cores; the report in --out)")
    p.add_argument("--steps", type=_int_at_least(1), default=24, help="training steps (default 24)")
    p.add_argument("--probes", type=_int_at_least(1), default=None,
                   help="how many confident probes to track (default 8)")
    p.add_argument("--probe-sources", type=_probe_sources, default=None, metavar="S[,S]",
                   help="where the probes come from, in order: countries (capital-city questions, countryinfo), "
                        "chatterbot (trivia questions); default: both")
    p.add_argument("--probes-file", default=None, metavar="JSONL",
                   help="track these probes (JSONL, as sftint track --probes) instead of choosing them")
    p.add_argument("--n-players", type=_int_at_least(1), default=6,
                   help="players (content words) per probe (default 6)")
    p.add_argument("--every", type=_int_at_least(1), default=4, help="track every N training steps (default 4)")
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8,
                   help="training examples per step (default 8)")
    p.add_argument("--heldout", type=_int_at_least(0), default=16, metavar="N",
                   help="held-out chat pairs whose loss is taken at each tracked step (default 16; 0: no held-out "
                        "loss)")
    p.add_argument("--andor-method", choices=["sgd", "lp", "and"], default="sgd",
                   help="the decomposition: sgd (default), the exact lp, or and (AND interactions alone)")
    p.add_argument("--niter", type=_int_at_least(0), default=None,
                   help="SGD iterations of the AND-OR decomposition (default 20000)")
    p.add_argument("--out", default="sftint-demo", help="run folder: the report, probes.jsonl, the tracker's files "
                                                     "(default sftint-demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, training and tracking (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:<i>: where training and tracking run")
    p.add_argument("--lora", type=_int_at_least(1), default=None, metavar="R",
                   help="train a LoRA adapter of rank R (alpha 2R, all linear layers; the peft extra) instead of "
                        "every weight (then raise --lr, e.g. 1e-3)")
    p.add_argument("--stop-at-boundary", action="store_true",
                   help="stop training where the denoising stage ends (the phase boundary)")
    p.add_argument("--max-overhead", type=_share, default=None, metavar="F",
                   help="track when due so that tracking takes at most F (0-1) of the wall time after the base; "
                        "--every is then the shortest interval")
    p.add_argument("--chat-template-kwargs", type=_template_kwargs, default=None, metavar="JSON",
                   help=_TEMPLATE_KWARGS_HELP.removeprefix("with --chat: ") + " (the demo always uses the chat "
                        "template: for its probes, training and held-out chats)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import json

    from sftint_fast.models import resolve_device
    from sftint_fast.plot import headline
    from sftint_fast.sft.demo import run_demo
    from sftint_fast.sft.probes import PROBE_SOURCES, check_probe_sources
    from sftint_fast.sft.tracker import _json_safe

    for flag, value in (("--probes", args.probes), ("--probe-sources", args.probe_sources)):
        _refuse_unused(flag, None if args.probes_file is None else value, "without --probes-file",
                       "with --probes-file (every probe of the file is tracked)")
    _refuse_unused("--niter", None if args.andor_method == "sgd" else args.niter, "with --andor-method sgd",
                   f"with --andor-method {args.andor_method}")
    sources = args.probe_sources or PROBE_SOURCES
    refusal = _out_refusal("demo", "--out", args.out, "folder")
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    try:
        resolve_device(args.device)
    except ValueError as err:
        print(f"sftint demo: --{err}", file=sys.stderr)
        return 2
    if args.probes_file is None:
        try:
            check_probe_sources(sources)
        except ImportError as err:
            if _debug():
                raise
            print(f"sftint demo: {err} (--probe-sources chooses the sources)\n{_DEBUG_HINT}", file=sys.stderr)
            return 2
    else:
        refusal = _file_refusal("demo", "--probes-file", args.probes_file, "a JSONL file of probes")
        if refusal is not None:
            print(refusal, file=sys.stderr)
            return 2
    report, md = run_demo(args.out, steps=args.steps, probes=8 if args.probes is None else args.probes,
                          n_players=args.n_players, every=args.every, lr=args.lr, batch_size=args.batch_size,
                          heldout=args.heldout, andor_method=args.andor_method,
                          andor_niter=20000 if args.niter is None else args.niter, seed=args.seed,
                          device=args.device, lora=args.lora, stop_at_boundary=args.stop_at_boundary,
                          max_overhead=args.max_overhead, probe_sources=sources,
                          probes_file=args.probes_file, chat_template_kwargs=args.chat_template_kwargs)
    h = headline(report)
    print(f"report: {md}")
    # strict JSON, as report.json: a NaN (a measure of an empty set) as null
    print(json.dumps(_json_safe({k: v for k, v in h.items() if k != "verdict"}), indent=1, default=str))
    print(h["verdict"])
    return 0


def _add_probes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probes", help="choose probes for sftint track: questions the base model answers confidently")
    _add_model_args(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--candidates", default=None, metavar="JSONL",
                        help="your candidate prompts (JSONL rows {\"prompt\", \"answer\"?, \"players\"?}), in order")
    source.add_argument("--sources", type=_probe_sources, default=None, metavar="S[,S]",
                        help="the bundled candidates, in order: countries (capital-city questions), chatterbot "
                             "(trivia); default: countries,chatterbot")
    p.add_argument("--out", required=True, help="the probes JSONL to write (sftint track --probes)")
    p.add_argument("--count", type=_int_at_least(1), default=8, help="how many probes to keep (default 8)")
    p.add_argument("--n-players", type=_int_at_least(1), default=8,
                   help="keep only candidates with at least this many content words (as sftint track --n-players; "
                        "default 8)")
    p.add_argument("--min-py", type=_probability, default=0.5,
                   help="the least base probability of the greedy next token (default 0.5; sftint track drops "
                        "probes below its --min-base-py, 0.5 by default)")
    p.add_argument("--chat", action="store_true",
                   help="score the prompts in the chat template (then track with sftint track --chat too)")
    p.add_argument("--chat-template-kwargs", type=_template_kwargs, default=None, metavar="JSON",
                   help=_TEMPLATE_KWARGS_HELP + " (then track with the same option)")
    p.add_argument("--max-tries", type=_int_at_least(1), default=200,
                   help="look at no more than the first N candidates (default 200)")
    p.add_argument("--content-target", action="store_true",
                   help="keep only prompts whose greedy next token is a content word (the answer itself, not 'The')")
    p.set_defaults(func=_run_probes)


def _run_probes(args: argparse.Namespace) -> int:
    from sftint_fast.players import is_content_word
    from sftint_fast.sft.probes import PROBE_SOURCES, load_probes, save_probes, scan_probes

    from sftint_fast.sft.probes import check_probe_sources

    _refuse_template_kwargs(args)
    refusal = (_file_refusal("probes", "--candidates", args.candidates, "a JSONL file of candidate prompts")
               or _out_refusal("probes", "--out", args.out, "file"))
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    candidates = load_probes(args.candidates) if args.candidates is not None else None
    if candidates is None:
        try:  # before the model loads
            check_probe_sources(args.sources or PROBE_SOURCES)
        except ImportError as err:
            if _debug():
                raise
            print(f"sftint probes: {err} (--sources chooses the sources)\n{_DEBUG_HINT}", file=sys.stderr)
            return 2
    model, tokenizer = _load(args)
    scored = scan_probes(model, tokenizer, count=args.count, min_py=args.min_py, n_players=args.n_players,
                         candidates=candidates, chat=args.chat, max_tries=args.max_tries,
                         sources=args.sources or PROBE_SOURCES, content_target=args.content_target,
                         chat_template_kwargs=args.chat_template_kwargs)
    chosen = [s for s in scored if s.confident(args.min_py, args.content_target)]
    if not chosen:
        what = " and a content-word next token" if args.content_target else ""
        print(f"sftint probes: none of the {len(scored)} candidates scored has p_y >= {args.min_py:g}{what} (and at "
              f"least {args.n_players} content words); lower --min-py or --n-players, or give other --candidates",
              file=sys.stderr)
        return 1
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    path = save_probes([s.probe for s in chosen], args.out)
    what = " and a content-word next token" if args.content_target else ""
    print(f"{len(chosen)} of {len(scored)} candidates scored have p_y >= {args.min_py:g}{what}: {path}")
    for s in chosen:
        agrees = "" if not s.probe.answer else (
            "  (answer agrees)" if s.probe.answer.strip().startswith(s.token.strip()) and s.token.strip()
            else f"  (answer {s.probe.answer.strip()!r} differs: track with the default --target base)")
        # a confident newline or "The" is a probe of that token, not of an answer: say how to keep answers only
        stop = "" if is_content_word(s.token.strip()) else (
            "  (next token is not a content word: --content-target keeps answers only"
            f"{'' if args.chat else '; --chat scores a chat model in its template'})")
        print(f"  p_y {s.p_y:.3f}  next {s.token!r}  {s.probe.prompt}{agrees}{stop}")
    return 0 if len(chosen) == args.count else 1


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="tracked runs side by side (the --out folders of track / demo)")
    p.add_argument("runs", nargs="+", help="two or more run folders (each with report.json)")
    p.add_argument("--out", required=True, help="folder for compare.md, compare.json and compare.png")
    p.add_argument("--labels", default=None, help="comma-separated names of the runs (default: the folders' names)")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from sftint_fast.plot import bound, count
    from sftint_fast.sft.compare import compare_runs

    refusal = _out_refusal("compare", "--out", args.out, "folder")
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    labels = None if args.labels is None else [x.strip() for x in args.labels.split(",")]
    result, md = compare_runs(args.runs, args.out, labels=labels)
    print(f"comparison: {md}")
    for row in result["rows"]:
        print(f"{row['label']}: excess removals {count(row['removed_excess_cumulative'])} "
              f"(lower bound {bound(row['removed_excess_cumulative_lo'])}), excess emergence "
              f"{count(row['emerged_excess_total'])}, phase boundary {_none(row['phase_boundary'])}, "
              f"held-out loss min at step {_none(row['heldout_loss_min_step'])}")
    for line in result["differences"]:
        print(f"not like for like: {line}")
    return 0


BENCH_PLAYERS = 6
BENCH_TEXT = "Question: Which famous old city is the capital of France, the large country in western Europe? Answer:"


def _none(x) -> str:
    return "none" if x is None else str(x)


def _engine_list(text: str) -> list[str]:
    """An argparse ``type`` for ``--engines``: comma-separated names of :data:`sftint_fast.bench.ENGINES`."""
    from sftint_fast.bench import ENGINES

    names = [x.strip() for x in text.split(",")]
    unknown = [x for x in names if x not in ENGINES]  # an empty entry ("naive,,trie") is a typo, not a skip
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated names from {', '.join(ENGINES)}, "
                                         f"received {text!r}")
    return names


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time naive vs trie on your model and prompt (speedup, ideal ratio, memory, "
                                     "exactness)")
    _add_model_args(p)
    p.add_argument("--text", default=BENCH_TEXT, help="the prompt (default: a short QA prompt)")
    _add_game_args(p, f" (default {BENCH_PLAYERS} with --players all)")
    p.add_argument("--engines", type=_engine_list, default=["naive", "trie"],
                   help="comma-separated, the first is the reference: naive, trie, trie-torch, trie-triton "
                        "(default naive,trie)")
    p.add_argument("--sample", type=_int_at_least(1), default=None,
                   help="time this many random variants (distinct bitmasks) instead of all 2^n")
    p.add_argument("--seed", type=int, default=None, help="seed of --sample (default 0)")
    p.add_argument("--repeat", type=_int_at_least(1), default=1,
                   help="timed runs per engine (the median is shown; default 1)")
    p.add_argument("--compute-dtype", choices=["float32", "tf32", "bfloat16"], default=None,
                   help="tf32: TF32 matmuls on CUDA; bfloat16: autocast of a float32 model (naive only)")
    p.add_argument("--threads", type=_int_at_least(1), default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default=None, help="write the report as JSON here (with its config)")
    p.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    import torch

    import sftint_fast as sf
    from sftint_fast.bench import compare_engines, format_report, sample_subsets, to_json
    from sftint_fast.interactions.result import _atomic_write
    from sftint_fast.models import resolve_device
    from sftint_fast.players import is_content_word

    refusal = _out_refusal("bench", "--out", args.out, "file")
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    try:
        players = _parse_players(args.players)
        resolve_device(args.device)
    except ValueError as err:
        print(f"sftint bench: --{err}", file=sys.stderr)
        return 2
    _refuse_unused("--pick", args.pick if players != "words" else None, "with --n-players or --players all",
                   f"with --players {args.players}")
    _refuse_unused("--n-players", args.n_players if players != "words" else None, "with --players all",
                   f"with --players {args.players}")
    _refuse_unused("--seed", args.seed if args.sample is None else None, "with --sample", "without --sample")
    _refuse_template_kwargs(args)
    if args.compute_dtype == "bfloat16" and args.dtype == "float32" and args.engines != ["naive"]:
        raise ValueError("--compute-dtype: expected bfloat16 only with --engines naive or --dtype bfloat16 (on a "
                         "float32 model it runs under autocast, which only the naive engine supports), received "
                         f"--compute-dtype bfloat16 with --dtype float32 and --engines {','.join(args.engines)}")
    pick = args.pick or "first"
    seed = 0 if args.seed is None else args.seed
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = _load(args)
    options = {"target": args.target, "chat": args.chat, "masking": args.masking,
               "chat_template_kwargs": args.chat_template_kwargs}
    try:
        game = sf.Game.from_text(model, tokenizer, args.text, players=players, n_players=args.n_players,
                                 pick=pick if args.n_players is not None else "first", **options)
        if args.n_players is None and players == "words" and game.num_players > BENCH_PLAYERS:
            # the default: the first BENCH_PLAYERS content words (the first words when there are too few of those)
            content = sum(map(is_content_word, game.words))
            if content >= BENCH_PLAYERS:
                game = sf.Game.from_text(model, tokenizer, args.text, players="words", n_players=BENCH_PLAYERS,
                                         pick=pick, **options)
            else:  # these players of the game, not word indices: words that share a token are one player
                keep = slice(None, BENCH_PLAYERS) if pick == "first" else slice(-BENCH_PLAYERS, None)
                game = dataclasses.replace(game, player_spans=game.player_spans[keep], words=game.words[keep])
    except ValueError as err:
        if _debug():
            raise
        print(f"sftint bench: {err}\n{_DEBUG_HINT}", file=sys.stderr)
        return 2
    subsets = None
    if args.sample is not None:
        total = 1 << game.num_players
        if args.sample > total:
            print(f"sftint bench: --sample: expected at most 2^{game.num_players} = {total} variants, received "
                  f"{args.sample}", file=sys.stderr)
            return 2
        subsets = sample_subsets(game.num_players, args.sample, seed=seed)
    try:
        report = compare_engines(model, game, args.engines, subsets=subsets, repeat=args.repeat, progress=True,
                                 compute_dtype=args.compute_dtype)
    except ValueError as err:
        if _debug():
            raise
        print(f"sftint bench: {_cli_message('bench', err)}\n{_DEBUG_HINT}", file=sys.stderr)
        return 2
    report["config"] = {"model": args.model, "text": args.text, "players": args.players, "n_players": game.num_players,
                        "pick": pick, "base": args.base, "target": args.target, "chat": args.chat,
                        "chat_template_kwargs": args.chat_template_kwargs,
                        "masking": args.masking,
                        "engines": args.engines,
                        "sample": args.sample, "seed": seed, "dtype": args.dtype,
                        "compute_dtype": args.compute_dtype}
    print(format_report(report))
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(out, lambda tmp: Path(tmp).write_text(to_json(report), encoding="utf-8"))
        print(f"wrote {out}")
    return 0


# Subcommands register here, in the order `sftint --help` lists them.
class _StderrHandler(logging.Handler):
    """Prints the package's log records to the current ``sys.stderr`` (looked up at each record)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _show_progress_messages() -> None:
    """A command shows the package's INFO messages (probes dropped, a resumed run, each tracked checkpoint...) on
    stderr, from the main process only under ``torchrun``; a program that configured logging itself keeps its own."""
    import os

    package = logging.getLogger("sftint_fast")
    if any(isinstance(h, _StderrHandler) for h in package.handlers) or logging.getLogger().handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("sftint: %(message)s"))
    handler.addFilter(lambda record: os.environ.get("RANK", "0") == "0")
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)


_COMMANDS = [_add_info, _add_explain, _add_probes, _add_track, _add_demo, _add_compare, _add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftint", description=(
        "Fast AND-OR interaction explanations of LLMs, and tracking of what supervised fine-tuning removes, keeps "
        "and adds. 'sftint <command> --help' describes each command; 'sftint demo' runs the main job on the "
        "bundled model."), epilog=(
        "exit codes: 0 done; 2 refused before or while running, with a one-line message on stderr (a usage error, "
        "or an option, file, model or checkpoint the command or library refused; SFTINT_DEBUG=1 shows the "
        "traceback instead); 1 ran but found less than asked (sftint probes); 130 interrupted (Ctrl-C); any other "
        "failure shows its traceback (exit 1)."))
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand. A ``ValueError``/``TypeError``/``OSError`` (a bad model folder, text, file or option the
    library refused with its own message) or an ``ImportError`` (a missing extra, with its install command) prints
    that message and returns 2 instead of a traceback;
    ``SFTINT_DEBUG=1`` re-raises it."""
    args = build_parser().parse_args(argv)
    _show_progress_messages()
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError, ImportError) as err:
        if _debug():
            raise
        print(f"sftint {args.command}: {_cli_message(args.command, err)}\n{_DEBUG_HINT}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback, and whether a rerun picks up what was saved
        if _debug():
            raise
        print(f"sftint {args.command}: interrupted{_resumes(args)}", file=sys.stderr)
        return 130


def _resumes(args: argparse.Namespace) -> str:
    """What a rerun of an interrupted command keeps: each file is saved whole or not at all."""
    if args.command in ("track", "demo") or (args.command == "explain" and args.file and args.out):
        return f"; what was saved in {args.out} is kept, and the same command resumes from it"
    return ""


if __name__ == "__main__":
    sys.exit(main())
