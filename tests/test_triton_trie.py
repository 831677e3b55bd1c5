"""End to end: the trie engine with the fused Triton attention (interpreter on CPU) equals the naive engine."""
import dataclasses
import importlib
import os
import sys

import pytest
import torch
from conftest import DEVICE, requires_triton, tiny_model
from torch.overrides import TorchFunctionMode

import sftint_fast as sf
from sftint_fast.engine.naive import evaluate_naive
from sftint_fast.engine.plan import plan_trie as trie_plan
from sftint_fast.engine.trie import _Pass as real_pass
from sftint_fast.game import Game

pytestmark = requires_triton

HIDDEN = 32


def make_game(masking: str, seed: int = 0) -> Game:
    """n=4: a player on the first token, a two-token player, adjacent players, a three-token suffix."""
    spans = ((0, 1), (3, 5), (5, 6), (8, 10))
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 128, (13,), generator=gen)
    target = torch.randint(3, 128, (2,), generator=gen)
    return Game(input_ids=torch.cat([prompt, target[:-1]]), player_spans=spans,
                words=tuple(f"w{i}" for i in range(len(spans))), target=target,
                baseline=torch.randn(HIDDEN, generator=gen), masking=masking, prompt_length=13)


@pytest.mark.parametrize("path", ["flat", "segments"])
@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox", "granite"])
def test_trie_with_triton_attention_matches_naive(arch, masking, path, monkeypatch):
    from sftint_fast.ops.triton import subset_attention as kernel

    monkeypatch.setattr(kernel, "DEFAULT_PATH", path)
    net = tiny_model(arch, attn="sdpa", initializer_range=0.2).to(DEVICE)
    game = make_game(masking)
    with torch.no_grad():
        naive = evaluate_naive(net, game, torch.arange(16), progress=False)
    fused = sf.evaluate(net, game, method="trie", attention_backend="triton", progress=False)
    assert fused.shape == (16,) and fused.dtype == torch.float32
    assert naive.std() > 1e-2  # the variants differ, so a wrong ancestor cannot hide in the tolerance
    tol = 1e-4 * naive.abs().clamp(min=1)
    assert bool(((fused - naive).abs() <= tol).all()), (fused - naive).abs().max().item()


@pytest.mark.parametrize("masking", ["embedding", "attention"])
def test_grouped_games_through_one_launch_per_pass_match_naive(masking):
    """Several games of one layout share passes: a pass holds chunks of several levels and games (each its own
    offsets row, the last level's shifted window), all attended in one launch per layer."""
    from test_group import alone, games_of
    from test_trie import check_close

    from sftint_fast.engine.trie import evaluate_trie_games

    net = tiny_model("llama", attn="sdpa", initializer_range=0.2).to(DEVICE)
    games = games_of("spread_n5", 3, masking=masking, num_targets=2, baseline_rows=True)
    subsets = torch.tensor([31, 0, 7, 18, 5, 26, 9, 30])
    together = evaluate_trie_games(net, games, subsets, batch_size=5, progress=False, attention_backend="triton")
    for got, want in zip(together, alone(net, games, subsets)):
        check_close(got, want)
    assert not torch.allclose(together[0], together[1])


def test_one_kernel_launch_per_pass_and_layer(monkeypatch):
    """The engine launches the fused kernel once per pass and layer, however many chunks (levels, games) a pass
    holds: per-chunk launches were most of the GPU engine's host time at small levels. A pass without leaves skips
    the last layer's attention (nothing reads it; its K/V are still stored)."""
    from test_group import games_of

    from sftint_fast.engine.plan import plan_trie
    from sftint_fast.engine.trie import evaluate_trie_games
    from sftint_fast.ops.triton import subset_attention as kernel

    calls = []
    launch = kernel._launch
    monkeypatch.setattr(kernel, "_launch", lambda *a, **k: calls.append(a[4].shape[0]) or launch(*a, **k))
    net = tiny_model("llama", attn="sdpa").to(DEVICE)
    games = games_of("spread_n5", 2)
    evaluate_trie_games(net, games, batch_size=12, progress=False, attention_backend="triton")
    plan = plan_trie(games[0], batch_size=12, num_games=2, window=False)  # as the engine plans for the kernel
    chunks = sum(len(units) for units in plan.passes)
    assert chunks > len(plan.passes)  # passes really hold several chunks
    layers, n = net.config.num_hidden_layers, plan.num_players
    with_leaves = [any(u.level == n for u in units) for units in plan.passes]
    assert 0 < sum(with_leaves) < len(plan.passes)
    assert len(calls) == sum(layers if leafy else layers - 1 for leafy in with_leaves)
    nodes = [sum(len(u.nodes) for u in units) for units in plan.passes]
    # every node of every pass, once per layer (but the last layer of a pass without leaves)
    assert sum(calls) == sum(c * (layers if leafy else layers - 1) for c, leafy in zip(nodes, with_leaves))


_HOST_READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"})


class _HostReads(TorchFunctionMode):
    """Counts the package's (and transformers') reads of tensor values by the host, which on a GPU each wait for
    every queued kernel, except reads of the plan's node ids (built and kept on the CPU: no sync anywhere)."""

    def __init__(self, host_storages: set[int]) -> None:
        super().__init__()
        self.host_storages, self.sites = host_storages, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        tensor = args[0] if args else None
        if (getattr(func, "__name__", None) in _HOST_READS and isinstance(tensor, torch.Tensor)
                and tensor.untyped_storage().data_ptr() not in self.host_storages):
            frame = sys._getframe(1)
            while frame.f_code.co_filename.startswith(_TORCH_DIR):
                frame = frame.f_back
            if frame.f_code.co_filename.startswith(_CALLERS):
                self.sites.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


_TORCH_DIR = os.path.dirname(torch.__file__)
_CALLERS = (os.path.dirname(sf.__file__), os.path.dirname(importlib.import_module("transformers").__file__))


def host_reads(monkeypatch, net, games, batch_size):
    """The host reads (:class:`_HostReads`) of one trie evaluation with the fused kernel, and its plan."""
    from sftint_fast.engine import trie

    plans = []
    monkeypatch.setattr(trie, "plan_trie", lambda *a, **k: plans.append(trie_plan(*a, **k)) or plans[-1])
    host = set()
    monkeypatch.setattr(trie, "_Pass", lambda plan, *a, **k: host.update(
        u.nodes.untyped_storage().data_ptr() for units in plan.passes for u in units) or real_pass(plan, *a, **k))
    with _HostReads(host) as reads:
        trie.evaluate_trie_games(net, games, batch_size=batch_size, progress=False, attention_backend="triton")
    return reads.sites, plans[0]


def test_host_syncs_per_evaluation_grow_with_neither_layers_nor_passes(monkeypatch):
    """On a GPU a host read of a device tensor (``bool``, ``.item()``, ``.tolist()``, ...) waits for the queued
    kernels: in the layer loop it would serialise host and GPU, after a pass it leaves the GPU idle while the next
    pass is set up. The engine reads nothing per layer or pass; the leaves' NaN/inf check (per leaf chunk before)
    is read once per evaluation. Two runs suffice: one layer in one pass, and two layers in several passes (reads that
    grew with either would make the second count larger; each evaluation is ~15 s interpreted)."""
    from test_group import games_of

    games = games_of("spread_n5", 2, num_targets=2)
    counts = {}
    for layers, batch_size in ((1, None), (2, 6)):
        net = tiny_model("llama", attn="sdpa", num_hidden_layers=layers).to(DEVICE)
        sites, plan = host_reads(monkeypatch, net, games, batch_size)
        leaf_passes = sum(any(u.level == plan.num_players for u in units) for units in plan.passes)
        counts[layers, batch_size] = (len(sites), leaf_passes, len(plan.passes))
        monkeypatch.undo()
    reads = {key: value[0] for key, value in counts.items()}
    assert counts[2, 6][1] >= 2 and counts[2, 6][2] > counts[1, None][2]  # several passes, several with leaves
    assert len(set(reads.values())) == 1, counts


def test_target_reaches_the_device_once_per_evaluation(monkeypatch):
    """Each game's target goes to the model's device once, before the passes: a blocking host-to-device copy per
    leaf chunk (as the game's value did it) waits for the GPU too."""
    from test_group import games_of

    from sftint_fast.engine.trie import evaluate_trie_games

    games = games_of("spread_n5", 2)
    moved = []

    class Moves(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", None) == "to" and any(args[0] is game.target for game in games):
                moved.append(func)
            return func(*args, **(kwargs or {}))

    net = tiny_model("llama", attn="sdpa").to(DEVICE)
    with Moves():
        evaluate_trie_games(net, games, batch_size=6, progress=False, attention_backend="triton")
    assert len(moved) == len(games)


@pytest.mark.parametrize("fault", ["logits", "value"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_leaves_are_named_after_the_last_pass(monkeypatch, backend, fault):
    """The NaN/inf check of the leaves runs once, after every pass: it names every bad subset of the evaluation
    (those of several passes), as the game's own check does."""
    from test_trie import make_game

    from sftint_fast.engine.adapters.llama import LlamaLikeAdapter
    from sftint_fast.engine.trie import evaluate_trie

    net = tiny_model("llama", attn="sdpa", initializer_range=0.2).to(DEVICE)
    game = dataclasses.replace(make_game("spread_n5"), value=lambda logits: logits[:, 0, 5])
    v = evaluate_trie(net, game, batch_size=6, progress=False, attention_backend=backend)
    cutoff = v.sort().values[-4]  # the 4 largest values turn NaN: leaves of different passes
    bad = (v >= cutoff).nonzero().flatten().tolist()
    if fault == "value":
        game = dataclasses.replace(game, value=lambda logits: logits[:, 0, 5].masked_fill(logits[:, 0, 5] >= cutoff,
                                                                                       float("nan")))
        message = "value: expected finite values from the callable, received NaN/inf for subsets"
    else:
        logits = LlamaLikeAdapter.logits

        def poisoned(self, hidden):
            out = logits(self, hidden)
            return out.masked_fill(out[..., :1, 5:6] >= cutoff, float("nan"))

        monkeypatch.setattr(LlamaLikeAdapter, "logits", poisoned)
        message = "non-finite (NaN/inf) logits for subsets"
    with pytest.raises(ValueError) as error:
        evaluate_trie(net, game, batch_size=6, progress=False, attention_backend=backend)
    assert str(error.value) == f"{message} (bitmasks) {bad}"


def test_float64_models_take_the_torch_attention():
    """The fused kernels load float16/bfloat16/float32 only: ``attention_backend="auto"`` on a CUDA float64 model
    picks the torch attention (it resolved to Triton and failed in the first RMSNorm), and an explicit
    ``"triton"`` says so at the edge, naming the model's dtype."""
    from sftint_fast.engine import _resolve_backend

    cuda = torch.device("cuda")
    assert _resolve_backend("auto", cuda, dtype=torch.float32) == "triton"
    assert _resolve_backend("auto", cuda, dtype=torch.float64) == "torch"
    assert _resolve_backend("auto", torch.device("cpu"), dtype=torch.float32) == "torch"
    net = tiny_model("llama", attn="sdpa", initializer_range=0.2).to(DEVICE, torch.float64)
    game = make_game("embedding")
    with pytest.raises(ValueError, match=r"attention_backend='triton': expected a float16, bfloat16 or float32 "
                                         r"model.*received a torch.float64 model"):
        sf.evaluate(net, game, method="trie", attention_backend="triton", progress=False)
    with torch.no_grad():
        naive = evaluate_naive(net, game, torch.arange(16), progress=False)
    torch.testing.assert_close(sf.evaluate(net, game, method="trie", progress=False), naive, rtol=1e-6, atol=1e-6)


def test_bfloat16_model_through_the_fused_kernel():
    """A bfloat16 model (the usual GPU dtype) through the fused kernel stays within a few times the naive engine's
    own bfloat16 error against the float64 forward of the same weights (under the interpreter its dots were
    garbage: |dv| ~ 2.6, 100x). A few, not 2: the interpreter truncates float32 -> bfloat16 casts (the GPU rounds to
    nearest), which the fused RMSNorm, RoPE and gate do after every op (2.6x here)."""
    import copy

    net = tiny_model("llama", attn="sdpa", initializer_range=0.2).to(DEVICE, torch.bfloat16)
    game = make_game("embedding")
    with torch.no_grad():
        truth = evaluate_naive(copy.deepcopy(net).double(), game, torch.arange(16), progress=False)
        naive = evaluate_naive(net, game, torch.arange(16), progress=False)
    fused = sf.evaluate(net, game, method="trie", attention_backend="triton", progress=False)
    naive_error = (naive - truth).abs().max()
    assert 0 < (fused - truth).abs().max() <= 4 * naive_error, ((fused - truth).abs().max(), naive_error)
