"""The trie adapters of StableLM, Cohere, Cohere-2 and EXAONE-4 equal the naive engine (the model's own forward) on
tiny random models, each option of their layers exercised; dropping one of the ops they carry breaks the match."""
import pytest
import torch

from sftint_fast.engine.adapters import get_adapter
from sftint_fast.engine.naive import evaluate_naive
from sftint_fast.engine.trie import evaluate_trie
from sftint_fast.game import Game

_SHAPES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               initializer_range=0.2)
_SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])  # a window < the prompt
#: name → (config class, options): every option of each layer form, GQA throughout.
CONFIGS = {
    # sequential residual, per-head q/k LayerNorms, q/k/v biases, RoPE on half of each head
    "stablelm_qk_norm": ("StableLmConfig", dict(qk_layernorm=True, use_parallel_residual=False, use_qkv_bias=True,
                                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "partial_rotary_factor": 0.5})),
    # parallel residual (one LayerNorm per layer), no q/k norms, StableLM's default 0.25 rotary
    "stablelm_parallel": ("StableLmConfig", dict(qk_layernorm=False, use_parallel_residual=True)),
    "cohere_qk_norm": ("CohereConfig", dict(use_qk_norm=True, attention_bias=True, logit_scale=0.5)),
    "cohere": ("CohereConfig", dict(logit_scale=0.25)),
    "cohere2": ("Cohere2Config", dict(logit_scale=0.5, **_SLIDING)),  # a sliding RoPE layer, a full NoPE one
    "exaone4": ("Exaone4Config", dict(_SLIDING)),  # the same: its full layer takes no RoPE
    # RoPE on every layer (layer_types given: 5.25's config divides by a zero pattern without them)
    "exaone4_no_window": ("Exaone4Config", dict(sliding_window=None, layer_types=["full_attention"] * 2)),
}
SPANS = ((0, 1), (3, 5), (7, 8), (9, 11))


def tiny(name: str, attn: str = "eager") -> torch.nn.Module:
    import transformers

    cls, options = CONFIGS[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**_SHAPES, **options),
                                                          attn_implementation=attn).eval()
    with torch.no_grad():  # HF's constant norm weights (and zero biases) would hide a norm of another form
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.add_(0.5 * torch.randn_like(param))
    return model


def game(masking: str) -> Game:
    gen = torch.Generator().manual_seed(0)
    prompt, target = torch.randint(3, 128, (12,), generator=gen), torch.randint(3, 128, (1,), generator=gen)
    return Game(input_ids=prompt, player_spans=SPANS, words=tuple(f"w{i}" for i in range(len(SPANS))),
                target=target, baseline=torch.randn(32, generator=gen), masking=masking, prompt_length=12)


def both(model, masking: str) -> tuple[torch.Tensor, torch.Tensor]:
    subsets = torch.arange(1 << len(SPANS))
    with torch.no_grad():
        return (evaluate_trie(model, game(masking), subsets, progress=False),
                evaluate_naive(model, game(masking), subsets, progress=False))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_trie_matches_naive(name, attn):
    model = tiny(name, attn)
    assert get_adapter(model) is not None
    for masking in ("embedding", "attention"):
        trie, naive = both(model, masking)
        assert naive.std() > 1e-3  # the variants differ: a wrong one cannot hide in the tolerance
        torch.testing.assert_close(trie, naive, atol=2e-6, rtol=1e-5)


def _dropped(monkeypatch, cls, attr: str, value) -> None:
    """Builds ``cls``'s adapters with ``attr`` set to ``value(adapter)``: one op of the model's forward dropped."""
    init = cls.__init__

    def patched(self, model):
        init(self, model)
        setattr(self, attr, value(self))

    monkeypatch.setattr(cls, "__init__", patched)


def _flip(flags) -> tuple[bool, ...]:
    return tuple(not flag for flag in flags)


@pytest.mark.parametrize("name, cls, attr, value", [
    ("cohere", "cohere.CohereAdapter", "_logit_scale", lambda a: 1.0),
    ("cohere2", "cohere.CohereAdapter", "_rope_layers", lambda a: (True, True)),  # RoPE on the NoPE layer
    ("exaone4", "exaone4.Exaone4Adapter", "_rope_layers", lambda a: (True, True)),
    ("stablelm_qk_norm", "stablelm.StableLmAdapter", "_qk_norms", lambda a: _flip(a._qk_norms)),
    ("stablelm_qk_norm", "stablelm.StableLmAdapter", "_parallel", lambda a: _flip(a._parallel)),
])
def test_dropping_an_op_breaks_the_match(name, cls, attr, value, monkeypatch):
    import importlib

    module, cls_name = cls.split(".")
    _dropped(monkeypatch, getattr(importlib.import_module(f"sftint_fast.engine.adapters.{module}"), cls_name), attr,
             value)
    trie, naive = both(tiny(name), "embedding")
    assert not torch.allclose(trie, naive, atol=1e-4, rtol=1e-3)


def test_a_forward_that_reads_otherwise_is_refused(monkeypatch):
    """A release whose layer forward no longer computes what the adapter does: no adapter, the model runs naive."""
    from sftint_fast.engine.adapters import find_adapter, stablelm

    model = tiny("stablelm_parallel")
    monkeypatch.setattr(stablelm, "_STABLELM_OPS", stablelm._STABLELM_OPS + (("layer", r"no such op"),))
    adapter, reason = find_adapter(model)
    assert adapter is None and "StableLmDecoderLayer.forward does not read as transformers 5.x's StableLM" in reason
