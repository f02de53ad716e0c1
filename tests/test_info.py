"""`python -m fused_ema.info`, run as a user runs it: its fields against what this process
sees, and the build record's torch against the running one (a planted mismatch warns)."""
import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

import fused_ema
from fused_ema import _ext
from fused_ema import info
from fused_ema.info import INTEGRATIONS

PACKAGE_DIR = os.path.dirname(os.path.abspath(fused_ema.__file__))


def run_info(cwd):
    """The report's lines as {key: value}, and its WARNING lines."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # `python -m` finds the package in cwd
    out = subprocess.run([sys.executable, "-m", "fused_ema.info"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    fields, warnings = {}, []
    for line in out.stdout.splitlines():
        if line.startswith("WARNING: "):
            warnings.append(line[len("WARNING: "):])
        else:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields, warnings


@pytest.fixture(scope="module")
def report():
    return run_info(os.path.dirname(PACKAGE_DIR))


def test_fields_say_what_this_process_sees(report):
    fields, _ = report
    assert fields["fused_ema"] == f"{fused_ema.__version__} at {PACKAGE_DIR}"
    assert fields["torch"].split()[0] == torch.__version__
    assert fields["python"].split()[0] == platform.python_version()
    assert fields["backend cpu"] == fused_ema.backend("cpu")
    assert fields["backend cuda"] == fused_ema.backend("cuda")
    assert fields["GPU visible"].startswith("yes" if torch.cuda.is_available() else "no")
    assert fields["CPU threads"].split()[0] == str(torch.get_num_threads())
    if _ext._C is None:
        return
    assert fields["compiled module"] == f"loaded ({_ext._C.__file__})"
    assert fields["CPU threads"].endswith(
        "OpenMP: " + ("yes" if _ext._C.compiled_with_openmp() else "no"))
    assert fields["CPU loop ISA"] == _ext._C.cpu_isa()
    if not _ext._C.compiled_with_cuda():
        assert fields["CUDA architectures"] == "none (built without the CUDA kernels)"
    expected_archs = os.environ.get("FUSED_EMA_EXPECT_CUDA_ARCHS")  # .ci/run's CUDA build
    if expected_archs:
        assert fields["CUDA architectures"] == expected_archs


@pytest.mark.skipif(platform.machine() != "x86_64" or not os.path.exists("/proc/cpuinfo"),
                    reason="reads the x86 CPU flags from /proc/cpuinfo")
def test_cpu_isa_is_the_one_this_cpu_runs():
    if _ext._C is None:
        pytest.skip("the compiled module is not loaded")
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert _ext._C.cpu_isa() == ("AVX2" if "avx2" in flags else "SSE2")


def test_integrations_report_their_libraries(report):
    fields, _ = report
    for module, (library, distribution) in INTEGRATIONS.items():
        status, lib = fields[f"integrations.{module}"].split("; ", 1)
        assert status == "ok"  # every adapter imports without its library
        try:
            importlib.import_module(library)
        except Exception as exc:  # noqa: BLE001 - the report says why
            if isinstance(exc, ModuleNotFoundError) and exc.name == library:
                assert lib == f"{library} not installed"
            else:
                assert lib.startswith(f"{library} fails to import (")
        else:
            assert lib == f"{library} {importlib.metadata.version(distribution)}"


def test_a_fresh_build_records_the_running_torch(report):
    fields, warnings = report
    if fields["built against torch"].startswith("unknown"):
        pytest.skip("no build record: fused_ema._C was not built by this setup.py")
    assert fields["built against torch"] == torch.__version__
    assert not [w for w in warnings if "built against" in w]


def test_another_torch_in_the_record_warns(tmp_path):
    """The record is read from the file setup.py writes, in a copy of the package."""
    shutil.copytree(PACKAGE_DIR, tmp_path / "fused_ema",
                    ignore=shutil.ignore_patterns("__pycache__", "_build_info.py"))
    (tmp_path / "fused_ema" / "_build_info.py").write_text(
        "TORCH_VERSION = '2.0.0+planted'\nCUDA_ARCHS = None\nCOMMIT = 'abc123'\n")
    fields, warnings = run_info(tmp_path)
    assert fields["built against torch"] == "2.0.0+planted"
    assert fields["commit"] == "abc123"
    assert any(w.startswith(f"fused_ema._C was built against torch 2.0.0+planted but torch "
                            f"{torch.__version__} is running") for w in warnings), warnings


def collect_with(monkeypatch, record):
    monkeypatch.setattr(info, "build_record", lambda: record)
    monkeypatch.setattr(info, "checkout_commit", lambda: None)
    lines, warnings = info.collect(integrations=False)
    return dict(lines), warnings


def test_the_same_torch_in_the_record_does_not_warn(monkeypatch):
    fields, warnings = collect_with(monkeypatch, {"TORCH_VERSION": torch.__version__,
                                                  "COMMIT": "abc123-dirty"})
    assert fields["built against torch"] == torch.__version__
    assert fields["commit"] == "abc123-dirty"
    assert not [w for w in warnings if "built against" in w]


def test_no_record_says_unknown(monkeypatch):
    fields, warnings = collect_with(monkeypatch, {})
    assert fields["built against torch"] == "unknown (no build record)"
    assert fields["commit"] == "unknown"
    assert not [w for w in warnings if "built against" in w]
