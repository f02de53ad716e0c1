"""The benchmark machinery (benchmarks/) on a tiny parameter set with a tiny time budget:
every method computes the same EMA as a float64 loop, and a run writes its outputs."""
import csv
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench  # noqa: E402
import cases as C  # noqa: E402
import methods as M  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402

# Methods that cannot run a case, and why that is expected.
EXPECTED_UNSUPPORTED = {
    ("bf16", "averaged_model"),  # foreach lerp needs equal dtypes
    ("bf16", "torch_ema"),  # keeps its EMA in the params' dtype
}


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name, tensors, params", [
    ("resnet50", 161, 25_557_032),
    ("gpt2_small", 148, 124_439_808),
    ("vit_b16", 152, 86_567_656),
    ("many_small", 2000, 2_048_000),
    ("llama_1b", 201, 1_100_048_384),
])
def test_model_shapes_match_the_real_architectures(name, tensors, params):
    spec = models.spec(name)
    assert len(spec) == tensors
    assert sum(models.numel(s) for _, s in spec) == params
    assert len({n for n, _ in spec}) == tensors  # names are unique


def _float64_loop(case, steps):
    out = []
    for k, d in enumerate(case.decays):
        row = []
        for i, p in enumerate(case.params):
            e, p64 = case.start(k, i).double(), p.detach().double()
            for _ in range(steps):
                e = e + (1.0 - d) * (p64 - e)
            row.append(e)
        out.append(row)
    return out


@pytest.mark.parametrize("kind", C.KINDS)
def test_every_method_matches_a_float64_loop(kind):
    case = C.build_case("tiny", kind)
    steps = 3
    want = _float64_loop(case, steps)
    ran = []
    for m in M.methods_for(kind, "cpu"):
        if m.reference:
            continue
        try:
            runner = m.build(case)
        except M.Unsupported as exc:
            if m.key == "fused_ema" and M.FusedEMA is None:
                continue
            assert (kind, m.key) in EXPECTED_UNSUPPORTED, f"{m.key} unsupported: {exc}"
            continue
        assert (kind, m.key) not in EXPECTED_UNSUPPORTED, f"{m.key} now runs {kind}: update this"
        case.reset(runner.emas)
        if not m.writes:  # times host work only: the EMAs must stay as they are
            before = [[e.clone() for e in row] for row in runner.emas]
            for _ in range(steps):
                runner.step()
            assert all(torch.equal(a, b) for ra, rb in zip(runner.emas, before)
                       for a, b in zip(ra, rb)), m.key
            continue
        for _ in range(steps):
            runner.step()
        assert len(runner.emas) == case.num_decays
        for got_row, want_row in zip(runner.emas, want):
            assert len(got_row) == len(want_row)
            for got, ref in zip(got_row, want_row):
                assert got.dtype == torch.float32
                torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-6,
                                           msg=lambda s: f"{m.key} ({kind}): {s}")
        # the harness's own check agrees (after CHECK_STEPS updates)
        case.reset(runner.emas)
        for _ in range(C.CHECK_STEPS):
            runner.step()
        assert C.max_error(case, runner.emas) <= bench.CHECK_TOL, m.key
        ran.append(m.key)
    assert "plan" in ran or "plan_multi" in ran


def test_the_check_catches_a_wrong_ema():
    case = C.build_case("tiny", "fp32")
    runner = M.METHOD_BY_KEY["plan"].build(case)
    case.reset(runner.emas)
    runner.step()  # one update instead of CHECK_STEPS
    assert C.max_error(case, runner.emas) > bench.CHECK_TOL


def test_bytes_per_update_counts_honestly():
    n = 1006
    assert C.build_case("tiny", "fp32").bytes_per_update == 12 * n
    assert C.build_case("tiny", "bf16").bytes_per_update == 10 * n
    assert C.build_case("tiny", "fp32x2").bytes_per_update == 20 * n


def test_plans():
    default = bench.plan_cases(bench.parse_args([]))
    assert ("gpt2_small", "fp32") in default and ("many_small", "fp32") in default
    assert ("gpt2_small", "bf16") in default and ("gpt2_small", "fp32x2") in default
    matrix = bench.plan_cases(bench.parse_args(["--models", "vit_b16,tiny", "--dtypes", "fp32,bf16",
                                                "--decays", "1,2"]))
    assert matrix == [("vit_b16", "fp32"), ("vit_b16", "fp32x2"), ("vit_b16", "bf16"),
                      ("tiny", "fp32"), ("tiny", "fp32x2"), ("tiny", "bf16")]
    assert ("llama_1b", "fp32") in bench.plan_cases(bench.parse_args(["--large"]))


def test_a_run_writes_json_csv_png_and_markdown(tmp_path, capsys):
    result = bench.main(["--models", "tiny", "--dtypes", "fp32,bf16", "--decays", "1,2",
                         "--device", "cpu", "--min-run-time", "0.01", "--rounds", "2",
                         "--out", str(tmp_path), "--tag", "t", "--no-progress"])
    out = capsys.readouterr().out
    assert "Targets" in out and "EMAPlan.update_" in out
    for ext in ("json", "csv", "png", "md"):
        assert (tmp_path / f"t.{ext}").stat().st_size > 0, ext
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["meta"]["torch_threads"] == 2
    assert {(c["model"], c["kind"]) for c in data["cases"]} == {
        ("tiny", "fp32"), ("tiny", "fp32x2"), ("tiny", "bf16")}
    for c in data["cases"]:
        for r in c["rows"]:
            if r["status"] == "ok":
                assert r["median_s"] > 0 and r["samples"] >= 2, r
                if not r["reference"] and M.METHOD_BY_KEY[r["method"]].writes:
                    assert r["check"] == "ok", r
            else:
                assert r["status"] == "n/a", r
    goals = [t for t in data["targets"] if t["goal"] != "(info)"]
    assert len(goals) == sum(t.goal is not None for t in bench.TARGETS)
    assert all(t["why"] for t in data["targets"])
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(c["rows"]) for c in result["cases"])
    md = (tmp_path / "t.md").read_text()
    assert "| method |" in md and "t.png" in md


def test_update_readme_rewrites_only_its_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{bench.README_BEGIN}\nold\n{bench.README_END}\nafter\n")
    assert bench.update_readme(readme, "new table\n", "t")
    assert readme.read_text() == (f"# x\nbefore\n{bench.README_BEGIN}\nnew table\n"
                                  f"{bench.README_END}\nafter\n")
    other = tmp_path / "OTHER.md"
    other.write_text("no markers\n")
    assert not bench.update_readme(other, "x", "t")
    assert other.read_text() == "no markers\n"


def test_update_readme_writes_the_tables_to_the_page_and_their_summary_to_the_readme(tmp_path):
    readme, page = tmp_path / "README.md", tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    for f in (readme, page):
        f.write_text(f"head\n{bench.README_BEGIN}\nold\n{bench.README_END}\ntail\n")
    result = bench.main(["--models", "tiny", "--dtypes", "fp32,bf16", "--decays", "1",
                         "--device", "cpu", "--min-run-time", "0.01", "--rounds", "1",
                         "--out", str(tmp_path / "out"), "--tag", "t", "--no-progress",
                         "--update-readme", "--readme", str(readme), "--results-page", str(page)])
    full, summary = page.read_text(), readme.read_text()
    for text in (full, summary):
        assert text.startswith(f"head\n{bench.README_BEGIN}\n") and "old" not in text
        assert text.endswith(f"{bench.README_END}\ntail\n")
    assert "| method |" in full and "](../out/t.png)" in full  # links from the page's folder
    # The summary: one row per case, FusedEMA.update's, and a link to the page.
    assert "| method |" not in summary and "[docs/benchmarks.md](docs/benchmarks.md)" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| tiny")]
    assert len(rows) == len(result["cases"]) == 2
    for row, case in zip(rows, result["cases"]):
        fused = next(r for r in case["rows"] if r["method"] == "fused_ema")
        assert row.split(" | ")[2] == report._ms(fused["median_s"])


def test_the_time_budget_cuts_slow_rounds_first():
    calls = [0.01] * 10 + [0.5] * 4  # ten fast methods, four slow ones
    assert bench.choose_rounds(calls, 3, 0.2, None) == (3, 3, 0.2)
    assert bench.choose_rounds(calls, 3, 0.2, 1000.0) == (3, 3, 0.2)
    # 3 rounds: fast 10 x 0.61 + slow 4 x 2.0 = 14.1 s; 2 slow rounds: 12.1 s
    assert bench.choose_rounds(calls, 3, 0.2, 12.5) == (3, 2, 0.2)
    rf, rs, b = bench.choose_rounds(calls, 3, 0.2, 9.0)
    assert (rf, rs) == (3, 2) and 0.05 <= b < 0.2
    assert bench.choose_rounds(calls, 3, 0.2, 0.1) == (2, 1, 0.05)  # the floor
    budget = bench.Budget(100.0, [1.0, 3.0])
    assert 20 < budget.cap(0, fixed_now=1.0) <= 25  # a quarter of what is left


def test_outputs_go_to_out_and_the_record_only_on_request():
    results = str(bench.HERE / "results")
    assert bench.parse_args([]).out == str(bench.REPO / "runs")
    assert bench.parse_args(["--out", "x"]).out == "x"
    assert bench.parse_args(["--update-results"]).out == results
    assert bench.parse_args(["--update-results", "--update-readme"]).update_readme
    for argv in (["--update-readme"], ["--out", "x", "--update-readme"],
                 ["--out", "x", "--update-results"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_targets_are_ratios_of_this_runs_medians():
    def case(model, **medians):
        return {"device": "cpu", "model": model, "kind": "fp32", "tensors": 4, "rows": [
            {"method": k, "status": "ok", "median_s": v} for k, v in medians.items()]}
    got = {t["target"]: t for t in bench.compute_targets([
        case("gpt2_small", plan=1.2, bw_add=1.0, compiled_foreach_lerp=1.5),
        case("many_empty", plan=4e-8, fused_ema=8e-8)])}
    t = got["GPT-2 small fp32: EMAPlan.update_ time / bandwidth ref time"]
    assert t["measured"] == pytest.approx(1.2) and t["met"] is False and t["by"] == "9.1% over"
    t = got["GPT-2 small: EMAPlan.update_ speedup vs torch.compile(_foreach_lerp_)"]
    assert t["measured"] == pytest.approx(1.25) and t["goal"] == "(info)" and t["met"] is None
    t = got["10,000 empty tensors: EMAPlan.update_ host cost per tensor"]
    assert t["measured"] == pytest.approx(10.0) and t["goal"] == "(info)"  # 4e-8 s / 4 tensors
    assert got["2000 x 1024: FusedEMA.update speedup vs _foreach_lerp_"]["note"] == "not run"
    assert "ResNet-50: EMAPlan.update_ speedup vs torch.compile(_foreach_lerp_)" not in got
    assert all(t.why for t in bench.TARGETS)


def test_the_compiled_anchor_is_compiled_before_it_is_timed():
    from torch._dynamo.utils import counters
    case = C.build_case("tiny", "fp32")
    before = counters["stats"]["unique_graphs"]
    runner = M.METHOD_BY_KEY["compiled_foreach_lerp"].build(case)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == before + 1  # compiled once, by the builder
    for _ in range(3):  # what the harness times: no compile, no recompile
        runner.step()
    assert counters["stats"]["unique_graphs"] == graphs
