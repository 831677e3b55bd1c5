"""EXAONE-4.0 (LG AI; ``model_type`` exaone4): OLMo-2's post-norm decoder layers (no norm before the attention or
the MLP: each block's output is normed, ``post_attention_layernorm`` / ``post_feedforward_layernorm``, before its
residual add) with per-head q/k RMSNorms, GQA and a gated SiLU MLP. Sliding-window layers by ``config.layer_types``
(a window of ``config.sliding_window`` keys); where ``config.sliding_window`` is set, the full-attention layers take
no RoPE (the attention rotates q and k only where ``sliding_window is None or is_sliding``).

As :class:`~sftint_fast.engine.adapters.llama.LlamaLikeAdapter`, whose embedding, RoPE tables, fused ops, final norm
and LM head it shares, the layer loop calls the HF modules themselves; only the attention goes to the engine. The
adapter reads the model's code and refuses (a ValueError: the model then runs naive) a release whose forwards no
longer compute as written above.
"""
from __future__ import annotations

import torch

from sftint_fast.engine.adapters.base import AttendFn, FusedBackend, LayerSpec, last_layer_rows
from sftint_fast.engine.adapters.llama import LlamaLikeAdapter, _call, _FusedOps, check_source

#: HF ``model_type`` values this adapter serves (each checked against the naive engine in tests/test_more_adapters.py).
MODEL_TYPES = frozenset({"exaone4"})

#: ``(what, pattern)``: the ops of transformers' EXAONE-4 forwards (5.x) the adapter reproduces, as regular
#: expressions over the forward's source; ``what`` is ``"attn"`` or ``"layer"``.
_EXAONE4_OPS = (
    ("attn", r"query_states\s*=\s*self\.q_norm\(query_states\)"),
    ("attn", r"if\s+self\.sliding_window\s+is\s+None\s+or\s+self\.is_sliding:\s*\n\s*query_states,\s*key_states"
             r"\s*=\s*apply_rotary_pos_emb\("),
    ("attn", r"sliding_window\s*=\s*self\.sliding_window\s+if\s+self\.is_sliding\s+else\s+None"),
    ("layer", r"hidden_states\s*=\s*self\.post_attention_layernorm\(hidden_states\)\s*\n\s*hidden_states\s*="
              r"\s*residual\s*\+\s*hidden_states"),
    ("layer", r"hidden_states\s*=\s*self\.post_feedforward_layernorm\(hidden_states\)\s*\n\s*hidden_states\s*="
              r"\s*residual\s*\+\s*hidden_states"),
)


class Exaone4Adapter(LlamaLikeAdapter):
    """Adapter over EXAONE-4's ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and ``model.lm_head``."""

    model_types = MODEL_TYPES

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        block = self._blocks[0]
        check_source({"attn": block.self_attn, "layer": block}, _EXAONE4_OPS, "EXAONE-4")
        for index, layer in enumerate(self._blocks):
            extra = [name for name in ("input_layernorm", "pre_feedforward_layernorm") if hasattr(layer, name)]
            if extra:
                raise ValueError(f"layer {index} ({type(layer).__qualname__}) has {' and '.join(extra)}: this "
                                 "adapter runs EXAONE-4's post-norm layers, with no norm before the attention or "
                                 "the MLP")
        # each layer's window and RoPE as its attention module reads them (``is_sliding`` from config.layer_types;
        # the module's ``sliding_window`` is config.sliding_window on every layer)
        sliding = [bool(layer.self_attn.is_sliding) for layer in self._blocks]
        windows = [layer.self_attn.sliding_window if is_sliding else None
                   for layer, is_sliding in zip(self._blocks, sliding)]
        self.layers = tuple(LayerSpec(scale=spec.scale, sliding_window=window, softcap=spec.softcap)
                            for spec, window in zip(self.layers, windows))
        self._rope_layers = tuple(layer.self_attn.sliding_window is None or is_sliding
                                  for layer, is_sliding in zip(self._blocks, sliding))

    def run_layers(self, embeds: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                   keep: torch.Tensor | None = None, fused: FusedBackend | None = None,
                   seq_len: int | None = None) -> torch.Tensor:
        """See :meth:`Adapter.run_layers` and :meth:`LlamaLikeAdapter.run_layers` (``fused``: RoPE and the SiLU
        gate; EXAONE-4's RMSNorms run as their modules)."""
        tables = self._rope_tables(embeds.unsqueeze(0), positions, seq_len)
        ops = _FusedOps(self, fused) if fused else None
        norm = ops.norm if ops else _call
        mlp = ops.mlp if ops else _call
        hidden = embeds
        last = len(self._blocks) - 1
        for index, block in enumerate(self._blocks):
            attn = block.self_attn
            # the layer's input goes to the projections as it is; per-head q/k norms, then RoPE (not on NoPE layers)
            q, k, v = self._normed_qkv(norm, attn, *self._project(attn, hidden))
            if self._rope_layers[index]:
                cos, sin = tables[index]
                q, k = self._rope(ops, q, k, cos, sin)
            out = attend(index, q, k, v).flatten(1)
            if index == last:
                out, hidden = last_layer_rows(out, hidden, keep)
                if not len(hidden):  # no row is read: this layer's K/V (stored by ``attend``) were all it gave
                    return hidden
            hidden = hidden + norm(block.post_attention_layernorm, attn.o_proj(out))
            hidden = hidden + norm(block.post_feedforward_layernorm, mlp(block.mlp, hidden))
        return hidden
