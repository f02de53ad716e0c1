"""What to paste into a bug report: ``python -m fused_ema.info``.

One ``key: value`` line each: fused_ema's version and commit, the torch the compiled
module was built against and the torch running (a mismatch ends in a WARNING line),
which backend an update takes on each device, the CUDA architectures in the module, the
CPU loop's threads and instruction set, whether a GPU is visible, and which of
``fused_ema.integrations`` import, with their libraries.
"""
import importlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import List, Tuple

import torch

from . import __version__, _ext
from .functional import backend

# fused_ema.integrations module -> the library it stands in for (module, distribution).
INTEGRATIONS = {
    "sb3": ("stable_baselines3", "stable-baselines3"),
    "torch_ema": ("torch_ema", "torch-ema"),
    "ema_pytorch": ("ema_pytorch", "ema-pytorch"),
    "diffusers": ("diffusers", "diffusers"),
    "timm": ("timm", "timm"),
    "lightning": ("lightning", "lightning"),
    "transformers": ("transformers", "transformers"),
}
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def build_record() -> dict:
    """What setup.py recorded when it built fused_ema._C (empty when it did not: e.g. a
    module built by an older setup.py, or copied in by hand)."""
    try:
        from . import _build_info
    except ImportError:
        return {}
    return {key: getattr(_build_info, key, None) for key in ("TORCH_VERSION", "CUDA_ARCHS",
                                                             "COMMIT")}


def checkout_commit():
    """HEAD of the git checkout the package is imported from (an editable install), or None."""
    root = os.path.dirname(PACKAGE_DIR)
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _import(name: str) -> str:
    """'ok', 'not installed', or why the import failed."""
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return "not installed"
        return f"fails to import ({exc})"
    except Exception as exc:  # noqa: BLE001 - any error is what the report must show
        return f"fails to import ({type(exc).__name__}: {exc})"
    return "ok"


def _library(name: str, distribution: str) -> str:
    status = _import(name)
    if status != "ok":
        return f"{name} {status}"
    try:
        return f"{name} {importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{name} (version unknown)"


def collect(integrations: bool = True) -> Tuple[List[Tuple[str, str]], List[str]]:
    """The report's (key, value) lines and its warnings (without the integrations' lines,
    which import their libraries, when ``integrations`` is False)."""
    record = build_record()
    warnings = []
    lines = [("fused_ema", f"{__version__} at {PACKAGE_DIR}")]

    built_from = record.get("COMMIT") or "unknown"
    head = checkout_commit()
    if head and head != built_from.split("-")[0]:
        lines.append(("commit", f"{head} (this checkout; the compiled module was built from "
                                f"{built_from})"))
    else:
        lines.append(("commit", built_from))
    lines.append(("python", f"{platform.python_version()} on {platform.platform()}"))
    lines.append(("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"))
    built_against = record.get("TORCH_VERSION")
    lines.append(("built against torch", built_against or "unknown (no build record)"))

    if _ext._C is not None:
        module = f"loaded ({_ext._C.__file__})"
    else:
        module = f"not loaded ({_ext.LOAD_ERROR})"
    if _ext.FORCE_PYTHON:
        module += ", not used: FUSED_EMA_BACKEND=python"
    lines.append(("compiled module", module))
    if built_against and built_against != torch.__version__:
        consequence = (
            "it did not load, so every update runs the pure-PyTorch fallback"
            if _ext._C is None else
            "it loaded, but a module built against another torch can crash or misbehave")
        warnings.append(
            f"fused_ema._C was built against torch {built_against} but torch "
            f"{torch.__version__} is running: {consequence}. Rebuild it against this torch: "
            "pip install --no-build-isolation (-e) . from fused_ema's source")
    elif _ext._C is None and not _ext.FORCE_PYTHON:
        warnings.append("the compiled module did not load: every update runs the pure-PyTorch "
                        "fallback")

    lines.append(("backend cpu", backend("cpu")))
    lines.append(("backend cuda", backend("cuda")))
    if torch.cuda.is_available():
        gpus = ", ".join(f"{torch.cuda.get_device_name(i)} "
                         f"({'%d.%d' % torch.cuda.get_device_capability(i)})"
                         for i in range(torch.cuda.device_count()))
        lines.append(("GPU visible", f"yes: {gpus}"))
    else:
        lines.append(("GPU visible", "no"))
    if _ext._C is None:
        archs = "none (the compiled module is not loaded)"
    elif not _ext._C.compiled_with_cuda():
        archs = "none (built without the CUDA kernels)"
    else:
        archs = record.get("CUDA_ARCHS") or "unknown (no build record)"
    lines.append(("CUDA architectures", archs))

    openmp = ("unknown (the compiled module is not loaded)" if _ext._C is None
              else "yes" if _ext._C.compiled_with_openmp() else "no")
    lines.append(("CPU threads", f"{torch.get_num_threads()} (torch.get_num_threads()), "
                                 f"OpenMP: {openmp}"))
    lines.append(("CPU loop ISA", "n/a (the compiled module is not loaded)" if _ext._C is None
                  else _ext._C.cpu_isa()))

    for module_name, (library, distribution) in (INTEGRATIONS.items() if integrations else ()):
        status = _import(f"fused_ema.integrations.{module_name}")
        lines.append((f"integrations.{module_name}",
                      f"{status}; {_library(library, distribution)}"))
    return lines, warnings


def main() -> int:
    lines, warnings = collect()
    width = max(len(key) for key, _ in lines) + 1
    for key, value in lines:
        print(f"{key + ':':<{width}} {value}")
    for warning in warnings:
        print(f"WARNING: {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
