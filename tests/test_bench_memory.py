"""benchmarks/bench_memory.py: the 1B memory table's formulas agree with what the
libraries allocate for a small model here (its --quick mode), and the measurement counts
what an EMA holds, once, without the model's own tensors."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_memory as B  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_quick_run_every_measured_row_matches_its_formula(tmp_path, capsys):
    out = B.main(["--quick", "--out", str(tmp_path)])
    assert out["meta"]["formulas_match"]
    assert "Every measured row matches its formula" in capsys.readouterr().out
    assert json.loads((tmp_path / "bench_memory.json").read_text())["meta"]["formulas_match"]
    assert "| FusedEMA(model) (fp32 EMA) |" in (tmp_path / "bench_memory.md").read_text()
    for lay in ("full", "lora"):
        rows = out["small"][lay]["rows"]
        assert {"fused_fp32", "fused_bf16", "fused_copy", "fused_host"} <= set(rows)
        assert all(m["ok"] and m["held"] > 0 for m in rows.values())
    # the 1B tables: the LoRA layout is about 1% trainable; FusedEMA's fp32 EMA of it
    # owns exactly the adapters' fp32 bytes, of the full fine-tune 4 bytes per parameter
    full, lora = out["1b"]["full"], out["1b"]["lora"]
    assert full["params"] == 1_100_048_384 == full["trainable"]
    assert 0.009 < lora["trainable"] / lora["params"] < 0.011
    assert full["rows"]["fused_fp32"]["acc"] == 4.0
    assert lora["rows"]["fused_fp32"]["acc"] * lora["params"] == lora["adapters_fp32_bytes"]
    assert lora["rows"]["fused_copy"]["acc"] == 4.0
    assert full["rows"]["diffusers_offload"]["acc"] == 0
    assert full["rows"]["diffusers_offload"]["acc_peak"] >= 2.0


def test_the_check_catches_a_wrong_formula(tmp_path, monkeypatch):
    row = B.ROW_BY_KEY["fused_host"]
    # the staging copy forgotten: the EMA's fp32 bytes only
    monkeypatch.setattr(row, "formula", lambda t: B.Bytes(host=t.nbytes(4)))
    with pytest.raises(SystemExit, match="differs from its formula"):
        B.main(["--quick", "--out", str(tmp_path)])
    assert "| NO |" in (tmp_path / "bench_memory.md").read_text()


class _Slotted:
    __slots__ = ("held",)

    def __init__(self, t):
        self.held = t


def test_owned_bytes_counts_each_storage_once_and_not_the_models():
    model = nn.Linear(4, 3)
    mine = torch.zeros(100)  # 400 bytes
    other = torch.zeros(10, dtype=torch.float64)  # 80 bytes
    ema = nn.Module()
    ema.state = {"a": [mine, mine[10:20], (mine.view(10, 10),)], "w": model.weight}
    ema.slotted = _Slotted(other)
    ema.model = model  # reachable, but the model's
    ema.register_buffer("empty", torch.zeros(0))
    assert B.owned_bytes(ema, model) == 480
