"""The naive engine and ``evaluate`` against one-at-a-time plain HF forwards of the real model."""
import warnings

import pytest
import torch

import sftint_fast as sf
from sftint_fast.engine.naive import evaluate_naive
from sftint_fast.game import Game

from conftest import tiny_gemma3n, tiny_model
from word_tokenizer import word_tokenizer

TOK = word_tokenizer()
# Layout A: 6 word players, one at position 0, a multi-token word, a player holding the last prompt token.
TEXT_A = "The cat, sat on the mat!"
# Layout B: a 3-token teacher-forced target, players with background between and after them.
TEXT_B = "the cat sat on the mat"


def _log_odds(logits, target):
    """float64 log p(y) - log(1 - p(y)), summed over the target tokens; logits (m, V)."""
    p = logits.double().softmax(-1).gather(-1, target.view(-1, 1)).squeeze(-1)
    return float((p.log() - (-p).log1p()).sum())


def _reference(model, game, subset, pad_id):
    """One plain forward of the variant: substituted pad ids (embedding) or deleted tokens (attention)."""
    rows = game.player_mask_rows()
    masked = (rows >= 0) & (((subset >> rows.clamp(min=0)) & 1) == 0)
    m = game.target.numel()
    scored = game.score_positions
    with torch.no_grad():
        if game.masking == "embedding":
            ids = game.input_ids.clone()
            ids[masked] = pad_id
            logits = model(input_ids=ids[None]).logits[0, scored]
        else:
            # A masked token only matters as a key, so dropping it (positions kept) is the same game; the
            # scored positions stay because they are queries (their diagonal is kept).
            masked[scored] = False
            keep = (~masked).nonzero().flatten()
            logits = model(input_ids=game.input_ids[keep][None], position_ids=keep[None],
                           attention_mask=torch.ones(1, keep.numel(), dtype=torch.long)).logits[0, -m:]
    return _log_odds(logits, game.target)


CASES = [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "eager"), ("gpt2", "eager")]


@pytest.mark.parametrize("arch,attn", CASES)
@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("layout", ["A", "B"])
def test_naive_matches_plain_forwards(arch, attn, masking, layout):
    model = tiny_model(arch, attn=attn, **({"qkv_bias": True} if arch == "qwen2" else {}))
    if layout == "A":
        game = Game.from_text(model, TOK, TEXT_A, masking=masking)
    else:
        game = Game.from_text(model, TOK, TEXT_B, players=[0, 2, 4], target="the big mat", masking=masking)
    v = sf.evaluate(model, game, method="naive", batch_size=7, progress=False)
    assert v.shape == (1 << game.num_players,) and v.dtype == torch.float32
    # Plain forwards on the 0/full subsets and a seeded sample (one forward per variant is the slow part).
    checked = torch.cat([torch.tensor([0, v.numel() - 1]),
                         torch.randperm(v.numel(), generator=torch.Generator().manual_seed(1))[:10]])
    expected = torch.tensor([_reference(model, game, int(s), TOK.pad_token_id) for s in checked])
    assert (v[checked].double() - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))


def test_full_variant_is_the_plain_log_odds_and_chat():
    model = tiny_model("llama")
    for game in (Game.from_text(model, TOK, TEXT_B, target="the big mat"),
                 Game.from_text(model, TOK, "hello big world", chat=True)):
        v = sf.evaluate(model, game, method="naive", subsets=torch.tensor([(1 << game.num_players) - 1]), progress=False)
        with torch.no_grad():
            logits = model(input_ids=game.input_ids[None]).logits[0, game.score_positions]
        assert abs(float(v[0]) - _log_odds(logits, game.target)) < 1e-5


def test_subsets_order_batch_size_and_auto():
    model = tiny_model("llama")
    game = Game.from_text(model, TOK, TEXT_A)
    full = sf.evaluate(model, game, method="naive", progress=False)
    subsets = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:20]
    some = sf.evaluate(model, game, method="naive", subsets=subsets, batch_size=3, progress=False)
    assert torch.allclose(some, full[subsets], rtol=0, atol=1e-5)  # batch size only changes rounding
    assert sf.evaluate(model, game, subsets=torch.tensor([], dtype=torch.int64), progress=False).numel() == 0
    auto = sf.evaluate(model, game, method="auto", progress=False)
    assert (auto - full).abs().max() <= 1e-4 * max(1.0, float(full.abs().max()))
    many = sf.evaluate_many(model, [game, game], method="naive", progress=False)
    assert all(torch.equal(x, full) for x in many)


@pytest.mark.filterwarnings("ignore::UserWarning")  # DataParallel without GPUs
def test_a_ddp_or_dataparallel_wrapped_model_is_evaluated_as_the_model_it_holds():
    """A custom training loop holds its model wrapped; evaluate raised AttributeError ('DistributedDataParallel'
    object has no attribute 'get_input_embeddings') on it."""
    import torch.distributed as dist

    model = tiny_model("llama")
    game = Game.from_text(model, TOK, TEXT_A)
    plain = {method: sf.evaluate(model, game, method=method, progress=False) for method in ("naive", "trie")}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrappers = [torch.nn.parallel.DistributedDataParallel(model), torch.nn.DataParallel(model)]
        for wrapped in wrappers:
            for method, want in plain.items():
                torch.testing.assert_close(sf.evaluate(wrapped, game, method=method, progress=False), want,
                                           rtol=0, atol=0)
            many = sf.evaluate_many(wrapped, [game, game], method="naive", progress=False)
            torch.testing.assert_close(many[1], plain["naive"], rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_unsupported_architecture_falls_back_to_naive():
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=128, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    game = Game.from_text(model, TOK, "the cat sat")
    naive = sf.evaluate(model, game, method="naive", progress=False)
    with pytest.warns(UserWarning, match="naive"):
        auto = sf.evaluate(model, game, method="auto", progress=False)
    assert torch.equal(auto, naive)
    with pytest.raises(ValueError, match="trie"):
        sf.evaluate(model, game, method="trie", progress=False)


def test_bad_inputs_raise():
    model = tiny_model("llama")
    game = Game.from_text(model, TOK, "the cat sat")
    with pytest.raises(TypeError, match="integer"):
        sf.evaluate(model, game, subsets=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="1-D"):
        sf.evaluate(model, game, subsets=[0, 1])
    with pytest.raises(ValueError, match=r"\[0, 2\^3\).*\[8\]"):
        sf.evaluate(model, game, subsets=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="method"):
        sf.evaluate(model, game, method="fast")
    with pytest.raises(ValueError, match="batch_size"):
        sf.evaluate(model, game, batch_size=0)
    with pytest.raises(ValueError, match="compute_dtype"):
        sf.evaluate(model, game, compute_dtype="float8")
    with pytest.raises(TypeError, match="Game"):
        sf.evaluate(model, "the cat sat")
    big = Game(input_ids=torch.arange(4, 44), player_spans=tuple((i, i + 1) for i in range(40)),
               words=("w",) * 40, target=torch.tensor([5]), baseline=torch.zeros(32), prompt_length=40)
    with pytest.raises(ValueError, match=r"n=40 players.*GiB"):
        sf.evaluate(model, big, method="naive")
    v = sf.evaluate(model, big, method="naive", subsets=torch.tensor([0, (1 << 40) - 1]), progress=False)
    assert v.shape == (2,)
    bf16 = tiny_model("llama").to(torch.bfloat16)
    with pytest.raises(ValueError, match="autocast"):
        sf.evaluate(bf16, Game.from_text(bf16, TOK, "the cat sat"), method="naive", compute_dtype="float32")


def test_nan_logits_name_the_subsets():
    model = tiny_model("llama")
    game = Game.from_text(model, TOK, "the cat sat")
    # a Game refuses a NaN baseline; poisoned afterwards, it makes NaN logits in exactly the variants that mask a player
    object.__setattr__(game, "baseline", torch.full((32,), float("nan")))
    with pytest.raises(ValueError, match=r"subsets \(bitmasks\) \[0, 1, 2, 3, 4, 5, 6\]"):
        sf.evaluate(model, game, method="naive", progress=False)


def test_mode_restored_no_grad_and_compute_dtypes():
    model = tiny_model("llama").train()
    game = Game.from_text(model, TOK, TEXT_A)
    v = sf.evaluate(model, game, method="naive", progress=False)
    assert model.training and not v.requires_grad
    model.eval()
    assert torch.equal(sf.evaluate(model, game, method="naive", progress=False), v)  # dropout-free: same values
    assert torch.equal(sf.evaluate(model, game, method="naive", compute_dtype="tf32", progress=False), v)
    low = sf.evaluate(model, game, method="naive", compute_dtype="bfloat16", progress=False)
    assert 0 < (low - v).abs().max() < 0.1
    with pytest.warns(UserWarning, match="autocast"):
        assert torch.equal(sf.evaluate(model, game, compute_dtype="bfloat16", progress=False), low)
    with pytest.raises(ValueError, match="autocast"):
        sf.evaluate(model, game, method="trie", compute_dtype="bfloat16", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        direct = evaluate_naive(model, game, torch.arange(64), progress=False)
    assert torch.equal(direct, v)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attention_masking_ignores_a_sliding_window_the_model_does_not_use(arch):
    """A config may carry a ``sliding_window`` its model's forward never reads (Llama, GPT-2): the naive engine's
    attention masks must not window where the model does not, and the trie (which reads the model) agrees."""
    model = tiny_model(arch, initializer_range=0.2, sliding_window=2)
    game = Game.from_text(model, TOK, TEXT_A, players=[0, 2, 4], masking="attention")
    assert game.input_ids.numel() > 2 * model.config.sliding_window
    v = sf.evaluate(model, game, method="naive", progress=False)
    expected = torch.tensor([_reference(model, game, s, TOK.pad_token_id) for s in range(v.numel())])
    assert (v.double() - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))
    trie = sf.evaluate(model, game, method="trie", progress=False)
    torch.testing.assert_close(trie, v, atol=1e-4, rtol=1e-4)


def test_attention_masking_windows_the_sliding_layers_of_a_multimodal_model():
    """Gemma-3's multimodal model keeps ``layer_types`` and ``sliding_window`` in its text config: the naive engine's
    attention masks must still window its sliding layers (no trie adapter: this model always runs naive)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, num_hidden_layers=2, sliding_window=2, layer_types=["sliding_attention", "full_attention"],
                query_pre_attn_scalar=16, pad_token_id=0, initializer_range=0.2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                                        boi_token_index=125, eoi_token_index=126,
                                                        image_token_index=127)).eval()
    game = Game.from_text(model, TOK, TEXT_A, players=[0, 2, 4], masking="attention")
    assert game.input_ids.numel() > 2 * text["sliding_window"]
    v = sf.evaluate(model, game, method="naive", progress=False)
    # Plain forwards that keep every token in place (a window counts sequence places, so deleting tokens as
    # _reference does would move it) and hide the masked players with a padding mask; no player is scored.
    rows, ids = game.player_mask_rows(), game.input_ids[None]
    positions = torch.arange(ids.shape[1])[None]
    expected = []
    for subset in range(v.numel()):
        keep = (rows < 0) | (((subset >> rows.clamp(min=0)) & 1) == 1)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=keep[None].long(), position_ids=positions).logits
        expected.append(_log_odds(logits[0, game.score_positions], game.target))
    expected = torch.tensor(expected)
    assert (v.double() - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))


def test_attention_masking_refuses_layers_an_attention_mask_cannot_hide_tokens_from():
    """Recurrent / linear-attention / conv layers (hybrid models) mix tokens without reading the attention mask:
    "attention" masking would leave the masked players visible to them, so it is refused with the reason."""
    from transformers import AutoModelForCausalLM, JambaConfig

    cfg = JambaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1,
                      num_experts=2, mamba_d_state=4, mamba_dt_rank=4, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert "linear_attention" in model.config.layer_types
    game = Game.from_text(model, TOK, TEXT_A, players=[0, 2], target="mat", masking="attention")
    with pytest.raises(ValueError, match=r"masking='attention'.*JambaForCausalLM.*\['linear_attention'\].*"
                                         r"masking='embedding'"):
        sf.evaluate(model, game, method="naive", progress=False)
    embedding = Game.from_text(model, TOK, TEXT_A, players=[0, 2], target="mat")
    assert sf.evaluate(model, embedding, method="naive", progress=False).shape == (4,)


def _rwkv():
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    return RwkvForCausalLM(RwkvConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                      intermediate_size=64, context_length=64, pad_token_id=0)).eval()


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0)).eval()


def _bidirectional():
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    return BertLMHeadModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64, pad_token_id=0)).eval()


@pytest.mark.parametrize("make,reason", [(_rwkv, r"still sees a token the masks hide"),
                                         (_bloom, r"failed on the 4D attention masks"),
                                         (_bidirectional, r"is not causal")],
                         ids=["rwkv", "bloom", "bidirectional"])
def test_attention_masking_refuses_a_model_the_masks_do_not_reach(make, reason):
    """A recurrent model whose config lists no ``layer_types`` (RWKV) ignores the 4D masks: every variant got the full
    prompt's value. BLOOM builds its ALiBi from a 2D mask and failed deep in its forward. A bidirectional model (BERT
    without ``is_decoder``) was made causal by the masks, so even ``v(N)`` was not its value. All are refused, with
    the reason, before any variant runs; embedding masking still works."""
    model = make()
    assert getattr(model.config, "layer_types", None) is None
    game = Game.from_text(model, TOK, TEXT_A, players=[0, 2], target="mat", masking="attention")
    with pytest.raises(ValueError, match=rf"masking='attention'.*{type(model).__name__}.*{reason}.*"
                                         r"masking='embedding'"):
        sf.evaluate(model, game, method="naive", progress=False)
    embedding = Game.from_text(model, TOK, TEXT_A, players=[0, 2], target="mat")
    assert sf.evaluate(model, embedding, method="naive", progress=False).shape == (4,)


def test_attention_masking_refuses_flex_attention_on_the_cpu_before_any_forward(monkeypatch):
    """torch's flex attention on the CPU corrupted the heap on the 4D variant masks ("free(): invalid next size"; the
    whole process aborted, in the masking probe already): refused, naming the implementation, before any forward."""
    import sftint_fast.engine.naive as naive_module

    model = tiny_model("llama", attn="flex_attention")

    def probed(*args, **kwargs):  # (what aborted the process: a regression fails here instead)
        raise AssertionError("the masking probe ran a forward with flex attention on the CPU")

    monkeypatch.setattr(naive_module, "_masking_fault", probed)
    game = Game.from_text(model, TOK, TEXT_A, players=[0, 2], target="mat", masking="attention")
    with pytest.raises(ValueError, match=r"masking='attention'.*LlamaForCausalLM with attn_implementation="
                                         r"'flex_attention' on the CPU.*attn_implementation='eager'"):
        sf.evaluate(model, game, method="naive", progress=False)


def test_a_memory_shortage_in_the_masking_probe_is_raised_not_kept_as_the_model_verdict():
    """The attention-masking probe (run once per model) kept any exception as the model's permanent reason to refuse
    attention masking: one out-of-memory during it refused the model for the rest of a training run."""
    model = tiny_model("llama")
    game = Game.from_text(model, TOK, TEXT_A, players=[0, 2], target="mat", masking="attention")
    forward = model.forward

    def short_of_memory(*args, **kwargs):
        if kwargs.get("attention_mask") is None:  # the inputs_embeds probe: fine
            return forward(*args, **kwargs)
        model.forward = forward
        raise torch.cuda.OutOfMemoryError("out of memory (test)")

    model.forward = short_of_memory
    with pytest.raises(torch.cuda.OutOfMemoryError, match="out of memory"):
        sf.evaluate(model, game, method="naive", progress=False)
    assert sf.evaluate(model, game, method="naive", progress=False).shape == (4,)


def test_batch_size_estimate_takes_per_layer_sizes():
    """A config may give ``intermediate_size`` per layer (Gemma-3n): the memory estimate used the largest, not a
    TypeError (``int + list``)."""
    from sftint_fast.engine.naive import naive_batch_size, sequence_bytes

    model = tiny_gemma3n()
    game = Game.from_text(model, TOK, TEXT_A, players=[0, 2], target="mat")
    flat = sequence_bytes(tiny_model("llama"), game)  # hidden 32, intermediate 64, 4 heads: the same sizes
    assert sequence_bytes(model, game) == flat
    assert naive_batch_size(model, game, max_memory=10 * flat) == 10


def test_a_model_whose_forward_reads_the_ids_beyond_its_embedding_is_refused():
    """Gemma-3n adds per-layer embeddings of the token ids to every layer: given ``inputs_embeds`` (how the naive
    engine gives it every variant) it drops them, so even ``v(N)`` was not the model's value on the prompt (its last
    logits moved by ~0.5). Refused, with the reason, in either masking mode."""
    model = tiny_gemma3n()
    for masking in ("embedding", "attention"):
        game = Game.from_text(model, TOK, TEXT_A, players=[0, 2], target="mat", masking=masking)
        with pytest.raises(ValueError, match=r"inputs_embeds.*input_ids.*Gemma3nForCausalLM.*moved by"):
            sf.evaluate(model, game, method="naive", progress=False)


def test_evaluate_gives_each_submodule_its_own_mode_back():
    """A model in train mode with a frozen (eval) submodule keeps exactly that mix after evaluate."""
    model = tiny_model("llama").train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    sf.evaluate(model, Game.from_text(model, TOK, TEXT_B, target="mat"), progress=False)
    assert [m.training for m in model.modules()] == modes


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the storages that ops create inside the mode and keep alive (views and in-place outputs of an
    input's storage, e.g. the weights' ``t()``, are not new memory)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = 0, 0

    def _free(self, size):
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        seen = set()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs | seen:
                storage = t.untyped_storage()
                seen.add(storage.data_ptr())
                self.live += storage.nbytes()
                weakref.finalize(storage, self._free, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def test_naive_batch_size_does_not_override_max_memory():
    """``batch_size`` and ``max_memory`` together: the naive engine ran ``batch_size`` variants per forward whatever
    the budget (64 variants of a 4-variant budget: 9.8x the budget in live tensors); like the trie, it now takes
    the smaller of the two, and its live tensors stay within ``max_memory``."""
    from sftint_fast.engine.naive import sequence_bytes

    model = tiny_model("llama")
    game = Game.from_text(model, TOK, TEXT_A, players="words", target="mat")
    budget = 4 * sequence_bytes(model, game)
    reference = sf.evaluate(model, game, method="naive", progress=False)
    with _LiveBytes() as tracked:
        v = sf.evaluate(model, game, method="naive", batch_size=64, max_memory=budget, progress=False)
    assert torch.allclose(v, reference, atol=1e-5)
    assert tracked.peak <= budget, (tracked.peak, budget)


def test_naive_refuses_a_max_memory_below_one_variant():
    """A ``max_memory`` smaller than one variant's forward: the naive engine ran it anyway, one variant per batch,
    silently above the budget (2.5x on a 223-token prompt); now a ValueError that says how much one variant needs
    and what the budget is (``method='auto'`` after the trie's refusal too)."""
    from sftint_fast.engine.naive import sequence_bytes

    model = tiny_model("llama")
    game = Game.from_text(model, TOK, TEXT_A, players=[0, 2], target="mat")
    needed = sequence_bytes(model, game)
    with pytest.raises(ValueError, match=rf"needs about .*\({needed} bytes\).*max_memory is .*\({needed - 1} bytes\)"):
        sf.evaluate(model, game, method="naive", max_memory=needed - 1, progress=False)
    assert sf.evaluate(model, game, method="naive", max_memory=needed, progress=False).shape == (4,)


@pytest.mark.parametrize("method", ["naive", "trie"])
def test_wide_gelu_new_mlp_stays_within_max_memory(method):
    """A GPT-2 with a wide MLP (``n_inner`` = 16 x ``n_embd``): the memory estimates counted 3 MLP-wide tensors per
    token, but ``gelu_new`` (a chain of elementwise ops) keeps 4 alive (its input, ``0.5 * x`` and two temporaries),
    so a budget just above the estimate ran 1.13x (naive) and 1.19x (trie) over ``max_memory`` in live tensors. The
    adapters now carry the MLP's live tensors in ``ModelDims.mlp_tensors`` (4 here, 3 for a gated SiLU MLP)."""
    import re

    from sftint_fast.engine.naive import sequence_bytes
    from sftint_fast.engine.plan import TrieMemoryError, plan_trie

    model = tiny_model("gpt2", n_inner=512)
    text = "the cat sat on the mat and the dog sat on the rug while the bird sat on the tree near the house by the mat"
    game = Game.from_text(model, TOK, text, players=[0, 1, 2], target="mat")
    if method == "naive":
        needed = sequence_bytes(model, game)
    else:
        with pytest.raises(TrieMemoryError) as refused:
            plan_trie(game, model=model, max_memory=1)
        needed = int(re.search(r"needs at least .*?\((\d+) bytes\)", str(refused.value)).group(1))
    budget = needed + needed // 20
    reference = sf.evaluate(model, game, method="naive", progress=False)
    with _LiveBytes() as tracked:
        v = sf.evaluate(model, game, method=method, max_memory=budget, attention_backend="torch", progress=False)
    assert torch.allclose(v, reference, atol=1e-5)
    assert tracked.peak <= budget, (tracked.peak, budget)


def test_soft_capped_attention_stays_within_max_memory():
    """Gemma-2's attention logit soft-cap: the trie's torch attention computes the capped scores in steps, as eager
    attention does (three score-sized float32 tensors and the K/V repeated to every head), where the plan counted one
    (SDPA's): on a 120-token prompt with 8 heads a budget 5% above the plan's need ran 1.86x over ``max_memory`` in
    live tensors. ``ModelDims.softcap`` now makes the plan count them."""
    import re

    from conftest import tiny_gemma2

    from sftint_fast.engine.plan import TrieMemoryError, plan_trie

    model = tiny_gemma2(num_attention_heads=8, num_key_value_heads=2)
    game = Game(input_ids=torch.randint(3, 128, (120,), generator=torch.Generator().manual_seed(0)),
                player_spans=((2, 3), (10, 12), (20, 21), (30, 31)), words=("a", "b", "c", "d"),
                target=torch.tensor([5]), baseline=torch.zeros(32), prompt_length=120)
    with pytest.raises(TrieMemoryError) as refused:
        plan_trie(game, model=model, max_memory=1)
    needed = int(re.search(r"needs at least .*?\((\d+) bytes\)", str(refused.value)).group(1))
    budget = needed + needed // 20
    reference = sf.evaluate(model, game, method="naive", progress=False)
    with _LiveBytes() as tracked:
        v = sf.evaluate(model, game, method="trie", max_memory=budget, attention_backend="torch", progress=False)
    assert torch.allclose(v, reference, atol=1e-5)
    assert tracked.peak <= budget, (tracked.peak, budget)


@pytest.mark.parametrize("arch, experts", [("mixtral", "eager"), ("mixtral", "grouped_mm"), ("mixtral", "batched_mm"),
                                           ("qwen2_moe", "grouped_mm")])
def test_moe_trie_stays_within_max_memory(arch, experts):
    """A MoE model with wide experts (512, 8 of them, top-4): counted as a dense MLP of the experts' width
    (3 widths a token) a budget just above the estimate ran 1.14x (eager's loop over the experts), 4.1x (grouped_mm:
    every token's 4 expert rows at once) and 93x (batched_mm: each row gathers its expert's weights) over
    ``max_memory`` in live tensors. The adapter now counts the sparse block's peak per implementation."""
    import re

    from conftest import tiny_moe_config
    from transformers import AutoModelForCausalLM

    from sftint_fast.engine.plan import TrieMemoryError, plan_trie

    torch.manual_seed(0)
    wide = ({"intermediate_size": 512, "num_local_experts": 8} if arch == "mixtral" else
            {"moe_intermediate_size": 512, "num_experts": 8, "decoder_sparse_step": 1})
    cfg = tiny_moe_config(arch, vocab_size=128, pad_token_id=0, num_experts_per_tok=4, **wide)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation=experts).eval()
    text = "the cat sat on the mat and the dog sat on the rug while the bird sat on the tree near the house by the mat"
    game = Game.from_text(model, TOK, text, players=[0, 1, 2], target="mat")
    with pytest.raises(TrieMemoryError) as refused:
        plan_trie(game, model=model, max_memory=1)
    needed = int(re.search(r"needs at least .*?\((\d+) bytes\)", str(refused.value)).group(1))
    budget = needed + needed // 20
    reference = sf.evaluate(model, game, method="naive", progress=False)
    with _LiveBytes() as tracked:
        v = sf.evaluate(model, game, method="trie", max_memory=budget, attention_backend="torch", progress=False)
    assert torch.allclose(v, reference, atol=1e-5)
    assert tracked.peak <= budget, (tracked.peak, budget)


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_naive_batches_of_a_moe_model_stay_within_max_memory(experts):
    """The naive engine's per-variant estimate counted a MoE model's MLP as a dense one of the experts' width: a budget
    of 4 variants ran over ``max_memory`` in live tensors (batched_mm gathers each token's top-k experts' weights).
    It counts the sparse block's peak now, as the trie's plan does."""
    from conftest import tiny_moe_config
    from transformers import AutoModelForCausalLM

    from sftint_fast.engine.naive import sequence_bytes

    torch.manual_seed(0)
    cfg = tiny_moe_config("mixtral", vocab_size=128, pad_token_id=0, num_experts_per_tok=4, intermediate_size=512,
                          num_local_experts=8)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation=experts).eval()
    game = Game.from_text(model, TOK, "the cat sat on the mat and the dog sat on the rug", players=[0, 1, 2],
                          target="mat")
    budget = 4 * sequence_bytes(model, game)
    budget += budget // 20
    with _LiveBytes() as tracked:
        sf.evaluate(model, game, method="naive", max_memory=budget, progress=False)
    assert tracked.peak <= budget, (tracked.peak, budget)


@pytest.mark.parametrize("arch", ["qwen3", "olmo2", "phi3"])
def test_naive_batches_of_wide_heads_stay_within_max_memory(arch):
    """Heads wider than the hidden size (heads x head_dim = 8 x hidden here; Qwen3-0.6B's is 2x): the naive engine's
    per-variant estimate counted 8 hidden-wide tensors per token, and a budget of 4 variants ran 1.9-2.1x over in live
    tensors. The q / attention output width is counted now."""
    from sftint_fast.engine.naive import sequence_bytes

    model = tiny_model(arch, head_dim=64)
    game = Game(input_ids=torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(0)),
                player_spans=((2, 3), (10, 12), (20, 21), (30, 31)), words=("a", "b", "c", "d"),
                target=torch.tensor([5]), baseline=torch.zeros(32), prompt_length=40)
    budget = 4 * sequence_bytes(model, game)
    budget += budget // 20
    with _LiveBytes() as tracked:
        sf.evaluate(model, game, method="naive", max_memory=budget, progress=False)
    assert tracked.peak <= budget, (tracked.peak, budget)


@pytest.mark.parametrize("arch, act, expected", [("llama", "silu", 3), ("llama", "gelu_pytorch_tanh", 3),
                                                 ("llama", "gelu_new", 4), ("gpt2", "gelu_new", 4),
                                                 ("gpt2", "relu", 3), ("gpt2", "gelu_fast", 5),
                                                 ("phi3", "silu", 4), ("phi3", "gelu_new", 5)])
def test_mlp_tensors_follow_the_activation(arch, act, expected):
    """The MLP-wide tensors the memory estimates count: 3 for a gated MLP with a one-kernel activation (the Llama
    estimates are unchanged), more for an activation written as a chain of ops, whatever the architecture, and one
    more for Phi-3's fused gate and up projection (its two-wide output lives until the product)."""
    from sftint_fast.engine.adapters import get_adapter

    model = tiny_model(arch, **({"activation_function": act} if arch == "gpt2" else {"hidden_act": act}))
    assert get_adapter(model).dims.mlp_tensors == expected


def _one_token_players(n):
    spans = tuple((i, i + 1) for i in range(n))
    return Game(input_ids=torch.randint(3, 128, (n + 3,), generator=torch.Generator().manual_seed(n)),
                player_spans=spans, words=tuple(f"w{i}" for i in range(n)), target=torch.tensor([5]),
                baseline=torch.zeros(32), prompt_length=n + 3)


def test_naive_engine_refuses_more_variants_than_max_variants(monkeypatch):
    """All 2^n variants at n=24..30 went to the naive engine one forward each (2^30 = a billion forwards: it never
    ended, without a word; method='auto' fell back to it when the trie's memory check refused, warning only
    'slower'). Refused now before any forward, saying how many forwards it would need and how to sample or override;
    auto's fallback warning states the count."""
    from sftint_fast.engine import plan

    net = tiny_model("llama")
    game = _one_token_players(24)
    with pytest.raises(ValueError, match=f"{1 << 24} forward passes.*max_variants={1 << 20}.*subsets="):
        sf.evaluate(net, game, method="naive", progress=False)

    def refuse(*args, **kwargs):
        raise plan.TrieMemoryError("the trie needs more than max_memory")

    monkeypatch.setattr("sftint_fast.engine.trie.plan_trie", refuse)
    with pytest.raises(ValueError, match=f"method='auto': the trie needs more.*{1 << 24} forward passes"):
        sf.evaluate(net, game, progress=False)
    small = _one_token_players(3)
    with pytest.raises(ValueError, match="8 variants of a game need 8 forward passes \\(one sequence each\\), more "
                                         "than max_variants=4"):
        sf.evaluate(net, small, progress=False, max_variants=4)
    with pytest.warns(UserWarning, match="falling back to the naive engine \\(8 forward passes"):
        v = sf.evaluate(net, small, progress=False, max_variants=8)
    assert v.shape == (8,)
    # the limit is per game: prompts at a practical n are many forwards in all, as their caller chose
    both = sf.evaluate_games(net, [small, small], method="naive", progress=False, max_variants=8)
    assert [x.shape for x in both] == [(8,), (8,)] and torch.equal(both[0], v)
    sampled = sf.evaluate(net, game, method="naive", subsets=torch.tensor([0, (1 << 24) - 1]), progress=False)
    assert sampled.shape == (2,)
    with pytest.raises(ValueError, match="max_variants: expected None or an int >= 1"):
        sf.evaluate(net, small, method="naive", max_variants=0, progress=False)
