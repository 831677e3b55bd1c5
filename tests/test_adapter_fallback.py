"""When the trie has no adapter for a model, or its adapter cannot read the model's code (a transformers release
that changed it): method="auto" says why and runs the naive engine (same values), method="trie" refuses with the
reason."""
import pytest
import torch
from conftest import tiny_model
from test_naive import TEXT_A, TOK

import sftint_fast as sf
from sftint_fast.engine.adapters import find_adapter, get_adapter
from sftint_fast.engine.adapters.llama import LlamaLikeAdapter
from sftint_fast.game import Game


def _opt():
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_an_architecture_without_adapter_runs_naive_and_says_so():
    model = _opt()
    adapter, reason = find_adapter(model)
    assert adapter is None and get_adapter(model) is None
    assert reason == ("no trie adapter for OPTForCausalLM (model_type 'opt'; supported: llama, qwen2, qwen3, "
                      "mistral, gemma3_text, smollm3, phi3, gpt2, gpt_neox, olmo2, olmo3, gemma2, qwen3_moe, mixtral, "
                      "olmoe, qwen2_moe, gemma, granite, gpt_oss, ministral, seed_oss, arcee, nemotron, starcoder2, "
                      "helium, ernie4_5, glm, apertus, glm4, stablelm, cohere, cohere2, exaone4)")
    game = Game.from_text(model, TOK, TEXT_A)
    with torch.no_grad():
        naive = sf.evaluate(model, game, method="naive", progress=False)
        with pytest.warns(UserWarning, match="no trie adapter for OPTForCausalLM .*falling back to the naive engine"):
            auto = sf.evaluate(model, game, progress=False)
    assert torch.equal(auto, naive)
    with pytest.raises(ValueError, match=r"method='trie': no trie adapter for OPTForCausalLM .*use method='naive'"):
        sf.evaluate(model, game, method="trie", progress=False)


def test_an_adapter_that_cannot_read_the_model_code_falls_back_with_the_reason(monkeypatch):
    import transformers

    model = tiny_model("llama")
    game = Game.from_text(model, TOK, TEXT_A)
    with torch.no_grad():
        trie = sf.evaluate(model, game, method="trie", progress=False)
        naive = sf.evaluate(model, game, method="naive", progress=False)

    def changed_model_code(self, model):  # what transformers 5.25 did to apply_rotary_pos_emb, before the fix
        raise AttributeError("'Func' object has no attribute '__name__'")

    monkeypatch.setattr(LlamaLikeAdapter, "__init__", changed_model_code)
    adapter, reason = find_adapter(model)
    assert adapter is None
    assert reason == (f"the LlamaLikeAdapter could not read this LlamaForCausalLM (model_type 'llama', transformers "
                      f"{transformers.__version__}): AttributeError: 'Func' object has no attribute '__name__'")
    with torch.no_grad(), pytest.warns(UserWarning, match="could not read this LlamaForCausalLM.*falling back"):
        auto = sf.evaluate(model, game, progress=False)
    assert torch.equal(auto, naive)
    torch.testing.assert_close(auto, trie, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="method='trie': the LlamaLikeAdapter could not read this LlamaForCausalLM"):
        sf.evaluate(model, game, method="trie", progress=False)
    from sftint_fast.engine.trie import evaluate_trie_games

    with pytest.raises(ValueError, match="could not read this LlamaForCausalLM.*use method='naive'"):
        evaluate_trie_games(model, [game], progress=False)


def _gemma3_with_attention_softcap():
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, num_hidden_layers=2, head_dim=8, max_position_embeddings=128,
                           pad_token_id=0, bos_token_id=2, eos_token_id=1, initializer_range=0.2,
                           attn_logit_softcapping=0.5)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def test_an_attention_softcap_the_model_applies_is_refused_not_dropped(monkeypatch):
    model = _gemma3_with_attention_softcap()
    game = Game.from_text(model, TOK, TEXT_A)
    attention = type(model.model.layers[0].self_attn)
    # this transformers' Gemma-3 ignores attn_logit_softcapping: the adapter runs and equals the model
    assert find_adapter(model)[0] is not None
    with torch.no_grad():
        naive = sf.evaluate(model, game, method="naive", progress=False)
        trie = sf.evaluate(model, game, method="trie", progress=False)
    torch.testing.assert_close(trie, naive, atol=1e-5, rtol=1e-5)

    original = attention.forward

    def forward(self, *args, **kwargs):  # a release whose attention passes softcap=self.attn_logit_softcapping
        return original(self, *args, **kwargs)

    monkeypatch.setattr(attention, "forward", forward)
    adapter, reason = find_adapter(model)
    assert adapter is None and "logit soft-cap (attn_logit_softcapping=0.5)" in reason
    with torch.no_grad(), pytest.warns(UserWarning, match="soft-cap.*falling back to the naive engine"):
        auto = sf.evaluate(model, game, progress=False)
    assert torch.equal(auto, naive)


def test_a_gemma2_softcap_the_adapter_cannot_carry_is_refused(monkeypatch):
    """Gemma-2's soft-cap is carried where its attention passes ``softcap=self.attn_logit_softcapping`` and the
    model's attention implementation applies it; a model configured for SDPA (transformers' SDPA raises on a soft-cap;
    earlier releases dropped it) or a forward that passes the cap otherwise is refused, naming it."""
    from conftest import tiny_gemma2

    model = tiny_gemma2()
    assert [spec.softcap for spec in find_adapter(model)[0].layers] == [1.0, 1.0, 1.0]
    monkeypatch.setattr(model.config, "_attn_implementation", "sdpa")
    adapter, reason = find_adapter(model)
    assert adapter is None
    assert ("ValueError: its attention applies a logit soft-cap (attn_logit_softcapping=1.0) that its attention "
            "implementation 'sdpa' does not") in reason
    with pytest.raises(ValueError, match="`sdpa` attention does not support `softcap`"):  # nor does the model run
        model(input_ids=torch.tensor([[3, 4, 5]]))
    monkeypatch.setattr(model.config, "_attn_implementation", "eager")
    attention = type(model.model.layers[0].self_attn)
    original = attention.forward

    def forward(self, *args, **kwargs):  # a release whose attention passes softcap=2 * self.attn_logit_softcapping
        return original(self, *args, **kwargs)

    monkeypatch.setattr(attention, "forward", forward)
    adapter, reason = find_adapter(model)
    assert adapter is None
    assert "logit soft-cap (attn_logit_softcapping=1.0), which this adapter does not carry" in reason


@pytest.mark.parametrize("arch", ["gemma2", "gemma"])
def test_a_model_forward_that_scales_the_embeddings_is_refused(arch, monkeypatch):
    """transformers 4.x's Gemma-2 and Gemma multiplied the embedding's output by ``normalizer`` (sqrt(hidden_size))
    in the model's forward, where 5.x's embedding module scales it (the rows the trie's ``embed`` returns): such a
    forward is refused, not run without the scale."""
    from conftest import tiny_gemma2

    model = tiny_gemma2() if arch == "gemma2" else tiny_model("gemma", initializer_range=0.2)
    assert find_adapter(model)[0] is not None
    inner = type(model.model)
    original = inner.forward

    def forward(self, *args, **kwargs):  # hidden_states = hidden_states * normalizer, as transformers 4.x
        return original(self, *args, **kwargs)

    monkeypatch.setattr(inner, "forward", forward)
    adapter, reason = find_adapter(model)
    assert adapter is None and "scales the input embeddings itself (normalizer" in reason


@pytest.mark.parametrize("part", ["model", "inner", "layer"])
def test_a_granite_forward_that_applies_a_multiplier_otherwise_is_refused(part, monkeypatch):
    """Granite's adapter applies the embedding multiplier (the inner model's forward), the residual multiplier (the
    decoder layer's) and the logits scaling (the causal LM's) as transformers 5.x's forwards do: a release whose
    forward reads otherwise is refused, naming the op, and ``method="auto"`` runs it naive."""
    model = tiny_model("granite", initializer_range=0.2)
    game = Game.from_text(model, TOK, TEXT_A)
    assert find_adapter(model)[0] is not None
    with torch.no_grad():
        naive = sf.evaluate(model, game, method="naive", progress=False)
    cls = type({"model": model, "inner": model.model, "layer": model.model.layers[0]}[part])
    original = cls.forward

    def forward(self, *args, **kwargs):  # a release that applies its multiplier elsewhere, or not at all
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)
    adapter, reason = find_adapter(model)
    assert adapter is None
    assert reason.startswith("the GraniteAdapter could not read this GraniteForCausalLM (model_type 'granite'")
    assert f"ValueError: {cls.__name__}.forward does not read as transformers 5.x's Granite code" in reason
    with torch.no_grad(), pytest.warns(UserWarning, match="Granite code.*falling back to the naive engine"):
        auto = sf.evaluate(model, game, progress=False)
    assert torch.equal(auto, naive)


@pytest.mark.parametrize("option", ["softcap", "sliding_window"])
def test_a_gpt_neox_attention_passing_an_option_the_adapter_lacks_is_refused(option, monkeypatch):
    """GPT-NeoX's attention passes the attention function neither a logit soft-cap nor a sliding window (transformers
    4.56 to 5.25): a release whose forward passes one is refused, naming it, rather than computed without it."""
    model = tiny_model("gpt_neox", initializer_range=0.2)
    game = Game.from_text(model, TOK, TEXT_A)
    assert find_adapter(model)[0] is not None
    with torch.no_grad():
        naive = sf.evaluate(model, game, method="naive", progress=False)
    attention = type(model.gpt_neox.layers[0].attention)
    original = attention.forward

    def with_softcap(self, *args, **kwargs):  # a release whose attention passes softcap=self.softcap
        return original(self, *args, **kwargs)

    def with_window(self, *args, **kwargs):  # a release whose attention passes sliding_window=self.sliding_window
        return original(self, *args, **kwargs)

    monkeypatch.setattr(attention, "forward", with_softcap if option == "softcap" else with_window)
    adapter, reason = find_adapter(model)
    assert adapter is None
    assert reason.startswith("the GPTNeoXAdapter could not read this GPTNeoXForCausalLM (model_type 'gpt_neox'")
    assert (f"ValueError: its attention's forward (GPTNeoXAttention) passes {option} to the attention function, which "
            "this adapter does not carry over") in reason
    with torch.no_grad(), pytest.warns(UserWarning, match=f"passes {option}.*falling back to the naive engine"):
        auto = sf.evaluate(model, game, progress=False)
    assert torch.equal(auto, naive)


def _smollm3(**options):
    from transformers import AutoModelForCausalLM, SmolLM3Config

    torch.manual_seed(0)
    cfg = SmolLM3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=128, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, initializer_range=0.2, no_rope_layers=[1, 0], **options)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def test_a_smollm3_whose_layer_masks_and_attention_windows_disagree_is_refused():
    """SmolLM3 builds each layer's mask from layer_types, but gives its attention modules a window only with
    use_sliding_window: a sliding layer without it has SDPA's mask slide and flash attention's not. The adapter
    refuses it rather than pick one (auto: naive, the model's own forward)."""
    model = _smollm3(use_sliding_window=False, sliding_window=3, layer_types=["full_attention", "sliding_attention"])
    assert model.model.layers[1].self_attn.sliding_window is None
    game = Game.from_text(model, TOK, TEXT_A)
    assert game.input_ids.numel() > 3
    full = _smollm3(use_sliding_window=False, sliding_window=3, layer_types=["full_attention"] * 2)
    with torch.no_grad():  # the SDPA forward does slide: the module's window (None) would give other numbers
        ids = game.input_ids[None]
        assert not torch.allclose(model(input_ids=ids).logits, full(input_ids=ids).logits)
    adapter, reason = find_adapter(model)
    assert adapter is None and reason.startswith("the LlamaLikeAdapter could not read this SmolLM3ForCausalLM")
    assert ("ValueError: layer 1 is a 'sliding_attention' layer (config.layer_types), whose attention mask is a "
            "sliding window of 3 keys, but its attention module's sliding_window is None (use_sliding_window=False)"
            in reason)
    with torch.no_grad():
        naive = sf.evaluate(model, game, method="naive", progress=False)
        with pytest.warns(UserWarning, match="sliding_window is None.*falling back to the naive engine"):
            auto = sf.evaluate(model, game, progress=False)
    assert torch.equal(auto, naive)
    assert find_adapter(full)[0] is not None
    assert find_adapter(_smollm3(use_sliding_window=True, sliding_window=3))[0].layers[1].sliding_window == 3


def test_a_smollm3_attention_without_its_nope_switch_is_refused(monkeypatch):
    """The adapter reads each SmolLM3 attention module's use_rope (0 on NoPE layers): a release that renamed it would
    otherwise have every layer rotated."""
    model = _smollm3()
    assert [block.self_attn.use_rope for block in model.model.layers] == [1, 0]
    assert find_adapter(model)[0] is not None
    monkeypatch.delattr(model.model.layers[1].self_attn, "use_rope")
    adapter, reason = find_adapter(model)
    assert adapter is None and "SmolLM3ForCausalLM" in reason and "AttributeError" in reason and "use_rope" in reason


def test_a_model_split_over_devices_has_no_adapter():
    """A model whose layers sit on several devices (device_map over GPUs, offload) was accepted by the trie, which keeps
    its KV stores on the first parameter's device and calls the layers without accelerate's hooks: a device-mismatch
    error deep in torch. It has no adapter now (auto: naive, which runs the model's own forward)."""
    model = tiny_model("llama")
    assert find_adapter(model)[0] is not None
    model.model.layers[1].to("meta")  # a second device, as a GPU split would give (this machine has one)
    adapter, reason = find_adapter(model)
    assert adapter is None and "several devices (cpu, meta" in reason
    with pytest.raises(ValueError, match="several devices"):
        sf.engine._choose_engine(model, "trie")


def test_a_phi3_whose_fused_qkv_projection_is_not_split_by_its_head_counts_is_refused():
    """The Phi-3 adapter splits ``qkv_proj``'s output into q, k, v by the head counts, as the attention module does;
    a projection of another width would be split otherwise than the model (whose own forward fails on it)."""
    model = tiny_model("phi3", initializer_range=0.2)
    assert find_adapter(model)[0] is not None
    model.model.layers[1].self_attn.qkv_proj = torch.nn.Linear(32, 72, bias=False)
    adapter, reason = find_adapter(model)
    assert adapter is None
    assert reason.endswith("ValueError: layer 1's qkv_proj gives 72 features, expected (num_attention_heads 4 + 2 * "
                           "num_key_value_heads 2) * head_dim 8 = 64: the adapter would split it otherwise than the "
                           "model"), reason


def test_an_olmo3_whose_layer_masks_and_attention_windows_disagree_is_refused():
    """OLMo-3's forward picks each layer's mask by config.layer_types, its flash attention reads the attention
    module's sliding_window: where they disagree the adapter refuses the model (auto: naive)."""
    model = tiny_model("olmo3", initializer_range=0.2)
    assert find_adapter(model)[0].layers[0].sliding_window == 4
    model.model.layers[0].self_attn.sliding_window = None
    adapter, reason = find_adapter(model)
    assert adapter is None and reason.startswith("the OlmoAdapter could not read this Olmo3ForCausalLM")
    assert ("ValueError: layer 0 is a 'sliding_attention' layer (config.layer_types), whose attention mask is a "
            "sliding window of 4 keys, but its attention module's sliding_window is None" in reason)


@pytest.mark.parametrize("change", ["per_head_q_norm", "input_layernorm", "pre_feedforward_layernorm"])
def test_an_olmo_layer_the_adapter_does_not_run_as_written_is_refused(change):
    """The adapter runs OLMo's post-norm layers with q/k norms over the whole projection: a model code with a norm
    before the attention or the MLP, or per-head q/k norms (Qwen3's), is refused, naming it, not computed wrong."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    model = tiny_model("olmo2", initializer_range=0.2)
    assert find_adapter(model)[0] is not None
    block = model.model.layers[1]
    if change == "per_head_q_norm":
        block.self_attn.q_norm = Olmo2RMSNorm(block.self_attn.head_dim)
        expected = "layer 1's q_norm has weight shape (8,): expected (32,), a norm over the whole projection"
    else:
        setattr(block, change, Olmo2RMSNorm(32))
        expected = f"layer 1 (Olmo2DecoderLayer) has {change}: this adapter runs OLMo's post-norm layers"
    adapter, reason = find_adapter(model)
    assert adapter is None and reason.startswith("the OlmoAdapter could not read this Olmo2ForCausalLM")
    assert expected in reason


def _moe_layer_forward_of_transformers_4(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                                         use_cache=False, position_embeddings=None, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, position_embeddings=position_embeddings, **kwargs)
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states, _router_logits = self.block_sparse_moe(hidden_states)
    return residual + hidden_states


@pytest.mark.parametrize("change", ["olmoe_window", "per_head_q_norm", "layer_of_transformers_4", "unknown_mlp"])
def test_a_moe_model_the_adapter_does_not_run_as_written_is_refused(change):
    """What the MoE adapter cannot carry exactly is refused, naming it (auto: the naive engine, same values): an OLMoE
    window (its forward masks without one, its flash attention would apply it), q/k norms of another width than the
    model type's (OLMoE's span the projection), a decoder layer that unpacks (hidden, router_logits) from
    block_sparse_moe (transformers 4.x's Mixtral), an MLP that is neither a gated MLP nor a sparse block."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    model = tiny_model("mixtral" if change == "layer_of_transformers_4" else "olmoe", initializer_range=0.2)
    assert find_adapter(model)[0] is not None
    block = model.model.layers[1]
    if change == "olmoe_window":
        model.config.sliding_window = 4
        expected = "its config has sliding_window=4, which OLMoE's attention passes to flash attention"
    elif change == "per_head_q_norm":
        block.self_attn.q_norm = OlmoeRMSNorm(block.self_attn.head_dim)
        expected = "layer 1's q_norm has weight shape (8,): expected (32,), a norm over the whole projection"
    elif change == "layer_of_transformers_4":
        for layer in model.model.layers:
            base = type(layer)
            layer.__class__ = type(f"Old{base.__name__}", (base,), {"forward": _moe_layer_forward_of_transformers_4})
        expected = "does not call `hidden_states = self.mlp(hidden_states)` and take a tensor back"
    else:
        block.mlp = torch.nn.Identity()
        expected = "layer 1's mlp (Identity) is neither a gated MLP (gate_proj, up_proj, down_proj) nor a sparse MoE"
    adapter, reason = find_adapter(model)
    assert adapter is None and reason.startswith(f"the MoeAdapter could not read this {type(model).__name__}")
    assert expected in reason, reason
    if change == "olmoe_window":  # (the others are no models transformers runs)
        game = Game.from_text(model, TOK, TEXT_A)
        with torch.no_grad():
            naive = sf.evaluate(model, game, method="naive", progress=False)
            with pytest.warns(UserWarning, match="sliding_window=4"):
                auto = sf.evaluate(model, game, progress=False)
        assert torch.equal(auto, naive)
