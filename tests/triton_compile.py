"""Compile recorded Triton launches for a GPU target without a GPU; run by tests/test_triton_compile.py.

The interpreter (TRITON_INTERPRET=1) runs a kernel's Python body with numpy, so it accepts code a GPU compile rejects
(a method call on an argument Triton specialised to a constexpr, a shape ``tl.dot`` refuses, a type mismatch in a
loop-carried value). This script compiles each launch signature recorded under the interpreter with Triton's real
compiler, down to a cubin for NVIDIA targets (Triton ships ptxas), in a process without the interpreter.

    python tests/triton_compile.py launches.json results.json

``launches.json``: a list of ``{"module", "kernel", "signature", "constexprs", "attrs", "target": [backend, arch,
warp]}`` (``attrs``: argument index -> Triton's specialisation string, "D" = divisible by 16);
``results.json`` gets, per launch, a list with one ``{"ok", "config", "error", "cubin_bytes", "triton"}`` per kernel config
(an autotuned kernel is compiled with each config it may pick, with its warps and stages).
"""
from __future__ import annotations

import importlib
import json
import os
import sys


def compile_one(launch: dict) -> list[dict]:
    """One result per kernel config: an autotuned kernel is compiled with every config it may pick."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    configs = getattr(kernel, "configs", None) or [None]  # a triton.autotune wrapper holds its configs
    fn = getattr(kernel, "fn", kernel) if configs != [None] else kernel
    backend, arch, warp = launch["target"]
    attrs = {(int(index),): BaseBackend.parse_attr(spec) for index, spec in launch.get("attrs", {}).items()}
    results = []
    for config in configs:
        constexprs = dict(launch["constexprs"])
        options = {}
        signature = dict(launch["signature"])
        if config is not None:
            constexprs.update(config.kwargs)
            signature.update(dict.fromkeys(config.kwargs, "constexpr"))
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        signature = {name: signature[name] for name in fn.arg_names}  # the kernel's parameter order
        label = "" if config is None else f" config {config.kwargs} warps={config.num_warps} stages={config.num_stages}"
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget(backend, arch, warp), options=options)
        except Exception as err:  # noqa: BLE001 - the error text is the result
            results.append({"ok": False, "config": label, "error": f"{type(err).__name__}: {err}"[:2000],
                            "cubin_bytes": 0, "triton": triton.__version__})
            continue
        results.append({"ok": True, "config": label, "error": None, "triton": triton.__version__,
                        "cubin_bytes": len(compiled.asm.get("cubin", b""))})
    return results


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the kernels must be compiled, not interpreted")
    launches = json.loads(open(sys.argv[1]).read())
    # one process per core: the compiles are independent and single-threaded (~2x on the CI's two cores)
    workers = max(1, min(len(launches), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count() or 1))
    if workers == 1:
        results = [compile_one(launch) for launch in launches]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(compile_one, launches))  # in the launches' order
    with open(sys.argv[2], "w") as out:
        json.dump(results, out)  # per launch, a list over configs


if __name__ == "__main__":
    main()
