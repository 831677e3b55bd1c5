"""The trie plan: segments, token counts against the closed formula, node sets for subsets, memory planning."""
from types import SimpleNamespace

import pytest
import torch

from sftint_fast.engine.adapters import ModelDims
from sftint_fast.engine.plan import PASS_TOKENS, TARGET_CHUNK_TOKENS, default_pass_tokens, plan_trie

DIMS = ModelDims(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576, intermediate_size=1536,
                 vocab_size=49152, dtype=torch.float32)
LAYOUTS = [
    (9, ((2, 3), (5, 7))),
    (12, ((0, 1), (3, 5), (7, 8), (11, 12))),
    (11, ((2, 4), (4, 7), (7, 8), (9, 10))),
    (6, ()),
    (85, tuple((20 + 5 * i, 22 + 5 * i) for i in range(10))),
]


def layout(seq_len, spans):
    return SimpleNamespace(input_ids=torch.zeros(seq_len, dtype=torch.int64), player_spans=spans)


def formula_tokens(seq_len, spans):
    """``|bg_0| + Σ_j 2^{j+1}(|p_j| + |bg_{j+1}|)``."""
    starts = [s for s, _ in spans] + [seq_len]
    total = starts[0]
    for j, (start, end) in enumerate(spans):
        total += (1 << (j + 1)) * ((end - start) + (starts[j + 1] - end))
    return total


@pytest.mark.parametrize("seq_len,spans", LAYOUTS)
def test_token_counts_match_formula(seq_len, spans):
    plan = plan_trie(layout(seq_len, spans))
    n = len(spans)
    assert plan.trie_tokens == formula_tokens(seq_len, spans)
    assert plan.naive_tokens == (1 << n) * seq_len
    assert plan.ideal_ratio == pytest.approx(plan.naive_tokens / plan.trie_tokens)
    assert sum(plan.level_lens) == seq_len
    assert plan.node_counts == tuple(1 << j for j in range(n + 1))
    for j, (start, end) in enumerate(spans):
        assert plan.level_positions[j + 1] == start and plan.player_lens[j + 1] == end - start
    # Every node of every level is in exactly one chunk, and the passes run the chunks in level order.
    for level in range(n + 1):
        chunked = torch.cat(plan.chunks(level))
        assert torch.equal(chunked, plan.level_nodes[level])
    scheduled = [(level, ids) for units in plan.passes for level, ids, _ in units]
    assert [lv for lv, _ in scheduled] == sorted(lv for lv, _ in scheduled)
    for level in range(n + 1):
        if plan.level_lens[level]:
            assert torch.equal(torch.cat([ids for lv, ids in scheduled if lv == level]), plan.level_nodes[level])
    assert all(sum(u.level == n for u in units) <= 1 for units in plan.passes)


def test_batch_size_bounds_nodes_per_pass():
    plan = plan_trie(layout(*LAYOUTS[-1]), batch_size=5)
    assert max(sum(len(u.nodes) for u in units) for units in plan.passes) <= 5
    assert len(plan_trie(layout(*LAYOUTS[-1])).passes) < len(plan.passes)


def test_pass_tokens_bound_passes_and_default_by_device():
    seq_len, spans = 226, tuple((100 + 8 * i, 103 + 8 * i) for i in range(12))  # the GPU benchmark's n=12 layout
    big = layout(seq_len, spans)
    sizes = {}
    for tokens in (2048, 8192, 32768):
        plan = plan_trie(big, pass_tokens=tokens, dims=DIMS, max_memory=64 << 30)
        per_pass = [sum(len(u.nodes) * plan.level_lens[u.level] for u in units) for units in plan.passes]
        assert max(per_pass) <= tokens and sum(per_pass) == plan.trie_tokens
        sizes[tokens] = len(plan.passes)
    assert sizes[2048] > sizes[8192] > sizes[32768] >= plan.trie_tokens // 32768
    assert len(plan_trie(big).passes) == sizes[8192]  # None = TARGET_CHUNK_TOKENS
    assert default_pass_tokens(torch.device("cpu")) == TARGET_CHUNK_TOKENS
    assert default_pass_tokens("cuda") == PASS_TOKENS["cuda"] > TARGET_CHUNK_TOKENS
    assert default_pass_tokens("meta") == TARGET_CHUNK_TOKENS
    with pytest.raises(ValueError, match="pass_tokens"):
        plan_trie(big, pass_tokens=0)


@pytest.mark.parametrize("num_games", [1, 3])
def test_plan_without_a_window_stores_no_last_level(num_games):
    """window=False (the fused kernel reads own segments from the pass): no last-level rows in the store, less
    KV memory, every last-level node still scheduled once."""
    big = layout(*LAYOUTS[-1])
    kw = dict(dims=DIMS, max_memory=8 << 30, num_games=num_games, pass_tokens=4096, batch_size=300)
    with_window, without = plan_trie(big, **kw), plan_trie(big, window=False, **kw)
    assert with_window.window and not without.window and without.to_dict()["window"] is False
    assert without.window_rows == 0 and without.game_rows == with_window.window_start
    assert without.store_rows == num_games * with_window.window_start < with_window.store_rows
    assert without.kv_bytes < with_window.kv_bytes and without.peak_bytes < with_window.peak_bytes
    n = without.num_players
    assert all(sum(u.level == n for u in units) <= num_games for units in with_window.passes)
    for plan in (with_window, without):
        scheduled = torch.cat([u.nodes for units in plan.passes for u in units if u.level == n and u.game == 0])
        assert torch.equal(scheduled, plan.level_nodes[n])


def test_subsets_reach_only_their_prefixes():
    seq_len, spans = LAYOUTS[-1]
    gen = torch.Generator().manual_seed(0)
    subsets = torch.randint(0, 1 << len(spans), (40,), generator=gen)
    plan = plan_trie(layout(seq_len, spans), subsets=subsets, batch_size=4)
    for j in range(len(spans) + 1):
        want = sorted({int(s) & ((1 << j) - 1) for s in subsets})
        assert plan.level_nodes[j].tolist() == want
    assert torch.equal(plan.level_nodes[-1][plan.leaf_index], subsets)
    assert plan.trie_tokens == sum(c * n for c, n in zip(plan.node_counts, plan.level_lens))
    assert plan.naive_tokens == len(subsets) * seq_len
    # Last-level chunks hold at most `batch_size` leaves, consecutive indices within the KV window
    for chunk in plan.chunks(len(spans)):
        index = plan.node_index(len(spans), chunk)
        assert torch.equal(index, torch.arange(int(index[0]), int(index[0]) + len(chunk)))
        assert len(chunk) <= plan.window_nodes == plan.level_chunk_nodes[-1] <= 4
    # a compact store: each level holds the nodes reached, addressed by their rank; the path index finds ancestors
    assert plan.compact
    assert plan.window_start == sum(c * n for c, n in zip(plan.node_counts[:-1], plan.level_lens[:-1]))
    for j in range(len(spans) + 1):
        nodes = plan.level_nodes[j]
        path = plan.path_index(j, nodes)
        assert path.shape == (len(nodes), j + 1) and torch.equal(path[:, j], torch.arange(len(nodes)))
        for k in range(j + 1):
            assert torch.equal(plan.level_nodes[k][path[:, k]], nodes & ((1 << k) - 1))


def test_memory_plan_chunks_and_errors():
    game = layout(*LAYOUTS[-1])
    roomy = plan_trie(game, dims=DIMS, max_memory=64 << 30)
    tight = plan_trie(game, dims=DIMS, max_memory=roomy.kv_bytes // 2 + (64 << 20))
    assert tight.peak_bytes <= tight.max_memory
    assert max(tight.level_chunk_nodes) < max(roomy.level_chunk_nodes)
    rows = DIMS.num_layers * 2 * DIMS.num_kv_heads * DIMS.head_dim * 4
    assert roomy.kv_bytes == roomy.store_rows * rows
    with pytest.raises(ValueError, match=r"needs at least \d+\.\d+ GiB"):
        plan_trie(game, dims=DIMS, max_memory=1 << 20)


def test_bytes_a_forward_holds_are_planned_once():
    """``ModelDims.forward_bytes`` (PEFT's adapted MoE expert weights, built whole on every call of a sparse block)
    are held by every pass whatever its tokens: the plan needs them once more, fits its chunks to what is left of
    the budget, and counts them in its peak (the plan ignored them and ran over ``max_memory``)."""
    import dataclasses
    import re

    from sftint_fast.engine.plan import TrieMemoryError

    game = layout(*LAYOUTS[-1])
    held = 96 << 20
    holding = dataclasses.replace(DIMS, forward_bytes=held)
    needed = []
    for dims in (DIMS, holding):
        with pytest.raises(TrieMemoryError) as refused:
            plan_trie(game, dims=dims, max_memory=1)
        needed.append(int(re.search(r"needs at least .*?\((\d+) bytes\)", str(refused.value)).group(1)))
    assert needed[1] == needed[0] + held and "adapted weights a forward holds" in str(refused.value)
    budget = plan_trie(game, dims=DIMS, max_memory=64 << 30).kv_bytes // 2 + (64 << 20)
    plain, plan = plan_trie(game, dims=DIMS, max_memory=budget), plan_trie(game, dims=holding, max_memory=budget + held)
    assert plan.level_chunk_nodes == plain.level_chunk_nodes and plan.peak_bytes == plain.peak_bytes + held
    assert plan.peak_bytes <= plan.max_memory
    tight = plan_trie(game, dims=holding, max_memory=budget)
    assert tight.peak_bytes <= tight.max_memory and max(tight.level_chunk_nodes) < max(plain.level_chunk_nodes)



@pytest.mark.parametrize("spans", [((3, 2),), ((0, 2), (1, 3)), ((5, 10),)])
def test_bad_spans(spans):
    with pytest.raises(ValueError, match="player_spans"):
        plan_trie(layout(8, spans))


def test_bad_subsets():
    with pytest.raises(ValueError, match="subsets"):
        plan_trie(layout(9, ((2, 3), (5, 7))), subsets=torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="subsets"):
        plan_trie(layout(9, ((2, 3), (5, 7))), subsets=torch.tensor([0.0]))


def test_available_ram_without_psutil(monkeypatch):
    """A --no-deps install may lack psutil: the CPU budget then comes from /proc/meminfo, not an ImportError."""
    import importlib.util
    import sys

    from sftint_fast._memory import available_ram, free_memory
    from sftint_fast.interactions import andor
    from sftint_fast.engine.naive import available_memory
    from sftint_fast.engine.plan import default_max_memory

    with open("/proc/meminfo") as meminfo:
        mem_available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    if importlib.util.find_spec("psutil") is not None:
        import psutil

        assert abs(available_ram() - psutil.virtual_memory().available) < 512 * 2**20
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    without = available_ram()
    assert 0 < without and abs(without - mem_available) < 512 * 2**20
    assert 0 < default_max_memory(torch.device("cpu")) < without
    # the naive engine and the AND-OR solver read the same figure (MemAvailable, not the smaller MemFree)
    for read in (free_memory, available_memory, andor._free_bytes):
        assert abs(read(torch.device("cpu")) - mem_available) < 512 * 2**20


def test_sparse_leaves_fill_their_chunks():
    """Sampled subsets: the leaves go in full chunks (one pass here) whatever their ids' spread, and the window
    holds exactly one chunk (a compact store addresses leaves by rank)."""
    from sftint_fast.bench import sample_subsets

    seq_len, spans = 40, tuple((2 + 3 * i, 4 + 3 * i) for i in range(10))
    game = layout(seq_len, spans)
    subsets = sample_subsets(10, 48, seed=0)
    plan = plan_trie(game, subsets=subsets)
    assert plan.window_nodes == 48 and len(plan.passes) == 1 and len(plan.chunks(10)) == 1
    dense = plan_trie(game)
    assert dense.window_nodes == dense.level_chunk_nodes[-1] and not dense.compact
    # a memory budget shrinks the chunks (and the window with them), and the plan still fits
    roomy = plan_trie(game, subsets=subsets, dims=DIMS, max_memory=64 << 30)
    assert roomy.window_nodes == 48
    row = roomy.level_lens[-1] * DIMS.num_layers * 2 * DIMS.num_kv_heads * DIMS.head_dim * 4
    budget = roomy.peak_bytes - 24 * (row + roomy.activation_bytes // 48)
    tight = plan_trie(game, subsets=subsets, dims=DIMS, max_memory=budget)
    assert tight.window_nodes == tight.level_chunk_nodes[-1] < 48 and tight.peak_bytes <= budget
    scheduled = torch.cat([u.nodes for units in tight.passes for u in units if u.level == 10])
    assert torch.equal(scheduled, tight.level_nodes[10])
    no_window = plan_trie(game, subsets=subsets, window=False)  # the fused kernel keeps no last-level KV
    assert no_window.window_nodes == 0 and len(no_window.chunks(10)) == 1


def test_sampled_subsets_store_only_the_nodes_they_reach():
    """The KV store of a compact plan grows with the sample, not with 2^n: n=40 players and 64 sampled subsets
    plan a store of at most 64 nodes per level (a dense store would need 2^40 nodes at the last stored level)."""
    from sftint_fast.bench import sample_subsets

    n = 40
    seq_len, spans = 2 + 3 * n, tuple((2 + 3 * i, 4 + 3 * i) for i in range(n))
    subsets = sample_subsets(n, 64, seed=3)
    plan = plan_trie(layout(seq_len, spans), subsets=subsets, dims=DIMS, max_memory=1 << 30)
    assert plan.compact and max(plan.node_counts) <= 64 and plan.node_counts[-1] == len(subsets.unique())
    row = DIMS.num_layers * 2 * DIMS.num_kv_heads * DIMS.head_dim * DIMS.dtype_bytes
    stored_rows = sum(c * n for c, n in zip(plan.node_counts[:-1], plan.level_lens[:-1]))
    assert plan.window_start == stored_rows and plan.kv_bytes == (stored_rows + plan.window_rows) * row
    assert plan.peak_bytes <= 1 << 30
    # every 2^n subset: the ids are the indices (no path index needed), whatever the order they come in
    full = plan_trie(layout(20, ((2, 4), (5, 6), (9, 12))), subsets=torch.arange(7, -1, -1))
    assert not full.compact and torch.equal(full.node_index(3, torch.tensor([5, 2])), torch.tensor([5, 2]))


def test_memory_error_comes_before_allocating_the_levels_and_states_bytes():
    """n=40, all 2^n variants: the plan refuses from the sizes alone (building its 2^40 node ids first would need
    8 TiB), and a budget far below one GiB still reads as bytes, not as '0.00 GiB needed, 0.00 GiB available'."""
    big = layout(40, tuple((i, i + 1) for i in range(40)))
    with pytest.raises(ValueError, match=r"needs at least \d+\.\d+ GiB \(\d+ bytes\).*max_memory is 0\.00 GiB "
                                         r"\(1048576 bytes\)"):
        plan_trie(big, dims=DIMS, max_memory=1 << 20)
    with pytest.raises(ValueError, match=r"needs at least 0\.\d+ GiB \(\d+ bytes\).*\(10000 bytes\)"):
        plan_trie(layout(*LAYOUTS[0]), dims=DIMS, max_memory=10_000)


def test_a_trie_refused_under_the_default_budget_says_the_budget_was_the_default(monkeypatch):
    """``sf.evaluate(method="trie")`` without ``max_memory``: the refusal named "max_memory is X GiB" as if the user
    had passed it. It now says the limit was the default share of the free memory and how to set it; a budget the
    user gave is named as before."""
    import sftint_fast as sf
    from sftint_fast.engine import plan as plan_module
    from sftint_fast.game import Game

    from conftest import tiny_model

    model = tiny_model("llama")
    hidden = model.get_input_embeddings().weight.shape[1]
    game = Game(input_ids=torch.arange(4, 10), player_spans=tuple((i, i + 1) for i in range(6)), words=("w",) * 6,
                target=torch.tensor([5]), baseline=torch.zeros(hidden), prompt_length=6)
    monkeypatch.setattr(plan_module, "free_memory", lambda device: 20_000)
    with pytest.raises(plan_module.TrieMemoryError, match=r"max_memory is .*\(12000 bytes\);.* \(max_memory not given: "
                                                          r"the default, 60% of the free memory; pass max_memory="):
        sf.evaluate(model, game, method="trie", progress=False)
    with pytest.raises(plan_module.TrieMemoryError, match=r"\(12000 bytes\); evaluate fewer players.*method='naive' "
                                                          r"\(one forward per variant: 2\^6 of them here\)$"):
        sf.evaluate(model, game, method="trie", progress=False, max_memory=12_000)


def test_a_float_memory_budget_plans_as_its_whole_bytes():
    """``max_memory`` is validated as any positive finite number (``1.5e5``, as ``sf.evaluate`` takes it): a float
    budget that bounds the chunks plans as ``int(max_memory)`` (it gave float chunk sizes and a TypeError in
    ``split``)."""
    from conftest import tiny_model
    from test_trie import make_game

    import sftint_fast as sf
    from sftint_fast.engine.adapters import get_adapter

    net = tiny_model("llama")
    game = make_game("spread_n5")
    dims = get_adapter(net).dims
    plan = plan_trie(game, dims=dims, max_memory=1.5e5)
    assert plan.to_dict() == plan_trie(game, dims=dims, max_memory=150_000).to_dict()
    assert plan.level_chunk_nodes[-1] < plan.node_counts[-1] and isinstance(plan.max_memory, int)
    many = sf.evaluate_many(net, [game, game], method="trie", max_memory=1.5e5, progress=False)
    whole = sf.evaluate_many(net, [game, game], method="trie", max_memory=150_000, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(many, whole))  # the same plan: the same arithmetic
    one = sf.evaluate(net, game, method="naive", progress=False)
    for v in many:  # grouped games: other batch shapes, so rounding may differ with the thread count
        torch.testing.assert_close(v, one, rtol=1e-5, atol=1e-5)


def test_plan_without_a_model_refuses_node_ids_beyond_memory(monkeypatch):
    """``plan_trie`` without a model (token counts, ``ideal_ratio``) had no memory check at all: for n=34 it built the
    node ids of all 2^j nodes of every level (2^35 int64, 256 GiB) and the process was killed by the OOM killer. It
    now raises TrieMemoryError, naming the bytes the ids need and the budget, before building any of them."""
    from sftint_fast.engine import plan as plan_module

    def built(*args, **kwargs):
        raise AssertionError("the node ids were built before the memory check")

    monkeypatch.setattr(plan_module, "_level_nodes", built)
    big = layout(43, tuple((1 + i, 2 + i) for i in range(40)))
    with pytest.raises(plan_module.TrieMemoryError, match=r"n=40.*node ids .* need .*\(17592186044408 bytes\).*"
                                                         r"max_memory is .*\(1073741824 bytes\)"):
        plan_trie(big, max_memory=1 << 30)
    monkeypatch.setattr(plan_module, "free_memory", lambda device: 1 << 30)
    with pytest.raises(plan_module.TrieMemoryError, match=r"n=40.*node ids .* need .*\(the default\)"):
        plan_trie(big)
    monkeypatch.undo()
    small = plan_trie(layout(*LAYOUTS[1]), max_memory=8 * (2**5 - 1))  # exactly the ids of n=4 fit
    assert small.kv_bytes == 0 and small.max_memory == 8 * (2**5 - 1)
