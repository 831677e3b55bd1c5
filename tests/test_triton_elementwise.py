"""The fused Triton elementwise ops (RMSNorm, RoPE, SiLU gate) against the HF code they stand in for, and the trie's
layer loop using them. Kernels run on ``DEVICE`` (compiled on CUDA, where bfloat16 is checked too; interpreted on the
CPU in float32 and float16: bf16 is not reliable in the interpreter); the HF references run on the CPU."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICE, LLAMA_LIKE_NORMS, count_calls, llama_like_norm, requires_ext, requires_triton, tiny_model

pytestmark = requires_triton

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    got, want = got.cpu(), want.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape
    # float32: reduction order / last bit of exp; 16-bit: the same, after one rounding to the dtype
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[got.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def _on(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(DEVICE) for t in tensors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls_name", ["LlamaRMSNorm", "Qwen2RMSNorm", "Gemma3RMSNorm", "Olmo2RMSNorm",
                                      "Gemma2RMSNorm", "GemmaRMSNorm", "GraniteRMSNorm", *LLAMA_LIKE_NORMS])
@pytest.mark.parametrize("shape", [(37, 72), (5, 3, 8), (300, 16)])  # H not a power of 2; 3-D; rows > one program
def test_rms_norm_matches_hf(cls_name, dtype, shape):
    import transformers.models.gemma2.modeling_gemma2 as gemma2
    import transformers.models.gemma3.modeling_gemma3 as gemma3
    import transformers.models.gemma.modeling_gemma as gemma1
    import transformers.models.granite.modeling_granite as granite
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.olmo2.modeling_olmo2 as olmo2
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    from sftint_fast.engine.adapters.llama import FUSED_NORMS
    from sftint_fast.ops.triton.rms_norm import rms_norm

    cls = {"LlamaRMSNorm": llama.LlamaRMSNorm, "Qwen2RMSNorm": qwen2.Qwen2RMSNorm,
           "Gemma3RMSNorm": gemma3.Gemma3RMSNorm, "Olmo2RMSNorm": olmo2.Olmo2RMSNorm,
           "Gemma2RMSNorm": gemma2.Gemma2RMSNorm, "GemmaRMSNorm": gemma1.GemmaRMSNorm,
           "GraniteRMSNorm": granite.GraniteRMSNorm}.get(cls_name) or llama_like_norm(cls_name)
    gen = torch.Generator().manual_seed(0)
    module = cls(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.randn(shape[-1], generator=gen))
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    gemma, olmo = FUSED_NORMS[cls_name] == "gemma", FUSED_NORMS[cls_name] == "olmo"  # the form the adapters pick
    got = rms_norm(*_on(x, module.weight.detach()), module.eps if gemma else module.variance_epsilon, gemma=gemma,
                   olmo=olmo)
    with torch.no_grad():
        _close(got, module(x))


def test_rms_norm_reads_strided_rows():
    from sftint_fast.ops.triton.rms_norm import rms_norm

    base = torch.randn(20, 48)
    x, w = base[:, :40], torch.randn(40)  # rows with a stride of 48
    want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    base_dev, w_dev = _on(base, w)
    _close(rms_norm(base_dev[:, :40], w_dev, 1e-6), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,dim", [(9, 16), (2, 8), (3, 64)])
def test_rope_matches_hf_apply_rotary_pos_emb(dtype, heads, dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from sftint_fast.ops.triton.rope import rope

    gen = torch.Generator().manual_seed(1)
    tokens = 70  # more than one program's tokens
    x = torch.randn(tokens, heads, dim, generator=gen).to(dtype)
    angles = torch.randn(tokens, dim // 2, generator=gen) * 3
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
    want, _ = apply_rotary_pos_emb(x[None], x[None], cos[None], sin[None], unsqueeze_dim=2)
    got = rope(*_on(x, cos, sin))
    _close(got, want[0])
    assert not torch.equal(got.cpu(), x)


def test_rope_of_a_strided_view():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from sftint_fast.ops.triton.rope import rope

    qkv = torch.randn(11, 6 * 16)
    q = qkv[:, :4 * 16].unflatten(-1, (4, 16))  # token stride 96, head stride 16
    angles = torch.randn(11, 8)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    want, _ = apply_rotary_pos_emb(q[None], q[None], cos[None], sin[None], unsqueeze_dim=2)
    q_dev = _on(qkv)[0][:, :4 * 16].unflatten(-1, (4, 16))
    _close(rope(q_dev, *_on(cos, sin)), want[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    from sftint_fast.ops.triton.silu_mul import silu_mul

    gen = torch.Generator().manual_seed(2)
    gate = (4 * torch.randn(33, 70, generator=gen)).to(dtype)
    up = torch.randn(33, 70, generator=gen).to(dtype)
    _close(silu_mul(*_on(gate, up)), torch.nn.functional.silu(gate) * up)


def test_bad_inputs_raise_clear_errors():
    from sftint_fast.ops.triton.rms_norm import rms_norm
    from sftint_fast.ops.triton.rope import rope
    from sftint_fast.ops.triton.silu_mul import silu_mul

    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight: expected shape \(8,\)"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(TypeError, match="x: expected a float16, bfloat16 or float32 tensor, got torch.int64"):
        rms_norm(torch.ones(4, 8, dtype=torch.int64), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match=r"x: expected shape \[N, heads, D\] with D even"):
        rope(torch.randn(4, 2, 7), torch.randn(4, 7), torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"cos: expected shape \(4, 8\)"):
        rope(torch.randn(4, 2, 8), torch.randn(5, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="up: expected torch.float32 of shape"):
        silu_mul(x, torch.randn(4, 9))


def _count_fused(monkeypatch) -> dict:
    import importlib

    names = ("rms_norm", "rope", "silu_mul")  # each op's module has the op's name
    return count_calls(monkeypatch, {name: importlib.import_module(f"sftint_fast.ops.triton.{name}") for name in names})


@pytest.mark.parametrize("fused", ["triton", pytest.param("cpu", marks=requires_ext)])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "smollm3", "gemma3", "phi3", "phi3-full-rotary", "olmo2",
                                  "olmo3", "gemma2", "gemma", "granite", "qwen3_moe", "mixtral", "olmoe", "qwen2_moe",
                                  "helium", "glm4"])
def test_layer_loop_uses_the_fused_ops_and_matches_the_model(arch, fused, monkeypatch):
    """``run_layers(fused=...)`` replaces every RMSNorm, RoPE and (SiLU models) the gate, and gives the model's
    numbers; Gemma-3's GELU MLP stays its module. Per layer: Llama/Qwen2/SmolLM3/Granite 2 norms, Gemma 2 (its
    GELU-tanh MLP stays its module), Qwen3 2 + q/k norms,
    Gemma-3 4 + q/k norms, Gemma-2 4 (its GELU-tanh MLP stays its module), OLMo-2/3 2 (post-norms) + q/k norms;
    SmolLM3's NoPE layer (the second) no RoPE. Phi-3: 2 norms, RoPE only where it spans the whole head (the model's
    function rotates part of it, and passes the rest), its fused gate_up MLP as its module. MoE models: 2 norms
    (Qwen3-MoE and OLMoE + q/k norms), the gate in the dense layers only (Qwen3-MoE's 1 of 3, Qwen2-MoE's 2 of 3);
    the sparse blocks run as their modules. Helium: 2 norms (OLMo's form), its interleaved RoPE as its function;
    GLM-4: 4 (sandwich) norms, its interleaved RoPE and fused gate_up MLP as its function and module.
    ``"triton"``: the Triton ops on ``DEVICE``; ``"cpu"``: the C++ ops (``sftint_fast.ops.layer_ops``)."""
    from conftest import tiny_gemma2
    from test_layer_ops import count_cpu_ops
    from test_trie import _sliding_model

    from sftint_fast.engine.adapters import get_adapter

    device = DEVICE if fused == "triton" else "cpu"
    if arch == "gemma3":
        net = _sliding_model("gemma3", "sdpa")
    elif arch == "gemma2":
        net = tiny_gemma2()
    elif arch == "phi3-full-rotary":
        net = tiny_model("phi3", initializer_range=0.2, partial_rotary_factor=1.0)
    else:
        net = tiny_model(arch, initializer_range=0.2)
    net = net.to(device)
    adapter = get_adapter(net)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (9,), generator=gen).to(device)
    positions = torch.arange(9, device=device)

    def attend(layer, q, k, v):  # plain causal attention over the 9 tokens
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * adapter.layers[layer].scale
        if adapter.layers[layer].softcap:  # Gemma-2's, after the scale, before the mask
            scores = torch.tanh(scores / adapter.layers[layer].softcap) * adapter.layers[layer].softcap
        scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool, device=device).tril(), float("-inf"))
        if adapter.layers[layer].sliding_window:
            window = adapter.layers[layer].sliding_window
            far = positions[:, None] - positions[None, :] >= window
            scores = scores.masked_fill(far, float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)

    with torch.no_grad():
        plain = adapter.run_layers(adapter.embed(ids), positions, attend)
        calls = _count_fused(monkeypatch) if fused == "triton" else count_cpu_ops(monkeypatch)
        out = adapter.run_layers(adapter.embed(ids), positions, attend, fused=fused)
        own = net(input_ids=ids[None], output_hidden_states=True).hidden_states[-1][0]
    layers = net.config.num_hidden_layers
    counts = sorted(calls.values())  # rms_norm, rope, silu_mul under either backend's names
    if arch == "gemma3":
        assert counts == sorted([6 * layers, 2 * layers, 0]), calls
    elif arch == "gemma2":
        assert counts == sorted([4 * layers, 2 * layers, 0]), calls
    elif arch == "gemma":
        assert counts == sorted([2 * layers, 2 * layers, 0]), calls
    elif arch in ("qwen3", "olmo2", "olmo3"):
        assert counts == sorted([4 * layers, 2 * layers, layers]), calls
    elif arch in ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe"):
        dense = sum(hasattr(block.mlp, "gate_proj") for block in net.model.layers)
        assert dense == {"qwen3_moe": 1, "qwen2_moe": 2}.get(arch, 0)
        norms = 4 if arch in ("qwen3_moe", "olmoe") else 2
        assert counts == sorted([norms * layers, 2 * layers, dense]), calls
    elif arch == "smollm3":
        assert counts == sorted([2 * layers, 2 * (layers - 1), layers]), calls
    elif arch == "helium":
        assert counts == sorted([2 * layers, 0, layers]), calls
    elif arch == "glm4":
        assert counts == sorted([4 * layers, 0, 0]), calls
    elif arch.startswith("phi3"):
        assert counts == sorted([2 * layers, 2 * layers if arch == "phi3-full-rotary" else 0, 0]), calls
    else:
        assert counts == sorted([2 * layers, 2 * layers, layers]), calls
    # float32 rounding (the fused norm sums in another order), carried along the residual stream: a few ulps of its
    # largest value (about 8 here), not of each element (2.4e-6 off at an element of 0.06, Phi-3 through Triton;
    # Gemma, whose (1 + w) norms with random w scale the rounding up: 5.5 ulps at one element of 288 through Triton)
    ulp = torch.finfo(plain.dtype).eps * plain.abs().max().item()
    torch.testing.assert_close(out.cpu(), plain.cpu(), rtol=2e-6, atol=(8 if arch == "gemma" else 4) * ulp)
    # the model's own forward applies the final norm to its last hidden state
    torch.testing.assert_close(adapter._norm(out), own, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["olmo2", "olmo3"])
def test_olmo_layer_loop_in_half_precision_rounds_as_the_model(arch, monkeypatch):
    """OLMo's RMSNorm rounds ``w * norm(x)`` once (not ``norm(x)`` before the multiply, as Llama's), and its RoPE
    tables stay float32 in a float16 model (HF's products are then float32, rounded once, where the fused RoPE rounds
    each): the loop takes the ``olmo`` norm form and leaves RoPE to the model's function, so the fused loop gives the
    unfused loop's float16 numbers (the other forms differ on more than half of them)."""
    from sftint_fast.engine.adapters import get_adapter

    net = tiny_model(arch, initializer_range=0.2).to(DEVICE, torch.float16)
    adapter = get_adapter(net)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (9,), generator=gen).to(DEVICE)
    positions = torch.arange(9, device=DEVICE)

    def attend(layer, q, k, v):  # causal attention in float32, no window: both loops get the same one
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1).float(), v.repeat_interleave(group, 1).float()
        scores = torch.einsum("qhd,khd->hqk", q.float(), k) * adapter.layers[layer].scale
        scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)

    with torch.no_grad():
        plain = adapter.run_layers(adapter.embed(ids), positions, attend)
        calls = _count_fused(monkeypatch)
        out = adapter.run_layers(adapter.embed(ids), positions, attend, fused="triton")
    layers = net.config.num_hidden_layers
    assert calls == {"rms_norm": 4 * layers, "rope": 0, "silu_mul": layers}
    assert out.dtype == plain.dtype == torch.float16
    assert (out != plain).float().mean().item() < 0.05, (out.float() - plain.float()).abs().max().item()


@pytest.mark.parametrize("masking", ["embedding", "attention"])
@pytest.mark.parametrize("kind", ["gemma3", "mistral", "qwen3", "smollm3", "phi3", "olmo3", "gemma2"])
def test_trie_with_triton_on_sliding_window_models_matches_naive(kind, masking):
    """Gemma-3 (sandwich norms, q/k norms, (1 + w) RMSNorm, per-layer-type RoPE, soft-capped logits, GELU), Mistral,
    Qwen3 (q/k norms, full and sliding layers), SmolLM3 (a sliding NoPE layer between RoPE ones), Phi-3 (fused
    qkv and gate_up projections, partial RoPE) and OLMo-3 (post-norms, whole-projection q/k norms, per-layer-type
    RoPE) through the fused kernel and the fused elementwise ops; Gemma-2 (eager: its attention logit soft-cap in the
    kernel) too."""
    from conftest import tiny_gemma2
    from test_trie import _sliding_model, check_close, make_game

    from sftint_fast.engine.naive import evaluate_naive
    from sftint_fast.engine.trie import evaluate_trie

    net = (tiny_gemma2() if kind == "gemma2" else _sliding_model(kind, "sdpa")).to(DEVICE)
    game = make_game("first_and_last", masking=masking, seed=6)
    assert game.input_ids.numel() > net.config.sliding_window
    subsets = torch.arange(1 << game.num_players)
    with torch.no_grad():
        naive = evaluate_naive(net, game, subsets, progress=False)
    check_close(evaluate_trie(net, game, batch_size=3, progress=False, attention_backend="triton"), naive)


def test_switching_fused_elementwise_off(monkeypatch):
    """``trie.FUSE_ELEMENTWISE = False`` keeps the fused attention but the model's own norms, RoPE and MLP (the GPU
    benchmark times both)."""
    from test_triton_trie import make_game

    from sftint_fast.engine import trie
    from sftint_fast.engine.naive import evaluate_naive

    net = tiny_model("llama", attn="sdpa", initializer_range=0.2).to(DEVICE)
    game = make_game("embedding")
    calls = _count_fused(monkeypatch)
    monkeypatch.setattr(trie, "FUSE_ELEMENTWISE", False)
    off = trie.evaluate_trie(net, game, progress=False, attention_backend="triton")
    assert calls == {"rms_norm": 0, "rope": 0, "silu_mul": 0}
    monkeypatch.setattr(trie, "FUSE_ELEMENTWISE", True)
    on = trie.evaluate_trie(net, game, progress=False, attention_backend="triton")
    assert min(calls.values()) > 0
    with torch.no_grad():
        naive = evaluate_naive(net, game, torch.arange(16), progress=False)
    for got in (off, on):
        tol = 1e-4 * naive.abs().clamp(min=1)
        assert bool(((got - naive).abs() <= tol).all()), (got - naive).abs().max().item()


@pytest.mark.parametrize("value,expected", [("0", "False off"), ("1", "True on"), (None, "True on")])
def test_environment_switch_for_fused_elementwise(value, expected):
    """``SFTINT_FUSE_ELEMENTWISE=0`` turns the fused ops off, and ``sftint info`` says which is in force."""
    env = {k: v for k, v in os.environ.items() if k != "SFTINT_FUSE_ELEMENTWISE"}
    if value is not None:
        env["SFTINT_FUSE_ELEMENTWISE"] = value
    code = ("import sftint_fast.engine.trie as t; from sftint_fast import info; "
            "print(t.FUSE_ELEMENTWISE, info.collect()['elementwise fusion'].split()[0])")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == expected, proc.stderr[-2000:]


def test_kernels_compile_for_sm90():
    """The interpreter accepts code a GPU compiler rejects: compile the three kernels ahead of time for sm_90, in
    each float dtype, unspecialized and as a launch specializes them (aligned pointers, strides multiples of 16),
    at the shapes of SmolLM2 (H=576, 9/3 heads of 64) and Llama-3.2-1B (H=2048, 32/8 heads)."""
    from test_triton_subset_attention import _cuda_backend_available

    if not _cuda_backend_available():
        pytest.skip("triton has no NVIDIA backend to compile with")
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from sftint_fast.ops.triton.rms_norm import _rms_norm_kernel
        from sftint_fast.ops.triton.rope import _rope_kernel
        from sftint_fast.ops.triton.silu_mul import _silu_mul_kernel

        target = GPUTarget("cuda", 90, 32)

        def compile(kernel, const, floats=()):
            fn = kernel  # a plain @triton.jit function (the attention kernel is wrapped by autotune)
            sig = {name: "constexpr" if name in const else "*" + dtype if name.endswith("_ptr")
                   else "fp32" if name in floats else "i32" for name in fn.arg_names}
            aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                       if name.endswith("_ptr") or name.startswith("stride_")}
            for attrs in ({}, aligned):
                triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                               target=target)

        for dtype in ("bf16", "fp16", "fp32"):
            for block, gemma, olmo in ((1024, False, False), (2048, True, False), (64, True, False),
                                       (2048, False, True)):
                compile(_rms_norm_kernel, dict(ROWS=max(1, 4096 // block), BLOCK=block, GEMMA=gemma, OLMO=olmo),
                        ("eps",))
            for heads, half in ((16, 32), (32, 32), (4, 32)):
                compile(_rope_kernel, dict(HALF=half, BLOCK_T=max(1, 2048 // (heads * half)), BLOCK_H=heads,
                                           BLOCK_D=half))
            compile(_silu_mul_kernel, dict(BLOCK=1024))
        print("compiled")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]
