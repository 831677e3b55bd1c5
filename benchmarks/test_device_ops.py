"""Device operations one evaluation dispatches: what bounds the trie on a GPU when its passes are small.

On a GPU every non-view aten op and every Triton launch is a kernel launch, and the host issues them one by one
(~5–20 µs each through Python and the driver). A small model's GEMMs in bf16 finish faster than that, so the
count of device ops, not FLOPs, sets the trie's time there. This benchmark counts them, exactly and on any machine,
for the GPU benchmark's layouts (``benchmarks/test_gpu.py``) with SmolLM2's 30 layers at tiny widths (counts do not
depend on the widths): the naive engine in one batch, the trie with the fused kernel and with the torch attention
path, at 8192 tokens per pass (the CPU default) and 32768 (``plan.PASS_TOKENS["cuda"]``).

The fused kernel cannot run here without the interpreter (hours at these sizes), so its launch is counted and its
output zeroed: the counts are exact, the values are not used. Quick: n=10; ``--full``: n=10 and n=12.
"""
from __future__ import annotations

import collections

import pytest
import torch
from test_gpu import LAYOUTS, _game
from torch.utils._python_dispatch import TorchDispatchMode

from sftint_fast.engine import plan as planner
from sftint_fast.engine.naive import evaluate_naive
from sftint_fast.engine.trie import evaluate_trie
from sftint_fast.ops import layer_ops

NUM_LAYERS = 30  # SmolLM2-135M


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that launch work (views and aliases do not)."""

    VIEWS = frozenset({"view", "_unsafe_view", "alias", "detach", "unsqueeze", "squeeze", "transpose", "expand",
                       "split", "slice", "select", "unflatten", "t", "as_strided", "permute", "reshape",
                       "_reshape_alias", "unbind"})

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.__name__.split(".")[0] not in self.VIEWS:
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


class _CountedKernel:
    """Stands in for a Triton kernel: counts launches, zeroes the output (argument ``out_arg``; the attention
    kernel's is 5: q, k, v, k_pass, v_pass, out, ...)."""

    def __init__(self, out_arg: int = 5) -> None:
        self.launches = 0
        self.out_arg = out_arg

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            args[self.out_arg].zero_()
        return launch


#: The fused elementwise kernels (module of ``sftint_fast.ops.triton``, kernel) and the argument of their output.
ELEMENTWISE_KERNELS = {("rms_norm", "_rms_norm_kernel"): 2, ("rope", "_rope_kernel"): 3,
                       ("silu_mul", "_silu_mul_kernel"): 2}


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=72, num_hidden_layers=NUM_LAYERS, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=8, intermediate_size=96, vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def _device_ops(fn, *kernels: _CountedKernel) -> int:
    for kernel in kernels:
        kernel.launches = 0
    with torch.no_grad(), _CountOps() as ops:
        fn()
    launches = sum(kernel.launches for kernel in kernels)
    return sum(ops.counts.values()) - ops.counts["zero_.default"] + launches


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_device_ops_per_evaluation(benchmark, model, layout, full, env_info, monkeypatch):
    if layout != "n10" and not full:
        pytest.skip("n=12 only with --full")
    import importlib

    from sftint_fast.engine import trie
    from sftint_fast.ops.triton import subset_attention as fused

    kernel = _CountedKernel()
    monkeypatch.setattr(fused, "_subset_attention_kernel", kernel)
    others = [_CountedKernel(out_arg) for out_arg in ELEMENTWISE_KERNELS.values()]
    modules = [fused]
    for (module_name, kernel_name), counted in zip(ELEMENTWISE_KERNELS, others):
        modules.append(importlib.import_module(f"sftint_fast.ops.triton.{module_name}"))
        monkeypatch.setattr(modules[-1], kernel_name, counted)
    for module in modules:  # the kernels are stand-ins: CPU tensors are fine without the interpreter
        monkeypatch.setattr(module, "check_interpreter", lambda device: None)
    # what a GPU runs: the game's value as ATen ops (the C++ log-odds is for CPU tensors)
    monkeypatch.setattr(layer_ops, "log_odds_available", lambda x: False)
    game = _game(model, LAYOUTS[layout])
    variants = 1 << game.num_players
    info = dict(env_info, layout=layout, n=game.num_players, layers=NUM_LAYERS,
                naive_one_batch=_device_ops(lambda: evaluate_naive(model, game, torch.arange(variants),
                                                                   batch_size=variants, progress=False), kernel))
    for tokens in (planner.TARGET_CHUNK_TOKENS, planner.PASS_TOKENS["cuda"]):
        monkeypatch.setitem(planner.PASS_TOKENS, "cpu", tokens)
        # triton: fused attention and fused elementwise ops; triton_attention_only: the model's own elementwise ops
        for variant, backend, fuse in (("triton", "triton", True), ("triton_attention_only", "triton", False),
                                       ("torch", "torch", False)):
            monkeypatch.setattr(trie, "FUSE_ELEMENTWISE", fuse)
            plan = planner.plan_trie(game, pass_tokens=tokens, window=backend != "triton")
            passes = len(plan.passes)
            count = _device_ops(lambda: evaluate_trie(model, game, progress=False, attention_backend=backend),
                                kernel, *others)
            info[f"trie_{variant}_{tokens}"] = count
            info[f"trie_{variant}_{tokens}_per_pass_layer"] = count / (passes * NUM_LAYERS)
            info[f"passes_{variant}_{tokens}"] = passes
            if backend == "triton":  # the fused path: one launch per pass and layer (none in a leafless last layer)
                leafless = sum(all(u.level < plan.num_players for u in units) for units in plan.passes)
                assert kernel.launches == passes * NUM_LAYERS - leafless, (kernel.launches, passes, leafless)
            assert (sum(k.launches for k in others) > 0) == fuse
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in info.items()})
