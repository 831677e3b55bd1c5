"""Loads the C++ extension ``sftint_fast._C`` (ops under ``torch.ops.sftint``).

The build degrades in steps, never silently: when the extension is missing or broken the package
uses pure-torch fallbacks and warns once, saying why; ``SFTINT_REQUIRE_EXT=1`` turns that into an
ImportError (CI sets it). ``python -m sftint_fast.info`` prints the status.
"""
from __future__ import annotations

import functools
import logging
import os
import warnings

import torch

logger = logging.getLogger(__name__)

_TRANSFORM_OPS = ("subset_mobius", "subset_zeta", "superset_mobius", "superset_zeta")
_LAYER_OPS = ("rms_norm", "rope_", "silu_mul_", "log_odds")
_OPS = _TRANSFORM_OPS + ("andor_sgd_",) + _LAYER_OPS


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str]:
    """Returns (loaded, reason). Cached: the import is tried once per process."""
    if os.environ.get("SFTINT_SKIP_EXT", "0") == "1" and os.environ.get("SFTINT_REQUIRE_EXT", "0") != "1":
        return False, "SFTINT_SKIP_EXT=1 is set"
    try:
        from sftint_fast import _C  # noqa: F401  (registers torch.ops.sftint.*)
    except ImportError as exc:
        reason = f"the C++ extension sftint_fast._C could not be imported ({exc})"
        return False, reason
    missing = [op for op in _OPS if not hasattr(torch.ops.sftint, op)]
    if missing:
        return False, f"the C++ extension loaded but lacks ops {missing}"
    _register_fakes()
    return True, "loaded"


def _register_fakes() -> None:
    for op in _TRANSFORM_OPS:
        torch.library.register_fake(f"sftint::{op}")(functools.partial(_transform_fake, op))

    @torch.library.register_fake("sftint::andor_sgd_")
    def _andor_sgd_fake(v, p, q, buf_p, buf_q, bound, lrs, momentum):
        return v.new_empty((lrs.shape[0], v.shape[0]))

    @torch.library.register_fake("sftint::rms_norm")
    def _rms_norm_fake(x, weight, eps, gemma):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    for op in ("rope_", "silu_mul_"):  # in place, nothing returned
        torch.library.register_fake(f"sftint::{op}")(lambda *args: None)

    @torch.library.register_fake("sftint::log_odds")
    def _log_odds_fake(logits, target):
        return logits.new_empty(logits.shape[0]), logits.new_empty(logits.shape[0], dtype=torch.bool)

    from sftint_fast.ops import layer_ops  # the backward of the game's value (a learned baseline trains through it)

    torch.library.register_autograd("sftint::log_odds", layer_ops._log_odds_backward,
                                    setup_context=layer_ops._log_odds_setup_context)


def _transform_fake(op: str, x: torch.Tensor) -> torch.Tensor:
    """The output of a transform op on meta / fake tensors, after the checks of csrc/transforms.cpp (same
    messages): shape propagation must refuse what the kernel refuses."""
    if x.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"sftint::{op}: expected dtype float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise RuntimeError(f"sftint::{op}: expected a tensor with at least 1 dimension (..., 2^n), got a 0-d tensor")
    size = x.shape[-1]
    if isinstance(size, int) and (size < 1 or size & (size - 1)):  # a symbolic size is checked by the kernel
        raise RuntimeError(f"sftint::{op}: expected the last dimension to be a power of two 2^n (n = number of "
                           f"players), got {size}")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def extension_status() -> tuple[bool, str]:
    """(available, reason) of the C++ extension, without warning."""
    return _load()


@functools.lru_cache(maxsize=None)
def has_ext() -> bool:
    """True when the C++ ops are usable. Warns once (or raises under SFTINT_REQUIRE_EXT=1) when not."""
    ok, reason = _load()
    if ok:
        return True
    if os.environ.get("SFTINT_REQUIRE_EXT", "0") == "1":
        raise ImportError(f"SFTINT_REQUIRE_EXT=1 but {reason}. Rebuild with `pip install -e .`.")
    warnings.warn(f"sftint_fast: using pure-torch transforms and layer ops because {reason}.", RuntimeWarning,
                  stacklevel=3)
    return False
