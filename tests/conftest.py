"""Shared fixtures and capability-based skip markers (defined once, here)."""
import os

import pytest
import torch

# Without CUDA, Triton kernels run only under the interpreter, which must be set before any @triton.jit is
# defined (sftint_fast imports its kernels lazily, so importing torch first is fine). With CUDA they compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sftint_fast import _ext  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    # Every kernel defined now, under the interpreter: a test that unsets TRITON_INTERPRET (to check the message
    # without it) would otherwise define the kernels it first imports as compiled ones for the rest of the process
    # ("0 active drivers" in whichever test of that pytest worker launches them next)
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        from sftint_fast.ops.triton import rms_norm, rope, silu_mul, subset_attention, transforms  # noqa: F401


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


#: Where tests that run Triton kernels put their tensors: compiled on CUDA, else interpreted on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the tests marked slow (minutes each on 2 CPU cores: a cold torch.compile)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow (minutes on 2 CPU cores); pytest --run-slow runs it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_ext = pytest.mark.skipif(not _ext.extension_status()[0], reason="needs the C++ extension sftint_fast._C")
requires_triton = pytest.mark.skipif(not _has_triton(), reason="needs triton (compiled on CUDA or TRITON_INTERPRET=1)")


def tiny_model(arch: str = "llama", *, seed: int = 0, attn: str = "eager", **overrides):
    """A tiny random-init decoder (~30k params) of the given architecture, in eval mode."""
    from transformers import (AutoModelForCausalLM, GemmaConfig, GPT2Config, GPTNeoXConfig, GraniteConfig, LlamaConfig,
                              Olmo2Config, Olmo3Config, Phi3Config, Qwen2Config, Qwen3Config, SmolLM3Config)

    torch.manual_seed(seed)
    common = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **common)
    elif arch == "qwen3":  # per-head q/k RMSNorms before RoPE
        cfg = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, max_position_embeddings=128, **common)
    elif arch == "smollm3":  # NoPE on every second layer (no_rope_layers [1, 0])
        cfg = SmolLM3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128, no_rope_layer_interval=2, **common)
    elif arch == "phi3":  # fused qkv and gate_up projections; RoPE on the first 6 of 8 head dims (as Phi-4-mini's 0.75)
        rope = {"rope_type": "default", "rope_theta": 10000.0,
                "partial_rotary_factor": overrides.pop("partial_rotary_factor", 0.75)}
        cfg = Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, rope_parameters=rope, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    elif arch == "gpt_neox":  # Pythia's layout: fused qkv, parallel residual, RoPE on half of each 8-wide head
        cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=128, rotary_pct=0.5, **common)
    elif arch == "olmo2":  # post-norm layers, q/k norms over the whole projection
        cfg = Olmo2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **common)
    elif arch == "olmo3":  # OLMo-2's layers, the first sliding (a window of 4, shorter than the tests' prompts)
        cfg = Olmo3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, sliding_window=4,
                          layer_types=["sliding_attention", "full_attention"], **common)
    elif arch == "gemma":  # (1 + w) RMSNorms (random w below), GELU-tanh MLP, the embedding scaled by sqrt(32)
        cfg = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, max_position_embeddings=128, **common)
    elif arch == "granite":  # Granite-3's multipliers, none of them 1 (and the attention's not head_dim ** -0.5)
        cfg = GraniteConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128, embedding_multiplier=4.0,
                            attention_multiplier=0.5, residual_multiplier=0.5, logits_scaling=2.0, **common)
    elif arch in LLAMA_LIKE_ARCHS:
        cfg = tiny_llama_like_config(arch, **common)
    elif arch in MOE_ARCHS:
        cfg = tiny_moe_config(arch, **common)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    if arch == "gemma":  # HF zeroes the norms' w, and (1 + w) would then hide a w-style norm
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.normal_(0.0, 0.5)
    if arch in LLAMA_LIKE_ARCHS:  # HF's constant norm weights (and biases) would hide a norm of another form
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm." in name:
                    param.add_(0.5 * torch.randn_like(param))
    return model


#: More Llama-like architectures :func:`tiny_model` builds (:func:`tiny_llama_like_config`).
LLAMA_LIKE_ARCHS = ("ministral", "seed_oss", "arcee", "nemotron", "starcoder2", "helium", "ernie4_5", "glm",
                    "apertus", "glm4")


#: The RMSNorm classes of :data:`LLAMA_LIKE_ARCHS` that the adapters' fused ops stand in for (``FUSED_NORMS``), by
#: their modeling modules (Nemotron's and StarCoder2's LayerNorms run as their modules).
LLAMA_LIKE_NORMS = {"MinistralRMSNorm": "ministral", "SeedOssRMSNorm": "seed_oss", "ArceeRMSNorm": "arcee",
                    "HeliumRMSNorm": "helium", "Ernie4_5RMSNorm": "ernie4_5", "GlmRMSNorm": "glm",
                    "ApertusRMSNorm": "apertus", "Glm4RMSNorm": "glm4"}


def llama_like_norm(cls_name: str) -> type:
    """The HF class of one of :data:`LLAMA_LIKE_NORMS`."""
    import importlib

    module = LLAMA_LIKE_NORMS[cls_name]
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls_name)


def tiny_llama_like_config(arch: str, **options):
    """A tiny config of a Llama-like architecture (2 layers, 4 heads of 8, 2 KV heads): Ministral with a sliding
    first layer (window 4) and a full one; Seed-OSS with biased q/k/v; Arcee's ReLU^2 MLP (not gated); Nemotron's
    ReLU^2 MLP, (1 + w) LayerNorms with biases and RoPE on half of each head; StarCoder2's LayerNorms, GELU MLP,
    biases and a window of 4 on every layer; Helium's, ERNIE-4.5's and GLM's interleaved RoPE (GLM's on half of each
    head, and its fused gate_up MLP); Apertus' xIELU MLP (not gated), per-head q/k norms and its own norms' names;
    GLM-4: GLM's layers with sandwich norms (four per layer), its RoPE over the whole head."""
    import transformers

    names = {"ministral": "MinistralConfig", "seed_oss": "SeedOssConfig", "arcee": "ArceeConfig",
             "nemotron": "NemotronConfig", "starcoder2": "Starcoder2Config", "helium": "HeliumConfig",
             "ernie4_5": "Ernie4_5Config", "glm": "GlmConfig", "apertus": "ApertusConfig", "glm4": "Glm4Config"}
    extra = {"ministral": {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
             "seed_oss": {"attention_bias": True}, "starcoder2": {"sliding_window": 4},
             "apertus": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                             "original_max_position_embeddings": 8, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0}},
             "glm4": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}},
             }.get(arch, {})
    return getattr(transformers, names[arch])(**{
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128, **extra, **options})


#: Mixture-of-Experts architectures :func:`tiny_model` builds: 4 experts, top-2, a Llama-like attention.
MOE_ARCHS = ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe")


def tiny_moe_config(arch: str, **options):
    """A tiny MoE config: 3 layers of 4 experts (16 wide), each token routed to 2. Qwen3-MoE: per-head q/k norms, the
    middle layer a dense MLP (``mlp_only_layers``); Qwen2-MoE: a shared expert behind a sigmoid gate, only the middle
    layer sparse (``decoder_sparse_step`` 2: layers whose 1-based index is even);
    Mixtral: renormalised top-2, no dense layer; OLMoE: q/k norms over the whole projection."""
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    base = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128, num_experts_per_tok=2)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**{**base, "intermediate_size": 64, "moe_intermediate_size": 16, "num_experts": 4,
                                 "head_dim": 8, "mlp_only_layers": [1], **options})
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(**{**base, "intermediate_size": 64, "moe_intermediate_size": 16, "num_experts": 4,
                                 "shared_expert_intermediate_size": 24, "decoder_sparse_step": 2, **options})
    if arch == "mixtral":
        return MixtralConfig(**{**base, "intermediate_size": 16, "num_local_experts": 4, **options})
    if arch == "olmoe":
        return OlmoeConfig(**{**base, "intermediate_size": 16, "num_experts": 4, **options})
    raise ValueError(arch)


def tiny_gemma3n():
    """A tiny Gemma-3n: per-layer embeddings of the token ids in every layer, ``intermediate_size`` per layer."""
    from transformers import AutoModelForCausalLM, Gemma3nTextConfig

    cfg = Gemma3nTextConfig(vocab_size=128, vocab_size_per_layer_input=128, hidden_size=32,
                            hidden_size_per_layer_input=8, intermediate_size=[64, 48], num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                            num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0], laurel_rank=4,
                            altup_num_inputs=2, pad_token_id=0, initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF initialises some norm scales to 0, which would zero the per-layer embeddings' share
        for param in model.parameters():
            if param.dim() == 1 and not param.any():
                param.fill_(1.0)
    return model


def tiny_gemma2(*, attn: str = "eager", seed: int = 0, **overrides):
    """A tiny Gemma-2 (Gemma Scope's model), in eval mode: 3 layers alternating sliding (window 4) and full attention,
    attention logit soft-cap 1.0 (it binds at this init), final logit soft-cap 5.0, ``query_pre_attn_scalar`` 16 (not
    ``head_dim``), sandwich norms with random weights (HF zeroes them, and ``(1 + w)`` then hides a ``w``-style norm),
    GELU-tanh MLP. ``overrides``: config fields."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    options = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=4,
                   query_pre_attn_scalar=16, attn_logit_softcapping=1.0, final_logit_softcapping=5.0, pad_token_id=0,
                   bos_token_id=2, eos_token_id=1, initializer_range=0.2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Gemma2Config(**{**options, **overrides}), attn_implementation=attn).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
    return model


def count_calls(monkeypatch, functions: dict) -> dict:
    """Wraps ``functions`` (``{name: module}``: the function ``module.name``) to count their calls, each still run;
    returns the live counts ``{name: calls}``."""
    calls = dict.fromkeys(functions, 0)
    for name, module in functions.items():
        original = getattr(module, name)

        def counted(*args, _f=original, _n=name, **kwargs):
            calls[_n] += 1
            return _f(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random llama and the offline word-level tokenizer saved as a model folder (for the CLI)."""
    from word_tokenizer import word_tokenizer

    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def interrupt_write(monkeypatch, error: BaseException, *, name: str | None = None, after: str | None = None,
                    kill: tuple | None = None) -> dict:
    """Makes the first atomic write (``os.replace``) onto a file named ``name`` (or the first one after the file named
    ``after`` was written) raise ``error`` instead. ``kill=(folder, copy)``: first copies ``folder`` to ``copy``, what a
    killed process leaves (no cleanup ran). Returns ``{"target": the interrupted path}`` once it fired."""
    import shutil
    from pathlib import Path

    real, state = os.replace, {"armed": after is None}

    def replace(src, dst, *args, **kwargs):
        if "target" not in state and state["armed"] and (name is None or Path(dst).name == name):
            state["target"] = Path(dst)
            if kill is not None:
                shutil.copytree(kill[0], kill[1])
            raise error
        real(src, dst, *args, **kwargs)
        if after is not None and Path(dst).name == after:
            state["armed"] = True

    monkeypatch.setattr(os, "replace", replace)
    return state
