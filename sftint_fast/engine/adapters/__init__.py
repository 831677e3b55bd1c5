"""Architecture adapters for the trie engine. ``get_adapter(model)`` → an :class:`Adapter`, or None if unsupported."""
from __future__ import annotations

import torch

from sftint_fast.engine.adapters.base import Adapter, AttendFn, LayerSpec, ModelDims
from sftint_fast.engine.adapters.gpt2 import GPT2Adapter
from sftint_fast.engine.adapters.llama import LlamaLikeAdapter

__all__ = ["Adapter", "AttendFn", "LayerSpec", "ModelDims", "find_adapter", "get_adapter", "user_hooks",
           "wrapped_models"]

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
    and calls the layers directly, without accelerate's hooks that move the activations between devices. Nor has a
    model with forward hooks or pre-hooks (:func:`user_hooks`): the naive engine runs them, the trie would not."""
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
                    adapter = adapter_cls(layer)
                except (AttributeError, TypeError, KeyError, IndexError, ValueError) as err:
                    import transformers

                    return None, (f"the {adapter_cls.__name__} could not read this {type(layer).__name__} "
                                  f"(model_type {getattr(layer.config, 'model_type', None)!r}, transformers "
                                  f"{transformers.__version__}): {type(err).__name__}: {err}")
                hooks = user_hooks(model)
                if hooks:
                    shown = "; ".join(hooks[:5]) + (f"; and {len(hooks) - 5} more" if len(hooks) > 5 else "")
                    return None, (f"{type(model).__name__} has forward hooks that the trie engine would not run as the "
                                  f"model's forward does ({shown}): it calls the layers' parts itself, on flat token "
                                  "batches, and skips the decoder layers' and blocks' own forwards; remove the hooks "
                                  "or evaluate with the naive engine, which runs them")
                return adapter, ""
    config = getattr(model, "config", None)
    return None, (f"no trie adapter for {type(model).__name__} (model_type "
                  f"{getattr(config, 'model_type', None)!r}; supported: {', '.join(SUPPORTED)})")


#: Forward hooks that libraries install and that change no value an engine computes, as ``(package, function name)``
#: of the hook function: transformers' output recorders (``output_hidden_states`` / ``output_attentions`` install them
#: on the decoder layers and attention modules, 5.x, and leave them there, inactive outside such a call),
#: ``enable_input_require_grads`` (gradient checkpointing: the embedding's output requires grad; transformers', and
#: PEFT's and TRL's copies), NEFTune's noise on the embedding (a ``Trainer`` with ``neftune_noise_alpha``; it adds
#: noise in training mode only, and the engines run the model in eval mode), and the global hooks of torch's module
#: trackers (``FlopCounterMode``: they only record which module runs), and TRL's activation offloading (an
#: ``SFTTrainer`` with ``activation_offloading``: lambdas on the LM head that enter and leave a no-op saved-tensors
#: context; a lambda is told by its full module name). Any other hook (a user's steering or ablation hook, a
#: module-global one, another library's) turns the trie off. The function name, not its qualified name: the
#: functions that install these hooks get renamed between releases.
LIBRARY_HOOKS = frozenset({("transformers", "output_capturing_hook"), ("transformers", "make_inputs_require_grads"),
                           ("transformers", "neftune_post_forward_hook"), ("peft", "make_inputs_require_grad"),
                           ("trl", "make_inputs_require_grad"), ("trl.models.activation_offloading", "<lambda>"),
                           # torch's module trackers (FlopCounterMode, the memory tracker): global observers
                           ("torch", "_fw_pre_hook"), ("torch", "_fw_post_hook")})
_HOOK_KINDS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"))


def _hook_origin(hook) -> tuple[str, str]:
    """``(module, name)`` of a hook: its function's, through ``functools.partial`` and bound methods; a callable
    object's class otherwise."""
    for _ in range(8):
        inner = getattr(hook, "func", None) or getattr(hook, "__func__", None)
        if inner is None:
            break
        hook = inner
    if not hasattr(hook, "__name__"):
        hook = type(hook)
    return str(getattr(hook, "__module__", None) or ""), str(getattr(hook, "__qualname__", hook.__name__))


def _library_hook(hook) -> bool:
    module, name = _hook_origin(hook)
    name = name.rsplit(".", 1)[-1]
    return (module.split(".", 1)[0], name) in LIBRARY_HOOKS or (module, name) in LIBRARY_HOOKS


def user_hooks(model: torch.nn.Module) -> list[str]:
    """``"module name: kind name"`` of each forward hook and pre-hook on ``model`` or its submodules (with or without
    kwargs, always-called ones too) and each module-global one (``torch.nn.modules.module
    .register_module_forward_hook`` / ``_pre_hook``), except :data:`LIBRARY_HOOKS`.

    The trie engine cannot honour them: it skips the modules whose forward the adapter replaces (the model and its
    inner ``model``, the decoder layers, attention and MLP blocks, the norms the fused ops stand in for) and calls the
    others (projections, embedding, LM head) on flat ``[tokens, hidden]`` batches of the trie's nodes (the last layer
    on the scored rows only), where the model's forward gives ``[batch, seq, hidden]``: a hook that reads positions
    would act on other numbers. So any such hook sends the model to the naive engine, which runs them as the model's
    forward does."""
    import torch.nn.modules.module as module_globals

    found = []
    for kind_attr, kind in _HOOK_KINDS:
        for hook in getattr(module_globals, f"_global{kind_attr}", {}).values():
            if not _library_hook(hook):
                found.append(f"every module (global): {kind} {_hook_origin(hook)[1]!r}")
    for name, module in model.named_modules():
        for kind_attr, kind in _HOOK_KINDS:
            for hook in getattr(module, kind_attr, {}).values():
                if not _library_hook(hook):
                    found.append(f"{name or type(module).__name__}: {kind} {_hook_origin(hook)[1]!r}")
    return found


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
