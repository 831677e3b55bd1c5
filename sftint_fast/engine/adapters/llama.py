"""Llama-like decoders (Llama, SmolLM2, Qwen2, Qwen3, Mistral, Ministral, Gemma, Gemma-3 text, SmolLM3, Gemma-2,
Seed-OSS, Arcee, Apertus, Nemotron, StarCoder2, Helium, ERNIE-4.5, GLM, GLM-4): pre-norm (Gemma-2/3 and GLM-4:
sandwich) blocks with RoPE (none on SmolLM3's NoPE layers) and GQA.

The layer loop calls the HF modules themselves (norms, projections, rotary embedding, MLP, LM head), so every
number equals the model's own forward; only the attention is handed to the engine's callback.
"""
from __future__ import annotations

import functools
import inspect
import math
import re
import sys

import torch

from sftint_fast.engine.adapters.base import (Adapter, AttendFn, FusedBackend, LayerSpec, ModelDims,
                                              last_layer_rows, mlp_tensors)

#: HF ``model_type`` values this adapter serves (each checked against the naive engine in tests/test_trie.py).
MODEL_TYPES = frozenset({"llama", "qwen2", "mistral", "gemma3_text", "qwen3", "smollm3", "gemma2", "gemma",
                         "ministral", "seed_oss", "arcee", "nemotron", "starcoder2", "helium", "ernie4_5", "glm",
                         "apertus", "glm4"})
#: RMSNorm classes the fused ops (Triton, C++) reproduce: ``"llama"`` = ``w * norm(x).to(dtype)`` (``variance_epsilon``),
#: ``"gemma"`` = ``(norm(x) * (1 + w)).to(dtype)`` (``eps``), ``"olmo"`` = ``(w * norm(x)).to(dtype)``
#: (``variance_epsilon``). Any other norm runs as its module.
FUSED_NORMS = {"LlamaRMSNorm": "llama", "Qwen2RMSNorm": "llama", "Qwen3RMSNorm": "llama", "MistralRMSNorm": "llama",
               "SmolLM3RMSNorm": "llama", "Phi3RMSNorm": "llama", "Gemma3RMSNorm": "gemma", "Gemma2RMSNorm": "gemma",
               "Olmo2RMSNorm": "olmo", "Olmo3RMSNorm": "olmo", "Qwen3MoeRMSNorm": "llama", "Qwen2MoeRMSNorm": "llama",
               "MixtralRMSNorm": "llama", "OlmoeRMSNorm": "llama", "GemmaRMSNorm": "gemma",
               "GraniteRMSNorm": "llama", "MinistralRMSNorm": "llama", "SeedOssRMSNorm": "llama",
               "ArceeRMSNorm": "llama", "Ernie4_5RMSNorm": "llama", "GlmRMSNorm": "llama", "ApertusRMSNorm": "llama",
               "Glm4RMSNorm": "llama",
               # ``(w.to(float32) * norm(x)).to(dtype)``: OLMo's form (``w * norm(x)`` is float32 for any w dtype)
               "HeliumRMSNorm": "olmo"}
#: Model types whose forward picks each layer's attention mask by ``config.layer_types`` (a ``"sliding_attention"``
#: layer's mask keeps ``config.sliding_window`` keys), while flash attention reads the attention module's
#: ``sliding_window``: the two must agree (:func:`_layer_windows`).
_MASK_BY_LAYER_TYPE = frozenset({"qwen2", "qwen3", "smollm3", "gemma3_text", "olmo3", "gemma2", "qwen2_moe",
                                 "ministral"})
#: Model types whose ``apply_rotary_pos_emb`` rotates interleaved pairs (``rotate_half`` over ``x[..., 0::2]`` and
#: ``x[..., 1::2]``, the tables' first halves repeated pairwise), not the two halves of a head that the fused RoPE ops
#: rotate: their own function runs.
_INTERLEAVED_ROPE = frozenset({"helium", "ernie4_5", "glm", "glm4"})
#: A decoder layer's norms by role, ``(before the attention, on its output, before the MLP, on its output)``: Llama's
#: pre-norm layers (no norm on a block's output), Gemma-2/3's sandwich ones, and the model types that name them
#: otherwise (Apertus' pre-norm layers; GLM-4's sandwich ones, whose ``post_attention_layernorm`` is before the MLP).
_PRE_NORMS = ("input_layernorm", None, "post_attention_layernorm", None)
_SANDWICH_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm")
_NORM_NAMES = {"apertus": ("attention_layernorm", None, "feedforward_layernorm", None),
               "glm4": ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
                        "post_mlp_layernorm")}
#: Model types whose attention modules pass ``softcap=self.attn_logit_softcapping`` to the attention function, which
#: applies ``tanh(scores / cap) * cap`` to the scaled scores before the mask (eager, flex and flash attention; HF's
#: SDPA attention cannot): the adapter carries it as :attr:`LayerSpec.softcap` (:func:`_layer_softcaps`).
_SOFTCAP_CARRIED = frozenset({"gemma2"})


class LlamaLikeAdapter(Adapter):
    """Adapter over ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and ``model.lm_head``."""

    #: the ``model_type`` values this class serves (a subclass serves its own)
    model_types: frozenset[str] = MODEL_TYPES

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        inner = model.model
        self._model, self._inner = model, inner
        self._embed_tokens = inner.embed_tokens
        self._blocks = list(inner.layers[: config.num_hidden_layers])
        self._norm = inner.norm
        self._rotary = inner.rotary_emb
        self._lm_head = model.lm_head
        self._apply_rope = sys.modules[type(inner).__module__].apply_rotary_pos_emb
        self._final_softcap = getattr(config, "final_logit_softcapping", None)
        # Gemma-3 keeps one rotary table per layer type; the others take no layer type argument.
        self._layer_types = tuple(config.layer_types) if config.model_type == "gemma3_text" else None
        sandwich = hasattr(self._blocks[0], "pre_feedforward_layernorm")
        self._norm_names = _NORM_NAMES.get(config.model_type, _SANDWICH_NORMS if sandwich else _PRE_NORMS)
        self._sandwich = self._norm_names[1] is not None
        if config.model_type in _NORM_NAMES:  # a release that renames them again: the adapter refuses the model
            for block in self._blocks:
                for name in filter(None, self._norm_names):
                    getattr(block, name)  # (an AttributeError where a layer lacks it)
        attn0 = self._blocks[0].self_attn
        softcaps = _layer_softcaps(config, self._blocks)
        if _scales_embeddings_in_forward(inner):
            raise ValueError(f"its model's forward ({type(inner).__name__}) scales the input embeddings itself "
                             "(normalizer, as transformers 4.x's Gemma models do), which this adapter does not carry "
                             "over (it takes the embedding module's output as the layers' input)")
        self.dims = ModelDims(
            num_layers=len(self._blocks),
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=attn0.head_dim,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            dtype=self._embed_tokens.weight.dtype,
            mlp_tensors=mlp_tensors(self._blocks[0].mlp),
            softcap=any(cap is not None for cap in softcaps),
        )
        # fused elementwise ops (``run_layers(fused=...)``): which of the model's ops they can stand in for
        self._rope_fusable = (_function_name(self._apply_rope) == "apply_rotary_pos_emb"
                              and config.model_type not in _INTERLEAVED_ROPE)
        mlp0 = self._blocks[0].mlp
        self._mlp_fusable = all(hasattr(mlp0, name) for name in ("gate_proj", "up_proj", "down_proj")) and (
            isinstance(mlp0.act_fn, torch.nn.SiLU) or type(mlp0.act_fn).__name__ == "SiLUActivation")
        # dynamic / longrope RoPE picks its frequencies from the largest position it is given (HF's
        # ``dynamic_rope_update``): the tables must come from the whole sequence's positions, as in the model's forward
        self._rope_by_length = _length_dependent_rope(self._rotary)
        self.layers = tuple(LayerSpec(scale=float(block.self_attn.scaling), sliding_window=window, softcap=cap)
                            for block, window, cap in zip(self._blocks, _layer_windows(config, self._blocks),
                                                          softcaps))
        # SmolLM3's NoPE layers (``no_rope_layers[i] == 0``): the attention module skips RoPE where ``use_rope`` is
        # falsy; read from the module (an AttributeError if a release renames it: the adapter then refuses the model)
        self._rope_layers = tuple(bool(block.self_attn.use_rope) if config.model_type == "smollm3" else True
                                  for block in self._blocks)

    @classmethod
    def supports(cls, model: torch.nn.Module) -> bool:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in cls.model_types:
            return False
        if getattr(config, "use_bidirectional_attention", False):
            return False
        inner = getattr(model, "model", None)
        return all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")) and hasattr(
            model, "lm_head")

    def skipped_modules(self) -> list[torch.nn.Module]:
        """The models, decoder layers, attention modules, MLPs (a fused op may stand in) and the layers' norms of
        :data:`FUSED_NORMS` classes (by class name: a fused op stands in); the final norm runs as its module."""
        modules = [self._inner, self._model]
        for block in self._blocks:
            modules += [block, block.self_attn, block.mlp]
            modules += [m for m in block.modules() if type(m).__name__ in FUSED_NORMS]
        return modules

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._embed_tokens(input_ids)

    def _rope_tables(self, x: torch.Tensor, positions: torch.Tensor,
                     seq_len: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._rope_by_length and seq_len is not None:  # the full sequence's tables, then this pass's rows
            whole = torch.arange(seq_len, device=positions.device).unsqueeze(0)
            pick = lambda table: tuple(t[:, positions] for t in table)  # noqa: E731
        else:
            whole, pick = positions.unsqueeze(0), lambda table: table  # noqa: E731
        if self._layer_types is None:
            table = pick(self._rotary(x, whole))
            return [table] * len(self._blocks)
        tables = {kind: pick(self._rotary(x, whole, kind)) for kind in set(self._layer_types)}
        return [tables[kind] for kind in self._layer_types]

    def run_layers(self, embeds: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                   keep: torch.Tensor | None = None, fused: FusedBackend | None = None,
                   seq_len: int | None = None) -> torch.Tensor:
        """See :meth:`Adapter.run_layers`. ``fused``: RMSNorms, RoPE and the SiLU gate run as fused ops where the
        model's ops are the ones they reproduce: ``"triton"`` (``sftint_fast.ops.triton.{rms_norm, rope,
        silu_mul}``, CUDA or the interpreter) or ``"cpu"`` (``sftint_fast.ops.layer_ops``, float32 CPU tensors;
        others run the modules); everything else (projections, other norms and activations) stays the model's
        modules."""
        tables = self._rope_tables(embeds.unsqueeze(0), positions, seq_len)
        ops = _FusedOps(self, fused) if fused else None
        norm = ops.norm if ops else _call
        mlp = self._mlp_call(ops)
        hidden = embeds
        last = len(self._blocks) - 1
        pre_attn, post_attn, pre_mlp, post_mlp = self._norm_names
        for index, block in enumerate(self._blocks):
            attn = block.self_attn
            q, k, v = self._normed_qkv(norm, attn, *self._project(attn, norm(getattr(block, pre_attn), hidden)))
            cos, sin = tables[index]
            if self._rope_layers[index]:  # (a NoPE layer's q and k go to the attention as they are)
                q, k = self._rope(ops, q, k, cos, sin)
            out = attend(index, q, k, v).flatten(1)
            if index == last:
                out, hidden = last_layer_rows(out, hidden, keep)
                if not len(hidden):  # no row is read: this layer's K/V (stored by ``attend``) were all it gave
                    return hidden
            out = attn.o_proj(out)
            if self._sandwich:
                hidden = hidden + norm(getattr(block, post_attn), out)
                ff = mlp(block.mlp, norm(getattr(block, pre_mlp), hidden))
                hidden = hidden + norm(getattr(block, post_mlp), ff)
            else:
                hidden = self._residual(index, hidden, out)
                hidden = self._residual(index, hidden, mlp(block.mlp, norm(getattr(block, pre_mlp), hidden)))
        return hidden

    def _residual(self, index: int, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s residual stream after adding a block's output ``out`` (its attention's or MLP's)."""
        return hidden + out

    def _project(self, attn: torch.nn.Module, normed: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[N, Hq, D]``, k and v ``[N, Hkv, D]``: the attention module's projections of the normed tokens."""
        head_dim = self.dims.head_dim
        return tuple(proj(normed).unflatten(-1, (-1, head_dim)) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def _normed_qkv(self, norm, attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v after the attention's q/k norms, per head (Qwen3's, Gemma-3's) where it has them."""
        if hasattr(attn, "q_norm"):
            q, k = norm(attn.q_norm, q), norm(attn.k_norm, k)
        return q, k, v

    def _mlp_call(self, ops: _FusedOps | None):
        """``mlp(module, x)``: each layer's MLP, as its module or a fused op."""
        return ops.mlp if ops else _call

    def _rope(self, ops: _FusedOps | None, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ops and ops.rope_fits(q, cos, self.dims.head_dim):
            return ops.rope(q, cos[0], sin[0]), ops.rope(k, cos[0], sin[0])
        # cos/sin are [1, N, D]: rotate the flat tokens as [1, H, N, D], the layout the attention module gives the
        # function (a replacement, e.g. Liger-Kernel's, may assume it and ignore unsqueeze_dim)
        q, k = self._apply_rope(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), cos, sin)
        return q[0].transpose(0, 1), k[0].transpose(0, 1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._lm_head(self._norm(hidden))
        if self._final_softcap is not None:
            logits = torch.tanh(logits / self._final_softcap) * self._final_softcap
        return logits


def _function_name(fn) -> str | None:
    """The name of a function of the model's code. With the ``kernels`` package installed, transformers (>= 5.25)
    turns ``apply_rotary_pos_emb`` into an instance of an ``nn.Module`` class that names its hub-kernel layer
    (``kernel_layer_name = "rotary_pos_emb"``): a hub kernel may replace its forward, with the same function."""
    if isinstance(fn, torch.nn.Module):
        if getattr(type(fn), "kernel_layer_name", None) == "rotary_pos_emb":
            return "apply_rotary_pos_emb"
        return type(fn).__name__
    return getattr(fn, "__name__", None)


def _layer_windows(config, blocks: list[torch.nn.Module]) -> list[int | None]:
    """Each layer's sliding window, the attention module's ``sliding_window`` (Mistral's, Phi-3's, Mixtral's and
    StarCoder2's attention have none: their ``config.sliding_window`` applies to every layer, whatever
    ``layer_types`` says). For :data:`_MASK_BY_LAYER_TYPE` models the window of the mask that eager / SDPA attention
    apply must be that one: SmolLM3 gives its attention modules a window only with ``use_sliding_window``, while its
    forward builds the masks from ``layer_types`` alone; where they disagree the model's number depends on its
    attention implementation, and the adapter refuses it."""
    every_layer = config.model_type in ("mistral", "phi3", "mixtral", "starcoder2")
    mistral_window = getattr(config, "sliding_window", None) if every_layer else None
    windows = [getattr(block.self_attn, "sliding_window", mistral_window) for block in blocks]
    kinds = getattr(config, "layer_types", None) if config.model_type in _MASK_BY_LAYER_TYPE else None
    for index, (kind, window) in enumerate(zip(kinds or (), windows)):
        masked = config.sliding_window if kind == "sliding_attention" else None
        if window != masked:
            mask = "the causal mask" if masked is None else f"a sliding window of {masked} keys"
            raise ValueError(f"layer {index} is a {kind!r} layer (config.layer_types), whose attention mask is "
                             f"{mask}, but its attention module's sliding_window is {window} (use_sliding_window="
                             f"{getattr(config, 'use_sliding_window', None)}): the model's attention implementations "
                             "disagree (eager / SDPA apply the mask, flash attention the module's window), so the "
                             "adapter does not pick one")
    return windows


def _forward_source(module: torch.nn.Module) -> str | None:
    """The source of the module class's ``forward`` (through ``functools.wraps`` decorators), None if unreadable."""
    return _source_of(type(module).forward)


def check_source(modules: dict[str, torch.nn.Module], ops, family: str) -> None:
    """A ValueError where the forward of ``modules[what]`` lacks the op ``pattern`` of some ``(what, pattern)`` of
    ``ops`` (or its source cannot be read): a transformers release whose ``family`` code the adapter does not
    reproduce."""
    for what, pattern in ops:
        source = _forward_source(modules[what])
        if source is None or re.search(pattern, source) is None:
            raise ValueError(f"{type(modules[what]).__name__}.forward does not read as transformers 5.x's {family} "
                             f"code (expected the op {pattern!r} in its source): the adapter would not compute what "
                             "its forward does")


@functools.lru_cache(maxsize=256)
def _source_of(function) -> str | None:
    # (read once per function: every evaluate builds an adapter, and reading the source was 80% of its lookup)
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return None


def _attention_softcaps(attn: torch.nn.Module) -> bool:
    """Whether the attention module's forward passes a logit soft-cap to the attention function (Gemma-2 does;
    Gemma-3's, as of transformers 5.25, ignores ``attn_logit_softcapping``). True when its source cannot be read."""
    source = _forward_source(attn)
    return source is None or "softcap" in source


#: transformers' attention implementations that apply the ``softcap`` they are passed (flash attention raises where
#: its kernel lacks it); SDPA cannot (transformers 5.x raises, earlier releases dropped it).
_SOFTCAP_IMPLEMENTATIONS = ("eager", "flex_attention", "flash_attention")


def _layer_softcaps(config, blocks: list[torch.nn.Module]) -> list[float | None]:
    """Each layer's attention logit soft-cap: for :data:`_SOFTCAP_CARRIED` model types whose attention passes
    ``softcap=self.attn_logit_softcapping``, that attribute of each layer's module, applied as eager attention does;
    else None where the attention ignores ``config.attn_logit_softcapping`` (or it is None). A soft-cap the adapter
    cannot carry exactly (another model type's, one passed otherwise, one whose source cannot be read, or a model
    configured for an attention implementation that does not apply it) is refused with a ValueError naming it."""
    cap = getattr(config, "attn_logit_softcapping", None)
    attn = blocks[0].self_attn
    source = _forward_source(attn)
    passed = source is not None and re.search(r"softcap\s*=\s*self\.attn_logit_softcapping\b", source) is not None
    if config.model_type in _SOFTCAP_CARRIED and passed:
        caps = [block.self_attn.attn_logit_softcapping for block in blocks]
        for index, layer_cap in enumerate(caps):
            if layer_cap is not None and (isinstance(layer_cap, bool) or not isinstance(layer_cap, (int, float))
                                          or not 0 < layer_cap < math.inf):
                raise ValueError(f"layer {index}'s attention logit soft-cap (attn_logit_softcapping): expected None "
                                 f"or a positive finite number, received {layer_cap!r}")
        implementation = getattr(config, "_attn_implementation", None) or "eager"
        if any(c is not None for c in caps) and not str(implementation).startswith(_SOFTCAP_IMPLEMENTATIONS):
            raise ValueError(f"its attention applies a logit soft-cap (attn_logit_softcapping={cap}) that its "
                             f"attention implementation {implementation!r} does not (transformers' SDPA attention "
                             "cannot: it raises or drops it), so the model's forward is not the one the adapter would "
                             "compute; load it with attn_implementation='eager'")
        return [None if c is None else float(c) for c in caps]
    if cap is not None and _attention_softcaps(attn):
        raise ValueError(f"its attention applies a logit soft-cap (attn_logit_softcapping={cap}), which this "
                         f"adapter does not carry over")
    return [None] * len(blocks)


def _scales_embeddings_in_forward(inner: torch.nn.Module) -> bool:
    """Whether the inner model's forward multiplies the input embeddings by a ``normalizer`` (transformers 4.x's
    Gemma-2: ``sqrt(hidden_size)`` after the embedding; 5.x scales in the embedding module,
    ``Gemma2TextScaledWordEmbedding``, whose output is what the adapter's ``embed`` returns)."""
    source = _forward_source(inner)
    return source is not None and "normalizer" in source


def _length_dependent_rope(rotary: torch.nn.Module) -> bool:
    """Whether the rotary module's frequencies depend on the sequence length (HF rope types ``dynamic``, ``longrope``;
    ``rope_type`` is a dict by layer type for Gemma-3)."""
    kinds = getattr(rotary, "rope_type", None)
    kinds = kinds.values() if isinstance(kinds, dict) else [kinds]
    return any(isinstance(kind, str) and ("dynamic" in kind or kind == "longrope") for kind in kinds)


def _call(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


class _FusedOps:
    """The fused stand-ins of one adapter's norms, RoPE and gated MLP (each falls back to the module).

    ``"triton"``: the Triton ops (out of place); ``"cpu"``: the C++ ops, on float32 tensors only, RoPE and the gate
    in place, into the projection outputs they consume (fresh tensors nothing else holds)."""

    def __init__(self, adapter: LlamaLikeAdapter, backend: FusedBackend) -> None:
        if backend == "triton":
            from sftint_fast.ops.triton import rms_norm, rope, silu_mul

            self._rms_norm, self._rope, self._silu_mul = rms_norm.rms_norm, rope.rope, silu_mul.silu_mul
            self._fits = _any_tensor
            self._olmo = {"olmo": True}
        elif backend == "cpu":
            from sftint_fast.ops import layer_ops

            self._rms_norm, self._rope, self._silu_mul = layer_ops.rms_norm, layer_ops.rope_, layer_ops.silu_mul_
            self._fits = layer_ops.available
            self._olmo = {}  # float32 only: ``(w * norm(x)).to(float32)`` is the "llama" op's ``w * norm(x)``
        else:
            raise ValueError(f"fused: expected 'triton', 'cpu' or None, received {backend!r}")
        self._adapter = adapter

    def norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        kind = FUSED_NORMS.get(type(module).__name__)
        if kind is None or not (self._fits(x) and self._fits(module.weight)):
            return module(x)
        if kind == "llama" and hasattr(module, "variance_epsilon"):
            return self._rms_norm(x, module.weight, module.variance_epsilon)
        if kind == "gemma" and hasattr(module, "eps"):
            return self._rms_norm(x, module.weight, module.eps, gemma=True)
        if kind == "olmo" and hasattr(module, "variance_epsilon"):
            return self._rms_norm(x, module.weight, module.variance_epsilon, **self._olmo)
        return module(x)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self._rope(x, cos, sin)

    def mlp(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not (self._adapter._mlp_fusable and self._fits(x)):
            return module(x)
        return module.down_proj(self._silu_mul(module.gate_proj(x), module.up_proj(x)))

    def rope_fits(self, x: torch.Tensor, cos: torch.Tensor, head_dim: int) -> bool:
        """The rotate-half RoPE over the whole head (tables ``[1, N, head_dim]``), on tensors this backend takes.
        The tables must be in ``x``'s dtype: OLMo-2/3's are float32 whatever the model's dtype, and HF's products
        with a bfloat16 ``x`` are then float32 ones, rounded once, where the fused ops round each product."""
        return (self._adapter._rope_fusable and cos.dim() == 3 and cos.shape[-1] == head_dim
                and cos.dtype == x.dtype and self._fits(x) and self._fits(cos))


def _any_tensor(x: torch.Tensor) -> bool:
    return True
