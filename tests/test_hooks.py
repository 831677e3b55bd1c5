"""Forward hooks on the model: the naive engine runs them (it calls the model's forward); the trie engine calls the
layers' parts itself and used to skip them silently (a steering hook on a decoder layer changed the naive values, not
the trie's). A model with a user's hook now has no trie adapter: method="auto" runs naive with a warning naming the
hooks, method="trie" refuses. The hooks transformers (and PEFT) install themselves keep the trie on."""
import functools
import types
import warnings

import pytest
import torch
from conftest import MOE_ARCHS, tiny_model
from test_trie import make_game

import sftint_fast as sf
from sftint_fast.engine.adapters import find_adapter, user_hooks


def _steer(width: int, seed: int = 3):
    vector = torch.randn(width, generator=torch.Generator().manual_seed(seed))

    def steer(module, args, output):  # activation steering: a vector added to the module's output
        if isinstance(output, tuple):
            return (output[0] + vector,) + output[1:]
        return output + vector

    return steer


def _scale_input(module, args, kwargs):  # a pre-hook with kwargs: the attention's input halved
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 0.5}
    return (args[0] * 0.5,) + args[1:], kwargs


def _last_position(module, args, output):  # reads positions: [batch, seq, hidden] in the model's forward
    output = output.clone()
    output[:, -1] += 1.0
    return output


def _zero_head(module, args):  # zeroes head 1 of the attention's output (the o_proj input)
    x = args[0].clone()
    x[..., 8:16] = 0
    return (x,)


def _register(model, case: str):
    width = model.config.hidden_size
    if case == "layer_steering":
        return model.model.layers[0].register_forward_hook(_steer(width))
    if case == "gpt2_block_steering":
        return model.transformer.h[0].register_forward_hook(_steer(width))
    if case == "gpt_neox_layer_steering":
        return model.gpt_neox.layers[0].register_forward_hook(_steer(width))
    if case == "gpt_neox_dropout_steering":  # identity in eval mode, and not run by the trie
        return model.gpt_neox.layers[1].post_attention_dropout.register_forward_hook(_steer(width))
    if case == "attention_pre_hook_with_kwargs":
        return model.model.layers[1].self_attn.register_forward_pre_hook(_scale_input, with_kwargs=True)
    if case == "mlp_steering":
        return model.model.layers[0].mlp.register_forward_hook(_steer(width), always_call=True)
    if case == "norm_steering":
        return model.model.layers[1].input_layernorm.register_forward_hook(_steer(width))
    if case == "inner_model_steering":
        return model.model.register_forward_hook(
            lambda m, a, out: out.__class__(last_hidden_state=out.last_hidden_state * 1.5))
    if case == "o_proj_last_position":  # a module the trie calls, on flat [tokens, hidden] rows: other numbers
        return model.model.layers[0].self_attn.o_proj.register_forward_hook(_last_position)
    if case == "o_proj_zero_head":  # the trie would run this one right, but it cannot tell such hooks apart
        return model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(_zero_head)
    if case == "global_steering":
        layer = type(model.model.layers[0])
        steer = _steer(width)
        return torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, out: steer(m, a, out) if isinstance(m, layer) else None)
    raise ValueError(case)


CASES = {"layer_steering": ("llama", "model.layers.0: forward hook '_steer.<locals>.steer'"),
         "gpt2_block_steering": ("gpt2", "transformer.h.0: forward hook '_steer.<locals>.steer'"),
         "gpt_neox_layer_steering": ("gpt_neox", "gpt_neox.layers.0: forward hook '_steer.<locals>.steer'"),
         "gpt_neox_dropout_steering": ("gpt_neox", "gpt_neox.layers.1.post_attention_dropout: forward hook"),
         "attention_pre_hook_with_kwargs": ("qwen2", "model.layers.1.self_attn: forward pre-hook '_scale_input'"),
         "mlp_steering": ("llama", "model.layers.0.mlp: forward hook"),
         "norm_steering": ("llama", "model.layers.1.input_layernorm: forward hook"),
         "inner_model_steering": ("llama", "model: forward hook '_register.<locals>.<lambda>'"),
         "o_proj_last_position": ("llama", "model.layers.0.self_attn.o_proj: forward hook '_last_position'"),
         "o_proj_zero_head": ("llama", "model.layers.0.self_attn.o_proj: forward pre-hook '_zero_head'"),
         "global_steering": ("llama", "every module (global): forward hook '_register.<locals>.<lambda>'")}


@pytest.mark.parametrize("case", list(CASES))
def test_a_users_hook_sends_auto_to_the_naive_engine_and_trie_refuses(case):
    arch, named = CASES[case]
    model = tiny_model(arch, initializer_range=0.2)
    game = make_game("first_and_last")
    with torch.no_grad():
        plain = sf.evaluate(model, game, method="naive", progress=False)
        handle = _register(model, case)
        try:
            hooked = sf.evaluate(model, game, method="naive", progress=False)
            assert (hooked - plain).abs().max() > 1e-2  # the hook changes the model's numbers
            with pytest.warns(UserWarning, match="forward hooks that the trie engine would not run.*falling back"):
                auto = sf.evaluate(model, game, progress=False)
            with pytest.raises(ValueError, match="method='trie': .*has forward hooks") as error:
                sf.evaluate(model, game, method="trie", progress=False)
            with pytest.raises(ValueError, match="forward hooks"):
                sf.evaluate_many(model, [game, game], method="trie", progress=False)
            reason = find_adapter(model)[1]
        finally:
            handle.remove()
        assert named in reason and named in str(error.value)
        assert torch.equal(auto, hooked)  # the trie gave the unhooked values here
        # the hook removed: the trie is back, and equals the plain model
        torch.testing.assert_close(sf.evaluate(model, game, method="trie", progress=False), plain, atol=1e-5,
                                   rtol=1e-5)


def test_one_evaluate_checks_the_hooks_once_and_each_call_checks_them_anew(monkeypatch):
    """find_adapter's hook and forward checks walk every module (~3 ms on SmolLM2's 30 layers, 1.5% of an n=4
    evaluate): an evaluate runs them once (the trie takes the adapter the engine choice found; it ran them again),
    evaluate_many once to group the games and once per group (it ran them 1 + 2 per layout + 2 per group). Nothing
    is kept between calls: a hook registered after one evaluate sends the next to the naive engine."""
    from conftest import count_calls

    from sftint_fast.engine import adapters, trie

    model = tiny_model("llama", initializer_range=0.2)
    game, other = make_game("first_and_last"), make_game("first_and_last", seed=1)
    found = count_calls(monkeypatch, {"find_adapter": adapters})
    found_by_trie = count_calls(monkeypatch, {"find_adapter": trie})  # its own name for it, imported
    runs = count_calls(monkeypatch, {"evaluate_trie_games": trie})
    with torch.no_grad():
        plain = sf.evaluate(model, game, progress=False)
        assert (found["find_adapter"] + found_by_trie["find_adapter"], runs["evaluate_trie_games"]) == (1, 1)
        found["find_adapter"] = found_by_trie["find_adapter"] = 0
        sf.evaluate_many(model, [game, other], progress=False)  # one group: both games have one layout
        assert (found["find_adapter"] + found_by_trie["find_adapter"], runs["evaluate_trie_games"]) == (2, 2)
        handle = _register(model, "layer_steering")
        try:
            with pytest.warns(UserWarning, match="forward hooks that the trie engine would not run.*falling back"):
                hooked = sf.evaluate(model, game, progress=False)
        finally:
            handle.remove()
        assert runs["evaluate_trie_games"] == 2 and (hooked - plain).abs().max() > 1e-2  # naive, with the hook
        torch.testing.assert_close(sf.evaluate(model, game, progress=False), plain, atol=0, rtol=0)
        assert runs["evaluate_trie_games"] == 3  # the hook removed: the trie again
    with pytest.raises(TypeError, match="adapter: expected a .*Adapter or None, received str"):
        trie.evaluate_trie_games(model, [game], adapter="llama", progress=False)


def test_a_hooked_lora_model_falls_back_and_names_the_hook():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", initializer_range=0.2)
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False)).eval()
    game = make_game("n1")
    handle = model.base_model.model.model.layers[1].register_forward_hook(_steer(32))
    try:
        with torch.no_grad(), pytest.warns(UserWarning, match="base_model.model.model.layers.1: forward hook"):
            auto = sf.evaluate(model, game, progress=False)
        naive = sf.evaluate(model, game, method="naive", progress=False)
    finally:
        handle.remove()
    assert torch.equal(auto, naive)


def _gemma3():
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, num_hidden_layers=2, head_dim=8, max_position_embeddings=128,
                           pad_token_id=0, bos_token_id=2, eos_token_id=1, initializer_range=0.2, sliding_window=4)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def _lora(arch: str):
    peft = pytest.importorskip("peft")
    targets = {"gpt2": ["c_attn"], "gpt_neox": ["query_key_value", "dense_4h_to_h"],
               "phi3": ["qkv_proj", "gate_up_proj", "o_proj"]}.get(
        arch, ["q_proj", "v_proj", "down_proj"])
    config = peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False, fan_in_fan_out=arch == "gpt2",
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(tiny_model(arch, initializer_range=0.2), config).eval()


@pytest.mark.filterwarnings("ignore::UserWarning:peft")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "smollm3", "phi3", "gpt2", "gpt_neox", "gemma3",
                                  "lora_llama", "lora_gpt2", "lora_gpt_neox", "lora_phi3", "olmo2", "olmo3",
                                  "gemma2", *MOE_ARCHS])
def test_the_hooks_transformers_installs_keep_the_trie_on(arch):
    """transformers 5.x leaves output-recording hooks on the decoder layers and attention modules after a forward with
    output_hidden_states / output_attentions (and on MoE routers after output_router_logits);
    enable_input_require_grads (gradient checkpointing, also through PEFT) leaves one on the input embedding. They
    change no value: the trie stays on, equal to naive."""
    from conftest import tiny_gemma2

    model = _gemma3() if arch == "gemma3" else _lora(arch[5:]) if arch.startswith("lora_") else tiny_gemma2() if (
        arch == "gemma2") else tiny_model(arch, initializer_range=0.2)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    moe = arch in MOE_ARCHS
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, output_attentions=True,
                    **({"output_router_logits": True} if moe else {}))
    assert out.hidden_states is not None and out.attentions is not None
    if moe:  # the routers' recorders: on the modules the sparse blocks call
        assert len(out.router_logits) == sum(hasattr(block.mlp, "gate") for block in model.model.layers) >= 1
        assert all(block.mlp.gate._forward_hooks for block in model.model.layers if hasattr(block.mlp, "gate"))
    model.enable_input_require_grads()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks >= 1 + 2 * (model.config.num_hidden_layers)  # the recorders and the require-grads hook are there
    assert user_hooks(model) == []
    adapter, reason = find_adapter(model)
    assert adapter is not None, reason
    game = make_game("first_and_last")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning
        trie = sf.evaluate(model, game, method="trie", progress=False)
        auto = sf.evaluate(model, game, progress=False)
    naive = sf.evaluate(model, game, method="naive", progress=False)
    assert torch.equal(auto, trie)
    torch.testing.assert_close(trie, naive, atol=2e-5, rtol=1e-5)
    # and a forward with the recorders after the evaluations still records (nothing was removed)
    with torch.no_grad():
        again = model(input_ids=ids, output_hidden_states=True)
    assert len(again.hidden_states) == model.config.num_hidden_layers + 1


def test_library_hooks_are_told_apart_by_package_and_function_name():
    """The rule: a hook is the library's when its function (through partials and bound methods) lives in the package
    and has the name listed in LIBRARY_HOOKS; a user's function of the same name, or another function of the
    package, is not."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    model = tiny_model("llama")
    handle = model.model.embed_tokens.register_forward_hook(functools.partial(neftune_post_forward_hook))
    assert user_hooks(model) == []
    handle.remove()

    def make_inputs_require_grads(module, args, output):  # a user's function with a library hook's name
        return output * 2

    handle = model.model.embed_tokens.register_forward_hook(make_inputs_require_grads)
    name = "test_library_hooks_are_told_apart_by_package_and_function_name.<locals>.make_inputs_require_grads"
    assert user_hooks(model) == [f"model.embed_tokens: forward hook {name!r}"]
    handle.remove()


def test_flop_counter_keeps_the_trie_on():
    """FlopCounterMode installs torch's module tracker as global hooks (observers): counting the trie's FLOPs must
    count the trie's, not send it to the naive engine."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model("llama")
    game = make_game("spread_n5", seed=1)
    naive = sf.evaluate(model, game, method="naive", progress=False)
    with FlopCounterMode(display=False) as counter, warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        assert user_hooks(model) == []
        torch.testing.assert_close(sf.evaluate(model, game, method="trie", progress=False), naive, rtol=0, atol=1e-4)
    assert counter.get_total_flops() > 0


def test_trl_activation_offloading_keeps_the_trie_on(monkeypatch):
    """TRL's SFTTrainer(activation_offloading=True) leaves a pair of lambdas on the LM head (they enter and leave a
    no-op saved-tensors context: no value changes); they kept the whole tracking run on the naive engine."""
    offloading = pytest.importorskip("trl.models.activation_offloading")

    class NoAccelerator:  # OffloadActivations needs an accelerator; the hooks are what is tested here
        def __init__(self, **kwargs):
            pass

        def update_model_params(self, model):
            pass

    monkeypatch.setattr(offloading, "OffloadActivations", NoAccelerator)
    model = tiny_model("llama", initializer_range=0.2)
    offloading.get_act_offloading_ctx_manager(model=model)
    assert len(model.lm_head._forward_hooks) == len(model.lm_head._forward_pre_hooks) == 1
    assert user_hooks(model) == []
    game = make_game("first_and_last")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning
        trie = sf.evaluate(model, game, method="trie", progress=False)
    torch.testing.assert_close(trie, sf.evaluate(model, game, method="naive", progress=False), atol=2e-5, rtol=1e-5)
    # a lambda of another module (a user's) is still refused
    model.lm_head.register_forward_hook(lambda module, args, output: output * 2)
    assert len(user_hooks(model)) == 1


def test_trl_fused_lm_head_keeps_the_trie_on():
    """TRL's GRPOTrainer, RLOOTrainer and KTOTrainer bind a fused-LM-head forward onto the model they train
    (``add_fused_lm_head``): without ``fused_lm_head=True``, which no engine passes, it runs the model's own forward.
    It sent every tracked checkpoint of such a run to the naive engine; the same forward around a forward set on
    the instance (a user's) still turns the trie off."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model = tiny_model("llama", initializer_range=0.2)
    game = make_game("first_and_last")
    reference = sf.evaluate(model, game, method="naive", progress=False)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    assert "forward" in model.__dict__
    adapter, reason = find_adapter(model)
    assert adapter is not None, reason
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning
        trie = sf.evaluate(model, game, method="trie", progress=False)
    naive = sf.evaluate(model, game, method="naive", progress=False)
    torch.testing.assert_close(naive, reference, rtol=0, atol=0)
    torch.testing.assert_close(trie, naive, atol=2e-5, rtol=1e-5)
    other = tiny_model("llama", initializer_range=0.2)
    own = other.forward
    other.forward = lambda *args, **kwargs: own(*args, **kwargs)  # a user's forward around the model's
    trl_utils.add_fused_lm_head(other)
    adapter, reason = find_adapter(other)
    assert adapter is None and "replaced forwards" in reason


class _SteeredMLP(torch.nn.Module):  # a module swapped in for another class: the decoder layer's MLP, steered
    def __init__(self, mlp, vector):
        super().__init__()
        self.inner, self.vector = mlp, vector

    def forward(self, x):
        return self.inner(x) + self.vector


def _replace(model, case: str):
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    if case == "gpt2_block_instance":
        module = model.transformer.h[0]
    elif case == "gpt_neox_attention_instance":
        module = model.gpt_neox.layers[1].attention
    elif case == "gpt_neox_layer_subclass":
        module = model.gpt_neox.layers[0]
    elif case == "gpt_neox_dropout_swapped":
        module = None
    elif case == "outer_model_instance":
        module = model
    else:
        module = {"layer": model.model.layers[0], "attention": model.model.layers[1].self_attn,
                  "norm": model.model.layers[0].input_layernorm}.get(case.split("_")[0])
    if case == "gpt_neox_dropout_swapped":  # a steering module in the dropout's place: the trie skips the dropouts
        model.gpt_neox.layers[0].post_mlp_dropout = _SteeredMLP(model.gpt_neox.layers[0].post_mlp_dropout, vector)
        return "gpt_neox.layers.0.post_mlp_dropout: class _SteeredMLP"
    if case == "mlp_swapped":
        model.model.layers[0].mlp = _SteeredMLP(model.model.layers[0].mlp, vector)
        return "model.layers.0.mlp: class _SteeredMLP"
    if case in ("layer_subclass", "norm_class_patched", "gpt_neox_layer_subclass"):
        base = type(module)
        forward = lambda self, *args, **kwargs: _steer_output(base.forward(self, *args, **kwargs), vector)  # noqa
        if case == "norm_class_patched":  # a subclass of the same name: the fused op would stand in for it
            module.__class__ = type(base.__name__, (base,), {"forward": forward})
            return "model.layers.0.input_layernorm: class LlamaRMSNorm"
        module.__class__ = type("Steered", (base,), {"forward": forward})
        return f"{'gpt_neox' if case.startswith('gpt_neox') else 'model'}.layers.0: class Steered"
    original = module.forward
    if case.endswith("method"):
        module.forward = types.MethodType(lambda self, *args, **kwargs: _steer_output(original(*args, **kwargs),
                                                                                      vector), module)
    else:
        module.forward = lambda *args, **kwargs: _steer_output(original(*args, **kwargs), vector)
    name = {"gpt2_block_instance": "transformer.h.0", "outer_model_instance": "LlamaForCausalLM",
            "gpt_neox_attention_instance": "gpt_neox.layers.1.attention",
            "attention_method": "model.layers.1.self_attn", "norm_instance": "model.layers.0.input_layernorm"}[case]
    return f"{name}: forward replaced on the instance"


def _steer_output(output, vector):
    if isinstance(output, tuple):
        return (output[0] + vector,) + output[1:]
    if hasattr(output, "logits"):
        output.logits = output.logits + torch.linspace(0, 1, output.logits.shape[-1])  # log-odds change
        return output
    return output + vector


REPLACED = {"gpt2_block_instance": "gpt2", "outer_model_instance": "llama", "attention_method": "llama",
            "norm_instance": "llama", "mlp_swapped": "llama", "layer_subclass": "llama", "norm_class_patched": "llama",
            "gpt_neox_attention_instance": "gpt_neox", "gpt_neox_layer_subclass": "gpt_neox",
            "gpt_neox_dropout_swapped": "gpt_neox"}


@pytest.mark.parametrize("case", list(REPLACED))
def test_a_replaced_forward_sends_auto_to_the_naive_engine_and_trie_refuses(case):
    """A forward replaced on a module instance, or a module of another class (swapped in, ``__class__`` set to a
    subclass overriding ``forward``), was silently skipped by the trie (max |trie - naive| 0.1 to 2 on these tiny
    models): now the trie refuses, naming it, and auto runs the naive engine."""
    model = tiny_model(REPLACED[case], initializer_range=0.2)
    game = make_game("first_and_last")
    with torch.no_grad():
        plain = sf.evaluate(model, game, method="naive", progress=False)
        named = _replace(model, case)
        replaced = sf.evaluate(model, game, method="naive", progress=False)
        assert (replaced - plain).abs().max() > 1e-2  # the replacement changes the model's numbers
        with pytest.warns(UserWarning, match="replaced forwards that the trie engine would not run.*falling back"):
            auto = sf.evaluate(model, game, progress=False)
        with pytest.raises(ValueError, match="method='trie': .*has replaced forwards") as error:
            sf.evaluate(model, game, method="trie", progress=False)
    assert named in str(error.value) and named in find_adapter(model)[1]
    assert torch.equal(auto, replaced)


def _library_case(case: str):
    model = tiny_model("llama", initializer_range=0.2)
    if case == "gradient_checkpointing":
        model.gradient_checkpointing_enable()
    elif case == "compiled_layer_forward":  # torch.compile of a module's own forward, set on the instance
        model.model.layers[0].forward = torch.compile(model.model.layers[0].forward, backend="eager")
    elif case == "own_forward_rebound":
        model.model.layers[0].mlp.forward = types.MethodType(type(model.model.layers[0].mlp).forward,
                                                             model.model.layers[0].mlp)
    elif case == "accelerate_hooks":  # device placement hooks on every module (accelerate sets them as forwards)
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map={"": "cpu"}, force_hooks=True)
    elif case == "accelerate_autocast":  # a Trainer's bf16 mixed precision wraps the forward (evaluations unwrap it)
        from accelerate import Accelerator

        model = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
    elif case == "lora_swapped_linears":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                           init_lora_weights=False)).eval()
    elif case == "norm_subclass":  # another class, run as its module (not fused): the trie runs its forward
        norm = model.model.layers[1].post_attention_layernorm
        base = type(norm)
        norm.__class__ = type("ScaledNorm", (base,), {"forward": lambda self, x: base.forward(self, x) * 2})
    return model


@pytest.mark.filterwarnings("ignore::UserWarning:peft")
@pytest.mark.parametrize("case", ["gradient_checkpointing", "compiled_layer_forward", "own_forward_rebound",
                                  "accelerate_hooks", "accelerate_autocast", "lora_swapped_linears", "norm_subclass"])
def test_forwards_that_libraries_set_keep_the_trie_on(case):
    """What libraries do to a model's forwards and classes that the trie runs the same: they stay on it."""
    model = _library_case(case)
    adapter, reason = find_adapter(model)
    assert adapter is not None, reason
    game = make_game("first_and_last")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning
        trie = sf.evaluate(model, game, method="trie", progress=False)
    torch.testing.assert_close(trie, sf.evaluate(model, game, method="naive", progress=False), atol=2e-5, rtol=1e-5)


def test_a_replaced_rope_function_gets_the_layout_the_attention_module_gives_it(monkeypatch):
    """Liger-Kernel's ``apply_liger_kernel_to_llama(rope=True)`` replaces the modeling code's
    ``apply_rotary_pos_emb`` with a function that assumes ``[batch, heads, seq, head_dim]`` and ignores
    ``unsqueeze_dim``. The trie called it on ``[1, tokens, heads, head_dim]`` with ``unsqueeze_dim=2`` (right for
    transformers' own function only): it now calls it as the attention module does."""
    from transformers.models.llama import modeling_llama

    def liger_like_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        assert q.dim() == 4 and q.shape[2] == cos.shape[1], "expects [batch, heads, seq, head_dim]"  # like Liger's
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # its own layout, whatever unsqueeze_dim says
        return ((q * cos) + (modeling_llama.rotate_half(q) * sin), (k * cos) + (modeling_llama.rotate_half(k) * sin))

    model = tiny_model("llama", initializer_range=0.2)
    game = make_game("first_and_last")
    with torch.no_grad():
        plain = sf.evaluate(model, game, method="naive", progress=False)
        monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", liger_like_rotary_pos_emb)
        naive = sf.evaluate(model, game, method="naive", progress=False)
        trie = sf.evaluate(model, game, method="trie", progress=False)
    torch.testing.assert_close(naive, plain, atol=1e-5, rtol=1e-5)  # the same rotation, in its own layout
    torch.testing.assert_close(trie, naive, atol=2e-5, rtol=1e-5)


def test_a_wrapped_function_is_named_as_itself_not_as_the_function_it_wraps():
    """``functools.wraps`` copies the wrapped function's name and module onto the wrapper: a forward replaced by a
    wrapper of the module's own forward was named ``...LlamaMLP.forward`` (the forward it replaced), and a user's
    hook wrapping a library hook (``@functools.wraps(neftune_post_forward_hook)``) passed as that library hook,
    keeping the trie on while it changed the values. Both are named by their own code and module now."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    original = mlp.forward

    @functools.wraps(original)
    def doubled(*args, **kwargs):
        return original(*args, **kwargs) * 2

    mlp.forward = doubled
    reason = find_adapter(model)[1]
    own = f"{__name__}.test_a_wrapped_function_is_named_as_itself_not_as_the_function_it_wraps.<locals>.doubled"
    assert f"forward replaced on the instance by {own!r}" in reason
    del mlp.forward

    @functools.wraps(neftune_post_forward_hook)
    def steer(module, args, output):
        return output + 1.0

    model.model.embed_tokens.register_forward_hook(steer)
    name = "test_a_wrapped_function_is_named_as_itself_not_as_the_function_it_wraps.<locals>.steer"
    assert user_hooks(model) == [f"model.embed_tokens: forward hook {name!r}"]
    assert find_adapter(model)[0] is None


def test_a_class_forward_patched_with_a_functools_wraps_wrapper_turns_the_trie_off(monkeypatch):
    """Monkeypatching a class's forward with a ``functools.wraps`` wrapper (the usual idiom) copies the modeling
    code's ``__module__`` onto the wrapper, so the MLPs' patched forward passed as the modeling code's: the trie
    skipped it silently (its values differed from the naive engine's). The wrapper is told by its code; transformers'
    own decorators of the class forwards (deprecation, output checks) are looked through and keep the trie on."""
    model = tiny_model("llama", initializer_range=0.2)
    game = make_game("first_and_last")
    assert find_adapter(model)[0] is not None  # the modeling code's decorated forwards: the trie runs
    mlp_class = type(model.model.layers[0].mlp)
    original = mlp_class.forward

    @functools.wraps(original)
    def steered(self, x):
        return original(self, x) + 0.5

    monkeypatch.setattr(mlp_class, "forward", steered)
    adapter, reason = find_adapter(model)
    assert adapter is None and "model.layers.0.mlp: class LlamaMLP with the forward " in reason
    assert "<locals>.steered" in reason
    with pytest.warns(UserWarning, match="replaced forwards"):
        auto = sf.evaluate(model, game, progress=False)
    assert torch.equal(auto, sf.evaluate(model, game, method="naive", progress=False))
