"""GPU benchmark: strong naive vs the trie engine with the torch attention path and with the fused Triton kernel.

Random-init models shaped like SmolLM2-135M, Qwen2.5-0.5B and Llama-3.2-1B (published configs), one prompt, all
``2^n`` variants, embedding masking. Layouts (the issue's): n=10 = 20 background tokens, 10 players of 2 tokens each
followed by 3, suffix 15 (L=85); n=12 = 100 / 3 / 5 / 30 (L=226). Each case reports, measured in one run: seconds
and variants/s of each engine, the plan's ideal token ratio, the measured ratios over strong naive (and as a
fraction of the ideal), peak memory, the model TFLOP/s achieved on the trie's tokens, max |Δv| against naive in
the same precision, and the Triton kernel's own effective bandwidth on the deepest level against a device copy.
The fused kernel runs with both KV-loop strategies (``path="flat"``, the default, and ``"segments"``), in the engine
and alone, with the share of loaded key slots that hold a key for each (``key_block_fill_*``, computed), and the
engine once more with 4× smaller passes than its CUDA default (``SMALL_PASS_TOKENS``, the CPU default: more passes,
so more kernel launches, less activation memory).
Precisions side by side: fp32 (IEEE matmuls), tf32 (fp32 weights, TF32 matmuls) and bf16.

    pytest benchmarks/test_gpu.py -s                  # GPU: n=10 on the three models, every precision
    pytest benchmarks/test_gpu.py -s --full           # GPU: n=10 and n=12
    TRITON_INTERPRET=1 pytest benchmarks/test_gpu.py -s --tiny   # CPU dry run of the same code, tiny shapes

Results also go to ``$OUT/gpu_benchmark.json`` (``gpu_benchmark_$BENCH_TAG.json`` when ``BENCH_TAG`` is set) when
``OUT`` is set, rewritten atomically after every case.
"""
import copy
import json
import os
import statistics
import time
from unittest import mock

import pytest
import torch

from sftint_fast.engine.naive import evaluate_naive
from sftint_fast.engine.plan import default_pass_tokens, plan_trie
from sftint_fast.engine.trie import evaluate_trie
from sftint_fast.game import Game
from sftint_fast.ops.subset_attention import subset_attention

#: Published shapes (config.json of each model); head_dim = hidden / heads = 64 for all three.
MODEL_SPECS = {
    "smollm2-135m": dict(arch="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152, rope_theta=100000.0),
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, rope_theta=1000000.0),
    "llama3.2-1b": dict(arch="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, rope_theta=500000.0),
}
TINY_SPECS = {
    "smollm2-135m": dict(arch="llama", hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                         num_key_value_heads=1, intermediate_size=96, vocab_size=256, rope_theta=100000.0),
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=256, rope_theta=1000000.0),
    "llama3.2-1b": dict(arch="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=1, intermediate_size=128, vocab_size=256, rope_theta=500000.0),
}
#: name -> (background before player 0, players, tokens per player, background after each player, extra suffix)
LAYOUTS = {"n10": (20, 10, 2, 3, 15), "n12": (100, 12, 3, 5, 30)}
TINY_LAYOUTS = {"n10": (4, 3, 2, 1, 3), "n12": (6, 4, 1, 2, 2)}
PRECISIONS = ["fp32", "tf32", "bf16"]
#: Tokens per pass of the "small passes" variant (the engine's default on CUDA is ``plan.PASS_TOKENS["cuda"]``).
SMALL_PASS_TOKENS = 8192

_MODELS: dict[tuple[str, bool, bool], torch.nn.Module] = {}
_RESULTS: list[dict] = []


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _skip_unless_runnable(tiny: bool, precision: str, layout: str, full: bool) -> None:
    if not torch.cuda.is_available():
        if not tiny:
            pytest.skip("needs a CUDA device (or --tiny with TRITON_INTERPRET=1 for a CPU dry run)")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("--tiny on CPU runs the Triton kernel in the interpreter: set TRITON_INTERPRET=1")
        if precision != "fp32":
            pytest.skip("the CPU dry run covers fp32 only (the interpreter computes bf16 wrongly)")
    if layout == "n12" and not (full or tiny):
        pytest.skip("n=12 only with --full")


def _model(name: str, tiny: bool, precision: str) -> torch.nn.Module:
    """The fp32 random-init model (built once per shape), or a bf16 copy of it (also kept)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    key = (name, tiny, False)
    if key not in _MODELS:
        spec = dict((TINY_SPECS if tiny else MODEL_SPECS)[name])
        config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.pop("arch")]
        config = config_cls(**spec, max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        with torch.device(_device()):
            _MODELS[key] = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                            dtype=torch.float32).eval()
    if precision != "bf16":
        return _MODELS[key]
    if (name, tiny, True) not in _MODELS:
        _MODELS[name, tiny, True] = copy.deepcopy(_MODELS[key]).to(torch.bfloat16)
    return _MODELS[name, tiny, True]


def _game(model: torch.nn.Module, layout: tuple[int, int, int, int, int]) -> Game:
    bg0, num_players, player_len, gap, suffix = layout
    spans, pos = [], bg0
    for _ in range(num_players):
        spans.append((pos, pos + player_len))
        pos += player_len + gap
    length = pos + suffix
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (length,), generator=gen)
    target = torch.randint(3, vocab, (1,), generator=gen)
    baseline = model.get_input_embeddings().weight[0].detach().cpu()  # the pad row, in the model's dtype
    return Game(input_ids=ids, player_spans=tuple(spans), words=tuple(f"p{i}" for i in range(num_players)),
                target=target, baseline=baseline, masking="embedding", prompt_length=length)


def _timed(fn, repeats: int) -> tuple[float, torch.Tensor, int]:
    """Median seconds over ``repeats`` runs after one warm-up (which also autotunes), result, peak bytes."""
    device = _device()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return statistics.median(times), result, peak


def _kernel_path(path: str):
    """The fused kernel's KV-loop strategy for the engine calls inside (``"flat"`` is the default)."""
    from sftint_fast.ops.triton import subset_attention as kernel

    return mock.patch.object(kernel, "DEFAULT_PATH", path)


def _fused_elementwise(on: bool):
    """Whether the Triton trie also runs its norms, RoPE and SiLU gate as fused ops (``trie.FUSE_ELEMENTWISE``)."""
    from sftint_fast.engine import trie

    return mock.patch.object(trie, "FUSE_ELEMENTWISE", on)


def _pass_tokens(tokens: int):
    """The engine's tokens per pass on this device for the calls inside (``plan.PASS_TOKENS``)."""
    from sftint_fast.engine import plan as planner

    return mock.patch.dict(planner.PASS_TOKENS, {_device().type: tokens})


def _linear_params_per_token(model: torch.nn.Module) -> int:
    """Weights every token multiplies through (all decoder-layer Linear layers); the LM head is counted apart."""
    return sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))


def _copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write): the practical memory bandwidth in this run."""
    src = torch.ones(256 * 2**20 // 4 if torch.cuda.is_available() else 2**20, device=_device())
    dst = torch.empty_like(src)
    seconds, _, _ = _timed(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * src.element_size() / seconds


def _kernel_case(model: torch.nn.Module, plan, dtype: torch.dtype, repeats: int) -> dict:
    """The deepest level's attention alone (all ``2^n`` nodes, one layer's store): Triton vs the torch path."""
    from sftint_fast.ops.triton.subset_attention import subset_attention as fused

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    level = plan.num_players
    lens = list(plan.level_lens)
    offsets, total = [], 0
    for k, length in enumerate(lens):
        offsets.append(total)
        total += (1 << k) * length
    device = _device()
    gen = torch.Generator(device=device).manual_seed(2)
    k_store = torch.randn(total, kv_heads, head_dim, generator=gen, device=device).to(dtype)
    v_store = torch.randn(total, kv_heads, head_dim, generator=gen, device=device).to(dtype)
    nodes = torch.arange(1 << level, device=device)
    q = torch.randn(len(nodes), lens[level], heads, head_dim, generator=gen, device=device).to(dtype)
    tables = [torch.tensor(t, dtype=torch.int64, device=device)
              for t in (offsets, lens, list(plan.player_lens), list(plan.level_positions))]
    kw = dict(level=level, scale=head_dim ** -0.5)
    triton_s, out, _ = _timed(lambda: fused(q, k_store, v_store, nodes, *tables, path="flat", **kw), repeats)
    segments_s, out_segments, _ = _timed(lambda: fused(q, k_store, v_store, nodes, *tables, path="segments", **kw),
                                         repeats)
    torch_s, ref, _ = _timed(lambda: subset_attention(q, k_store, v_store, nodes, *tables, backend="torch", **kw),
                             repeats)
    # Logical traffic: q and the output once, and every (node, kv head) reading the K/V rows of its own path.
    path_rows = sum(lens[:level]) + lens[level]
    element = q.element_size()
    bytes_moved = 2 * q.numel() * element + len(nodes) * kv_heads * path_rows * 2 * head_dim * element
    copy_bw = _copy_bandwidth()
    fill = {f"key_block_fill_{path}_{block}": key_block_fill(lens, level, block, path)
            for path in ("flat", "segments") for block in (32, 64)}
    return {"kernel_ms": triton_s * 1e3, "kernel_segments_path_ms": segments_s * 1e3,
            "kernel_torch_path_ms": torch_s * 1e3,
            "kernel_speedup_vs_torch_path": torch_s / triton_s, "kernel_flat_over_segments": segments_s / triton_s,
            "kernel_GBps": bytes_moved / triton_s / 1e9, "kernel_segments_GBps": bytes_moved / segments_s / 1e9,
            "copy_GBps": copy_bw / 1e9, "kernel_fraction_of_copy_bw": bytes_moved / triton_s / copy_bw,
            "kernel_max_abs_diff_vs_torch_path": (out.float() - ref.float()).abs().max().item(),
            "kernel_max_abs_diff_paths": (out.float() - out_segments.float()).abs().max().item(), **fill}


def key_block_fill(lens: list[int], level: int, block: int, path: str) -> float:
    """Share of the key slots a deepest-level query block loads that hold a key of its path (last query token of
    the segment; no masking): ``"segments"`` pads every ancestor segment to whole blocks, ``"flat"`` only the end."""
    keys = sum(lens[:level + 1])
    if path == "flat":
        slots = -(-keys // block) * block
    else:
        slots = sum(-(-length // block) * block for length in lens[:level + 1])
    return keys / slots if slots else 1.0


def _save() -> None:
    out_dir = os.environ.get("OUT")
    if not out_dir:
        return
    tag = os.environ.get("BENCH_TAG")
    path = os.path.join(out_dir, f"gpu_benchmark_{tag}.json" if tag else "gpu_benchmark.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_RESULTS, f, indent=1)
    os.replace(tmp, path)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_trie_vs_naive(benchmark, name, layout, precision, tiny, full, env_info):
    _skip_unless_runnable(tiny, precision, layout, full)
    model = _model(name, tiny, precision)
    game = _game(model, (TINY_LAYOUTS if tiny else LAYOUTS)[layout])
    subsets = torch.arange(1 << game.num_players, device=_device())
    repeats = 1 if tiny else 3
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        with torch.no_grad():
            naive_s, v_naive, naive_peak = _timed(
                lambda: evaluate_naive(model, game, subsets, progress=False), repeats)
            torch_s, v_torch, torch_peak = _timed(
                lambda: evaluate_trie(model, game, subsets, progress=False, attention_backend="torch"), repeats)
            triton_s, v_triton, triton_peak = _timed(
                lambda: evaluate_trie(model, game, subsets, progress=False, attention_backend="triton"), repeats)
            with _kernel_path("segments"):
                segments_s, v_segments, _ = _timed(
                    lambda: evaluate_trie(model, game, subsets, progress=False, attention_backend="triton"), repeats)
            with _fused_elementwise(False):  # the fused attention with the model's own norms, RoPE and MLP
                attn_only_s, v_attn_only, _ = _timed(
                    lambda: evaluate_trie(model, game, subsets, progress=False, attention_backend="triton"), repeats)
            with _pass_tokens(SMALL_PASS_TOKENS):  # more, smaller passes: more launches, less activation memory
                small_s, v_small, small_peak = _timed(
                    lambda: evaluate_trie(model, game, subsets, progress=False, attention_backend="triton"), repeats)
            benchmark.pedantic(lambda: evaluate_trie(model, game, subsets, progress=False,
                                                     attention_backend="triton"), rounds=1, iterations=1)
            plan = plan_trie(game, subsets=None, pass_tokens=default_pass_tokens(_device()))
            small_plan = plan_trie(game, subsets=None, pass_tokens=SMALL_PASS_TOKENS)
            kernel = _kernel_case(model, plan, next(model.parameters()).dtype, 3 if not tiny else 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32

    variants = len(subsets)
    cfg = model.config
    flops = 2 * _linear_params_per_token(model) * plan.trie_tokens + 2 * cfg.hidden_size * cfg.vocab_size * variants
    info = dict(env_info, model=name, layout=layout, precision=precision, tiny=tiny, n=game.num_players,
                seq_len=int(game.input_ids.numel()), variants=variants,
                ideal_token_ratio=plan.ideal_ratio, trie_tokens=plan.trie_tokens, naive_tokens=plan.naive_tokens,
                naive_ms=naive_s * 1e3, trie_torch_ms=torch_s * 1e3, trie_triton_ms=triton_s * 1e3,
                trie_triton_segments_ms=segments_s * 1e3, ratio_triton_segments_over_naive=naive_s / segments_s,
                trie_triton_attention_only_ms=attn_only_s * 1e3,
                ratio_triton_attention_only_over_naive=naive_s / attn_only_s,
                max_abs_dv_triton_attention_only_vs_naive=(v_attn_only - v_naive).abs().max().item(),
                pass_tokens=default_pass_tokens(_device()), passes=len(plan.passes),
                small_pass_tokens=SMALL_PASS_TOKENS, small_passes=len(small_plan.passes),
                trie_triton_small_passes_ms=small_s * 1e3, ratio_triton_small_passes_over_naive=naive_s / small_s,
                peak_GB_trie_triton_small_passes=small_peak / 2**30,
                max_abs_dv_triton_small_passes_vs_naive=(v_small - v_naive).abs().max().item(),
                max_abs_dv_triton_segments_vs_naive=(v_segments - v_naive).abs().max().item(),
                naive_variants_per_s=variants / naive_s, trie_torch_variants_per_s=variants / torch_s,
                trie_triton_variants_per_s=variants / triton_s,
                ratio_torch_over_naive=naive_s / torch_s, ratio_triton_over_naive=naive_s / triton_s,
                triton_fraction_of_ideal=naive_s / triton_s / plan.ideal_ratio,
                peak_GB_naive=naive_peak / 2**30, peak_GB_trie_torch=torch_peak / 2**30,
                peak_GB_trie_triton=triton_peak / 2**30,
                trie_triton_TFLOPs=flops / triton_s / 1e12,
                max_abs_dv_torch_vs_naive=(v_torch - v_naive).abs().max().item(),
                max_abs_dv_triton_vs_naive=(v_triton - v_naive).abs().max().item(), **kernel)
    benchmark.extra_info.update(info)
    _RESULTS.append(info)
    _save()
    print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in info.items()})
    # exactness of what was timed: the trie paths agree with naive far inside the spread of the values
    spread = v_naive.float().std().item()
    assert torch.isfinite(v_triton).all() and (v_triton - v_naive).abs().max().item() < max(0.25, 0.5 * spread)
