"""Fused subset-attention kernel (Triton, interpreter on CPU) against the plain gather reference."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import requires_triton
from sftint_fast.ops.reference import subset_attention_reference

pytestmark = requires_triton

# Compiled kernels on a GPU; the interpreter (conftest sets TRITON_INTERPRET=1 without CUDA) on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # ~4 ulp of the low-precision outputs


def make_store(lens, players, num_kv_heads, head_dim, dtype, seed):
    """Random flat K/V store for a trie whose level k has 2^k nodes of lens[k] tokens, plus its int64 tables."""
    gen = torch.Generator().manual_seed(seed)
    offsets, positions, total, pos = [], [], 0, 0
    for k, length in enumerate(lens):
        offsets.append(total)
        positions.append(pos)
        total += (1 << k) * length
        pos += length
    k_store = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_store = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    tables = [torch.tensor(t, dtype=torch.int64) for t in (offsets, list(lens), list(players), positions)]
    return k_store, v_store, tables, gen


def run_both(lens, players, level, nodes, num_q_heads, num_kv_heads, head_dim, dtype, seed=0, **options):
    from sftint_fast.ops.triton.subset_attention import subset_attention

    k_store, v_store, tables, gen = make_store(lens, players, num_kv_heads, head_dim, dtype, seed)
    q = torch.randn(len(nodes), lens[level], num_q_heads, head_dim, generator=gen).to(dtype)
    node_ids = torch.tensor(nodes, dtype=torch.int64)
    args = (q, k_store, v_store, node_ids, *tables)
    path = options.pop("path", None)
    kw = dict(level=level, scale=head_dim ** -0.5, **options)
    on_device = tuple(t.to(DEVICE) for t in args)
    return subset_attention(*on_device, path=path, **kw).cpu(), subset_attention_reference(*args, **kw)


# (lens per level, player tokens per level, level, node ids, Hq, Hkv, D)
CASES = {
    "level0-causal-only": ([7], [0], 0, [0], 4, 2, 32),
    "level1-mha": ([3, 2], [0, 1], 1, [1, 0], 2, 2, 64),
    "level2-gqa2": ([4, 1, 6], [0, 1, 2], 2, [3, 1], 4, 2, 32),
    "level3-gqa3-noncons": ([2, 5, 3, 7], [0, 2, 1, 3], 3, [6, 1, 4], 6, 2, 32),
    "level4-gqa4": ([5, 3, 1, 2, 4], [0, 1, 1, 2, 3], 4, [15, 2, 9, 4, 11], 4, 1, 64),
    "empty-bg0": ([0, 3, 2], [0, 1, 1], 2, [2, 3, 0], 4, 2, 32),
    "seg-len-1": ([1, 1, 1, 1], [0, 1, 1, 1], 3, [5, 2], 2, 1, 32),
    "player-block-skip": ([2, 23, 3], [0, 18, 2], 2, [0, 2, 3], 2, 1, 32),
    # head widths that are not powers of two (Pythia-2.8B: 80, Phi-3-mini: 96): the padded lanes must stay out
    "head-dim-80": ([4, 1, 6], [0, 1, 2], 2, [3, 1], 4, 2, 80),
    "head-dim-96-mha": ([3, 2, 2], [0, 1, 1], 2, [2, 0, 3], 2, 2, 96),
}
OPTIONS = {
    "plain": {},
    "masking": {"attention_masking": True},
    "softcap": {"softcap": 5.0},
    "window": {"sliding_window": 6},
    "masking-window-softcap": {"attention_masking": True, "sliding_window": 4, "softcap": 3.0},
}


PATHS = ["flat", "segments"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("option", ["plain", "masking"])
def test_kernel_matches_reference_fp32(case, option, path):
    lens, players, level, nodes, hq, hkv, d = CASES[case]
    out, ref = run_both(lens, players, level, nodes, hq, hkv, d, torch.float32, path=path, **OPTIONS[option])
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["level3-gqa3-noncons", "level4-gqa4", "player-block-skip"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_kernel_matches_reference_fp16(case, option, path):
    lens, players, level, nodes, hq, hkv, d = CASES[case]
    out, ref = run_both(lens, players, level, nodes, hq, hkv, d, torch.float16, seed=1, path=path,
                        **OPTIONS[option])
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[torch.float16], rtol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["level3-gqa3-noncons", "level4-gqa4"])
@pytest.mark.parametrize("option", ["plain", "masking-window-softcap"])
def test_kernel_matches_reference_bf16(case, option, path):
    """bfloat16 (the usual GPU model dtype) on CPU too: Triton's interpreter multiplied bfloat16 dot operands as their
    raw uint16 bits (outputs ~1e9), so the kernel's bfloat16 path was wrong wherever it could be tested here."""
    lens, players, level, nodes, hq, hkv, d = CASES[case]
    out, ref = run_both(lens, players, level, nodes, hq, hkv, d, torch.bfloat16, seed=1, path=path,
                        **OPTIONS[option])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[torch.bfloat16], rtol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("option", ["softcap", "window", "masking-window-softcap"])
def test_kernel_matches_reference_fp32_options(option, path):
    lens, players, level, nodes, hq, hkv, d = CASES["level4-gqa4"]
    out, ref = run_both(lens, players, level, nodes, hq, hkv, d, torch.float32, seed=2, path=path,
                        **OPTIONS[option])
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window", [1, 3, 17, 40])
def test_long_path_many_key_blocks(path, window):
    """A path longer than several key blocks (43 keys, blocks of 16 in the interpreter) with short and long windows:
    the flat path's first block is moved past keys no query of the block can see."""
    lens, players, level, nodes = [9, 4, 2, 5, 3, 20], [0, 2, 1, 3, 1, 2], 5, [31, 0, 10, 21]
    out, ref = run_both(lens, players, level, nodes, 4, 2, 32, torch.float32, seed=4, path=path,
                        sliding_window=window, attention_masking=True)
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=0)


def test_paths_agree_and_flat_needs_consecutive_segments():
    from sftint_fast.ops.triton.subset_attention import subset_attention

    lens, players, level, nodes, hq, hkv, d = CASES["level4-gqa4"]
    flat, _ = run_both(lens, players, level, nodes, hq, hkv, d, torch.float32, seed=5, path="flat")
    segments, _ = run_both(lens, players, level, nodes, hq, hkv, d, torch.float32, seed=5, path="segments")
    torch.testing.assert_close(flat, segments, atol=TOL[torch.float32], rtol=0)

    k_store, v_store, tables, gen = make_store(lens, players, hkv, d, torch.float32, 0)
    q = torch.randn(len(nodes), lens[level], hq, d, generator=gen)
    gapped = tables[3] + torch.arange(len(lens))  # a gap of one position before every segment
    args = (q, k_store, v_store, torch.tensor(nodes), *tables[:3], gapped)
    with pytest.raises(ValueError, match="consecutive segments"):
        subset_attention(*args, level=level, scale=0.1, path="flat")
    with pytest.raises(ValueError, match="path"):
        subset_attention(*args[:-1], tables[3], level=level, scale=0.1, path="diagonal")
    # the segment walk takes positions as given: same keys, only the window/causal positions move
    subset_attention(*args, level=level, scale=0.1, path="segments")


@pytest.mark.parametrize("own", ["store", "pass"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("option", ["plain", "masking-window-softcap"])
def test_pass_of_several_levels_and_blocks_in_one_launch(path, option, own):
    """subset_attention_pass over a pass mixing levels 0..4, two KV blocks (games) and a shifted last-level window
    equals subset_attention per chunk (itself checked against the reference above). With ``own="pass"`` the own
    segments come from k_pass/v_pass and the store's copies of the deepest level are overwritten first."""
    from sftint_fast.ops.triton.subset_attention import subset_attention, subset_attention_pass

    lens, players, _, _, hq, hkv, d = CASES["level4-gqa4"]
    k_one, v_one, tables, gen = make_store(lens, players, hkv, d, torch.float32, 6)
    game_rows = k_one.shape[0]
    k_store = torch.cat([k_one, torch.randn(k_one.shape, generator=gen)])  # game 1's block after game 0's
    v_store = torch.cat([v_one, torch.randn(v_one.shape, generator=gen)])
    offsets = tables[0].tolist()
    chunks = [(0, [0], 0), (2, [3, 1], 1), (1, [1], 0), (4, [9, 11, 12], 1), (3, [5], 0), (4, [2, 3], 0)]
    kw = dict(scale=0.2, path=path, **OPTIONS[option])
    queries, meta, table_rows, expected, row, own_rows = [], [], [], [], 0, []
    for index, (level, nodes, game) in enumerate(chunks):
        table = [game * game_rows + o for o in offsets[:level + 1]]
        if level == 4 and game == 1:  # the window trick: level 4 addressed relative to the chunk's first node
            table[4] -= 2 * lens[4]
        q = torch.randn(len(nodes), lens[level], hq, d, generator=gen)
        node_ids = torch.tensor(nodes)
        if level == 4 and game == 1:  # write the shifted rows' K/V where the window puts them
            for slot, node in enumerate(nodes):
                rows = table[4] + node * lens[4] + torch.arange(lens[4])
                k_store[rows] = k_store[game_rows + offsets[4] + slot * lens[4] + torch.arange(lens[4])]
        chunk_tables = [torch.tensor(table), *(t[:level + 1] for t in tables[1:])]
        expected.append(subset_attention(q, k_store, v_store, node_ids, *chunk_tables, level=level, **kw))
        queries.append(q.flatten(0, 1))
        for node in nodes:
            meta.append([node, level, row, index])
            own_rows.append(table[level] + node * lens[level] + torch.arange(lens[level]))
            row += lens[level]
        table_rows.append(table + [0] * (len(lens) - len(table)))
    if own == "pass":
        own_rows = torch.cat(own_rows)
        kw.update(k_pass=k_store[own_rows].clone(), v_pass=v_store[own_rows].clone())
        deepest = torch.cat([r for r, m in zip(own_rows.split([lens[m[1]] for m in meta]), meta) if m[1] == 4])
        k_store[deepest], v_store[deepest] = 1e3, -1e3  # the pass must not read these
    out = subset_attention_pass(torch.cat(queries), k_store, v_store, torch.tensor(meta), torch.tensor(table_rows),
                                *tables[1:], max_seg_len=max(lens), **kw)
    torch.testing.assert_close(out, torch.cat([e.flatten(0, 1) for e in expected]), atol=TOL[torch.float32], rtol=0)
    if own == "pass":
        with pytest.raises(ValueError, match="both or neither"):
            subset_attention_pass(torch.cat(queries), k_store, v_store, torch.tensor(meta), torch.tensor(table_rows),
                                  *tables[1:], max_seg_len=max(lens), **dict(kw, v_pass=None))
        with pytest.raises(ValueError, match="k_pass"):
            subset_attention_pass(torch.cat(queries), k_store, v_store, torch.tensor(meta), torch.tensor(table_rows),
                                  *tables[1:], max_seg_len=max(lens), **dict(kw, k_pass=kw["k_pass"][1:]))
        kw.pop("k_pass"), kw.pop("v_pass")
    with pytest.raises(ValueError, match="meta"):
        subset_attention_pass(torch.cat(queries), k_store, v_store, torch.tensor(meta)[:, :3],
                              torch.tensor(table_rows), *tables[1:], max_seg_len=max(lens), **kw)
    with pytest.raises(ValueError, match="q"):
        subset_attention_pass(expected[1], k_store, v_store, torch.tensor(meta), torch.tensor(table_rows),
                              *tables[1:], max_seg_len=max(lens), **kw)


def compact_store(lens, players, level, leaves, num_kv_heads, head_dim, seed):
    """A dense random store (every node of each level) and its compact copy holding only the prefixes of
    ``leaves`` (in id order per level), with both sets of tables and the leaves' path index into the compact one."""
    k_dense, v_dense, tables, gen = make_store(lens[:level + 1], players[:level + 1], num_kv_heads, head_dim,
                                               torch.float32, seed)
    offsets = tables[0].tolist()
    kept = [sorted({m & ((1 << k) - 1) for m in leaves}) for k in range(level + 1)]
    rows, compact_offsets = [], []
    for k, nodes in enumerate(kept):
        compact_offsets.append(len(rows))
        for m in nodes:
            rows.extend(range(offsets[k] + m * lens[k], offsets[k] + (m + 1) * lens[k]))
    path_index = torch.tensor([[kept[k].index(m & ((1 << k) - 1)) for k in range(level + 1)] for m in leaves])
    compact_tables = [torch.tensor(compact_offsets), *tables[1:]]
    assert len(rows) < k_dense.shape[0]  # some prefix is left out
    return (k_dense, v_dense, tables), (k_dense[rows], v_dense[rows], compact_tables), path_index, kept, gen


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("option", ["plain", "masking-window-softcap"])
def test_compact_store_with_a_path_index_matches_the_dense_store(backend, path, option):
    """A store holding only the prefixes sampled leaves reach, addressed through ``path_index``, gives the values
    of the full store addressed by node bits (the reference); a wrong path index changes them; bad shapes refused."""
    from sftint_fast.ops.subset_attention import subset_attention as dispatch
    from sftint_fast.ops.triton.subset_attention import subset_attention

    lens, players, level, hq, hkv, d = [5, 3, 1, 2, 4], [0, 1, 1, 2, 3], 4, 4, 1, 64
    leaves = [15, 2, 9, 11, 10]
    dense, compact, path_index, _, gen = compact_store(lens, players, level, leaves, hkv, d, seed=3)
    q = torch.randn(len(leaves), lens[level], hq, d, generator=gen)
    node_ids = torch.tensor(leaves)
    kw = dict(level=level, scale=0.2, **OPTIONS[option])
    want = subset_attention_reference(q, *dense[:2], node_ids, *dense[2], **kw)
    torch.testing.assert_close(subset_attention_reference(q, *compact[:2], node_ids, *compact[2], **kw,
                                                          path_index=path_index), want, atol=1e-6, rtol=0)

    def run(index):
        args = [t.to(DEVICE) for t in (q, *compact[:2], node_ids, *compact[2])]
        if backend == "triton":
            return subset_attention(*args, **kw, path=path, path_index=index.to(DEVICE)).cpu()
        return dispatch(*args, **kw, path_index=index.to(DEVICE)).cpu()

    torch.testing.assert_close(run(path_index), want, atol=TOL[torch.float32], rtol=0)
    shuffled = path_index.clone()
    shuffled[:, 3] = shuffled[:, 3].flip(0)  # the level-3 ancestors of other leaves
    assert not torch.allclose(run(shuffled), want, atol=1e-3)
    with pytest.raises(ValueError, match="path_index"):
        run(path_index[:, :level])
    with pytest.raises(ValueError, match="path_index"):
        run(path_index.int())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("own", ["store", "pass"])
def test_pass_over_a_compact_store(path, own):
    """subset_attention_pass with a path-index table (a row per meta row, padded to the table width) over chunks of
    levels 2 and 4 of a compact store equals subset_attention per chunk."""
    from sftint_fast.ops.triton.subset_attention import subset_attention, subset_attention_pass

    lens, players, level, hq, hkv, d = [5, 3, 1, 2, 4], [0, 1, 1, 2, 3], 4, 4, 2, 32
    leaves = [15, 2, 9, 11, 10]
    _, (k_store, v_store, tables), leaf_index, kept, gen = compact_store(lens, players, level, leaves, hkv, d, seed=5)
    mid = torch.tensor(kept[2])
    mid_index = torch.stack([torch.tensor([kept[k].index(int(m) & ((1 << k) - 1)) for m in mid]) for k in range(3)], 1)
    kw = dict(scale=0.2, path=path, attention_masking=True, sliding_window=7)
    queries, expected, meta, index_rows, own_rows, row = [], [], [], [], [], 0
    for chunk_level, nodes, index in ((2, mid, mid_index), (4, torch.tensor(leaves), leaf_index)):
        q = torch.randn(len(nodes), lens[chunk_level], hq, d, generator=gen)
        chunk_tables = [t[:chunk_level + 1] for t in tables]
        expected.append(subset_attention(q, k_store, v_store, nodes, *chunk_tables, level=chunk_level, path_index=index,
                                         **kw))
        queries.append(q.flatten(0, 1))
        for node, node_index in zip(nodes.tolist(), index.tolist()):
            meta.append([node, chunk_level, row, 0])
            index_rows.append(node_index + [0] * (level - chunk_level))
            seg = lens[chunk_level]
            own_rows.append(int(tables[0][chunk_level]) + node_index[-1] * seg + torch.arange(seg))
            row += lens[chunk_level]
    extra = {}
    if own == "pass":
        own_rows = torch.cat(own_rows)
        extra = dict(k_pass=k_store[own_rows].clone(), v_pass=v_store[own_rows].clone())
    out = subset_attention_pass(torch.cat(queries), k_store, v_store, torch.tensor(meta), tables[0].view(1, -1),
                                *tables[1:], max_seg_len=max(lens), path_index=torch.tensor(index_rows), **kw, **extra)
    torch.testing.assert_close(out, torch.cat([e.flatten(0, 1) for e in expected]), atol=TOL[torch.float32], rtol=0)
    with pytest.raises(ValueError, match="path_index"):
        subset_attention_pass(torch.cat(queries), k_store, v_store, torch.tensor(meta), tables[0].view(1, -1),
                              *tables[1:], max_seg_len=max(lens), path_index=torch.tensor(index_rows)[:, :3], **kw)


def test_options_change_the_result():
    """Masking, window and softcap each move the output (so the comparisons above can fail)."""
    lens, players, level, nodes, hq, hkv, d = CASES["level3-gqa3-noncons"]
    plain, _ = run_both(lens, players, level, nodes, hq, hkv, d, torch.float32)
    for option in ("masking", "softcap", "window"):
        out, _ = run_both(lens, players, level, nodes, hq, hkv, d, torch.float32, **OPTIONS[option])
        assert (out - plain).abs().max() > 1e-3, option


def test_full_presence_node_ignores_masking():
    """A node whose players are all present sees every key: masking must not change it."""
    lens, players, level, _, hq, hkv, d = CASES["level3-gqa3-noncons"]
    plain, _ = run_both(lens, players, level, [7], hq, hkv, d, torch.float32)
    masked, _ = run_both(lens, players, level, [7], hq, hkv, d, torch.float32, attention_masking=True)
    torch.testing.assert_close(masked, plain, atol=0, rtol=0)


def test_noncontiguous_query_heads():
    """q may be a strided view (e.g. a slice of a fused qkv projection)."""
    from sftint_fast.ops.triton.subset_attention import subset_attention

    lens, players, level, nodes, hq, hkv, d = CASES["level2-gqa2"]
    k_store, v_store, tables, gen = make_store(lens, players, hkv, d, torch.float32, 3)
    big = torch.randn(len(nodes), lens[level], 2 * hq, d, generator=gen)
    q = big[:, :, ::2]
    node_ids = torch.tensor(nodes)
    kw = dict(level=level, scale=0.3)
    args = (q, k_store, v_store, node_ids, *tables)
    out = subset_attention(*(t.to(DEVICE) for t in args), **kw).cpu()
    ref = subset_attention_reference(q.contiguous(), k_store, v_store, node_ids, *tables, **kw)
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32], rtol=0)


def test_bad_inputs_raise_value_error():
    from sftint_fast.ops.triton.subset_attention import subset_attention

    lens, players, level, nodes, hq, hkv, d = CASES["level2-gqa2"]
    k_store, v_store, tables, gen = make_store(lens, players, hkv, d, torch.float32, 0)
    q = torch.randn(len(nodes), lens[level], hq, d)
    node_ids = torch.tensor(nodes)
    good = dict(level=level, scale=0.1)
    bad_calls = {
        "q rank": ((q[0], k_store, v_store, node_ids, *tables), good),
        "dtype mismatch": ((q, k_store.half(), v_store, node_ids, *tables), good),
        "heads": ((torch.randn(len(nodes), lens[level], 3, d), k_store, v_store, node_ids, *tables), good),
        "node dtype": ((q, k_store, v_store, node_ids.int(), *tables), good),
        "short table": ((q, k_store, v_store, node_ids, tables[0][:1], *tables[1:]), good),
        "window": ((q, k_store, v_store, node_ids, *tables), dict(good, sliding_window=0)),
        "softcap": ((q, k_store, v_store, node_ids, *tables), dict(good, softcap=-1.0)),
        "integer q": ((q.long(), k_store, v_store, node_ids, *tables), good),
    }
    for name, (args, kw) in bad_calls.items():
        with pytest.raises(ValueError):
            subset_attention(*args, **kw)
            pytest.fail(name)


@pytest.mark.parametrize("option, value", [("sliding_window", 2.5), ("sliding_window", True), ("level", 2.5),
                                           ("scale", "0.1"), ("softcap", True)],
                         ids=["window=2.5", "window=True", "level=2.5", "scale=str", "softcap=True"])
def test_non_integer_window_and_level_are_refused(option, value):
    """A fractional window was truncated by ``int()`` (w=2.5 kept q - k < 2, one key fewer than q - k < 2.5), a
    fractional level floored (2.5 ran level 2), ``softcap=True`` became a cap of 1.0: silently other numbers.
    Refused, as the dispatcher refuses them; a str scale raised Python's bare comparison TypeError."""
    from sftint_fast.ops.triton.subset_attention import subset_attention

    lens, players, level, nodes, hq, hkv, d = CASES["level2-gqa2"]
    k_store, v_store, tables, _ = make_store(lens, players, hkv, d, torch.float32, 0)
    q = torch.randn(len(nodes), lens[level], hq, d)
    kw = {"level": level, "scale": 0.1, option: value}
    error = ValueError if option == "sliding_window" else TypeError
    with pytest.raises(error, match=option):
        subset_attention(q, k_store, v_store, torch.tensor(nodes), *tables, **kw)


def _cuda_backend_available() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _cuda_backend_available(), reason="triton has no NVIDIA backend to compile with")
def test_kernels_compile_for_sm90():
    """The interpreter accepts code a GPU compiler rejects: compile both kernels ahead of time for sm_90.

    Runs in a subprocess because TRITON_INTERPRET=1 (set by conftest) turns @triton.jit into the interpreter.
    """
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from sftint_fast.ops.triton.subset_attention import _subset_attention_kernel
        from sftint_fast.ops.triton.transforms import _butterfly_kernel

        target = GPUTarget("cuda", 90, 32)
        fn = _subset_attention_kernel.fn
        tables = {"meta_ptr", "offsets_ptr", "lens_ptr", "players_ptr", "positions_ptr", "index_ptr"}
        for dtype, fp32, flat, own, index in (("bf16", False, True, True, False), ("fp32", True, True, False, True),
                                              ("bf16", False, False, True, True), ("bf16", False, False, False, False),
                                              ("bf16", False, True, True, True), ("bf16", False, False, False, True)):
            const = dict(GROUP=3, HEAD_DIM=64, BLOCK_D=64, IS_FP32=fp32, ATTENTION_MASKING=True, HAS_SOFTCAP=True,
                         HAS_WINDOW=True, INPUT_PRECISION="ieee" if fp32 else "tf32", FLAT_PATH=flat,
                         OWN_FROM_PASS=own, HAS_INDEX=index, HAS_SINKS=index, BLOCK_M=64, BLOCK_N=32)
            sig = {}
            for name in fn.arg_names:
                if name.endswith("_ptr"):
                    sig[name] = "*i64" if name in tables else "*" + dtype
                elif name in const:
                    sig[name] = "constexpr"
                else:
                    sig[name] = "fp32" if name in ("qk_scale", "softcap") else "i32"
            # unspecialized, and as a launch specializes it (16-byte aligned tensors, strides multiples of 16:
            # vectorized loads, a different code path)
            aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                       if name.endswith("_ptr") or name.startswith("stride_") and name not in ("stride_offsets",
                                                                                               "stride_index")}
            for attrs in ({}, aligned):
                triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                               target=target)
        for dtype in ("fp32", "fp64"):
            for r, u in ((10, 1), (4, 64)):
                sig = {"x_ptr": "*" + dtype, "stride": "i64", "tiles_per_row": "i64", "cols_per_stride": "i64",
                       "R": "constexpr", "U": "constexpr", "SIGN": "constexpr", "SUPERSET": "constexpr"}
                const = dict(R=r, U=u, SIGN=-1.0, SUPERSET=True)
                triton.compile(triton.compiler.ASTSource(fn=_butterfly_kernel, signature=sig, constexprs=const),
                               target=target)
        print("compiled")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.parametrize("tokens", [1, 3])
def test_query_tokens_must_match_the_level_length(tokens):
    """q with another number of tokens per node than ``level_lens[level]`` (2 here) would leave output rows unwritten
    (fewer in the table) or read and write past q (more): refused, as the torch backend refuses it."""
    from sftint_fast.ops.triton.subset_attention import subset_attention

    lens, players, level, nodes, hq, hkv, d = CASES["level1-mha"]
    k_store, v_store, tables, gen = make_store(lens, players, hkv, d, torch.float32, 0)
    q = torch.randn(len(nodes), tokens, hq, d, generator=gen)
    args = (q, k_store, v_store, torch.tensor(nodes), *tables)
    for path in PATHS:
        with pytest.raises(ValueError, match=rf"q: expected \[2, 2, {hq}, {d}\] \(\[len\(node_ids\), "
                                             rf"level_lens\[level\], Hq, D\]\), got \[2, {tokens}, {hq}, {d}\]"):
            subset_attention(*(t.to(DEVICE) for t in args), level=level, scale=0.1, path=path)


@pytest.fixture
def tf32_setting():
    """Restores torch's float32 matmul precision (both APIs) after a test that changes it."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch without the fp32_precision API (< 2.9)")
    previous = matmul.fp32_precision
    yield matmul
    matmul.fp32_precision = previous


@pytest.mark.parametrize("setting, expected", [("legacy-on", "tf32"), ("legacy-off", "ieee"), ("new-tf32", "tf32"),
                                               ("new-ieee", "ieee")])
def test_fp32_dots_follow_torchs_tf32_setting_from_either_api(setting, expected, tf32_setting, monkeypatch):
    """float32 inputs get TF32 dots exactly when torch's float32 matmuls do, whichever API said so: the new
    ``fp32_precision = "tf32"`` (torch's recommended one) made the launcher's read of the legacy ``allow_tf32`` raise
    a RuntimeError, so a float32 model on the Triton path crashed."""
    from sftint_fast.ops.triton import subset_attention as attention

    if setting.startswith("legacy"):
        tf32_setting.allow_tf32 = setting == "legacy-on"
    else:
        tf32_setting.fp32_precision = setting.split("-")[1]
    kernel, seen = attention._subset_attention_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append(kwargs["INPUT_PRECISION"])
                return kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(attention, "_subset_attention_kernel", Spy())
    out, ref = run_both(*CASES["level1-mha"], torch.float32)
    assert seen == [expected]
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32] if expected == "ieee" else 2e-2, rtol=0)


@pytest.mark.parametrize("entry", ["triton", "dispatch", "reference", "pass"])
def test_node_ids_out_of_range_are_refused(entry):
    """Node ids outside [0, 2^level), path indices or offsets addressing rows past the store were read unchecked:
    node 4 at level 2 read level 2's rows 4*6.. past the 4 nodes stored there (another node's or no memory at all:
    wrong numbers, or a crash on a GPU). The public entry points refuse them; the engine's private ones do not look."""
    from sftint_fast.ops.subset_attention import subset_attention as dispatch
    from sftint_fast.ops.triton.subset_attention import subset_attention, subset_attention_pass

    lens, players, level, nodes, hq, hkv, d = CASES["level2-gqa2"]
    k_store, v_store, tables, gen = make_store(lens, players, hkv, d, torch.float32, 0)
    k_store, v_store = torch.cat([k_store, k_store[-6:]]), torch.cat([v_store, v_store[-6:]])  # room for node 4
    q = torch.randn(len(nodes), lens[level], hq, d, generator=gen)

    def call(node_ids, offsets=tables[0], store=k_store, path_index=None):
        args = [t.to(DEVICE) for t in (q, store, store, torch.tensor(node_ids), offsets, *tables[1:])]
        kw = dict(level=level, scale=0.1, path_index=None if path_index is None else path_index.to(DEVICE))
        if entry == "triton":
            return subset_attention(*args, **kw)
        if entry == "dispatch":
            return dispatch(*args, **kw)
        if entry == "reference":
            return subset_attention_reference(*args, **kw)
        meta = torch.tensor([[node, level, i * lens[level], 0] for i, node in enumerate(node_ids)], device=DEVICE)
        index, _ = kw.pop("path_index"), kw.pop("level")
        return subset_attention_pass(args[0].flatten(0, 1), *args[1:3], meta, args[4].view(1, -1), *args[5:],
                                     max_seg_len=lens[level], path_index=index, **kw)

    call([3, 1])
    with pytest.raises(ValueError, match=r"expected node ids in \[0, 2\^2\) = \[0, 4\) at level 2, received 4"):
        call([3, 4])
    with pytest.raises(ValueError, match="received -1"):
        call([-1, 1])
    short = tables[0].clone()
    short[2] += 4  # level 2 starts 4 rows later: node 3's segment runs past the store
    with pytest.raises(ValueError, match=r"k_store, v_store: expected the rows .* within the store's \[0, 23\)"):
        call([3, 1], offsets=short, store=k_store[:23])
    with pytest.raises(ValueError, match="path_index: expected ancestor indices >= 0"):
        call([3, 1], path_index=torch.tensor([[0, 1, 3], [0, -1, 1]]))
