"""The trie engine: every distinct prefix of the ``2^n`` variants computed once, its KV reused by its descendants.

Levels run in order (see :mod:`sftint_fast.engine.plan`). Per level and chunk of nodes: the segment's input
embeddings (embedding masking: the baseline replaces player ``j``'s rows where the node's bit ``j`` is 0), the
adapter's layer loop writing K/V into one flat store per layer and attending through
:func:`~sftint_fast.ops.subset_attention.subset_attention`, and at the last level the LM head on the scored
positions only.

With the fused Triton kernel (``attention_backend="triton"``) a pass's attention is one launch per layer over all its
chunks (:func:`~sftint_fast.ops.triton.subset_attention.subset_attention_pass`), each node's own segment is read
from the pass's fresh K/V, and the last level is never stored (``plan_trie(window=False)``). The layer loop's
RMSNorms, RoPE and SiLU gate run as fused ops (:data:`FUSE_ELEMENTWISE`): Triton ones with that kernel, the C++
extension's on float32 CPU models.

:func:`evaluate_trie_games` runs several games of one layout (same length and player spans; any tokens, baselines,
targets and value functions) through one plan: each game has its own KV block, and the passes put the same level
of every game side by side, so the small levels of many games share their GEMMs and their Python overhead.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Literal, Sequence

import torch
from tqdm.auto import tqdm

from sftint_fast._ext import has_ext
from sftint_fast.engine.adapters import Adapter, find_adapter
from sftint_fast.engine.adapters.base import FusedBackend
from sftint_fast.engine.plan import PlanUnit, TriePlan, default_max_memory, default_pass_tokens, plan_trie
from sftint_fast.game import raise_faults
from sftint_fast.ops.subset_attention import _subset_attention, key_layout
from sftint_fast.ops.triton import KERNEL_DTYPES

logger = logging.getLogger(__name__)

#: Run the layer loop's RMSNorms, RoPE and SiLU gate as fused ops: Triton ones with the fused attention kernel
#: (``attention_backend="triton"``, ``sftint_fast.ops.triton.{rms_norm, rope, silu_mul}``), the C++ extension's on
#: float32 CPU models (``sftint_fast.ops.layer_ops``). ``SFTINT_FUSE_ELEMENTWISE=0`` in the environment turns them off
#: (the model's own modules); the benchmarks time both settings.
FUSE_ELEMENTWISE = os.environ.get("SFTINT_FUSE_ELEMENTWISE", "1") != "0"


def elementwise_backend(attention_backend: str, device: torch.device) -> FusedBackend | None:
    """Which fused elementwise ops the layer loop uses (:data:`FUSE_ELEMENTWISE`), or None for the model's modules."""
    if not FUSE_ELEMENTWISE:
        return None
    if attention_backend == "triton":
        return "triton"
    if device.type == "cpu" and has_ext():
        return "cpu"
    return None


def _segment_embeds(embeds: torch.Tensor, baseline: torch.Tensor, plan: TriePlan, level: int,
                    nodes: torch.Tensor, embedding_masking: bool) -> torch.Tensor:
    """``[C, S, H]`` inputs of ``nodes`` at ``level``: the segment's embedding rows, masked player replaced."""
    start = plan.level_positions[level]
    seg = embeds[start:start + plan.level_lens[level]]
    chunk_embeds = seg.unsqueeze(0).expand(len(nodes), -1, -1)
    player_len = plan.player_lens[level]
    if not embedding_masking or level == 0 or player_len == 0:
        return chunk_embeds
    player = level - 1
    row = baseline if baseline.dim() == 1 else baseline[player]
    dropped = ((nodes.to(seg.device) >> player) & 1) == 0
    replace = dropped[:, None] & (torch.arange(seg.shape[0], device=seg.device) < player_len)[None, :]
    return torch.where(replace[:, :, None], row.to(seg.dtype), chunk_embeds)


class _Chunk:
    """One chunk of a pass: its level, game, nodes (CPU and device), token range in the pass, attention tables."""

    def __init__(self, unit: PlanUnit, start: int, stop: int, nodes: torch.Tensor, tables: tuple[torch.Tensor, ...],
                 path_index: torch.Tensor | None = None):
        self.level, self.game, self.nodes_cpu, self.nodes = unit.level, unit.game, unit.nodes, nodes
        self.start, self.stop, self.tables, self.path_index = start, stop, tables, path_index


class _Pass:
    """A pass's chunks plus its store rows ``[T]`` and positions ``[T]`` for all its ``T`` tokens (in chunk order).

    Every index tensor is built on the CPU and reaches the device in one (pinned, asynchronous) copy, so setting
    up a pass never waits for the GPU. ``fused``: the fused kernel's pass tables (``fused_tables``) instead of the
    torch path's per-chunk tables (which stay on the CPU: that path reads them as Python ints, without syncs).
    ``keep``: the pass rows of the leaves' scored tokens (``score_rel``: their offsets in a leaf segment), leaf by leaf
    in chunk order: the only rows whose final hidden state is read (the last layer computes the rest's K/V only).
    A compact plan (sampled subsets) addresses the store by node index, not id: the pass then carries each node's
    ancestor indices (``path_index``: per chunk for the torch path, one ``[N, n + 1]`` table for the fused kernel).
    """

    def __init__(self, plan: TriePlan, units: tuple[PlanUnit, ...], device: torch.device,
                 fused: bool = False, score_rel: tuple[int, ...] = ()) -> None:
        nodes, rows, positions, tables, meta, pass_offsets, keep, paths = [], [], [], [], [], [], [], []
        width = plan.num_players + 1
        start = stored = 0
        for index, unit in enumerate(units):
            level, ids = unit.level, unit.nodes
            seg_len = plan.level_lens[level]
            path = plan.path_index(level, ids) if plan.compact else None
            own = ids if path is None else path[:, level]  # each node's index among its level's stored nodes
            offsets = plan.offsets(level, int(own[0]), unit.game)
            steps = torch.arange(seg_len)
            nodes.append(ids)
            if path is not None:
                paths.append((torch.nn.functional.pad(path, (0, width - level - 1)) if fused else path).reshape(-1))
            if plan.window or level < plan.num_players:  # without a window the last level is never stored
                rows.append((offsets[level] + own[:, None] * seg_len + steps).reshape(-1))
                stored += len(ids) * seg_len
            positions.append((plan.level_positions[level] + steps).repeat(len(ids)))
            first_rows = start + torch.arange(len(ids)) * seg_len  # each node's first row in the pass
            if level == plan.num_players:
                keep.append((first_rows[:, None] + torch.tensor(score_rel, dtype=torch.int64)).reshape(-1))
            if fused:  # one kernel launch for the pass: a meta row per node, an offsets row per chunk
                meta.append(torch.stack([ids, torch.full_like(ids, level), first_rows,
                                         torch.full_like(ids, index)], dim=1).reshape(-1))
                pass_offsets.append(torch.tensor(offsets + (0,) * (width - len(offsets))))
            else:
                tables.append(torch.tensor([t[:level + 1] for t in
                                            (offsets, plan.level_lens, plan.player_lens, plan.level_positions)]))
            start += len(ids) * seg_len
        sizes = [len(ids) for ids in nodes]
        extra = []
        if fused:
            extra = [torch.cat(meta), torch.cat(pass_offsets),
                     torch.tensor([plan.level_lens, plan.player_lens, plan.level_positions]).reshape(-1)]
        keep_t = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.int64)
        flat = torch.cat(nodes + rows + [torch.cat(positions), keep_t] + extra + paths)
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        parts = flat.split(sizes + [stored, start, keep_t.numel()] + [t.numel() for t in extra + paths])
        path_parts = parts[len(parts) - len(paths):] if paths else ()
        #: store rows of the pass's first ``stored`` tokens (chunks are in level order: the last level comes last)
        self.rows, self.positions, self.stored = parts[len(sizes)], parts[len(sizes) + 1], stored
        self.keep = parts[len(sizes) + 2]
        #: the fused kernel's pass tables (:func:`~sftint_fast.ops.triton.subset_attention.subset_attention_pass`)
        self.fused_tables: tuple[torch.Tensor, ...] | None = None
        self.max_seg_len = max(plan.level_lens[unit.level] for unit in units)
        #: the fused kernel's ``[N, n + 1]`` path-index table (compact plans), else None
        self.path_index: torch.Tensor | None = None
        if fused:
            meta_t, offsets_t, shared = parts[len(sizes) + 3:len(sizes) + 6]
            self.fused_tables = (meta_t.view(-1, 4), offsets_t.view(len(units), width), *shared.view(3, width))
            if paths:
                self.path_index = torch.cat(path_parts).view(-1, width)
        self.chunks: list[_Chunk] = []
        start = 0
        for i, (unit, ids, size) in enumerate(zip(units, parts, sizes)):
            stop = start + size * plan.level_lens[unit.level]
            path_index = path_parts[i].view(size, -1) if paths and not fused else None
            self.chunks.append(_Chunk(unit, start, stop, ids, tuple(tables[i].view(4, -1)) if tables else (),
                                      path_index))
            start = stop


def subset_attention_pass(*args, **kwargs) -> torch.Tensor:
    """The fused kernel's pass entry point without the check of the tables' values (node ids, store rows): the plan
    built them, and reading them on the host would be a GPU sync per layer."""
    from sftint_fast.ops.triton.subset_attention import _subset_attention_pass as fused_pass

    return fused_pass(*args, **kwargs, check_ids=False)


def trie_layout(game: Any) -> tuple:
    """What games planned together must share: length, player spans, scored positions and masking mode."""
    return (int(game.input_ids.shape[-1]), tuple((int(s), int(e)) for s, e in game.player_spans),
            tuple(int(p) for p in game.score_positions.tolist()), getattr(game, "masking", "embedding"))


def _check_game(game: Any, adapter: Adapter, subsets: torch.Tensor | None) -> None:
    masking = getattr(game, "masking", "embedding")
    if masking not in ("embedding", "attention"):
        raise ValueError(f"game.masking must be 'embedding' or 'attention', got {masking!r}")
    hidden = adapter.dims.hidden_size
    baseline = game.baseline
    n = len(game.player_spans)
    if masking == "embedding" and baseline.shape not in ((hidden,), (n, hidden)):
        raise ValueError(f"game.baseline must have shape ({hidden},) or ({n}, {hidden}), got "
                         f"{tuple(baseline.shape)}")
    score_start = int(game.score_positions[0])
    if n and score_start < game.player_spans[-1][0]:
        raise ValueError(f"the scored positions (from {score_start}) must lie after the last player's start "
                         f"({game.player_spans[-1][0]})")
    if subsets is not None and (not isinstance(subsets, torch.Tensor) or subsets.dtype != torch.int64):
        got = subsets.dtype if isinstance(subsets, torch.Tensor) else type(subsets).__name__
        raise TypeError(f"subsets must be an int64 tensor of bitmasks, got {got}")


@torch.no_grad()
def evaluate_trie(model: torch.nn.Module, game: Any, subsets: torch.Tensor | None = None, *,
                  batch_size: int | None = None, max_memory: int | None = None, progress: bool = True,
                  attention_backend: Literal["torch", "triton"] = "torch") -> torch.Tensor:
    """Values of ``game`` on the requested variants, each distinct prefix computed once.

    Args:
        model: a causal LM that :func:`~sftint_fast.engine.adapters.get_adapter` supports.
        game: the :class:`~sftint_fast.game.Game` (``input_ids (L,)``, ``player_spans``, ``baseline``, ``masking``,
            ``score_positions (m,)``, ``values_and_faults``).
        subsets: ``(B,)`` int64 bitmasks (bit ``i`` = player ``i`` kept); None = all ``2^n`` in bitmask order.
        batch_size: at most this many trie nodes per pass. max_memory: byte budget (default: a safe fraction of
            free memory). progress: tqdm bar over the passes.
        attention_backend: ``"torch"`` (gather + SDPA) or ``"triton"`` (fused kernel).

    Returns:
        float32 ``(2^n,)`` indexed by bitmask, or ``(B,)`` in the order of ``subsets``, on the model's device.

    Example:
        >>> v = evaluate_trie(model, game)  # doctest: +SKIP
    """
    return evaluate_trie_games(model, [game], subsets, batch_size=batch_size, max_memory=max_memory,
                               progress=progress, attention_backend=attention_backend)[0]


@torch.no_grad()
def evaluate_trie_games(model: torch.nn.Module, games: Sequence[Any], subsets: torch.Tensor | None = None, *,
                        batch_size: int | None = None, max_memory: int | None = None, progress: bool = True,
                        attention_backend: Literal["torch", "triton"] = "torch",
                        adapter: Adapter | None = None) -> list[torch.Tensor]:
    """:func:`evaluate_trie` on several games of one layout at once (one plan, shared passes).

    The games must have the same length, player spans, scored positions and masking mode (ValueError
    otherwise); tokens, baselines, targets and value functions may differ. ``batch_size`` bounds the nodes of a
    pass over all games; the KV stores hold every game's levels (``plan_trie(..., num_games=len(games))`` says
    how much memory that takes and raises when it does not fit). ``adapter``: the one
    :func:`~sftint_fast.engine.adapters.find_adapter` just returned for ``model`` (``sf.evaluate`` passes the one its
    choice of engine found: its hook and forward checks walk every module, a few ms per call); None finds it.

    Returns:
        one float32 tensor per game, as :func:`evaluate_trie` returns it.
    """
    games = list(games)
    if attention_backend not in ("torch", "triton"):
        raise ValueError(f"attention_backend: expected 'torch' or 'triton', received {attention_backend!r}")
    if adapter is not None and not isinstance(adapter, Adapter):
        raise TypeError(f"adapter: expected a sftint_fast.engine.adapters.Adapter or None, received "
                        f"{type(adapter).__name__}")
    if not games:
        return []
    if adapter is None:
        adapter, reason = find_adapter(model)
        if adapter is None:
            raise ValueError(f"{reason}; use method='naive'")
    if attention_backend == "triton" and adapter.dims.dtype not in KERNEL_DTYPES:
        raise ValueError(f"attention_backend='triton': expected a float16, bfloat16 or float32 model (what the fused "
                         f"kernels load), received a {adapter.dims.dtype} model; use attention_backend='torch'")
    layout = trie_layout(games[0])
    for i, game in enumerate(games):
        _check_game(game, adapter, subsets)
        if trie_layout(game) != layout:
            raise ValueError(f"games[{i}]: expected the layout of games[0] (length, player spans, scored positions, "
                             f"masking) {layout}, received {trie_layout(game)}")
    device = next(model.parameters()).device
    if subsets is not None and subsets.numel() == 0:  # nothing to evaluate (sf.evaluate answers this itself)
        return [torch.empty(0, dtype=torch.float32, device=device) for _ in games]
    if max_memory is None:
        max_memory = default_max_memory(device)
    first = games[0]
    plan = plan_trie(first, subsets=subsets, dims=adapter.dims, batch_size=batch_size, max_memory=max_memory,
                     num_targets=int(first.score_positions.numel()), num_games=len(games),
                     pass_tokens=default_pass_tokens(device), window=attention_backend != "triton")
    dims = adapter.dims
    n = plan.num_players
    attention_masking = getattr(first, "masking", "embedding") == "attention"
    embeds = [adapter.embed(game.input_ids.to(device)) for game in games]
    baselines = [game.baseline.to(device) for game in games]
    targets = [game.target.to(device) for game in games]  # once: a blocking copy per pass would wait for the GPU
    store_shape = (plan.store_rows, dims.num_kv_heads, dims.head_dim)
    k_stores = [torch.empty(store_shape, dtype=dims.dtype, device=device) for _ in range(dims.num_layers)]
    v_stores = [torch.empty(store_shape, dtype=dims.dtype, device=device) for _ in range(dims.num_layers)]
    score_rel = tuple(int(p) - plan.level_positions[n] for p in first.score_positions.tolist())
    num_scores = len(score_rel)
    last_layer = dims.num_layers - 1

    leaf_values = torch.empty(len(games), len(plan.level_nodes[n]), dtype=torch.float32, device=device)
    # the values' NaN/inf flags, read once at the end: read per pass, they would stall the GPU after every leaf pass
    leaf_faults = torch.empty(len(games), len(plan.level_nodes[n]), dtype=torch.uint8, device=device)
    done = [0] * len(games)
    fused = attention_backend == "triton"
    elementwise = elementwise_backend(attention_backend, device)
    for units in tqdm(plan.passes, desc="trie passes", disable=not progress, leave=False):
        pass_ = _Pass(plan, units, device, fused=fused, score_rel=score_rel)
        chunks = pass_.chunks
        leaves = [c for c in chunks if c.level == n]
        inputs = torch.cat([_segment_embeds(embeds[c.game], baselines[c.game], plan, c.level, c.nodes,
                                            not attention_masking).reshape(-1, dims.hidden_size) for c in chunks])

        # the torch backend's key rows and masks are the same in every layer: built once per chunk
        layouts = [key_layout(c.nodes, *c.tables, level=c.level, attention_masking=attention_masking,
                              path_index=c.path_index)
                   if attention_backend == "torch" else None for c in chunks]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # every chunk's K/V first (one copy for the pass): a chunk may read its ancestors from this same pass
            if pass_.stored:
                k_stores[layer].index_copy_(0, pass_.rows, k[:pass_.stored])
                v_stores[layer].index_copy_(0, pass_.rows, v[:pass_.stored])
            if layer == last_layer and not leaves:  # nothing reads this pass's last attention: only its K/V
                return torch.empty_like(q)
            spec = adapter.layers[layer]
            if fused:  # every chunk of the pass in one launch, straight into one output; own segments from k, v
                return subset_attention_pass(q, k_stores[layer], v_stores[layer], *pass_.fused_tables,
                                             max_seg_len=pass_.max_seg_len, scale=spec.scale,
                                             attention_masking=attention_masking, softcap=spec.softcap,
                                             sinks=spec.sinks, sliding_window=spec.sliding_window, k_pass=k, v_pass=v,
                                             path_index=pass_.path_index)
            return torch.cat([
                _subset_attention(q[c.start:c.stop].unflatten(0, (len(c.nodes), -1)), k_stores[layer],
                                  v_stores[layer], c.nodes, *c.tables, level=c.level, scale=spec.scale,
                                  attention_masking=attention_masking, softcap=spec.softcap, sinks=spec.sinks,
                                  sliding_window=spec.sliding_window, backend=attention_backend, layout=layout,
                                  path_index=None, check_ids=False).flatten(0, 1)
                for c, layout in zip(chunks, layouts)])

        # the final hidden states of the leaves' scored tokens only: [leaf nodes * num_scores, H], leaf by leaf
        hidden = adapter.run_layers(inputs, pass_.positions, attend, keep=pass_.keep, fused=elementwise,
                                    seq_len=plan.seq_len)
        if leaves:  # one LM head call for every game's leaves in this pass
            rows = hidden.unflatten(0, (-1, num_scores))
            logits = adapter.logits(rows).float().split([len(c.nodes) for c in leaves])
            for c, chunk_logits in zip(leaves, logits):
                values, faults = games[c.game].values_and_faults(chunk_logits, target=targets[c.game])
                leaf_values[c.game, done[c.game]:done[c.game] + len(c.nodes)] = values
                leaf_faults[c.game, done[c.game]:done[c.game] + len(c.nodes)] = faults
                done[c.game] += len(c.nodes)
    if bool(leaf_faults.any()):  # the evaluation's one host sync; the leaves are plan.level_nodes[n] in order
        for faults in leaf_faults:
            raise_faults(faults, plan.level_nodes[n])
    leaf_index = plan.leaf_index.to(device)
    return [row[leaf_index] for row in leaf_values]
