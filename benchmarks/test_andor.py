"""AND-OR sparsifier: time per SGD step of ours (analytic gradient through the butterflies) vs the dense-matrix
formulation existing code uses (2^n×2^n AND and OR matrices, matmul, autograd, torch.optim.SGD) and vs autograd
through our transforms; LP wall time per sample. Same inputs, one run; ratios in extra_info, no time asserts."""
import math
import statistics
import time

import pytest
import torch

import sftint_fast as sf
from sftint_fast.interactions import andor
from sftint_fast.interactions.harsanyi import _or_transform
from sftint_fast.ops import transforms as T

DENSE_LIMIT_BYTES = 4 * 2**30


def _seconds_per_step(run, steps: int, repeats: int) -> float:
    run(1)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(steps)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def _game(n: int, rows: int, seed: int) -> torch.Tensor:
    """A few planted AND and OR interactions of log-odds size plus small noise, per row (float32)."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.arange(2**n)
    v = 0.05 * torch.randn(rows, 2**n, generator=gen)
    for _ in range(6):
        s = torch.randint(1, 2**n, (rows, 1), generator=gen)
        w = 3 * torch.randn(rows, 1, generator=gen)
        v += w * ((masks & s) == s)
        s = torch.randint(1, 2**n, (rows, 1), generator=gen)
        w = 3 * torch.randn(rows, 1, generator=gen)
        v += w * ((masks & s) != 0)
    return v


def _optimizer_run(v, loss_fn, *, lr=1e-6, qthres=0.04):
    """Returns run(steps) doing the reference optimiser with autograd on ``loss_fn(v_and, v_or)``, and (p, q)."""
    v = v - v[:, :1]
    bound = qthres * v[:, -1:].abs()
    p = torch.zeros_like(v, requires_grad=True)
    q = torch.zeros_like(v, requires_grad=True)
    opt = torch.optim.SGD([p, q], lr=lr, momentum=0.9)

    def run(steps):
        lrs = torch.logspace(math.log10(lr), math.log10(lr) - 1, steps, dtype=torch.float64).tolist()
        for step in range(steps):
            opt.param_groups[0]["lr"] = lrs[step]
            half = 0.5 * (v + q)
            loss = loss_fn(half + p, half - p)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                q.copy_(torch.maximum(torch.minimum(q, bound), -bound))

    return run, p, q


@pytest.mark.parametrize("n", [10, 12])
def test_sgd_step(benchmark, n, full, env_info):
    if n > 10 and not full:
        pytest.skip("n=12 only with --full")
    rows = 64 if full else 16
    steps = 20
    v = _game(n, rows, seed=n)

    def ours(k):
        sf.and_or(v, niter=k, progress=False)

    ours_s = _seconds_per_step(ours, steps, 3)
    benchmark.pedantic(ours, args=(steps,), rounds=1, iterations=1)

    fast_run, fast_p, _ = _optimizer_run(
        v, lambda a, o: T.apply_unchecked(a, "subset_mobius").abs().sum() + _or_transform(o).abs().sum()
    )
    autograd_fast_s = _seconds_per_step(fast_run, steps, 3)
    info = dict(env_info, n=n, rows=rows, dtype="float32", ours_ms_per_step=ours_s * 1e3,
                autograd_fast_transforms_ms_per_step=autograd_fast_s * 1e3,
                speedup_vs_autograd_fast_transforms=autograd_fast_s / ours_s)

    dense_bytes = 2 * 4 * 4**n
    if dense_bytes <= DENSE_LIMIT_BYTES:
        eye = torch.eye(2**n)
        and_matrix = T.apply_unchecked(eye, "subset_mobius")  # row L: coefficient of v_and(L) in each I_and(S)
        or_matrix = _or_transform(eye)
        dense_run, dense_p, dense_q = _optimizer_run(
            v, lambda a, o: (a @ and_matrix).abs().sum() + (o @ or_matrix).abs().sum()
        )
        dense_s = _seconds_per_step(dense_run, max(2, steps // 4), 2)
        # Exactness of what was timed: one step from p = q = 0 on both.
        check_run, check_p, check_q = _optimizer_run(
            v, lambda a, o: (a @ and_matrix).abs().sum() + (o @ or_matrix).abs().sum()
        )
        check_run(1)
        one = sf.and_or(v, niter=1, progress=False)
        info.update(dense_ms_per_step=dense_s * 1e3, speedup_vs_dense=dense_s / ours_s,
                    one_step_max_abs_dp=float((one.p - check_p.detach()).abs().max()),
                    one_step_max_abs_dq=float((one.q - check_q.detach()).abs().max()))
        # float32 matmul error can flip the sign of near-zero interactions, so p may differ after a step;
        # the timed objective itself must agree.
        half = 0.5 * (v - v[:, :1])
        dense_loss = float((half @ and_matrix).abs().sum() + (half @ or_matrix).abs().sum())
        torch.testing.assert_close(float(one.objective[0].sum()), dense_loss, rtol=1e-4, atol=1e-3)
        del and_matrix, or_matrix, eye
    else:
        info["dense"] = f"skipped: the two matrices need {dense_bytes / 2**30:.0f} GiB"
    benchmark.extra_info.update(info)
    print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in info.items()})


@pytest.mark.parametrize("n", [8, 10])
def test_lp_per_sample(benchmark, n, full, env_info):
    if n > 8 and not full:
        pytest.skip("n=10 only with --full (tens of seconds per sample)")
    v = _game(n, 1, seed=100 + n).double()
    start = time.perf_counter()
    res = benchmark.pedantic(lambda: sf.and_or(v, method="lp", progress=False), rounds=1, iterations=1)
    seconds = time.perf_counter() - start
    short = sf.and_or(v, niter=2000, lr=1e-6, progress=False)
    info = dict(env_info, n=n, rows=1, lp_seconds_per_sample=seconds, lp_objective=float(res.objective[0, 0]),
                sgd_start_objective=float(short.objective[0, 0]),
                sgd_2000_steps_objective=float(short.objective[-1, 0]),
                lp_nonzeros=andor._lp_nonzeros(n))
    benchmark.extra_info.update(info)
    print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in info.items()})
