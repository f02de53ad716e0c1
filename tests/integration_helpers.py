"""Shared by tests/test_integrations_*.py: ulp comparisons, running a library's own
tests (from its published sdist) against our drop-in, and checking that a drop-in module
offers every public name of the module it replaces."""
import ast
import itertools
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

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


def exec_repointed(source: str, library: str, ours: str, filename: str) -> Dict:
    """Executes a library's whole test file with ``from <library> import ...`` pointed at
    ``ours``; returns its namespace. Any other import of the library (``import library``,
    ``from library.sub import``) is refused: nothing may run against the real library
    unnoticed."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == library:
            node.module = ours
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(library + "."):
            raise AssertionError(f"{filename} imports {node.module}: not repointed")
        elif isinstance(node, ast.Import) and any(
                a.name == library or a.name.startswith(library + ".") for a in node.names):
            raise AssertionError(f"{filename} imports {library} itself: not repointed")
    namespace: Dict = {"__name__": f"repointed_{Path(filename).stem}"}
    exec(compile(tree, filename, "exec"), namespace)
    return namespace


def own_test_names(source: str) -> List[str]:
    """The names of a test file's top-level ``test_*`` functions, in file order."""
    return [n.name for n in ast.parse(source).body
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


def call_parametrized(fn: Callable) -> int:
    """Calls a test function once per combination of its ``pytest.mark.parametrize``
    marks (as pytest would); returns the number of calls."""
    axes = []
    for mark in getattr(fn, "pytestmark", []):
        if mark.name != "parametrize":
            raise AssertionError(f"{fn.__name__}: mark {mark.name} is not handled")
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        axes.append([dict(zip(names, v if len(names) > 1 else (v,))) for v in values])
    calls = 0
    for combo in itertools.product(*axes):
        fn(**{k: v for d in combo for k, v in d.items()})
        calls += 1
    return calls


def public_names(module: types.ModuleType) -> List[str]:
    """A module's public names: what ``dir()`` lists without a leading underscore (its
    ``__all__`` is not used: torch_ema 0.3's holds a version string and a class)."""
    return sorted(n for n in dir(module) if not n.startswith("_"))


def _belongs_to(obj, root: str) -> bool:
    name = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
    return isinstance(name, str) and (name == root or name.startswith(root + "."))


def assert_drop_in(ours: types.ModuleType, real: types.ModuleType, own: Iterable[str]) -> int:
    """``ours`` offers every public name of ``real``: the names in ``own`` are classes or
    functions of ours; the library's own classes, functions and submodules are the
    library's objects (delegated); what it merely imports (torch, typing ...) resolves.
    Returns how many names were checked."""
    names = public_names(real)
    own = set(own)
    assert own <= set(names), f"{sorted(own - set(names))} are not names of {real.__name__}"
    missing = [n for n in names if not hasattr(ours, n)]
    assert not missing, f"{ours.__name__} lacks {len(missing)} of {len(names)} public names " \
                        f"of {real.__name__}: {missing}"
    root = real.__name__.split(".")[0]
    for n in names:
        mine, theirs = getattr(ours, n), getattr(real, n)
        if n in own:
            assert getattr(mine, "__module__", None) == ours.__name__, f"{n} is not ours"
        elif _belongs_to(theirs, root):
            assert mine is theirs, f"{ours.__name__}.{n} is not {real.__name__}.{n}"
    return len(names)
