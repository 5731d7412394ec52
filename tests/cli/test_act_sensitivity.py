"""experiments/act_sensitivity.py end to end on the tiny checkpoint: one activation site at a time, per range."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "act_sensitivity.py"


def _script():
    spec = importlib.util.spec_from_file_location("act_sensitivity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_site_at_a_time_writes_the_table_and_leaves_the_model_fp32(tiny_checkpoint, tiny_data, tmp_path):
    script = _script()
    out = tmp_path / "act.md"
    argv = ["--model", str(tiny_checkpoint), "--task", "sst2", "--data", str(tiny_data), "--max-length", "16"]
    argv += ["--act-bits", "2", "--act-ranges", "max,mse,dynamic", "--sites", "encoder.0.ffn_in,encoder.1.ffn_out"]
    argv += ["--calibration-batches", "2", "--batch-size", "8", "--max-eval-samples", "16", "--out", str(out)]
    argv += ["--max-train-samples", "24", "--quiet"]  # 2 batches of 8 from a seeded 24 of the 96 sentences
    assert script.main(argv) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    rows = record["rows"]
    assert set(rows) == {"encoder.0.ffn_in", "encoder.1.ffn_out", "all"}
    fp32 = record["fp32"]["loss"]
    for name, row in rows.items():
        assert set(row) == {"max", "mse", "dynamic"}
        assert row["dynamic"]["amax"] is None
        # 2-bit inputs move the loss; every row is a separate measurement
        assert all(abs(row[r]["loss"] - fp32) > 0 for r in row), name
    for name in ("encoder.0.ffn_in", "encoder.1.ffn_out"):
        assert 0 < rows[name]["mse"]["amax"] <= rows[name]["mse"]["peak"]
    text = out.read_text()
    assert "python experiments/act_sensitivity.py --model" in text and "| encoder.1.ffn_out |" in text
    assert "**all 2 sites**" in text
    assert "batches of 8 training examples (seed 0, from a seeded 24 of the training split)" in text


def test_unknown_site_and_range_are_one_line(tiny_checkpoint, tiny_data, tmp_path, capsys):
    script = _script()
    base = [
        "--model",
        str(tiny_checkpoint),
        "--task",
        "sst2",
        "--data",
        str(tiny_data),
        "--out",
        str(tmp_path / "a.md"),
    ]
    assert script.main([*base, "--act-ranges", "max,p99"]) == 2
    assert "--act-ranges 'p99' is not known; use one of max, percentile, mse, dynamic" in capsys.readouterr().err
    assert script.main([*base, "--sites", "encoder.7.query", "--max-length", "16"]) == 2
    assert "no activation site encoder.7.query" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bits", [1, 17])
def test_act_bits_out_of_range(tiny_checkpoint, tiny_data, tmp_path, capsys, bits):
    script = _script()
    argv = ["--model", str(tiny_checkpoint), "--task", "sst2", "--data", str(tiny_data), "--out", str(tmp_path / "a")]
    assert script.main([*argv, "--act-bits", str(bits)]) == 2
    assert "--act-bits" in capsys.readouterr().err
