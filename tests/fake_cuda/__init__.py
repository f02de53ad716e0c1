"""Builds the fake-CUDA test module: csrc/plan.cpp, csrc/ema_cpu.cpp and csrc/offload.cpp
(the real host code) linked with tests/fake_cuda/fake_cuda.cpp (a fake device::Runtime and
a driver) and tests/fake_cuda/fake_offload.cpp (a fake with queued streams, for the
offload's ordering)."""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
BUILD = os.path.join(HERE, "build")  # gitignored


def load():
    """The compiled module (built on first use, about a minute on two cores)."""
    from torch.utils.cpp_extension import load as load_extension

    os.makedirs(BUILD, exist_ok=True)
    return load_extension(
        name="fused_ema_fake_cuda",
        sources=[os.path.join(CSRC, "plan.cpp"), os.path.join(CSRC, "ema_cpu.cpp"),
                 os.path.join(CSRC, "offload.cpp"), os.path.join(HERE, "fake_cuda.cpp"),
                 os.path.join(HERE, "fake_offload.cpp")],
        extra_include_paths=[CSRC],
        extra_cflags=["-O1", "-fopenmp", "-ffp-contract=off"],
        build_directory=BUILD,
        verbose=False,
    )
