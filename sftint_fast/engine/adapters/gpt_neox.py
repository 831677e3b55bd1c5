"""GPT-NeoX (Pythia): fused ``query_key_value`` projection laid out ``[heads, (q, k, v), head_dim]``, partial RoPE
(the first ``rotary_ndims`` dims of each head rotate), parallel or sequential residual, LayerNorms, an LM head of its
own (untied in Pythia; tied ones run the same).

The layer loop calls the HF modules themselves (LayerNorms, projections, rotary embedding, MLP, LM head) and the
modeling code's ``apply_rotary_pos_emb``, so every number equals the model's own forward; only the attention is
handed to the engine's callback. The dropouts (embedding, after the attention and the MLP, on the attention weights)
are not run: the engines evaluate in eval mode, where they are the identity.
"""
from __future__ import annotations

import inspect
import sys

import torch

from sftint_fast.engine.adapters.base import (Adapter, AttendFn, FusedBackend, LayerSpec, ModelDims, last_layer_rows,
                                              mlp_tensors)
from sftint_fast.engine.adapters.llama import _length_dependent_rope

#: Words whose presence in the attention module's forward means it passes the attention function an option this
#: adapter does not carry (a logit soft-cap, a sliding window): such a release's model is refused, not computed wrong.
_ATTENTION_OPTIONS = ("softcap", "sliding_window")


class GPTNeoXAdapter(Adapter):
    """Adapter over ``model.gpt_neox.{embed_in, layers, final_layer_norm, rotary_emb}`` and the LM head
    (``model.lm_head``, ``model.embed_out`` before transformers 5)."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        inner = model.gpt_neox
        self._model, self._inner = model, inner
        self._embed_in = inner.embed_in
        self._blocks = list(inner.layers[: config.num_hidden_layers])
        self._final_norm = inner.final_layer_norm
        self._rotary = inner.rotary_emb
        self._lm_head = _lm_head(model)
        self._apply_rope = sys.modules[type(inner).__module__].apply_rotary_pos_emb
        attn0 = self._blocks[0].attention
        found = _attention_options(attn0)
        if found:
            raise ValueError(f"its attention's forward ({type(attn0).__qualname__}) passes {' and '.join(found)} to "
                             "the attention function, which this adapter does not carry over")
        # what the layers' forwards read: the residual form of each layer, the head width of the fused projection
        self._parallel = tuple(bool(block.use_parallel_residual) for block in self._blocks)
        self.dims = ModelDims(
            num_layers=len(self._blocks),
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_attention_heads,
            head_dim=attn0.head_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            dtype=self._embed_in.weight.dtype,
            mlp_tensors=mlp_tensors(self._blocks[0].mlp),
        )
        self.layers = tuple(LayerSpec(scale=float(block.attention.scaling)) for block in self._blocks)
        # dynamic / longrope RoPE: the tables of the whole sequence's positions, as in the model's forward
        self._rope_by_length = _length_dependent_rope(self._rotary)

    @classmethod
    def supports(cls, model: torch.nn.Module) -> bool:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "gpt_neox":
            return False
        inner = getattr(model, "gpt_neox", None)
        return all(hasattr(inner, name) for name in ("embed_in", "layers", "final_layer_norm", "rotary_emb")) and (
            _lm_head(model) is not None)

    def skipped_modules(self) -> list[torch.nn.Module]:
        """The models, decoder layers, attention modules and the dropouts (identity in eval mode: not run); the
        LayerNorms, MLPs and projections run as modules (no fused op reproduces LayerNorm or GELU)."""
        modules = [self._inner, self._model, self._inner.emb_dropout]
        for block in self._blocks:
            modules += [block, block.attention, block.post_attention_dropout, block.post_mlp_dropout]
        return modules

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._embed_in(input_ids)

    def _rope_table(self, x: torch.Tensor, positions: torch.Tensor,
                    seq_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope_by_length and seq_len is not None:  # the full sequence's tables, then this pass's rows
            cos, sin = self._rotary(x, torch.arange(seq_len, device=positions.device).unsqueeze(0))
            return cos[:, positions], sin[:, positions]
        return self._rotary(x, positions.unsqueeze(0))

    def run_layers(self, embeds: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                   keep: torch.Tensor | None = None, fused: FusedBackend | None = None,
                   seq_len: int | None = None) -> torch.Tensor:
        """See :meth:`Adapter.run_layers`. ``fused`` changes nothing: no fused op reproduces GPT-NeoX's LayerNorms,
        partial RoPE or GELU, so they run as the model's modules and function."""
        cos, sin = self._rope_table(embeds.unsqueeze(0), positions, seq_len)  # [1, N, rotary dims]
        head_dim = self.dims.head_dim
        hidden = embeds
        last = len(self._blocks) - 1
        for index, block in enumerate(self._blocks):
            attn = block.attention
            # [N, heads, 3 * head_dim], each head's q, k and v side by side: the attention module's view and chunk
            q, k, v = attn.query_key_value(block.input_layernorm(hidden)).unflatten(-1, (-1, 3 * head_dim)).chunk(
                3, dim=-1)
            # rotated as [1, heads, N, head_dim], the layout the attention module gives the function (its first
            # cos.shape[-1] dims rotate, the rest pass)
            q, k = self._apply_rope(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), cos, sin)
            out = attend(index, q[0].transpose(0, 1), k[0].transpose(0, 1), v).flatten(1)
            if index == last:
                out, hidden = last_layer_rows(out, hidden, keep)
                if not len(hidden):  # no row is read: this layer's K/V (stored by ``attend``) were all it gave
                    return hidden
            out = attn.dense(out)
            if self._parallel[index]:  # x + attn(ln1(x)) + mlp(ln2(x)), summed in the model's order
                hidden = block.mlp(block.post_attention_layernorm(hidden)) + out + hidden
            else:
                out = out + hidden
                hidden = block.mlp(block.post_attention_layernorm(out)) + out
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._lm_head(self._final_norm(hidden))


def _lm_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The LM head: ``lm_head`` (transformers 5), ``embed_out`` (4.x)."""
    for name in ("lm_head", "embed_out"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    return None


def _attention_options(attn: torch.nn.Module) -> list[str]:
    """The words of :data:`_ATTENTION_OPTIONS` in the attention module's forward (none in transformers 4.56 to 5.25);
    all of them when its source cannot be read."""
    try:
        source = inspect.getsource(type(attn).forward)
    except (OSError, TypeError):
        return list(_ATTENTION_OPTIONS)
    return [word for word in _ATTENTION_OPTIONS if word in source]
