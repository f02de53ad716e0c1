"""Build fused_ema's compiled module.

FUSED_EMA_CUDA=auto|0|1 chooses the CUDA kernels: ``auto`` (default) builds them
when torch is a CUDA build and nvcc is found (a GPU need not be present), ``1``
fails loudly if that is not so, ``0`` builds the CPU kernels only.
Install with ``pip install --no-build-isolation`` so the installed torch is used.
"""
import os
import shutil
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
HOST_SOURCES = [os.path.join(CSRC, f) for f in ("plan.cpp", "ema_cpu.cpp", "bindings.cpp")]
CUDA_SOURCES = [os.path.join(CSRC, "ema_cuda.cu")]


def want_cuda() -> bool:
    mode = os.environ.get("FUSED_EMA_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FUSED_EMA_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if not nvcc or not os.path.exists(nvcc):
        reasons.append("nvcc was not found (set CUDA_HOME)")
    if reasons and mode == "1":
        sys.exit("FUSED_EMA_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
    return not reasons


def extension():
    # -fopenmp at compile time turns on at::parallel_for's OpenMP loop; the
    # symbols resolve to the OpenMP runtime torch already loads, so we do not
    # link a second one.
    # -ffp-contract=off: the CPU kernel gives the same bits whatever the ISA
    # clone it runs (see ema_cpu.cpp). The C++ standard is the one torch asks for.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if want_cuda():
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-DFUSED_EMA_WITH_CUDA"]
        return CUDAExtension(
            "fused_ema._C",
            HOST_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx + ["-DFUSED_EMA_WITH_CUDA"], "nvcc": nvcc},
        )
    return CppExtension("fused_ema._C", HOST_SOURCES, extra_compile_args={"cxx": cxx})


setup(
    packages=find_packages(include=["fused_ema", "fused_ema.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
