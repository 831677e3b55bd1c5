"""Architecture adapters for the trie engine. ``get_adapter(model)`` → an :class:`Adapter`, or None if unsupported."""
from __future__ import annotations

import torch

from sftint_fast.engine.adapters.base import Adapter, AttendFn, LayerSpec, ModelDims
from sftint_fast.engine.adapters.gpt2 import GPT2Adapter
from sftint_fast.engine.adapters.llama import LlamaLikeAdapter

__all__ = ["Adapter", "AttendFn", "LayerSpec", "ModelDims", "find_adapter", "get_adapter", "wrapped_models"]

_ADAPTERS: tuple[type[Adapter], ...] = (LlamaLikeAdapter, GPT2Adapter)
SUPPORTED = ("llama", "qwen2", "mistral", "gemma3_text", "gpt2")


def get_adapter(model: torch.nn.Module) -> Adapter | None:
    """The adapter that runs ``model`` layer by layer for the trie engine, or None for an unsupported architecture.

    Supported: Llama / SmolLM2, Qwen2, Mistral, Gemma-3 text (``model_type`` llama, qwen2, mistral, gemma3_text)
    and GPT-2. The adapter reuses the model's own modules, so it follows later changes to the model's weights.
    Wrappers are looked through: a PEFT model (``get_base_model()``: its LoRA layers sit inside the HF model and run
    as the modules they replaced) and DDP / accelerate's ``.module``.
    """
    return find_adapter(model)[0]


def find_adapter(model: torch.nn.Module) -> tuple[Adapter | None, str]:
    """:func:`get_adapter`, with the reason when there is none: an architecture no adapter supports, or a supported
    one whose model code the adapter could not read (a transformers release that changed it): the engine then says
    why, and ``method="auto"`` falls back to the naive engine (same values, slower) instead of failing. A model split
    over devices (``device_map`` across GPUs, or offloaded) has no adapter: the trie keeps its KV stores on one device
    and calls the layers directly, without accelerate's hooks that move the activations between devices."""
    devices = sorted({str(p.device) for p in model.parameters()})
    if len(devices) > 1:
        return None, (f"{type(model).__name__} has its parameters on several devices ({', '.join(devices)}: a "
                      "device_map split or offload), and the trie engine runs a model on one device")
    for layer in wrapped_models(model):
        prompt_learning = _prompt_learning(layer)
        if prompt_learning is not None:  # its forward prepends virtual tokens: the layer loop below would drop them
            return None, (f"{type(layer).__name__} runs the prompt-learning adapter {prompt_learning}, whose virtual "
                          "tokens only its own forward prepends (the trie engine runs the base model's layers)")
        for adapter_cls in _ADAPTERS:
            if adapter_cls.supports(layer):
                try:
                    return adapter_cls(layer), ""
                except (AttributeError, TypeError, KeyError, IndexError, ValueError) as err:
                    import transformers

                    return None, (f"the {adapter_cls.__name__} could not read this {type(layer).__name__} "
                                  f"(model_type {getattr(layer.config, 'model_type', None)!r}, transformers "
                                  f"{transformers.__version__}): {type(err).__name__}: {err}")
    config = getattr(model, "config", None)
    return None, (f"no trie adapter for {type(model).__name__} (model_type "
                  f"{getattr(config, 'model_type', None)!r}; supported: {', '.join(SUPPORTED)})")


def _prompt_learning(model: torch.nn.Module) -> str | None:
    """The PEFT type of ``model``'s active adapter when it is a prompt-learning one (prompt / prefix / p-tuning)."""
    try:
        config = getattr(model, "active_peft_config", None)
    except (AttributeError, KeyError, TypeError):  # a PeftModel without an active adapter of one name
        return None
    if not getattr(config, "is_prompt_learning", False):
        return None
    return str(getattr(config.peft_type, "value", config.peft_type))


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
