"""Plain, obviously correct references for every fast op (tests compare against these).

They enumerate subsets explicitly and are only meant for small ``n``.
"""
from __future__ import annotations

import torch


def brute_transform(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Subset/superset Möbius or zeta by explicit subset sums, in float64. ``(..., 2^n)`` → same shape."""
    size = x.shape[-1]
    xd = x.to(torch.float64)
    out = torch.zeros_like(xd)
    mobius = kind.endswith("mobius")
    superset = kind.startswith("superset")
    for s in range(size):
        for t in range(size):
            related = (t & s) == t if not superset else (t & s) == s
            if not related:
                continue
            sign = (-1) ** (bin(s ^ t).count("1")) if mobius else 1
            out[..., s] += sign * xd[..., t]
    return out


def brute_or_interactions(v_or: torch.Tensor) -> torch.Tensor:
    """``I_or(S) = -Σ_{L⊆S} (-1)^{|S|-|L|} v_or(N\\L)`` for ``S≠∅``, ``I_or(∅) = v_or(∅)`` (float64)."""
    size = v_or.shape[-1]
    full = size - 1
    vd = v_or.to(torch.float64)
    out = torch.zeros_like(vd)
    for s in range(1, size):
        for sub in range(size):
            if sub & s == sub:
                out[..., s] -= (-1) ** bin(s ^ sub).count("1") * vd[..., full ^ sub]
    out[..., 0] = vd[..., 0]
    return out


def brute_shapley(v: torch.Tensor) -> torch.Tensor:
    """Shapley values from the permutation-weighted marginal formula (float64). ``(..., 2^n)`` → ``(..., n)``."""
    import math

    size = v.shape[-1]
    n = size.bit_length() - 1
    vd = v.to(torch.float64)
    phi = torch.zeros(*vd.shape[:-1], n, dtype=torch.float64)
    for i in range(n):
        for s in range(size):
            if s >> i & 1:
                continue
            k = bin(s).count("1")
            w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            phi[..., i] += w * (vd[..., s | (1 << i)] - vd[..., s])
    return phi


def subset_attention_reference(
    q: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    node_ids: torch.Tensor,
    level_offsets: torch.Tensor,
    level_lens: torch.Tensor,
    player_lens: torch.Tensor,
    level_positions: torch.Tensor,
    *,
    level: int,
    scale: float,
    attention_masking: bool = False,
    softcap: float | None = None,
    sliding_window: int | None = None,
    path_index: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ancestor-path attention over the flat KV store by explicit key lists, in float32.

    ``q`` ``[C, S, Hq, D]``, stores ``[T_total, Hkv, D]`` → ``[C, S, Hq, D]`` in ``q``'s dtype. For each node and
    query token the visible keys are listed one by one (ancestors' segments at levels ``< level``, then the own
    segment up to the query), see ``sftint_fast.ops.subset_attention.subset_attention`` for the semantics
    (``path_index``: a compact store's ancestor indices, None = the ancestor ids; ``sinks``: ``[Hq]`` attention
    sinks, a logit per head that joins the softmax with a zero value).
    """
    from sftint_fast.ops.subset_attention import check_node_ids

    if len(node_ids):  # out-of-range ids would read other nodes' rows (or raise an IndexError) without a word
        check_node_ids(node_ids, torch.tensor(level, device=node_ids.device), level_offsets[:level + 1].reshape(1, -1),
                       level_lens, k_store.shape[0], path_index)
    offsets, lens, players, positions = (t.tolist() for t in (level_offsets, level_lens, player_lens, level_positions))
    num_nodes, seq_len, num_q_heads, _ = q.shape
    group = num_q_heads // k_store.shape[1]
    kf, vf = k_store.float(), v_store.float()
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    index_rows = path_index.tolist() if path_index is not None else None
    for c, node in enumerate(node_ids.tolist()):
        for t in range(seq_len):
            query_pos = positions[level] + t
            rows = []
            for k in range(level + 1):
                ancestor = node & ((1 << k) - 1) if index_rows is None else index_rows[c][k]
                absent = attention_masking and k >= 1 and not (node >> (k - 1)) & 1
                for j in range(lens[k] if k < level else t + 1):
                    if absent and j < players[k] and not (k == level and j == t):
                        continue
                    if sliding_window is not None and query_pos - (positions[k] + j) >= sliding_window:
                        continue
                    rows.append(offsets[k] + ancestor * lens[k] + j)
            index = torch.tensor(rows, dtype=torch.long, device=q.device)
            for h in range(num_q_heads):
                keys, values = kf[index, h // group], vf[index, h // group]
                logits = (keys @ q[c, t, h].float()) * scale
                if softcap is not None:
                    logits = softcap * torch.tanh(logits / softcap)
                if sinks is not None:  # the sink: one more logit in the denominator, no value
                    logits = torch.cat([logits, sinks[h].float().reshape(1)])
                    values = torch.cat([values, values.new_zeros(1, values.shape[1])])
                out[c, t, h] = torch.softmax(logits, dim=0) @ values
    return out.to(q.dtype)
