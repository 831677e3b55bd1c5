"""IBM Granite (3.x; ``model_type`` granite): a Llama decoder with four scalar multipliers from its config.

What differs from Llama, and how the adapter carries it (each as transformers' ``modeling_granite`` computes it, on
the same tensors and in the same order, so the numbers are the model's):

- ``embedding_multiplier``: ``GraniteModel.forward`` multiplies its ``inputs_embeds`` by it, after the embedding
  module (so a game's baseline rows, which replace the embedding's output, are multiplied too): the adapter's
  ``embed`` returns the embedding's output and ``run_layers`` multiplies its input.
- ``attention_multiplier``: the attention's softmax scale (``GraniteAttention.scaling``), which the layers'
  :class:`~sftint_fast.engine.adapters.base.LayerSpec` carry, as every Llama-like adapter's.
- ``residual_multiplier``: ``residual + out * m`` after the attention and after the MLP
  (``GraniteDecoderLayer.residual_multiplier``).
- ``logits_scaling``: ``GraniteForCausalLM.forward`` divides the LM head's output by it.

The adapter reads the model's code and refuses (a ValueError: the model then runs naive) a release whose forwards
no longer apply a multiplier as written above.
"""
from __future__ import annotations


import torch

from sftint_fast.engine.adapters.base import AttendFn, FusedBackend
from sftint_fast.engine.adapters.llama import LlamaLikeAdapter, check_source

#: HF ``model_type`` values this adapter serves (each checked against the naive engine in tests/test_trie.py).
MODEL_TYPES = frozenset({"granite"})

#: ``(what, pattern)``: the ops of transformers' Granite forwards (5.x) the adapter reproduces, as regular
#: expressions over the forward's source; ``what`` is ``"model"`` (the causal LM), ``"inner"`` or ``"layer"``.
_GRANITE_OPS = (
    ("inner", r"inputs_embeds\s*=\s*inputs_embeds\s*\*\s*self\.embedding_multiplier\b"),
    ("layer", r"hidden_states\s*=\s*residual\s*\+\s*hidden_states\s*\*\s*self\.residual_multiplier\b"),
    ("model", r"logits\s*=\s*logits\s*/\s*self\.config\.logits_scaling\b"),
)


class GraniteAdapter(LlamaLikeAdapter):
    """Adapter over Granite's ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and ``model.lm_head``, with its
    embedding, residual and logit multipliers (read when the adapter is built, as the model's forward reads them)."""

    model_types = MODEL_TYPES

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        check_source({"model": model, "inner": self._inner, "layer": self._blocks[0]}, _GRANITE_OPS, "Granite")
        self._embedding_multiplier = _multiplier("embedding_multiplier", self._inner.embedding_multiplier)
        self._residual_multipliers = tuple(_multiplier(f"layer {index}'s residual_multiplier",
                                                       block.residual_multiplier)
                                           for index, block in enumerate(self._blocks))
        self._logits_scaling = _multiplier("config.logits_scaling", model.config.logits_scaling)

    def run_layers(self, embeds: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                   keep: torch.Tensor | None = None, fused: FusedBackend | None = None,
                   seq_len: int | None = None) -> torch.Tensor:
        """See :meth:`LlamaLikeAdapter.run_layers`; ``embeds`` (the embedding's outputs, or a game's baseline rows)
        are multiplied by ``embedding_multiplier`` first, as ``GraniteModel.forward`` multiplies its inputs_embeds."""
        return super().run_layers(embeds * self._embedding_multiplier, positions, attend, keep=keep, fused=fused,
                                  seq_len=seq_len)

    def _residual(self, index: int, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return hidden + out * self._residual_multipliers[index]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().logits(hidden) / self._logits_scaling


def _multiplier(name: str, value) -> float | int:
    """``value`` as the model's forward uses it (a Python number), else a TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number (int or float), received {type(value).__name__} {value!r}")
    return value
