"""Architecture adapters for the trie engine. ``get_adapter(model)`` → an :class:`Adapter`, or None if unsupported."""
from __future__ import annotations

import torch

from sftint_fast.engine.adapters.base import Adapter, AttendFn, LayerSpec, ModelDims
from sftint_fast.engine.adapters.gpt2 import GPT2Adapter
from sftint_fast.engine.adapters.llama import LlamaLikeAdapter

__all__ = ["Adapter", "AttendFn", "LayerSpec", "ModelDims", "get_adapter", "wrapped_models"]

_ADAPTERS: tuple[type[Adapter], ...] = (LlamaLikeAdapter, GPT2Adapter)


def get_adapter(model: torch.nn.Module) -> Adapter | None:
    """The adapter that runs ``model`` layer by layer for the trie engine, or None for an unsupported architecture.

    Supported: Llama / SmolLM2, Qwen2, Mistral, Gemma-3 text (``model_type`` llama, qwen2, mistral, gemma3_text)
    and GPT-2. The adapter reuses the model's own modules, so it follows later changes to the model's weights.
    Wrappers are looked through: a PEFT model (``get_base_model()``: its LoRA layers sit inside the HF model and run
    as the modules they replaced) and DDP / accelerate's ``.module``.
    """
    for layer in wrapped_models(model):
        for adapter_cls in _ADAPTERS:
            if adapter_cls.supports(layer):
                return adapter_cls(layer)
    return None


def wrapped_models(model: torch.nn.Module, depth: int = 4):
    """``model``, then the model each wrapper holds: PEFT's ``get_base_model()``, DDP / accelerate's ``.module``
    (at most ``depth`` levels)."""
    for _ in range(depth):
        yield model
        unwrap = getattr(model, "get_base_model", None)
        inner = unwrap() if callable(unwrap) else getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module) or inner is model:
            return
        model = inner
