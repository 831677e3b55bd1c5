"""Transforms and the AND/Shapley/OR core against brute-force subset sums (METHOD.md section 2)."""
import pytest
import torch

import sftint_fast as sf
from sftint_fast import _ext
from sftint_fast.interactions.harsanyi import shapley_from_harsanyi
from sftint_fast.ops import transforms as T
from sftint_fast.ops.reference import brute_or_interactions, brute_shapley, brute_transform

from conftest import requires_ext

KINDS = ["subset_mobius", "subset_zeta", "superset_mobius", "superset_zeta"]
INVERSE = {"subset_mobius": "subset_zeta", "subset_zeta": "subset_mobius",
           "superset_mobius": "superset_zeta", "superset_zeta": "superset_mobius"}


# The brute-force reference is O(4^n): the 2x3 batch only up to n=6.
SHAPES = [(n, batch) for n in range(0, 9) for batch in [(), (1,), (3,), (2, 3)] if n <= 6 or batch != (2, 3)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n, batch", SHAPES, ids=[f"n{n}-b{'x'.join(map(str, b)) or 'none'}" for n, b in SHAPES])
def test_transform_matches_brute_force(kind, n, batch):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(*batch, 2**n, generator=gen, dtype=torch.float64)
    expected = brute_transform(x, kind)
    torch.testing.assert_close(getattr(sf, kind)(x), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(T._torch_butterfly(x, kind), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_error_within_twice_plain_float32(kind):
    """fp32 fast path vs the fp64 reference: at most ~2x the error of the plain fp32 torch butterfly."""
    x = torch.randn(8, 2**12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = T._torch_butterfly(x, kind)
    fast_err = (getattr(sf, kind)(x.float()).double() - exact).abs().max()
    plain_err = (T._torch_butterfly(x.float(), kind).double() - exact).abs().max()
    assert fast_err <= 2 * plain_err + 1e-6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 5, 12, 16])
def test_inverse_roundtrip(kind, n):
    x = torch.randn(2, 2**n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    back = getattr(sf, INVERSE[kind])(getattr(sf, kind)(x))
    torch.testing.assert_close(back, x, rtol=0, atol=1e-9 * max(1, n))


def _isas() -> list[str]:
    """The butterfly kernels this CPU can run: 'generic' always, 'avx2' on x86-64 CPUs that have it."""
    if not _ext.extension_status()[0]:
        return []
    from sftint_fast import _C

    try:
        _C.set_butterfly_isa("avx2")
    except ValueError:
        return ["generic"]
    finally:
        _C.set_butterfly_isa("auto")
    return ["avx2", "generic"]


@pytest.fixture(params=_isas())
def isa(request):
    """Forces the C++ butterfly kernels of one instruction set for the test, then goes back to the automatic one."""
    from sftint_fast import _C

    _C.set_butterfly_isa(request.param)
    yield request.param
    _C.set_butterfly_isa("auto")


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int64)


@requires_ext
@pytest.mark.parametrize("n", range(0, 17))
def test_cpp_kernels_bitwise_equal_to_pass_by_pass_butterfly(isa, n):
    """Every size class of the C++ kernels (rows shorter than a vector, one vector, radix-2/4/8 sweeps after the
    in-vector bits) for both instruction sets: the bits are applied in the same order as the torch fallback's n
    passes, so the results agree bit for bit, in both dtypes, for all four ops."""
    gen = torch.Generator().manual_seed(100 + n)
    for batch in (1, 3, 64) if n <= 14 else (1, 3):
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(batch, 2**n, generator=gen, dtype=dtype)
            for kind in KINDS:
                fast, plain = getattr(torch.ops.sftint, kind)(x), T._torch_butterfly(x, kind)
                assert torch.equal(_bits(fast), _bits(plain)), (kind, batch, dtype)


@requires_ext
@pytest.mark.parametrize("n", [0, 2, 3, 5, 8])
def test_cpp_kernels_match_brute_force(isa, n):
    x = torch.randn(5, 2**n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    for kind in KINDS:
        torch.testing.assert_close(getattr(torch.ops.sftint, kind)(x), brute_transform(x, kind), rtol=0, atol=1e-10)


@requires_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_kernels_keep_signed_zeros_and_nonfinite_values_where_they_belong(isa, dtype):
    """The in-vector bits select lanes with bit masks: a -0.0 stays -0.0 where no value is added, and an inf in
    one lane reaches only the sets the transform sends it to (no 0 * inf = NaN in its neighbours)."""
    x = torch.randn(3, 2**6, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x[0] = -0.0
    x[1, 5] = float("inf")
    x[2, 2], x[2, 9] = float("inf"), float("-inf")
    for kind in KINDS:
        fast, plain = getattr(torch.ops.sftint, kind)(x), T._torch_butterfly(x, kind)
        torch.testing.assert_close(fast, plain, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(_bits(fast[0]), _bits(plain[0])), kind


@requires_ext
@pytest.mark.parametrize("n", [19, 20])
def test_cpp_within_row_parallel_path_bitwise(isa, n):
    """One or two rows of >= 2^19 values (two tasks of 2^18) with more threads than rows: each sweep of a row is
    split across threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(3, threads))
    try:
        for rows in (1, 2):
            x = torch.randn(rows, 2**n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
            for kind in KINDS:
                assert torch.equal(getattr(torch.ops.sftint, kind)(x), T._torch_butterfly(x, kind)), (kind, rows)
    finally:
        torch.set_num_threads(threads)


@requires_ext
def test_butterfly_isa_names_and_rejects_unknown():
    from sftint_fast import _C

    assert _C.butterfly_isa() in ("avx2", "generic")
    with pytest.raises(ValueError, match="expected 'auto', 'generic'.*got 'avx512'"):
        _C.set_butterfly_isa("avx512")
    with pytest.raises(TypeError, match="expected a str"):
        _C.set_butterfly_isa(2)
    assert _C.set_butterfly_isa("auto") in ("avx2", "generic")


def test_harsanyi_docstring_example():
    torch.testing.assert_close(sf.harsanyi(torch.tensor([0.0, 1.0, 2.0, 4.0])), torch.tensor([0.0, 1.0, 2.0, 1.0]))


def test_planted_sparse_game_recovered_exactly():
    n = 8
    planted = torch.zeros(2**n, dtype=torch.float64)
    for mask, value in {0b1: 0.5, 0b101: -1.25, 0b11010010: 2.0, 0b11111111: 0.75}.items():
        planted[mask] = value
    v = sf.inverse_harsanyi(planted)
    recovered = sf.harsanyi(v)
    torch.testing.assert_close(recovered, planted, rtol=0, atol=1e-12)
    assert set(recovered.abs().gt(1e-9).nonzero().flatten().tolist()) == {0b1, 0b101, 0b11010010, 0b11111111}


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_shapley_matches_permutation_formula_and_efficiency(n):
    v = torch.randn(3, 2**n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    phi = sf.shapley(v)
    torch.testing.assert_close(phi, brute_shapley(v), rtol=0, atol=1e-10)
    torch.testing.assert_close(phi.sum(-1), v[:, -1] - v[:, 0], rtol=0, atol=1e-10)


def test_shapley_symmetry():
    """A game that depends only on |S| gives every player the same Shapley value."""
    n = 6
    size_of = T.popcount(2**n).double()
    v = size_of**2 - 3 * size_of
    phi = sf.shapley(v)
    torch.testing.assert_close(phi, torch.full((n,), phi[0].item(), dtype=torch.float64))
    # A dummy player (never changes v) gets zero.
    v2 = torch.tensor([float(bin(s & 0b11).count("1")) for s in range(2**3)], dtype=torch.float64)
    assert sf.shapley(v2)[2].abs() < 1e-12


@pytest.mark.parametrize("n", range(0, 8))
def test_or_interactions_match_brute_force_and_universal_matching(n):
    v_or = torch.randn(2, 2**n, generator=torch.Generator().manual_seed(10 + n), dtype=torch.float64)
    i_or = sf.or_interactions(v_or)
    torch.testing.assert_close(i_or, brute_or_interactions(v_or), rtol=0, atol=1e-10)
    # v_or(T) = I_or(∅) + Σ_{S∩T≠∅, S≠∅} I_or(S)
    size = 2**n
    matched = torch.stack(
        [i_or[:, 0] + sum((i_or[:, s] for s in range(1, size) if s & t), torch.zeros(2, dtype=torch.float64))
         for t in range(size)], dim=-1)
    torch.testing.assert_close(matched, v_or, rtol=0, atol=1e-10)
    torch.testing.assert_close(sf.inverse_or_interactions(i_or), v_or, rtol=0, atol=1e-10)


@requires_ext
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(kind, dtype):
    op = getattr(torch.ops.sftint, kind)
    for shape in [(1,), (8,), (3, 16), (2, 2, 4)]:
        torch.library.opcheck(op, (torch.randn(*shape, dtype=dtype),))


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    x = torch.randn(2, 2**4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: T.transform(t, kind), (x,))
    assert torch.autograd.gradgradcheck(lambda t: T.transform(t, kind), (x,))


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_jacobian_grad_and_vmap(kind):
    """The transforms are differentiable under torch.func too (jacrev, grad, vmap): the autograd.Function lacked
    setup_context and a vmap rule, which torch.func requires, so each of these raised."""
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    jacobian = torch.func.jacrev(lambda t: T.transform(t, kind))(x[0, 0])
    torch.testing.assert_close(jacobian, brute_transform(torch.eye(8, dtype=torch.float64), kind).T)
    grad = torch.func.grad(lambda t: T.transform(t, kind)[..., 5].sum())(x)
    tracked = x.clone().requires_grad_()
    T.transform(tracked, kind)[..., 5].sum().backward()
    torch.testing.assert_close(grad, tracked.grad)
    for dim in (0, 1):
        batched = torch.func.vmap(lambda t: T.apply_unchecked(t, kind), in_dims=dim)(x)
        torch.testing.assert_close(batched, brute_transform(x.movedim(dim, 0), kind))


def test_gradcheck_or_and_shapley():
    x = torch.randn(3, 2**3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sf.or_interactions, (x,))
    assert torch.autograd.gradcheck(sf.shapley, (x,))


@requires_ext
@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.ones(3), "power of two"),
        (torch.ones(4, dtype=torch.int64), "float32 or float64"),
        (torch.ones(4, dtype=torch.float16), "float32 or float64"),
    ],
    ids=["size3", "int64", "float16"],
)
def test_cpp_op_checks(bad, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.sftint.subset_mobius(bad)


@pytest.mark.parametrize("fn", [sf.harsanyi, sf.inverse_harsanyi, sf.shapley, sf.or_interactions, sf.superset_mobius])
def test_bad_inputs(fn):
    with pytest.raises(ValueError, match=r"size 2\^n.*got 6"):
        fn(torch.zeros(6))
    with pytest.raises(TypeError, match="float32 or float64, got torch.int64"):
        fn(torch.zeros(8, dtype=torch.int64))
    with pytest.raises(TypeError, match="float32 or float64, got torch.complex64"):
        fn(torch.zeros(8, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn([0.0, 1.0])
    with pytest.raises(ValueError, match="NaN/inf"):
        fn(torch.tensor([0.0, float("nan"), 1.0, 2.0]))
    with pytest.raises(ValueError, match="NaN/inf"):
        fn(torch.tensor([0.0, float("inf"), 1.0, 2.0]))
    with pytest.raises(ValueError, match="0-d"):
        fn(torch.tensor(1.0))


def test_player_limit_is_configurable():
    x = torch.zeros(2**5)
    with pytest.raises(ValueError, match=r"n=5 players exceeds the limit max_players=4"):
        sf.harsanyi(x, max_players=4)
    sf.harsanyi(x, max_players=5)


def test_shapley_from_harsanyi_matches():
    v = torch.randn(2**4, dtype=torch.float64)
    torch.testing.assert_close(shapley_from_harsanyi(sf.harsanyi(v)), sf.shapley(v))


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of the largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("call", [
    lambda x: T.popcount(x.shape[-1]),
    sf.strength_by_order,
    sf.shapley,
], ids=["popcount", "strength_by_order", "shapley"])
def test_order_and_shapley_need_no_n_by_2n_intermediates(call):
    """popcount built an int64 (2^n, n) bit table and shapley a (2^n, n) membership matrix: at n=22 a 16 MiB game
    took 1.4 GiB, at n=26 it exhausts a 32 GiB machine. No intermediate may exceed one int64/fp64 row."""
    n = 16
    x = torch.randn(2**n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with _LargestTensor() as mode:
        call(x)
    assert mode.largest <= 8 * 2**n, f"largest intermediate {mode.largest:,} bytes for a {8 * 2**n:,}-byte game"


def test_validation_errors_name_the_callers_argument():
    # the messages used to name the internal transform's "x", an argument the caller never passed
    with pytest.raises(TypeError, match=r"^v: expected dtype float32 or float64, got torch.int64"):
        sf.harsanyi(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"^v: expected finite values"):
        sf.shapley(torch.tensor([0.0, float("nan"), 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"^interactions: expected shape \(\.\.\., 2\^n\)"):
        sf.inverse_harsanyi(torch.tensor(1.0))


@pytest.mark.parametrize("kind", [["subset_mobius"], None, 3], ids=["list", "None", "int"])
def test_transform_kind_of_the_wrong_type_says_what_is_expected(kind):
    """A list kind raised 'unhashable type: list' (the dict lookup), not what kind must be."""
    from sftint_fast.ops.transforms import transform

    with pytest.raises(ValueError, match=r"kind: expected one of \['subset_mobius'"):
        transform(torch.zeros(4), kind)


def test_transforms_of_meta_tensors_give_the_shape_or_the_error_of_a_real_one():
    """Meta tensors (shape propagation, torch.compile's fake tensors): the public transforms failed on the finiteness
    check ('Tensor.item() cannot be called on meta tensors'), and the C++ ops' fake impls accepted any last dimension
    and dtype that the kernels refuse."""
    out = sf.harsanyi(torch.empty(2, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 8)
    with pytest.raises(ValueError, match="expected the last dimension to have size 2\\^n.*got 6"):
        sf.harsanyi(torch.empty(2, 6, device="meta"))
    with pytest.raises(ValueError, match="v: expected a tensor with values \\(CPU or CUDA\\), got a meta tensor"):
        sf.and_or(torch.empty(2, 8, device="meta"), niter=1, progress=False)
    if _ext.has_ext():
        with pytest.raises(RuntimeError, match="sftint::subset_mobius: expected the last dimension to be a power"):
            torch.ops.sftint.subset_mobius(torch.empty(2, 6, device="meta"))
        with pytest.raises(RuntimeError, match="sftint::superset_zeta: expected dtype float32 or float64, got"):
            torch.ops.sftint.superset_zeta(torch.empty(2, 8, device="meta", dtype=torch.int64))


@pytest.mark.parametrize("name", ["harsanyi", "inverse_harsanyi", "shapley", "or_interactions",
                                  "inverse_or_interactions", *KINDS])
def test_public_functions_under_vmap_match_a_loop_and_still_refuse_nan(name, recwarn):
    """torch.func.vmap over the public functions raised vmap's 'data-dependent control flow' RuntimeError: the
    finiteness check branched on the batched tensor. It now checks the plain tensor vmap wraps (all of the batch),
    and the transforms take their vmap rule (no per-sample fallback loop, which warned)."""
    fn = getattr(sf, name)
    x = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for dim in (0, 1):
        batched = torch.func.vmap(fn, in_dims=dim)(x)
        torch.testing.assert_close(batched, torch.stack([fn(row) for row in x.unbind(dim)]))
    assert not [w for w in recwarn if "batching rule" in str(w.message)]
    bad = x.clone()
    bad[2, 1, 5] = float("inf")
    with pytest.raises(ValueError, match=r"expected finite values, got NaN/inf \(first at index \[2, 1, 5\] of the "
                                         r"batched input, under torch.func\)"):
        torch.func.vmap(fn)(bad)
    with pytest.raises(ValueError, match=r"expected finite values, got NaN/inf \(first at index \[2, 1, 5\]\)"):
        fn(bad)


def test_vmap_of_grad_and_compile_of_harsanyi():
    """Nested transforms (vmap of jacrev) unwrap every level; torch.compile without fullgraph breaks the graph at the
    finiteness check and still refuses NaN."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    jacobians = torch.func.vmap(torch.func.jacrev(sf.shapley))(x)
    torch.testing.assert_close(jacobians, torch.stack([torch.func.jacrev(sf.shapley)(row) for row in x]))

    def total(t):
        return sf.harsanyi(t * 2).sum(-1)

    compiled = torch.compile(total, fullgraph=False, backend="eager")
    torch.testing.assert_close(compiled(x), total(x))
    with pytest.raises(ValueError, match="v: expected finite values, got NaN/inf"):
        compiled(torch.full((2, 8), float("nan"), dtype=torch.float64))
