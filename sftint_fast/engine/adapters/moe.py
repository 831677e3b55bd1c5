"""Mixture-of-Experts decoders whose attention is Llama's: Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE (``model_type``
qwen3_moe, mixtral, olmoe, qwen2_moe). Only the MLP differs: a sparse block (a top-k router ``gate`` and the
``experts``; Qwen2-MoE's adds a ``shared_expert`` behind a sigmoid ``shared_expert_gate``) on some or all layers.

What differs from Llama, and how the adapter carries it:

- The sparse block runs as its module, on the flat token batch as one sequence ``[1, N, H]`` (its forward reads
  ``(batch, seq, hidden)``). Exact: transformers' router and experts (eager loop, ``grouped_mm``, ``batched_mm``) are
  per token, with no capacity limit or token dropping, so a token's output is the same whatever other tokens share
  its batch. Mixtral's router jitter multiplies the input by noise in training mode only; the engines run in eval.
  Up to rounding: the router's logits are a matmul whose last bits may depend on the batch's shape, so where a
  token's k-th and (k+1)-th experts score within that rounding of each other (a near-tie) the trie's and the naive
  engine's batches may pick different experts for it, and their values differ by more than rounding there (as the
  model's own forward does between batch sizes). Exact ties (identical router rows) score bitwise equal and pick the
  same expert in both (tests/test_trie.py, every experts implementation on the CPU).
- A PEFT LoRA on the router's or the experts' weights (``LoraConfig(target_parameters=...)`` or
  ``target_modules=["gate"]``: a ``lora.ParamWrapper``, nested one per parameter) runs as the model's forward runs
  it: the block calls its ``gate`` / ``experts`` wrappers, which fold the LoRA into the weight for that call. The
  adapter reads the shapes from the wrapped module (``base_layer``); the plan counts what PEFT materialises per
  call, the whole adapted parameter (``E x 2I x H`` for ``gate_up_proj``, ``E x H x I`` for ``down_proj``) alive
  through the block's forward, as a fixed cost (:func:`peft_weight_bytes`). A merged LoRA is the base weights. PEFT
  refuses ``lora_dropout`` on a ``ParamWrapper``; a LoRA's dropout elsewhere is the identity in eval mode, where the
  engines run.
- Dense and sparse layers mixed (Qwen-MoE's ``decoder_sparse_step`` / ``mlp_only_layers``): each layer's ``mlp`` is
  read as it is, a gated MLP (``gate_proj``, ``up_proj``, ``down_proj``) or a sparse block.
- OLMoE's q/k RMSNorms span the whole projection (all heads, before the head reshape, as OLMo-2's) and its
  ``clip_qkv`` clamps q, k and v after them; Qwen3-MoE's are per head (as Qwen3's).
- Windows: Mixtral's ``config.sliding_window`` masks every layer (as Mistral's); Qwen3-MoE's attention modules carry
  the window of its every-layer mask; Qwen2-MoE's follow ``layer_types`` (as Qwen2's). OLMoE's forward masks without a
  window while its attention passes ``config.sliding_window`` to flash attention: a window there is refused.
- The layer's forward must call ``hidden_states = self.mlp(hidden_states)`` and take a tensor back (transformers
  5.x); transformers 4.x's layers (Mixtral's ``block_sparse_moe``, blocks returning ``(hidden, router_logits)``) are
  refused, as is any sparse block the adapter does not know (``experts`` / ``gate`` missing).
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch

from sftint_fast.engine.adapters.base import _ACTIVATION_TENSORS, mlp_tensors
from sftint_fast.engine.adapters.llama import LlamaLikeAdapter, _forward_source

#: HF ``model_type`` values this adapter serves (each checked against the naive engine in tests/test_trie.py).
MODEL_TYPES = frozenset({"qwen3_moe", "mixtral", "olmoe", "qwen2_moe"})


class MoeAdapter(LlamaLikeAdapter):
    """Adapter over ``model.model.{embed_tokens, layers, norm, rotary_emb}`` and ``model.lm_head`` of a Llama-like
    Mixture-of-Experts decoder. What the layers' forwards do that this loop does not carry is refused (a ValueError,
    so the model runs naive)."""

    model_types = MODEL_TYPES

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self._whole_qk_norm = config.model_type == "olmoe"
        self._clip_qkv = getattr(config, "clip_qkv", None) if self._whole_qk_norm else None
        if self._whole_qk_norm and getattr(config, "sliding_window", None) is not None:
            raise ValueError(f"its config has sliding_window={config.sliding_window}, which OLMoE's attention passes "
                             "to flash attention while its forward's mask has no window: the model's attention "
                             "implementations disagree, so the adapter does not pick one")
        if self._clip_qkv is not None and (isinstance(self._clip_qkv, bool) or not isinstance(
                self._clip_qkv, (int, float)) or not 0 < self._clip_qkv < math.inf):
            raise ValueError(f"clip_qkv: expected None or a positive finite number, received {self._clip_qkv!r}")
        dims = self.dims
        for index, block in enumerate(self._blocks):  # OLMoE's q/k norms span the projection, Qwen3-MoE's a head
            for name, heads in (("q_norm", dims.num_heads), ("k_norm", dims.num_kv_heads)):
                norm = getattr(block.self_attn, name, None)
                if norm is None:
                    continue
                width, expected = tuple(norm.weight.shape), (heads * dims.head_dim if self._whole_qk_norm
                                                             else dims.head_dim,)
                if width != expected:
                    raise ValueError(f"layer {index}'s {name} has weight shape {width}: expected {expected}, a norm "
                                     f"over {'the whole projection' if self._whole_qk_norm else 'each head'} "
                                     f"({heads} heads of {dims.head_dim}), as {config.model_type}'s attention has")
        source = _forward_source(self._blocks[0])
        if source is None or not re.search(r"hidden_states\s*=\s*self\.mlp\(hidden_states\)\s*\n", source) or (
                "router_logits" in source or re.search(r"isinstance\(hidden_states,\s*tuple\)", source)):
            raise ValueError(f"its decoder layer's forward ({type(self._blocks[0]).__qualname__}) does not call "
                             "`hidden_states = self.mlp(hidden_states)` and take a tensor back (transformers 4.x's MoE "
                             "layers call block_sparse_moe or unpack (hidden, router_logits)), which is what this "
                             "adapter runs")
        self._sparse = frozenset(id(block.mlp) for block in self._blocks if _is_sparse(block.mlp))
        implementation = getattr(config, "_experts_implementation", None) or "eager"
        widths, elements, weights = [], [], [0]
        for index, block in enumerate(self._blocks):
            mlp = block.mlp
            if id(mlp) in self._sparse:
                widths.append(_base(mlp.experts).intermediate_dim)
                elements.append(moe_block_elements(mlp, implementation, self.dims.dtype_bytes))
                weights.append(peft_weight_bytes(mlp))
            elif all(isinstance(getattr(mlp, name, None), torch.nn.Module)
                     for name in ("gate_proj", "up_proj", "down_proj")):
                widths.append(mlp.down_proj.in_features)
                elements.append(mlp_tensors(mlp) * mlp.down_proj.in_features)
            else:
                raise ValueError(f"layer {index}'s mlp ({type(mlp).__qualname__}) is neither a gated MLP (gate_proj, "
                                 "up_proj, down_proj) nor a sparse MoE block (a router `gate` with top_k and "
                                 "`experts` with num_experts, hidden_dim, intermediate_dim, act_fn), which this "
                                 "adapter runs")
        # The planner counts ``mlp_tensors * intermediate_size`` elements per token at the MLP's peak: the widest
        # MLP, times as many of its widths as the most demanding layer keeps alive per token (rounded up: safe)
        width = max(widths)
        # PEFT's adapted expert weights live while one block runs: the largest block's, whatever the tokens
        self.dims = dataclasses.replace(self.dims, intermediate_size=width,
                                        mlp_tensors=max(1, -(-max(elements) // width)), forward_bytes=max(weights))
        dense = [block.mlp for block in self._blocks if id(block.mlp) not in self._sparse]
        self._mlp_fusable = bool(dense) and all(
            isinstance(mlp.act_fn, torch.nn.SiLU) or type(mlp.act_fn).__name__ == "SiLUActivation" for mlp in dense)

    def skipped_modules(self) -> list[torch.nn.Module]:
        """As :meth:`LlamaLikeAdapter.skipped_modules`, less the sparse blocks: they run as their modules."""
        return [m for m in super().skipped_modules() if id(m) not in self._sparse]

    def _mlp_call(self, ops):
        dense = super()._mlp_call(ops)
        sparse = self._sparse

        def run(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            if id(module) in sparse:  # the flat tokens as one sequence: the block's forward reads (batch, seq, hidden)
                return module(x.unsqueeze(0)).squeeze(0)
            return dense(module, x)

        return run

    def _normed_qkv(self, norm, attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._whole_qk_norm:
            return super()._normed_qkv(norm, attn, q, k, v)
        # OLMoE: norms over all heads at once (the projection's width), then ``clip_qkv`` on q, k and v, as its
        # attention does before the head reshape; flattening the fresh ``[N, heads, D]`` views is the projection
        q, k = norm(attn.q_norm, q.flatten(1)).unflatten(-1, q.shape[1:]), norm(attn.k_norm, k.flatten(1)).unflatten(
            -1, k.shape[1:])
        if self._clip_qkv is not None:
            clip = self._clip_qkv
            q, k, v = (t.clamp(min=-clip, max=clip) for t in (q, k, v))
        return q, k, v


def _base(module: torch.nn.Module) -> torch.nn.Module:
    """The module under PEFT's layers (``base_layer`` after ``base_layer``: ``lora.ParamWrapper`` nests one per
    adapted parameter), or ``module`` itself."""
    while isinstance(getattr(module, "base_layer", None), torch.nn.Module):
        module = module.base_layer
    return module


def _is_sparse(mlp: torch.nn.Module) -> bool:
    experts, gate = (_base(module) if isinstance(module := getattr(mlp, name, None), torch.nn.Module) else None
                     for name in ("experts", "gate"))
    return (isinstance(experts, torch.nn.Module) and isinstance(gate, torch.nn.Module) and hasattr(gate, "top_k")
            and all(hasattr(experts, name) for name in ("num_experts", "hidden_dim", "intermediate_dim", "act_fn")))


def _is_gpt_oss_block(mlp: torch.nn.Module) -> bool:
    """gpt-oss's sparse block (``GptOssMLP``): a top-k ``router`` and experts of its own attribute names."""
    experts, router = getattr(mlp, "experts", None), getattr(mlp, "router", None)
    return (isinstance(experts, torch.nn.Module) and isinstance(router, torch.nn.Module) and hasattr(router, "top_k")
            and all(hasattr(experts, name) for name in ("num_experts", "hidden_size", "intermediate_size")))


def peft_weight_bytes(block: torch.nn.Module) -> int:
    """Bytes PEFT's ``lora.ParamWrapper`` layers in a sparse block's router and experts materialise while the block
    runs, whatever its tokens (0 without them), an over-estimate.

    Each call of a wrapper registers a parametrization of its parameter and runs the wrapped module under
    ``torch.nn.utils.parametrize.cached()``: the adapted parameter, one tensor of the parameter's shape and dtype
    (``baddbmm(W, B, A)``, a single adapter on a 3-D parameter), is computed on first use and lives until the
    outermost wrapper returns, so the nested wrappers of one module hold theirs together. With several adapters, a
    2-D parameter (the router) or a float8 one, PEFT builds the delta weight first (held by the parametrization)
    and adds it, summing the adapters' deltas in turn: three of the parameter's size at the most. A merged LoRA
    runs the base weights, but unmerging it (a disabled adapter) builds one delta: counted the same. A PEFT
    without the factors path (``_LoraFactorsProxy``, before 0.22) builds delta and sum for a 3-D parameter too:
    three of its size there."""
    total, factors_path = 0, _peft_factors_path()
    for name in ("gate", "experts"):
        module = getattr(block, name, None)
        while isinstance(module, torch.nn.Module) and isinstance(getattr(module, "base_layer", None),
                                                                 torch.nn.Module):
            get_param, adapters = getattr(module, "get_param", None), getattr(module, "lora_A", None)
            if callable(get_param) and adapters is not None:
                param = get_param()
                factors = (factors_path and len(adapters) == 1 and param.dim() == 3 and param.dtype.is_floating_point
                           and param.element_size() > 1)
                total += (1 if factors else 3) * param.numel() * param.element_size()
            module = module.base_layer
    return total


def _peft_factors_path() -> bool:
    """Whether the installed PEFT adapts a single-adapter 3-D parameter as ``baddbmm(W, B, A)`` (one tensor of the
    parameter's size; ``_LoraFactorsProxy``) rather than building its delta weight first."""
    try:
        from peft.tuners.lora import layer
    except ImportError:
        return False
    return hasattr(layer, "_LoraFactorsProxy")


def moe_block_elements(block: torch.nn.Module, implementation: str, dtype_bytes: int) -> int:
    """Elements (of the model's dtype) one token keeps alive at the peak of a sparse MoE block, an over-estimate.

    With ``H`` hidden, ``I`` an expert's width, ``E`` experts, ``k`` of them per token, ``a`` the tensors the
    activation keeps alive (1 for SiLU) and ``b`` bytes per element, in bytes per token:

    - the router: its logits ``E·b``, their float32 softmax ``4E``, the top-k values (float32) and indices (int64),
      the weights cast back ``k·(12 + b)``;
    - ``eager`` (the loop over experts): the int64 one-hot expert mask ``8k(E + 1)`` and the output accumulator
      ``H·b``; each expert's step gathers its tokens (``H``), projects them to ``2I`` (gate and up, alive until the
      next step), the activation and product (``max(2, a)·I``), the down projection and its weighted copy (float32
      when the router's weights are, as Mixtral's) and the cast back (``H·(2 + 4/b)``), with int64 indices. A token
      is at most once in a step, but the previous step's tensors live on while the next is built: two steps' worth;
    - ``grouped_mm`` / ``batched_mm``: the same per (token, expert) pair, ``k`` of them for every token at once, the
      sort's int64 permutations, and the float32 sum over the ``k``; ``batched_mm`` also gathers each pair's expert
      weights, ``3I·H`` (the down projection's ``I·H`` are gathered while the gate-up's ``2I·H`` are still held).
      Any other implementation (a hub kernel) is counted as ``batched_mm``, the largest;
    - a shared expert (Qwen2-MoE): its MLP's peak, then its output, gate and the sum (``3H + 2``).
    """
    if isinstance(getattr(block, "router", None), torch.nn.Module):  # gpt-oss's block: its own experts' forward
        return _gpt_oss_block_elements(block, implementation, dtype_bytes)
    experts, gate = _base(block.experts), _base(block.gate)
    hidden, width, num_experts, top_k = experts.hidden_dim, experts.intermediate_dim, experts.num_experts, gate.top_k
    act = _ACTIVATION_TENSORS.get(type(experts.act_fn).__name__, 1)
    b = dtype_bytes
    router = num_experts * (b + 4) + top_k * (12 + b)
    pair = hidden * b + (2 + max(2, act)) * width * b + hidden * (2 * b + 4) + 3 * 8
    if implementation == "eager":
        total = router + 8 * top_k * (num_experts + 1) + hidden * b + 2 * pair
    else:
        total = router + top_k * (pair + 4 * 8) + hidden * (4 + b)
        if implementation != "grouped_mm":  # batched_mm, or a kernel this estimate does not know
            total += top_k * 3 * width * hidden * b
    shared = getattr(block, "shared_expert", None)
    if isinstance(shared, torch.nn.Module):
        total += (mlp_tensors(shared) * shared.down_proj.in_features + 3 * hidden + 2) * b
    return -(-total // b)


def _gpt_oss_block_elements(block: torch.nn.Module, implementation: str, dtype_bytes: int) -> int:
    """:func:`moe_block_elements` of gpt-oss's ``GptOssMLP`` (``router``, ``experts`` with biases and the clamped
    SwiGLU over the interleaved gate / up columns), in bytes per token as there:

    - the router: its logits ``E·b``, the top-k values and their softmax ``2k·b``, the indices ``8k``;
    - ``eager``: the int64 one-hot mask ``8k(E + 1)`` and the accumulator ``H·b``; each expert's step gathers its
      tokens (``H``), projects them to ``2I`` and adds the bias (``2I`` more), gates them (the clamped gate and up,
      the sigmoid's input and output, the gated product, ``up + 1`` and the result: ``5I`` beyond the projection),
      projects down and adds the bias and the routing weight (``3H``), with int64 indices; two steps' worth;
    - ``grouped_mm`` / ``batched_mm``: the same per (token, expert) pair, ``k`` of them, the sort's permutations,
      and the float32 sum over the ``k``; ``batched_mm`` (or a kernel) also gathers each pair's weights and biases,
      ``3I·H + 2I + H``."""
    experts, router = block.experts, block.router
    hidden, width = experts.hidden_size, experts.intermediate_size
    num_experts, top_k = experts.num_experts, router.top_k
    b = dtype_bytes
    total = num_experts * b + top_k * (2 * b + 8)
    pair = 4 * hidden * b + 9 * width * b + 3 * 8
    if implementation == "eager":
        total += 8 * top_k * (num_experts + 1) + hidden * b + 2 * pair
    else:
        total += top_k * (pair + 4 * 8) + hidden * (4 + b)
        if implementation != "grouped_mm":
            total += top_k * (3 * width * hidden + 2 * width + hidden) * b
    return -(-total // b)
