"""Every Triton kernel, as the engine and the transforms launch it, compiles for a real GPU (sm_90) on this CPU.

The interpreter tests check the kernels' numbers, but the interpreter runs a kernel's Python body with numpy and
accepts code a GPU compile rejects (e.g. ``.to()`` on an argument Triton specialised to a constexpr because it was 1).
The hand-written signatures of ``test_kernels_compile_for_sm90`` (tests/test_triton_subset_attention.py and
tests/test_triton_elementwise.py) cover the models' shapes with one tile config; here each launch of an interpreted
run is recorded with the argument types and specialisations Triton's launcher
would give it (``native_specialize_impl``: an int equal to 1 becomes a constexpr, pointers and ints divisible by 16
get the divisibility hint), and tests/triton_compile.py compiles them with Triton's own compiler down to a cubin, in
a process without the interpreter. Needs triton with its NVIDIA backend (ptxas ships in the wheel); no GPU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_triton, tiny_model

import sftint_fast as sf
from sftint_fast.game import Game

SCRIPT = Path(__file__).parent / "triton_compile.py"
#: The Python that compiles (default this one): point it at an environment with another Triton, e.g. the GPU
#: machines' 3.6, to check the kernels against that compiler (``python -m venv --system-site-packages V &&
#: V/bin/pip install triton==3.6.0``).
COMPILE_PYTHON = os.environ.get("SFTINT_TRITON_COMPILE_PYTHON", sys.executable)
KERNELS = {  # module -> its @triton.jit entry points (the launchers call them by these global names)
    "sftint_fast.ops.triton.subset_attention": ["_subset_attention_kernel"],
    "sftint_fast.ops.triton.rms_norm": ["_rms_norm_kernel"],
    "sftint_fast.ops.triton.rope": ["_rope_kernel"],
    "sftint_fast.ops.triton.silu_mul": ["_silu_mul_kernel"],
    "sftint_fast.ops.triton.transforms": ["_butterfly_kernel"],
}
TARGET = ("cuda", 90, 32)  # the GPU machines' H100 / H200


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


pytestmark = [requires_triton,
              pytest.mark.skipif(not _nvidia_backend(), reason="needs triton's NVIDIA backend (ships with triton)"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="records launches under the interpreter (TRITON_INTERPRET=1, set by conftest)")]


class _Recorder:
    """Stands in for an interpreted kernel: notes each launch's signature, then runs it."""

    def __init__(self, module: str, name: str, kernel, log: list[dict]):
        self.module, self.name, self.kernel, self.log = module, name, kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append(_launch_record(self.module, self.name, self.kernel.arg_names, args, kwargs))
            return launch(*args, **kwargs)

        return run


def _launch_record(module: str, name: str, arg_names: list[str], args: tuple, kwargs: dict) -> dict:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, {}, {}
    for index, (arg_name, value) in enumerate(zip(arg_names, args)):
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[arg_name] = kind
        if kind == "constexpr":
            constexprs[arg_name] = value
        elif spec:
            attrs[index] = spec
    for arg_name, value in kwargs.items():  # the kernels' tl.constexpr parameters, passed by name
        signature[arg_name] = "constexpr"
        constexprs[arg_name] = value
    return {"module": module, "kernel": name, "signature": signature, "constexprs": constexprs,
            "attrs": {str(k): v for k, v in attrs.items()}}


def _record(monkeypatch) -> list[dict]:
    import importlib

    log: list[dict] = []
    for module_name, names in KERNELS.items():
        module = importlib.import_module(module_name)
        for name in names:
            monkeypatch.setattr(module, name, _Recorder(module_name, name, getattr(module, name), log))
    return log


def _game(hidden: int, masking: str) -> Game:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 128, (13,), generator=gen)
    return Game(input_ids=prompt, player_spans=((0, 1), (3, 5), (5, 6), (8, 10)), words=("a", "b", "c", "d"),
                target=torch.tensor([5]), baseline=torch.randn(hidden, generator=gen), masking=masking,
                prompt_length=13)


def _gemma3():
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, num_hidden_layers=2, sliding_window=4,
                           query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"],
                           max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def _unique(launches: list[dict]) -> list[dict]:
    seen, out = set(), []
    for launch in launches:
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


@pytest.fixture(scope="module")
def launches():
    """The launches of the trie engine (float32 and bfloat16, both masking modes, both KV paths, a Gemma-3 with sliding
    layers and its (1 + w) RMSNorm, SmolLM2-135M's head and MLP shapes, sampled subsets), of the kernel with a
    soft-cap and with attention sinks, and of the four transforms (n = 12: the low and the high bit groups)."""
    from sftint_fast.ops.triton import subset_attention as attention
    from sftint_fast.ops.triton.transforms import butterfly

    monkeypatch = pytest.MonkeyPatch()
    try:
        log = _record(monkeypatch)
        llama, gemma3 = tiny_model("llama"), _gemma3()
        # SmolLM2-135M's attention and MLP shapes (hidden 576, 9 query / 3 KV heads of 64, MLP 1536), one layer
        smol = tiny_model("llama", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                          num_key_value_heads=3, head_dim=64, num_hidden_layers=1)
        sampled = torch.tensor([3, 12, 5, 15, 9])  # a compact store: the kernel reads a path-index table
        f32, bf16 = torch.float32, torch.bfloat16
        runs = [(llama, f32, "embedding", "flat", None), (llama, f32, "attention", "segments", None),
                (llama, bf16, "embedding", "segments", None), (llama, bf16, "attention", "flat", None),
                (gemma3, bf16, "attention", "flat", None), (smol, bf16, "embedding", "flat", None),
                (smol, f32, "attention", "segments", None), (smol, bf16, "attention", "flat", sampled),
                (llama, bf16, "embedding", "segments", sampled)]
        for model, dtype, masking, path, subsets in runs:
            monkeypatch.setattr(attention, "DEFAULT_PATH", path)
            game = _game(model.config.hidden_size, masking)
            sf.evaluate(model.to(dtype), dataclasses.replace(game, baseline=game.baseline.to(dtype)), method="trie",
                        attention_backend="triton", subsets=subsets, progress=False)
        i64 = dict(dtype=torch.int64)
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(2, 2, 4, 16, dtype=dtype)
            k = torch.randn(7, 2, 16, dtype=dtype)
            attention.subset_attention(q, k, torch.randn_like(k), torch.tensor([0, 1], **i64),
                                       torch.tensor([0, 3], **i64), torch.tensor([3, 2], **i64),
                                       torch.tensor([0, 1], **i64), torch.tensor([0, 3], **i64), level=1,
                                       scale=0.25, softcap=30.0, sliding_window=3, attention_masking=True)
            # gpt-oss's attention sinks (HAS_SINKS), on both KV paths
            for path in ("flat", "segments"):
                attention.subset_attention(q, k, torch.randn_like(k), torch.tensor([0, 1], **i64),
                                           torch.tensor([0, 3], **i64), torch.tensor([3, 2], **i64),
                                           torch.tensor([0, 1], **i64), torch.tensor([0, 3], **i64), level=1,
                                           scale=0.25, sinks=torch.randn(4, dtype=dtype), sliding_window=3,
                                           path=path)
        for kind in ("subset_mobius", "subset_zeta", "superset_mobius", "superset_zeta"):
            for dtype in (torch.float32, torch.float64):
                butterfly(torch.randn(2, 1 << 12, dtype=dtype), kind)
    finally:
        monkeypatch.undo()
    return _unique(log)


def test_every_kernel_was_launched(launches):
    launched = {(x["module"], x["kernel"]) for x in launches}
    assert launched == {(m, k) for m, names in KERNELS.items() for k in names}
    bf16 = [x for x in launches if "*bf16" in x["signature"].values()]
    assert {x["kernel"] for x in bf16} >= {"_subset_attention_kernel", "_rms_norm_kernel", "_rope_kernel",
                                           "_silu_mul_kernel"}
    index = {x["constexprs"]["HAS_INDEX"] for x in launches if x["kernel"] == "_subset_attention_kernel"}
    assert index == {True, False}  # the dense stores' launches and the compact stores' (sampled subsets)
    sinks = {x["constexprs"]["HAS_SINKS"] for x in launches if x["kernel"] == "_subset_attention_kernel"}
    assert sinks == {True, False}  # gpt-oss's attention sinks and every other model's


def test_recorded_launches_compile_for_the_gpu(launches, tmp_path):
    """Each recorded launch (each config of the autotuned attention kernel) compiles to an sm_90 (H100/H200) cubin."""
    jobs = [dict(launch, target=list(TARGET)) for launch in launches]
    (tmp_path / "launches.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from another run's cache
    proc = subprocess.run([COMPILE_PYTHON, str(SCRIPT), str(tmp_path / "launches.json"), str(tmp_path / "out.json")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    failed = [f"triton {res['triton']}: {job['kernel']}{res['config']} {job['signature']} {job['constexprs']}: "
              f"{res['error']}"
              for job, per_config in zip(jobs, results) for res in per_config if not res["ok"]]
    assert not failed, "\n\n".join(failed)
    assert all(res["cubin_bytes"] > 0 for per_config in results for res in per_config)
    print(f"{sum(map(len, results))} compiles of {len(jobs)} launches, triton {results[0][0]['triton']}")
    attention = [per_config for job, per_config in zip(jobs, results) if job["kernel"] == "_subset_attention_kernel"]
    assert attention and all(len(per_config) > 1 for per_config in attention)  # every autotune config was compiled


def test_the_compile_check_catches_what_the_interpreter_accepts(tmp_path):
    """The check can fail: ``.to()`` on an argument equal to 1 runs in the interpreter but is a compile error on a
    GPU (Triton passes it as a constexpr), as the butterfly kernel had it before."""
    source = Path(__file__).parents[1] / "sftint_fast" / "ops" / "triton" / "transforms.py"
    text = source.read_text()
    assert "tl.cast(stride, tl.int64)" in text
    broken = tmp_path / "broken_transforms.py"
    broken.write_text(text.replace("tl.cast(stride, tl.int64)", "stride.to(tl.int64)"))
    jobs = []
    for module in ("sftint_fast.ops.triton.transforms", "broken_transforms"):
        jobs.append({"module": module, "kernel": "_butterfly_kernel", "target": list(TARGET), "attrs": {},
                     "signature": {"x_ptr": "*fp32", "stride": "constexpr", "tiles_per_row": "i32",
                                   "cols_per_stride": "i32", "R": "constexpr", "U": "constexpr", "SIGN": "constexpr",
                                   "SUPERSET": "constexpr"},
                     "constexprs": {"stride": 1, "R": 4, "U": 16, "SIGN": -1.0, "SUPERSET": False}})
    (tmp_path / "launches.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([COMPILE_PYTHON, str(SCRIPT), str(tmp_path / "launches.json"), str(tmp_path / "out.json")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (fixed,), (broken_result,) = json.loads((tmp_path / "out.json").read_text())
    assert fixed["ok"] and fixed["cubin_bytes"] > 0
    assert not broken_result["ok"] and "CompilationError" in broken_result["error"]
