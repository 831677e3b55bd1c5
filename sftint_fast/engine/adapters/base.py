"""What the trie engine needs from a decoder: its shapes and a lean layer loop over the HF model's own modules."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

#: ``attend(layer, q, k, v) -> out``: q ``[N, Hq, D]`` (after RoPE), k/v ``[N, Hkv, D]`` of the ``N`` tokens being
#: computed, out ``[N, Hq, D]``. The engine stores k/v and attends over the ancestors' KV as well.
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: Fused elementwise ops for ``run_layers``: Triton (CUDA tensors, or the interpreter) or C++ (float32 CPU tensors).
FusedBackend = Literal["triton", "cpu"]


@dataclass(frozen=True)
class ModelDims:
    """Shapes that size the trie's KV store and activations."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    dtype: torch.dtype
    #: MLP-wide (``intermediate_size``) tensors one token keeps alive at its MLP's peak (:func:`mlp_tensors`)
    mlp_tensors: int = 3
    #: some layer soft-caps its attention logits (Gemma-2): the torch attention path then computes the scores in
    #: steps, as eager attention does, with the K/V repeated to every head (:func:`~sftint_fast.engine.plan.plan_trie`
    #: counts those tensors), where SDPA keeps at most one score-sized tensor
    softcap: bool = False
    #: bytes a forward holds while it runs whatever its tokens, beyond the model's weights (PEFT's adapted MoE expert
    #: weights, :func:`~sftint_fast.engine.adapters.moe.peft_weight_bytes`): the plan counts them once
    forward_bytes: int = 0
    #: some layer's attention has learned sinks (gpt-oss): the torch attention path then computes the scores in steps
    #: too, one more float32 score tensor (the sink column joined to the scores)
    sinks: bool = False

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


#: Activations that transformers writes as a chain of elementwise ops, and how many tensors of their input's size
#: each keeps alive at its peak, its output included (measured with a live-storage counter; one kernel: 1).
_ACTIVATION_TENSORS = {"NewGELUActivation": 3, "AccurateGELUActivation": 3, "FastGELUActivation": 4,
                       "LaplaceActivation": 3, "ClippedGELUActivation": 2, "QuickGELUActivation": 2,
                       "ReLUSquaredActivation": 2, "SqrtSoftplusActivation": 2, "XIELUActivation": 6}


def mlp_tensors(module: torch.nn.Module) -> int:
    """MLP-wide tensors one token keeps alive at the peak of the MLPs in ``module``: 3 (a gated MLP's gate, up
    projection and product), or the activation's input and its own peak where that is more: GPT-2's ``gelu_new``
    keeps its input, ``0.5 * x`` and two temporaries of its chain alive (4). One more where the gate and up
    projections are one (Phi-3's ``gate_up_proj``): its output, two MLP widths, stays alive until the product."""
    own = max((_ACTIVATION_TENSORS.get(type(m).__name__, 1) for m in module.modules()), default=1)
    fused_gate_up = any(isinstance(getattr(m, "gate_up_proj", None), torch.nn.Module) for m in module.modules())
    return max(3, 1 + own) + fused_gate_up


@dataclass(frozen=True)
class LayerSpec:
    """Attention options of one layer: softmax scale, sliding window (keys with ``q_pos - k_pos < w``), soft-cap,
    attention sinks (``[Hq]``: one learned logit per query head that joins the softmax's denominator and adds
    nothing to its output, gpt-oss's ``sinks``; the module's parameter itself, so later weight changes follow)."""

    scale: float
    sliding_window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None


class Adapter(ABC):
    """A decoder seen as ``embed → layers (attention through a callback) → final norm → LM head``."""

    dims: ModelDims
    layers: tuple[LayerSpec, ...]

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(L,)`` ids → ``(L, H)``: the embedding module's output, the rows a game's baseline replaces."""

    @abstractmethod
    def run_layers(self, embeds: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                   keep: torch.Tensor | None = None, fused: FusedBackend | None = None,
                   seq_len: int | None = None) -> torch.Tensor:
        """``embeds [N, H]`` (any tokens, flat) at absolute ``positions [N]`` → hidden ``[N, H]`` before the final
        norm. Every token-wise op runs on all ``N`` tokens at once; only ``attend`` sees their structure.
        ``seq_len``: the length of the sequences the tokens belong to (None = ``max(positions) + 1``): position
        encodings that depend on it (dynamic / longrope RoPE) are those of the model's forward on the full sequence.

        ``keep``: int64 row indices ``[R]`` whose final hidden state is needed (None = all). The last layer still
        computes and attends every row's K/V, but its output projection, residuals and MLP run on the ``keep`` rows
        only (:func:`last_layer_rows`), and the result is ``[R, H]`` in ``keep``'s order.
        ``fused``: use fused elementwise ops where the adapter has them: ``"triton"`` (CUDA tensors, or the
        interpreter) or ``"cpu"`` (the C++ extension's, float32 CPU tensors)."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the requested rows only: ``[..., H]`` → ``[..., V]``."""

    @abstractmethod
    def skipped_modules(self) -> list[torch.nn.Module]:
        """The modules whose own forwards the layer loop does not run (it calls their parts, or fused ops stand in
        for them), the inner model (of the architecture's modeling code) first: a forward replaced on one of them
        would not be run (:func:`~sftint_fast.engine.adapters.replaced_forwards`)."""


def last_layer_rows(out: torch.Tensor, hidden: torch.Tensor, keep: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the last layer's attention output and residual stream that the caller needs.

    Every op after the last attention is row-wise, so the rows nobody reads (the trie's inner nodes, whose K/V are
    all that later tokens need, and the unscored tokens of its leaves) are dropped before the output projection and
    the MLP: most of a layer's FLOPs. Exact: the kept rows see the same ops on the same inputs."""
    if keep is None:
        return out, hidden
    return out.index_select(0, keep), hidden.index_select(0, keep)

