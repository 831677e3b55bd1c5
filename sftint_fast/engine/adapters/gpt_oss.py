"""OpenAI's gpt-oss (``model_type`` gpt_oss): a Llama-like pre-norm decoder with GQA, q/k/v/o biases, YaRN RoPE
(the half-split rotation with half-width tables, run as the modeling code's function), sliding-window layers
alternating with full ones (``config.layer_types``), attention sinks and a Mixture-of-Experts MLP on every layer.

What differs from Llama, and how the adapter carries it:

- Attention sinks: each head's learned logit ``self_attn.sinks`` joins the softmax's denominator (eager attention
  concatenates it as one more column, softmaxes and drops it; flex attention renormalises by it). The adapter hands
  the parameter to the engine's attention as :attr:`LayerSpec.sinks` (torch path and Triton kernel). SDPA ignores
  ``s_aux`` and flash attention drops it unless its kernel takes sinks: a model configured for an implementation
  other than eager or flex attention is refused (its forward is not the one the adapter would compute).
- The MoE block (``GptOssMLP``: a top-k ``router`` with a bias and ``GptOssExperts`` with biases and the clamped
  ``alpha`` SwiGLU) runs as its module on the flat tokens as one sequence ``[1, N, H]``; its forward returns
  ``(hidden, router_scores)``. Exact as for the other MoE models (:mod:`~sftint_fast.engine.adapters.moe`): the
  router and the experts work token by token. A PEFT layer over the router or the experts is refused.
- ``GptOssRMSNorm`` (``(w * norm(x)).to(dtype)``, its weight kept in float32 by the loader) runs as its module.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from sftint_fast.engine.adapters.llama import LlamaLikeAdapter, _forward_source
from sftint_fast.engine.adapters.moe import moe_block_elements

#: HF ``model_type`` values this adapter serves (checked against the naive engine in tests/test_gpt_oss.py).
MODEL_TYPES = frozenset({"gpt_oss"})
#: transformers' attention implementations that apply gpt-oss's sinks as eager attention does (flex attention on
#: CUDA; on the CPU it raises). SDPA ignores them; flash attention drops them unless its kernel takes them.
_SINK_IMPLEMENTATIONS = ("eager", "flex_attention")


class GptOssAdapter(LlamaLikeAdapter):
    """Adapter over ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and ``model.lm_head`` of a gpt-oss
    model. What its layers' forwards do that this loop does not carry is refused (a ValueError: the model runs
    naive)."""

    model_types = MODEL_TYPES

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        config = model.config
        implementation = getattr(config, "_attn_implementation", None) or "eager"
        if not str(implementation).startswith(_SINK_IMPLEMENTATIONS):
            raise ValueError(f"its attention adds learned sinks (s_aux) to the softmax, which its attention "
                             f"implementation {implementation!r} does not apply as eager attention does (SDPA ignores "
                             "them, flash attention drops them unless its kernel takes them), so the model's forward "
                             "is not the one the adapter would compute; load it with attn_implementation='eager'")
        self._check_sources()
        self._rope_fusable = False  # half-width tables, halves rotated: not the fused rotate-half op
        num_heads = self.dims.num_heads
        layer_types = tuple(getattr(config, "layer_types", None) or ())
        if len(layer_types) < len(self._blocks):
            raise ValueError(f"config.layer_types: expected a type per layer ({len(self._blocks)}), received "
                             f"{layer_types!r}")
        specs, elements = [], []
        experts_implementation = getattr(config, "_experts_implementation", None) or "eager"
        for index, (block, spec, kind) in enumerate(zip(self._blocks, self.layers, layer_types)):
            attn, mlp = block.self_attn, block.mlp
            masked = config.sliding_window if kind == "sliding_attention" else None
            if spec.sliding_window != masked:
                raise ValueError(f"layer {index} is a {kind!r} layer (config.layer_types), whose mask keeps "
                                 f"{masked} keys, but its attention module's sliding_window is {spec.sliding_window}: "
                                 "the model's attention implementations disagree, so the adapter does not pick one")
            sinks = attn.sinks
            if not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (num_heads,):
                got = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
                raise ValueError(f"layer {index}'s self_attn.sinks: expected a tensor of shape ({num_heads},) (a "
                                 f"logit per query head), received {got}")
            for name in ("router", "experts"):
                part = getattr(mlp, name, None)
                if not isinstance(part, torch.nn.Module):
                    raise ValueError(f"layer {index}'s mlp ({type(mlp).__qualname__}) has no `{name}` module: "
                                     "expected gpt-oss's MoE block (router, experts)")
                if isinstance(getattr(part, "base_layer", None), torch.nn.Module):
                    raise ValueError(f"layer {index}'s mlp.{name} is a PEFT {type(part).__name__} (a LoRA on its "
                                     "weights), which this adapter does not run; a LoRA on the attention projections "
                                     "runs on the trie")
            specs.append(dataclasses.replace(spec, sinks=sinks))
            elements.append(moe_block_elements(mlp, experts_implementation, self.dims.dtype_bytes))
        self.layers = tuple(specs)
        width = max(block.mlp.experts.intermediate_size for block in self._blocks)
        self.dims = dataclasses.replace(self.dims, sinks=True, intermediate_size=width,
                                        mlp_tensors=max(1, -(-max(elements) // width)))
        self._mlp_fusable = False

    def _check_sources(self) -> None:
        """The forwards this loop stands in for must be the ones it reproduces (transformers 5.x's): the layer calls
        ``hidden_states, _ = self.mlp(hidden_states)``, the attention passes ``s_aux=self.sinks``."""
        layer, attn = self._blocks[0], self._blocks[0].self_attn
        layer_source, attn_source = _forward_source(layer), _forward_source(attn)
        if layer_source is None or not re.search(r"hidden_states,\s*_\s*=\s*self\.mlp\(hidden_states\)", layer_source):
            raise ValueError(f"its decoder layer's forward ({type(layer).__qualname__}) does not call "
                             "`hidden_states, _ = self.mlp(hidden_states)`, which is what this adapter runs")
        if attn_source is None or not re.search(r"s_aux\s*=\s*self\.sinks\b", attn_source) or "softcap" in attn_source:
            raise ValueError(f"its attention's forward ({type(attn).__qualname__}) does not pass `s_aux=self.sinks` "
                             "(and nothing else this adapter does not carry) to the attention function")

    def skipped_modules(self) -> list[torch.nn.Module]:
        """As :meth:`LlamaLikeAdapter.skipped_modules`, less the MoE blocks: they run as their modules."""
        blocks = {id(block.mlp) for block in self._blocks}
        return [m for m in super().skipped_modules() if id(m) not in blocks]

    def _mlp_call(self, ops):
        def run(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            # the flat tokens as one sequence (the block reads (batch, seq, hidden)); it returns (hidden, scores)
            return module(x.unsqueeze(0))[0].squeeze(0)

        return run

