"""AND-OR decomposition of a game with sparsification (METHOD.md section 3).

Bit order: index ``S`` of the last dimension is a bitmask, bit ``i`` set = player ``i`` present.

The game ``v`` (after ``v - v(∅)`` when ``baseline_offset``) is split with learnable ``p`` and a bounded
noise term ``q`` (both ``(..., 2^n)``)::

    v_and(T) = 0.5·(v(T) + q_T) + p_T          I_and = subset_mobius(v_and)
    v_or(T)  = 0.5·(v(T) + q_T) - p_T          I_or(S) = -Σ_{L⊆S} (-1)^{|S|-|L|} v_or(N\\L),  I_or(∅) = v_or(∅)

and ``Σ_S |I_and(S)| + Σ_S |I_or(S)|`` is minimised subject to ``|q_T| ≤ qthres·|v(N) - v(∅)|`` (per row).
Universal matching holds for any ``p, q``:
``v(T) + q_T = Σ_{S⊆T} I_and(S) + I_or(∅) + Σ_{S∩T≠∅, S≠∅} I_or(S)``.

Two solvers of the same objective:

- ``"sgd"``: the reference optimiser (SGD, momentum 0.9, ``p = q = 0`` at start, ``q`` clamped after each step,
  learning rate decaying log-uniformly from ``lr`` to ``lr/10``), all rows in one vectorised loop. The
  gradient of the L1 objective is written out analytically: ``sign(I)`` pushed back through the adjoint
  transforms (the adjoint of ``subset_mobius`` is ``superset_mobius``), four butterflies per step and no
  autograd graph. It equals the autograd formulation step for step
  (``tests/test_andor.py``) and is faster (``benchmarks/test_andor.py``).
- ``"lp"``: the exact linear programme, one ``scipy.optimize.linprog`` (HiGHS) per row, in the variables
  ``v_and``, ``v_or`` and the absolute values (sparse Möbius matrices with ``3^n`` nonzeros). Cost grows
  fast with ``n``: on 2 CPU cores about 1.5 s per row at ``n=8`` and 30 s at ``n=10`` (random games);
  ``n > 10`` is rejected unless ``max_players=`` is raised.

Reporting convention: the OR interaction of order 0 is folded into the AND interaction of order 0, so the
returned ``I_or[..., 0]`` is 0. The ``objective`` trace is the optimised quantity, before folding.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Literal

import torch
from tqdm.auto import tqdm

from sftint_fast import _ext
from sftint_fast._memory import free_memory
from sftint_fast.interactions.harsanyi import _or_transform
from sftint_fast.interactions.result import AndOrResult
from sftint_fast.ops import transforms as T

logger = logging.getLogger(__name__)

LP_MAX_PLAYERS = 10
"""Default largest ``n`` accepted by ``method="lp"`` (override with ``max_players=``)."""

_MOMENTUM = 0.9
_FUSED_CHUNK = 500  # SGD steps per call of the fused C++ loop (progress granularity)


def and_or(
    v: torch.Tensor,
    *,
    qthres: float = 0.04,
    niter: int = 20000,
    lr: float = 1e-6,
    method: Literal["sgd", "lp"] = "sgd",
    baseline_offset: bool = True,
    progress: bool = True,
    seed: int = 0,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_players: int | None = None,
    lp_method: Literal["highs-ipm", "highs-ds", "highs"] = "highs-ipm",
) -> AndOrResult:
    """AND-OR interactions of ``v`` with the sparsifying ``p, q`` (METHOD.md section 3).

    Args:
        v: ``(2^n,)`` or ``(B, 2^n)`` float32/float64, indexed by bitmask; each row is one game.
        qthres: ``q`` is bounded by ``qthres·|v(N) - v(∅)|`` per row.
        niter: SGD steps (``"sgd"`` only). ``niter=0`` returns the decomposition at ``init`` (or ``p=q=0``).
        lr: initial SGD learning rate, decayed log-uniformly to ``lr/10`` over ``niter`` steps.
        method: ``"sgd"`` (reference optimiser, batched) or ``"lp"`` (exact, HiGHS, one LP per row).
        baseline_offset: decompose ``v - v(∅)`` (the default of METHOD.md) instead of ``v``.
        progress: tqdm bar over SGD steps / LP rows.
        seed: recorded in ``config``; both solvers are deterministic, so it changes nothing today.
        init: ``(p, q)`` of the shape of ``v`` to warm-start SGD; ``q`` is clamped to its bound first.
        max_players: largest ``n`` accepted (default 30 for ``"sgd"``, :data:`LP_MAX_PLAYERS` for ``"lp"``).
        lp_method: HiGHS algorithm passed to ``linprog`` for ``"lp"``. The interior point (with crossover to
            an exact vertex) was 5× faster than dual simplex at ``n=10`` on random games (27 s vs 149 s per
            row on 2 CPU cores); both return the same optimum.

    Returns:
        :class:`AndOrResult` with ``I_and``, ``I_or``, ``p``, ``q`` of the shape of ``v`` (OR order 0 folded
        into AND order 0) and ``objective`` of shape ``(K,)`` or ``(K, B)``: for ``"sgd"`` ``K = niter + 1``
        (the objective before each step, then after the last one); for ``"lp"`` ``K = 1``.

    Raises:
        ValueError: for ``"sgd"``, before allocating anything, when the bytes its state and scratch need (stated
            in the message) exceed the memory free on ``v``'s device.

    >>> v = torch.tensor([0., 1., 1., 1.], dtype=torch.float64)   # v(T) = 1[T ≠ ∅]: one OR of both players
    >>> and_or(v, method="lp", qthres=0.0, progress=False).I_or.tolist() == [0.0, 0.0, 0.0, 1.0]
    True
    """
    if method not in ("sgd", "lp"):
        raise ValueError(f"method: expected 'sgd' or 'lp', got {method!r}")
    if lp_method not in ("highs-ipm", "highs-ds", "highs"):
        raise ValueError(f"lp_method: expected 'highs-ipm', 'highs-ds' or 'highs', got {lp_method!r}")
    for name, flag in (("baseline_offset", baseline_offset), ("progress", progress)):
        if not isinstance(flag, bool):  # a string is truthy: it would turn the option on
            raise TypeError(f"{name}: expected a bool, got {flag!r}")
    T.check_max_players(max_players)
    limit = max_players if max_players is not None else (LP_MAX_PLAYERS if method == "lp" else T.MAX_PLAYERS)
    if method == "lp":
        _check_lp_size(v, limit)
    n = T.validate_game_tensor(v, name="v", max_players=limit)
    if v.device.type == "meta":  # the optimiser and the result's config read values
        raise ValueError("v: expected a tensor with values (CPU or CUDA), got a meta tensor")
    if v.dim() > 2:
        raise ValueError(f"v: expected shape (2^n,) or (B, 2^n), got {tuple(v.shape)}")
    # numbers.Real/Integral: numpy scalars (np.float32, np.int64) are numbers too; used as Python ones from here on
    real = numbers.Real
    if not (isinstance(qthres, real) and not isinstance(qthres, bool) and qthres >= 0 and math.isfinite(qthres)):
        raise ValueError(f"qthres: expected a finite number >= 0, got {qthres!r}")
    if not (isinstance(niter, numbers.Integral) and not isinstance(niter, bool) and niter >= 0):
        raise ValueError(f"niter: expected an int >= 0, got {niter!r}")
    if not (isinstance(lr, real) and not isinstance(lr, bool) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    qthres, niter, lr = float(qthres), int(niter), float(lr)

    if method == "sgd":
        _check_sgd_memory(v, n, niter)

    rows = v.reshape(-1, v.shape[-1])
    if baseline_offset:
        rows = rows - rows[:, :1]
    bound = qthres * (rows[:, -1:] - rows[:, :1]).abs()

    if method == "sgd":
        p0, q0 = _initial(rows, init, v.shape)
        p, q, objective = _sgd(rows, p0, q0.clamp(-bound, bound), bound, niter=niter, lr=lr, progress=progress)
        status: list[str] = []
    else:
        if init is not None:
            raise ValueError("init: warm starts apply to method='sgd' only, got init with method='lp'")
        p, q, objective, status = _lp(rows, bound, progress=progress, lp_method=lp_method)

    i_and, i_or = decompose(rows, p, q)
    i_and[:, 0] += i_or[:, 0]
    i_or[:, 0] = 0
    shape = v.shape
    config = {
        "method": method,
        "qthres": float(qthres),
        "niter": int(niter) if method == "sgd" else 0,
        "lr": float(lr),
        "momentum": _MOMENTUM,
        "baseline_offset": bool(baseline_offset),
        "seed": int(seed),
        "num_players": n,
        "shape": list(shape),
        "dtype": str(v.dtype).replace("torch.", ""),
        "q_bound": bound.squeeze(-1).tolist(),
        "v_empty": v.reshape(-1, shape[-1])[:, 0].tolist(),
        "warm_start": init is not None,
        "lp_method": lp_method if method == "lp" else None,
        "lp_status": status,
    }
    return AndOrResult(
        I_and=i_and.reshape(shape),
        I_or=i_or.reshape(shape),
        p=p.reshape(shape),
        q=q.reshape(shape),
        objective=objective if v.dim() == 2 else objective[:, 0],
        config=config,
    )


def decompose(v: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(I_and, I_or)`` of ``v`` for given ``p, q`` (all ``(..., 2^n)``), OR order 0 not folded.

    Differentiable (autograd through the transforms); inputs are trusted.
    """
    half = 0.5 * (v + q)
    return T.apply_unchecked(half + p, "subset_mobius"), _or_transform(half - p)


def _initial(
    rows: torch.Tensor, init: tuple[torch.Tensor, torch.Tensor] | None, shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    if init is None:
        return torch.zeros_like(rows), torch.zeros_like(rows)
    if not (isinstance(init, tuple) and len(init) == 2 and all(isinstance(t, torch.Tensor) for t in init)):
        raise TypeError(f"init: expected a tuple (p, q) of tensors, got {type(init).__name__}")
    out = []
    for name, t in zip(("p", "q"), init):
        if t.shape != shape:
            raise ValueError(f"init: expected {name} of shape {tuple(shape)} (the shape of v), got {tuple(t.shape)}")
        if t.is_complex() or t.dtype == torch.bool:  # .to(float) would drop the imaginary part / make 0/1 values
            raise TypeError(f"init: expected real numbers in p and q, got {name} of dtype {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"init: expected finite {name}, got NaN/inf")
        out.append(t.detach().to(device=rows.device, dtype=rows.dtype).reshape(rows.shape).clone())
    return out[0], out[1]


def _l1_and_grad(
    v: torch.Tensor, p: torch.Tensor, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Objective per row and the gradients w.r.t. ``v_and`` and ``v_or``, analytically. All ``(B, 2^n)``.

    The gradient w.r.t. ``p`` is ``grad_and - grad_or`` and w.r.t. ``q`` is ``(grad_and + grad_or)/2``; the
    caller folds them into its momentum buffers without materialising them.

    The OR transform reads ``v_or`` reversed; since ``Σ_{L⊆S} (-1)^{|S|-|L|} v_or(N\\L)`` equals
    ``superset_mobius(v_or)(N\\S)``, ``I_or(S) = -u(N\\S)`` with ``u = superset_mobius(v_or)``, and
    ``I_or(∅) = v_or(∅)`` replaces ``-u(N)``. Working on ``u`` avoids the flips: the L1 norm does not
    care where an entry sits. Adjoints: subset ↔ superset Möbius.
    """
    half = torch.add(v, q).mul_(0.5)
    v_and = half + p
    v_or = half.sub_(p)
    i_and = T.apply_unchecked(v_and, "subset_mobius")
    u = T.apply_unchecked(v_or, "superset_mobius")
    or_empty = v_or[:, 0]
    objective = i_and.abs().sum(-1) + u.abs().sum(-1) - u[:, -1].abs() + or_empty.abs()
    sign_u = u.sign()
    sign_u[:, -1] = 0
    grad_and = T.apply_unchecked(i_and.sign(), "superset_mobius")
    grad_or = T.apply_unchecked(sign_u, "subset_mobius")
    grad_or[:, 0] += or_empty.sign()
    return objective, grad_and, grad_or


def _sgd(
    v: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    bound: torch.Tensor,
    *,
    niter: int,
    lr: float,
    progress: bool,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SGD with momentum 0.9 (torch.optim.SGD semantics, buffers start at 0) on all rows at once.

    ``fused`` (default, used whenever the C++ extension is there and ``v`` is on the CPU) runs the steps in
    ``sftint::andor_sgd_`` (csrc/andor.cpp), which keeps each row's scratch in cache and equals the torch
    loop step for step; chunks of steps keep the progress bar moving.
    """
    lrs = torch.logspace(math.log10(lr), math.log10(lr) - 1, niter, dtype=torch.float64) if niter else torch.empty(0, dtype=torch.float64)
    objective = torch.empty(niter + 1, v.shape[0], dtype=v.dtype, device=v.device)
    # contiguous whatever p, q are (a transposed v or init makes them column-major): the fused loop needs them so
    buf_p = torch.zeros_like(p, memory_format=torch.contiguous_format)
    buf_q = torch.zeros_like(q, memory_format=torch.contiguous_format)
    fused = fused is not False and v.device.type == "cpu" and _ext.has_ext()
    with torch.no_grad():
        if fused:
            v, p, q, bound_rows = v.contiguous(), p.contiguous(), q.contiguous(), bound.reshape(-1).contiguous()
            with tqdm(total=niter, desc="and_or sgd", disable=not progress) as bar:
                for start in range(0, niter, _FUSED_CHUNK):
                    chunk = lrs[start:start + _FUSED_CHUNK]
                    objective[start:start + len(chunk)] = torch.ops.sftint.andor_sgd_(
                        v, p, q, buf_p, buf_q, bound_rows, chunk, _MOMENTUM)
                    bar.update(len(chunk))
        else:
            lr_list = lrs.tolist()
            for step in tqdm(range(niter), desc="and_or sgd", disable=not progress):
                loss, grad_and, grad_or = _l1_and_grad(v, p, q)
                objective[step] = loss
                buf_p.mul_(_MOMENTUM).add_(grad_and).sub_(grad_or)
                buf_q.mul_(_MOMENTUM).add_(grad_and.add_(grad_or), alpha=0.5)
                p.sub_(buf_p, alpha=lr_list[step])
                q.sub_(buf_q, alpha=lr_list[step])
                torch.minimum(q, bound, out=q)
                torch.maximum(q, -bound, out=q)
        objective[niter] = _l1_and_grad(v, p, q)[0]
    return p, q, objective


def _sgd_bytes(rows: int, size: int, element_size: int, *, niter: int, fused: bool, threads: int) -> int:
    """Peak bytes that ``method="sgd"`` allocates beside ``v`` itself, for ``rows`` games of ``size`` values."""
    per_game = size * element_size
    state = 6 * rows * per_game  # v - v(∅), p, q and its clamped copy, two momentum buffers
    if fused:
        # csrc/andor.cpp: 7 scratch buffers of 8 interleaved rows per group in flight (one row is padded to 8)
        work = 7 * 8 * per_game * min(-(-rows // 8), threads)
    else:
        work = 8 * rows * per_game  # the temporaries of one step of the torch loop (_l1_and_grad), all rows at once
    return state + work + (niter + 1) * rows * element_size


def _free_bytes(device: torch.device) -> int:
    """Bytes free for new tensors on ``device`` (:func:`~sftint_fast._memory.free_memory`)."""
    return free_memory(device)


def _check_sgd_memory(v: torch.Tensor, n: int, niter: int) -> None:
    rows = v.numel() // v.shape[-1]
    fused = v.device.type == "cpu" and _ext.has_ext()
    needed = _sgd_bytes(rows, v.shape[-1], v.element_size(), niter=niter, fused=fused, threads=torch.get_num_threads())
    free = _free_bytes(v.device)
    if needed > free:
        raise ValueError(
            f"v: method='sgd' on {rows} row(s) of n={n} players ({v.dtype}) needs about {needed:,} bytes "
            f"({needed / 2**30:,.1f} GiB) beside v, but {free:,} bytes ({free / 2**30:,.1f} GiB) are free on "
            f"{v.device}; pass fewer rows per call, a smaller n, or run where that much memory is free"
        )


def _lp_nonzeros(n: int) -> int:
    """Nonzeros of the LP constraint matrix built by :func:`_lp_matrix`."""
    return 4 * 3**n + 8 * 2**n


def _check_lp_size(v: torch.Tensor, limit: int) -> None:
    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[-1] > 0 and not v.shape[-1] & (v.shape[-1] - 1):
        n = v.shape[-1].bit_length() - 1
        if n > limit:
            nnz = _lp_nonzeros(n)
            raise ValueError(
                f"v: method='lp' accepts n <= max_players={limit} players, got n={n}: its constraint matrix has "
                f"{nnz:,} nonzeros (~{nnz * 12 / 2**20:,.0f} MiB in scipy, several times that inside HiGHS, and "
                f"solve time grows faster than 3^n); use method='sgd' or pass max_players= to raise the limit"
            )


def _mobius_matrix(n: int):
    """Sparse ``2^n×2^n`` subset-Möbius matrix (``3^n`` nonzeros) as the Kronecker power of ``[[1,0],[-1,1]]``."""
    import scipy.sparse as sp

    m = sp.csr_matrix([[1.0]])
    one = sp.csr_matrix([[1.0, 0.0], [-1.0, 1.0]])
    for _ in range(n):
        m = sp.kron(one, m, format="csr")
    return m


def _lp_matrix(n: int):
    """Constraint matrix over ``x = [v_and, v_or, a, b]`` (``a ≥ |I_and|``, ``b ≥ |I_or|``), CSR.

    Rows: ``±M v_and - a ≤ 0``, ``±R v_or - b ≤ 0``, ``±(v_and + v_or) ≤ ±v ± bound`` where
    ``R`` is the OR transform: ``-M`` on the reversed input, with row ``∅`` replaced by ``v_or(∅)``.
    """
    import scipy.sparse as sp

    size = 1 << n
    m = _mobius_matrix(n)
    eye = sp.identity(size, format="csr")
    e0 = sp.csr_matrix(([1.0], ([0], [0])), shape=(1, size))
    r = sp.vstack([e0, -m[:, ::-1][1:]], format="csr")
    zero = None
    return sp.bmat(
        [
            [m, zero, -eye, zero],
            [-m, zero, -eye, zero],
            [zero, r, zero, -eye],
            [zero, -r, zero, -eye],
            [eye, eye, zero, zero],
            [-eye, -eye, zero, zero],
        ],
        format="csc",
    )


def _lp(
    v: torch.Tensor, bound: torch.Tensor, *, progress: bool, lp_method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Solves the objective exactly per row with HiGHS; returns ``p, q`` in ``v``'s dtype/device."""
    import numpy as np
    from scipy.optimize import linprog

    rows, size = v.shape
    n = size.bit_length() - 1
    a_ub = _lp_matrix(n)
    cost = np.concatenate([np.zeros(2 * size), np.ones(2 * size)])
    var_bounds = [(None, None)] * (2 * size) + [(0, None)] * (2 * size)
    v64 = v.detach().to(device="cpu", dtype=torch.float64).numpy()
    b64 = bound.detach().to(device="cpu", dtype=torch.float64).numpy()
    p = np.empty_like(v64)
    q = np.empty_like(v64)
    objective = np.empty((1, rows))
    status = []
    for row in tqdm(range(rows), desc="and_or lp", disable=not progress):
        # the LP is positively homogeneous: solved on the row scaled to a spread max|v - v(∅)| of 1, since HiGHS's
        # tolerances are absolute (~1e-7; a game of values ~1e-8 came back 1.6x off its optimum). The spread, not
        # max|v|: with baseline_offset=False a large v(∅) would shrink the rest of the game under the tolerances.
        scale = float(np.abs(v64[row] - v64[row, 0]).max()) or float(np.abs(v64[row]).max()) or 1.0
        v_row, b_row = v64[row] / scale, b64[row] / scale
        b_ub = np.concatenate([np.zeros(4 * size), v_row + b_row, b_row - v_row])
        sol = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=var_bounds, method=lp_method)
        if sol.status != 0:
            raise RuntimeError(f"and_or: HiGHS failed on row {row}: {sol.message}")
        x_and, x_or = sol.x[:size], sol.x[size : 2 * size]
        p[row] = 0.5 * (x_and - x_or) * scale
        # clipped after scaling back: (b_row clipped)·scale can overshoot the bound b64[row] by an ulp
        q[row] = np.clip((x_and + x_or - v_row) * scale, -b64[row], b64[row])
        objective[0, row] = sol.fun * scale
        status.append(str(sol.message))
    logger.debug("and_or lp: solved %d rows, n=%d", rows, n)
    p_t, q_t, objective_t = (torch.from_numpy(a).to(device=v.device, dtype=v.dtype) for a in (p, q, objective))
    return p_t, q_t, objective_t, status
