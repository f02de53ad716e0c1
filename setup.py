"""Build fused_ema's compiled module.

FUSED_EMA_CUDA=auto|0|1 chooses the CUDA kernels: ``auto`` (default) builds them
when torch is a CUDA build and a CUDA toolkit of the same major version is found
(a GPU need not be present), ``1`` fails with the reason if that is not so, ``0``
builds the CPU kernels only.
Install with ``pip install --no-build-isolation`` so the installed torch is used.

A GPU-less build box needs no hand-set environment: with no GPU visible and
TORCH_CUDA_ARCH_LIST unset the kernels are built for DEFAULT_CUDA_ARCHS (those
this nvcc supports), and CUDA_HOME is the toolkit the ``nvcc`` on PATH belongs
to, even when that ``nvcc`` is a symlink or a wrapper script. TORCH_CUDA_ARCH_LIST
and CUDA_HOME (or CUDA_PATH), when set, are used as given.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup
from setuptools.command.sdist import sdist

import torch
import torch.utils.cpp_extension as cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

CSRC = "csrc"
HOST_SOURCES = [os.path.join(CSRC, f) for f in ("plan.cpp", "ema_cpu.cpp", "offload.cpp", "bindings.cpp")]
CUDA_SOURCES = [os.path.join(CSRC, "ema_cuda.cu")]

# The GPUs people train on: Ampere (A100, RTX 30), Ada (L4, L40, RTX 40), Hopper
# (H100, H200), Blackwell (B200, RTX 50); PTX of the newest is added so that
# later GPUs can JIT-compile it. A cubin runs on every GPU of its major version
# with an equal or higher minor one, so the sm_80 cubin serves 8.6 and 8.9 (Ada)
# too: one build per major version keeps the build (and CI) a third shorter.
# Torch's own convention (the visible GPU's arch) is kept when a GPU is visible.
DEFAULT_CUDA_ARCHS = ("8.0", "9.0", "10.0", "12.0")


def fail(message: str):
    sys.exit(f"fused_ema setup: {message}")


def note(message: str):
    print(f"fused_ema setup: {message}", file=sys.stderr)


def is_toolkit(path) -> bool:
    """A CUDA toolkit root: nvcc, the runtime headers and libcudart."""
    if not path:
        return False
    libs = [os.path.join(path, d, "libcudart.so*") for d in ("lib64", "lib", "targets/*/lib")]
    return (os.path.isfile(os.path.join(path, "bin", "nvcc"))
            and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
            and any(glob.glob(pattern) for pattern in libs))


def nvcc_top(nvcc: str):
    """The toolkit root that nvcc itself reports (`#$ TOP=...` in a dry run).

    This sees through wrapper scripts (`exec /usr/local/cuda-X/bin/nvcc "$@"`),
    which no path arithmetic can. Nothing is compiled: --dryrun only prints.
    """
    with tempfile.TemporaryDirectory() as tmp:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", os.path.join(tmp, "probe.cu")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.normpath(match.group(1).strip()) if match else None


def find_cuda_home():
    """(toolkit root or None, what was tried)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            home = os.environ[var]
            return (home if is_toolkit(home) else None), f"{var}={home}"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        home = "/usr/local/cuda"
        return (home if is_toolkit(home) else None), f"no nvcc on PATH, {home}"
    # A symlink (/usr/bin/nvcc -> /usr/local/cuda-X/bin/nvcc) is followed ...
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if is_toolkit(home):
        return home, nvcc
    # ... and a wrapper script is asked.
    home = nvcc_top(nvcc)
    return (home if is_toolkit(home) else None), f"nvcc on PATH at {nvcc}"


def nvcc_release(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    if match is None:
        fail(f"cannot read the CUDA version from `{nvcc} --version`:\n{out}")
    return match.group(1)


def nvcc_archs(nvcc: str) -> set:
    """The compute capabilities this nvcc can compile, as "9.0", "10.0", ..."""
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"`{nvcc} --list-gpu-arch` failed (CUDA 11.0 or later is needed); set "
             f"TORCH_CUDA_ARCH_LIST by hand:\n{out.stderr}")
    return {f"{int(cc) // 10}.{int(cc) % 10}"
            for cc in re.findall(r"compute_(\d+)\b", out.stdout)}


def default_arch_list(nvcc: str) -> str:
    supported = nvcc_archs(nvcc)
    archs = [arch for arch in DEFAULT_CUDA_ARCHS if arch in supported]
    if not archs:
        fail(f"{nvcc} supports none of {', '.join(DEFAULT_CUDA_ARCHS)}; set "
             "TORCH_CUDA_ARCH_LIST to the architectures to build for")
    return ";".join(archs) + "+PTX"


def configure_cuda():
    """Decides whether to build the CUDA kernels and points torch at the toolkit.

    Returns what they are built for (TORCH_CUDA_ARCH_LIST syntax, or the visible GPUs),
    or None.
    """
    mode = os.environ.get("FUSED_EMA_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        fail(f"FUSED_EMA_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return None

    reason = None
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    else:
        home, tried = find_cuda_home()
        if home is None:
            reason = (f"no CUDA toolkit found ({tried}); install one or set CUDA_HOME to "
                      "the toolkit's root (the folder holding bin/nvcc and lib64)")
        else:
            nvcc = os.path.join(home, "bin", "nvcc")
            release = nvcc_release(nvcc)
            if release.split(".")[0] != torch.version.cuda.split(".")[0]:
                reason = (f"the CUDA toolkit at {home} is CUDA {release} but torch "
                          f"{torch.__version__} was built with CUDA {torch.version.cuda}; "
                          "install a torch built for this CUDA or point CUDA_HOME at a "
                          f"CUDA {torch.version.cuda.split('.')[0]}.x toolkit")
    if reason is not None:
        if mode == "1":
            fail("FUSED_EMA_CUDA=1 but the CUDA kernels cannot be built: " + reason)
        note(f"building without the CUDA kernels: {reason}")
        return None

    # torch.utils.cpp_extension read CUDA_HOME at import, from the nvcc on PATH;
    # a wrapper script there made it guess wrong (no libcudart to link).
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs and not torch.cuda.is_available():
        archs = os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(nvcc)
        note("no GPU visible and TORCH_CUDA_ARCH_LIST unset: the default architectures")
    if not archs:
        archs = "torch's default for the visible GPUs (%s)" % ", ".join(
            "%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
    note(f"building the CUDA kernels with the CUDA {release} toolkit at {home} for {archs}")
    return archs


HERE = os.path.dirname(os.path.abspath(__file__))
COMMIT_FILE = "COMMIT"  # in an sdist: the commit it was made from


def git_commit():
    """The commit this source tree is checked out at ("-dirty": with changes), the one an
    sdist was made from, or None."""
    if os.path.isfile(os.path.join(HERE, COMMIT_FILE)):
        with open(os.path.join(HERE, COMMIT_FILE)) as f:
            return f.read().strip() or None

    def git(*args):
        return subprocess.run(["git", "-C", HERE, *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    try:
        # Only this project's own checkout: an unpacked sdist may lie inside another repo.
        if os.path.realpath(git("rev-parse", "--show-toplevel") or "/nonexistent") != \
                os.path.realpath(HERE):
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# What `python -m fused_ema.info` reports about the build (fused_ema/_build_info.py):
# the module itself cannot be asked when it does not load under another torch.
BUILD_RECORD = {"TORCH_VERSION": torch.__version__, "CUDA_ARCHS": None, "COMMIT": git_commit()}


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """Builds the module, then writes the build record beside it (in place or in build/)."""

    def run(self):
        super().run()
        path = os.path.join(os.path.dirname(self.get_ext_fullpath("fused_ema._C")),
                            "_build_info.py")
        with open(path, "w") as f:
            f.write("# Written by setup.py with fused_ema._C: what it was built from and for.\n")
            f.writelines(f"{key} = {value!r}\n" for key, value in BUILD_RECORD.items())


class Sdist(sdist):
    """Also writes the commit into the sdist: built from it, there is no git to ask."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        with open(os.path.join(base_dir, COMMIT_FILE), "w") as f:
            f.write((BUILD_RECORD["COMMIT"] or "") + "\n")


def extension():
    # -fopenmp at compile time turns on at::parallel_for's OpenMP loop; the
    # symbols resolve to the OpenMP runtime torch already loads, so we do not
    # link a second one.
    # -ffp-contract=off: the CPU kernel gives the same bits whatever the ISA
    # clone it runs (see ema_cpu.cpp). The C++ standard is the one torch asks for.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    BUILD_RECORD["CUDA_ARCHS"] = configure_cuda()
    if BUILD_RECORD["CUDA_ARCHS"]:
        # --threads: nvcc compiles the architectures in parallel (0: one per core).
        nvcc = ["-O3", "--expt-relaxed-constexpr", "--threads=0", "-DFUSED_EMA_WITH_CUDA"]
        return CUDAExtension(
            "fused_ema._C",
            HOST_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": cxx + ["-DFUSED_EMA_WITH_CUDA"], "nvcc": nvcc},
        )
    return CppExtension("fused_ema._C", HOST_SOURCES, extra_compile_args={"cxx": cxx})


setup(
    packages=find_packages(include=["fused_ema", "fused_ema.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt, "sdist": Sdist},
)
