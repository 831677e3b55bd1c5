"""The trie engine equals the naive engine (every variant its own HF forward) on tiny random models."""
import warnings

import pytest
import torch
from conftest import LLAMA_LIKE_ARCHS, MOE_ARCHS, tiny_model

from sftint_fast.engine.adapters import get_adapter
from sftint_fast.engine.naive import evaluate_naive
from sftint_fast.engine.trie import evaluate_trie
from sftint_fast.game import Game
from sftint_fast.ops.reference import subset_attention_reference
from sftint_fast.ops.subset_attention import subset_attention

HIDDEN = 32
#: (prompt length, player spans): a player at position 0 and one on the last prompt token, multi-token words,
#: zero-length background between players, n = 1 and n = 0.
LAYOUTS = {
    "first_and_last": (12, ((0, 1), (3, 5), (7, 8), (11, 12))),
    "adjacent_multi_token": (11, ((2, 4), (4, 7), (7, 8), (9, 10))),
    "n1": (7, ((3, 5),)),
    "n0": (6, ()),
    "spread_n5": (16, ((1, 2), (4, 6), (7, 8), (10, 12), (13, 14))),
}


def make_game(layout: str, *, masking: str = "embedding", num_targets: int = 1, seed: int = 0,
              baseline_rows: bool = False) -> Game:
    prompt_length, spans = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 128, (prompt_length,), generator=gen)
    target = torch.randint(3, 128, (num_targets,), generator=gen)
    baseline = torch.randn((len(spans), HIDDEN) if baseline_rows else (HIDDEN,), generator=gen)
    return Game(input_ids=torch.cat([prompt, target[:-1]]), player_spans=spans,
                words=tuple(f"w{i}" for i in range(len(spans))), target=target, baseline=baseline,
                masking=masking, prompt_length=prompt_length)


def model(arch: str, attn: str = "sdpa"):
    # A larger init than HF's default spreads v over the variants, so a wrong variant cannot hide in the tolerance.
    return tiny_model(arch, attn=attn, initializer_range=0.2)


from sftint_fast.engine.trie import _Pass as _real_pass  # noqa: E402


def check_close(trie: torch.Tensor, naive: torch.Tensor) -> None:
    assert trie.dtype == torch.float32 and trie.shape == naive.shape
    tol = 1e-4 * naive.abs().clamp(min=1)
    assert bool(((trie - naive).abs() <= tol).all()), (trie - naive).abs().max().item()


def run_both(net, game: Game, subsets=None, **kwargs):
    if subsets is None:
        subsets = torch.arange(1 << game.num_players)
    with torch.no_grad():
        naive = evaluate_naive(net, game, subsets, progress=False)
        trie = evaluate_trie(net, game, subsets, progress=False, **kwargs)
    return trie, naive


@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "smollm3", "phi3", "gpt2", "gpt_neox", "olmo2",
                                  "olmo3", "gemma", "granite", *MOE_ARCHS, *LLAMA_LIKE_ARCHS])
def test_trie_matches_naive(arch, attn, masking):
    net = model(arch, attn)
    if arch in ("olmo3", "ministral"):  # a sliding layer (window 4 < the 12-token prompt), then a full one
        assert [spec.sliding_window for spec in get_adapter(net).layers] == [4, None]
    if arch == "starcoder2":  # its config's window on every layer, as Mistral's
        assert [spec.sliding_window for spec in get_adapter(net).layers] == [4, 4]
    trie, naive = run_both(net, make_game("first_and_last", masking=masking), batch_size=3)
    check_close(trie, naive)
    assert naive.std() > 1e-2  # the variants really differ


@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_trie_layouts(arch, layout, masking):
    trie, naive = run_both(model(arch), make_game(layout, masking=masking, seed=1))
    check_close(trie, naive)


@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "smollm3", "phi3", "gpt2", "gpt_neox", "olmo2",
                                  "olmo3", "gemma", "granite", *MOE_ARCHS])
def test_multi_token_target_and_baseline_rows(arch, masking):
    game = make_game("adjacent_multi_token", masking=masking, num_targets=3, seed=2, baseline_rows=True)
    trie, naive = run_both(model(arch), game, batch_size=5)
    check_close(trie, naive)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "olmo2"])
def test_last_layer_runs_only_the_scored_leaf_rows(arch, monkeypatch):
    """After the last attention only the leaves' scored tokens go on (output projection, MLP): the inner nodes and
    the unscored leaf tokens gave all they had (their K/V). Every other layer runs every token of every pass."""
    from sftint_fast.engine.plan import plan_trie

    net = model(arch)
    game = make_game("adjacent_multi_token", num_targets=3, seed=4)
    blocks = {"llama": lambda: net.model.layers, "gpt2": lambda: net.transformer.h,
              "gpt_neox": lambda: net.gpt_neox.layers, "olmo2": lambda: net.model.layers}[arch]()
    rows = {0: [], len(blocks) - 1: []}
    naive = evaluate_naive(net, game, torch.arange(1 << game.num_players), progress=False)
    # the MLP's last projection: called with the MLP's rows whether the MLP runs as its module or as fused ops
    mlps = {i: blocks[i].mlp.down_proj if arch in ("llama", "olmo2") else blocks[i].mlp for i in rows}
    # counted in the forward of a subclass of the module's (not a forward hook or a forward set on the instance: a
    # model with either has no trie, tests/test_hooks.py; a module the trie calls may be of another class)
    for i, mlp in mlps.items():
        base = type(mlp)
        forward = (lambda self, x, i=i, base=base: rows[i].append(x.shape[0]) or base.forward(self, x))
        monkeypatch.setattr(mlp, "__class__", type(f"Counting{base.__name__}", (base,), {"forward": forward}))
    trie = evaluate_trie(net, game, batch_size=5, progress=False)
    check_close(trie, naive)
    plan = plan_trie(game, batch_size=5)
    n, seg = plan.num_players, plan.level_lens
    assert rows[0] == [sum(len(u.nodes) * seg[u.level] for u in units) for units in plan.passes]
    leafy = [sum(len(u.nodes) for u in units if u.level == n) for units in plan.passes]
    assert 0 in leafy  # a pass of inner nodes only: its last layer stops after storing K/V
    assert rows[len(blocks) - 1] == [3 * leaves for leaves in leafy if leaves]


@pytest.mark.parametrize("batch_size", [1, 2, 7])
def test_chunking_forced_small(batch_size):
    trie, naive = run_both(model("llama"), make_game("spread_n5", seed=3), batch_size=batch_size)
    check_close(trie, naive)


@pytest.mark.parametrize("tokens", [6, 40])
def test_engine_plans_the_device_pass_tokens(tokens, monkeypatch):
    """The engine sizes its passes by ``plan.PASS_TOKENS`` of the model's device (larger on CUDA), exactly."""
    from sftint_fast.engine import plan as planner
    from sftint_fast.engine import trie as engine

    monkeypatch.setitem(planner.PASS_TOKENS, "cpu", tokens)
    passes = []
    monkeypatch.setattr(engine, "_Pass", lambda *a, **k: passes.append(a[1]) or _real_pass(*a, **k))
    game = make_game("spread_n5", seed=3)
    trie, naive = run_both(model("llama"), game)
    check_close(trie, naive)
    def units(schedule):
        return [[(u.level, u.nodes.tolist(), u.game) for u in pass_] for pass_ in schedule]

    plan = planner.plan_trie(game, pass_tokens=tokens)
    assert units(passes) == units(plan.passes) and len(passes) > 1
    assert units(plan.passes) != units(planner.plan_trie(game, pass_tokens=10 * tokens).passes)


def test_tiny_memory_budget_chunks_and_still_matches():
    from sftint_fast.engine.plan import plan_trie

    net = model("qwen2")
    game = make_game("spread_n5", seed=4)
    plan = plan_trie(game, dims=get_adapter(net).dims, max_memory=100_000)
    assert plan.level_chunk_nodes[-1] < plan.node_counts[-1] and plan.peak_bytes <= 100_000
    trie, naive = run_both(net, game, max_memory=100_000)
    check_close(trie, naive)
    with pytest.raises(ValueError, match="GiB"):
        evaluate_trie(net, game, torch.arange(32), max_memory=10_000, progress=False)


@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_random_subset_list(arch, masking):
    game = make_game("spread_n5", masking=masking, seed=5)
    subsets = torch.randint(0, 32, (11,), generator=torch.Generator().manual_seed(0))  # repeats, any order
    trie, naive = run_both(model(arch), game, subsets=subsets, batch_size=2)
    check_close(trie, naive)
    full, _ = run_both(model(arch), game)
    check_close(trie, full[subsets])


def _sliding_model(kind: str, attn: str):
    from transformers import (AutoModelForCausalLM, Gemma3TextConfig, MistralConfig, Olmo3Config, Phi3Config,
                              Qwen3Config, SmolLM3Config)

    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, initializer_range=0.2)
    if kind == "gemma3":
        cfg = Gemma3TextConfig(num_hidden_layers=3, head_dim=8, sliding_window=4, query_pre_attn_scalar=16,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                               final_logit_softcapping=5.0, bos_token_id=2, eos_token_id=1, **common)
    elif kind == "mistral-layer-types":  # Mistral's forward ignores layer_types: its window applies to every layer
        cfg = MistralConfig(num_hidden_layers=2, sliding_window=5, bos_token_id=1, eos_token_id=2,
                            layer_types=["sliding_attention", "full_attention"], **common)
    elif kind == "qwen3":  # layers from max_window_layers on slide (q/k norms before RoPE)
        cfg = Qwen3Config(num_hidden_layers=3, head_dim=8, use_sliding_window=True, sliding_window=4,
                          max_window_layers=1, bos_token_id=1, eos_token_id=2, **common)
    elif kind == "smollm3":  # the NoPE layers (no_rope_layers 0) slide, the RoPE ones attend to the whole prompt
        cfg = SmolLM3Config(num_hidden_layers=3, no_rope_layers=[1, 0, 1], use_sliding_window=True, sliding_window=4,
                            bos_token_id=1, eos_token_id=2, **common)
    elif kind == "phi3":  # Phi-3's forward slides every layer's window (config.sliding_window); partial RoPE
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
        cfg = Phi3Config(num_hidden_layers=2, sliding_window=4, rope_parameters=rope, bos_token_id=1, eos_token_id=2,
                         **common)
    elif kind == "olmo3":  # post-norm, whole-projection q/k norms, one RoPE table per layer type
        cfg = Olmo3Config(num_hidden_layers=3, sliding_window=4, bos_token_id=1, eos_token_id=2,
                          layer_types=["full_attention", "sliding_attention", "sliding_attention"], **common)
    else:
        cfg = MistralConfig(num_hidden_layers=2, sliding_window=5, bos_token_id=1, eos_token_id=2, **common)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["gemma3", "mistral", "mistral-layer-types", "qwen3", "smollm3", "phi3",
                                  "olmo3"])
def test_sliding_window_models(kind, attn):
    net = _sliding_model(kind, attn)
    adapter = get_adapter(net)
    assert adapter is not None
    if kind in ("qwen3", "smollm3", "olmo3"):  # full and sliding layers mixed
        assert [spec.sliding_window for spec in adapter.layers] == [None, 4, None if kind == "smollm3" else 4]
    if kind == "phi3":
        assert [spec.sliding_window for spec in adapter.layers] == [4, 4]
    trie, naive = run_both(net, make_game("first_and_last", seed=6), batch_size=3)
    check_close(trie, naive)
    # Attention masking: with every player present the trie must equal the model's own forward (sliding window
    # included).
    game = make_game("first_and_last", masking="attention", seed=6)
    full = torch.tensor([(1 << game.num_players) - 1])
    with torch.no_grad():
        own = game.values_from_logits(net(input_ids=game.input_ids[None]).logits[:, -1:])
        trie_full = evaluate_trie(net, game, full, progress=False)
    check_close(trie_full, own)
    # ... and every variant equals the naive engine, whose attention masks keep the window per layer type.
    assert game.input_ids.numel() > net.config.sliding_window
    trie_all, naive_all = run_both(net, game, batch_size=3)
    check_close(trie_all, naive_all)


#: Gemma-2 configurations: the tiny model's soft-caps (attention 1.0, final 5.0), and none (``None`` for both)
GEMMA2_CONFIGS = {"softcaps": {}, "no-softcaps": {"attn_logit_softcapping": None, "final_logit_softcapping": None}}


# eager: the reference; flex attention: Gemma-2's default in transformers 5.25 (on the CPU, torch 2.13's flex attention
# under the naive engine's attention-masking masks corrupts the heap and aborts the process: not run; with embedding
# masking its cold torch.compile takes ~100 s on 2 cores: --run-slow)
@pytest.mark.parametrize("attn,masking", [("eager", "embedding"), ("eager", "attention"),
                                          pytest.param("flex_attention", "embedding", marks=pytest.mark.slow)])
@pytest.mark.parametrize("config", sorted(GEMMA2_CONFIGS))
def test_gemma2_matches_naive(config, attn, masking):
    """Gemma-2: the embedding module's sqrt(H) scale, ``query_pre_attn_scalar``, the attention logit soft-cap
    ``tanh(s / c) * c`` after scaling and before the mask, sliding and full layers alternating (the window shorter
    than the prompt), sandwich (1 + w) RMSNorms, the GELU-tanh MLP and the final logit soft-cap: the trie equals the
    naive engine (the model's own forward per variant), and equals the model on the full prompt."""
    import dataclasses

    from conftest import tiny_gemma2

    from sftint_fast.engine.trie import evaluate_trie_games

    net = tiny_gemma2(attn=attn, **GEMMA2_CONFIGS[config])
    adapter = get_adapter(net)
    assert adapter is not None
    capped = config == "softcaps"
    assert [spec.softcap for spec in adapter.layers] == [1.0 if capped else None] * 3
    assert [spec.sliding_window for spec in adapter.layers] == [4, None, 4]
    assert [spec.scale for spec in adapter.layers] == [16 ** -0.5] * 3
    game = make_game("first_and_last", masking=masking, seed=6)
    assert game.input_ids.numel() > net.config.sliding_window
    trie, naive = run_both(net, game, batch_size=3)
    check_close(trie, naive)
    assert naive.std() > 1e-2
    full = torch.tensor([(1 << game.num_players) - 1])
    with torch.no_grad():
        own = game.values_from_logits(net(input_ids=game.input_ids[None]).logits[:, -1:])
        check_close(evaluate_trie(net, game, full, progress=False), own)
    if capped:  # each soft-cap moves the values beyond the tolerance: dropping either would fail the checks above
        for drop in ("attention", "final"):
            uncapped = get_adapter(net)
            if drop == "attention":
                uncapped.layers = tuple(dataclasses.replace(spec, softcap=None) for spec in uncapped.layers)
            else:
                uncapped._final_softcap = None
            wrong = evaluate_trie_games(net, [game], progress=False, adapter=uncapped)[0]
            assert ((wrong - naive).abs() > 1e-4 * naive.abs().clamp(min=1)).any(), drop


def _moved(wrong: torch.Tensor, right: torch.Tensor) -> bool:
    """Whether ``wrong`` leaves :func:`check_close`'s tolerance of ``right`` somewhere."""
    return bool(((wrong - right).abs() > 1e-4 * right.abs().clamp(min=1)).any())


@pytest.mark.parametrize("masking", ["embedding", "attention"])
def test_granite_multipliers_are_carried(masking):
    """Granite's four multipliers (embedding 4, attention 0.5, residual 0.5, logits / 2): the trie equals the naive
    engine and the model's own forward, and without any one of them (as 1, the attention's as head_dim ** -0.5, a
    Llama's) it would not: each moves the values beyond the tolerance, so the checks above catch a dropped one."""
    import dataclasses

    from sftint_fast.engine.adapters.granite import GraniteAdapter
    from sftint_fast.engine.trie import evaluate_trie_games

    net = model("granite")
    adapter = get_adapter(net)
    assert isinstance(adapter, GraniteAdapter)
    assert [spec.scale for spec in adapter.layers] == [0.5, 0.5]
    game = make_game("first_and_last", masking=masking, num_targets=2, seed=4, baseline_rows=True)
    trie, naive = run_both(net, game, batch_size=3)
    check_close(trie, naive)
    assert naive.std() > 1e-2
    with torch.no_grad():
        own = game.values_from_logits(net(input_ids=game.input_ids[None]).logits[:, -2:])
    check_close(trie[-1:], own)
    for drop in ("embedding", "attention", "residual", "logits"):
        wrong = get_adapter(net)
        if drop == "embedding":
            wrong._embedding_multiplier = 1.0
        elif drop == "attention":
            wrong.layers = tuple(dataclasses.replace(spec, scale=8 ** -0.5) for spec in wrong.layers)
        elif drop == "residual":
            wrong._residual_multipliers = (1.0,) * len(wrong._residual_multipliers)
        else:
            wrong._logits_scaling = 1.0
        with torch.no_grad():
            values = evaluate_trie_games(net, [game], progress=False, adapter=wrong)[0]
        assert _moved(values, naive), drop


def test_granite_multipliers_are_read_from_the_model():
    """Each multiplier comes from where the model's forward reads it: a changed config value moves both engines."""
    net = model("granite")
    net.model.embedding_multiplier = 3.0
    for block in net.model.layers:
        block.residual_multiplier = 0.7
    net.config.logits_scaling = 2.5
    adapter = get_adapter(net)
    assert adapter._embedding_multiplier == 3.0 and adapter._residual_multipliers == (0.7, 0.7)
    assert adapter._logits_scaling == 2.5
    trie, naive = run_both(net, make_game("first_and_last", seed=5), batch_size=3)
    check_close(trie, naive)


@pytest.mark.parametrize("masking", ["embedding", "attention"])
def test_gemma_embedding_scale_is_carried(masking):
    """Gemma (v1): transformers 5.x scales the embedding by sqrt(hidden) in the embedding module
    (``GemmaTextScaledWordEmbedding``, the scale rounded to the weights' dtype), not in the model's forward: the
    adapter's embed is that module's output, the rows a game's baseline replaces, and the trie equals the naive
    engine. Without the scale (the plain lookup) the values would move beyond the tolerance."""
    from sftint_fast.engine.trie import evaluate_trie_games

    net = model("gemma")
    adapter = get_adapter(net)
    assert adapter is not None and not adapter._mlp_fusable  # GELU-tanh: the fused SiLU gate must not stand in
    ids = make_game("n1").input_ids
    plain = torch.nn.functional.embedding(ids, net.model.embed_tokens.weight)
    with torch.no_grad():
        assert torch.equal(adapter.embed(ids), plain * torch.tensor(HIDDEN ** 0.5))
    game = make_game("first_and_last", masking=masking, seed=3)
    trie, naive = run_both(net, game, batch_size=3)
    check_close(trie, naive)
    assert naive.std() > 1e-2
    unscaled = get_adapter(net)
    unscaled.embed = lambda input_ids: torch.nn.functional.embedding(input_ids, net.model.embed_tokens.weight)
    with torch.no_grad():
        assert _moved(evaluate_trie_games(net, [game], progress=False, adapter=unscaled)[0], naive)


def test_gemma_embedding_scale_rounds_to_the_model_dtype():
    """In bfloat16 the scale is rounded first (sqrt(32) = 5.657 -> 5.656), as the model's forward rounds it: the
    adapter's embed is the module's output itself, and the trie equals the naive engine on a bfloat16 Gemma."""
    assert torch.tensor(HIDDEN ** 0.5).to(torch.bfloat16).item() != HIDDEN ** 0.5
    net = model("gemma").to(torch.bfloat16)
    adapter = get_adapter(net)
    ids = make_game("first_and_last").input_ids
    with torch.no_grad():
        assert torch.equal(adapter.embed(ids), net.get_input_embeddings()(ids))
        rounded = net.model.embed_tokens.weight[ids] * torch.tensor(HIDDEN ** 0.5).to(torch.bfloat16)
        assert torch.equal(adapter.embed(ids), rounded)


def test_unsupported_model_has_no_adapter():
    from transformers import AutoModelForCausalLM, OPTConfig

    cfg = OPTConfig(vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                    word_embed_proj_dim=HIDDEN, max_position_embeddings=64)
    net = AutoModelForCausalLM.from_config(cfg).eval()
    assert get_adapter(net) is None
    with pytest.raises(ValueError, match="naive"):
        evaluate_trie(net, make_game("n1"), torch.arange(2), progress=False)


def _random_store_case(seed: int, *, level: int, seg_lens: list[int], heads: int, kv_heads: int, dim: int):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(seg_lens[:level + 1])
    players = torch.tensor([0] + [min(2, n) for n in seg_lens[1:level + 1]])
    positions = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64), lens[:-1]]), 0)
    counts = torch.tensor([1 << k for k in range(level + 1)])
    offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64), (counts * lens)[:-1]]), 0)
    total = int((counts * lens).sum())
    k_store = torch.randn(total, kv_heads, dim, generator=gen)
    v_store = torch.randn(total, kv_heads, dim, generator=gen)
    nodes = torch.randperm(1 << level, generator=gen)[:3].sort().values
    q = torch.randn(len(nodes), int(lens[level]), heads, dim, generator=gen)
    return q, k_store, v_store, nodes, offsets, lens, players, positions


@pytest.mark.parametrize("options", [{}, {"attention_masking": True}, {"sliding_window": 3},
                                     {"softcap": 2.0, "attention_masking": True}])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
def test_torch_subset_attention_matches_reference(heads, kv_heads, options):
    case = _random_store_case(7, level=3, seg_lens=[2, 3, 1, 4], heads=heads, kv_heads=kv_heads, dim=8)
    got = subset_attention(*case, level=3, scale=0.3, **options)
    want = subset_attention_reference(*case, level=3, scale=0.3, **options)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_subset_attention_rejects_bad_inputs():
    case = _random_store_case(8, level=2, seg_lens=[2, 3, 2], heads=4, kv_heads=2, dim=8)
    with pytest.raises(ValueError, match="backend"):
        subset_attention(*case, level=2, scale=1.0, backend="cuda")
    with pytest.raises(ValueError, match="level_offsets"):
        subset_attention(*case, level=1, scale=1.0)
    q, k_store, v_store, nodes, offsets, lens, players, positions = case
    with pytest.raises(ValueError, match=r"q must be \[len\(node_ids\), level_lens\[level\], Hq, D\] = \[\d+, 2"):
        subset_attention(q[:, :1], k_store, v_store, nodes, offsets, lens, players, positions, level=2, scale=1.0)
    with pytest.raises(ValueError, match="len\\(node_ids\\)"):
        subset_attention(q, k_store, v_store, nodes[:-1], offsets, lens, players, positions, level=2, scale=1.0)
    with pytest.raises(ValueError, match="Hq must be a multiple of Hkv"):  # was ZeroDivisionError
        subset_attention(q, k_store[:, :0], v_store[:, :0], nodes, offsets, lens, players, positions, level=2,
                         scale=1.0)
    for option, message in (({"sliding_window": 0}, "sliding_window"), ({"softcap": 0.0}, "softcap"),
                            ({"scale": 0.0}, "scale")):  # as the fused kernel: a window of 0 gave NaN rows
        with pytest.raises(ValueError, match=message):
            subset_attention(*case, level=2, **{"scale": 1.0, **option})


def test_subset_attention_with_a_prebuilt_key_layout():
    from sftint_fast.ops.subset_attention import key_layout

    for masking in (False, True):
        case = _random_store_case(9, level=3, seg_lens=[2, 3, 1, 4], heads=4, kv_heads=2, dim=8)
        q, k_store, v_store, nodes, *tables = case
        layout = key_layout(nodes, *tables, level=3, attention_masking=masking)
        got = subset_attention(*case, level=3, scale=0.3, attention_masking=masking, layout=layout)
        want = subset_attention_reference(*case, level=3, scale=0.3, attention_masking=masking)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="layout: expected the key layout"):
            subset_attention(*case, level=3, scale=0.3, attention_masking=not masking, layout=layout)
        with pytest.raises(ValueError, match="only the torch backend"):
            subset_attention(*case, level=3, scale=0.3, attention_masking=masking, layout=layout, backend="triton")


@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("max_memory", [None, 40_000])
def test_sampled_subsets_in_a_compact_store_match_naive(max_memory, masking):
    """Sampled subsets: the store holds only the nodes they reach (addressed by rank, the attention finds each
    ancestor through the path index), smaller than the dense store, and the values match naive (also with a budget
    that shrinks the chunks)."""
    from sftint_fast.bench import sample_subsets
    from sftint_fast.engine.plan import plan_trie

    net = model("llama")
    game = make_game("spread_n5", seed=6, masking=masking)
    subsets = sample_subsets(5, 9, seed=1)
    dims = get_adapter(net).dims
    plan = plan_trie(game, subsets=subsets, dims=dims, max_memory=max_memory or (1 << 30), batch_size=4)
    dense = plan_trie(game, dims=dims, max_memory=1 << 30, batch_size=4)
    assert plan.compact and plan.window_start < dense.window_start
    assert any(len(nodes) < 1 << j for j, nodes in enumerate(plan.level_nodes[:-1]))  # some prefix left out
    if max_memory:
        assert plan.level_chunk_nodes[-1] < 4 and plan.peak_bytes <= max_memory
    trie, naive = run_both(net, game, subsets=subsets, batch_size=4, max_memory=max_memory)
    check_close(trie, naive)


@pytest.mark.parametrize("method", ["trie", "naive"])
def test_token_ids_outside_the_vocabulary_are_refused(method):
    import dataclasses

    import sftint_fast as sf

    game = make_game("spread_n5")
    ids = game.input_ids.clone()
    ids[[3, 9]] = torch.tensor([128, 4000])  # the tiny models have 128 ids
    bad = dataclasses.replace(game, input_ids=ids)
    with pytest.raises(ValueError, match=r"games\[0\]\.input_ids: expected token ids in \[0, 128\) \(the model's "
                                         r"vocabulary\), received \[128, 4000\] at positions \[3, 9\]"):
        sf.evaluate(model("llama"), bad, method=method, progress=False)
    target = dataclasses.replace(game, target=torch.tensor([200]))
    with pytest.raises(ValueError, match=r"games\[1\]\.target: expected token ids in \[0, 128\)"):
        sf.evaluate_games(model("gpt2"), [game, target], method=method, progress=False)


@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("rope", ["dynamic", "longrope"])
def test_sequence_length_dependent_rope(rope, masking):
    """Dynamic / longrope RoPE picks its frequencies from the largest position the rotary module sees: a pass of
    early levels only must still use the full sequence's tables (the model's forward on the whole prompt)."""
    params = {"rope_type": rope, "rope_theta": 10000.0}
    if rope == "dynamic":
        params["factor"] = 2.0
    else:
        params.update(short_factor=[1.0, 1.1, 1.2, 1.3], long_factor=[2.0, 3.0, 5.0, 8.0],
                      original_max_position_embeddings=8)
    net = tiny_model("llama", attn="sdpa", initializer_range=0.2, rope_parameters=params,
                     max_position_embeddings=8 if rope == "dynamic" else 16)
    game = make_game("spread_n5", masking=masking, seed=7)
    assert game.input_ids.numel() > 8  # past the original length: the scaled frequencies apply
    trie, naive = run_both(net, game, batch_size=2)
    check_close(trie, naive)


#: Llama-like configs the other tests do not reach: static RoPE scalings (the rotary module's own tables), tied
#: embeddings, biased projections with head_dim != hidden / heads, Qwen2 with full and sliding layers mixed (window 3,
#: shorter than the prompt), a window of one token (every query sees only itself), Qwen3 with biased projections (its
#: output projection's too) and q/k norms over 16-wide heads, SmolLM3 with NoPE on the first layer and biases.
#: Phi-3 (fused qkv and gate_up projections) with RoPE over the whole head, partial RoPE (6 of 8 dims) under a window
#: of 3, longrope past its original length of 8 on 6 of 8 dims, and a GELU gate over 16-wide heads.
#: OLMo-2 with biases, tied embeddings, YaRN and heads of 16 (q/k norms 64 wide, not the hidden size), with dynamic
#: RoPE past its 8 positions, and OLMo-3 with a one-token window on its second layer. GLM with its interleaved RoPE
#: over the whole head (where the fused RoPE ops, which rotate its halves, would otherwise take it).
CONFIGS = {
    "rope-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0}}),
    "rope-llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8,
                                                  "rope_theta": 10000.0}}),
    "rope-yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 8}}),
    "tied": ("llama", {"tie_word_embeddings": True}),
    "bias-head-dim": ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 16}),
    "qwen2-mixed-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
    "mistral-window-1": ("mistral", {"sliding_window": 1}),
    "qwen3-bias-head-dim": ("qwen3", {"attention_bias": True, "head_dim": 16}),
    "smollm3-nope-first-biases": ("smollm3", {"no_rope_layers": [0, 1], "attention_bias": True, "mlp_bias": True}),
    "phi3-full-rotary": ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "phi3-partial-rotary-window-3": ("phi3", {"sliding_window": 3, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}}),
    "phi3-longrope-partial": ("phi3", {"original_max_position_embeddings": 8, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75, "short_factor": [1.0, 1.1, 1.2],
        "long_factor": [2.0, 3.0, 5.0], "original_max_position_embeddings": 8}}),
    "phi3-gelu-head-dim-16": ("phi3", {"hidden_act": "gelu_new", "head_dim": 16}),
    "olmo2-bias-tied-rope-yarn": ("olmo2", {"attention_bias": True, "tie_word_embeddings": True, "head_dim": 16,
                                            "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                "rope_theta": 10000.0,
                                                                "original_max_position_embeddings": 8}}),
    "olmo2-rope-dynamic": ("olmo2", {"max_position_embeddings": 8, "rope_parameters": {
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
    "olmo3-bias-window-1": ("olmo3", {"attention_bias": True, "sliding_window": 1,
                                      "layer_types": ["full_attention", "sliding_attention"]}),
    "gemma-bias-rope-linear-untied": ("gemma", {"attention_bias": True, "tie_word_embeddings": False, "head_dim": 16,
                                                "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 10000.0}}),
    "granite-biases-tied-multipliers": ("granite", {"attention_bias": True, "mlp_bias": True,
                                                    "tie_word_embeddings": True, "embedding_multiplier": 12.0,
                                                    "attention_multiplier": 0.1, "residual_multiplier": 0.22,
                                                    "logits_scaling": 8.0}),
    "glm-full-rotary": ("glm", {"head_dim": 8, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                   "partial_rotary_factor": 1.0}}),
}


@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_llama_like_configs_match_naive_and_the_models_forward(name, masking):
    from transformers import (AutoModelForCausalLM, GemmaConfig, GlmConfig, GraniteConfig, LlamaConfig,
                              MistralConfig, Olmo2Config, Olmo3Config, Phi3Config, Qwen2Config, Qwen3Config,
                              SmolLM3Config)

    arch, options = CONFIGS[name]
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config,
                  "smollm3": SmolLM3Config, "phi3": Phi3Config, "olmo2": Olmo2Config, "olmo3": Olmo3Config,
                  "gemma": GemmaConfig, "granite": GraniteConfig, "glm": GlmConfig}[arch]
    torch.manual_seed(0)
    options = {"max_position_embeddings": 32, **options}
    cfg = config_cls(vocab_size=128, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, initializer_range=0.2, **options)
    net = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    assert get_adapter(net) is not None
    game = make_game("first_and_last", masking=masking, num_targets=2, seed=9, baseline_rows=True)
    trie, naive = run_both(net, game, batch_size=3)
    check_close(trie, naive)
    with torch.no_grad():  # every player present: the model's own forward on the ids
        own = game.values_from_logits(net(input_ids=game.input_ids[None]).logits[:, -2:])
    check_close(trie[-1:], own)


#: Mixture-of-Experts configs the other tests do not reach (tiny_moe_config's 3 layers of 4 experts, top-2, unless
#: said): transformers' eager loop over the experts (the default elsewhere is grouped_mm) with renormalised top-k
#: weights (norm_topk_prob) and Qwen3-MoE's dense middle layer; Qwen3-MoE with top-1 under a window of 3 on every
#: layer; Mixtral eager under a window of 3, and batched_mm; OLMoE with clip_qkv 0.5 (it binds at this init),
#: biased projections and renormalised weights; Qwen2-MoE (shared expert) with a dense first layer (mlp_only_layers),
#: two sparse ones and a window of 3 on the first (layer_types).
MOE_CONFIGS = {
    "qwen3_moe-eager-norm-topk": ("qwen3_moe", "eager", {"norm_topk_prob": True}),
    "qwen3_moe-top1-window-3": ("qwen3_moe", "grouped_mm", {"num_experts_per_tok": 1, "use_sliding_window": True,
                                                           "sliding_window": 3}),
    "mixtral-eager-window-3": ("mixtral", "eager", {"sliding_window": 3}),
    "mixtral-batched-mm": ("mixtral", "batched_mm", {}),
    "olmoe-clip-bias-norm-topk": ("olmoe", "eager", {"clip_qkv": 0.5, "attention_bias": True,
                                                     "norm_topk_prob": True}),
    "qwen2_moe-dense-first-window-3": ("qwen2_moe", "eager", {"decoder_sparse_step": 1, "mlp_only_layers": [0],
                                                              "use_sliding_window": True, "sliding_window": 3,
                                                              "max_window_layers": 1}),
}


@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("name", sorted(MOE_CONFIGS))
def test_moe_configs_match_naive_and_the_models_forward(name, masking):
    from conftest import tiny_moe_config
    from transformers import AutoModelForCausalLM

    arch, experts, options = MOE_CONFIGS[name]
    torch.manual_seed(0)
    cfg = tiny_moe_config(arch, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          initializer_range=0.2, max_position_embeddings=32, **options)
    net = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", experts_implementation=experts).eval()
    assert net.config._experts_implementation == experts
    adapter = get_adapter(net)
    assert adapter is not None
    sparse = [hasattr(block.mlp, "experts") for block in net.model.layers]
    assert sparse == {"qwen3_moe": [True, False, True], "qwen2_moe": [False, True, True]}.get(arch, [True] * 3)
    game = make_game("first_and_last", masking=masking, num_targets=2, seed=9, baseline_rows=True)
    trie, naive = run_both(net, game, batch_size=3)
    check_close(trie, naive)
    assert naive.std() > 1e-2
    with torch.no_grad():  # every player present: the model's own forward on the ids
        own = game.values_from_logits(net(input_ids=game.input_ids[None]).logits[:, -2:])
    check_close(trie[-1:], own)


@pytest.mark.parametrize("method", ["trie", "naive"])
def test_mixtral_router_jitter_is_off_in_a_model_left_in_training_mode(method):
    """Mixtral's sparse block multiplies its input by uniform noise (router_jitter_noise) in training mode, which would
    route each evaluation differently: the engines evaluate in eval mode, where it is off."""
    import sftint_fast as sf

    net = model("mixtral")
    game = make_game("first_and_last", seed=3)
    with torch.no_grad():
        reference = sf.evaluate(net, game, method=method, progress=False)
    net.config.router_jitter_noise = 0.5
    for layer in net.model.layers:
        layer.mlp.jitter_noise = 0.5
    net.train()
    with torch.no_grad():
        values = sf.evaluate(net, game, method=method, progress=False)
    assert net.training
    check_close(values, reference)



@pytest.mark.parametrize("experts", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_router_ties_pick_the_same_experts_in_the_trie_and_naive(arch, experts):
    """Three identical router rows, two picked per token: a tie at the second place, which torch.topk breaks by
    index. The scores are bitwise equal whatever the batch, so the trie's flat batches pick what the naive engine's
    padded ones do (a near-tie within rounding may not: documented in the adapter's module)."""
    from conftest import tiny_moe_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_moe_config(arch, vocab_size=128, pad_token_id=0, initializer_range=0.2, max_position_embeddings=32)
    net = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", experts_implementation=experts).eval()
    with torch.no_grad():
        for block in net.model.layers:
            if hasattr(block.mlp, "experts"):
                block.mlp.gate.weight[1:3] = block.mlp.gate.weight[0]
    game = make_game("spread_n5", seed=4)
    trie, naive = run_both(net, game)
    check_close(trie, naive)
    with torch.no_grad():  # one node / one variant per forward: other batch shapes, the same picks
        naive_one = evaluate_naive(net, game, torch.arange(32), progress=False, batch_size=1)
        trie_one = evaluate_trie(net, game, torch.arange(32), progress=False, batch_size=1)
    check_close(trie_one, naive_one)
    check_close(naive_one, naive)

#: GPT-NeoX (Pythia) configs: parallel and sequential residual, RoPE on a quarter, half or all of each head (16 wide:
#: 2 heads), attention projections with and without biases, tied embeddings, and dynamic RoPE over a partial rotary
#: table (its frequencies depend on the sequence length: max_position_embeddings 8 is shorter than the prompt).
GPT_NEOX_CONFIGS = {
    "parallel-bias-rotary-quarter": {"use_parallel_residual": True, "attention_bias": True, "rotary_pct": 0.25},
    "sequential-bias-rotary-quarter": {"use_parallel_residual": False, "attention_bias": True, "rotary_pct": 0.25},
    "parallel-no-bias-rotary-half": {"use_parallel_residual": True, "attention_bias": False, "rotary_pct": 0.5},
    "sequential-no-bias-rotary-full": {"use_parallel_residual": False, "attention_bias": False, "rotary_pct": 1.0},
    "sequential-tied-rotary-half": {"use_parallel_residual": False, "rotary_pct": 0.5, "tie_word_embeddings": True},
    "parallel-rope-dynamic-quarter": {"rotary_pct": 0.25, "max_position_embeddings": 8,
                                      "rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                          "rope_theta": 10000.0}},
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("name", sorted(GPT_NEOX_CONFIGS))
def test_gpt_neox_configs_match_naive_and_the_models_forward(name, masking, attn):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    options = {"max_position_embeddings": 32, **GPT_NEOX_CONFIGS[name]}
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2,
                        **options)
    net = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    attention = net.gpt_neox.layers[1].attention
    # the options reached the modules the model's forward reads
    assert attention.rotary_ndims == int(16 * options["rotary_pct"])
    assert net.gpt_neox.layers[1].use_parallel_residual == options.get("use_parallel_residual", True)
    assert (attention.query_key_value.bias is not None) == options.get("attention_bias", True)
    adapter = get_adapter(net)
    assert adapter is not None and adapter.dims.head_dim == 16 and adapter.layers[0].scale == 16 ** -0.5
    game = make_game("first_and_last", masking=masking, num_targets=2, seed=9, baseline_rows=True)
    assert game.input_ids.numel() > cfg.max_position_embeddings or "rope_parameters" not in options
    trie, naive = run_both(net, game, batch_size=3)
    check_close(trie, naive)
    assert naive.std() > 1e-2
    with torch.no_grad():  # every player present: the model's own forward on the ids
        own = game.values_from_logits(net(input_ids=game.input_ids[None]).logits[:, -2:])
    check_close(trie[-1:], own)


@pytest.mark.parametrize("method", ["trie", "naive"])
def test_phi3_residual_dropouts_are_off_in_a_model_left_in_training_mode(method):
    """Phi-3's decoder layers drop out the attention and MLP outputs (``resid_pdrop``), which the trie's layer loop
    does not run: exact because the engines evaluate in eval mode, where the dropouts are identities."""
    import sftint_fast as sf

    net = model("phi3")
    game = make_game("first_and_last", seed=3)
    with torch.no_grad():
        reference = sf.evaluate(net, game, method=method, progress=False)
    for layer in net.model.layers:
        layer.resid_attn_dropout.p = layer.resid_mlp_dropout.p = 0.5
    net.train()
    with torch.no_grad():
        values = sf.evaluate(net, game, method=method, progress=False)
    assert net.training  # the model's mode is its own again
    check_close(values, reference)


def _many_players_game(n: int) -> Game:
    return Game(input_ids=torch.arange(4, 4 + n), player_spans=tuple((i, i + 1) for i in range(n)),
                words=("w",) * n, target=torch.tensor([5]), baseline=torch.zeros(HIDDEN), prompt_length=n)


def test_evaluate_many_refuses_too_many_players_with_the_memory_needed():
    """Grouping plans the trie before evaluating: with n=40 it must refuse, saying how much memory it needs and
    what is available, before building the 2^40 node ids of the plan."""
    import sftint_fast as sf

    with pytest.raises(ValueError, match=r"n=40.*needs? at least \d+\.\d+ GiB \(\d+ bytes\).*1\.0+ GiB \(1073741824 bytes\)"):
        sf.evaluate_many(model("llama"), [_many_players_game(40)], method="trie", max_memory=1 << 30,
                         progress=False)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_evaluate_many_takes_the_subsets_evaluate_takes(dtype):
    import sftint_fast as sf

    net = model("llama")
    games = [make_game("spread_n5", seed=s) for s in range(2)]
    subsets = torch.tensor([7, 0, 31, 7, 2], dtype=dtype)
    many = sf.evaluate_many(net, games, method="trie", subsets=subsets, progress=False)
    for game, v in zip(games, many):
        naive = evaluate_naive(net, game, subsets.long(), progress=False)
        check_close(v, naive)
    with pytest.raises(TypeError, match="subsets: expected a 1-D int64 tensor of bitmasks, received list"):
        sf.evaluate_many(net, games, subsets=[0, 1], progress=False)


def test_no_subsets_give_no_values():
    net = model("llama")
    game = make_game("spread_n5")
    empty = torch.zeros(0, dtype=torch.int64)
    assert evaluate_trie(net, game, empty, progress=False).shape == (0,)
    assert evaluate_naive(net, game, empty, progress=False).shape == (0,)


def test_sampled_subsets_of_many_players_run_in_the_trie():
    """n=30 players and a few sampled subsets: the trie stores only the prefixes they reach (a store of all 2^j
    nodes per level would need hundreds of GiB), so it runs within 1 GiB and equals naive."""
    import sftint_fast as sf
    from sftint_fast.bench import sample_subsets

    net = model("llama")
    game = _many_players_game(30)
    subsets = torch.cat([torch.tensor([0, (1 << 30) - 1, 12345, 12345]), sample_subsets(30, 20, seed=2)])
    naive = sf.evaluate(net, game, method="naive", subsets=subsets, max_memory=1 << 30, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to naive
        trie = sf.evaluate(net, game, method="trie", subsets=subsets, max_memory=1 << 30, progress=False)
        many = sf.evaluate_many(net, [game, game], subsets=subsets, max_memory=1 << 30, progress=False)
    check_close(trie, naive)
    assert all(torch.equal(v, trie) for v in many)


def test_auto_falls_back_to_naive_when_the_trie_store_does_not_fit():
    """A budget too small for the trie's store (the prefixes 600 sampled subsets of n=30 reach, + one node's
    activations) but enough for naive batches: ``method='auto'`` runs the naive engine (with a warning);
    ``method='trie'`` refuses, saying how much it needs."""
    import sftint_fast as sf
    from sftint_fast.bench import sample_subsets

    net = model("llama")
    game = _many_players_game(30)
    subsets = sample_subsets(30, 600, seed=0)
    budget = 600_000
    naive = sf.evaluate(net, game, method="naive", subsets=subsets, max_memory=budget, progress=False)
    with pytest.warns(UserWarning, match=r"needs at least \d+\.\d+ GiB.*naive engine"):
        auto = sf.evaluate(net, game, subsets=subsets, max_memory=budget, progress=False)
    assert torch.equal(auto, naive)
    with pytest.warns(UserWarning, match="naive engine"):
        many = sf.evaluate_many(net, [game, game], subsets=subsets, max_memory=budget, progress=False)
    assert all(torch.equal(v, naive) for v in many)
    with pytest.raises(ValueError, match=r"n=30.*needs at least \d+\.\d+ GiB.*the nodes the subsets reach"):
        sf.evaluate(net, game, method="trie", subsets=subsets, max_memory=budget, progress=False)


@pytest.mark.parametrize("options", [{"batch_size": True}, {"max_memory": True}, {"max_memory": float("nan")},
                                     {"max_memory": float("inf")}])
def test_evaluate_refuses_bool_and_non_finite_options(options):
    import sftint_fast as sf

    name = next(iter(options))
    with pytest.raises(ValueError, match=f"{name}: expected a positive"):
        sf.evaluate(model("llama"), make_game("n1"), progress=False, **options)


def test_too_many_players_error_states_bytes_when_below_a_gib():
    import sftint_fast as sf

    with pytest.raises(ValueError, match=r"n=5 players: all 2\^5 variants need at least 0\.0 GiB \(384 bytes\), but "
                                         r"0\.0 GiB \(100 bytes\) are available"):
        sf.evaluate(model("llama"), make_game("spread_n5"), max_memory=100, progress=False)


def test_torch_subset_attention_of_an_empty_segment_is_empty():
    """Level 0 of a prompt whose first player is at position 0 owns no token: the torch backend returns the empty
    output, as the reference and the Triton kernel do."""
    q, store = torch.randn(1, 0, 4, 8), torch.randn(0, 2, 8)
    args = (q, store, store, torch.tensor([0]), *(torch.tensor([0]) for _ in range(4)))
    got = subset_attention(*args, level=0, scale=0.3)
    want = subset_attention_reference(*args, level=0, scale=0.3)
    assert got.shape == want.shape == q.shape and got.dtype == want.dtype


def test_all_variants_check_counts_the_memory_of_the_models_device(monkeypatch):
    """On a GPU the 2^n bitmasks and values are allocated there: its free memory bounds n, not only the host's
    (checked without a GPU: the check refuses before anything is allocated on the device)."""
    import sftint_fast.engine as engine

    free = {"cpu": 64 << 30, "cuda": 1 << 20}
    monkeypatch.setattr(engine, "available_memory", lambda device: free[device.type])
    with pytest.raises(ValueError, match=r"n=20 players: all 2\^20 variants need at least .* \(1048576 bytes\) are"):
        engine._validate_subsets(None, 20, torch.device("cuda"), None)
    assert engine._validate_subsets(None, 20, torch.device("cpu"), None).numel() == 1 << 20


@pytest.mark.parametrize("method", ["auto", "trie", "naive"])
def test_an_autocast_region_around_the_call_leaves_the_precision_to_compute_dtype(method):
    """``compute_dtype=None`` evaluates in the model's own dtype even inside a caller's autocast region (an eval
    loop, a training script): the trie's float32 KV stores took bfloat16 K/V there (RuntimeError in index_copy_)
    and the naive engine silently ran in bfloat16 (|dv| ~ 0.05)."""
    import sftint_fast as sf

    net = model("llama")
    game = make_game("spread_n5", seed=8)
    want = sf.evaluate(net, game, method="naive", progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sf.evaluate(net, game, method=method, progress=False)
        assert torch.is_autocast_enabled("cpu")  # the caller's region is back after the call
    check_close(got, want)


@pytest.fixture
def accelerator_reset():
    """Resets accelerate's process-wide state around a test that builds an ``Accelerator`` of its own (a ``Trainer`` of
    an earlier test leaves one without mixed precision, which another may not change)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("method", ["trie", "naive"])
def test_a_model_prepared_for_mixed_precision_is_evaluated_without_its_autocast(method, accelerator_reset):
    """``Accelerator(mixed_precision=...).prepare`` (a ``Trainer`` with ``bf16=True``/``fp16=True``) wraps the model's
    own ``forward`` in autocast: the naive engine, which calls ``model(...)``, ran in bf16/fp16 (|dv| ~ 0.05) while
    the trie, which calls the modules, did not. Both now run the forward accelerate kept (``compute_dtype`` alone sets
    the precision), and the model still trains under its autocast afterwards. (On a CPU accelerate patches only for
    bf16; fp16 on a GPU is the same patch.)"""
    from accelerate import Accelerator

    import sftint_fast as sf

    net = model("llama")
    game = make_game("spread_n5", seed=8)
    want = sf.evaluate(net, game, method="naive", progress=False)
    ids = game.input_ids[None]
    with torch.no_grad():
        plain_logits = net(input_ids=ids).logits
    prepared = Accelerator(mixed_precision="bf16", cpu=True).prepare(net)
    patched = prepared.forward
    with torch.no_grad():
        assert not torch.allclose(prepared(input_ids=ids).logits, plain_logits, atol=1e-4)  # it runs under autocast
        check_close(sf.evaluate(prepared, game, method=method, progress=False), want)
        assert prepared.forward is patched  # the model the training loop holds is left as it was
        assert torch.equal(prepared(input_ids=ids).logits, prepared(input_ids=ids).logits)
        assert not torch.allclose(prepared(input_ids=ids).logits, plain_logits, atol=1e-4)
