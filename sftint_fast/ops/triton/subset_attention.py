"""Fused ancestor-path ("subset") attention over the trie's flat KV store, in Triton.

One trie level at a time: the queries of a chunk of nodes at level ``level`` attend to the segments of
their ancestors at every level ``k < level`` (ancestor id ``node & ((1 << k) - 1)``) and to their own
segment causally, with one online softmax (fp32 running max, sum and accumulator) across all of them.
The per-layer flat store holds every level's segments back to back (level ``k``, node ``m``, token
``t`` at row ``level_offsets[k] + m * level_lens[k] + t``), so the kernel computes each ancestor's row
range from the node's bits and reads it in place. A compact store (sampled subsets: only the nodes they reach,
node ``m`` at its index ``i`` among its level's stored nodes) comes with a ``path_index`` table, one row per query
node holding its ancestors' indices, which the kernel reads instead of the bits (``HAS_INDEX``).

Why this replaces per-variant KV copies: a cache-based trie must hand each node a contiguous KV cache,
i.e. copy (``repeat_interleave``) its parent's keys and values once per child at every level, so the
deepest level holds ``2^level`` copies of the whole prefix. Here every segment is stored exactly once
(``Σ_k 2^k len_k`` rows per layer) and the ancestor path is resolved by index arithmetic inside the KV
loop. Attention masking is fused the same way: masked players' key blocks are skipped, so no dense mask
is ever built.

Layout of one program: the rows of a query block are (token, head-in-group) pairs of one node and one
KV head (GQA packing: the ``Hq // Hkv`` query heads sharing a KV head share every K/V load), which also
keeps the ``tl.dot`` tiles at least 16 rows tall when segments are only a few tokens long.
"""
from __future__ import annotations

import math
import numbers
import os

import torch
import triton
import triton.language as tl

from sftint_fast.ops.subset_attention import check_node_ids, check_sinks
from sftint_fast.ops.triton import KERNEL_DTYPES, check_interpreter, on_device

# Finite "minus infinity" for the running max, so a block with no visible key gives exp2(-inf - finite) = 0
# instead of NaN; real scores never get near it.
_NEG_BIG = tl.constexpr(-1.0e30)
# Triton's interpreter (3.9) multiplies bfloat16 dot operands as their raw uint16 bits; there they are upcast first
# (exact: a product of two bfloat16 values fits float32, as on the GPU). Compiled kernels never take this branch.
_UPCAST_BF16_DOTS = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def _configs() -> list[triton.Config]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in ((16, 16, 4, 2), (32, 32, 4, 2), (64, 32, 4, 3), (64, 64, 8, 3), (16, 64, 4, 2),
                             (32, 64, 4, 3), (32, 32, 8, 2), (64, 16, 8, 2))
    ]  # the last two: fp32 (ieee dots, no tensor cores) tiles past 16x16 that do not spill registers on sm_90
    #    (benchmarks/kernel_resources.py, triton 3.6: 191-206 registers, no spills; 64x32/4 warps spills ~480 B)


@triton.jit
def _dot(a, b, INPUT_PRECISION: tl.constexpr):
    if _UPCAST_BF16_DOTS:  # noqa: SIM102 (a constexpr: compiled kernels never see the dtype test below)
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=INPUT_PRECISION)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, softcap,
                         HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One key block's update of (acc, m_i, l_i): scores (scaled to base 2, soft-capped), masked, merged."""
    qk = _dot(q, tl.trans(k), INPUT_PRECISION)
    if HAS_SOFTCAP:
        # softcap * tanh(x / softcap), with tanh written through sigmoid (available in every triton 3.x)
        capped = qk * (qk_scale / softcap)
        s = softcap * (2.0 * tl.sigmoid(2.0 * capped) - 1.0) * 1.4426950408889634
    else:
        s = qk * (qk_scale * 1.4426950408889634)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, INPUT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_segment(
    acc, m_i, l_i, q, q_tok, q_pos,
    k_ptr, v_ptr, stride_kt, stride_vt, seg_row0, n_keys, key_pos0, hidden_players, start,
    qk_scale, softcap, window,
    offs_d, d_mask,
    IS_OWN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) with keys ``start .. n_keys-1`` of one segment."""
    for n0 in range(start, n_keys, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_valid = offs_n < n_keys
        rows = (seg_row0 + offs_n).to(tl.int64)
        kv_mask = n_valid[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + rows[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + rows[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        hidden = offs_n < hidden_players
        if IS_OWN:
            diag = offs_n[None, :] == q_tok[:, None]
            visible = n_valid[None, :] & (offs_n[None, :] <= q_tok[:, None]) & (diag | ~hidden[None, :])
        else:
            visible = n_valid[None, :] & ~hidden[None, :]
        if HAS_WINDOW:
            visible = visible & ((q_pos[:, None] - (key_pos0 + offs_n)[None, :]) < window)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, softcap,
                                             HAS_SOFTCAP, INPUT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_path(
    acc, m_i, l_i, q, q_pos, node, level,
    k_ptr, v_ptr, stride_kt, stride_vt, offsets_ptr, lens_ptr, players_ptr, positions_ptr, lo, hi,
    kp_ptr, vp_ptr, stride_kpt, stride_vpt, q_row0, index_row,
    qk_scale, softcap, window,
    offs_d, d_mask,
    ATTENTION_MASKING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, OWN_FROM_PASS: tl.constexpr, HAS_INDEX: tl.constexpr,
):
    """Online-softmax update with the keys at absolute positions ``lo .. hi-1`` of the node's whole path.

    The path's segments are consecutive in position (``positions[k+1] = positions[k] + lens[k]``), so a key block
    is a run of positions that may span several levels: each key's level is the number of levels ``1..level``
    starting at or before it, and its store row follows from that level's table entries and the node's bits.
    Key blocks are therefore full however short the segments are (the per-segment loop loads a block per level).
    With ``OWN_FROM_PASS`` the node's own segment is read from the pass's K/V (``kp``/``vp``, rows
    ``q_row0 + t``, the rows of its queries) instead of the store. With ``HAS_INDEX`` a key's ancestor index is
    read from the node's ``path_index`` row (``index_row``) instead of computed from its bits.
    """
    for p0 in range(lo, hi, BLOCK_N):
        offs_p = p0 + tl.arange(0, BLOCK_N)
        p_valid = offs_p < hi
        k_lvl = tl.zeros([BLOCK_N], dtype=tl.int64)
        for lvl in range(1, level + 1):
            k_lvl += (offs_p >= tl.load(positions_ptr + lvl)).to(tl.int64)
        t = offs_p - tl.load(positions_ptr + k_lvl)
        if HAS_INDEX:
            ancestor = tl.load(index_row + k_lvl)
        else:
            ancestor = node & ((tl.full([BLOCK_N], 1, tl.int64) << k_lvl) - 1)
        rows = tl.load(offsets_ptr + k_lvl) + ancestor * tl.load(lens_ptr + k_lvl) + t
        kv_mask = p_valid[:, None] & d_mask[None, :]
        k_ptrs = k_ptr + rows[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_ptr + rows[:, None] * stride_vt + offs_d[None, :]
        if OWN_FROM_PASS:
            own = (k_lvl == level)[:, None]
            pass_rows = q_row0 + t
            k_ptrs = tl.where(own, kp_ptr + pass_rows[:, None] * stride_kpt + offs_d[None, :], k_ptrs)
            v_ptrs = tl.where(own, vp_ptr + pass_rows[:, None] * stride_vpt + offs_d[None, :], v_ptrs)
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        visible = p_valid[None, :] & (offs_p[None, :] <= q_pos[:, None])
        if ATTENTION_MASKING:
            # player tokens of a level-k segment (k >= 1) belong to player k-1; hidden when its bit is 0
            absent = (k_lvl > 0) & (((node >> tl.maximum(k_lvl - 1, 0)) & 1) == 0)
            hidden = absent & (t < tl.load(players_ptr + k_lvl))
            visible = visible & ((offs_p[None, :] == q_pos[:, None]) | ~hidden[None, :])
        if HAS_WINDOW:
            visible = visible & ((q_pos[:, None] - offs_p[None, :]) < window)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, q, k, v, visible, qk_scale, softcap,
                                             HAS_SOFTCAP, INPUT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attend_segments(
    acc, m_i, l_i, q, q_tok, q_pos, node, level, seq_len, num_ancestors, last_tok,
    k_head_ptr, v_head_ptr, stride_kt, stride_vt, offsets_ptr, lens_ptr, players_ptr, positions_ptr,
    kp_head_ptr, vp_head_ptr, stride_kpt, stride_vpt, q_row0, index_row,
    qk_scale, softcap, window, offs_d, d_mask,
    ATTENTION_MASKING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, OWN_FROM_PASS: tl.constexpr, HAS_INDEX: tl.constexpr,
):
    """Segment by segment: the ancestors' segments at levels ``< num_ancestors`` (``level``, or 0 for an empty
    block), each in its own key blocks, then the own segment causally up to ``last_tok``."""
    for lvl in range(0, num_ancestors):
        seg_len = tl.load(lens_ptr + lvl)
        if HAS_INDEX:
            ancestor = tl.load(index_row + lvl)
        else:
            ancestor = node % (1 << lvl)
        seg_row0 = tl.load(offsets_ptr + lvl) + ancestor * seg_len
        if ATTENTION_MASKING:
            # player tokens of a level-k segment (k >= 1) belong to player k-1; hidden when its bit is 0
            player_absent = (lvl > 0) & (((node >> tl.maximum(lvl - 1, 0)) & 1) == 0)
            hidden_players = tl.where(player_absent, tl.load(players_ptr + lvl), 0)
        else:
            hidden_players = 0
        # key blocks made only of hidden player tokens are never loaded
        start = (hidden_players // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _attend_segment(
            acc, m_i, l_i, q, q_tok, q_pos,
            k_head_ptr, v_head_ptr, stride_kt, stride_vt, seg_row0, seg_len, tl.load(positions_ptr + lvl),
            hidden_players, start, qk_scale, softcap, window, offs_d, d_mask,
            False, HAS_SOFTCAP, HAS_WINDOW, BLOCK_N, INPUT_PRECISION,
        )

    # Own segment, causal: keys past the block's last query token are never needed.
    if ATTENTION_MASKING:
        own_absent = (level > 0) & (((node >> tl.maximum(level - 1, 0)) & 1) == 0)
        own_hidden = tl.where(own_absent, tl.load(players_ptr + level), 0)
    else:
        own_hidden = 0
    if OWN_FROM_PASS:  # the own segment's K/V are the pass's rows of its queries
        acc, m_i, l_i = _attend_segment(
            acc, m_i, l_i, q, q_tok, q_pos,
            kp_head_ptr, vp_head_ptr, stride_kpt, stride_vpt, q_row0, last_tok + 1, tl.load(positions_ptr + level),
            own_hidden, 0, qk_scale, softcap, window, offs_d, d_mask,
            True, HAS_SOFTCAP, HAS_WINDOW, BLOCK_N, INPUT_PRECISION,
        )
    else:
        if HAS_INDEX:
            own_index = tl.load(index_row + level)
        else:
            own_index = node
        own_row0 = tl.load(offsets_ptr + level) + own_index * seq_len
        acc, m_i, l_i = _attend_segment(
            acc, m_i, l_i, q, q_tok, q_pos,
            k_head_ptr, v_head_ptr, stride_kt, stride_vt, own_row0, last_tok + 1, tl.load(positions_ptr + level),
            own_hidden, 0, qk_scale, softcap, window, offs_d, d_mask,
            True, HAS_SOFTCAP, HAS_WINDOW, BLOCK_N, INPUT_PRECISION,
        )
    return acc, m_i, l_i


@triton.autotune(configs=_configs(),
                 key=["max_rows", "GROUP", "HEAD_DIM", "IS_FP32", "FLAT_PATH", "OWN_FROM_PASS", "HAS_INDEX"])
@triton.jit
def _subset_attention_kernel(
    q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, o_ptr, meta_ptr, offsets_ptr, lens_ptr, players_ptr, positions_ptr,
    index_ptr, sinks_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_kpt, stride_kph, stride_vpt, stride_vph,
    stride_ot, stride_oh, stride_offsets, stride_index,
    max_rows, qk_scale, softcap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP32: tl.constexpr,
    ATTENTION_MASKING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, FLAT_PATH: tl.constexpr, OWN_FROM_PASS: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_SINKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program = one query node (meta row: node id, level, first query row, offsets-table row; with HAS_INDEX
    # the same row of the path-index table), one block of its (token, head-in-group) rows, one KV head. Blocks past
    # a node's rows (shorter segment) do nothing.
    meta = meta_ptr + tl.program_id(0).to(tl.int64) * 4
    index_row = index_ptr + tl.program_id(0).to(tl.int64) * stride_index
    m_block = tl.program_id(1)
    kv_head = tl.program_id(2).to(tl.int64)
    node = tl.load(meta)
    level = tl.load(meta + 1)
    q_row0 = tl.load(meta + 2)
    offsets_ptr += tl.load(meta + 3) * stride_offsets
    seq_len = tl.load(lens_ptr + level)
    num_rows = seq_len * GROUP
    block_empty = m_block * BLOCK_M >= num_rows

    # Query rows of this block: (token, head-in-group) pairs, token-major.
    offs_r = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    r_valid = offs_r < num_rows
    q_tok = offs_r // GROUP
    q_head = kv_head * GROUP + offs_r % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q_off = (q_row0 + q_tok) * stride_qt + q_head * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=r_valid[:, None] & d_mask[None, :], other=0.0)
    own_pos = tl.load(positions_ptr + level)
    q_pos = own_pos + q_tok

    k_head_ptr = k_ptr + kv_head * stride_kh
    v_head_ptr = v_ptr + kv_head * stride_vh
    kp_head_ptr = kp_ptr + kv_head * stride_kph
    vp_head_ptr = vp_ptr + kv_head * stride_vph
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_SINKS:
        # the head's sink joins the softmax as a key of logit ``sink`` (base 2 here) and value 0: the running max
        # starts at it and the sum at exp2(sink - sink) = 1; the accumulator gets nothing
        m_i = tl.maximum(tl.load(sinks_ptr + q_head).to(tl.float32) * 1.4426950408889634, _NEG_BIG)
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)

    last_tok = (tl.minimum((m_block + 1) * BLOCK_M, num_rows) - 1) // GROUP
    if FLAT_PATH:
        # one run of positions from the root to the block's last query token (keys past it are never needed)
        lo = tl.load(positions_ptr)
        if HAS_WINDOW:  # key blocks wholly outside every query's window are never loaded
            first_tok = (m_block * BLOCK_M) // GROUP
            lo += (tl.maximum(own_pos + first_tok - window + 1 - lo, 0) // BLOCK_N) * BLOCK_N
        hi = tl.where(block_empty, lo, own_pos + last_tok + 1)
        acc, m_i, l_i = _attend_path(
            acc, m_i, l_i, q, q_pos, node, level,
            k_head_ptr, v_head_ptr, stride_kt, stride_vt, offsets_ptr, lens_ptr, players_ptr, positions_ptr,
            lo, hi, kp_head_ptr, vp_head_ptr, stride_kpt, stride_vpt, q_row0, index_row, qk_scale, softcap, window,
            offs_d, d_mask, ATTENTION_MASKING, HAS_SOFTCAP, HAS_WINDOW, BLOCK_N, INPUT_PRECISION, OWN_FROM_PASS,
            HAS_INDEX,
        )
    else:
        acc, m_i, l_i = _attend_segments(
            acc, m_i, l_i, q, q_tok, q_pos, node, level, seq_len, tl.where(block_empty, 0, level),
            tl.where(block_empty, -1, last_tok),
            k_head_ptr, v_head_ptr, stride_kt, stride_vt, offsets_ptr, lens_ptr, players_ptr, positions_ptr,
            kp_head_ptr, vp_head_ptr, stride_kpt, stride_vpt, q_row0, index_row, qk_scale, softcap, window, offs_d,
            d_mask, ATTENTION_MASKING, HAS_SOFTCAP, HAS_WINDOW, BLOCK_N, INPUT_PRECISION, OWN_FROM_PASS, HAS_INDEX,
        )

    # padding rows may have seen no key at all (l_i = 0); they are not stored
    out = acc / tl.where(r_valid, l_i, 1.0)[:, None]
    o_off = (q_row0 + q_tok) * stride_ot + q_head * stride_oh
    tl.store(o_ptr + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=r_valid[:, None] & d_mask[None, :])


#: KV-loop strategies of the kernel (see :func:`subset_attention`'s ``path``).
PATHS = ("flat", "segments")
#: The strategy used when ``path`` is not given (the GPU benchmark times both).
DEFAULT_PATH = "flat"


def _check_table(name: str, table: torch.Tensor, level: int, device: torch.device) -> None:
    if not isinstance(table, torch.Tensor) or table.dtype != torch.int64 or table.dim() != 1:
        got = f"{table.dtype}, shape {tuple(table.shape)}" if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"{name}: expected a 1-D int64 tensor, got {got}")
    if table.numel() < level + 1:
        raise ValueError(f"{name}: expected at least level+1={level + 1} entries, got {table.numel()}")
    if table.device != device:
        raise ValueError(f"{name}: expected device {device} (that of q), got {table.device}")


def _check_index(path_index: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> None:
    if path_index is None:
        return
    if (not isinstance(path_index, torch.Tensor) or path_index.dtype != torch.int64
            or tuple(path_index.shape) != shape or path_index.device != device):
        got = (f"{path_index.dtype} of shape {tuple(path_index.shape)} on {path_index.device}"
               if isinstance(path_index, torch.Tensor) else type(path_index).__name__)
        raise ValueError(f"path_index: expected int64 of shape {shape} on {device}, got {got}")


def _check_common(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, scale: float,
                  softcap: float | None, sliding_window: int | None, path: str, sinks: torch.Tensor | None = None,
                  sink_values: bool = True) -> None:
    """What both entry points check: ``q [..., Hq, D]`` against the stores, dtypes, devices and the options."""
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"q: expected dtype float16, bfloat16 or float32, got {q.dtype}")
    check_interpreter(q.device)
    num_q_heads, head_dim = q.shape[-2:]
    for name, store in (("k_store", k_store), ("v_store", v_store)):
        if store.dim() != 3 or store.shape[2] != head_dim:
            raise ValueError(f"{name}: expected shape [T_total, Hkv, D={head_dim}], got {tuple(store.shape)}")
        if store.dtype != q.dtype or store.device != q.device:
            raise ValueError(f"{name}: expected dtype {q.dtype} on {q.device} (those of q), "
                             f"got {store.dtype} on {store.device}")
        if store.stride(2) != 1:
            raise ValueError(f"{name}: expected a contiguous last dimension, got strides {store.stride()}")
    if k_store.shape != v_store.shape:
        raise ValueError(f"v_store: expected the shape of k_store {tuple(k_store.shape)}, got {tuple(v_store.shape)}")
    num_kv_heads = k_store.shape[1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"q: expected a number of heads divisible by k_store's {num_kv_heads}, got {num_q_heads}")
    for name, value in (("scale", scale), ("softcap", softcap)):
        if name == "softcap" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: expected a positive float, got {type(value).__name__} {value!r}")
        if not 0 < value < math.inf:
            raise ValueError(f"{name}: expected a positive float, got {value}")
    # the kernel takes int(window): a fractional or bool one would silently become another window
    window_int = isinstance(sliding_window, numbers.Integral) and not isinstance(sliding_window, bool)
    if sliding_window is not None and not (window_int and sliding_window >= 1):
        raise ValueError(f"sliding_window: expected None or an int >= 1, got {sliding_window!r}")
    check_sinks(sinks, num_q_heads, q.device, values=sink_values)


def tf32_matmuls() -> bool:
    """Whether torch's float32 CUDA matmuls may use TF32 (the kernel's float32 dots then do too), set through either
    API. Read through ``fp32_precision`` where torch has it (>= 2.9): both APIs set it, while reading the legacy
    ``allow_tf32`` after the new API was used raises a RuntimeError."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is None:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    return precision == "tf32"


def _launch(
    q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, out: torch.Tensor, meta: torch.Tensor,
    offsets: torch.Tensor, lens: torch.Tensor, players: torch.Tensor, positions: torch.Tensor, max_seg_len: int,
    scale: float, attention_masking: bool, softcap: float | None, sliding_window: int | None, path: str,
    k_pass: torch.Tensor | None = None, v_pass: torch.Tensor | None = None, path_index: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """Launches the kernel on a ``(nodes, query blocks of the longest segment, Hkv)`` grid; ``q``/``out`` are
    ``[T, Hq, D]`` with a contiguous last dimension, the tables contiguous; ``k_pass``/``v_pass`` ``[T, Hkv, D]``
    (own segments read there) or None (own segments read from the stores); ``path_index`` ``[N, W]`` (a compact
    store's ancestor indices, a row per meta row) or None (indices from the node bits); ``sinks`` ``[Hq]`` (read as
    float32) or None."""
    num_nodes = meta.shape[0]
    if num_nodes == 0 or max_seg_len == 0:
        return
    num_q_heads, head_dim = q.shape[1:]
    num_kv_heads = k_store.shape[1]
    group = num_q_heads // num_kv_heads
    is_fp32 = q.dtype == torch.float32
    strict_fp32 = is_fp32 and not tf32_matmuls()

    def grid(config):
        return (num_nodes, triton.cdiv(max_seg_len * group, config["BLOCK_M"]), num_kv_heads)

    own_from_pass = k_pass is not None
    kp, vp = (k_pass, v_pass) if own_from_pass else (k_store, v_store)
    has_index = path_index is not None
    index = path_index if has_index else meta  # without an index table the kernel never reads it
    has_sinks = sinks is not None
    sinks = sinks.detach().float().contiguous() if has_sinks else meta  # (never read without sinks)
    with on_device(q.device):
        _subset_attention_kernel[grid](
            q, k_store, v_store, kp, vp, out, meta, offsets, lens, players, positions, index, sinks,
            q.stride(0), q.stride(1), k_store.stride(0), k_store.stride(1), v_store.stride(0), v_store.stride(1),
            kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1), out.stride(0), out.stride(1), offsets.stride(0),
            index.stride(0) if has_index else 0,
            triton.next_power_of_2(max_seg_len * group), float(scale), float(softcap or 0.0), int(sliding_window or 0),
            GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), IS_FP32=is_fp32,
            ATTENTION_MASKING=bool(attention_masking), HAS_SOFTCAP=softcap is not None,
            HAS_WINDOW=sliding_window is not None, INPUT_PRECISION="ieee" if strict_fp32 else "tf32",
            FLAT_PATH=path == "flat", OWN_FROM_PASS=own_from_pass, HAS_INDEX=has_index, HAS_SINKS=has_sinks,
        )


def subset_attention(
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
    path: str | None = None,
    path_index: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one trie level's queries over their ancestor path in the flat KV store (Triton).

    Args:
        q: ``[C, S, Hq, D]`` float16/bfloat16/float32 queries (after RoPE) of ``C`` nodes at level ``level``;
            ``S = level_lens[level]``.
        k_store, v_store: ``[T_total, Hkv, D]``, same dtype and device as ``q``; level ``k``'s segment of node
            ``m`` is at rows ``level_offsets[k] + m * level_lens[k] + t``. The own level must already be written.
        node_ids: ``[C]`` int64 ids of the query nodes at level ``level`` (any order, need not be consecutive).
        level_offsets, level_lens, player_lens, level_positions: 1-D int64 tables (at least ``level + 1``
            entries, on ``q``'s device): first store row of each level, tokens per node, player tokens at the
            start of each segment (0 for level 0), absolute position of each segment's first token.
        level: the trie level of the queries. scale: softmax scale (usually ``D ** -0.5``).
        attention_masking: hide the player tokens of every segment at level ``k >= 1`` whose node has bit
            ``k - 1`` cleared, as keys, except from the query at that very position.
        softcap: logits become ``softcap * tanh(scale * q·k / softcap)`` (Gemma-2 style) when given.
        sliding_window: ``w`` keeps a key only when ``query_pos - key_pos < w``.
        sinks: ``[Hq]`` attention sinks (gpt-oss): a logit per query head that joins the softmax's denominator and
            adds nothing to the output (read as float32); None: none.
        path: how the KV loop walks the ancestor path (None = :data:`DEFAULT_PATH`). ``"flat"``: key blocks are
            runs of absolute positions from the root to the query, each key's level and row computed from the
            tables, so blocks stay full when segments are short (needs consecutive segments,
            ``level_positions[k+1] = level_positions[k] + level_lens[k]``, as the trie's are); ``"segments"``: one
            run of key blocks per ancestor segment (blocks of a short segment are mostly padding), fully hidden
            player blocks skipped.
        path_index: ``[C, level + 1]`` int64 on ``q``'s device, for a compact store (only some nodes of each level):
            column ``k`` the index of each node's level-``k`` ancestor among the nodes stored at level ``k`` (rows
            ``level_offsets[k] + index * level_lens[k]``), column ``level`` the node's own. None: the ancestor ids
            ``node & (2^k - 1)``. Masking reads the bits of ``node_ids`` either way.

    Raises:
        ValueError: bad shapes, dtypes or options; node ids outside ``[0, 2^level)``; store rows the ids (or
        ``path_index``) address outside the stores. The values are read on the host: one GPU sync per call.

    Returns:
        ``[C, S, Hq, D]`` in ``q``'s dtype; query head ``h`` reads KV head ``h // (Hq // Hkv)``. Scores and the
        softmax are accumulated in float32; float32 inputs use IEEE dots unless TF32 matmuls are allowed
        (``torch.backends.cuda.matmul.fp32_precision = "tf32"`` or the legacy ``allow_tf32``).

    Example (two levels: a 3-token root segment and two 2-token children)::

        k = torch.randn(3 + 2 * 2, 1, 64, device="cuda"); v = torch.randn_like(k)
        q = torch.randn(2, 2, 4, 64, device="cuda")               # both children, 4 query heads
        i64 = dict(dtype=torch.int64, device="cuda")
        out = subset_attention(q, k, v, torch.tensor([0, 1], **i64), torch.tensor([0, 3], **i64),
                               torch.tensor([3, 2], **i64), torch.tensor([0, 1], **i64),
                               torch.tensor([0, 3], **i64), level=1, scale=64 ** -0.5)   # [2, 2, 4, 64]

    Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before import (tests).
    """
    path = DEFAULT_PATH if path is None else path
    if isinstance(level, bool) or not isinstance(level, numbers.Integral):  # int() floored a fractional level
        raise TypeError(f"level: expected an int >= 0, got {level!r}")
    level = int(level)
    if q.dim() != 4:
        raise ValueError(f"q: expected shape [C, S, Hq, D], got {tuple(q.shape)}")
    _check_common(q, k_store, v_store, scale, softcap, sliding_window, path, sinks)
    num_nodes, seq_len, num_q_heads, head_dim = q.shape
    if node_ids.dtype != torch.int64 or node_ids.shape != (num_nodes,) or node_ids.device != q.device:
        raise ValueError(f"node_ids: expected int64 of shape ({num_nodes},) on {q.device}, "
                         f"got {node_ids.dtype} of shape {tuple(node_ids.shape)} on {node_ids.device}")
    if level < 0:
        raise ValueError(f"level: expected >= 0, got {level}")
    _check_index(path_index, (num_nodes, level + 1), q.device)
    tables = {"level_offsets": level_offsets, "level_lens": level_lens, "player_lens": player_lens,
              "level_positions": level_positions}
    for name, table in tables.items():
        _check_table(name, table, level, q.device)
    if level_lens.device.type == "cpu" and seq_len != int(level_lens[level]):  # on a GPU: the caller's contract
        raise ValueError(f"q: expected [{num_nodes}, {int(level_lens[level])}, {num_q_heads}, {head_dim}] "
                         f"([len(node_ids), level_lens[level], Hq, D]), got {list(q.shape)}")
    if path == "flat" and level_lens.device.type == "cpu":  # on a GPU: the caller's contract (no sync)
        lens, positions = level_lens[:level + 1], level_positions[:level + 1]
        if level and not torch.equal(positions[1:], positions[:-1] + lens[:-1]):
            raise ValueError(f"level_positions: path='flat' expects consecutive segments "
                             f"(positions[k+1] = positions[k] + lens[k]), got positions {positions.tolist()} and "
                             f"lens {lens.tolist()}; use path='segments'")

    if num_nodes:  # the kernel reads the rows these address unchecked (a host read: one GPU sync per call)
        check_node_ids(node_ids, torch.tensor(level, device=q.device), level_offsets[:level + 1].reshape(1, -1),
                       level_lens, k_store.shape[0], path_index)
    out = torch.empty((num_nodes * seq_len, num_q_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_nodes == 0 or seq_len == 0:
        return out.view(q.shape)
    if q.stride(3) != 1:
        q = q.contiguous()
    # this chunk as a pass of one offsets table: meta row = (node id, level, first query row, table 0)
    meta = torch.stack([node_ids, torch.full_like(node_ids, level),
                        torch.arange(num_nodes, device=q.device) * seq_len, torch.zeros_like(node_ids)], dim=1)
    _launch(q.reshape(num_nodes * seq_len, num_q_heads, head_dim), k_store, v_store, out, meta,
            level_offsets[:level + 1].contiguous().view(1, -1), level_lens.contiguous(), player_lens.contiguous(),
            level_positions.contiguous(), seq_len, scale, attention_masking, softcap, sliding_window, path,
            path_index=None if path_index is None else path_index.contiguous(), sinks=sinks)
    return out.view(q.shape)


def subset_attention_pass(
    q: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    meta: torch.Tensor,
    level_offsets: torch.Tensor,
    level_lens: torch.Tensor,
    player_lens: torch.Tensor,
    level_positions: torch.Tensor,
    *,
    max_seg_len: int,
    scale: float,
    attention_masking: bool = False,
    softcap: float | None = None,
    sliding_window: int | None = None,
    path: str | None = None,
    k_pass: torch.Tensor | None = None,
    v_pass: torch.Tensor | None = None,
    path_index: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`subset_attention` for a whole pass of the trie engine in one launch: nodes of any levels and KV blocks.

    Args:
        q: ``[T, Hq, D]`` the queries of every node of the pass (after RoPE), each node's segment a run of rows.
        k_store, v_store: ``[T_total, Hkv, D]`` as in :func:`subset_attention`.
        meta: ``[N, 4]`` int64, one row per query node: node id, level, first row in ``q``, row of
            ``level_offsets`` that holds its levels' store offsets.
        level_offsets: ``[num_tables, W]`` int64 (``W`` > every node's level): store offsets per table (one per
            chunk: a game's block, the last level's window); level_lens, player_lens, level_positions: ``[W]``
            int64, shared by every node (one layout, consecutive segments when ``path="flat"``).
        max_seg_len: the longest segment of the nodes (sizes the grid without reading the tables).
        scale, attention_masking, softcap, sliding_window, path, sinks: as in :func:`subset_attention`.
        k_pass, v_pass: ``[T, Hkv, D]`` the pass's own keys and values (row ``i`` = the token of query row ``i``):
            each node's own segment is read there, so the store needs only the levels that have descendants (the
            engine keeps no KV of its last level at all). None (both): own segments are read from the store.
        path_index: ``[N, W]`` int64, a compact store's ancestor indices, row ``i`` for meta row ``i`` (as in
            :func:`subset_attention`, columns ``0..level`` read); None: the ancestor ids from the node bits.

    Returns:
        ``[T, Hq, D]`` in ``q``'s dtype, each node's rows where its queries are (rows of no node are left as
        allocated).

    Raises:
        ValueError: bad shapes, dtypes or options; meta rows whose level, offsets-table row, node id (outside
        ``[0, 2^level)``) or query rows are out of range; store rows they (or ``path_index``) address outside the
        stores. The values are read on the host: one GPU sync per call (the engine, which builds these tables from its
        plan, calls the unchecked private twin: a sync per layer would serialise host and GPU). Tests compare the
        result with :func:`subset_attention` per chunk.
    """
    return _subset_attention_pass(q, k_store, v_store, meta, level_offsets, level_lens, player_lens, level_positions,
                                  max_seg_len=max_seg_len, scale=scale, attention_masking=attention_masking,
                                  softcap=softcap, sliding_window=sliding_window, path=path, k_pass=k_pass,
                                  v_pass=v_pass, path_index=path_index, sinks=sinks, check_ids=True)


def _subset_attention_pass(
    q: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    meta: torch.Tensor,
    level_offsets: torch.Tensor,
    level_lens: torch.Tensor,
    player_lens: torch.Tensor,
    level_positions: torch.Tensor,
    *,
    max_seg_len: int,
    scale: float,
    attention_masking: bool = False,
    softcap: float | None = None,
    sliding_window: int | None = None,
    path: str | None = None,
    k_pass: torch.Tensor | None = None,
    v_pass: torch.Tensor | None = None,
    path_index: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    check_ids: bool,
) -> torch.Tensor:
    """:func:`subset_attention_pass`; ``check_ids=False`` skips the check of the tables' values (the engine)."""
    path = DEFAULT_PATH if path is None else path
    if q.dim() != 3:
        raise ValueError(f"q: expected shape [T, Hq, D], got {tuple(q.shape)}")
    _check_common(q, k_store, v_store, scale, softcap, sliding_window, path, sinks, sink_values=check_ids)
    if meta.dtype != torch.int64 or meta.dim() != 2 or meta.shape[1] != 4 or meta.device != q.device:
        raise ValueError(f"meta: expected int64 [N, 4] on {q.device}, got {meta.dtype} of shape {tuple(meta.shape)} "
                         f"on {meta.device}")
    if level_offsets.dtype != torch.int64 or level_offsets.dim() != 2 or level_offsets.device != q.device:
        raise ValueError(f"level_offsets: expected int64 [num_tables, W] on {q.device}, got {level_offsets.dtype} "
                         f"of shape {tuple(level_offsets.shape)} on {level_offsets.device}")
    for name, table in (("level_lens", level_lens), ("player_lens", player_lens),
                        ("level_positions", level_positions)):
        _check_table(name, table, level_offsets.shape[1] - 1, q.device)
    _check_index(path_index, (meta.shape[0], level_offsets.shape[1]), q.device)
    if not isinstance(max_seg_len, int) or max_seg_len < 0:
        raise ValueError(f"max_seg_len: expected an int >= 0, got {max_seg_len!r}")
    if (k_pass is None) != (v_pass is None):
        raise ValueError("k_pass, v_pass: expected both or neither, got one")
    if k_pass is not None:
        expected = (q.shape[0], k_store.shape[1], k_store.shape[2])
        for name, t in (("k_pass", k_pass), ("v_pass", v_pass)):
            if tuple(t.shape) != expected or t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name}: expected {q.dtype} of shape {expected} on {q.device}, got {t.dtype} of "
                                 f"shape {tuple(t.shape)} on {t.device}")
        k_pass = k_pass if k_pass.stride(2) == 1 else k_pass.contiguous()
        v_pass = v_pass if v_pass.stride(2) == 1 else v_pass.contiguous()
    if check_ids and meta.shape[0]:
        _check_pass_rows(q, k_store, meta, level_offsets, level_lens, max_seg_len, path_index, k_pass is None)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.stride(2) != 1:
        q = q.contiguous()
    _launch(q, k_store, v_store, out, meta.contiguous(), level_offsets.contiguous(), level_lens.contiguous(),
            player_lens.contiguous(), level_positions.contiguous(), max_seg_len, scale, attention_masking, softcap,
            sliding_window, path, k_pass, v_pass, None if path_index is None else path_index.contiguous(), sinks)
    return out


def _check_pass_rows(q: torch.Tensor, k_store: torch.Tensor, meta: torch.Tensor, level_offsets: torch.Tensor,
                     level_lens: torch.Tensor, max_seg_len: int, path_index: torch.Tensor | None,
                     own_in_store: bool) -> None:
    """ValueError for meta rows the kernel would read out of range: a level past the tables, an offsets-table row
    past ``level_offsets``, query rows past ``q`` or a segment longer than ``max_seg_len``; then
    :func:`check_node_ids` (node ids, store rows)."""
    num_tables, width = level_offsets.shape
    nodes, levels, first, tables = meta.unbind(1)
    bad_level = (levels < 0) | (levels >= width)
    bad_table = (tables < 0) | (tables >= num_tables)
    seg = level_lens[levels.clamp(0, width - 1)]
    bad_rows = (first < 0) | (first + seg > q.shape[0]) | (seg > max_seg_len)
    flags = torch.stack([bad_level.any(), bad_table.any(), bad_rows.any()]).tolist()
    if flags[0]:
        i = int(bad_level.nonzero()[0, 0])
        raise ValueError(f"meta[{i}]: expected a level in [0, {width}) (the tables' width), received {int(levels[i])}")
    if flags[1]:
        i = int(bad_table.nonzero()[0, 0])
        raise ValueError(f"meta[{i}]: expected an offsets-table row in [0, {num_tables}) (level_offsets' rows), "
                         f"received {int(tables[i])}")
    if flags[2]:
        i = int(bad_rows.nonzero()[0, 0])
        raise ValueError(f"meta[{i}]: expected query rows [first, first + level_lens[level]) within q's "
                         f"{q.shape[0]} rows and a segment of at most max_seg_len={max_seg_len} tokens, received "
                         f"first row {int(first[i])} and {int(seg[i])} tokens at level {int(levels[i])}")
    check_node_ids(nodes, levels, level_offsets[tables], level_lens, k_store.shape[0], path_index,
                   own_in_store=own_in_store, names=("meta[:, 0]", "level", "level_offsets[meta[:, 3]]"))
