"""StableLM (``model_type`` stablelm: StableLM-2, StableLM-3B-4E1T, StableCode): Llama-like attention and gated SiLU
MLP with LayerNorms (weight and bias), q/k/v biases (``use_qkv_bias``), partial RoPE (the first ``rotary_ndims``
dims of each head rotate, the attention splits them off itself before ``apply_rotary_pos_emb``), optional per-head
q/k LayerNorms (``qk_layernorm``: one ``nn.LayerNorm`` per head, a ``ModuleList``) and an optional parallel residual
(``use_parallel_residual``: ``x + attn(ln1(x)) + mlp(ln1(x))``, one LayerNorm per layer).

As :class:`~sftint_fast.engine.adapters.llama.LlamaLikeAdapter`, whose embedding, RoPE tables, final norm and LM
head it shares, the layer loop calls the HF modules themselves (LayerNorms, per-head norms, projections, MLP) and the
modeling code's ``apply_rotary_pos_emb`` on the same layouts, so every number is the model's; only the attention
goes to the engine. The decoder layers' dropout is not run: the engines evaluate in eval mode, where it is the
identity. The adapter reads the model's code and refuses (a ValueError: the model then runs naive) a release whose
forwards no longer compute as written above.
"""
from __future__ import annotations


import torch

from sftint_fast.engine.adapters.base import AttendFn, FusedBackend, last_layer_rows
from sftint_fast.engine.adapters.llama import LlamaLikeAdapter, _call, _FusedOps, check_source

#: HF ``model_type`` values this adapter serves (each checked against the naive engine in tests/test_more_adapters.py).
MODEL_TYPES = frozenset({"stablelm"})

#: ``(what, pattern)``: the ops of transformers' StableLM forwards (5.x) the adapter reproduces, as regular
#: expressions over the forward's source; ``what`` is ``"attn"`` (the attention module) or ``"layer"``.
_STABLELM_OPS = (
    ("attn", r"query_states\[\.\.\.,\s*:\s*self\.rotary_ndims\]"),
    ("attn", r"query_states\s*=\s*self\.q_layernorm\(query_states\)"),
    ("attn", r"query_states\s*=\s*torch\.cat\(\(query_rot,\s*query_pass\),\s*dim=-1\)"),
    ("layer", r"hidden_states\s*=\s*residual\s*\+\s*self_attn_output\s*\+\s*mlp_output"),
    ("layer", r"self\.mlp\(self\.post_attention_layernorm\(residual\)\)"),
)




class StableLmAdapter(LlamaLikeAdapter):
    """Adapter over StableLM's ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and ``model.lm_head``."""

    model_types = MODEL_TYPES

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        block = self._blocks[0]
        check_source({"attn": block.self_attn, "layer": block}, _STABLELM_OPS, "StableLM")
        self._rope_fusable = False  # partial RoPE: the model's function on the rotary dims
        # what the layers' forwards read (an AttributeError where a release renames it: the adapter refuses the model)
        self._parallel = tuple(bool(b.use_parallel_residual) for b in self._blocks)
        self._qk_norms = tuple(bool(b.self_attn.qk_layernorm) for b in self._blocks)
        self._rotary_dims = tuple(int(b.self_attn.rotary_ndims) for b in self._blocks)

    def skipped_modules(self) -> list[torch.nn.Module]:
        """:meth:`LlamaLikeAdapter.skipped_modules` and the layers' dropouts (identity in eval mode: not run)."""
        return super().skipped_modules() + [block.dropout for block in self._blocks]

    def run_layers(self, embeds: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                   keep: torch.Tensor | None = None, fused: FusedBackend | None = None,
                   seq_len: int | None = None) -> torch.Tensor:
        """See :meth:`Adapter.run_layers`. ``fused``: the gated SiLU MLP as the fused op; the LayerNorms and the
        partial RoPE run as the model's modules and function."""
        tables = self._rope_tables(embeds.unsqueeze(0), positions, seq_len)
        mlp = _FusedOps(self, fused).mlp if fused else _call
        hidden = embeds
        last = len(self._blocks) - 1
        for index, block in enumerate(self._blocks):
            attn = block.self_attn
            normed = block.input_layernorm(hidden)
            q, k, v = self._project(attn, normed)
            # as [1, heads, N, head_dim], the layout of the attention module's per-head norms and RoPE
            q, k = q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0)
            if self._qk_norms[index]:
                q, k = attn.q_layernorm(q), attn.k_layernorm(k)
            rot = self._rotary_dims[index]
            cos, sin = tables[index]
            q_rot, k_rot = self._apply_rope(q[..., :rot], k[..., :rot], cos, sin)
            q, k = torch.cat((q_rot, q[..., rot:]), dim=-1), torch.cat((k_rot, k[..., rot:]), dim=-1)
            out = attend(index, q[0].transpose(0, 1), k[0].transpose(0, 1), v).flatten(1)
            if index == last:
                out, hidden = last_layer_rows(out, hidden, keep)
                if keep is not None:
                    normed = normed.index_select(0, keep)
                if not len(hidden):  # no row is read: this layer's K/V (stored by ``attend``) were all it gave
                    return hidden
            out = attn.o_proj(out)
            if self._parallel[index]:  # x + attn(ln1(x)) + mlp(ln1(x)), summed in the model's order
                hidden = hidden + out + mlp(block.mlp, normed)
            else:
                hidden = hidden + out
                hidden = hidden + mlp(block.mlp, block.post_attention_layernorm(hidden))
        return hidden
