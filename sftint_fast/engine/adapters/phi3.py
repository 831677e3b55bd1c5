"""Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini (``model_type`` phi3): a Llama-like decoder whose attention has one fused
``qkv_proj`` and whose MLP one fused ``gate_up_proj``.

What differs from Llama, and how the adapter carries it:

- ``qkv_proj``'s output is split as the attention module splits it: the first ``Hq * D`` features are q, the next
  ``Hkv * D`` k, the rest v (slices of the one projection, as in ``Phi3Attention.forward``).
- Partial RoPE (``partial_rotary_factor`` < 1, Phi-4-mini's 0.75): the rotary tables cover the first
  ``rotary_dim`` dims of a head and the model's ``apply_rotary_pos_emb`` rotates those and passes the rest on; the
  adapter calls that function (the fused RoPE ops, which rotate the whole head, are used only when the tables span
  it). Longrope (``su``) scaling: the tables of the whole sequence, as for Llama's length-dependent RoPE.
- The MLP (``gate_up_proj``, its halves ``gate, up``, ``up * act(gate)``, ``down_proj``) runs as its module.
- ``resid_attn_dropout`` / ``resid_mlp_dropout``: identities in eval mode, the mode both engines run the model in.
- ``config.sliding_window``: the model's forward masks every layer with it (and flash attention reads it too), as
  Mistral's does; the layers' :class:`~sftint_fast.engine.adapters.base.LayerSpec` carry it.
"""
from __future__ import annotations

import torch

from sftint_fast.engine.adapters.llama import LlamaLikeAdapter


class Phi3Adapter(LlamaLikeAdapter):
    """Adapter over ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and ``model.lm_head`` of a Phi-3."""

    model_types = frozenset({"phi3"})

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        dims = self.dims
        widths = (dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim)
        for index, block in enumerate(self._blocks):
            features = block.self_attn.qkv_proj.out_features
            if features != sum(widths):
                raise ValueError(f"layer {index}'s qkv_proj gives {features} features, expected (num_attention_heads "
                                 f"{dims.num_heads} + 2 * num_key_value_heads {dims.num_kv_heads}) * head_dim "
                                 f"{dims.head_dim} = {sum(widths)}: the adapter would split it otherwise than the "
                                 "model")
        self._qkv_widths = widths

    def _project(self, attn: torch.nn.Module, normed: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        head_dim = self.dims.head_dim
        return tuple(part.unflatten(-1, (-1, head_dim)) for part in attn.qkv_proj(normed).split(self._qkv_widths, -1))
