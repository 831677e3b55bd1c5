"""GPT-2: learned absolute position embeddings, fused Conv1D ``c_attn``, multi-head attention (no GQA)."""
from __future__ import annotations

import torch

from sftint_fast.engine.adapters.base import (Adapter, AttendFn, FusedBackend, LayerSpec, ModelDims, last_layer_rows,
                                              mlp_tensors)


class GPT2Adapter(Adapter):
    """Adapter over ``model.transformer.{wte, wpe, h, ln_f}`` and ``model.lm_head``."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        inner = model.transformer
        self._model, self._inner = model, inner
        self._wte = inner.wte
        self._wpe = inner.wpe
        self._blocks = list(inner.h)
        self._ln_f = inner.ln_f
        self._lm_head = model.lm_head
        hidden = config.n_embd
        self.dims = ModelDims(
            num_layers=len(self._blocks),
            num_heads=config.n_head,
            num_kv_heads=config.n_head,
            head_dim=hidden // config.n_head,
            hidden_size=hidden,
            intermediate_size=config.n_inner or 4 * hidden,
            vocab_size=config.vocab_size,
            dtype=self._wte.weight.dtype,
            mlp_tensors=mlp_tensors(self._blocks[0].mlp),
        )
        self.layers = tuple(LayerSpec(scale=float(block.attn.scaling)) for block in self._blocks)

    @classmethod
    def supports(cls, model: torch.nn.Module) -> bool:
        config = getattr(model, "config", None)
        return (getattr(config, "model_type", None) == "gpt2" and not getattr(config, "add_cross_attention", False)
                and hasattr(model, "transformer") and hasattr(model, "lm_head"))

    def skipped_modules(self) -> list[torch.nn.Module]:
        # the MLPs and LayerNorms run as modules
        return [self._inner, self._model] + [m for block in self._blocks for m in (block, block.attn)]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._wte(input_ids)

    def run_layers(self, embeds: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                   keep: torch.Tensor | None = None, fused: FusedBackend | None = None,
                   seq_len: int | None = None) -> torch.Tensor:
        # ``fused`` and ``seq_len`` change nothing here: GPT-2's LayerNorms, learned positions and GELU have no fused op
        width = embeds.shape[-1]
        head_dim = self.dims.head_dim
        hidden = embeds + self._wpe(positions)
        last = len(self._blocks) - 1
        for index, block in enumerate(self._blocks):
            q, k, v = block.attn.c_attn(block.ln_1(hidden)).split(width, dim=-1)
            heads = (-1, head_dim)
            out = attend(index, q.unflatten(-1, heads), k.unflatten(-1, heads), v.unflatten(-1, heads)).flatten(1)
            if index == last:
                out, hidden = last_layer_rows(out, hidden, keep)
                if not len(hidden):  # no row is read: this layer's K/V (stored by ``attend``) were all it gave
                    return hidden
            hidden = hidden + block.attn.c_proj(out)
            hidden = hidden + block.mlp(block.ln_2(hidden))
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(self._ln_f(hidden))
