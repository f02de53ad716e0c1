"""The README and docs/ pages link to what exists: every relative link points to a file or
folder of this repository, every #anchor to a heading of its page, every link named after a
test (``[test_x](tests/test_y.py)``) to a file that defines it; the benchmark's results
blocks are where ``bench.py --update-readme`` writes them. (``mkdocs build --strict`` checks
the site's own links and the API reference; the pages' links to tests, results and README.md
leave the site, so they are checked here.)"""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def links(text):
    """(link text, target) of the markdown links outside fenced code blocks."""
    return LINK.findall(FENCE.sub("", text))


def slug(heading):
    """The anchor GitHub (and mkdocs' toc) gives a heading."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def anchors(path):
    return {slug(h) for h in HEADING.findall(FENCE.sub("", path.read_text()))}


def problems(page):
    """What is wrong with the links of one page, as readable lines."""
    out = []
    for text, target in links(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}: [{text}]({target})"
        if not dest.exists():
            out.append(f"{where}: {path} does not exist")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
        name = text.strip("`")
        if re.fullmatch(r"test_\w+", name) and dest.suffix == ".py" and not re.search(
                rf"^\s*def {name}\(", dest.read_text(), re.M):
            out.append(f"{where}: {dest.relative_to(ROOT)} defines no {name}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_points_to_what_exists(page):
    assert problems(page) == []


def test_the_checker_finds_broken_links(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_real():\n    pass\n")
    page = tmp_path / "README.md"
    page.write_text("# Top\n## Two words\n"
                    "[ok](tests/test_a.py) [ok](#two-words) [ok](README.md#top) [web](https://x.y)\n"
                    "[`test_real`](tests/test_a.py) ![img](tests/)\n"
                    "```\n[in a code block](nowhere.md)\n```\n")
    assert problems(page) == []
    page.write_text(page.read_text() + "[gone](docs/gone.md) [a](#three-words)\n"
                    "[test_renamed](tests/test_a.py) ![img](missing.png)\n")
    assert problems(page) == [
        "README.md: [gone](docs/gone.md): docs/gone.md does not exist",
        "README.md: [a](#three-words): no heading #three-words in README.md",
        "README.md: [test_renamed](tests/test_a.py): tests/test_a.py defines no test_renamed",
        "README.md: [img](missing.png): missing.png does not exist",
    ]


def test_the_results_blocks_are_where_the_benchmark_writes_them():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import report

    for page in (ROOT / "README.md", report.RESULTS_PAGE):
        text = page.read_text()
        assert text.count(report.README_BEGIN) == 1 and text.count(report.README_END) == 1, page
