"""Subset (ancestor-path) attention over the trie's flat per-layer KV store.

Store layout (one K and one V store per layer, ``[T_total, Hkv, D]``): level ``k`` occupies rows
``level_offsets[k] + node * level_lens[k] + t`` for ``t < level_lens[k]``; node ``m`` of level ``j`` has the
ancestor ``m & ((1 << k) - 1)`` at level ``k < j``. A query of node ``m`` at level ``level`` attends to its
ancestors' whole segments and to its own segment causally. A compact store (sampled subsets: only the nodes they
reach) addresses a node by its index among its level's stored nodes instead of its id: the caller then passes
``path_index [C, level + 1]``, each node's ancestors' indices (and its own at ``level``).

Backends: ``"torch"`` gathers each node's ancestor rows (one ``index_select`` per chunk) and calls
``scaled_dot_product_attention``; other backends register themselves in ``_BACKENDS``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["torch", "triton"]


@dataclass(frozen=True)
class KeyLayout:
    """Where a chunk's keys are, for the torch backend: store ``rows [C, K]``, key positions ``[K]`` and (attention
    masking) hidden keys ``[C, K]``. The same for every layer, so the engine builds it once per chunk
    (:func:`key_layout`) and passes it to :func:`subset_attention` as ``layout=``."""

    rows: torch.Tensor
    positions: torch.Tensor
    hidden: torch.Tensor | None
    level: int


def key_layout(node_ids: torch.Tensor, level_offsets: torch.Tensor, level_lens: torch.Tensor,
               player_lens: torch.Tensor, level_positions: torch.Tensor, *, level: int,
               attention_masking: bool = False, path_index: torch.Tensor | None = None) -> KeyLayout:
    """The :class:`KeyLayout` of a chunk of ``node_ids`` at ``level`` (tables as in :func:`subset_attention`)."""
    rows, positions, hidden = _key_layout(node_ids, level_offsets.tolist(), level_lens.tolist(),
                                          player_lens.tolist(), level_positions.tolist(), level, attention_masking,
                                          path_index)
    return KeyLayout(rows, positions, hidden, level)


def _key_layout(node_ids: torch.Tensor, level_offsets: list[int], level_lens: list[int], player_lens: list[int],
                level_positions: list[int], level: int, attention_masking: bool,
                path_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rows ``[C, K]`` into the store, key positions ``[K]`` and (attention masking) hidden keys ``[C, K]``."""
    device = node_ids.device
    rows, positions, hidden = [], [], []
    for k in range(level + 1):
        length = level_lens[k]
        if length == 0:
            continue
        ancestors = node_ids if k == level else node_ids & ((1 << k) - 1)
        index = ancestors if path_index is None else path_index[:, k]
        offsets = torch.arange(length, device=device)
        rows.append(level_offsets[k] + index[:, None] * length + offsets)
        positions.append(level_positions[k] + offsets)
        if attention_masking:
            is_player = offsets < player_lens[k]
            if k == 0 or player_lens[k] == 0:
                hidden.append(torch.zeros(len(node_ids), length, dtype=torch.bool, device=device))
            else:
                dropped = ((ancestors >> (k - 1)) & 1) == 0
                hidden.append(dropped[:, None] & is_player[None, :])
    return torch.cat(rows, dim=1), torch.cat(positions), (torch.cat(hidden, dim=1) if attention_masking else None)


def _subset_attention_torch(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, node_ids: torch.Tensor,
                            level_offsets: torch.Tensor, level_lens: torch.Tensor, player_lens: torch.Tensor,
                            level_positions: torch.Tensor, *, level: int, scale: float, attention_masking: bool,
                            softcap: float | None, sliding_window: int | None, sinks: torch.Tensor | None = None,
                            layout: KeyLayout | None = None, path_index: torch.Tensor | None = None) -> torch.Tensor:
    chunk, seg_len, num_heads, head_dim = q.shape
    if chunk == 0 or seg_len == 0:  # no query (e.g. an empty level 0): the keys may be no rows at all
        return torch.empty_like(q)
    num_kv_heads = k_store.shape[1]
    if layout is None:
        layout = key_layout(node_ids, level_offsets, level_lens, player_lens, level_positions, level=level,
                            attention_masking=attention_masking, path_index=path_index)
    rows, key_pos, hidden = layout.rows, layout.positions, layout.hidden
    num_keys = rows.shape[1]
    flat_rows = rows.reshape(-1)
    keys = k_store.index_select(0, flat_rows).view(chunk, num_keys, num_kv_heads, head_dim).transpose(1, 2)
    values = v_store.index_select(0, flat_rows).view(chunk, num_keys, num_kv_heads, head_dim).transpose(1, 2)

    query_pos = int(level_positions[level]) + torch.arange(seg_len, device=q.device)
    allowed = key_pos[None, :] <= query_pos[:, None]  # [S, K]: ancestors entirely, own segment causally
    if sliding_window is not None:
        allowed = allowed & (query_pos[:, None] - key_pos[None, :] < sliding_window)
    if hidden is not None:
        diagonal = key_pos[None, :] == query_pos[:, None]
        allowed = allowed[None] & ~(hidden[:, None, :] & ~diagonal[None])  # [C, S, K]
    mask = allowed.view(-1, 1, seg_len, num_keys)

    queries = q.transpose(1, 2)
    if softcap is None and sinks is None:
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale,
                                             enable_gqa=num_heads != num_kv_heads)
    else:
        group = num_heads // num_kv_heads
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        if sinks is not None:  # one more logit per head in the denominator (eager's extra column, then dropped)
            sink = sinks.detach().float().view(1, num_heads, 1, 1).expand(*scores.shape[:-1], 1)
            weights = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1].to(values.dtype)
        else:
            weights = scores.softmax(dim=-1).to(values.dtype)
        out = torch.matmul(weights, values)
    return out.transpose(1, 2)


def check_node_ids(node_ids: torch.Tensor, levels: torch.Tensor, offsets: torch.Tensor, level_lens: torch.Tensor,
                   store_rows: int, path_index: torch.Tensor | None = None, *, own_in_store: bool = True,
                   names: tuple[str, str, str] = ("node_ids", "level", "level_offsets")) -> None:
    """ValueError unless every node id lies in ``[0, 2^level)`` of its level and every store row its path reads (the
    segments of levels ``k <= level``, ``k < level`` when not ``own_in_store``) lies in ``[0, store_rows)``.

    ``node_ids``, ``levels`` ``[N]`` int64, ``offsets`` ``[N, W]`` (each node's row of store offsets), ``level_lens``
    ``[>= W]``, ``path_index`` ``[N, W]`` or None (ancestor ids from the node bits), all on one device, shapes already
    checked. The kernels read these rows unchecked (other memory: wrong numbers or a crash), so the public entry points
    call this; it reads the tensors on the host, i.e. one GPU sync per call on CUDA, so the trie engine, which builds
    them from its plan, calls the unchecked private entry points instead. ``names``: how the message names the ids,
    the level and the offsets table."""
    id_name, level_name, offsets_name = names
    width = offsets.shape[1]
    levels = levels.expand(node_ids.shape)
    k = torch.arange(width, device=node_ids.device)
    read = k[None, :] <= levels[:, None] if own_in_store else k[None, :] < levels[:, None]
    lens = level_lens[:width]
    read = read & (lens > 0)[None, :]
    # 2^level overflows int64 past level 62: any id >= 0 is then in range
    bad_id = (node_ids < 0) | ((levels < 63) & ((node_ids >> levels.clamp(0, 62)) != 0))
    if path_index is None:
        ancestors = node_ids[:, None] & ((1 << k.clamp(max=62))[None, :] - 1)
        bad_index = torch.zeros_like(bad_id)
    else:
        ancestors = path_index[:, :width]
        bad_index = ((ancestors < 0) & read).any(dim=1)
    first = offsets + ancestors * lens[None, :]
    bad_row = read & ((first < 0) | (first + lens[None, :] > store_rows))
    flags = torch.stack([bad_id.any(), bad_index.any(), bad_row.any()]).tolist()  # the one host read
    if flags[0]:
        i = int(bad_id.nonzero()[0, 0])
        level = int(levels[i])
        raise ValueError(f"{id_name}: expected node ids in [0, 2^{level}) = [0, {1 << level}) at {level_name} "
                         f"{level}, received {int(node_ids[i])} (node {i})")
    if flags[1]:
        i = int(bad_index.nonzero()[0, 0])
        raise ValueError(f"path_index: expected ancestor indices >= 0, received row {i}: "
                         f"{path_index[i, :int(levels[i]) + 1].tolist()}")
    if flags[2]:
        i, j = (int(x) for x in bad_row.nonzero()[0])
        start = int(first[i, j])
        raise ValueError(f"k_store, v_store: expected the rows [{start}, {start + int(lens[j])}) that node "
                         f"{int(node_ids[i])} at {level_name} {int(levels[i])} reads at level {j} "
                         f"({offsets_name}[{j}] {int(offsets[i, j])} + ancestor index {int(ancestors[i, j])} * "
                         f"level_lens[{j}] {int(lens[j])}) within the store's [0, {store_rows}), received a store "
                         f"of {store_rows} rows")


def _check_ids(node_ids: torch.Tensor, level: int, level_offsets: torch.Tensor, level_lens: torch.Tensor,
               store_rows: int, path_index: torch.Tensor | None, layout: KeyLayout | None) -> None:
    """:func:`check_node_ids` for a chunk of one level; with a key layout, its rows are what is read."""
    if node_ids.numel() == 0:
        return
    device = node_ids.device
    levels = torch.tensor(level, device=device)
    offsets = level_offsets.to(device)[None, :]
    if layout is None:
        check_node_ids(node_ids, levels, offsets, level_lens.to(device), store_rows, path_index)
        return
    check_node_ids(node_ids, levels, offsets, torch.zeros_like(level_lens, device=device), store_rows)  # ids only
    rows = layout.rows
    bad = (rows < 0) | (rows >= store_rows)
    if bool(bad.any()):
        raise ValueError(f"layout: expected store rows in [0, {store_rows}) (k_store's), received "
                         f"{rows[bad][:5].tolist()}")


def _subset_attention_triton(*args, **kwargs) -> torch.Tensor:
    from sftint_fast.ops.triton.subset_attention import subset_attention as fused

    return fused(*args, **kwargs)


_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"torch": _subset_attention_torch,
                                                     "triton": _subset_attention_triton}


def check_sinks(sinks: object, num_heads: int, device: torch.device, values: bool = True) -> None:
    """ValueError unless ``sinks`` is None or a floating ``[num_heads]`` tensor on ``device`` (one logit per query
    head) of finite values (``values``: read on the host, one GPU sync; the engine, whose sinks are the model's, skips
    that)."""
    if sinks is None:
        return
    if (not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or tuple(sinks.shape) != (num_heads,)
            or sinks.device != device):
        got = (f"{sinks.dtype} of shape {tuple(sinks.shape)} on {sinks.device}" if isinstance(sinks, torch.Tensor)
               else type(sinks).__name__)
        raise ValueError(f"sinks: expected None or a floating tensor of shape ({num_heads},) (one logit per query "
                         f"head) on {device}, got {got}")
    if values and not bool(torch.isfinite(sinks).all()):
        raise ValueError(f"sinks: expected finite logits, got {sinks.tolist()}")


def _finite_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf


def subset_attention(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, node_ids: torch.Tensor,
                     level_offsets: torch.Tensor, level_lens: torch.Tensor, player_lens: torch.Tensor,
                     level_positions: torch.Tensor, *, level: int, scale: float, attention_masking: bool = False,
                     softcap: float | None = None, sliding_window: int | None = None,
                     backend: Backend = "torch", layout: KeyLayout | None = None,
                     path_index: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one trie level's chunk of nodes over their ancestors' KV and their own segment.

    Args:
        q: ``[C, S, Hq, D]`` queries of ``C`` nodes at ``level`` (``S = level_lens[level]``), after RoPE.
        k_store, v_store: ``[T_total, Hkv, D]`` flat stores; the own level's K/V already written. ``Hq`` must be a
            multiple of ``Hkv`` (query head ``h`` reads kv head ``h // (Hq // Hkv)``).
        node_ids: ``[C]`` int64 node ids at ``level`` (any order, need not be consecutive).
        level_offsets, level_lens, player_lens, level_positions: ``[level + 1]`` int64: start row of each level in
            the store, tokens per node, player tokens at the start of each segment (0 for level 0) and absolute
            position of each segment's first token.
        level: the level of the queries. scale: softmax scale.
        attention_masking: skip, as keys, the player tokens of every segment (level ``k >= 1``) whose node's bit
            ``k - 1`` is 0, except at the query's own position.
        softcap: attention logit soft-cap ``c·tanh(s/c)``. sliding_window: keys with ``q_pos - k_pos < w`` only.
        sinks: ``[Hq]`` attention sinks (gpt-oss): a logit per query head that joins each query's softmax
            denominator (as one more key) and adds nothing to its output; None: none.
        backend: ``"torch"`` (gather + SDPA) or a registered fused kernel.
        layout: the torch backend's :func:`key_layout` of this chunk, built once and reused by every layer
            (None = built here).
        path_index: ``[C, level + 1]`` int64 on ``node_ids``' device, for a compact store: column ``k`` the index
            of each node's level-``k`` ancestor among the nodes stored at level ``k`` (rows
            ``level_offsets[k] + index * level_lens[k]``), column ``level`` the node's own. None: the index is the
            ancestor id ``node & (2^k - 1)`` (a store of all ``2^k`` nodes per level). Masking still reads the bits
            of ``node_ids``.

    Raises:
        ValueError: bad shapes, dtypes or options, node ids outside ``[0, 2^level)``, or store rows they (or
        ``path_index``, ``layout``) address outside the stores (read on the host: one GPU sync per call on CUDA).

    Returns:
        ``[C, S, Hq, D]`` in ``q``'s dtype.

    Example:
        >>> q = torch.randn(2, 3, 4, 8); store = torch.randn(1 + 2 * 3, 2, 8)
        >>> i64 = lambda *x: torch.tensor(x)
        >>> subset_attention(q, store, store, i64(0, 1), i64(0, 1), i64(1, 3), i64(0, 2), i64(0, 1),
        ...                  level=1, scale=8 ** -0.5).shape
        torch.Size([2, 3, 4, 8])
    """
    return _subset_attention(q, k_store, v_store, node_ids, level_offsets, level_lens, player_lens, level_positions,
                             level=level, scale=scale, attention_masking=attention_masking, softcap=softcap,
                             sliding_window=sliding_window, backend=backend, layout=layout, path_index=path_index,
                             check_ids=True, sinks=sinks)


def _subset_attention(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, node_ids: torch.Tensor,
                      level_offsets: torch.Tensor, level_lens: torch.Tensor, player_lens: torch.Tensor,
                      level_positions: torch.Tensor, *, level: int, scale: float, attention_masking: bool,
                      softcap: float | None, sliding_window: int | None, backend: Backend, layout: KeyLayout | None,
                      path_index: torch.Tensor | None, check_ids: bool, sinks: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """:func:`subset_attention`; ``check_ids=False`` (the trie engine, whose ids come from its plan) skips the
    check of the ids' and rows' values, which reads them on the host (a GPU sync per layer)."""
    impl = _BACKENDS.get(backend)
    if impl is None:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    if q.dim() != 4 or k_store.dim() != 3 or k_store.shape != v_store.shape:
        raise ValueError(f"expected q [C, S, Hq, D] and k_store/v_store [T, Hkv, D] of equal shapes, got "
                         f"{tuple(q.shape)}, {tuple(k_store.shape)}, {tuple(v_store.shape)}")
    if q.shape[-1] != k_store.shape[-1] or k_store.shape[1] == 0 or q.shape[2] % k_store.shape[1]:
        raise ValueError(f"head dims must match and Hq must be a multiple of Hkv, got q {tuple(q.shape)}, "
                         f"store {tuple(k_store.shape)}")
    for name, store in (("k_store", k_store), ("v_store", v_store)):
        if not q.is_floating_point() or store.dtype != q.dtype or store.device != q.device:
            raise ValueError(f"{name}: expected the floating dtype and device of q ({q.dtype} on {q.device}), got "
                             f"{store.dtype} on {store.device}")
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"level: expected an int >= 0, got {level!r}")
    if not _finite_positive(scale):  # the fused kernel refuses the same (a window of 0 hid every key: NaN rows)
        raise ValueError(f"scale: expected a positive float, got {scale}")
    if softcap is not None and not _finite_positive(softcap):
        raise ValueError(f"softcap: expected None or a positive float, got {softcap}")
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ValueError(f"sliding_window: expected None or an int >= 1, got {sliding_window!r}")
    check_sinks(sinks, q.shape[2], q.device, values=check_ids)
    for name, table in (("node_ids", node_ids), ("level_offsets", level_offsets), ("level_lens", level_lens),
                        ("player_lens", player_lens), ("level_positions", level_positions)):
        if table.dtype != torch.int64:
            raise ValueError(f"{name}: expected an int64 tensor, got {table.dtype}")
        if name != "node_ids" and table.shape != (level + 1,):
            raise ValueError(f"{name} must have shape ({level + 1},) for level={level}, got {tuple(table.shape)}")
    if node_ids.shape != (q.shape[0],):
        raise ValueError(f"q must be [len(node_ids), level_lens[level], Hq, D] with len(node_ids) = "
                         f"{node_ids.shape[0]}, got {tuple(q.shape)}")
    if level_lens.device.type == "cpu":
        if q.shape[1] != int(level_lens[level]):
            raise ValueError(f"q must be [len(node_ids), level_lens[level], Hq, D] = [{node_ids.shape[0]}, "
                             f"{int(level_lens[level])}, ...], got {tuple(q.shape)}")
    else:  # tables on the GPU: checked on the device, without a host sync per layer
        torch._assert_async(level_lens[level] == q.shape[1],
                            f"subset_attention: q has {q.shape[1]} tokens per node, level_lens[{level}] differs")
    options = {}
    if layout is not None:
        if backend != "torch":
            raise ValueError(f"layout: only the torch backend takes a key layout, received one with backend={backend!r}")
        if layout.level != level or layout.rows.shape[0] != node_ids.shape[0] or (layout.hidden is None) == attention_masking:
            raise ValueError(f"layout: expected the key layout of these {node_ids.shape[0]} nodes at level {level} "
                             f"(attention_masking={attention_masking}), received one for {layout.rows.shape[0]} nodes "
                             f"at level {layout.level} (attention_masking={layout.hidden is not None})")
        options["layout"] = layout
    if path_index is not None:
        if (not isinstance(path_index, torch.Tensor) or path_index.dtype != torch.int64
                or path_index.shape != (node_ids.shape[0], level + 1) or path_index.device != node_ids.device):
            got = (f"{path_index.dtype} of shape {tuple(path_index.shape)} on {path_index.device}"
                   if isinstance(path_index, torch.Tensor) else type(path_index).__name__)
            raise ValueError(f"path_index: expected int64 of shape ({node_ids.shape[0]}, {level + 1}) "
                             f"([len(node_ids), level + 1]) on {node_ids.device}, got {got}")
        if layout is not None:
            raise ValueError("path_index: the key layout already holds the rows; pass path_index to key_layout")
        options["path_index"] = path_index
    if check_ids and backend != "triton":  # the fused function checks its own
        _check_ids(node_ids, level, level_offsets, level_lens, k_store.shape[0], path_index, layout)
    if sinks is not None:
        options["sinks"] = sinks
    return impl(q, k_store, v_store, node_ids, level_offsets, level_lens, player_lens, level_positions, level=level,
                scale=scale, attention_masking=attention_masking, softcap=softcap, sliding_window=sliding_window,
                **options)
