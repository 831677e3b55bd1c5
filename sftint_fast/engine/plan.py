"""The trie plan: segments, nodes per level, token counts and the memory budget that sets the chunk sizes.

Prompt = ``bg_0 p_0 bg_1 p_1 … p_{n-1} bg_n``. Level 0 is one node owning ``bg_0``; node ``m`` of level ``j+1``
(a bitmask over players ``< j+1``) owns ``p_j bg_{j+1}``. Tokens computed:
``|bg_0| + Σ_j 2^{j+1}(|p_j| + |bg_{j+1}|)`` instead of ``2^n · L``.

KV store layout (per layer, ``[store_rows, Hkv, D]``): levels ``0..n-1`` back to back, then a window for the last
level. A level's stored nodes are ``level_nodes[j]`` in id order, node of index ``i`` at rows
``level_offsets[j] + i * level_lens[j]``: for all ``2^n`` variants the index is the node id itself; for sampled
subsets (a *compact* plan) only the nodes the subsets reach are stored, so the store grows with the sample, not
with ``2^n``, and the engine hands the attention each node's ancestor indices (:meth:`TriePlan.path_index`) instead
of letting it compute ancestor ids from the bits. The last level's KV is read only by its own nodes, so it is
never stored whole: a chunk of nodes with indices ``[a, a + W)`` writes into the window, addressed with the shifted
offset ``window_start - a * level_lens[n]`` (:meth:`TriePlan.last_level_offset`).

Execution is in passes: a pass is a run of consecutive chunks (in level order) that goes through the layers
together — one set of GEMMs over all its tokens, with each chunk's attention done after every chunk of the pass
has written that layer's K/V (a chunk's ancestors are in the same pass or an earlier one). Small early levels
thus share their weight reads instead of costing a full pass each. A pass holds at most one last-level chunk
per game (each game's window holds one chunk).

With ``window=False`` (the fused Triton kernel, which reads every node's own segment from the pass's own K/V) the
last level is not stored at all: no window, and a pass may hold several last-level chunks.

Several games with the same layout (``num_games``; same length and spans, other tokens and baselines) share one
plan: game ``g`` owns rows ``[g * game_rows, (g + 1) * game_rows)`` of each store, laid out as above, and the passes
run the same level of every game together, so small levels of many games fill one set of GEMMs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from sftint_fast._memory import free_memory
from sftint_fast.engine.adapters import ModelDims, get_adapter

logger = logging.getLogger(__name__)

#: Tokens per chunk and per pass the planner aims for by default: large GEMMs, activations still small.
TARGET_CHUNK_TOKENS = 8192
#: The engine's tokens per pass by device type (:func:`default_pass_tokens`). On a GPU the layer loop's host work
#: (a few dozen kernel launches per layer and pass) outlasts the GEMMs of an 8192-token pass of a small model in
#: bf16, so GPU passes are larger; on the CPU, compute dominates and smaller passes keep activations in cache.
PASS_TOKENS = {"cuda": 32768, "cpu": TARGET_CHUNK_TOKENS}
#: Share of the free memory used when ``max_memory`` is not given.
FREE_MEMORY_FRACTION = 0.6
_GIB = 1024**3


class TrieMemoryError(ValueError):
    """The trie plan does not fit the memory budget (the message says how much it needs and what the budget is)."""


def _size(num_bytes: float) -> str:
    return f"{num_bytes / _GIB:.2f} GiB ({int(num_bytes)} bytes)"


class PlanUnit(NamedTuple):
    """One chunk of a pass: ``nodes`` (int64 ids) of ``level`` of game ``game``."""

    level: int
    nodes: torch.Tensor
    game: int = 0


@dataclass(frozen=True, eq=False)
class TriePlan:
    """A game's trie schedule. Per-level tuples have ``n + 1`` entries (levels ``0..n``).

    Attributes:
        num_players, seq_len: ``n`` and ``L``.
        level_lens: tokens each node owns at each level; level_positions: absolute position of each segment's
            first token; player_lens: player tokens at the start of each segment (0 at level 0).
        level_nodes: per level, the sorted int64 node ids computed (all ``2^j``, or those the subsets reach).
        compact: the store holds only ``level_nodes`` (sampled subsets that leave some prefix out): a node's index
            in its level is its rank in ``level_nodes[j]`` (:meth:`node_index`), not its id. False for all ``2^n``.
        leaf_index: ``(len(subsets),)`` int64: row of each requested subset among ``level_nodes[n]``.
        level_chunk_nodes: nodes per chunk at each level.
        window_nodes: with a window, the nodes ``W`` of the last level's KV window (the last level's chunk size:
            a chunk's node indices lie in ``[a, a + W)``); 0 without a window.
        passes: the execution schedule: each pass a tuple of :class:`PlanUnit` ``(level, node ids, game)`` chunks run
            through the layers together (``batch_size`` bounds the nodes of a pass).
        level_offsets: start row of each stored level (levels ``< n``) in game 0's block (level ``j`` holds
            ``len(level_nodes[j]) * level_lens[j]`` rows); ``window_start`` /
            ``window_rows``: the last level's window; ``game_rows``: rows of one game's block; ``store_rows``: rows
            per layer store (``num_games * game_rows``).
        num_games: games planned together (same layout).
        trie_tokens, naive_tokens, ideal_ratio: tokens computed by the trie, by ``2^n`` (or ``len(subsets)``) full
            sequences (both per game), and their ratio.
        kv_bytes, activation_bytes, peak_bytes: memory estimates (KV stores of all layers and games; the largest
            pass's activations, with what a forward holds whatever its tokens, ``ModelDims.forward_bytes``; their
            sum). ``max_memory``: the budget the chunk sizes were fitted to (None = no model).
    """

    num_players: int
    seq_len: int
    level_lens: tuple[int, ...]
    level_positions: tuple[int, ...]
    player_lens: tuple[int, ...]
    level_nodes: tuple[torch.Tensor, ...]
    leaf_index: torch.Tensor
    level_chunk_nodes: tuple[int, ...]
    passes: tuple[tuple[PlanUnit, ...], ...]
    level_offsets: tuple[int, ...]
    window_start: int
    window_rows: int
    game_rows: int
    store_rows: int
    num_games: int
    trie_tokens: int
    naive_tokens: int
    ideal_ratio: float
    kv_bytes: int
    activation_bytes: int
    peak_bytes: int
    max_memory: int | None
    window: bool = True
    window_nodes: int = 0
    compact: bool = False

    @property
    def node_counts(self) -> tuple[int, ...]:
        return tuple(len(nodes) for nodes in self.level_nodes)

    def chunks(self, level: int) -> list[torch.Tensor]:
        """The node-id chunks of ``level`` in order (consecutive runs of ``level_nodes[level]``)."""
        return list(self.level_nodes[level].split(self.level_chunk_nodes[level]))

    def node_index(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Indices of ``nodes`` (int64 ids of computed nodes) among ``level``'s stored nodes: the ids themselves,
        or (compact plan) their ranks in ``level_nodes[level]``."""
        if not self.compact:
            return nodes
        return torch.searchsorted(self.level_nodes[level], nodes)

    def path_index(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """``[len(nodes), level + 1]`` int64: column ``k`` the index of each node's level-``k`` ancestor
        (``node & (2^k - 1)``) among level ``k``'s stored nodes, column ``level`` the node's own (the ``path_index``
        table :func:`~sftint_fast.ops.subset_attention.subset_attention` reads for a compact plan)."""
        nodes = nodes.cpu()
        return torch.stack([self.node_index(k, nodes & ((1 << k) - 1)) for k in range(level + 1)], dim=1)

    def last_level_offset(self, first_index: int, game: int = 0) -> int:
        """Virtual start row of the last level for a chunk of ``game`` whose first node has index ``first_index``
        (:meth:`node_index`)."""
        if not self.window:  # the last level is never stored: its K/V stay in the pass (no store row is read)
            return game * self.game_rows + self.window_start
        return game * self.game_rows + self.window_start - first_index * self.level_lens[self.num_players]

    def offsets(self, level: int, first_index: int, game: int = 0) -> tuple[int, ...]:
        """Start rows of levels ``0..level`` for a chunk of ``game`` at ``level`` whose first node has index
        ``first_index`` (:meth:`node_index`): the table :func:`~sftint_fast.ops.subset_attention.subset_attention`
        reads."""
        base = game * self.game_rows
        stored = tuple(base + offset for offset in self.level_offsets[:level])
        if level == self.num_players:
            return stored + (self.last_level_offset(first_index, game),)
        return stored + (base + self.level_offsets[level],)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data summary (JSON-serialisable)."""
        return {
            "num_players": self.num_players, "seq_len": self.seq_len, "level_lens": list(self.level_lens),
            "player_lens": list(self.player_lens), "node_counts": list(self.node_counts),
            "level_chunk_nodes": list(self.level_chunk_nodes), "num_passes": len(self.passes),
            "num_games": self.num_games, "trie_tokens": self.trie_tokens,
            "naive_tokens": self.naive_tokens, "ideal_ratio": self.ideal_ratio, "kv_bytes": self.kv_bytes,
            "activation_bytes": self.activation_bytes, "peak_bytes": self.peak_bytes, "max_memory": self.max_memory,
            "window": self.window, "window_nodes": self.window_nodes, "compact": self.compact,
        }


def default_max_memory(device: torch.device) -> int:
    """A safe fraction of the free memory on ``device`` (CUDA: ``mem_get_info``; CPU: :func:`~sftint_fast._memory.available_ram`)."""
    return int(free_memory(device) * FREE_MEMORY_FRACTION)


def default_pass_tokens(device: torch.device) -> int:
    """Tokens per pass the engine plans for on ``device`` (:data:`PASS_TOKENS`, else :data:`TARGET_CHUNK_TOKENS`)."""
    return PASS_TOKENS.get(torch.device(device).type, TARGET_CHUNK_TOKENS)


def _group_passes(units: list[PlanUnit], level_lens: list[int], unit_bytes: list[int], last_level: int,
                  max_nodes: int | None, room: int | None, pass_tokens: int) -> tuple[list, int]:
    """Greedy grouping of consecutive chunks into passes under the token, node and byte budgets; a pass holds at
    most one last-level chunk per game (the game's window)."""
    passes, current, tokens, nodes, used, peak, windows = [], [], 0, 0, 0, 0, set()
    for unit, cost in zip(units, unit_bytes):
        size = len(unit.nodes) * level_lens[unit.level]
        fits = (tokens + size <= pass_tokens and (max_nodes is None or nodes + len(unit.nodes) <= max_nodes)
                and (room is None or used + cost <= room)
                and not (unit.level == last_level and unit.game in windows))
        if current and not fits:
            passes.append(tuple(current))
            current, tokens, nodes, used, windows = [], 0, 0, 0, set()
        current.append(unit)
        tokens, nodes, used = tokens + size, nodes + len(unit.nodes), used + cost
        peak = max(peak, used)
        if unit.level == last_level:
            windows.add(unit.game)
    if current:
        passes.append(tuple(current))
    return passes, peak


def _segments(seq_len: int, player_spans: tuple[tuple[int, int], ...]) -> tuple[list[int], list[int], list[int]]:
    starts = [0] + [start for start, _ in player_spans]
    ends = starts[1:] + [seq_len]
    player_lens = [0] + [end - start for start, end in player_spans]
    return [end - start for start, end in zip(starts, ends)], starts, player_lens


def _level_nodes(num_players: int, subsets: torch.Tensor | None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    if subsets is None:
        nodes = tuple(torch.arange(1 << j, dtype=torch.int64) for j in range(num_players + 1))
        return nodes, nodes[-1]
    leaves, leaf_index = torch.unique(subsets, sorted=True, return_inverse=True)
    nodes = tuple(torch.unique(leaves & ((1 << j) - 1), sorted=True) for j in range(num_players)) + (leaves,)
    return nodes, leaf_index


def _chunk_activation_bytes(dims: ModelDims, seg_len: int, num_keys: int, num_targets: int, last: bool,
                            fused: bool = False) -> int:
    """Bytes one node of a chunk needs while a layer runs (hidden states, gathered K/V, scores, mask, logits);
    the fused kernel (``fused``) gathers no K/V and materialises no scores. A soft-capped attention
    (``dims.softcap``) keeps the gathered K/V and their copies repeated to every head, three float32 score tensors
    (the capped scores, the masked ones, their softmax) and the mask and its negation alive; attention sinks
    (``dims.sinks``) take that path too, with one more (the scores joined to the sink column)."""
    size = dims.dtype_bytes
    per_token = (4 * dims.hidden_size + dims.mlp_tensors * dims.intermediate_size
                 + 2 * dims.num_heads * dims.head_dim) * size
    if fused:
        gathered = scores = 0
    elif dims.softcap or dims.sinks:
        gathered = 2 * num_keys * (dims.num_heads + dims.num_kv_heads) * dims.head_dim * size
        score_tensors = 3 + (dims.softcap and dims.sinks)
        scores = score_tensors * dims.num_heads * seg_len * (num_keys + dims.sinks) * 4 + 2 * seg_len * num_keys
    else:
        gathered = 2 * num_keys * dims.num_heads * dims.head_dim * size  # K, V (GQA expanded at worst)
        scores = dims.num_heads * seg_len * num_keys * 4 + seg_len * num_keys
    logits = 2 * num_targets * dims.vocab_size * 4 if last else 0
    return seg_len * per_token + gathered + scores + logits


def _positive_int_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)


def plan_trie(game: Any, *, subsets: torch.Tensor | None = None, model: torch.nn.Module | None = None,
              dims: ModelDims | None = None, batch_size: int | None = None, max_memory: int | None = None,
              num_targets: int | None = None, num_games: int = 1, pass_tokens: int | None = None,
              window: bool = True) -> TriePlan:
    """Plan the trie evaluation of ``game`` (anything with ``input_ids (L,)`` and ``player_spans``).

    Args:
        game: a :class:`~sftint_fast.game.Game` or a layout object with ``input_ids`` and ``player_spans``.
        subsets: ``(B,)`` int64 bitmasks to evaluate (None = all ``2^n``); only the nodes they reach are planned
            and (when they leave some variant out) stored: the KV store grows with the sample, not with ``2^n``.
        model / dims: the model (or its :class:`ModelDims`) that sizes memory; without either, no memory plan
            (chunks are sized by :data:`TARGET_CHUNK_TOKENS` alone and memory fields are 0).
        batch_size: at most this many nodes per chunk.
        max_memory: bytes available for the KV store and activations (default: a safe fraction of free memory
            on the model's device).
        num_targets: scored positions ``m`` (default: ``len(game.target)`` if present, else 1).
        num_games: games of this layout evaluated together (each its own KV block and window).
        pass_tokens: tokens a chunk and a pass aim for (None = :data:`TARGET_CHUNK_TOKENS`; the engine passes
            :func:`default_pass_tokens` of the model's device). Memory still bounds them.
        window: keep the last level's K/V in a per-layer window of the store (the torch attention path reads them
            there); False when the attention reads each node's own segment from the pass (the fused kernel).

    Raises:
        ValueError: bad spans or subsets; :class:`TrieMemoryError` (a ValueError): a plan that does not fit
            ``max_memory`` even one node per chunk (the message says how much it needs, in GiB and bytes; raised
            before the node ids of all ``2^n`` variants are built); without a model, ids of all ``2^n`` variants
            that do not fit ``max_memory`` (default: a safe fraction of the available RAM).

    Example:
        >>> from types import SimpleNamespace
        >>> plan = plan_trie(SimpleNamespace(input_ids=torch.zeros(9), player_spans=((2, 3), (5, 7))))
        >>> plan.level_lens, plan.trie_tokens, plan.naive_tokens
        ((2, 3, 4), 24, 36)
    """
    seq_len = int(game.input_ids.shape[-1])
    player_spans = tuple((int(s), int(e)) for s, e in game.player_spans)
    previous_end = 0
    for start, end in player_spans:
        if not previous_end <= start < end <= seq_len:
            raise ValueError(f"player_spans must be sorted, disjoint, non-empty and inside [0, {seq_len}), "
                             f"got {player_spans}")
        previous_end = end
    num_players = len(player_spans)
    if subsets is not None:
        if not isinstance(subsets, torch.Tensor):
            raise TypeError(f"subsets must be a 1-D int64 tensor, got {type(subsets).__name__}")
        if subsets.dtype != torch.int64 or subsets.dim() != 1 or subsets.device.type == "meta":
            raise TypeError(f"subsets must be a 1-D int64 tensor, got {subsets.dtype} of shape {tuple(subsets.shape)} "
                            f"on {subsets.device}")
        if len(subsets) and (int(subsets.min()) < 0 or int(subsets.max()) >= 1 << num_players):
            raise ValueError(f"subsets must lie in [0, 2^{num_players}), got range "
                             f"[{int(subsets.min())}, {int(subsets.max())}]")
        subsets = subsets.cpu()
    for name, value in (("batch_size", batch_size), ("num_targets", num_targets), ("pass_tokens", pass_tokens),
                        ("num_games", num_games)):
        if not _positive_int_or_none(value) or (name == "num_games" and value is None):
            raise ValueError(f"{name}: expected a positive int{'' if name == 'num_games' else ' or None'}, "
                             f"received {value!r}")
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, (int, float))
                                   or not 0 < max_memory < math.inf):
        raise ValueError(f"max_memory: expected a positive finite number of bytes or None, received {max_memory!r}")
    if max_memory is not None:  # whole bytes: a float budget would make float chunk sizes
        max_memory = int(max_memory)
    if pass_tokens is None:
        pass_tokens = TARGET_CHUNK_TOKENS

    level_lens, level_positions, player_lens = _segments(seq_len, player_spans)
    # all 2^n: the node counts come from n alone, so a plan too large for memory is refused before its ids exist
    level_nodes, leaf_index = _level_nodes(num_players, subsets) if subsets is not None else (None, None)
    counts = ([len(nodes) for nodes in level_nodes] if level_nodes is not None
              else [1 << j for j in range(num_players + 1)])
    trie_tokens = sum(count * length for count, length in zip(counts, level_lens))
    naive_tokens = (len(subsets) if subsets is not None else 1 << num_players) * seq_len
    if num_targets is None:
        target = getattr(game, "target", None)
        num_targets = int(target.numel()) if target is not None else 1
    if dims is None and model is not None:
        adapter = get_adapter(model)
        dims = adapter.dims if adapter is not None else None

    chunk_nodes = [max(1, min(count, pass_tokens // max(length, 1))) for count, length in
                   zip(counts, level_lens)]
    if batch_size is not None:
        chunk_nodes = [min(c, batch_size) for c in chunk_nodes]
    # sampled subsets that leave some leaf out leave some node of every deeper level out: store only those reached
    compact = counts[-1] < 1 << num_players
    stored = [count * length for count, length in zip(counts[:-1], level_lens)]
    level_offsets = [sum(stored[:j]) for j in range(num_players)]
    window_start = sum(stored)
    window_nodes = chunk_nodes[-1] if window else 0
    kv_bytes = 0
    if dims is not None:
        if max_memory is None:
            device = model.device if model is not None and hasattr(model, "device") else torch.device("cpu")
            max_memory = default_max_memory(torch.device(device))
        row_bytes = dims.num_layers * 2 * dims.num_kv_heads * dims.head_dim * dims.dtype_bytes
        fixed = num_games * window_start * row_bytes
        held = dims.forward_bytes  # held by every forward whatever its tokens (PEFT's adapted MoE weights)
        per_node = [_chunk_activation_bytes(dims, level_lens[j], level_positions[j] + level_lens[j], num_targets,
                                            j == num_players, fused=not window) for j in range(num_players + 1)]
        # per last-level node (every game's window), for the run
        window_bytes = num_games * level_lens[-1] * row_bytes if window else 0
        other = max(per_node[:-1], default=0)
        needed = fixed + held + window_bytes + max(other, per_node[-1])
        if max_memory < needed:
            games = f" x {num_games} games" if num_games > 1 else ""
            reached = "the nodes the subsets reach" if compact else "all 2^j nodes"
            weights = f", + {_size(held)} of adapted weights a forward holds" if held else ""
            raise TrieMemoryError(f"the trie for n={num_players}, L={seq_len}{games} needs at least {_size(needed)} "
                                  f"(KV store {_size(fixed)}: {reached} of every level j < n, + one node's "
                                  f"activations{weights}), but max_memory is {_size(max_memory)}; evaluate fewer "
                                  f"players, games or subsets (subsets= samples variants), or use method='naive' (one "
                                  f"forward per variant: 2^{num_players} of them here)")
        room = max_memory - fixed - held
        fit = room // (per_node[-1] + window_bytes)
        if window_bytes:
            fit = min(fit, (room - other) // window_bytes)
        chunk_nodes[-1] = max(1, min(chunk_nodes[-1], fit))
        window_nodes = chunk_nodes[-1] if window else 0
        room -= window_nodes * window_bytes
        chunk_nodes[:-1] = [max(1, min(c, room // max(p, 1))) for c, p in zip(chunk_nodes[:-1], per_node[:-1])]
        kv_bytes = fixed + window_nodes * window_bytes
    else:
        per_node, room, held = [0] * (num_players + 1), None, 0
        if level_nodes is None:  # no KV store to size, but the int64 ids of all 2^j nodes of every level are built
            id_bytes = 8 * sum(counts)
            budget = max_memory if max_memory is not None else default_max_memory(torch.device("cpu"))
            if id_bytes > budget:
                raise TrieMemoryError(f"the trie plan for n={num_players}: the node ids of all 2^j nodes of every "
                                      f"level need {_size(id_bytes)}, but max_memory is {_size(budget)}"
                                      f"{'' if max_memory is not None else ' (the default)'}; pass subsets= to "
                                      "plan a sample, or evaluate fewer players")
    if level_nodes is None:
        level_nodes, leaf_index = _level_nodes(num_players, None)
    # Level by level, the same chunk of every game side by side: a chunk's ancestors are always scheduled earlier.
    units = [PlanUnit(level, ids, game) for level in range(num_players + 1) if level_lens[level] > 0
             for ids in level_nodes[level].split(chunk_nodes[level])
             for game in range(num_games)]
    passes, activation_bytes = _group_passes(units, level_lens, [len(u.nodes) * per_node[u.level] for u in units],
                                             num_players if window else -1, batch_size, room, pass_tokens)
    activation_bytes += held
    window_rows = window_nodes * level_lens[-1]
    game_rows = window_start + window_rows
    plan = TriePlan(
        num_players=num_players, seq_len=seq_len, level_lens=tuple(level_lens),
        level_positions=tuple(level_positions), player_lens=tuple(player_lens), level_nodes=level_nodes,
        leaf_index=leaf_index, level_chunk_nodes=tuple(chunk_nodes), passes=tuple(passes),
        level_offsets=tuple(level_offsets),
        window_start=window_start, window_rows=window_rows, game_rows=game_rows, store_rows=num_games * game_rows,
        num_games=num_games,
        trie_tokens=trie_tokens, naive_tokens=naive_tokens,
        ideal_ratio=naive_tokens / trie_tokens if trie_tokens else math.inf, kv_bytes=kv_bytes,
        activation_bytes=activation_bytes, peak_bytes=kv_bytes + activation_bytes, max_memory=max_memory,
        window=window, window_nodes=window_nodes, compact=compact,
    )
    logger.debug("trie plan: %s", plan.to_dict())
    return plan
