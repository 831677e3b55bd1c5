"""PEFT (LoRA) models: the trie engine looks through ``PeftModel`` to the HF model, whose LoRA layers it runs as the
modules they replaced, so fine-tuning with LoRA gets the fast engine and exact values (the ``peft`` extra)."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_trie import make_game

import sftint_fast as sf
from sftint_fast.engine.adapters import find_adapter, get_adapter

peft = pytest.importorskip("peft", reason="the peft extra (pip install -e '.[peft]')")

TARGETS = {"llama": ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], "qwen2": ["q_proj", "k_proj", "up_proj"],
           "gpt2": ["c_attn", "c_fc"], "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h"]}


def lora(arch: str, *, task_type: str | None = "CAUSAL_LM"):
    base = tiny_model(arch, initializer_range=0.2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False,
                             fan_in_fan_out=arch == "gpt2", task_type=task_type)
    torch.manual_seed(1)
    return peft.get_peft_model(base, config).eval()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("masking", ["embedding", "attention"])
def test_trie_on_a_lora_model_matches_naive(arch, masking):
    model = lora(arch)
    assert get_adapter(model) is not None
    game = make_game("spread_n5", masking=masking, seed=4)
    with torch.no_grad():
        trie = sf.evaluate(model, game, method="trie", progress=False)
        naive = sf.evaluate(model, game, method="naive", progress=False)
        with model.disable_adapter():
            base = sf.evaluate(model, game, method="trie", progress=False)
            base_naive = sf.evaluate(model, game, method="naive", progress=False)
    torch.testing.assert_close(trie, naive, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(base, base_naive, atol=2e-5, rtol=1e-5)
    assert (trie - base).abs().max() > 1e-2  # the LoRA weights are in the trie's numbers


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_plain_peft_model_and_a_ddp_like_wrapper_are_looked_through():
    model = lora("llama", task_type=None)  # PeftModel, not PeftModelForCausalLM
    assert type(model).__name__ == "PeftModel" and get_adapter(model) is not None
    wrapper = torch.nn.Module()
    wrapper.module = model.get_base_model()
    assert get_adapter(wrapper) is not None
    assert get_adapter(torch.nn.Linear(2, 2)) is None


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_auto_picks_the_trie_and_the_heldout_loss_keeps_answer_positions_on_a_lora_model():
    import warnings

    from sftint_fast.sft import tracker as tracker_module

    model = lora("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "no trie adapter ...; falling back to the naive engine"
        assert sf.engine._choose_engine(model, "auto") == "trie"
    assert tracker_module._takes_logits_to_keep(model)  # PeftModelForCausalLM passes **kwargs on
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 6:] = ids[:, 6:]
    with torch.no_grad():
        loss, count = tracker_module.causal_lm_loss(model, ids, labels)
        logits = model(input_ids=ids).logits.float()
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum").item()
    assert count == 8 and loss == pytest.approx(full, rel=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_lora_model_prepared_for_bf16_mixed_precision_is_evaluated_without_its_autocast():
    """``Accelerator.prepare`` wraps the ``PeftModel``'s forward in bf16 autocast (a ``Trainer`` with ``bf16=True``):
    the naive engine ran the LoRA model in bf16 (|dv| ~ 0.05 from float32), the trie did not."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = lora("llama")
    game = make_game("spread_n5", seed=4)
    want = sf.evaluate(model, game, method="naive", progress=False)
    AcceleratorState._reset_state(reset_partial_state=True)  # a Trainer of an earlier test leaves its own
    try:
        prepared = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
        assert "_original_forward" in prepared.__dict__
        for method in ("naive", "trie"):
            torch.testing.assert_close(sf.evaluate(prepared, game, method=method, progress=False), want,
                                       atol=2e-5, rtol=1e-5)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_prompt_tuning_model_is_not_run_by_the_trie_which_would_drop_its_virtual_tokens():
    """A prompt-tuning ``PeftModel`` prepends learned virtual tokens in its forward; the trie looked through it to the
    base model and returned the base model's values (|dv| ~ 0.8 from its own), silently: a prompt-tuning run tracked
    with the callback showed no change at all. The trie refuses it; ``"auto"`` runs its forward (naive)."""
    base = tiny_model("llama", initializer_range=0.2)
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    game = make_game("spread_n5", seed=4)
    naive = sf.evaluate(model, game, method="naive", progress=False)
    with model.disable_adapter():
        assert (sf.evaluate(model, game, method="naive", progress=False) - naive).abs().max() > 1e-2
    adapter, reason = find_adapter(model)
    assert adapter is None and "prompt-learning adapter PROMPT_TUNING" in reason
    with pytest.raises(ValueError, match="prompt-learning adapter PROMPT_TUNING"):
        sf.evaluate(model, game, method="trie", progress=False)
    with pytest.warns(UserWarning, match="falling back to the naive engine"):
        torch.testing.assert_close(sf.evaluate(model, game, progress=False), naive)
    lora_model = lora("llama")
    assert find_adapter(lora_model)[0] is not None  # a weight adapter stays on the trie


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe"])
@pytest.mark.parametrize("target", ["attention", "experts", "router"])
def test_a_lora_on_a_moe_model_runs_on_the_trie_or_is_refused_naming_it(arch, target):
    """A LoRA on a MoE model's attention projections runs on the trie, exact. PEFT wraps a LoRA on the experts' 3-D
    weights (``target_parameters``) or on the router (``target_modules=["gate"]``) in a ``lora.ParamWrapper``, which
    the adapter does not run: it is refused, never skipped (auto: the naive engine, same values). The reason said
    the block was "neither a gated MLP nor a sparse MoE block" (the wrapper hides the experts' attributes); it now
    names the wrapper and what it adapts."""
    options = {"attention": {"target_modules": ["q_proj", "v_proj", "o_proj"]},
               "experts": {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
               "router": {"target_modules": ["gate"]}}[target]
    base = tiny_model(arch, initializer_range=0.2)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options)).eval()
    game = make_game("spread_n5", seed=4)
    with torch.no_grad():
        naive = sf.evaluate(model, game, method="naive", progress=False)
        with model.disable_adapter():
            assert (sf.evaluate(model, game, method="naive", progress=False) - naive).abs().max() > 1e-2
    adapter, reason = find_adapter(model)
    if target == "attention":
        assert adapter is not None
        torch.testing.assert_close(sf.evaluate(model, game, method="trie", progress=False), naive,
                                   atol=2e-5, rtol=1e-5)
        return
    wrapped = "gate" if target == "router" else "experts"
    layer = 1 if arch == "qwen2_moe" else 0  # (Qwen2-MoE's first sparse layer)
    assert adapter is None and f"layer {layer}'s mlp.{wrapped} is a PEFT ParamWrapper" in reason, reason
    with pytest.warns(UserWarning, match="falling back to the naive engine"):
        torch.testing.assert_close(sf.evaluate(model, game, progress=False), naive)
