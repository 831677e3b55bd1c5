"""Triton's CPU interpreter before 3.7 cannot run data-dependent loops with numpy>=2.4: a clear error, not numpy's."""
import numpy
import pytest
import torch
import triton

from sftint_fast.ops import triton as triton_ops


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.6", True),
    ("3.5.1", "2.4.0", True),
    ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False),
    ("3.9.0+git1234", "2.4.6", False),
    ("3.6.0", "1.26.4", False),
])
def test_interpreter_problem_by_versions(monkeypatch, triton_version, numpy_version, broken):
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = triton_ops.interpreter_problem.__wrapped__()
    if broken:
        assert f"triton {triton_version}" in problem and f"numpy {numpy_version}" in problem
        assert "numpy<2.4" in problem
    else:
        assert problem is None


def test_kernels_raise_the_clear_error_on_cpu(monkeypatch):
    from sftint_fast.ops.triton.subset_attention import subset_attention
    from sftint_fast.ops.triton.transforms import butterfly

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_ops, "interpreter_problem", lambda: "the reason")
    with pytest.raises(RuntimeError, match="the reason"):
        butterfly(torch.zeros(8), "subset_mobius")
    q = torch.zeros(1, 2, 2, 16)
    store = torch.zeros(4, 1, 16)
    table = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="the reason"):
        subset_attention(q, store, store, torch.zeros(1, dtype=torch.int64), table, table, table, table,
                         level=1, scale=0.25)
    triton_ops.check_interpreter(torch.device("cuda"))  # compiled kernels are not affected


def test_info_reports_the_interpreter_problem(monkeypatch):
    from sftint_fast import info

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "CANNOT RUN" not in info.collect()["Triton mode"] or triton_ops.interpreter_problem() is not None
    monkeypatch.setattr(triton_ops, "interpreter_problem", lambda: "the reason")
    assert info.collect()["Triton mode"].endswith("CANNOT RUN THE KERNELS: the reason")


def test_cpu_tensors_without_the_interpreter_get_a_clear_error(monkeypatch):
    """Compiled kernels cannot read CPU tensors: say so (and what to do) before Triton fails on a pointer."""
    from conftest import tiny_model
    from test_triton_trie import make_game

    import sftint_fast as sf
    from sftint_fast.ops.triton.rms_norm import rms_norm
    from sftint_fast.ops.triton.transforms import butterfly

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    expected = "Triton kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter"
    with pytest.raises(ValueError, match="x: expected a CUDA tensor with triton installed"):
        butterfly(torch.zeros(8), "subset_mobius")
    with pytest.raises(RuntimeError, match=expected):
        rms_norm(torch.zeros(2, 8), torch.ones(8), 1e-6)
    with pytest.raises(RuntimeError, match="got cpu tensors without it: move the model to a GPU or use "
                                           "attention_backend='torch'"):
        sf.evaluate(tiny_model("llama"), make_game("embedding"), method="trie", attention_backend="triton",
                    progress=False)

