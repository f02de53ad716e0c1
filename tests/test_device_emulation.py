"""The CUDA kernel's device code, executed on the CPU.

tests/emulation/run_kernel.cpp includes csrc/ema_kernel.cuh as-is (the source
nvcc compiles) after a shim for the CUDA built-ins (tests/emulation/cuda_shim.h:
real threads per block, a real barrier, per-block shared memory filled with
garbage), builds its plans with csrc/plan.cpp and compares every EMA bit for bit
with the CPU kernel of csrc/ema_cpu.cpp. It is built here once per session with
AddressSanitizer and UBSan (an out-of-bounds access, or a 16-byte access that is
not 16-byte aligned, aborts the run) and linked against the installed torch.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parent.parent
EMULATION = ROOT / "tests" / "emulation"
BUILD = ROOT / "build" / "emulation"
# Each unit of the driver, with the files it includes from this repository.
SOURCES = {
    EMULATION / "run_kernel.cpp": [EMULATION / "cuda_shim.h", ROOT / "csrc" / "ema_kernel.cuh",
                                   ROOT / "csrc" / "ema_math.h", ROOT / "csrc" / "plan.h"],
    ROOT / "csrc" / "plan.cpp": [ROOT / "csrc" / "plan.h"],
    ROOT / "csrc" / "ema_cpu.cpp": [ROOT / "csrc" / "ema_math.h", ROOT / "csrc" / "plan.h"],
}
GROUPS = ["pairs", "offsets", "multi", "edge", "many", "launch", "stochastic"]

# The CPU kernel's own flags (setup.py) plus the sanitizers. No -fopenmp: the
# CPU reference runs serially, which changes no bits.
CXXFLAGS = [
    "-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off",
    "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
]


def _compiler():
    return os.environ.get("CXX", "g++")


def _stale(target: Path, stamp: str) -> bool:
    stamp_file = target.with_name(target.name + ".stamp")
    return not (target.exists() and stamp_file.exists() and stamp_file.read_text() == stamp)


def _stamp(target: Path, stamp: str) -> None:
    target.with_name(target.name + ".stamp").write_text(stamp)


def _build() -> Path:
    """Builds what changed of the driver (build/emulation/); returns its path."""
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    includes += [f"-I{sysconfig.get_paths()['include']}", f"-I{ROOT / 'csrc'}", f"-I{EMULATION}"]
    torch_lib = Path(torch.__file__).parent / "lib"
    flags = " ".join([_compiler(), torch.__version__, *CXXFLAGS, *includes])
    BUILD.mkdir(parents=True, exist_ok=True)
    objects, jobs = {}, []
    for src, deps in SOURCES.items():  # the units compile side by side
        obj = BUILD / (src.stem + ".o")
        stamp = hashlib.sha256(flags.encode())
        for path in [src, *deps]:
            stamp.update(path.read_bytes())
        objects[obj] = stamp.hexdigest()
        if _stale(obj, objects[obj]):
            cmd = [_compiler(), *CXXFLAGS, *includes, "-c", str(src), "-o", str(obj)]
            job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            jobs.append((cmd, obj, job))
    for cmd, obj, job in jobs:
        out, _ = job.communicate()
        assert job.returncode == 0, f"{' '.join(cmd)}\n{out}"
        _stamp(obj, objects[obj])
    exe = BUILD / "run_kernel"
    exe_stamp = hashlib.sha256("".join(objects.values()).encode()).hexdigest()
    if _stale(exe, exe_stamp):
        link = [_compiler(), "-fsanitize=address,undefined", *map(str, objects), "-o", str(exe),
                f"-L{torch_lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_lib}"]
        result = subprocess.run(link, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(link)}\n{result.stdout}{result.stderr}"
        _stamp(exe, exe_stamp)
    return exe


@pytest.fixture(scope="module")
def driver():
    if shutil.which(_compiler()) is None:
        pytest.skip(f"{_compiler()} not found: cannot build the emulated kernel")
    if not sys.platform.startswith("linux"):
        pytest.skip("the emulation harness is built for Linux (ASan, GNU ld sections)")
    return _build()


@pytest.mark.parametrize("group", GROUPS)
def test_kernel_matches_cpu_kernel(driver, group):
    env = dict(os.environ, UBSAN_OPTIONS="print_stacktrace=1")
    result = subprocess.run([str(driver), group], capture_output=True, text=True, env=env,
                            timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert f"{group}: " in result.stdout and "passed" in result.stdout, output[-6000:]
