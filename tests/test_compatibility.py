"""The supported torch range is said in three places that must agree: pyproject.toml's
floor (to install and to build), the oldest torch .ci/run tests, and docs/compatibility.md."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def read(name):
    path = ROOT / name
    if not path.exists():
        pytest.skip(f"{name} is not here (an sdist)")
    return path.read_text()


def test_the_floor_is_the_oldest_torch_tested():
    floors = re.findall(r'"torch>=([0-9.]+)"', read("pyproject.toml"))
    assert len(floors) == 2 and floors[0] == floors[1], floors  # build-system and dependencies
    floor = floors[0]
    oldest = re.search(r"^pip download .*\btorch==([0-9.]+)", read(".ci/run"), re.M).group(1)
    assert oldest.startswith(floor + "."), (oldest, floor)
    doc = read("docs/compatibility.md")
    assert f"**torch {floor} or later**" in doc
    assert re.search(rf"^\| {re.escape(oldest)} .*\| `\.ci/run` stage", doc, re.M), oldest
