"""Every csrc/cuda/*.cu compiles to an sm_90 object with nvcc, so a syntax or type error in the
CUDA kernels fails CI on machines without a GPU (they run on one through tests/test_gpu.py).

The flags are those torch.utils.cpp_extension builds CUDA sources with. A CPU build of torch ships
the c10/cuda and ATen/cuda headers but not c10/cuda/impl/cuda_cmake_macros.h, a file CMake
generates whose only content is C10_CUDA_BUILD_SHARED_LIBS (Windows export macros); without it
the build defines C10_CUDA_NO_CMAKE_CONFIGURE_FILE, the switch torch provides for that case.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def nvcc_command(source: str, output: str) -> list[str]:
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc")]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [
        "nvcc",
        "-c",
        "-std=c++17",
        "-arch=sm_90",
        "-Xcompiler",
        "-fPIC",
        *cpp_extension.COMMON_NVCC_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DTORCH_EXTENSION_NAME=_C",
        *(f"-I{path}" for path in includes),
    ]
    generated = os.path.join(cpp_extension.include_paths()[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not os.path.exists(generated):
        command.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return [*command, source, "-o", output]


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/ has no .cu file"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: the CUDA sources cannot be compiled")
@pytest.mark.parametrize("source", SOURCES, ids=[os.path.basename(s) for s in SOURCES])
def test_compiles_to_an_sm90_object(source, tmp_path):
    output = tmp_path / (os.path.basename(source) + ".o")
    run = subprocess.run(nvcc_command(source, str(output)), capture_output=True, text=True, timeout=600)
    errors = "\n".join(line[:400] for line in (run.stdout + run.stderr).splitlines() if "error" in line.lower())
    assert run.returncode == 0, f"nvcc failed on {source}:\n{errors or run.stderr[-4000:]}"
    assert output.stat().st_size > 0
