"""Registers, spills and shared memory of the fused subset-attention kernel for sm_90, without a GPU.

Compiles every autotune config of ``_subset_attention_kernel`` (both KV walks, own segment from the pass or the
store) ahead of time for an H100/H200 with the installed Triton, then runs the ptxas Triton assembles with,
with ``-v``, on the PTX. A static check that a kernel change did not push configs into register spills (which the
autotuner can only find by timing, on a GPU). Run it with the GPU machine's Triton for its code generation:

    python benchmarks/kernel_resources.py [--group 3] [--head-dim 64] [--dtype bf16] [--masking]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real (the interpreter has no PTX)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from sftint_fast.ops.triton.subset_attention import _configs, _subset_attention_kernel  # noqa: E402

_TABLES = {"meta_ptr", "offsets_ptr", "lens_ptr", "players_ptr", "positions_ptr", "index_ptr"}


def resources(ptx: str, ptxas: str) -> dict:
    arch = re.search(r"\.target\s+(\S+)", ptx).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        proc = subprocess.run([ptxas, f"-arch={arch}", "-v", f.name, "-o", os.devnull], capture_output=True,
                              text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    text = proc.stderr
    grab = lambda pattern: int(re.search(pattern, text).group(1)) if re.search(pattern, text) else 0  # noqa: E731
    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", type=int, default=3, help="query heads per KV head (SmolLM2: 3, Qwen2.5: 7)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--masking", action="store_true", help="attention masking mode")
    parser.add_argument("--path-index", action="store_true",
                        help="a compact store's path-index table (sampled subsets)")
    parser.add_argument("--no-divisibility", action="store_true",
                        help="compile without the alignment/stride specialization a real launch gets")
    args = parser.parse_args(argv)
    try:  # the ptxas Triton itself assembles sm_90 with (its PTX version needs that one)
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as err:  # noqa: BLE001 - any failure here means: no NVIDIA toolchain to ask
        print(f"this Triton has no usable ptxas for sm_90 ({err}): nothing to report", file=sys.stderr)
        return 2
    fn = _subset_attention_kernel.fn
    target = GPUTarget("cuda", 90, 32)
    fp32 = args.dtype == "fp32"
    print(f"triton {triton.__version__}, sm_90, {args.dtype}, GROUP={args.group}, HEAD_DIM={args.head_dim}, "
          f"masking={args.masking}, path_index={args.path_index}")
    print("path     own    BLOCK_M BLOCK_N warps stages | regs spill_st spill_ld smem")
    for flat in (True, False):
        for own in (True, False):
            for cfg in _configs():
                const = dict(GROUP=args.group, HEAD_DIM=args.head_dim,
                             BLOCK_D=max(16, triton.next_power_of_2(args.head_dim)), IS_FP32=fp32,
                             ATTENTION_MASKING=args.masking, HAS_SOFTCAP=False, HAS_WINDOW=False,
                             INPUT_PRECISION="ieee" if fp32 else "tf32", FLAT_PATH=flat, OWN_FROM_PASS=own,
                             HAS_INDEX=args.path_index, **cfg.kwargs)
                sig = {}
                for name in fn.arg_names:
                    if name.endswith("_ptr"):
                        sig[name] = "*i64" if name in _TABLES else "*" + args.dtype
                    elif name in const:
                        sig[name] = "constexpr"
                    else:
                        sig[name] = "fp32" if name in ("qk_scale", "softcap") else "i32"
                # what a launch specializes on: 16-byte aligned tensors, row strides that are multiples of 16
                attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                         if name.endswith("_ptr") and name not in _TABLES
                         or name.startswith("stride_") and name not in ("stride_offsets", "stride_index")}
                if not args.no_divisibility:
                    attrs.update({(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                                  if name in _TABLES})
                else:
                    attrs = {}
                kernel = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const,
                                                                  attrs=attrs),
                                        target=target,
                                        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"maxnreg": cfg.maxnreg} if getattr(cfg, "maxnreg", None) else {})))
                r = resources(kernel.asm["ptx"], ptxas)
                print(f"{'flat' if flat else 'segments':8} {str(own):6} {cfg.kwargs['BLOCK_M']:7} "
                      f"{cfg.kwargs['BLOCK_N']:7} {cfg.num_warps:5} {cfg.num_stages:6} | {r['registers']:4} "
                      f"{r['spill_stores']:8} {r['spill_loads']:8} {kernel.metadata.shared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
