"""OLMo-2 and OLMo-3 (AllenAI): post-norm decoder layers (no norm before the attention or the MLP: each block's
output is normed, ``post_attention_layernorm`` / ``post_feedforward_layernorm``, before its residual add), q/k
RMSNorms over the whole projection (all heads at once, before the head reshape), RoPE, GQA, a gated SiLU MLP.
OLMo-3 adds sliding-window layers (``config.layer_types``) with RoPE tables per layer type.

As :class:`~sftint_fast.engine.adapters.llama.LlamaLikeAdapter`, whose embedding, RoPE tables, fused ops, final norm
and LM head it shares, the layer loop calls the HF modules themselves; only the attention goes to the engine.
"""
from __future__ import annotations

import torch

from sftint_fast.engine.adapters.base import AttendFn, FusedBackend, last_layer_rows
from sftint_fast.engine.adapters.llama import LlamaLikeAdapter, _call, _FusedOps

#: HF ``model_type`` values this adapter serves (each checked against the naive engine in tests/test_trie.py).
MODEL_TYPES = frozenset({"olmo2", "olmo3"})


class OlmoAdapter(LlamaLikeAdapter):
    """Adapter over OLMo-2 / OLMo-3's ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and ``model.lm_head``.

    What the layers' forwards read and this loop does not is refused (a ValueError, so the model runs naive): a norm
    before the attention or the MLP (a pre-norm or sandwich layout), q/k norms of another width than the whole
    projection's."""

    model_types = MODEL_TYPES

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        config = model.config
        # OLMo-3's rotary module takes the layer type (one table per type, as Gemma-3's); OLMo-2's takes none
        self._layer_types = tuple(config.layer_types) if config.model_type == "olmo3" else None
        for index, block in enumerate(self._blocks):
            extra = [name for name in ("input_layernorm", "pre_feedforward_layernorm") if hasattr(block, name)]
            if extra:
                raise ValueError(f"layer {index} ({type(block).__qualname__}) has {' and '.join(extra)}: this "
                                 "adapter runs OLMo's post-norm layers, with no norm before the attention or the MLP")
            attn = block.self_attn
            for name, heads in (("q_norm", self.dims.num_heads), ("k_norm", self.dims.num_kv_heads)):
                width = tuple(getattr(attn, name).weight.shape)
                if width != (heads * self.dims.head_dim,):
                    raise ValueError(f"layer {index}'s {name} has weight shape {width}: expected "
                                     f"({heads * self.dims.head_dim},), a norm over the whole projection "
                                     f"({heads} heads of {self.dims.head_dim})")

    def run_layers(self, embeds: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                   keep: torch.Tensor | None = None, fused: FusedBackend | None = None,
                   seq_len: int | None = None) -> torch.Tensor:
        """See :meth:`Adapter.run_layers` and :meth:`LlamaLikeAdapter.run_layers` (``fused``: the RMSNorms in
        ``(w * norm(x)).to(dtype)`` form, RoPE where its float32 tables are in ``x``'s dtype, the SiLU gate)."""
        tables = self._rope_tables(embeds.unsqueeze(0), positions, seq_len)
        head_dim = self.dims.head_dim
        ops = _FusedOps(self, fused) if fused else None
        norm = ops.norm if ops else _call
        mlp = ops.mlp if ops else _call
        hidden = embeds
        last = len(self._blocks) - 1
        for index, block in enumerate(self._blocks):
            attn = block.self_attn
            # the layer's input goes to the projections as it is; q/k norms over all heads, then the head reshape
            q = norm(attn.q_norm, attn.q_proj(hidden)).unflatten(-1, (-1, head_dim))
            k = norm(attn.k_norm, attn.k_proj(hidden)).unflatten(-1, (-1, head_dim))
            v = attn.v_proj(hidden).unflatten(-1, (-1, head_dim))
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
