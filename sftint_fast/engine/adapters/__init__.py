"""Architecture adapters for the trie engine. ``get_adapter(model)`` → an :class:`Adapter`, or None if unsupported."""
from __future__ import annotations

import types

import torch

from sftint_fast.engine.adapters.base import Adapter, AttendFn, LayerSpec, ModelDims
from sftint_fast.engine.adapters.cohere import CohereAdapter
from sftint_fast.engine.adapters.exaone4 import Exaone4Adapter
from sftint_fast.engine.adapters.gpt2 import GPT2Adapter
from sftint_fast.engine.adapters.gpt_neox import GPTNeoXAdapter
from sftint_fast.engine.adapters.gpt_oss import GptOssAdapter
from sftint_fast.engine.adapters.granite import GraniteAdapter
from sftint_fast.engine.adapters.llama import LlamaLikeAdapter
from sftint_fast.engine.adapters.moe import MoeAdapter
from sftint_fast.engine.adapters.olmo import OlmoAdapter
from sftint_fast.engine.adapters.phi3 import Phi3Adapter
from sftint_fast.engine.adapters.stablelm import StableLmAdapter

__all__ = ["Adapter", "AttendFn", "LayerSpec", "ModelDims", "find_adapter", "get_adapter", "replaced_forwards",
           "user_hooks", "wrapped_models"]

_ADAPTERS: tuple[type[Adapter], ...] = (LlamaLikeAdapter, Phi3Adapter, GPT2Adapter, GPTNeoXAdapter, OlmoAdapter,
                                        MoeAdapter, GraniteAdapter, GptOssAdapter, StableLmAdapter, CohereAdapter,
                                        Exaone4Adapter)
SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "smollm3", "phi3", "gpt2", "gpt_neox", "olmo2",
             "olmo3", "gemma2", "qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "gemma", "granite", "gpt_oss",
             "ministral", "seed_oss", "arcee", "nemotron", "starcoder2", "helium", "ernie4_5", "glm", "apertus", "glm4",
             "stablelm", "cohere", "cohere2", "exaone4")


def get_adapter(model: torch.nn.Module) -> Adapter | None:
    """The adapter that runs ``model`` layer by layer for the trie engine, or None for an unsupported architecture.

    Supported: Llama / SmolLM2, Qwen2, Qwen3, Mistral, Gemma-3 text, SmolLM3 (``model_type`` llama, qwen2, qwen3,
    mistral, gemma3_text, smollm3), Phi-3 / Phi-3.5 / Phi-4 / Phi-4-mini (``phi3``), GPT-2, GPT-NeoX / Pythia
    (``gpt_neox``), OLMo-2 / OLMo-3 (``olmo2``, ``olmo3``), Gemma (v1, ``gemma``), IBM Granite 3.x (``granite``: its
    embedding, residual and logit multipliers as its forward applies them), Gemma-2 (``gemma2``: its attention
    logit soft-cap needs eager, flex or flash attention; SDPA is refused), Ministral (``ministral``: sliding layers
    by ``layer_types``), Seed-OSS (``seed_oss``), Arcee AFM (``arcee``: its ReLU^2 MLP, not gated, as its module),
    Apertus (``apertus``: its xIELU MLP as its module, per-head q/k norms),
    Nemotron (``nemotron``: (1 + w) LayerNorms and a ReLU^2 MLP as their modules, partial RoPE), StarCoder2
    (``starcoder2``: LayerNorms and GELU MLP as their modules, ``config.sliding_window`` on every layer), Helium,
    ERNIE-4.5 (dense), GLM and GLM-4 (``helium``, ``ernie4_5``, ``glm``, ``glm4``: their interleaved RoPE as their
    own function, never the fused op; GLM-4's sandwich norms), StableLM / StableLM-2 (``stablelm``: LayerNorms,
    partial RoPE, optional per-head q/k LayerNorms and parallel residual), Cohere / Command-R and Cohere-2
    (``cohere``, ``cohere2``: attention and MLP in parallel on one LayerNorm'd input, interleaved RoPE as their own
    function, the logit scale; Cohere's optional q/k norms; Cohere-2's sliding layers by ``layer_types``, no RoPE on
    its full ones), EXAONE-4.0 (``exaone4``: OLMo-2's post-norm layers with per-head q/k norms, sliding layers by
    ``layer_types``, no RoPE on its full ones where ``sliding_window`` is set), and the Mixture-of-Experts decoders
    Qwen3-MoE, Mixtral, OLMoE and Qwen2-MoE (``qwen3_moe``, ``mixtral``, ``olmoe``, ``qwen2_moe``: their sparse
    blocks run as their modules on the flat token batch, exact since transformers routes each token alone), and
    gpt-oss (``gpt_oss``: its attention sinks carried into the engine's attention, which needs eager or flex
    attention; SDPA and flash attention are refused; its MoE blocks run as modules). The adapter reuses the
    model's own modules, so it follows later changes to the model's weights.
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
    model with forward hooks or pre-hooks (:func:`user_hooks`), or with replaced forwards (:func:`replaced_forwards`):
    the naive engine runs them, the trie would not."""
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        devices = sorted(map(str, devices))
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
                for found, what, undo in ((user_hooks(model), "forward hooks", "remove the hooks"),
                                          (replaced_forwards(model, adapter.skipped_modules()), "replaced forwards",
                                           "restore them")):
                    if found:
                        shown = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
                        return None, (f"{type(model).__name__} has {what} that the trie engine would not run as the "
                                      f"model's forward does ({shown}): it calls the layers' parts itself, on flat "
                                      "token batches, and skips the decoder layers' and blocks' own forwards; "
                                      f"{undo} or evaluate with the naive engine, which runs them")
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
    object's class otherwise. A Python function is named by its code and the module it is defined in, not by the
    ``__name__`` / ``__module__`` that ``functools.wraps`` copies onto a wrapper from the function it wraps."""
    for _ in range(8):
        inner = getattr(hook, "func", None) or getattr(hook, "__func__", None)
        if inner is None:
            break
        hook = inner
    code, scope = getattr(hook, "__code__", None), getattr(hook, "__globals__", None)
    if isinstance(code, types.CodeType) and isinstance(scope, dict):
        module = scope.get("__name__") or getattr(hook, "__module__", None) or ""
        return str(module), str(getattr(code, "co_qualname", code.co_name))
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


#: Packages whose forwards, bound onto a model's modules or as their classes', compute what the modules' own forwards
#: do (the trie's module calls and fused ops give the same values): Liger-Kernel's RMSNorm, SwiGLU MLP and
#: fused-linear-cross-entropy forwards (``apply_liger_kernel_to_llama(model=...)``, a ``Trainer`` with
#: ``use_liger_kernel``; its cross entropy only runs with labels, which the engines do not pass).
LIBRARY_FORWARDS = frozenset({"liger_kernel"})


#: Packages whose decorators wrap the modeling code's class forwards (``functools.wraps``: transformers' deprecation
#: and output checks, the hub kernels' layer wrapper): :func:`_defined_in` looks through them.
_FORWARD_DECORATORS = frozenset({"transformers", "kernels"})


def _defined_in(fn) -> tuple[str, str]:
    """``(module, name)`` of ``fn``'s code (:func:`_hook_origin`), through bound methods, partials and the
    decorators of :data:`_FORWARD_DECORATORS`: not the ``__module__`` that ``functools.wraps`` copies onto a
    wrapper, which would make a forward patched with a user's wrapper pass as the one it wraps."""
    origin = _hook_origin(fn)
    for _ in range(8):
        inner = getattr(getattr(fn, "__func__", fn), "__wrapped__", None)
        if inner is None or origin[0].split(".", 1)[0] not in _FORWARD_DECORATORS:
            break
        fn = inner
        origin = _hook_origin(fn)
    return origin


def _package(fn) -> str:
    return _defined_in(fn)[0].split(".", 1)[0]


def _trl_fused_lm_head(module: torch.nn.Module, fn):
    """The forward that TRL's ``add_fused_lm_head`` kept when ``fn`` is the one it bound to ``module`` (TRL's
    ``GRPOTrainer``, ``RLOOTrainer`` and ``KTOTrainer`` put it on the model they train), else None. Without
    ``fused_lm_head=True``, which no engine passes, that forward calls the kept one with the same arguments; it
    copies the kept forward's name (``functools.wraps``), so it is told by its code and the module it is defined in."""
    func = getattr(fn, "__func__", None)
    code = getattr(func, "__code__", None)
    if getattr(fn, "__self__", None) is not module or code is None or code.co_name != "_fused_forward":
        return None
    if str(getattr(func, "__globals__", {}).get("__name__", "")).split(".", 1)[0] != "trl":
        return None
    cells = dict(zip(code.co_freevars, func.__closure__ or ()))
    try:
        return cells["original_forward"].cell_contents
    except (KeyError, ValueError):  # another TRL function of that name, or the cell not yet set
        return None


def _runs_own_forward(module: torch.nn.Module, fn, depth: int = 8) -> bool:
    """Whether ``fn``, set as ``module.forward`` on the instance, computes the module's own forward: that forward
    bound to it (again), torch.compile of it (``m.forward = torch.compile(m.forward)``, an ``OptimizedModule``'s),
    accelerate's hooks for device placement (``_hf_hook`` of accelerate's own hook classes, around ``_old_forward``),
    accelerate's mixed-precision autocast around ``_original_forward`` (the engines run that one:
    ``game._own_forward``), TRL's fused LM head around the forward it kept (:func:`_trl_fused_lm_head`), or a forward
    of :data:`LIBRARY_FORWARDS` bound to it."""
    from sftint_fast.game import _wraps

    if depth == 0:
        return False
    if getattr(fn, "__self__", None) is module and getattr(fn, "__func__", None) is type(module).forward:
        return True
    compiled = getattr(fn, "_torchdynamo_orig_callable", None)
    if compiled is not None:
        owner = getattr(compiled, "__self__", None)
        if owner is getattr(module, "_orig_mod", None) and isinstance(owner, torch.nn.Module):  # torch.compile(model)
            return getattr(compiled, "__func__", None) in (torch.nn.Module._wrapped_call_impl, torch.nn.Module.__call__)
        return _runs_own_forward(module, compiled, depth - 1)
    state = module.__dict__
    if "_hf_hook" in state and "_old_forward" in state and _package(fn) == "accelerate" and (
            getattr(fn, "args", (None,))[:1] == (module,)):
        hook = state["_hf_hook"]
        hooks = getattr(hook, "hooks", None) or (hook,)  # a SequentialHook holds several
        return (all(type(h).__module__.split(".", 1)[0] == "accelerate" for h in hooks)
                and _runs_own_forward(module, state["_old_forward"], depth - 1))
    original = state.get("_original_forward")
    if original is not None and _wraps(fn, original):
        return _runs_own_forward(module, original, depth - 1)
    kept = _trl_fused_lm_head(module, fn)
    if kept is not None:
        return _runs_own_forward(module, kept, depth - 1)
    return _package(fn) in LIBRARY_FORWARDS and getattr(fn, "__self__", module) is module


def replaced_forwards(model: torch.nn.Module, skipped=()) -> list[str]:
    """``"module name: what"`` of each forward of ``model`` that the trie engine would not run as the model does:

    - a ``forward`` set on a module instance (``m.forward = fn``, ``types.MethodType``), on any submodule, except
      the wrappers that run the module's own forward (:func:`_runs_own_forward`: torch.compile, accelerate's device
      and autocast hooks, TRL's fused LM head) and :data:`LIBRARY_FORWARDS`' (Liger-Kernel's);
    - among ``skipped`` (the modules whose forwards the trie skips or stands in for with fused ops: the adapter's
      ``skipped_modules()``), one whose class's ``forward`` is not the architecture's transformers modeling code's
      (the class of the model's ``model_type``: a module swapped for another class, ``__class__`` set to a subclass
      that overrides ``forward``, or ``forward`` patched on the class), a torch or PEFT wrapper's or a
      :data:`LIBRARY_FORWARDS` one's.

    Modules the trie calls as modules (projections, embedding, LM head) may be of other classes (PEFT's LoRA layers,
    quantized linears): their own forwards run, on flat ``[tokens, hidden]`` batches."""
    found, skipped, names = [], list(skipped), {}
    for name, module in model.named_modules():
        names[id(module)] = name
        fn = module.__dict__.get("forward")
        if fn is not None and not _runs_own_forward(module, fn):
            found.append(f"{name or type(module).__name__}: forward replaced on the instance by "
                         f"{'.'.join(_hook_origin(fn))!r}")
    home = type(skipped[0] if skipped else model).__module__  # the architecture's modeling code (its inner model's)
    for module in skipped:
        forward = type(module).forward
        origin, defined = _defined_in(forward)
        # torch's wrappers (torch.compile's OptimizedModule) and PEFT's (a PeftModel the adapter reads through) run the
        # model's forward
        if origin != home and origin.split(".", 1)[0] not in ("torch", "peft") and _package(
                forward) not in LIBRARY_FORWARDS:
            label = names.get(id(module)) or type(module).__name__
            found.append(f"{label}: class {type(module).__qualname__} with the forward"
                         f" {origin}.{defined} (not {home}'s)")
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
