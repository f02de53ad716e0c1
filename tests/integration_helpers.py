"""Shared by tests/test_integrations_*.py: ulp comparisons and running a library's own
tests (from its published sdist) against our drop-in."""
import ast
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Dict, Iterable, Optional

import pytest
import torch

SDIST_CACHE = Path(os.environ.get("FUSED_EMA_SDIST_CACHE",
                                  Path.home() / ".cache" / "fused_ema_sdists"))


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 1.0,
                       what: str = "", scale: Optional[torch.Tensor] = None) -> None:
    """|actual - expected| <= ulps * eps * scale elementwise, in the tensors' own dtype
    (plus the dtype's smallest normal). ``scale`` defaults to max(|actual|, |expected|);
    for an EMA step pass max(|old ema|, |param|): the rounding error of an update is
    relative to its operands, not to a result that cancelled to near zero."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    finfo = torch.finfo(expected.dtype)
    a, e = actual.double(), expected.double()
    if scale is None:
        scale = torch.maximum(a.abs(), e.abs())
    bound = ulps * finfo.eps * scale.double().abs() + finfo.tiny
    bad = (a - e).abs() > bound
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} elements differ by more than {ulps} "
                             f"ulp, e.g. at {i}: {a[tuple(i)].item()!r} vs {e[tuple(i)].item()!r}")


def step_scale(old: Iterable[torch.Tensor], params: Iterable[torch.Tensor]):
    """Per tensor, max(|old ema|, |param|): the scale of one update's rounding error."""
    return [torch.maximum(o.detach().double().abs(), p.detach().double().abs())
            for o, p in zip(old, params)]


def sdist_file(requirement: str, member: str) -> str:
    """The text of ``member`` from the published sdist of ``requirement`` (pinned
    ``name==version``), downloaded once with pip into a cache; skips without network."""
    name, version = requirement.split("==")
    SDIST_CACHE.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('-', '_')}-{version}"
    found = [p for p in SDIST_CACHE.glob("*.tar.gz") if p.name.lower() == f"{stem}.tar.gz".lower()]
    if not found:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--no-binary", ":all:", requirement, "-d", str(SDIST_CACHE)],
                           check=True, capture_output=True, timeout=300)
        except Exception as exc:  # no network, no pip: the library's own tests cannot run
            pytest.skip(f"could not download the {requirement} sdist: {exc}")
        found = [p for p in SDIST_CACHE.glob("*.tar.gz")
                 if p.name.lower() == f"{stem}.tar.gz".lower()]
    with tarfile.open(found[0]) as tar:
        top = tar.getnames()[0].split("/")[0]
        return tar.extractfile(f"{top}/{member}").read().decode()


def load_functions(source: str, names: Iterable[str], namespace: Dict) -> Dict:
    """Executes only the named top-level functions of a test file (without its imports,
    which may need packages we do not install) in ``namespace``; returns the namespace.
    Their decorators are dropped: parametrize them in the calling test."""
    tree = ast.parse(source)
    names = set(names)
    picked = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    missing = names - {n.name for n in picked}
    if missing:
        raise AssertionError(f"the library's test file no longer has {sorted(missing)}")
    for n in picked:
        n.decorator_list = []
    module = ast.Module(body=picked, type_ignores=[])
    exec(compile(module, "<sdist tests>", "exec"), namespace)
    return namespace
