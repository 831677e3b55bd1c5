"""Cohere (``model_type`` cohere: Command-R, Aya-23) and Cohere-2 (``cohere2``: Command-R7B, Command-A, Aya
Expanse-2): each layer's attention and gated SiLU MLP run in parallel on one LayerNorm'd input (``CohereLayerNorm``:
mean-centred, weight only, in float32), ``x + attn(ln(x)) + mlp(ln(x))``; RoPE on interleaved pairs by the modeling
code's own ``apply_rotary_pos_emb`` (in float32), never the fused op; the LM head's output times
``config.logit_scale``. Cohere: optional per-head q/k LayerNorms (``use_qk_norm``, weights ``[heads, head_dim]``).
Cohere-2: sliding-window layers by ``config.layer_types``, and no RoPE on its full-attention layers (its attention
rotates q and k only where the module has a ``sliding_window``).

As :class:`~sftint_fast.engine.adapters.llama.LlamaLikeAdapter`, whose embedding, RoPE tables, projections and final
norm it shares, the layer loop calls the HF modules themselves; only the attention goes to the engine. The adapter
reads the model's code and refuses (a ValueError: the model then runs naive) a release whose forwards no longer
compute as written above.
"""
from __future__ import annotations

import math

import torch

from sftint_fast.engine.adapters.base import AttendFn, FusedBackend, LayerSpec, last_layer_rows
from sftint_fast.engine.adapters.llama import LlamaLikeAdapter, _call, _FusedOps, check_source

#: HF ``model_type`` values this adapter serves (each checked against the naive engine in tests/test_more_adapters.py).
MODEL_TYPES = frozenset({"cohere", "cohere2"})

#: ``(what, pattern)``: the ops of transformers' Cohere forwards (5.x) the adapter reproduces, as regular expressions
#: over the forward's source; ``what`` is ``"model"`` (the causal LM), ``"attn"`` or ``"layer"``.
_COHERE_OPS = (
    ("model", r"logits\s*=\s*logits\s*\*\s*self\.logit_scale\b"),
    ("layer", r"hidden_states_mlp\s*=\s*self\.mlp\(hidden_states\)"),
    ("layer", r"hidden_states\s*=\s*residual\s*\+\s*hidden_states_attention\s*\+\s*hidden_states_mlp"),
)
_ATTENTION_OPS = {
    "cohere": (("attn", r"query_states\s*=\s*self\.q_norm\(query_states\)"),),
    "cohere2": (("attn", r"if\s+self\.sliding_window\s+is\s+not\s+None:\s*\n\s*query_states,\s*key_states\s*="
                         r"\s*apply_rotary_pos_emb\("),
                ("attn", r"sliding_window\s*=\s*self\.sliding_window\b")),
}


class CohereAdapter(LlamaLikeAdapter):
    """Adapter over Cohere's and Cohere-2's ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and
    ``model.lm_head``, with the logit scale (read when the adapter is built, as the model's forward reads it)."""

    model_types = MODEL_TYPES

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        config = model.config
        block = self._blocks[0]
        check_source({"model": model, "attn": block.self_attn, "layer": block},
                     _COHERE_OPS + _ATTENTION_OPS[config.model_type], "Cohere")
        self._rope_fusable = False  # interleaved pairs, in float32: the model's own function
        scale = model.logit_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"logit_scale: expected a finite number (int or float), received "
                            f"{type(scale).__name__} {scale!r}")
        self._logit_scale = scale
        if config.model_type == "cohere2":  # the attention modules' windows; RoPE only on the sliding layers
            windows = [block.self_attn.sliding_window for block in self._blocks]
            for index, (kind, window) in enumerate(zip(config.layer_types, windows)):
                masked = config.sliding_window if kind == "sliding_attention" else None
                if window != masked:
                    raise ValueError(f"layer {index} is a {kind!r} layer (config.layer_types), whose attention mask "
                                     f"keeps {masked} keys (None: all), but its attention module's sliding_window "
                                     f"is {window}: the model's attention implementations disagree")
            self.layers = tuple(LayerSpec(scale=spec.scale, sliding_window=window, softcap=spec.softcap)
                                for spec, window in zip(self.layers, windows))
            self._rope_layers = tuple(window is not None for window in windows)

    def run_layers(self, embeds: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                   keep: torch.Tensor | None = None, fused: FusedBackend | None = None,
                   seq_len: int | None = None) -> torch.Tensor:
        """See :meth:`Adapter.run_layers`. ``fused``: the gated SiLU MLP as the fused op; the LayerNorms and the
        interleaved RoPE run as the model's modules and function."""
        tables = self._rope_tables(embeds.unsqueeze(0), positions, seq_len)
        mlp = _FusedOps(self, fused).mlp if fused else _call
        hidden = embeds
        last = len(self._blocks) - 1
        for index, block in enumerate(self._blocks):
            attn = block.self_attn
            normed = block.input_layernorm(hidden)
            # per-head q/k norms on [N, heads, head_dim], the module's [batch, seq, heads, head_dim] view's rows
            q, k, v = self._normed_qkv(_call, attn, *self._project(attn, normed))
            if self._rope_layers[index]:
                cos, sin = tables[index]
                q, k = self._rope(None, q, k, cos, sin)
            out = attend(index, q, k, v).flatten(1)
            if index == last:
                out, hidden = last_layer_rows(out, hidden, keep)
                if keep is not None:
                    normed = normed.index_select(0, keep)
                if not len(hidden):  # no row is read: this layer's K/V (stored by ``attend``) were all it gave
                    return hidden
            hidden = hidden + attn.o_proj(out) + mlp(block.mlp, normed)  # summed in the model's order
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(self._norm(hidden)) * self._logit_scale
