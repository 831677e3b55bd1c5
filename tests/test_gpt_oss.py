"""gpt-oss on the trie engine: attention sinks (torch subset attention, Triton kernel), its MoE block, alternating
sliding layers and YaRN RoPE, exact against the naive engine (the model's own forward on every variant)."""
import dataclasses

import pytest
import torch
from conftest import requires_triton

import sftint_fast as sf
from sftint_fast.engine.adapters import find_adapter, get_adapter
from sftint_fast.game import Game
from sftint_fast.ops.reference import subset_attention_reference
from sftint_fast.ops.subset_attention import subset_attention


def tiny_gpt_oss(*, attn: str = "eager", seed: int = 0, experts: str | None = None, **overrides):
    """A tiny gpt-oss: 3 layers (sliding window 3, full, sliding), 4 query / 2 KV heads of 16, 4 experts of 32 (top
    2), YaRN RoPE (the config's default), random q/k/v/o and router biases, sinks of magnitude 1-3 (both signs:
    they bind), in eval mode."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    options = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=3,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                   initializer_range=0.2)
    options.update(overrides)
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn} | ({"experts_implementation": experts} if experts else {})
    model = AutoModelForCausalLM.from_config(GptOssConfig(**options), **kwargs).eval()
    with torch.no_grad():
        for block in model.model.layers:
            attn_module = block.self_attn
            attn_module.sinks.copy_(torch.empty_like(attn_module.sinks).uniform_(1.0, 3.0)
                                    * torch.tensor([1.0, -1.0]).repeat(len(attn_module.sinks) // 2))
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(attn_module, name).bias.normal_(0.0, 0.2)
            block.mlp.experts.gate_up_proj_bias.normal_(0.0, 0.2)
            block.mlp.experts.down_proj_bias.normal_(0.0, 0.2)
    return model


def _game(hidden: int, masking: str, length: int = 13) -> Game:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (length,), generator=gen)
    return Game(input_ids=ids, player_spans=((0, 1), (3, 5), (5, 6), (8, 10)), words=("a", "b", "c", "d"),
                target=torch.tensor([5]), baseline=torch.randn(hidden, generator=gen), masking=masking,
                prompt_length=length)


def test_gpt_oss_has_an_adapter():
    """gpt_oss had no trie adapter (``get_adapter`` None: the naive engine ran it); now its layer loop."""
    model = tiny_gpt_oss()
    adapter = get_adapter(model)
    assert type(adapter).__name__ == "GptOssAdapter"
    assert [spec.sliding_window for spec in adapter.layers] == [3, None, 3]
    assert all(spec.sinks is block.self_attn.sinks for spec, block in zip(adapter.layers, model.model.layers))
    assert adapter.dims.sinks and not adapter.dims.softcap


@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_trie_matches_naive(masking, backend):
    model = tiny_gpt_oss()
    game = _game(model.config.hidden_size, masking)
    naive = sf.evaluate(model, game, method="naive", progress=False)
    trie = sf.evaluate(model, game, method="trie", attention_backend=backend, progress=False)
    assert naive.std() > 0.05  # the values vary: a wrong trie would show
    torch.testing.assert_close(trie, naive, atol=2e-6, rtol=1e-5)  # as tests/test_trie.py check_close


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_trie_matches_naive_other_experts_implementations(experts):
    model = tiny_gpt_oss(experts=experts)
    game = _game(model.config.hidden_size, "attention")
    naive = sf.evaluate(model, game, method="naive", progress=False)
    trie = sf.evaluate(model, game, method="trie", attention_backend="torch", progress=False)
    torch.testing.assert_close(trie, naive, atol=2e-6, rtol=1e-5)  # as tests/test_trie.py check_close


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_sinks_matter(monkeypatch, backend):
    """The engine without the sinks (LayerSpec.sinks None) moves the values far beyond rounding: the comparisons above
    check that the engine applies them."""
    from sftint_fast.engine.adapters.gpt_oss import GptOssAdapter

    model = tiny_gpt_oss()
    game = _game(model.config.hidden_size, "embedding")
    naive = sf.evaluate(model, game, method="naive", progress=False)
    init = GptOssAdapter.__init__

    def without_sinks(self, model):
        init(self, model)
        self.layers = tuple(dataclasses.replace(spec, sinks=None) for spec in self.layers)

    monkeypatch.setattr(GptOssAdapter, "__init__", without_sinks)
    dropped = sf.evaluate(model, game, method="trie", attention_backend=backend, progress=False)
    assert (dropped - naive).abs().max() > 1e-2


def test_sdpa_and_flash_are_refused():
    """SDPA ignores gpt-oss's sinks (s_aux) and flash attention drops them unless its kernel takes them: a model
    configured so has no adapter, with the reason (method='auto' runs it naive)."""
    model = tiny_gpt_oss()
    for implementation in ("sdpa", "flash_attention_2"):
        model.config._attn_implementation = implementation
        adapter, reason = find_adapter(model)
        assert adapter is None and f"attention implementation {implementation!r}" in reason
        assert "attn_implementation='eager'" in reason


def test_sliding_window_disagreeing_with_layer_types_is_refused():
    model = tiny_gpt_oss()
    model.model.layers[1].self_attn.sliding_window = 3  # a "full_attention" layer whose module has a window
    adapter, reason = find_adapter(model)
    assert adapter is None and "layer 1 is a 'full_attention' layer" in reason


def test_lora_on_experts_is_refused():
    class Wrapped(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

    model = tiny_gpt_oss()
    model.model.layers[2].mlp.router = Wrapped(model.model.layers[2].mlp.router)
    adapter, reason = find_adapter(model)
    assert adapter is None and "layer 2's mlp.router is a PEFT Wrapped" in reason


def _sink_case(dtype=torch.float32, seed=0, heads=4, kv_heads=2, head_dim=16):
    """A level-2 chunk of 3 nodes over a random store (level lens 4, 2, 3; a player token in levels 1, 2)."""
    gen = torch.Generator().manual_seed(seed)
    lens, players = [4, 2, 3], [0, 1, 1]
    offsets, positions, total = [0, 4, 8], [0, 4, 6], 4 + 2 * 2 + 4 * 3
    k_store = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype)
    v_store = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(3, lens[2], heads, head_dim, generator=gen).to(dtype)
    sinks = torch.empty(heads).uniform_(1.0, 3.0, generator=gen) * torch.tensor([1.0, -1.0]).repeat(heads // 2)
    tables = [torch.tensor(t, dtype=torch.int64) for t in (offsets, lens, players, positions)]
    return (q, k_store, v_store, torch.tensor([3, 0, 2]), *tables), sinks


def _dense_sink_attention(q, keys, values, mask, sinks, scale):
    """Eager gpt-oss attention of one node: scores, mask, the sink column, max subtraction, softmax, drop it."""
    scores = torch.einsum("shd,khd->hsk", q.double(), keys.double()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    combined = torch.cat([scores, sinks.double().view(-1, 1, 1).expand(-1, scores.shape[1], 1)], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = combined.softmax(dim=-1)[..., :-1]
    return torch.einsum("hsk,khd->shd", probs, values.double())


@pytest.mark.parametrize("masking", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_torch_subset_attention_with_sinks_matches_dense(masking, window):
    """The torch subset attention with sinks against eager gpt-oss attention over each node's keys (rows listed by
    hand), and against the explicit-key reference."""
    args, sinks = _sink_case()
    q, k_store, v_store, node_ids = args[:4]
    kw = dict(level=2, scale=0.25, attention_masking=masking, sliding_window=window)
    out = subset_attention(*args, sinks=sinks, **kw)
    torch.testing.assert_close(out, subset_attention_reference(*args, sinks=sinks, **kw), atol=2e-6, rtol=0)
    for c, node in enumerate(node_ids.tolist()):
        rows = [0, 1, 2, 3] + [4 + (node & 1) * 2 + t for t in range(2)] + [8 + node * 3 + t for t in range(3)]
        key_pos = torch.arange(9)
        query_pos = 6 + torch.arange(3)
        mask = key_pos[None, :] <= query_pos[:, None]
        if window is not None:
            mask &= query_pos[:, None] - key_pos[None, :] < window
        if masking:  # player tokens: position 4 (player 0's, bit 0), position 6 (player 1's, bit 1)
            for pos, bit in ((4, 0), (6, 1)):
                if not (node >> bit) & 1:
                    mask[:, pos] &= query_pos == pos
        index = torch.tensor(rows)
        keys = k_store[index].repeat_interleave(2, dim=1)
        values = v_store[index].repeat_interleave(2, dim=1)
        dense = _dense_sink_attention(q[c], keys, values, mask, sinks, 0.25)
        torch.testing.assert_close(out[c].double(), dense, atol=2e-6, rtol=0)
    plain = subset_attention(*args, **kw)
    assert (plain - out).abs().max() > 1e-2  # the sinks matter here


def test_subset_attention_refuses_bad_sinks():
    args, sinks = _sink_case()
    for bad, what in ((sinks[:3], r"shape \(4,\)"), (sinks.long(), "floating"), ([1.0] * 4, "list"),
                      (torch.tensor([1.0, float("nan"), 0.0, 0.0]), "finite")):
        with pytest.raises(ValueError, match=f"sinks: expected.*{what}" if what != "list" else "got list"):
            subset_attention(*args, level=2, scale=0.25, sinks=bad)


@requires_triton
@pytest.mark.parametrize("path", ["flat", "segments"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"attention_masking": True, "sliding_window": 3, "softcap": 2.0}])
def test_triton_subset_attention_with_sinks(path, dtype, options):
    """The kernel's sinks (HAS_SINKS: the running max starts at the sink, the sum at 1) against the reference."""
    from conftest import DEVICE

    from sftint_fast.ops.triton.subset_attention import subset_attention as fused

    args, sinks = _sink_case(dtype, seed=3)
    kw = dict(level=2, scale=0.25, **options)
    out = fused(*(a.to(DEVICE) for a in args), sinks=sinks.to(DEVICE), path=path, **kw).cpu()
    ref = subset_attention_reference(*args, sinks=sinks, **kw)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=0)
    plain = fused(*(a.to(DEVICE) for a in args), path=path, **kw).cpu()
    assert (plain.float() - out.float()).abs().max() > 0.05


def test_moe_block_elements_cover_the_experts_peak():
    """The plan's per-token count of gpt-oss's MoE block (``moe_block_elements``: it read Mixtral-style ``gate`` /
    ``hidden_dim`` and raised an AttributeError) against the live peak of its forward on 40 tokens all routed to the
    same 4 experts (eager's worst case: every step holds every token), per experts implementation (a counter of live
    storages, as tests/test_naive.py's). Measured: eager 383 kB live / 847 kB counted, grouped_mm 1.52 / 1.67 MB,
    batched_mm 32.0 / 33.5 MB."""
    from test_naive import _LiveBytes

    from sftint_fast.engine.adapters.moe import moe_block_elements

    tokens = 40
    for experts in ("eager", "grouped_mm", "batched_mm"):
        model = tiny_gpt_oss(experts=experts, intermediate_size=256, num_local_experts=8, num_experts_per_tok=4)
        block = model.model.layers[0].mlp
        with torch.no_grad():
            block.router.weight.zero_()
            block.router.bias.copy_(torch.arange(8.0).flip(0))
        x = torch.randn(1, tokens, model.config.hidden_size)
        with torch.no_grad(), _LiveBytes() as tracked:
            block(x)
        estimate = moe_block_elements(block, experts, 4) * 4 * tokens
        assert tracked.peak <= estimate <= 2.5 * tracked.peak, (experts, tracked.peak, estimate)


@pytest.mark.parametrize("experts", ["eager", "grouped_mm"])
def test_trie_stays_within_max_memory(experts):
    """The plan counts the sinks' score tensors (``ModelDims.sinks``: the torch path computes the scores in steps, as
    eager attention does) and the MoE block's peak: a budget 5% above the plan's need holds in live tensors (counted
    as SDPA's one score tensor, the live peak was 1.53 MB for a 1.34 MB budget)."""
    import re

    from test_naive import _LiveBytes

    from sftint_fast.engine.plan import TrieMemoryError, plan_trie

    model = tiny_gpt_oss(experts=experts, num_attention_heads=8, num_key_value_heads=2)
    game = Game(input_ids=torch.randint(3, 128, (120,), generator=torch.Generator().manual_seed(0)),
                player_spans=((2, 3), (10, 12), (20, 21), (30, 31)), words=("a", "b", "c", "d"),
                target=torch.tensor([5]), baseline=torch.zeros(64), prompt_length=120)
    with pytest.raises(TrieMemoryError) as refused:
        plan_trie(game, model=model, max_memory=1)
    needed = int(re.search(r"needs at least .*?\((\d+) bytes\)", str(refused.value)).group(1))
    budget = needed + needed // 20
    reference = sf.evaluate(model, game, method="naive", progress=False)
    with _LiveBytes() as tracked:
        values = sf.evaluate(model, game, method="trie", max_memory=budget, attention_backend="torch", progress=False)
    torch.testing.assert_close(values, reference, atol=2e-6, rtol=1e-5)
    assert tracked.peak <= budget, (tracked.peak, budget)


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_naive_batches_stay_within_max_memory(experts):
    """The naive engine's per-variant estimate found sparse blocks by a Mixtral-style ``gate``: gpt-oss's block (its
    ``router``) was counted as a dense MLP of the experts' width, and a budget of 4 variants ran over ``max_memory``
    in live tensors (batched_mm gathers each token's top-k experts' weights). Its block's peak is counted now."""
    from test_naive import _LiveBytes

    from sftint_fast.engine.naive import sequence_bytes

    model = tiny_gpt_oss(experts=experts, intermediate_size=256, num_local_experts=8, num_experts_per_tok=4)
    game = Game(input_ids=torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(0)),
                player_spans=((2, 3), (10, 12), (20, 21), (30, 31)), words=("a", "b", "c", "d"),
                target=torch.tensor([5]), baseline=torch.zeros(64), prompt_length=40)
    budget = 4 * sequence_bytes(model, game)
    budget += budget // 20
    with _LiveBytes() as tracked:
        sf.evaluate(model, game, method="naive", max_memory=budget, progress=False)
    assert tracked.peak <= budget, (tracked.peak, budget)
