"""Triton butterflies (interpreter on CPU) against the brute-force subset sums."""
import pytest
import torch

import sftint_fast as sf

from conftest import requires_triton
from sftint_fast.ops.reference import brute_transform

pytestmark = requires_triton

# Compiled kernels on a GPU; the interpreter (conftest sets TRITON_INTERPRET=1 without CUDA) on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(x, kind):
    from sftint_fast.ops.triton.transforms import butterfly

    return butterfly(x.to(DEVICE), kind).cpu()


KINDS = ["subset_mobius", "subset_zeta", "superset_mobius", "superset_zeta"]
INVERSE = {"subset_mobius": "subset_zeta", "subset_zeta": "subset_mobius",
           "superset_mobius": "superset_zeta", "superset_zeta": "superset_mobius"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("n", range(9), ids=[f"n={n}" for n in range(9)])
@pytest.mark.parametrize("kind", KINDS)
def test_butterfly_matches_brute_force(kind, n, dtype):
    x = torch.randn(2, 1 << n, generator=torch.Generator().manual_seed(n), dtype=torch.float64).to(dtype)
    out = run(x, kind)
    assert out.shape == x.shape and out.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5 * 2 ** (n / 2)
    torch.testing.assert_close(out.double(), brute_transform(x, kind), atol=tol, rtol=0)


@pytest.mark.parametrize("n", [9, 11, 14], ids=["n=9", "n=11", "n=14"])
@pytest.mark.parametrize("kind", ["subset_mobius", "superset_zeta"])
def test_butterfly_high_bits_match_torch(kind, n):
    """n > 10 exercises the strided launches after the in-block one (the torch butterfly is exact in fp64)."""
    from sftint_fast.ops.transforms import _torch_butterfly

    x = torch.randn(1 << n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    torch.testing.assert_close(run(x, kind), _torch_butterfly(x, kind), atol=1e-9, rtol=0)


@pytest.mark.parametrize("n", [0, 3, 11], ids=["n=0", "n=3", "n=11"])
@pytest.mark.parametrize("kind", KINDS)
def test_inverse_of_transform_is_identity(kind, n):
    x = torch.randn(3, 1 << n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(run(run(x, kind), INVERSE[kind]), x, atol=1e-10, rtol=0)


def test_batch_dims_and_input_untouched():
    from sftint_fast.ops.triton.transforms import butterfly

    x = torch.randn(2, 3, 16, dtype=torch.float64)
    x = x.to(DEVICE)
    before = x.clone()
    out = butterfly(x, "subset_mobius")
    assert torch.equal(x, before)
    x, out = x.cpu(), out.cpu()
    torch.testing.assert_close(out, brute_transform(x, "subset_mobius"), atol=1e-12, rtol=0)


def test_bad_inputs_raise_value_or_type_error():
    from sftint_fast.ops.triton.transforms import butterfly

    with pytest.raises(ValueError):
        butterfly(torch.zeros(6), "subset_mobius")
    half = torch.zeros(4, dtype=torch.float16)  # a wrong dtype: a TypeError, as from the public transform
    with pytest.raises(TypeError, match="x: expected dtype float32 or float64, got torch.float16"):
        butterfly(half, "subset_mobius")
    with pytest.raises(TypeError, match="x: expected dtype float32 or float64, got torch.float16"):
        sf.subset_mobius(half)
    with pytest.raises(ValueError):
        butterfly(torch.zeros(4), "mobius")
    with pytest.raises(ValueError, match="kind: expected one of"):  # was TypeError: unhashable type: 'list'
        butterfly(torch.zeros(4), ["subset_mobius"])


def test_available_on_this_machine():
    """The interpreter accepts CPU tensors; compiled Triton accepts CUDA tensors."""
    from sftint_fast.ops.triton.transforms import available

    assert available(torch.zeros(1, device=DEVICE))
