"""The C++ layer-loop ops on the CPU (RMSNorm, RoPE, SiLU gate) against the HF code they stand in for, the C++
log-odds against a float64 reference, the trie's layer loop and the game's value using them, and their errors."""
import doctest

import pytest
import torch
from conftest import LLAMA_LIKE_NORMS, count_calls, llama_like_norm, requires_ext, tiny_model

from sftint_fast.ops import layer_ops

pytestmark = requires_ext

#: float32: reduction order (RMSNorm's mean) and the last bits of exp (silu); RoPE is exact
TOL = 2e-6


def _hf_norm(cls_name: str, size: int, gen: torch.Generator) -> torch.nn.Module:
    import transformers.models.gemma2.modeling_gemma2 as gemma2
    import transformers.models.gemma3.modeling_gemma3 as gemma3
    import transformers.models.gemma.modeling_gemma as gemma1
    import transformers.models.granite.modeling_granite as granite
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    cls = {"LlamaRMSNorm": llama.LlamaRMSNorm, "Qwen2RMSNorm": qwen2.Qwen2RMSNorm,
           "Gemma3RMSNorm": gemma3.Gemma3RMSNorm, "Gemma2RMSNorm": gemma2.Gemma2RMSNorm,
           "GemmaRMSNorm": gemma1.GemmaRMSNorm, "GraniteRMSNorm": granite.GraniteRMSNorm}.get(cls_name)
    module = (cls or llama_like_norm(cls_name))(size, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(torch.randn(size, generator=gen))
    return module


@pytest.mark.parametrize("cls_name", ["LlamaRMSNorm", "Qwen2RMSNorm", "Gemma3RMSNorm", "Gemma2RMSNorm",
                                      "GemmaRMSNorm", "GraniteRMSNorm", *LLAMA_LIKE_NORMS])
@pytest.mark.parametrize("shape", [(1, 8), (37, 72), (5, 3, 8), (300, 576), (2, 1)])  # odd H, 3-D, one element
def test_rms_norm_matches_hf(cls_name, shape):
    from sftint_fast.engine.adapters.llama import FUSED_NORMS

    gen = torch.Generator().manual_seed(0)
    module = _hf_norm(cls_name, shape[-1], gen)
    x = 3 * torch.randn(shape, generator=gen)
    gemma = FUSED_NORMS[cls_name] == "gemma"  # the form the adapters pick for this class
    got = layer_ops.rms_norm(x, module.weight.detach(), module.eps if gemma else module.variance_epsilon,
                             gemma=gemma)
    with torch.no_grad():
        torch.testing.assert_close(got, module(x), rtol=TOL, atol=TOL)


def test_rms_norm_reads_strided_rows_and_keeps_its_input():
    base = torch.randn(20, 48)
    x, w = base[:, :40], torch.randn(40)  # rows with a stride of 48
    before = base.clone()
    want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(layer_ops.rms_norm(x, w, 1e-6), want, rtol=TOL, atol=TOL)
    assert torch.equal(base, before)


def _tables(tokens: int, dim: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.randn(tokens, dim // 2, generator=gen) * 3
    return torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)


@pytest.mark.parametrize("tokens,heads,dim", [(1, 1, 2), (70, 9, 64), (13, 2, 8), (5, 3, 6)])
def test_rope_equals_hf_apply_rotary_pos_emb_bit_for_bit(tokens, heads, dim):
    """Same float32 products and sums as HF's (no FMA contraction): equal, not just close; in place."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, heads, dim, generator=gen)
    cos, sin = _tables(tokens, dim, gen)
    want, _ = apply_rotary_pos_emb(x[None], x[None], cos[None], sin[None], unsqueeze_dim=2)
    got = layer_ops.rope_(x, cos, sin)
    assert got is x
    assert torch.equal(got, want[0])


def test_rope_of_a_strided_view_writes_only_its_view():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(11, 6 * 16, generator=gen)
    keep = qkv[:, 4 * 16:].clone()
    q = qkv[:, :4 * 16].unflatten(-1, (4, 16))  # token stride 96, head stride 16
    cos, sin = _tables(11, 16, gen)
    want, _ = apply_rotary_pos_emb(q[None], q[None], cos[None], sin[None], unsqueeze_dim=2)
    want = want[0].clone()
    layer_ops.rope_(q, cos, sin)
    assert torch.equal(q, want) and torch.equal(qkv[:, 4 * 16:], keep)


def test_silu_mul_matches_torch_in_place():
    gen = torch.Generator().manual_seed(3)
    gate = 4 * torch.randn(33, 70, generator=gen)
    gate[0, :6] = torch.tensor([-100.0, 100.0, -87.0, 89.0, 0.0, -0.0])  # exp's clamps, both sides
    up = torch.randn(33, 70, generator=gen)
    want = torch.nn.functional.silu(gate.double()) * up.double()
    got = layer_ops.silu_mul_(gate, up)
    assert got is gate
    torch.testing.assert_close(got.double(), want, rtol=TOL, atol=1e-30)


def test_silu_mul_propagates_nan_and_inf():
    """A NaN or inf gate must not come out as a finite number (the engine's NaN check relies on it)."""
    gate = torch.tensor([float("nan"), float("inf"), 1.0])
    got = layer_ops.silu_mul_(gate, torch.tensor([1.0, 1.0, float("nan")]))
    assert got[0].isnan() and got[1] == float("inf") and got[2].isnan()


def test_silu_mul_of_a_gate_beyond_exps_range_is_torchs():
    """exp(-gate) above float32's range is inf, as in torch: a huge finite negative gate gives -0 (exp's clamp to
    3.4e38 gave -1e38 / 2.4e38 = -0.42), a -inf gate NaN (it gave -inf)."""
    gate = torch.tensor([-1e38, -1e33, -1e30, -3e4, -89.0, float("-inf"), float("inf"), -20.0])
    up = torch.full_like(gate, 3.0)
    want = torch.nn.functional.silu(gate) * up
    got = layer_ops.silu_mul_(gate.clone(), up)
    torch.testing.assert_close(got, want, rtol=TOL, atol=1e-30, equal_nan=True)


def _log_odds_reference(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    y = target.view(1, -1, 1).expand(logits.shape[0], -1, 1)
    return (logits.gather(-1, y).squeeze(-1) - logits.scatter(-1, y, float("-inf")).logsumexp(-1)).sum(-1)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("vocab", [2, 7, 1000, 49152])
def test_log_odds_matches_the_float64_reference(m, vocab):
    """Within twice torch's own float32 error of the float64 value (plus a few ulps of the value)."""
    gen = torch.Generator().manual_seed(vocab + m)
    logits = 4 * torch.randn(9, m, vocab, generator=gen)
    target = torch.randint(vocab, (m,), generator=gen)
    target[0] = vocab - 1  # the last token, and (row 1) a dominant target: log(1 - p) stays accurate
    logits[1, 0, vocab - 1] += 40
    if m == 2:
        target[1] = 0
    exact = _log_odds_reference(logits.double(), target)
    torch_err = (_log_odds_reference(logits, target).double() - exact).abs().max().item()
    values, finite = layer_ops.log_odds(logits, target)
    assert values.dtype == torch.float32 and bool(finite.all())
    err = (values.double() - exact).abs().max().item()
    assert err <= 2 * torch_err + 4e-7 * exact.abs().max().item(), (err, torch_err)


def test_log_odds_flags_every_non_finite_row():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(8, 2, 50, generator=gen)
    target = torch.tensor([3, 49])
    logits[1, 0, 7] = float("nan")
    logits[2, 1, 49] = float("-inf")  # the target itself
    logits[3, 1, 0] = float("-inf")   # another token
    logits[4, 0, 3] = float("inf")
    logits[5, 1, :] = float("nan")
    _, finite = layer_ops.log_odds(logits, target)
    assert (~finite).nonzero().flatten().tolist() == [1, 2, 3, 4, 5]


def test_ops_raise_clear_errors():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="rms_norm: x: expected a float32 CPU tensor, got BFloat16"):
        layer_ops.rms_norm(x.bfloat16(), torch.ones(8).bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match=r"rms_norm: weight: expected shape \(8,\)"):
        layer_ops.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match=r"rope_: x: expected shape \[N, heads, D\] with D even"):
        layer_ops.rope_(torch.randn(4, 2, 7), torch.randn(4, 7), torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="unit stride over D"):
        layer_ops.rope_(torch.randn(4, 8, 2).transpose(1, 2), torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match=r"rope_: cos: expected shape \[4, 8\], got \[5, 8\]"):
        layer_ops.rope_(torch.randn(4, 2, 8), torch.randn(5, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match=r"silu_mul_: up: expected shape \[4, 8\]"):
        layer_ops.silu_mul_(x, torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="silu_mul_: gate: expected a contiguous tensor"):
        layer_ops.silu_mul_(x.t(), torch.randn(8, 4))
    with pytest.raises(RuntimeError, match=r"log_odds: target\[1\]: expected a token id in \[0, 8\), got 8"):
        layer_ops.log_odds(torch.randn(3, 2, 8), torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match=r"log_odds: target: expected int64 \[2\]"):
        layer_ops.log_odds(torch.randn(3, 2, 8), torch.tensor([0]))


@pytest.mark.parametrize("op,args", [
    ("rms_norm", lambda: (torch.randn(5, 8), torch.randn(8), 1e-6, False)),
    ("rms_norm", lambda: (torch.randn(2, 3, 8), torch.randn(8), 1e-6, True)),
    ("rope_", lambda: (torch.randn(5, 2, 8), torch.randn(5, 8), torch.randn(5, 8))),
    ("silu_mul_", lambda: (torch.randn(5, 8), torch.randn(5, 8))),
    ("log_odds", lambda: (torch.randn(5, 2, 8), torch.tensor([1, 7]))),
], ids=["rms_norm", "rms_norm_gemma", "rope_", "silu_mul_", "log_odds"])
def test_opcheck(op, args):
    """Schemas (in-place ops declared as such), fake impls, dispatch and (log_odds) the autograd registration agree
    with what the ops do."""
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_autograd_registration")
    torch.library.opcheck(getattr(torch.ops.sftint, op).default, args(), test_utils=utils)


def test_module_example():
    assert doctest.testmod(layer_ops, extraglobs={"torch": torch}).failed == 0


def count_cpu_ops(monkeypatch) -> dict:
    return count_calls(monkeypatch, dict.fromkeys(("rms_norm", "rope_", "silu_mul_"), layer_ops))


def test_layer_loop_keeps_the_modules_for_other_dtypes(monkeypatch):
    """A bfloat16 model on the CPU: the C++ ops take float32 only, so the modules run and nothing changes."""
    from sftint_fast.engine.adapters import get_adapter

    net = tiny_model("llama", initializer_range=0.2).to(torch.bfloat16)
    adapter = get_adapter(net)
    ids, positions = torch.arange(3, 10), torch.arange(7)

    def attend(layer, q, k, v):
        return q  # any function of q: only the surrounding ops are compared

    with torch.no_grad():
        plain = adapter.run_layers(adapter.embed(ids), positions, attend)
        calls = count_cpu_ops(monkeypatch)
        fused = adapter.run_layers(adapter.embed(ids), positions, attend, fused="cpu")
    assert calls == {"rms_norm": 0, "rope_": 0, "silu_mul_": 0}
    assert torch.equal(fused, plain)


def test_trie_on_the_cpu_uses_the_ops_and_matches_naive(monkeypatch):
    """The CPU trie runs the C++ ops by default; ``FUSE_ELEMENTWISE=False`` (SFTINT_FUSE_ELEMENTWISE=0) runs the
    modules; both match the naive engine."""
    from test_trie import check_close, make_game

    from sftint_fast.engine import trie
    from sftint_fast.engine.naive import evaluate_naive

    net = tiny_model("qwen2", attn="sdpa", initializer_range=0.2)
    game = make_game("spread_n5", seed=7)
    with torch.no_grad():
        naive = evaluate_naive(net, game, torch.arange(1 << game.num_players), progress=False)
    calls = count_cpu_ops(monkeypatch)
    assert trie.elementwise_backend("torch", torch.device("cpu")) == "cpu"
    on = trie.evaluate_trie(net, game, batch_size=7, progress=False)
    assert min(calls.values()) > 0
    monkeypatch.setattr(trie, "FUSE_ELEMENTWISE", False)
    assert trie.elementwise_backend("torch", torch.device("cpu")) is None
    before = dict(calls)
    off = trie.evaluate_trie(net, game, batch_size=7, progress=False)
    assert calls == before
    check_close(on, naive)
    check_close(off, naive)


def test_game_value_uses_log_odds_on_the_cpu(monkeypatch):
    """The game's log-odds value through the C++ op equals the ATen formula, and NaN logits name the same subsets."""
    from test_trie import make_game

    game = make_game("spread_n5", seed=8)
    gen = torch.Generator().manual_seed(9)
    logits = 5 * torch.randn(6, game.target.numel(), 128, generator=gen)
    subsets = torch.tensor([3, 5, 7, 11, 13, 17])
    fast = game.values_from_logits(logits, subsets=subsets)
    bad = logits.clone()
    bad[2, 0, 5] = float("nan")
    bad[4, -1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite \(NaN/inf\) logits for subsets \(bitmasks\) \[7, 13\]"):
        game.values_from_logits(bad, subsets=subsets)
    calls = []
    monkeypatch.setattr(layer_ops, "log_odds", lambda *a: calls.append(1))
    monkeypatch.setattr(layer_ops, "log_odds_available", lambda x: False)  # the ATen path
    slow = game.values_from_logits(logits, subsets=subsets)
    with pytest.raises(ValueError, match=r"non-finite \(NaN/inf\) logits for subsets \(bitmasks\) \[7, 13\]"):
        game.values_from_logits(bad, subsets=subsets)
    assert not calls
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_log_odds_gradient_is_the_aten_formula_s():
    """The C++ value is differentiable (a learned baseline trains through it): its gradient is the ATen formula's."""
    gen = torch.Generator().manual_seed(11)
    logits = 3 * torch.randn(4, 2, 37, generator=gen)
    target = torch.tensor([5, 36])
    weights = torch.randn(4, generator=gen)
    fast = logits.clone().requires_grad_()
    (layer_ops.log_odds(fast, target)[0] * weights).sum().backward()
    slow = logits.clone().requires_grad_()
    (_log_odds_reference(slow, target) * weights).sum().backward()
    torch.testing.assert_close(fast.grad, slow.grad, rtol=1e-5, atol=1e-6)
    assert fast.grad.abs().sum() > 0


def test_log_odds_second_derivative_is_the_aten_formula_s():
    """The backward is itself differentiable (create_graph=True, e.g. a Hessian-vector product through the game's
    value): it failed with an in-place error because it negated softmax's output, which softmax's backward reads."""
    gen = torch.Generator().manual_seed(13)
    logits = 2 * torch.randn(3, 2, 11, generator=gen)
    target = torch.tensor([4, 0])
    direction = torch.randn(logits.shape, generator=gen)
    hvps = []
    for value in (lambda x: layer_ops.log_odds(x, target)[0], lambda x: _log_odds_reference(x, target)):
        x = logits.clone().requires_grad_()
        (grad,) = torch.autograd.grad(value(x).sum(), x, create_graph=True)
        hvps.append(torch.autograd.grad((grad * direction).sum(), x)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-5, atol=1e-6)
    assert hvps[0].abs().sum() > 0


def test_game_value_is_the_same_with_and_without_autograd():
    """``evaluate_naive`` called outside ``no_grad`` (logits tracked) gives the same values, bit for bit."""
    from test_trie import make_game

    game = make_game("spread_n5", seed=10)
    logits = torch.randn(4, game.target.numel(), 128, generator=torch.Generator().manual_seed(12))
    tracked = logits.clone().requires_grad_()
    values = game.values_from_logits(tracked)
    assert values.requires_grad
    assert torch.equal(values.detach(), game.values_from_logits(logits))


def test_rope_of_the_model_is_recognised_as_a_function_or_a_hub_kernel_layer():
    """transformers >= 5.25 with ``kernels`` installed makes ``apply_rotary_pos_emb`` an ``nn.Module`` instance
    (a hub-kernel layer named ``rotary_pos_emb``): it is still HF's RoPE, so the fused op stands in for it; any other
    callable is not."""
    from sftint_fast.engine.adapters import get_adapter
    from sftint_fast.engine.adapters.llama import _function_name

    class RotaryLayer(torch.nn.Module):
        kernel_layer_name = "rotary_pos_emb"

    class OtherLayer(torch.nn.Module):
        kernel_layer_name = "rms_norm"

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        return q, k

    assert _function_name(apply_rotary_pos_emb) == "apply_rotary_pos_emb"
    assert _function_name(RotaryLayer()) == "apply_rotary_pos_emb"
    assert _function_name(OtherLayer()) == "OtherLayer"
    assert _function_name(lambda q, k: (q, k)) == "<lambda>"
    for kind in ("llama", "qwen2"):
        assert get_adapter(tiny_model(kind))._rope_fusable, kind  # whichever form this transformers gives it


def test_in_place_ops_refuse_overlapping_memory():
    """rope_ writes x in place: an x whose heads share memory (expand) or a table that is a view of x would give a
    silently wrong result (each shared element rotated once per alias)."""
    cos, sin = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="rope_: x: expected a tensor whose elements do not share memory"):
        layer_ops.rope_(torch.randn(3, 1, 8).expand(3, 4, 8), cos, sin)
    x = torch.randn(3, 4, 8)
    with pytest.raises(RuntimeError, match="rope_: cos: expected a tensor that does not share memory with x"):
        layer_ops.rope_(x, x[:, 0], sin)
    with pytest.raises(RuntimeError, match="rope_: sin: expected a tensor that does not share memory with x"):
        layer_ops.rope_(x, cos, x[:, 1])


def test_rms_norm_of_an_empty_hidden_dimension_says_so():
    with pytest.raises(RuntimeError, match=r"rms_norm: x: expected a last dimension \(hidden size\) >= 1, got 0"):
        layer_ops.rms_norm(torch.randn(3, 0), torch.randn(0), 1e-6)


@pytest.mark.parametrize("op", ["rms_norm", "rope_", "silu_mul_"])
def test_layer_ops_refuse_inputs_autograd_tracks(op):
    """The three have no backward: rope_/silu_mul_ mutated a tensor autograd tracks and kept its old grad_fn (a
    silently wrong gradient), rms_norm's gradient was silently None."""
    x = torch.randn(3, 2, 8, requires_grad=True)
    args = {"rms_norm": lambda t: (t, torch.ones(8), 1e-6), "rope_": lambda t: (t, torch.ones(3, 8), torch.ones(3, 8)),
            "silu_mul_": lambda t: (t, torch.ones(3, 2, 8))}[op]
    with pytest.raises(ValueError, match=f"{op}: .*expected a tensor autograd does not track.*requires_grad=True"):
        getattr(layer_ops, op)(*args(x * 1))
    with torch.no_grad():
        getattr(layer_ops, op)(*args(x.detach().clone()))


@pytest.mark.parametrize("skip", ["0", "1"])
def test_layer_ops_load_the_extension_or_say_why_not(skip):
    """Called first in a process, the wrappers found no torch.ops.sftint.rms_norm (an AttributeError): nothing had
    imported sftint_fast._C yet; without the extension they now say that the C++ extension is missing."""
    import os
    import subprocess
    import sys

    code = ("import torch; from sftint_fast.ops import layer_ops\n"
            "try:\n    print(layer_ops.rms_norm(torch.ones(2, 4), torch.ones(4), 1e-6).shape)\n"
            "except RuntimeError as exc:\n    print(exc)\n")
    env = dict(os.environ, SFTINT_SKIP_EXT=skip, SFTINT_REQUIRE_EXT="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's sftint_fast
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = "torch.Size([2, 4])" if skip == "0" else "rms_norm: needs the C++ extension sftint_fast._C"
    assert expected in out.stdout, out.stdout


def test_silu_mul_refuses_an_up_that_partly_overlaps_gate():
    """gate is written in place while up is read: an up one element beside gate in the same buffer was read after
    its elements had been overwritten (silently wrong, max error ~3). up *is* gate stays allowed (elementwise)."""
    buf = torch.randn(65)
    with pytest.raises(RuntimeError, match="silu_mul_: up: expected .* not to share memory with gate"):
        layer_ops.silu_mul_(buf[1:], buf[:-1])
    with pytest.raises(RuntimeError, match="silu_mul_: up: expected .* not to share memory with gate"):
        layer_ops.silu_mul_(buf[:-1], buf[1:])
    x = torch.randn(40)
    want = torch.nn.functional.silu(x.double()) * x.double()
    torch.testing.assert_close(layer_ops.silu_mul_(x, x).double(), want, rtol=TOL, atol=1e-30)
    gate, up = torch.randn(8, 6), torch.randn(6, 8)
    layer_ops.silu_mul_(gate, up.t())  # a non-contiguous up is copied first: no overlap to check


@pytest.mark.parametrize("sizes, strides", [((3, 2, 8), (16, 4, 1)), ((4, 1, 8), (4, 8, 1))],
                         ids=["heads-overlap", "tokens-overlap"])
def test_rope_refuses_an_x_whose_strided_elements_overlap(sizes, strides):
    """Overlapping strided views (no zero stride, so ATen calls them 'too hard') were rotated in place, each shared
    element once per alias: silently wrong. Views of dense tensors (permuted, sliced) stay accepted."""
    x = torch.randn(200).as_strided(sizes, strides)
    table = torch.randn(sizes[0], sizes[2])
    with pytest.raises(RuntimeError, match="rope_: x: expected a tensor whose elements do not share memory"):
        layer_ops.rope_(x, table, table.clone())
    dense = torch.randn(2, 5, 8).transpose(0, 1)[1:, ::1]  # [4, 2, 8], strides (8, 40, 1)
    layer_ops.rope_(dense, torch.randn(4, 8), torch.randn(4, 8))


@pytest.mark.parametrize("op", ["rms_norm", "rope_", "silu_mul_"])
def test_layer_ops_refuse_other_inputs_autograd_tracks(op):
    """Only x (gate) was checked: a weight, table or up that autograd tracks came out with no grad_fn (a silently
    missing gradient, e.g. rms_norm(x, norm.weight) of an nn.Parameter)."""
    tracked = torch.randn(3, 8).requires_grad_()
    call = {"rms_norm": lambda: layer_ops.rms_norm(torch.randn(3, 8), tracked[0], 1e-6),
            "rope_": lambda: layer_ops.rope_(torch.randn(3, 2, 8), torch.ones(3, 8), tracked * 1),
            "silu_mul_": lambda: layer_ops.silu_mul_(torch.randn(3, 8), tracked * 1)}[op]
    with pytest.raises(ValueError, match=f"{op}: .*expected a tensor autograd does not track.*requires_grad=True"):
        call()
    with torch.no_grad():
        call()
