"""Build of the C++ extension ``sftint_fast._C``.

SFTINT_SKIP_EXT=1 builds the pure-Python package (torch fallbacks). CUDA sources are compiled only
when torch itself is a CUDA build *and* nvcc is found (CPU machines here have nvcc but a CPU torch).
"""
import os
import shutil

from setuptools import setup

ext_modules = []
cmdclass = {}

if os.environ.get("SFTINT_SKIP_EXT", "0") != "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = ["csrc/transforms.cpp", "csrc/andor.cpp", "csrc/layer_ops.cpp"]
    extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
    extra_link_args = ["-fopenmp"]
    ext_modules.append(
        CppExtension(
            name="sftint_fast._C",
            sources=sources,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
