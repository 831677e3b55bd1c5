"""Llama-like decoders (Llama, SmolLM2, Qwen2, Mistral, Gemma-3 text): pre-norm blocks with RoPE and GQA.

The layer loop calls the HF modules themselves (norms, projections, rotary embedding, MLP, LM head), so every
number equals the model's own forward; only the attention is handed to the engine's callback.
"""
from __future__ import annotations

import sys

import torch

from sftint_fast.engine.adapters.base import Adapter, AttendFn, LayerSpec, ModelDims

#: HF ``model_type`` values this adapter serves (each checked against the naive engine in tests/test_trie.py).
MODEL_TYPES = frozenset({"llama", "qwen2", "mistral", "gemma3_text"})


class LlamaLikeAdapter(Adapter):
    """Adapter over ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and ``model.lm_head``."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        inner = model.model
        self._embed_tokens = inner.embed_tokens
        self._blocks = list(inner.layers[: config.num_hidden_layers])
        self._norm = inner.norm
        self._rotary = inner.rotary_emb
        self._lm_head = model.lm_head
        self._apply_rope = sys.modules[type(inner).__module__].apply_rotary_pos_emb
        self._final_softcap = getattr(config, "final_logit_softcapping", None)
        # Gemma-3 keeps one rotary table per layer type; the others take no layer type argument.
        self._layer_types = tuple(config.layer_types) if config.model_type == "gemma3_text" else None
        self._sandwich = hasattr(self._blocks[0], "pre_feedforward_layernorm")
        attn0 = self._blocks[0].self_attn
        self.dims = ModelDims(
            num_layers=len(self._blocks),
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=attn0.head_dim,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            dtype=self._embed_tokens.weight.dtype,
        )
        mistral_window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        self.layers = tuple(
            LayerSpec(scale=float(block.self_attn.scaling),
                      sliding_window=getattr(block.self_attn, "sliding_window", mistral_window))
            for block in self._blocks
        )

    @classmethod
    def supports(cls, model: torch.nn.Module) -> bool:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in MODEL_TYPES:
            return False
        if getattr(config, "use_bidirectional_attention", False):
            return False
        inner = getattr(model, "model", None)
        return all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")) and hasattr(
            model, "lm_head")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._embed_tokens(input_ids)

    def _rope_tables(self, x: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        position_ids = positions.unsqueeze(0)
        if self._layer_types is None:
            table = self._rotary(x, position_ids)
            return [table] * len(self._blocks)
        tables = {kind: self._rotary(x, position_ids, kind) for kind in set(self._layer_types)}
        return [tables[kind] for kind in self._layer_types]

    def run_layers(self, embeds: torch.Tensor, positions: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        tables = self._rope_tables(embeds.unsqueeze(0), positions)
        head_dim = self.dims.head_dim
        hidden = embeds
        for index, block in enumerate(self._blocks):
            attn = block.self_attn
            normed = block.input_layernorm(hidden)
            q = attn.q_proj(normed).unflatten(-1, (-1, head_dim))
            k = attn.k_proj(normed).unflatten(-1, (-1, head_dim))
            v = attn.v_proj(normed).unflatten(-1, (-1, head_dim))
            if hasattr(attn, "q_norm"):
                q = attn.q_norm(q)
                k = attn.k_norm(k)
            cos, sin = tables[index]
            # cos/sin are [1, N, D]: rotate [1, N, H, D] views of the flat tokens.
            q, k = self._apply_rope(q.unsqueeze(0), k.unsqueeze(0), cos, sin, unsqueeze_dim=2)
            out = attn.o_proj(attend(index, q[0], k[0], v).flatten(1))
            if self._sandwich:
                hidden = hidden + block.post_attention_layernorm(out)
                hidden = hidden + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(hidden)))
            else:
                hidden = hidden + out
                hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._lm_head(self._norm(hidden))
        if self._final_softcap is not None:
            logits = torch.tanh(logits / self._final_softcap) * self._final_softcap
        return logits
