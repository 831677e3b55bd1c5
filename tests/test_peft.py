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


#: LoRA placements on a MoE model: PEFT wraps a LoRA on the experts' 3-D weights (``target_parameters``) or on the
#: router (``target_modules=["gate"]``, not an ``nn.Linear``) in ``lora.ParamWrapper`` layers, nested one per parameter
MOE_LORA = {"attention": {"target_modules": ["q_proj", "v_proj", "o_proj"]},
            "experts": {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
            "router": {"target_modules": ["gate"]},
            "experts_router_attention": {"target_modules": ["gate", "q_proj"],
                                         "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}}


def moe_lora(arch: str, target: str, base=None, **options):
    base = tiny_model(arch, initializer_range=0.2) if base is None else base
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **MOE_LORA[target], **options)
    return peft.get_peft_model(base, config).eval()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe"])
@pytest.mark.parametrize("target", list(MOE_LORA))
@pytest.mark.parametrize("masking", ["embedding", "attention"])
def test_a_lora_on_a_moe_models_experts_or_router_runs_on_the_trie(arch, target, masking):
    """A LoRA on a MoE model's experts or router (``lora.ParamWrapper``) was refused by the trie (``auto`` fell back
    to the naive engine). The sparse block runs as its module, so its wrappers fold the LoRA into the weights for the
    call as the model's forward does: exact against the naive engine, and ``auto`` picks the trie."""
    import warnings

    model = moe_lora(arch, target)
    game = make_game("spread_n5", masking=masking, seed=4)
    adapter, reason = find_adapter(model)
    assert adapter is not None, reason
    with torch.no_grad():
        naive = sf.evaluate(model, game, method="naive", progress=False)
        trie = sf.evaluate(model, game, method="trie", progress=False)
        with model.disable_adapter():
            base = sf.evaluate(model, game, method="trie", progress=False)
            torch.testing.assert_close(base, sf.evaluate(model, game, method="naive", progress=False),
                                       atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(trie, naive, atol=2e-6, rtol=1e-6)
    assert (trie - base).abs().max() > 1e-2  # the LoRA weights are in the trie's numbers
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "no trie adapter ...; falling back to the naive engine"
        assert sf.engine._choose_engine(model, "auto") == "trie"
    if target == "attention":
        assert adapter.dims.forward_bytes == 0
    else:  # the adapted expert / router weights a block's forward holds are in the plan
        assert adapter.dims.forward_bytes > 0


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_a_merged_lora_on_a_moe_models_experts_runs_on_the_trie(arch):
    """``merge_adapter()`` folds the experts' and router's LoRA into their weights (the wrappers then run the base
    modules): the trie runs the merged model as its forward does, with the LoRA's values."""
    model = moe_lora(arch, "experts_router_attention")
    game = make_game("spread_n5", seed=4)
    with torch.no_grad():
        unmerged = sf.evaluate(model, game, method="naive", progress=False)
        model.merge_adapter()
        assert all(m.merged for m in model.modules() if type(m).__name__ == "ParamWrapper")
        trie = sf.evaluate(model, game, method="trie", progress=False)
        naive = sf.evaluate(model, game, method="naive", progress=False)
    torch.testing.assert_close(trie, naive, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(trie, unmerged, atol=2e-5, rtol=1e-5)  # (the merged weights round differently)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_dropout_on_a_moe_model_is_the_identity_in_the_engines():
    """A LoRA's dropout (on the attention projections: PEFT refuses it on the experts' ``ParamWrapper``) is the
    identity in eval mode, where both engines run a model left in training mode (and hand it back so)."""
    import copy

    base = tiny_model("mixtral", initializer_range=0.2)
    with pytest.raises(ValueError, match="lora_dropout"):
        moe_lora("mixtral", "experts", base=copy.deepcopy(base), lora_dropout=0.1)
    plain = moe_lora("mixtral", "attention", base=copy.deepcopy(base))
    model = moe_lora("mixtral", "attention", base=base, lora_dropout=0.5).train()
    game = make_game("spread_n5", seed=4)
    ids = game.input_ids[None]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, plain(input_ids=ids).logits)  # same LoRA
        assert (model.train()(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max() > 1e-2  # dropout on
    want = sf.evaluate(plain, game, method="naive", progress=False)
    for method in ("trie", "naive"):
        torch.testing.assert_close(sf.evaluate(model, game, method=method, progress=False), want,
                                   atol=2e-6, rtol=1e-6)
        assert model.training


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("arch, experts", [("mixtral", "eager"), ("mixtral", "grouped_mm"),
                                           ("qwen3_moe", "grouped_mm")])
def test_a_lora_on_moe_experts_stays_within_max_memory(arch, experts):
    """PEFT's ``ParamWrapper`` builds each adapted expert weight whole (``E x 2I x H`` and ``E x H x I``) on every call
    of a sparse block, alive through its forward. Uncounted, a budget 5% above the plan's need ran 3.5x (eager) and
    1.9x (grouped_mm) over ``max_memory`` in live tensors on the trie, and a naive budget of 4 variants 1.1x; the
    plan and the naive batch size count them now (``ModelDims.forward_bytes``)."""
    import re

    from conftest import tiny_moe_config
    from test_naive import TOK, _LiveBytes
    from transformers import AutoModelForCausalLM

    from sftint_fast.engine.naive import held_bytes, sequence_bytes
    from sftint_fast.engine.plan import TrieMemoryError, plan_trie
    from sftint_fast.game import Game

    torch.manual_seed(0)
    wide = ({"intermediate_size": 512, "num_local_experts": 8} if arch == "mixtral" else
            {"moe_intermediate_size": 512, "num_experts": 8, "mlp_only_layers": []})
    cfg = tiny_moe_config(arch, vocab_size=128, pad_token_id=0, num_experts_per_tok=4, **wide)
    base = AutoModelForCausalLM.from_config(cfg, experts_implementation=experts).eval()
    model = moe_lora(arch, "experts_router_attention", base=base)
    text = "the cat sat on the mat and the dog sat on the rug while the bird sat on the tree near the house by the mat"
    game = Game.from_text(model, TOK, text, players=[0, 1, 2], target="mat")
    with pytest.raises(TrieMemoryError) as refused:
        plan_trie(game, model=model, max_memory=1)
    needed = int(re.search(r"needs at least .*?\((\d+) bytes\)", str(refused.value)).group(1))
    budget = needed + needed // 20
    reference = sf.evaluate(model, game, method="naive", progress=False)
    with _LiveBytes() as tracked:
        v = sf.evaluate(model, game, method="trie", max_memory=budget, attention_backend="torch", progress=False)
    torch.testing.assert_close(v, reference, atol=2e-6, rtol=1e-6)
    assert tracked.peak <= budget, (tracked.peak, budget)
    budget = 4 * sequence_bytes(model, game) + held_bytes(model)
    budget += budget // 20
    with _LiveBytes() as tracked:
        sf.evaluate(model, game, method="naive", max_memory=budget, progress=False)
    assert tracked.peak <= budget, (tracked.peak, budget)


def test_peft_weight_bytes_count_three_parameters_without_peft_factors_path(monkeypatch):
    """A PEFT without ``_LoraFactorsProxy`` (before 0.22) builds a 3-D parameter's delta and the sum: three of its
    size, where 0.22's factors path holds one."""
    import peft.tuners.lora.layer as layer

    from sftint_fast.engine.adapters import moe

    if not hasattr(layer, "_LoraFactorsProxy"):
        pytest.skip("this PEFT has no factors path to compare with")
    model = moe_lora("qwen3_moe", "experts")
    block = next(m.mlp for m in model.get_base_model().model.layers)
    with_factors = moe.peft_weight_bytes(block)
    monkeypatch.delattr(layer, "_LoraFactorsProxy")
    assert with_factors > 0 and moe.peft_weight_bytes(block) == 3 * with_factors
