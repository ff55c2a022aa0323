"""Builds gqa_ext._C by driving CMakeLists.txt (CMake + Ninja).

Environment knobs: GQA_EXT_CUDA=auto|0|1 (read by CMakeLists.txt),
TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS, CUTLASS_INCLUDE_DIR.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pybind11
import torch
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        prefix_path = ";".join([torch.utils.cmake_prefix_path, pybind11.get_cmake_dir()])
        configure = [
            *("cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja"),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={prefix_path}",
            f"-DGQA_EXT_OUTPUT_DIR={out_dir}",
        ]
        subprocess.run(configure, check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


# The extension only runs with the torch release it was compiled against.
TORCH_RELEASE = torch.__version__.split("+")[0]

setup(
    install_requires=[f"torch=={TORCH_RELEASE}"],
    ext_modules=[Extension("gqa_ext._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
