"""The trie engine: every distinct prefix of the ``2^n`` variants computed once, its KV reused by its descendants.

Levels run in order (see :mod:`sftint_fast.engine.plan`). Per level and chunk of nodes: the segment's input
embeddings (embedding masking: the baseline replaces player ``j``'s rows where the node's bit ``j`` is 0), the
adapter's layer loop writing K/V into one flat store per layer and attending through
:func:`~sftint_fast.ops.subset_attention.subset_attention`, and at the last level the LM head on the scored
positions only.
"""
from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from sftint_fast.engine.adapters import Adapter, get_adapter
from sftint_fast.engine.plan import TriePlan, default_max_memory, plan_trie
from sftint_fast.ops.subset_attention import subset_attention

logger = logging.getLogger(__name__)


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
    """One chunk of a pass: its nodes, its token rows in the pass, its store rows and its attention tables."""

    def __init__(self, plan: TriePlan, level: int, nodes: torch.Tensor, start: int, device: torch.device,
                 table_device: torch.device) -> None:
        seg_len = plan.level_lens[level]
        self.level, self.nodes_cpu, self.nodes = level, nodes, nodes.to(device)
        if level == plan.num_players:
            offsets = plan.level_offsets + (plan.last_level_offset(int(nodes[0])),)
        else:
            offsets = plan.level_offsets[:level + 1]
        steps = torch.arange(seg_len, device=device)
        self.rows = (offsets[level] + self.nodes[:, None] * seg_len + steps).reshape(-1)
        self.positions = (plan.level_positions[level] + steps).repeat(len(nodes))
        self.tables = tuple(torch.tensor(t[:level + 1], device=table_device) for t in
                            (offsets, plan.level_lens, plan.player_lens, plan.level_positions))
        self.start, self.stop = start, start + len(nodes) * seg_len


def _pass_chunks(plan: TriePlan, units: tuple[tuple[int, torch.Tensor], ...], device: torch.device,
                 table_device: torch.device) -> list[_Chunk]:
    chunks: list[_Chunk] = []
    for level, nodes in units:
        chunks.append(_Chunk(plan, level, nodes, chunks[-1].stop if chunks else 0, device, table_device))
    return chunks


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
    if subsets is not None and subsets.dtype != torch.int64:
        raise TypeError(f"subsets must be an int64 tensor of bitmasks, got {subsets.dtype}")


@torch.no_grad()
def evaluate_trie(model: torch.nn.Module, game: Any, subsets: torch.Tensor | None = None, *,
                  batch_size: int | None = None, max_memory: int | None = None, progress: bool = True,
                  attention_backend: Literal["torch", "triton"] = "torch") -> torch.Tensor:
    """Values of ``game`` on the requested variants, each distinct prefix computed once.

    Args:
        model: a causal LM that :func:`~sftint_fast.engine.adapters.get_adapter` supports.
        game: the :class:`~sftint_fast.game.Game` (``input_ids (L,)``, ``player_spans``, ``baseline``, ``masking``,
            ``score_positions (m,)``, ``values_from_logits``).
        subsets: ``(B,)`` int64 bitmasks (bit ``i`` = player ``i`` kept); None = all ``2^n`` in bitmask order.
        batch_size: at most this many trie nodes per chunk. max_memory: byte budget (default: a safe fraction of
            free memory). progress: tqdm bar over levels and chunks.
        attention_backend: ``"torch"`` (gather + SDPA) or ``"triton"`` (fused kernel).

    Returns:
        float32 ``(2^n,)`` indexed by bitmask, or ``(B,)`` in the order of ``subsets``, on the model's device.

    Example:
        >>> v = evaluate_trie(model, game)  # doctest: +SKIP
    """
    adapter = get_adapter(model)
    if adapter is None:
        raise ValueError(f"no trie adapter for model type {getattr(model.config, 'model_type', type(model))!r}; "
                         f"use method='naive'")
    _check_game(game, adapter, subsets)
    device = next(model.parameters()).device
    if max_memory is None:
        max_memory = default_max_memory(device)
    plan = plan_trie(game, subsets=subsets, dims=adapter.dims, batch_size=batch_size, max_memory=max_memory,
                     num_targets=int(game.score_positions.numel()))
    dims = adapter.dims
    n = plan.num_players
    attention_masking = getattr(game, "masking", "embedding") == "attention"
    embeds = adapter.embed(game.input_ids.to(device))
    baseline = game.baseline.to(device)
    store_shape = (plan.store_rows, dims.num_kv_heads, dims.head_dim)
    k_stores = [torch.empty(store_shape, dtype=dims.dtype, device=device) for _ in range(dims.num_layers)]
    v_stores = [torch.empty(store_shape, dtype=dims.dtype, device=device) for _ in range(dims.num_layers)]
    # The fused kernel reads the tables on the device; the torch path reads them as Python ints (no syncs).
    table_device = device if attention_backend != "torch" else torch.device("cpu")
    score_rel = (game.score_positions.to(device) - plan.level_positions[n]).long()

    leaf_values = torch.empty(len(plan.level_nodes[n]), dtype=torch.float32)
    done = 0
    for units in tqdm(plan.passes, desc="trie passes", disable=not progress, leave=False):
        chunks = _pass_chunks(plan, units, device, table_device)
        inputs = torch.cat([_segment_embeds(embeds, baseline, plan, c.level, c.nodes, not attention_masking)
                            .reshape(-1, dims.hidden_size) for c in chunks])
        positions = torch.cat([c.positions for c in chunks])

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k_store, v_store = k_stores[layer], v_stores[layer]
            for c in chunks:  # every chunk's K/V first: a chunk may read its ancestors from this same pass
                k_store.index_copy_(0, c.rows, k[c.start:c.stop])
                v_store.index_copy_(0, c.rows, v[c.start:c.stop])
            spec = adapter.layers[layer]
            return torch.cat([
                subset_attention(q[c.start:c.stop].unflatten(0, (len(c.nodes), -1)), k_store, v_store, c.nodes,
                                 *c.tables, level=c.level, scale=spec.scale, attention_masking=attention_masking,
                                 softcap=spec.softcap, sliding_window=spec.sliding_window,
                                 backend=attention_backend).flatten(0, 1)
                for c in chunks])

        hidden = adapter.run_layers(inputs, positions, attend)
        last = chunks[-1]
        if last.level == n:
            rows = hidden[last.start:last.stop].unflatten(0, (len(last.nodes), -1))[:, score_rel]
            logits = adapter.logits(rows).float()
            leaf_values[done:done + len(last.nodes)] = game.values_from_logits(logits, subsets=last.nodes_cpu).cpu()
            done += len(last.nodes)
    return leaf_values[plan.leaf_index].to(device)
