"""Build of paradis_fast: the Python package, the Triton kernels (mapped to paradis_fast.kernels)
and the C++ extension paradis_fast._C (CPU kernels; CUDA kernels when torch has CUDA or
FORCE_CUDA=1). Build without isolation: the extension compiles against the installed torch."""

import glob
import os
import sys
import time

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

BUILD_SECONDS = 90  # a fresh CPU-only build on 2 quiet cores; the figures are in bench/README.md


class TimedBuildExtension(BuildExtension):
    """BuildExtension that says on stderr what it compiles, how long that takes, and how long it took:
    the compile is a minute or more with no output of its own (pip shows it with -v)."""

    def build_extensions(self) -> None:
        for ext in self.extensions:
            print(
                f"paradis_fast: compiling {ext.name} ({len(ext.sources)} C++/CUDA sources); a fresh build takes "
                f"about {BUILD_SECONDS} s on 2 quiet cores, longer with CUDA kernels or busy cores",
                file=sys.stderr,
                flush=True,
            )
        started = time.perf_counter()
        super().build_extensions()
        print(f"paradis_fast: built in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def extension():
    sources = ["csrc/paradis.cpp", "csrc/autograd.cpp", "csrc/python_module.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    with_cuda = os.environ.get("FORCE_CUDA") == "1" or (torch.version.cuda and CUDA_HOME is not None)
    if with_cuda:
        return CUDAExtension(
            "paradis_fast._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "paradis_fast._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="paradis_fast",
    version="0.1.0",
    description="Fast training and deployment of ParaDiS (parallelly distributable slimmable) networks",
    packages=[*find_packages(include=["paradis_fast", "paradis_fast.*"]), "paradis_fast.kernels"],
    package_dir={"paradis_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "data": ["scikit-learn", "tqdm", "matplotlib"],
        "test": ["pytest", "scikit-learn", "tqdm", "matplotlib", "expecttest"],
    },
    ext_modules=[extension()],
    cmdclass={"build_ext": TimedBuildExtension},
)
