"""The trie's layer-loop elementwise ops on the CPU (C++, ``csrc/layer_ops.cpp``), and the log-odds of logits.

On the CPU the matrix products run near the machine's peak, and what is left of a layer is HF's elementwise code: an
RMSNorm is six ATen ops, RoPE five per tensor, the gate two, each a full pass over the activations into a fresh
allocation. These are one pass each (RoPE and the gate in place, into the projection outputs they consume). float32
only (the CPU's evaluation dtype). Tests: ``tests/test_layer_ops.py``; the engine uses them through
``LlamaLikeAdapter.run_layers(fused="cpu")``, the game's value through :func:`log_odds`.

Example::

    >>> x, w = torch.randn(4, 8), torch.ones(8)
    >>> torch.allclose(rms_norm(x, w, 1e-6), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), atol=1e-6)
    True
"""
from __future__ import annotations

import torch

from sftint_fast._ext import extension_status, has_ext


def available(x: torch.Tensor) -> bool:
    """Whether the layer ops can run on ``x``: a float32 CPU tensor that autograd does not track (they have no
    backward), with the C++ extension loaded."""
    return not (x.requires_grad and torch.is_grad_enabled()) and log_odds_available(x)


def log_odds_available(logits: torch.Tensor) -> bool:
    """Whether :func:`log_odds` can run on ``logits``: a float32 CPU tensor, with the C++ extension loaded (it has
    a backward: a learned baseline differentiates through the game's value)."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and has_ext()


def _op(name: str, **untracked: torch.Tensor):
    """``torch.ops.sftint.<name>``, loading the extension first (nothing else may have imported it yet); a clear
    RuntimeError without it, a ValueError for any of ``untracked`` (argument name → tensor) that autograd tracks
    (these ops have no backward: a tracked weight or table would silently get no gradient)."""
    ok, reason = extension_status()
    if not ok:
        raise RuntimeError(f"{name}: needs the C++ extension sftint_fast._C, which is unavailable: {reason} "
                           f"(check layer_ops.available(x) first)")
    for arg, t in untracked.items():
        if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name}: {arg}: expected a tensor autograd does not track (the op has no backward), "
                             f"got one with requires_grad=True; call it under torch.no_grad() or pass {arg}.detach()")
    return getattr(torch.ops.sftint, name)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, gemma: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension of float32 ``x [..., H]`` with ``weight [H]``, as HF computes it:
    ``weight * (x * rsqrt(mean(x²) + eps))`` (Llama, Qwen2, Qwen3, Mistral, SmolLM3) or, ``gemma=True`` (Gemma-3),
    ``x * rsqrt(mean(x²) + eps) * (1 + weight)``. A new tensor."""
    return _op("rms_norm", x=x, weight=weight)(x, weight, float(eps), bool(gemma))


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of float32 ``x [N, heads, D]`` (unit stride over ``D``) with per-token tables
    ``cos, sin [N, D]``, **in place**: ``x ← x * cos + rotate_half(x) * sin`` (HF's ``apply_rotary_pos_emb``, the
    same float32 roundings). Returns ``x``."""
    _op("rope_", x=x, cos=cos, sin=sin)(x, cos, sin)
    return x


def silu_mul_(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's ``silu(gate) * up`` on float32 tensors of one shape, **in place** into ``gate``
    (contiguous). Returns ``gate``."""
    _op("silu_mul_", gate=gate, up=up)(gate, up)
    return gate


def log_odds(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 CPU ``logits [B, m, V]`` and token ids ``target [m]`` → ``(values [B], finite [B])``:
    ``values[b] = Σ_j logits[b, j, t_j] − logsumexp_{k ≠ t_j} logits[b, j, k]`` (the game's log-odds value) and
    whether every logit of row ``b`` is finite. One read of the logits, no temporaries. Differentiable in
    ``logits`` (:func:`_log_odds_backward`)."""
    return _op("log_odds")(logits, target)


def _log_odds_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _log_odds_backward(ctx, grad_values: torch.Tensor, grad_finite: torch.Tensor | None):
    """``∂ value_b / ∂ logits[b, j, k]`` = 1 at ``k = t_j``, else ``−softmax_{k ≠ t_j}(logits[b, j])_k``."""
    logits, target = ctx.saved_tensors
    y = target.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    # out of place: under create_graph=True softmax's backward reads its output (an in-place neg_ broke it)
    grad = logits.scatter(-1, y, float("-inf")).softmax(-1).neg().scatter(-1, y, 1.0)
    return grad * grad_values.view(-1, 1, 1), None
